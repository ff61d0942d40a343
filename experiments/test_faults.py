"""The fault sweep: what a careless user types, beyond the README table's cases. About a minute.

    python -m pytest -q experiments/test_faults.py

Each case is one command line of one script, run in this process on shared tiny inputs: the data
in the Amazon 2014 layout, its processed folder, embeddings of a tiny LM, and a finished run. Every
case must end in a clean exit: argparse's usage error (status 2, its message on stderr) or one line
`error: ...` (a string exit status), never another exception, which would be a traceback. After
each case every input is byte-identical and no temporary file, old copy or lock is left anywhere.
"""
import os
import re
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import compare  # noqa: E402
import data  # noqa: E402
import embed  # noqa: E402
import download  # noqa: E402
import eval as evaluation  # noqa: E402
import import_tables  # noqa: E402
import train  # noqa: E402
from test_smoke import amazon2014, synthetic_log, tiny, tiny_emb, tiny_lm, tree_hashes  # noqa: E402,F401

USAGE = 2                                                          # argparse's exit status


@pytest.fixture(scope='module')
def world(tiny, tiny_emb, tmp_path_factory):
    """{name: path} of the shared inputs; the run is finished, the rest are files to point at."""
    root = tmp_path_factory.mktemp('world')
    raw = amazon2014(str(root / 'raw'), synthetic_log())
    run = root / 'run'
    train.main(['--data', tiny.folder, '--emb', tiny_emb, '--max-len', '10', '--d', '16', '--epochs', '2',
                '--n-similar', '3', '--log-every', '1000', '--out', str(run)])
    (root / 'a-file').write_text('not a folder')
    (root / 'plot.png').write_text('an earlier plot')
    return {'root': str(root), 'raw': raw, 'data': tiny.folder, 'emb': tiny_emb, 'run': str(run),
            'file': str(root / 'a-file'), 'png': str(root / 'plot.png'), 'new': str(root / 'new')}


T = ['--data', '{data}', '--emb', '{emb}', '--max-len', '10', '--d', '16', '--epochs', '1', '--n-similar', '3',
     '--out', '{new}']                                               # a train.py command that would work
E = ['--data', '{data}', '--lm', 'no-such-model', '--out', '{new}']   # embed.py, failing only at the model
D = ['--raw', '{raw}', '--out', '{new}']                               # data.py

CASES = [
    # train.py: a number out of range, a choice that does not exist, settings that cannot work together
    ('train', T + ['--max-len', '0'], USAGE, r'--max-len 0: give a number of at least 1'),
    ('train', T + ['--batch-size', '0'], USAGE, r'--batch-size 0'),
    ('train', T + ['--eval-batch', '0'], USAGE, r'--eval-batch 0'),
    ('train', T + ['--log-every', '0'], USAGE, r'--log-every 0'),
    ('train', T + ['--d', '0'], USAGE, r'--d 0'),
    ('train', T + ['--heads', '3'], USAGE, r'--heads 3 does not divide --d 16'),
    ('train', T + ['--cross-heads', '5'], USAGE, r'--cross-heads 5 does not divide --d 16'),
    ('train', T + ['--layers', '0'], USAGE, r'--layers 0'),
    ('train', T + ['--dropout', '1'], USAGE, r'--dropout 1.0: give a share in \[0, 1\)'),
    ('train', T + ['--dropout', '-0.1'], USAGE, r'--dropout -0.1'),
    ('train', T + ['--mask-prob', '1.5'], USAGE, r'--mask-prob 1.5'),
    ('train', T + ['--alpha', '-1'], USAGE, r'--alpha -1.0: give a number of at least 0'),
    ('train', T + ['--lr', '0'], USAGE, r'--lr takes a number above 0'),
    ('train', T + ['--weight-decay', '-1'], USAGE, r'--weight-decay -1.0'),
    ('train', T + ['--clip', '-1'], USAGE, r'--clip -1.0'),
    ('train', T + ['--threads', '-1'], USAGE, r'--threads -1'),
    ('train', T + ['--epochs', '0'], USAGE, r'--epochs 0'),
    ('train', T + ['--patience', '0'], USAGE, r'--patience 0'),
    ('train', T + ['--negatives', '0'], USAGE, r'--negatives 0'),
    ('train', T + ['--n-similar', '0'], USAGE, r'--n-similar 0'),
    ('train', T + ['--eval-memory', '0'], USAGE, r'--eval-memory 0'),
    ('train', T + ['--ks', '0'], USAGE, r'--ks numbers of at least 1'),
    ('train', T + ['--device', 'nonsense'], USAGE, r"--device nonsense: not a device; use 'auto', 'cpu' or"),
    ('train', T + ['--device', 'cuda'], USAGE, r'--device cuda: this machine has no CUDA device'),
    ('train', T + ['--device', 'cuda:3'], USAGE, r'--device cuda:3: this machine has no CUDA device'),
    ('train', T + ['--device', 'meta'], USAGE, r"--device meta: only 'cpu' and 'cuda'"),
    ('train', T + ['--no-semantic', '--no-collaborative'], USAGE, r'leave LLM-ESR no view'),
    ('train', T + ['--resume', '--overwrite'], USAGE, r'give one of them'),
    ('train', T + ['--loss', 'nonsense'], USAGE, r"argument --loss: invalid choice: 'nonsense'"),
    ('train', T + ['--method', 'sasrec'], USAGE, r"argument --method: invalid choice"),
    ('train', T + ['--backbone', 'gpt'], USAGE, r"argument --backbone: invalid choice"),
    ('train', T + ['--d', 'abc'], USAGE, r"argument --d/--hidden: invalid int value: 'abc'"),
    ('train', T + ['--adapter-layers', '3'], USAGE, r'argument --adapter-layers: invalid choice'),
    # train.py: inputs that are missing, swapped or wrong for the run
    ('train', T + ['--d', '48'], 1, r"--d 48 is larger than the LM's 32 dimensions; use a smaller --d"),
    ('train', T + ['--n-similar', '40'], 1, r'--n-similar 40: the data has 40 users; give fewer'),
    ('train', [a for a in T if a not in ('--emb', '{emb}')], 1, r'--method llmesr needs --emb'),
    ('train', T + ['--emb', '{data}'], 1, r'holds processed data \(data.py\), not embeddings.*swap'),
    ('train', T + ['--data', '{emb}'], 1, r'holds embeddings \(embed.py\), not processed data.*swap'),
    ('train', T + ['--data', '{root}/nothing'], 1, r'nothing/manifest.json: no processed-data manifest here'),
    ('train', T + ['--emb', '{root}/nothing'], 1, r'nothing/manifest.json: no embedding manifest here'),
    ('train', T + ['--out', '{data}'], 1, r'--out .* is --data .*: writing there would overwrite the input'),
    ('train', T + ['--out', '{emb}/run'], 1, r'is inside --emb'),
    ('train', T + ['--out', '{file}'], 1, r'is a file, not a folder'),
    ('train', T + ['--resume'], 1, r'--resume: .*last.pt does not exist; start without --resume'),
    ('train', T + ['--out', '{run}'], 1, r'holds a run \(.*\)\. Continue it with --resume, or replace it'),
    ('train', T + ['--out', '{run}', '--resume', '--epochs', '2', '--lr', '0.5'], 1,
     r'was trained with other settings: lr=0.001 \(now 0.5\)'),
    ('train', T + ['--out', '{run}', '--overwrite', '--emb', '{root}/typo'], 1, r'typo/manifest.json'),
    ('train', T + ['--out', '{run}/', '--overwrite', '--data', '{root}/typo'], 1, r'typo/manifest.json'),
    # embed.py
    ('embed', E + ['--batch-size', '0'], USAGE, r'--batch-size 0: give a number of at least 1'),
    ('embed', E + ['--max-length', '1'], USAGE, r'--max-length 1: give a number of at least 2'),
    ('embed', E + ['--max-length', '0'], USAGE, r'--max-length 0'),
    ('embed', E + ['--finetune', '--steps', '0'], USAGE, r'--steps 0'),
    ('embed', E + ['--views', '1'], USAGE, r'--views 1'),
    ('embed', E + ['--drop', '1'], USAGE, r'--drop, --lora-dropout and --warmup take shares'),
    ('embed', E + ['--temperature', '0'], USAGE, r'--temperature and --temperature-lr take numbers above 0'),
    ('embed', E + ['--device', 'nonsense'], USAGE, r'--device nonsense: not a device'),
    ('embed', E + ['--data', '{root}/nothing'], 1, r'no processed-data manifest here'),
    ('embed', E + ['--data', '{emb}'], 1, r'holds embeddings \(embed.py\), not processed data'),
    ('embed', E, 1, r'--lm no-such-model: cannot be found locally or fetched'),
    ('embed', E + ['--out', '{data}'], 1, r'writing there would overwrite the input'),
    ('embed', E + ['--out', '{run}'], 1, r'holds files that are not embeddings'),
    ('embed', E + ['--out', '{file}'], 1, r'is a file, not a folder'),
    ('import', ['--data', '{data}', '--out', '{new}'], USAGE, r'the following arguments are required: --tables'),
    ('import', ['--data', '{data}', '--tables', '{raw}', '--out', '{new}'], 1, r'found neither itm_emb_np.pkl'),
    ('import', ['--data', '{data}', '--tables', '{root}/nothing', '--out', '{new}'], 1, r'found neither'),
    ('import', ['--data', '{data}', '--tables', '{emb}', '--out', '{emb}'], 1, r'would overwrite the input'),
    ('import', ['--data', '{emb}', '--tables', '{emb}', '--out', '{new}'], 1, r'holds embeddings'),
    ('import', ['--data', '{data}', '--tables', '{emb}', '--out', '{run}'], 1, r'holds files that are not embeddings'),
    # data.py
    ('data', ['--raw', '{raw}'], USAGE, r'the following arguments are required: --out'),
    ('data', D + ['--min-user', '0'], USAGE, r'--min-user 0: give a number of at least 1'),
    ('data', D + ['--min-item', '-2'], USAGE, r'--min-item -2'),
    ('data', D + ['--eval-negatives', '0'], USAGE, r'--eval-negatives 0'),
    ('data', D + ['--sample-users', '0'], USAGE, r'--sample-users takes a share of users in \(0, 1\]'),
    ('data', D + ['--sample-users', '1.5'], USAGE, r'--sample-users takes a share'),
    ('data', D + ['--max-bad', '2'], USAGE, r'--max-bad a share in \[0, 1\]'),
    ('data', D + ['--kcore', 'twice'], USAGE, r"argument --kcore: invalid choice: 'twice'"),
    ('data', D + ['--columns', 'user'], USAGE, r'--columns user: give USER,ITEM or USER,ITEM,TIME'),
    ('data', D + ['--columns', 'a,b,c,d'], USAGE, r'--columns a,b,c,d'),
    ('data', D + ['--columns', 'a,,c'], USAGE, r'--columns a,,c'),
    ('data', D + ['--raw', '{root}/nothing'], 1, r'--raw .*nothing: no such folder'),
    ('download', ['bogus', '{new}'], 1, r'bogus: unknown name'),
    ('data', D + ['--out', '{raw}'], 1, r'is --raw .*: writing there would overwrite the input'),
    ('data', D + ['--out', '{run}'], 1, r'holds files that are not processed data'),
    ('data', D + ['--out', '{emb}'], 1, r'holds files that are not processed data'),
    # eval.py
    ('eval', ['--run', '{root}/nothing'], 1, r'nothing/best.pt: no checkpoint\. Train first'),
    ('eval', ['--run', '{data}'], 1, r'best.pt: no checkpoint'),
    ('eval', ['--run', '{run}', '--batch-size', '0'], USAGE, r'take numbers of at least 1'),
    ('eval', ['--run', '{run}', '--ks', '0'], USAGE, r'take numbers of at least 1'),
    ('eval', ['--run', '{run}', '--device', 'cuda'], 1, r'--device cuda: this machine has no CUDA device'),
    # experiments/compare.py
    ('compare', ['--paired', '{run},{run}', '{run}'], 1, r'a seed is given twice on one side'),
    ('compare', ['--paired', '{run}', '{root}/nothing'], 1, r'nothing/results.json: no results here'),
    ('compare', ['--table', '{run}', '{root}/nothing'], 1, r'no results here'),
    ('compare', ['--plot', '{png}', '{run}'], 1, r'plot.png exists and is never written over'),
    ('compare', ['--report', '{run}', '--k', '0'], USAGE, r'--k 0: give a cut-off of at least 1'),
    ('compare', ['--plot', '{new}.png'], USAGE, r'--plot takes a PNG file and at least one run folder'),
]
MAINS = {'train': train.main, 'embed': embed.main, 'data': data.main, 'eval': evaluation.main,
         'compare': compare.main, 'import': import_tables.main,
         'download': lambda argv: data.or_exit(download.download, *argv)}


def litter(root):
    return sorted(os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files
                  if '.tmp-' in n or '.old-' in n or n.endswith(('.lock', '.partial')))


@pytest.mark.parametrize('script, argv, status, said', CASES,
                         ids=[f'{c[0]} {" ".join(a for a in c[1] if "{" not in a)}' for c in CASES])
def test_a_careless_command_ends_in_one_clear_line(world, capsys, script, argv, status, said):
    argv = [a.format(**world) for a in argv]
    inputs = [world[k] for k in ('raw', 'data', 'emb', 'run')]
    before = tree_hashes(*inputs)
    with pytest.raises(SystemExit) as e:                           # anything else is a traceback
        MAINS[script](argv)
    message = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err
    assert (1 if isinstance(e.value.code, str) else e.value.code) == status, message
    assert re.search(said, message), message
    if status == 1:
        assert message.startswith('error: ') and '\n' not in message.strip(), message
    assert tree_hashes(*inputs) == before, 'an input changed'
    assert not litter(world['root']) and not litter(os.path.dirname(world['data'])), litter(world['root'])
    shutil.rmtree(world['new'], ignore_errors=True)


def test_the_sweep_has_at_least_sixty_cases():
    assert len(CASES) >= 60

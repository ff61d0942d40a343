"""Tests of experiments/: the benchmarks and diagnostics that import the core.

    python -m pytest -q experiments/test_experiments.py
"""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_smoke import tiny, tiny_emb, tiny_lm, tiny_runs  # noqa: E402,F401  (fixtures)


def test_bench_runs_its_sections_and_prints_a_table(tiny, tiny_emb, tmp_path, capsys):
    import bench
    out = tmp_path / 'bench.json'
    bench.main(['--data', tiny.folder, '--emb', tiny_emb, '--sections', 'step', 'eval', 'retrieval',
                '--step-batches', '2', '--batch-size', '8', '--max-len', '10', '--d', '16', '--retrieval-users', '3000',
                '--repeats', '1', '--threads', '1', '--out', str(out)])
    res = json.load(open(out))
    for kind in ('sasrec', 'gru4rec', 'bert4rec'):
        for loss in ('bce', 'ce', 'sampled'):
            assert res['step'][f'{kind}/{loss}']['llmesr_over_base_total'] > 0
    assert res['retrieval']['exact_on_subset'] and res['eval']['users'] == tiny.n_users
    assert '| step, bert4rec/ce: LLM-ESR / base' in capsys.readouterr().out


def test_bench_measures_each_fine_tuning_path(tiny, tmp_path):
    pytest.importorskip('peft')
    import bench
    texts = [r['prompt'] for r in tiny.read_jsonl('items.jsonl')]
    lm = tiny_lm(str(tmp_path / 'lm'), 'bert', texts)
    bench.main(['--data', tiny.folder, '--lm', lm, '--sections', 'finetune', '--ft-paths', 'full', 'last1', 'lora',
                '--ft-steps', '2', '--ft-batch-size', '4', '--ft-heldout', '5', '--out', str(tmp_path / 'b.json')])
    res = json.load(open(tmp_path / 'b.json'))['finetune']
    trained = {p: res[p]['trainable_parameters'] for p in ('full', 'last1', 'lora')}
    assert trained['full'] > trained['last1'] > trained['lora'] > 0 and res['lora']['items_per_second'] > 0
    assert res['lora']['view_retrieval_before']['items'] == 5 and 0 <= res['lora']['view_retrieval_after']['acc@1'] <= 1


def test_views_sum_is_the_runs_own_ranking_and_each_half_is_reported(tiny_runs, capsys):
    import views
    import eval as evaluation
    model, data, config, device = evaluation.load_run(tiny_runs[1], 'cpu')
    rows = views.view_rows(model, data, config, 'valid')
    assert set(rows) == {'co', 'sem', 'sum'}
    full, _, _ = evaluation.rank_targets(model, data.padded(2, config['max_len']), data.target(2),
                                         data.eval_negatives, 64, device, config['mask_history'])
    assert rows['sum']['all'] == evaluation.metrics(full, [10])
    assert all(0 <= r['tail_share'] <= 1 and r['score_std'] > 0 for r in rows.values())
    views.main(['--run', tiny_runs[0], '--run', tiny_runs[1]])
    out = capsys.readouterr().out
    assert out.count(f'| {tiny_runs[1]} |') == 3 and out.count(f'| {tiny_runs[0]} | co |') == 1


def test_runs_script_trains_skips_finished_runs_and_resumes_interrupted_ones(tiny, tiny_emb, tmp_path):
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = tmp_path / 'runs'
    listing = tmp_path / 'list.txt'
    listing.write_text('# a comment\n\n'
                       f'tiny/a {tiny.folder} {tiny_emb} --method llmesr --max-len 10 --d 16 --epochs 2 --n-similar 3\n'
                       f'tiny/b {tiny.folder} - --method base --max-len 10 --d 16 --epochs 2\n')
    go = lambda: subprocess.run(['bash', 'experiments/runs.sh', str(listing), '2'], cwd=root, capture_output=True,  # noqa: E731
                                text=True, env={**os.environ, 'RUNS': str(runs)}, check=True).stdout
    out = go()
    assert out.count('start') == 2 and all((runs / 'tiny' / n / 'results.json').exists() for n in 'ab')
    first = json.load(open(runs / 'tiny' / 'a' / 'results.json'))
    os.remove(runs / 'tiny' / 'a' / 'results.json')                # as if killed before the test pass
    out = go()
    assert 'done already: tiny/b' in out and 'start tiny/a' in out
    assert json.load(open(runs / 'tiny' / 'a' / 'results.json'))['test'] == first['test']
    assert 'resumed from' in (runs / 'tiny' / 'a' / 'train.log').read_text()


def test_drift_measures_rows_against_their_start_and_the_lm_neighbours(tiny_runs, capsys):
    import torch
    import drift
    from model import similar_users
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    near = similar_users(x, 1)
    assert near[:, 0].tolist() == [1, 0, 3, 2] and drift.shared(near, near).tolist() == [1.0] * 4
    lm, head = torch.randn(30, 8), torch.arange(30) < 6
    start = torch.randn(30, 4)
    same = drift.compare(start.clone(), start, lm, head)
    assert all(r['moved'] == 0 and abs(r['cosine'] - 1) < 1e-6 and r['lm_neighbours_start'] == r['lm_neighbours_end']
               for r in same.values())
    assert same['head']['items'] == 6 and same['tail']['items'] == 24
    moved = drift.compare(-start, start, lm, head)
    assert all(abs(r['moved'] - 2) < 1e-5 and abs(r['cosine'] + 1) < 1e-6 for r in moved.values())
    drift.main(['--run', tiny_runs[0], '--run', tiny_runs[1]])
    out = capsys.readouterr().out
    assert out.count(f'| {tiny_runs[0]} | ') == 2 and 'random →' in out and out.count(f'| {tiny_runs[1]} | ') == 2

"""train.py under torchrun: two CPU processes (gloo) on tiny data. About half a minute.

    python -m pytest -q experiments/test_ddp.py
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from test_smoke import tiny  # noqa: E402,F401  (fixture)

FLAGS = ['--method', 'base', '--max-len', '10', '--hidden', '16', '--lr', '0.01', '--batch-size', '8', '--threads', '1']


def train(tiny, out, *flags, procs=1, wait=True):
    launch = ['torchrun', '--nproc_per_node', str(procs)] if procs > 1 else [sys.executable]
    cmd = [*launch, os.path.join(ROOT, 'train.py'), '--data', tiny.folder, '--out', str(out), *FLAGS, *flags]
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, [line for line in done.stderr.splitlines() if 'error' in line.lower()][:5]
    return json.load(open(out / 'results.json'))


def ndcg(res):
    return res['test']['full']['overall']['NDCG@10']


def test_two_processes_train_to_the_results_of_one_within_seed_noise(tiny, tmp_path):
    one = [train(tiny, tmp_path / f'one-{seed}', '--epochs', '8', '--seed', str(seed)) for seed in (42, 43)]
    two = train(tiny, tmp_path / 'two', '--epochs', '8', '--seed', '42', procs=2)
    assert two['epochs_run'] == 8 and len(two['valid_history']) == 8
    noise = abs(ndcg(one[0]) - ndcg(one[1]))
    assert abs(ndcg(two) - ndcg(one[0])) <= max(3 * noise, 0.05), (ndcg(two), [ndcg(r) for r in one])
    log = open(tmp_path / 'two' / 'train.log').read()
    assert log.count('epoch 7 valid') == 1                         # rank 0 alone writes the log


def test_two_processes_resume_after_a_kill(tiny, tmp_path):
    out = tmp_path / 'run'
    proc = train(tiny, out, '--epochs', '200', '--patience', '200', procs=2, wait=False)
    deadline = time.time() + 120
    while not (out / 'last.pt').exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)
    if proc.poll() is not None:
        pytest.fail('the run ended before it could be killed')
    os.killpg(proc.pid, signal.SIGKILL)                           # torchrun and, in their own groups,
    subprocess.run(['pkill', '-9', '-f', f'out {out}'])            # its workers
    proc.wait()
    while subprocess.run(['pgrep', '-f', f'out {out}'], capture_output=True).returncode == 0:
        time.sleep(0.1)
    assert not (out / 'results.json').exists()
    res = train(tiny, out, '--epochs', '200', '--patience', '200', '--resume', procs=2)
    assert res['epochs_run'] == 200 and 'resumed from' in open(out / 'train.log').read()


def test_two_processes_embed_the_rows_of_one(tiny, tmp_path):
    import numpy as np
    from test_smoke import tiny_lm
    texts = [r['prompt'] for r in tiny.read_jsonl('items.jsonl') + tiny.read_jsonl('users.jsonl')]
    lm = tiny_lm(str(tmp_path / 'lm'), 'bert', texts)
    tables = {}
    for procs in (1, 2):
        launch = ['torchrun', '--nproc_per_node', str(procs)] if procs > 1 else [sys.executable]
        out = tmp_path / f'emb{procs}'
        done = subprocess.run([*launch, os.path.join(ROOT, 'embed.py'), '--data', tiny.folder, '--lm', lm, '--out',
                               str(out), '--batch-size', '4'], env={**os.environ, 'OMP_NUM_THREADS': '1'},
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        tables[procs] = [np.load(out / f'{name}.npy') for name in ('items', 'users')]
        assert json.load(open(out / 'manifest.json'))['items'] == tiny.n_items
    for one, two in zip(tables[1], tables[2]):
        assert (np.abs(one).sum(1) > 0).all() and np.allclose(one, two, atol=1e-6)
    assert not os.path.exists(tmp_path / 'emb2.partial') and not os.path.exists(tmp_path / 'emb2.lock')


def test_fine_tuning_refuses_torchrun(tiny, monkeypatch):
    import embed
    monkeypatch.setenv('RANK', '0')
    with pytest.raises(SystemExit) as e:
        embed.main(['--data', tiny.folder, '--out', 'never', '--lm', 'x', '--finetune'])
    assert e.value.code == 2

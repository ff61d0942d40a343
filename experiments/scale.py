"""What grows with the catalogue: training steps of --loss sampled and chunked full ranking on
synthetic catalogues of 10k, 100k and 1M items.

    python experiments/scale.py --out results/scale-cpu.json

Each size runs in a fresh child process, so its peak resident memory is its own: SASRec (d 64,
2 blocks) with one trainable item table, --steps AdamW steps of sampled softmax (--negatives
uniform items, log-Q corrected) on random sequences of --max-len items, then every one of --users
users ranked against all items, --eval-memory MiB of scores at a time (eval.rank_targets). Prints
a markdown table and writes the figures as JSON.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)


def child(a):
    """One catalogue size: a dict of timings and the peak resident memory of this process."""
    from eval import rank_targets
    from model import ModelConfig, Recommender, pick_device
    from train import negatives_for, training_batch
    torch.manual_seed(0)
    device = pick_device(a.device)
    model = Recommender(ModelConfig(n_items=a.items, method='base', loss='sampled', negatives=a.negatives,
                                    max_len=a.max_len)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(1, a.items + 1, (a.steps + 1, a.batch_size, a.max_len + 1), generator=gen)
    times = []
    for step in range(a.steps + 1):                                # step 0 warms up, untimed
        started = time.time()
        seq, pos, history = training_batch(rows[step], 'sasrec', a.items, 0.0, a.max_len, gen)
        neg = negatives_for('sampled', pos, history, a.items, a.negatives, gen).to(device)
        loss, _ = model(seq.to(device), pos.to(device), neg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        times.append(time.time() - started)
    inputs = np.random.default_rng(0).integers(1, a.items + 1, (a.users, a.max_len))
    targets, negatives = inputs[:, -1].copy(), np.ones((a.users, 100), dtype=np.int64)
    started = time.time()
    rank_targets(model, inputs[:, :-1], targets, negatives, a.eval_batch, device, memory_mib=a.eval_memory)
    eval_seconds = time.time() - started
    return {'items': a.items, 'ms_per_step': 1000 * float(np.median(times[1:])),
            'eval_seconds': eval_seconds, 'users_per_second': a.users / eval_seconds,
            'peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            'parameters': sum(p.numel() for p in model.parameters()), 'device': str(device)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--sizes', type=int, nargs='+', default=[10_000, 100_000, 1_000_000], help='catalogue sizes')
    p.add_argument('--steps', type=int, default=200, help='training steps timed per size')
    p.add_argument('--batch-size', type=int, default=128, help='users per step')
    p.add_argument('--max-len', type=int, default=50, help='items per training sequence')
    p.add_argument('--negatives', type=int, default=256, help='sampled-softmax negatives per step')
    p.add_argument('--users', type=int, default=2048, help='users ranked against every item')
    p.add_argument('--eval-batch', type=int, default=1024, help='users per ranking batch')
    p.add_argument('--eval-memory', type=float, default=256, help='MiB of scores per chunk of items')
    p.add_argument('--device', default='cpu', help="'cpu' or 'cuda'")
    p.add_argument('--threads', type=int, default=1, help='torch threads in each child')
    p.add_argument('--out', help='JSON file to write (never over an existing one)')
    p.add_argument('--items', type=int, help=argparse.SUPPRESS)    # set in a child process
    a = p.parse_args(argv)
    if a.items:
        torch.set_num_threads(a.threads)
        print(json.dumps(child(a)))
        return
    if a.out and os.path.exists(a.out):
        sys.exit(f'error: {a.out} exists and is never written over; give a new file name.')
    rows = []
    for n in a.sizes:
        cmd = [sys.executable, os.path.abspath(__file__), '--items', str(n)] + [
            x for k, v in vars(a).items() if k not in ('sizes', 'out', 'items')
            for x in (f'--{k.replace("_", "-")}', str(v))]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f'{n:,} items done', file=sys.stderr)
    table = ['| items | parameters | ms/step | ranking s | users/s | peak RSS MiB |', '|---:|---:|---:|---:|---:|---:|']
    table += [f'| {r["items"]:,} | {r["parameters"]:,} | {r["ms_per_step"]:.0f} | {r["eval_seconds"]:.1f} | '
              f'{r["users_per_second"]:.0f} | {r["peak_rss_mib"]:.0f} |' for r in rows]
    print('\n'.join(table))
    if a.out:
        settings = {k: v for k, v in vars(a).items() if k not in ('out', 'items')}
        with open(a.out, 'w') as f:
            json.dump({'settings': settings, 'sizes': rows, 'torch': torch.__version__}, f, indent=1)


if __name__ == '__main__':
    main()

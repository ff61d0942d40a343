"""What `embed.py --bf16` costs on the CPU: speed, and how close its rows and neighbourhoods stay.

    python experiments/bf16_check.py --data processed/beauty --lm models/all-mpnet-base-v2 \
        --out results/bench-cpu-bf16-mpnet.json

Embeds the first --items item prompts and --users user prompts twice with embed.py's own code, in
float32 and under bfloat16 autocast, one after the other in one process (so the ratio is measured on
one machine state), and writes per table: seconds each way, the speed-up, the cosine between each
row's two versions (min and mean), and the share of each row's 10 nearest rows (cosine, within the
sample) that both versions agree on.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import git_commit, load_processed, or_exit, write_json_atomic  # noqa: E402
from embed import embed_texts, load_lm  # noqa: E402


def compare(texts, tokenizer, model, max_length, batch_size):
    timed = {}
    for name, bf16 in (('fp32', False), ('bf16', True)):
        started = time.perf_counter()
        rows = embed_texts(texts, tokenizer, model, max_length, batch_size, name, bf16=bf16)
        timed[name] = time.perf_counter() - started, rows / np.linalg.norm(rows, axis=1, keepdims=True)
    (t32, a), (t16, b) = timed['fp32'], timed['bf16']
    cos = (a * b).sum(1)
    near = [np.argsort(-(x @ x.T - 9 * np.eye(len(x))), axis=1)[:, :10] for x in (a, b)]
    agree = np.mean([len(set(p) & set(q)) / 10 for p, q in zip(*near)])
    return {'texts': len(texts), 'fp32_seconds': t32, 'bf16_seconds': t16, 'speedup': t32 / t16,
            'cosine_min': float(cos.min()), 'cosine_mean': float(cos.mean()), 'top10_agreement': float(agree)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data', required=True, help='processed folder written by data.py')
    p.add_argument('--lm', required=True, help='as embed.py --lm')
    p.add_argument('--out', required=True, help='JSON file to write (never written over)')
    p.add_argument('--items', type=int, default=384, help='item prompts to embed')
    p.add_argument('--users', type=int, default=128, help='user prompts to embed')
    p.add_argument('--max-length', type=int, default=256, help='as embed.py --max-length')
    p.add_argument('--batch-size', type=int, default=64, help='as embed.py --batch-size')
    p.add_argument('--threads', type=int, default=1, help='CPU threads')
    args = p.parse_args(argv)
    if os.path.exists(args.out):
        sys.exit(f'error: {args.out} exists and is never written over; give a new file name.')
    if min(args.items, args.users) < 11:
        p.error('--items and --users take at least 11 (each row needs 10 neighbours)')
    torch.set_num_threads(args.threads)
    data = or_exit(load_processed, args.data)
    tokenizer, model = or_exit(load_lm, args.lm, torch.device('cpu'))
    report = {'lm': args.lm, 'data': args.data, 'threads': args.threads, 'max_length': args.max_length,
              'commit': git_commit(), 'torch': torch.__version__,
              'cpu': torch.backends.cpu.get_cpu_capability(),                 # AVX2, AVX512, ...
              'native_bf16': torch.ops.mkldnn._is_mkldnn_bf16_supported()}    # embed.py's test for --bf16
    for name, n in (('items', args.items), ('users', args.users)):
        texts = [r['prompt'] for r in data.read_jsonl(f'{name}.jsonl')][:n]
        report[name] = compare(texts, tokenizer, model, args.max_length, args.batch_size)
        print(name, json.dumps(report[name]))
    or_exit(write_json_atomic, args.out, report)
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()

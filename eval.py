"""Evaluation: full ranking and the papers' 100-negative protocol, HR@K and NDCG@K per long-tail group.

    python eval.py --run runs/beauty-llmesr              # re-evaluate a saved run's best checkpoint
    python eval.py --report results/beauty/*.json        # a markdown table of finished runs

Full ranking scores the target against every item but padding and, unless the run was trained
with --keep-history, the items of the user's input sequence, as RecBole and most papers do (a
target among them is hidden too and so missed; on Beauty no target is). The sampled protocol scores it against the user's stored negatives (data.py draws them
once per user, uniformly from items the user never touched). Either way a tie with the target
counts against it, so a model that scores everything equally ranks the target last, not first.

Groups: overall; tail_item / head_item by the target item's Pareto group; tail_user / head_user by
the user's Pareto group (data.py computes both from training interactions only).
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import torch

GROUPS = ['overall', 'tail_item', 'head_item', 'tail_user', 'head_user']


def batches_by_length(inputs, batch_size):
    """Index batches of users with similar sequence lengths, so each batch can be cut short."""
    order = np.argsort((inputs != 0).sum(1), kind='stable')
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def trim(rows, least=1):
    """(B, L) left-padded ids -> (B, L') without the columns that are padding in every row (L' >= least)."""
    longest = max(int((rows != 0).sum(1).max()), least)
    return rows[:, -longest:]


@torch.no_grad()
def user_vectors(model, inputs, batch_size, device):
    """(U, L) left-padded ids -> (U, D) float32 user vectors, the model in eval mode."""
    was_training = model.training
    model.eval()
    table = model.item_table()
    out = torch.zeros(len(inputs), table.shape[1])
    for idx in batches_by_length(inputs, batch_size):
        seq = torch.from_numpy(trim(inputs[idx])).to(device)
        out[idx] = model.user_vectors(seq, table).float().cpu()
    model.train(was_training)
    return out


@torch.no_grad()
def rank_targets(model, inputs, targets, negatives, batch_size, device, mask_history=True):
    """0-based rank of each user's target, and the user vectors that scored it.

    inputs (U, L) left-padded ids, targets (U,), negatives (U, n_neg) ids; mask_history hides the
    input items from full ranking (the target excepted) ->
    (full (U,) int64, sampled (U,) int64, vectors (U, D) float32 tensor on the CPU).
    """
    model.eval()
    table = model.item_table()                                     # (n_items + 1, D)
    full = np.zeros(len(inputs), dtype=np.int64)
    sampled = np.zeros(len(inputs), dtype=np.int64)
    vectors = torch.zeros(len(inputs), table.shape[1])
    for idx in batches_by_length(inputs, batch_size):
        seq = torch.from_numpy(trim(inputs[idx])).to(device)
        users = model.user_vectors(seq, table)                     # (B, D)
        vectors[idx] = users.float().cpu()
        scores = users @ table.T                                   # (B, n_items + 1)
        target = torch.from_numpy(targets[idx]).to(device)[:, None]  # (B, 1)
        neg = scores.gather(1, torch.from_numpy(negatives[idx]).long().to(device))  # (B, n_neg)
        sampled[idx] = (neg >= scores.gather(1, target)).sum(1).cpu().numpy()  # ties count against the target
        scores = hide(scores, seq, mask_history)
        full[idx] = ((scores >= scores.gather(1, target)).sum(1) - 1).cpu().numpy()
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


def hide(scores, seq, mask_history):
    """(B, n_items + 1) scores, (B, L) inputs -> the scores, -inf (in place) at padding and, with
    mask_history, at the inputs: a hidden target ranks last, as in RecBole."""
    if mask_history:
        scores.scatter_(1, seq, -float('inf'))
    scores[:, 0] = -float('inf')                                   # padding is never recommended
    return scores


def evaluate(model, inputs, targets, negatives, groups, ks, batch_size, device, mask_history=True):
    """-> ({'full'|'sampled': {group: {metric: value}}}, {'full'|'sampled': ranks (U,)}, user vectors (U, D))"""
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
            lines.append(f'| {protocol} | {g} | {row["users"]:,} | ' + ' | '.join(f'{row[n]:.4f}' for n in names) + ' |')
    return '\n'.join(lines).lstrip('\n') + '\n'


# settings that make a variant; runs that differ in nothing else are seeds of one variant
ABLATIONS = {'no_semantic': 'w/o semantic view', 'no_collaborative': 'w/o collaborative view', 'no_cross': 'w/o cross-attention',
             'split_encoder': 'w/o shared encoder', 'random_init': 'random init'}


def variant(config):
    """A readable name of what a run trained: method, backbone and every setting off its default."""
    tags = [text for key, text in ABLATIONS.items() if config.get(key)]
    if config['method'] == 'llmesr':
        tags += ['w/o self-distillation'] if config['alpha'] == 0 else []
        tags += ['one-layer adapter'] if config['adapter_layers'] == 1 else []
        tags += [f'{config["teacher"]} teachers'] if config['teacher'] != 'table' else []
        tags += ['padding-only cross-attention mask'] if config.get('cross_mask', 'causal') == 'padding' else []
        tags += ['official LM scale'] if config.get('lm_scale', 'xavier') == 'official' else []
        tags += ['residual cross-attention'] if config.get('cross_residual') else []
    tags += [f'{config["loss"]} loss'] if config['loss'] != 'bce' else []
    tags += [f'{config["negatives"]} negatives'] if config['loss'] == 'sampled' else []
    tags += ['official attention'] if config.get('attention', 'causal') == 'official' else []
    tags += ['history kept'] if not config.get('mask_history', False) else []  # runs before the flag kept it
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
        res = json.load(open(path))
        key = (variant(res['config']), res.get('data_fingerprint'), res['config'].get('emb_id'),
               res['config'].get('mask_history', False))
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
            lines.append(f'| {name} | {read} | {seeds} | {protocol} | {" | ".join(cells)} | {seconds:.1f} | {commits} |')
    return '\n'.join(lines) + '\n'


def user_ndcg(run_folders, k=10):
    """(U,) each user's test NDCG@k under full ranking, averaged over the runs (seeds) given."""
    ranks = np.stack([np.load(os.path.join(f, 'test_ranks.npz'))['full'] for f in run_folders])  # (S, U)
    return ((ranks < k) / np.log2(ranks + 2)).mean(0)


def group_of_run(run, group):
    """(U,) bool: the test users of `group` for the data that `run` was trained on."""
    from data import load_processed, read_json
    config = read_json(os.path.join(run, 'results.json'), 'results', f'Train first: python train.py ... --out {run}')['config']
    data = load_processed(config['data'])
    return group_masks(data.target(1), data.head_items(), data.head_users())[group]


def paired_test(a, b):
    """Paired comparison of per-user scores a and b (U,): mean difference, t statistic, two-sided p.

    With thousands of users the t statistic is close to normal, so p uses the normal tail.
    """
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    return {'users': len(d), 'mean_a': float(np.mean(a)), 'mean_b': float(np.mean(b)), 'mean_difference': float(d.mean()),
            't': float(t), 'p_two_sided': math.erfc(abs(t) / math.sqrt(2))}


# ---------------------------------------------------------------------------------------------
# looking at what a model does: one user's recommendations, accuracy by popularity bucket


@torch.no_grad()
def recommend(model, inputs, k, batch_size, device, mask_history=True):
    """(U, L) inputs -> (items (U, k) int64, scores (U, k) float32): each user's top k, best first."""
    model.eval()
    table = model.item_table()
    items, scores = np.zeros((len(inputs), k), dtype=np.int64), np.zeros((len(inputs), k), dtype=np.float32)
    for idx in batches_by_length(inputs, batch_size):
        seq = torch.from_numpy(trim(inputs[idx])).to(device)
        s = hide(model.user_vectors(seq, table) @ table.T, seq, mask_history)
        top = s.topk(k, dim=1)
        items[idx], scores[idx] = top.indices.cpu().numpy(), top.values.float().cpu().numpy()
    return items, scores


def popularity_buckets(popularity, n_buckets):
    """(n_items + 1,) training counts -> (n_items + 1,) bucket of each item: 0 = most popular, equal item counts."""
    order = np.argsort(-popularity[1:], kind='stable') + 1
    bucket = np.zeros(len(popularity), dtype=np.int64)
    for b, chunk in enumerate(np.array_split(order, n_buckets)):
        bucket[chunk] = b
    return bucket


def bucket_metrics(ranks, targets, bucket, n_buckets, k=10):
    """Per bucket of the target item: users, HR@k and NDCG@k from 0-based full-ranking ranks."""
    return [{'bucket': b, 'users': int((bucket[targets] == b).sum()), **metrics(ranks[bucket[targets] == b], [k])}
            for b in range(n_buckets)]


def find_user(data, who, seed):
    """Dense id of a raw user id, or of a random long-tail user for 'tail'."""
    users = data.read_jsonl('users.jsonl')
    if who == 'tail':
        return int(np.random.default_rng(seed).choice(np.flatnonzero(~data.head_users())))
    for row in users:
        if row['raw'] == who:
            return row['id']
    from data import DataError
    raise DataError(f'--show {who}: no such user in {data.folder} (raw ids look like {users[0]["raw"]}); '
                    'use --show tail for a random long-tail user.')


def describe(item, titles, popularity, head, width=60):
    title = titles[item] or '(no title)'
    title = title if len(title) <= width else title[:width - 3] + '...'
    return f'{title} [{popularity[item]}, {"head" if head[item] else "tail"}]'


def show_runs(runs, who, seed, batch_size, k=10):
    """Text: one user's history and test target, then each run's top k side by side, with the target's rank."""
    model, data, config, device = next(iter(runs.values()))
    user = find_user(data, who, seed)
    titles = [''] + [dict(r['attributes']).get('name', '') for r in data.read_jsonl('items.jsonl')]
    pop, head = data.item_popularity(), data.head_items()
    history = data.sequences[data.offsets[user]:data.offsets[user + 1]]
    raw = data.read_jsonl('users.jsonl')[user]['raw']
    lines = [f'user {raw} (id {user}, {"head" if data.head_users()[user] else "tail"} user, {len(history) - 2} '
             'training items); each item: title [training interactions, head/tail]', 'history, oldest first:']
    lines += [f'  {i + 1:>3}. {describe(item, titles, pop, head)}' + ('  <- validation item' if i == len(history) - 2 else '')
              for i, item in enumerate(history[:-1])]
    lines.append(f'test target: {describe(history[-1], titles, pop, head)}')
    columns = []
    for name, (model, data, config, device) in runs.items():
        inputs = data.padded(1, config['max_len'])[user:user + 1]
        full, _, _ = rank_targets(model, inputs, history[-1:].astype(np.int64), data.eval_negatives[user:user + 1], 1, device,
                                  config['mask_history'])
        items, scores = recommend(model, inputs, k, 1, device, config['mask_history'])
        tail = int((~head[items[0]]).sum())
        columns.append([f'{name}: target rank {full[0] + 1}, {tail} of {k} tail items'] +
                       [f'{r + 1:>2}. {describe(i, titles, pop, head, 44)} {s:.2f}' + (' <- target' if i == history[-1] else '')
                        for r, (i, s) in enumerate(zip(items[0], scores[0]))])
    width = max(len(line) for col in columns for line in col) + 2
    for row in zip(*columns):
        lines.append(''.join(cell.ljust(width) for cell in row).rstrip())
    return '\n'.join(lines)


def plot_runs(runs, path, n_buckets, batch_size, k=10):
    """Accuracy by item-popularity bucket and the tail share of top-k lists: a text table, and a PNG if path."""
    model, data, config, device = next(iter(runs.values()))
    targets = data.target(1)
    bucket = popularity_buckets(data.item_popularity(), n_buckets)
    head = data.head_items()
    rows, table = {}, [f'| run | {" | ".join(f"bucket {b} HR@{k} / NDCG@{k}" for b in range(n_buckets))} | tail share of top-{k} |',
                       '|---|' + '---:|' * (n_buckets + 1)]
    for name, (model, data, config, device) in runs.items():
        inputs = data.padded(1, config['max_len'])
        full, _, _ = rank_targets(model, inputs, targets, data.eval_negatives, batch_size, device, config['mask_history'])
        items, _ = recommend(model, inputs, k, batch_size, device, config['mask_history'])
        rows[name] = (bucket_metrics(full, targets, bucket, n_buckets, k), float((~head[items]).mean()))
        table.append(f'| {name} | ' + ' | '.join(f'{m[f"HR@{k}"]:.4f} / {m[f"NDCG@{k}"]:.4f}' for m in rows[name][0]) +
                     f' | {rows[name][1]:.3f} |')
    users = [m['users'] for m in next(iter(rows.values()))[0]]
    text = (f'buckets of {len(bucket) - 1:,} items by training popularity, 0 = most popular, equal item counts; '
            f'test users per bucket: {users}\n' + '\n'.join(table))
    if path:
        try:
            import matplotlib
            matplotlib.use('Agg')
            import matplotlib.pyplot as plt
        except ImportError:
            from data import DataError
            raise DataError(f'--plot {path} needs matplotlib (pip install matplotlib); the same numbers as text:\n{text}') from None
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        width = 0.8 / len(rows)
        for j, (name, (per_bucket, tail_share)) in enumerate(rows.items()):
            label = os.path.basename(os.path.normpath(name))
            for ax, metric in zip(axes[:2], (f'HR@{k}', f'NDCG@{k}')):
                ax.bar(np.arange(n_buckets) + j * width, [m[metric] for m in per_bucket], width, label=label)
                ax.set(title=f'{metric} by target-item popularity', xlabel='bucket (0 = most popular)', ylabel=metric)
            axes[2].bar([j], [tail_share], label=label)
        axes[2].set(title=f'share of tail items in top-{k} lists', xticks=[])
        for ax in axes:
            ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        text += f'\nwrote {path}'
    return text


class OneView(torch.nn.Module):
    """The half of a two-view model's user and item vectors that belongs to one view, as a model."""

    def __init__(self, model, part):
        super().__init__()
        self.model, self.part = model, part
        with torch.no_grad():
            self.table = model.item_table()                        # (n_items + 1, 2d)

    def item_table(self):
        return self.table[:, self.part]

    def user_vectors(self, seq, table=None):
        return self.model.user_vectors(seq, self.table)[:, self.part]


def view_report(runs, batch_size, k=10):
    """Text: test HR@k of each run by its whole score and, for two-view runs, by each view's half alone."""
    lines = [f'| run | scored by | HR@{k} | tail-item HR@{k} | head-item HR@{k} | tail share of top-{k} |', '|---|---|---:|---:|---:|---:|']
    for name, (model, data, config, device) in runs.items():
        inputs, targets, head = data.padded(1, config['max_len']), data.target(1), data.head_items()
        d = config['d']
        parts = [('whole score', slice(None))]
        if model.use_co and model.use_sem:
            parts += [('collaborative half', slice(0, d)), ('semantic half', slice(d, 2 * d))]
        for label, part in parts:
            scorer = OneView(model, part)
            full, _, _ = rank_targets(scorer, inputs, targets, data.eval_negatives, batch_size, device)
            top, _ = recommend(scorer, inputs, k, batch_size, device)
            tail = ~head[targets]
            lines.append(f'| {name} | {label} | {np.mean(full < k):.4f} | {np.mean(full[tail] < k):.4f} | '
                         f'{np.mean(full[~tail] < k):.4f} | {(~head[top]).mean():.3f} |')
    return '\n'.join(lines)


@torch.no_grad()
def attention_report(runs, batch_size):
    """Text: where each two-view run's cross-attention looks from a user's newest test-input item.

    Per stream and head, averaged over users with at least two items: the weight on the newest item
    itself, on the item before it, and 1 / length, the weight of each item under uniform attention.
    A stream whose weight on itself is near 1 passes its item through; near 1 / length, it averages.
    """
    lines = ['| run | stream (queries over keys, values) | head | on the item itself | on the item before | uniform (1 / length) |',
             '|---|---|---:|---:|---:|---:|']
    for name, (model, data, config, device) in runs.items():
        if not (model.use_co and model.use_sem and model.cfg.cross):
            continue
        inputs = data.padded(1, config['max_len'])
        inputs = inputs[(inputs != 0).sum(1) >= 2]
        table = model.item_table()
        sums = {}
        for idx in batches_by_length(inputs, batch_size):
            seq = torch.from_numpy(trim(inputs[idx])).to(device)
            co, sem = model.embedded_views(seq, table, seq)
            bias = model.cross_bias(seq)
            length = (seq != 0).sum(1, keepdim=True).float()        # (B, 1)
            for stream, w in [('collaborative (semantic over collaborative)', model.sem_over_co.weights(sem, co, bias)),
                              ('semantic (collaborative over semantic)', model.co_over_sem.weights(co, sem, bias))]:
                last = w[:, :, -1]                                 # (B, h, L) from the newest item
                parts = torch.stack([last[..., -1], last[..., -2], (1 / length).expand_as(last[..., -1])])  # (3, B, h)
                sums[stream] = sums.get(stream, 0) + parts.sum(1).cpu()
        for stream, total in sums.items():
            for head, (itself, before, uniform) in enumerate((total / len(inputs)).T.tolist()):
                lines.append(f'| {name} | {stream} | {head} | {itself:.3f} | {before:.3f} | {uniform:.3f} |')
    return '\n'.join(lines)


def main(argv=None):
    from data import DataError
    from train import load_run
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--run', help='run folder written by train.py')
    p.add_argument('--compare', nargs='+', default=[], metavar='RUN', help='more run folders for --show and --plot')
    p.add_argument('--report', nargs='+', metavar='RESULTS_JSON', help='print a markdown table of these results.json files, mean ± std over seeds, and stop')
    p.add_argument('--paired', nargs=2, metavar=('RUNS_A', 'RUNS_B'), help='paired test over users of test NDCG@10 (full ranking) '
                   'between two comma-separated lists of run folders (seeds averaged per user), and stop')
    p.add_argument('--group', default='overall', choices=GROUPS, help='users that --paired compares')
    p.add_argument('--show', metavar='USER', help="one user's recommendations: a raw user id, or 'tail' for a random long-tail user")
    p.add_argument('--plot', metavar='PNG', help='HR@10 and NDCG@10 by item-popularity bucket, and the tail share of top-10 lists')
    p.add_argument('--views', action='store_true', help="test HR@10 scored by the whole score, and by each view's half alone")
    p.add_argument('--attention', action='store_true', help="where the cross-attention looks from each user's newest item")
    p.add_argument('--buckets', type=int, default=5, help='item-popularity buckets of equal item count for --plot')
    p.add_argument('--seed', type=int, default=0, help="seed that picks the user of --show tail")
    p.add_argument('--split', default='test', choices=['valid', 'test'], help='which held-out item to rank')
    p.add_argument('--ks', type=int, nargs='+', default=[10], help='cut-offs K of HR@K and NDCG@K')
    p.add_argument('--batch-size', type=int, default=1024, help='users per scoring batch')
    p.add_argument('--device', default='auto', help="'auto', 'cpu' or 'cuda'")
    args = p.parse_args(argv)
    if args.report:
        print(report(args.report, args.ks[0]))
        return
    if args.paired:
        a, b = (side.split(',') for side in args.paired)
        users = group_of_run(a[0], args.group)
        print(json.dumps({'group': args.group, **paired_test(user_ndcg(a, args.ks[0])[users], user_ndcg(b, args.ks[0])[users])},
                         indent=1))
        return
    if not args.run:
        p.error('give --run or --report')
    try:
        runs = {r: load_run(r, args.device) for r in [args.run, *args.compare]}
        if len({run[1].fingerprint for run in runs.values()}) > 1:
            raise DataError('--compare: the runs were trained on different processed data; compare runs of one dataset.')
        if args.show:
            print(show_runs(runs, args.show, args.seed, args.batch_size))
            return
        if args.plot:
            print(plot_runs(runs, args.plot, args.buckets, args.batch_size))
            return
        if args.views:
            print(view_report(runs, args.batch_size))
            return
        if args.attention:
            print(attention_report(runs, args.batch_size))
            return
    except DataError as e:
        sys.exit(f'error: {e}')
    model, data, config, device = runs[args.run]
    cut = 1 if args.split == 'test' else 2
    inputs, targets = data.padded(cut, config['max_len']), data.target(cut)
    groups = group_masks(targets, data.head_items(), data.head_users())
    results, _, _ = evaluate(model, inputs, targets, data.eval_negatives, groups, args.ks, args.batch_size, device,
                             config['mask_history'])
    print(markdown_table(results, args.ks, f'{args.run} ({args.split})'))
    print(json.dumps(results))


if __name__ == '__main__':
    main()

"""One user's history and test target, then each run's top 10 side by side, with the target's rank.

    python experiments/show.py --run runs/sasrec --compare runs/llmesr --user tail   # a random tail user
    python experiments/show.py --run runs/sasrec --user A1YJEY40YUW4SE               # a raw user id

Each item is shown as its title, its training interactions and its Pareto group. The runs must
share their processed data. Imports the core; the core never imports this file.
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import DataError, or_exit  # noqa: E402
from eval import load_run, rank_targets, user_batches  # noqa: E402
from model import LEGACY  # noqa: E402


@torch.no_grad()
def recommend(model, inputs, k, device, mask_history=True):
    """(U, L) inputs of a few users -> (items (U, k) int64, scores (U, k) float32): top k, best first."""
    batches = user_batches(model, inputs, len(inputs), device)
    table = next(batches).float()
    idx, seq, users = next(batches)
    scores = users @ table.T                                       # (U, n_items + 1)
    if mask_history:
        scores.scatter_(1, seq, -float('inf'))
    scores[:, 0] = -float('inf')                                   # padding is never recommended
    top = scores.topk(k, dim=1)
    items, values = np.zeros((len(inputs), k), dtype=np.int64), np.zeros((len(inputs), k), dtype=np.float32)
    items[idx], values[idx] = top.indices.cpu().numpy(), top.values.cpu().numpy()
    return items, values


def find_user(data, who, seed):
    """Dense id of a raw user id, or of a random long-tail user for 'tail'."""
    users = data.read_jsonl('users.jsonl')
    if who == 'tail':
        return int(np.random.default_rng(seed).choice(np.flatnonzero(~data.head_users())))
    for row in users:
        if row['raw'] == who:
            return row['id']
    raise DataError(f'--user {who}: no such user in {data.folder} (raw ids look like {users[0]["raw"]}); '
                    'use --user tail for a random long-tail user.')


def describe(item, titles, popularity, head, width=60):
    title = titles[item] or '(no title)'
    title = title if len(title) <= width else title[:width - 3] + '...'
    return f'{title} [{popularity[item]}, {"head" if head[item] else "tail"}]'


def show_runs(runs, who, seed, k=10):
    """Text: one user's history and test target, then each run's top k side by side, the target's rank."""
    model, data, config, device = next(iter(runs.values()))
    user = find_user(data, who, seed)
    titles = [''] + [dict(r['attributes']).get('name') or r['raw'] for r in data.read_jsonl('items.jsonl')]
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
        mask = config.get('mask_history', LEGACY['mask_history'])
        inputs = data.padded(1, config['max_len'])[user:user + 1]
        target, negatives = history[-1:].astype(np.int64), data.eval_negatives[user:user + 1]
        full, _, _ = rank_targets(model, inputs, target, negatives, 1, device, mask)
        items, scores = recommend(model, inputs, k, device, mask)
        tail = int((~head[items[0]]).sum())
        mark = lambda i: ' <- target' if i == target[0] else ''  # noqa: E731
        ranked = [f'{r + 1:>2}. {describe(i, titles, pop, head, 44)} {s:.2f}{mark(i)}'
                  for r, (i, s) in enumerate(zip(items[0], scores[0]))]
        columns.append([f'{name}: target rank {full[0] + 1}, {tail} of {k} tail items'] + ranked)
    width = max(len(line) for col in columns for line in col) + 2
    for row in zip(*columns):
        lines.append(''.join(cell.ljust(width) for cell in row).rstrip())
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--run', required=True, help='run folder written by train.py')
    p.add_argument('--compare', nargs='+', default=[], metavar='RUN', help='more run folders, side by side')
    p.add_argument('--user', required=True, help="a raw user id, or 'tail' for a random long-tail user")
    p.add_argument('--seed', type=int, default=0, help="seed that picks the user of --user tail")
    p.add_argument('--device', default='auto', help="'auto', 'cpu' or 'cuda'")
    args = p.parse_args(argv)
    print(or_exit(show, args))


def show(args):
    runs = {r: load_run(r, args.device) for r in [args.run, *args.compare]}
    if len({run[1].fingerprint for run in runs.values()}) > 1:
        raise DataError('--compare: the runs were trained on different processed data; use one dataset.')
    return show_runs(runs, args.user, args.seed)


if __name__ == '__main__':
    main()

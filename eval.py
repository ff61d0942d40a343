"""Evaluation: full ranking and the papers' 100-negative protocol, HR@K and NDCG@K per long-tail group.

    python eval.py --run runs/beauty-llmesr              # re-evaluate a saved run's best checkpoint
    python eval.py --report results/beauty/*.json        # a markdown table of finished runs

Full ranking scores the target against every item (history included: a repeated item can be the
target). The sampled protocol scores it against the user's stored negatives (data.py draws them
once per user, uniformly from items the user never touched). Either way a tie with the target
counts against it, so a model that scores everything equally ranks the target last, not first.

Groups: overall; tail_item / head_item by the target item's Pareto group; tail_user / head_user by
the user's Pareto group (data.py computes both from training interactions only).
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

GROUPS = ['overall', 'tail_item', 'head_item', 'tail_user', 'head_user']


def batches_by_length(inputs, batch_size):
    """Index batches of users with similar sequence lengths, so each batch can be cut short."""
    order = np.argsort((inputs != 0).sum(1), kind='stable')
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def trim(rows):
    """(B, L) left-padded ids -> (B, L') without the columns that are padding in every row."""
    longest = max(int((rows != 0).sum(1).max()), 1)
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
def rank_targets(model, inputs, targets, negatives, batch_size, device):
    """0-based rank of each user's target, and the user vectors that scored it.

    inputs (U, L) left-padded ids, targets (U,), negatives (U, n_neg) ids ->
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
        scores[:, 0] = -float('inf')                               # padding is never recommended
        target = torch.from_numpy(targets[idx]).to(device)
        t = scores.gather(1, target[:, None])                      # (B, 1)
        full[idx] = ((scores >= t).sum(1) - 1).cpu().numpy()       # ties count against the target
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


def evaluate(model, inputs, targets, negatives, groups, ks, batch_size, device):
    """-> ({'full'|'sampled': {group: {metric: value}}}, {'full'|'sampled': ranks (U,)}, user vectors (U, D))"""
    full, sampled, vectors = rank_targets(model, inputs, targets, negatives, batch_size, device)
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


def report(paths, k=10):
    """Markdown: one row per results.json and protocol, HR@k and NDCG@k for every group."""
    head = '| run | protocol | ' + ' | '.join(f'{g} HR@{k} | {g} NDCG@{k}' for g in GROUPS) + ' | epochs | s/epoch | commit |'
    lines = [head, '|---|---|' + '---:|' * (2 * len(GROUPS) + 2) + '---|']
    for path in paths:
        res = json.load(open(path))
        c = res['config']
        name = f'{c["method"]} ({c["backbone"]}), seed {c["seed"]}'
        for protocol in ('full', 'sampled'):
            cells = ' | '.join(f'{res["test"][protocol][g][f"HR@{k}"]:.4f} | {res["test"][protocol][g][f"NDCG@{k}"]:.4f}'
                               for g in GROUPS)
            lines.append(f'| {name} | {protocol} | {cells} | {res["epochs_run"]} (best {res["best_epoch"]}) '
                         f'| {np.median(res["epoch_seconds"]):.1f} | {(res.get("commit") or "?")[:7]} |')
    return '\n'.join(lines) + '\n'


def main(argv=None):
    from data import DataError
    from train import load_run
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--run', help='run folder written by train.py')
    p.add_argument('--report', nargs='+', metavar='RESULTS_JSON', help='print a markdown table of these results.json files and stop')
    p.add_argument('--split', default='test', choices=['valid', 'test'], help='which held-out item to rank')
    p.add_argument('--ks', type=int, nargs='+', default=[10], help='cut-offs K of HR@K and NDCG@K')
    p.add_argument('--batch-size', type=int, default=1024, help='users per scoring batch')
    p.add_argument('--device', default='auto', help="'auto', 'cpu' or 'cuda'")
    args = p.parse_args(argv)
    if args.report:
        print(report(args.report, args.ks[0]))
        return
    if not args.run:
        p.error('give --run or --report')
    try:
        model, data, config, device = load_run(args.run, args.device)
    except DataError as e:
        sys.exit(f'error: {e}')
    cut = 1 if args.split == 'test' else 2
    inputs, targets = data.padded(cut, config['max_len']), data.target(cut)
    groups = group_masks(targets, data.head_items(), data.head_users())
    results, _, _ = evaluate(model, inputs, targets, data.eval_negatives, groups, args.ks, args.batch_size, device)
    print(markdown_table(results, args.ks, f'{args.run} ({args.split})'))
    print(json.dumps(results))


if __name__ == '__main__':
    main()

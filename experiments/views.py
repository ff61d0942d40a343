"""What each half of a trained run ranks: the collaborative and the semantic view alone, and their sum.

    python experiments/views.py --run runs/llmesr [--run runs/sasrec ...] [--split valid]

An LLM-ESR score is a dot product of concatenated vectors, so it is the sum of two halves,
u_co . i_co + u_sem . i_sem (model.Recommender; the co stream comes first). For each half alone and
for the sum this prints, over every user's held-out item (full ranking, the run's protocol):
NDCG@10 and HR@10 overall and on tail / head target items, the share of tail items in the top-10
lists, the median training popularity of the items listed, and the spread (std over items) of the
half's scores, which says how much each half can move a ranking. A base run has one half.
Imports the core; the core never imports this file.
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import batches_by_length, or_exit  # noqa: E402
from eval import load_run, metrics, trim  # noqa: E402


def halves(model):
    """[(name, slice of D)] of the run's views, in the order of its item table."""
    d = model.cfg.d
    names = (['co'] if model.use_co else []) + (['sem'] if model.use_sem else [])
    out = [(n, slice(i * d, (i + 1) * d)) for i, n in enumerate(names)]
    return out + [('sum', slice(0, len(names) * d))] if len(names) > 1 else out


@torch.no_grad()
def view_rows(model, data, config, split, batch_size=1024, k=10):
    """{half: {metric: value}} for one run."""
    cut = 1 if split == 'test' else 2
    inputs, targets = data.padded(cut, config['max_len']), data.target(cut)
    head, pop = data.head_items(), data.item_popularity()
    table = model.item_table()                                     # (n_items + 1, D)
    parts = halves(model)
    ranks = {n: np.zeros(len(inputs), dtype=np.int64) for n, _ in parts}
    tops = {n: np.zeros((len(inputs), k), dtype=np.int64) for n, _ in parts}
    spread = {n: [] for n, _ in parts}
    for idx in batches_by_length((inputs != 0).sum(1), batch_size):
        seq = torch.from_numpy(trim(inputs[idx]))
        users = model.user_vectors(seq, table)                     # (B, D)
        target = torch.from_numpy(targets[idx])
        for name, s in parts:
            scores = users[:, s] @ table[1:, s].T                  # (B, n_items) items 1..n
            spread[name].append(scores.std(1))
            scores = torch.cat([torch.full_like(scores[:, :1], -float('inf')), scores], 1)
            if config['mask_history']:
                scores.scatter_(1, seq, -float('inf'))
            scores[:, 0] = -float('inf')
            t = scores.gather(1, target[:, None])
            ranks[name][idx] = ((scores >= t).sum(1) - 1).numpy()
            tops[name][idx] = scores.topk(k, dim=1).indices.numpy()
    tail_target = ~head[targets]
    rows = {}
    for name, _ in parts:
        r = ranks[name]
        rows[name] = {'all': metrics(r, [k]), 'tail': metrics(r[tail_target], [k]),
                      'head': metrics(r[~tail_target], [k]),
                      'tail_share': float((~head[tops[name]]).mean()),
                      'median_pop': float(np.median(pop[tops[name]])),
                      'score_std': float(torch.cat(spread[name]).mean())}
    return rows


def table(runs, split, k=10):
    lines = [f'| run | half | NDCG@{k} | HR@{k} | tail-item NDCG@{k} | head-item NDCG@{k} | tail share of '
             f'top-{k} | median popularity of top-{k} | score std |', '|---|---|' + '---:|' * 7]
    for run in runs:
        model, data, config, _ = load_run(run, 'cpu')
        for name, m in view_rows(model, data, config, split).items():
            lines.append(f'| {run} | {name} | {m["all"][f"NDCG@{k}"]:.4f} | {m["all"][f"HR@{k}"]:.4f} | '
                         f'{m["tail"][f"NDCG@{k}"]:.4f} | {m["head"][f"NDCG@{k}"]:.4f} | '
                         f'{m["tail_share"]:.3f} | {m["median_pop"]:.0f} | {m["score_std"]:.3f} |')
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--run', action='append', required=True, help='run folder (repeat for more)')
    p.add_argument('--split', default='valid', choices=['valid', 'test'], help='which held-out item')
    args = p.parse_args(argv)
    print(or_exit(table, args.run, args.split))


if __name__ == '__main__':
    main()

"""How far a trained collaborative item table moved from where it started, head against tail items.

    python experiments/drift.py --run runs/beauty/sasrec-llminit-ce-s42 [--run ...] [--emb FOLDER]

For each run and each item group (Pareto head and tail items, by training popularity) this prints
the median length of a row at the start and at the best checkpoint, the median relative distance
each row moved, ||w - w0|| / ||w0||, the median cosine between w and w0, and how many of each item's
10 nearest neighbours (cosine) in the LM item table are among its 10 nearest in the trained table
(in the starting table, for reference). A run whose table starts from the PCA of the LM table
(llminit; llmesr) starts where model.Recommender puts it; a base run starts at random, so only its
neighbours are printed, against the LM table of --emb. Imports the core; the core never imports this
file.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import DataError, or_exit, run_path  # noqa: E402
from embed import load_embeddings  # noqa: E402
from eval import load_run  # noqa: E402
from model import Recommender, similar_users  # noqa: E402


def shared(a, b):
    """(n, k), (n, k) neighbour lists -> (n,) how many of a's are in b."""
    return (a[:, :, None] == b[:, None, :]).any(2).sum(1).float()


@torch.no_grad()
def compare(trained, start, lm, head):
    """{group: {measure: value}} for a trained (n, d) item table against its start (None: random),
    with lm the (n, d_llm) LM table and head the (n,) bool head-item mask."""
    near_lm = similar_users(lm, 10)                                # (n, 10): any table's rows will do
    kept_end = shared(near_lm, similar_users(trained, 10))
    kept_start = None if start is None else shared(near_lm, similar_users(start, 10))
    rows = {}
    for group, mask in (('head', head), ('tail', ~head)):
        w = trained[mask]
        row = {'items': int(mask.sum()), 'norm_end': w.norm(dim=1).median().item(),
               'lm_neighbours_end': kept_end[mask].mean().item()}
        if start is not None:
            w0 = start[mask]
            row.update(norm_start=w0.norm(dim=1).median().item(),
                       moved=((w - w0).norm(dim=1) / w0.norm(dim=1)).median().item(),
                       cosine=F.cosine_similarity(w, w0, dim=1).median().item(),
                       lm_neighbours_start=kept_start[mask].mean().item())
        rows[group] = row
    return rows


def drift_rows(run, emb=None):
    """compare() for one run's collaborative item table (items 1..n)."""
    model, data, config, _ = load_run(run, 'cpu')
    n = data.n_items
    if not model.use_co:
        raise DataError(f'{run} has no collaborative item table (--no-collaborative).')
    if not (config['emb'] or emb):
        raise DataError(f'{run} is a base run with no LM table; name one with --emb (embed.py\'s folder).')
    lm = torch.from_numpy(load_embeddings(run_path(config['emb'], run) or emb, data)[0])   # (n, d_llm)
    start = None                                                   # a base run starts at random
    if config['method'] != 'base':                                 # the PCA rows it started from
        start = Recommender(model.cfg, lm).co_items.weight[1:n + 1].detach()
    head = torch.from_numpy(data.head_items()[1:])
    return compare(model.co_items.weight[1:n + 1].detach(), start, lm, head)


def table(runs, emb=None):
    lines = ['| run | items | n | row length start → end | moved ‖w − w0‖/‖w0‖ | cos(w, w0) | '
             'LM top-10 neighbours kept, start → end |', '|---|---|---:|---:|---:|---:|---:|']
    for run in runs:
        for group, r in drift_rows(run, emb).items():
            if 'moved' in r:
                cells = (f'{r["norm_start"]:.3f} → {r["norm_end"]:.3f} | {r["moved"]:.2f} | {r["cosine"]:.2f} | '
                         f'{r["lm_neighbours_start"]:.2f} → {r["lm_neighbours_end"]:.2f}')
            else:
                cells = f'random → {r["norm_end"]:.3f} | | | {r["lm_neighbours_end"]:.2f}'
            lines.append(f'| {run} | {group} | {r["items"]:,} | {cells} |')
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--run', action='append', required=True, help='a run folder with best.pt')
    parser.add_argument('--emb', help='LM embeddings (embed.py) for base runs, which have none')
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(or_exit(table, args.run, args.emb))


if __name__ == '__main__':
    main()

"""Evaluation: full ranking and the papers' 100-negative protocol, HR@K and NDCG@K per long-tail group.

    python eval.py --run runs/beauty                       # rank the test items with a run's best checkpoint

Full ranking scores the target against every item but padding and, unless the run was trained
with --no-mask-history, the items of the user's input sequence, as RecBole and most papers do (a
target among them is hidden too, and so missed; on Beauty no target is). The sampled protocol
scores it against the user's 100 stored negatives (drawn once by data.py from items the user never
touched). Either way a tie counts against the target: a model that scores everything equally ranks
it last, not first. Items are scored a chunk at a time (--eval-memory), and ranks add over chunks.

Groups of users, by their test target and their history (group_masks):
  overall
  tail_item / head_item              Pareto: the target is not among / among the 20% most popular
  tail_user / head_user              items; the user's training sequence is not among / among the 20%
                                     longest (both by training interactions only; data.py)
  tail_item_paper / head_item_paper  the official code's groups: the target's popularity over all
  tail_user_paper / head_user_paper  interactions is below --tail-item-below; the user has fewer than
                                     --tail-user-below items before the test item
  pop_0, pop_1-2, ..., pop_50+       the target's number of training interactions
The official thresholds: Beauty 4 and 9 (the defaults), Fashion 4 and 3, Yelp 13 and 12
(experiments/*.bash of the official code). Cross-run tables and paired tests: experiments/compare.py;
one user's recommendations under several runs: experiments/show.py.
"""
import argparse
import json
import os

import numpy as np
import torch

from data import DataError, batches_by_length, load_checkpoint, or_exit
from embed import load_inputs
from model import LEGACY, build_model, pick_device

PARETO = ['overall', 'tail_item', 'head_item', 'tail_user', 'head_user']
PAPER = ['tail_item_paper', 'head_item_paper', 'tail_user_paper', 'head_user_paper']
BUCKETS = {'pop_0': (0, 1), 'pop_1-2': (1, 3), 'pop_3-4': (3, 5), 'pop_5-9': (5, 10), 'pop_10-19': (10, 20),
           'pop_20-49': (20, 50), 'pop_50+': (50, float('inf'))}    # [low, high) training interactions
GROUPS = PARETO + PAPER + list(BUCKETS)


def load_run(run, device='auto'):
    """(model with the best weights, data, config, device) of a finished or running run folder, after
    checking that its processed data and embeddings are the ones it was trained on."""
    path = os.path.join(run, 'best.pt')
    if not os.path.exists(path):
        raise DataError(f'{path}: no checkpoint. Train first: `python train.py ... --out {run}`.')
    ckpt = load_checkpoint(path)
    config = ckpt['config']
    data, llm_items, _, emb_id = load_inputs(config, run)
    if config.get('data_fingerprint', data.fingerprint) != data.fingerprint:
        raise DataError(f'{config["data"]} holds other processed data than {run} was trained on (rebuilt '
                        'since?). Rebuild it with the original command, or train again.')
    if config['emb_id'] != emb_id:
        raise DataError(f'{config["emb"]} holds other embeddings than {run} was trained on (another model, '
                        'length or prompts). Re-embed with the original settings, or train again.')
    device = pick_device(device)
    model = build_model(config, data.n_items, llm_items).to(device)
    model.load_state_dict(ckpt['model'])
    return model.eval(), data, config, device


def trim(rows, least=1):
    """(B, L) left-padded ids -> (B, L') without the columns that are padding in every row (L' >= least)."""
    longest = max(int((rows != 0).sum(1).max()), least)
    return rows[:, -longest:]


@torch.no_grad()
def user_batches(model, inputs, batch_size, device):
    """Yield (idx, seq (B, L'), users (B, D)) over batches of users of similar lengths, each cut to its
    longest sequence; the model in eval mode, no gradients. Yields the table (n_items + 1, D) first."""
    model.eval()
    table = model.item_table()
    yield table
    for idx in batches_by_length((inputs != 0).sum(1), batch_size):
        seq = torch.from_numpy(trim(inputs[idx])).to(device)
        yield idx, seq, model.user_vectors(seq, table).float()


@torch.no_grad()
def rank_targets(model, inputs, targets, negatives, batch_size, device, mask_history=True, memory_mib=1024):
    """0-based rank of each user's target, and the user vectors that scored it.

    inputs (U, L) left-padded ids, targets (U,), negatives (U, n_neg) ids ->
    (full (U,) int64, sampled (U,) int64, vectors (U, D) float32 tensor on the CPU).
    A rank counts the other items that score at least as high as the target. Items are scored in
    chunks of at most memory_mib MiB of scores, and the counts of the chunks add up.
    """
    full, sampled = np.zeros(len(inputs), dtype=np.int64), np.zeros(len(inputs), dtype=np.int64)
    vectors = None
    batches = user_batches(model, inputs, batch_size, device)
    table = next(batches).float()                                  # (n_items + 1, D)
    for idx, seq, users in batches:
        vectors = torch.zeros(len(inputs), users.shape[1], device='cpu') if vectors is None else vectors
        vectors[idx] = users.cpu()
        target = torch.from_numpy(targets[idx]).to(device)         # (B,)
        t = (users * table[target]).sum(1, keepdim=True)           # (B, 1)
        # the sampled protocol hides nothing (the negatives are items the user never touched)
        neg = table[torch.from_numpy(negatives[idx]).long().to(device)]   # (B, n_neg, D)
        sampled[idx] = ((users[:, None] * neg).sum(-1) >= t).sum(1).cpu().numpy()
        hidden = seq if mask_history else seq[:, :0]               # (B, L') items never recommended
        skip = torch.cat([hidden, target[:, None]], 1)             # ... nor counted against the target
        count = torch.zeros(len(idx), dtype=torch.long, device=device)
        step = max(1, int(memory_mib * (1 << 20)) // (4 * len(idx)))  # items whose scores fit the cap
        for start in range(1, len(table), step):                   # padding (item 0) is never ranked
            scores = users @ table[start:start + step].T           # (B, c)
            rows, cols = ((skip >= start) & (skip < start + scores.shape[1])).nonzero(as_tuple=True)
            scores[rows, skip[rows, cols] - start] = -float('inf')
            count += (scores >= t).sum(1)
        full[idx] = torch.where((hidden == target[:, None]).any(1), len(table) - 1, count).cpu().numpy()
    return full, sampled, vectors


def metrics(ranks, ks):
    """HR@K and NDCG@K (means over users) from 0-based ranks of the single target."""
    ranks, out = np.asarray(ranks), {}
    for k in ks:
        hit = ranks < k
        out[f'HR@{k}'] = float(hit.mean()) if len(ranks) else None      # None: a group with no users
        out[f'NDCG@{k}'] = float((hit / np.log2(ranks + 2)).mean()) if len(ranks) else None
    return out


def group_masks(data, targets, tail_item_below=4, tail_user_below=9):
    """{group: (U,) bool} for the users' `targets` (U,) (see the file's docstring)."""
    pop = data.item_popularity()[targets]                          # (U,) training interactions
    head_item, head_user = data.head_items()[targets], data.head_users()
    total = np.bincount(data.sequences, minlength=data.n_items + 1)[targets]   # train, valid and test
    tail_item_paper = total < tail_item_below
    tail_user_paper = np.diff(data.offsets) - 1 < tail_user_below
    masks = {'overall': np.ones(len(targets), dtype=bool), 'tail_item': ~head_item, 'head_item': head_item,
             'tail_user': ~head_user, 'head_user': head_user,
             'tail_item_paper': tail_item_paper, 'head_item_paper': ~tail_item_paper,
             'tail_user_paper': tail_user_paper, 'head_user_paper': ~tail_user_paper}
    return {**masks, **{name: (pop >= low) & (pop < high) for name, (low, high) in BUCKETS.items()}}


def results_of(ranks, groups, ks):
    """{protocol: ranks (U,)}, {group: (U,) bool} -> {protocol: {group: {users, HR@K, NDCG@K}}}."""
    return {protocol: {g: {'users': int(m.sum()), **metrics(r[m], ks)} for g, m in groups.items()}
            for protocol, r in ranks.items()}


def evaluate(model, inputs, targets, negatives, groups, ks, batch_size, device, mask_history=True,
             memory_mib=1024):
    """-> ({protocol: {group: {metric: value}}}, {protocol: ranks (U,)}, user vectors (U, D))."""
    full, sampled, vectors = rank_targets(model, inputs, targets, negatives, batch_size, device, mask_history,
                                          memory_mib)
    ranks = {'full': full, 'sampled': sampled}
    return results_of(ranks, groups, ks), ranks, vectors


def markdown_table(results, ks, title=''):
    """One row per protocol and group, HR@K and NDCG@K columns."""
    names = [f'{m}@{k}' for k in ks for m in ('HR', 'NDCG')]
    lines = [f'{title}\n' if title else '', '| protocol | group | users | ' + ' | '.join(names) + ' |',
             '|---|---|---:|' + '---:|' * len(names)]
    for protocol, by_group in results.items():
        for g in (g for g in GROUPS if g in by_group):
            row = by_group[g]
            cells = ' | '.join('-' if row[n] is None else f'{row[n]:.4f}' for n in names)
            lines.append(f'| {protocol} | {g} | {row["users"]:,} | {cells} |')
    return '\n'.join(lines).lstrip('\n') + '\n'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    flag = p.add_argument
    flag('--run', required=True, help='run folder written by train.py')
    flag('--split', default='test', choices=['valid', 'test'], help='which held-out item to rank')
    flag('--ks', type=int, nargs='+', help="cut-offs K of HR@K and NDCG@K (default: the run's)")
    flag('--batch-size', type=int, default=1024, help='users per scoring batch')
    flag('--eval-memory', type=int, default=1024, help='MiB of scores per chunk of items')
    flag('--device', default='auto', help="'auto', 'cpu' or 'cuda'")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.eval_memory < 1 or (args.ks and min(args.ks) < 1):
        p.error('--batch-size, --eval-memory and --ks take numbers of at least 1')
    print(or_exit(act, args))


def act(args):
    """The markdown table and the JSON of a run's ranks on --split."""
    model, data, config, device = load_run(args.run, args.device)
    cut, ks = (1 if args.split == 'test' else 2), args.ks or config['ks']
    inputs, targets = data.padded(cut, config['max_len']), data.target(cut)
    groups = group_masks(data, targets, config.get('tail_item_below', 4), config.get('tail_user_below', 9))
    results, _, _ = evaluate(model, inputs, targets, data.eval_negatives, groups, ks, args.batch_size, device,
                             config.get('mask_history', LEGACY['mask_history']), args.eval_memory)
    return markdown_table(results, ks, f'{args.run} ({args.split})') + '\n' + json.dumps(results)


if __name__ == '__main__':
    main()

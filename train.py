"""Train SASRec, GRU4Rec or BERT4Rec, alone or with LLMInit or LLM-ESR; test the best checkpoint.

    python train.py --data processed/beauty --emb emb/beauty-minilm --method llmesr --out runs/beauty

Each user gives one training sequence (every item but the validation and test items, the last
--max-len kept). What it learns to predict depends on the backbone (training_batch): SASRec every
next item, GRU4Rec the last one, BERT4Rec masked items. Batches are uniformly random users, each
cut to its longest sequence. After each epoch the model ranks every user's validation item (full
ranking; NDCG@10 decides early stopping) and `last.pt` is written; the best epoch is `best.pt`. At
the end the best checkpoint ranks the test items: results.json, results.md and test_ranks.npz
(each user's 0-based target rank under both protocols) go into the run folder.

Self-distillation (llmesr, --alpha > 0; model.py's last section): each user's --n-similar nearest
users by cosine of their LM user embeddings are retrieved once; the teacher is the mean of their
representations. The official code runs the similar users through the model on every step (about
12 model passes a step). Here the representations come from a table, the user vectors that each
epoch's validation pass computes anyway, so a step only averages cached rows (one epoch stale).

Random state: --seed seeds numpy (batch order), torch (initialisation, dropout) and the negative
sampler; their states are saved in every checkpoint, so --resume continues the same run.
"""
import argparse
import contextlib
import os
import signal
import sys
import time
from dataclasses import asdict

import numpy as np
import torch

from data import DataError, git_commit, guard_out, or_exit, write_atomic, write_json_atomic
from eval import (build, evaluate, group_masks, load_checkpoint, markdown_table, save_checkpoint, trim,
                  user_vectors)
from model import pick_device, similar_users, teacher


class TrainingError(DataError):
    """A run that cannot go on (a NaN loss, a checkpoint from another configuration)."""


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    flag = p.add_argument
    on_off = argparse.BooleanOptionalAction
    flag('--data', required=True, help='processed folder written by data.py')
    flag('--emb', help='embedding folder written by embed.py (needed by llminit and llmesr)')
    flag('--out', required=True, help='run folder: checkpoints and results')
    flag('--method', default='llmesr', choices=['base', 'llminit', 'llmesr'], help='what to train')
    flag('--backbone', default='sasrec', choices=['sasrec', 'gru4rec', 'bert4rec'], help='sequence encoder')
    flag('--mask-prob', type=float, default=0.6, help='BERT4Rec: share of items masked (official: 0.6)')
    flag('--seed', type=int, default=42, help='seeds numpy, torch and the negative sampler')
    flag('--device', default='auto', help="'auto' (CUDA when there is one), 'cpu' or 'cuda'")
    flag('--max-len', type=int, default=200, help='most recent items kept per sequence')
    flag('--d', type=int, default=64, help='hidden size of each view')
    flag('--layers', type=int, default=2, help='transformer blocks')
    flag('--heads', type=int, default=1, help='self-attention heads')
    flag('--cross-heads', type=int, default=2, help='heads of the LLM-ESR cross-attention (official: 2)')
    flag('--dropout', type=float, default=0.5, help='dropout rate')
    flag('--loss', default='bce', choices=['bce', 'ce', 'sampled'],
         help='bce: one sampled negative per position (official); ce: softmax over all items; '
              'sampled: softmax over the target and --negatives uniform items, log-Q corrected')
    flag('--negatives', type=int, default=256, help='--loss sampled: negatives per batch')
    flag('--logit-adjust', type=float, default=0.0,
         help='departure: training scores add this times log(item popularity); ranking uses raw scores')
    flag('--attention', default='causal', choices=['causal', 'official'],
         help='official: self- and cross-attention see every item, so in training a position sees its target')
    flag('--lm-scale', default='xavier', choices=['xavier', 'official'],
         help='xavier: LM and PCA tables rescaled to a xavier table\'s std; official: unit LM rows, raw PCA')
    flag('--keep-history', dest='mask_history', action='store_false',
         help="full ranking leaves the user's input items rankable (default: they are hidden)")
    flag('--batch-size', type=int, default=128, help='users per training step')
    flag('--lr', type=float, default=1e-3, help='AdamW learning rate')
    flag('--weight-decay', type=float, default=0.0, help='AdamW weight decay (official l2: 0)')
    flag('--clip', type=float, default=0.0, help='clip the gradient norm to this (0: off)')
    flag('--epochs', type=int, default=200, help='most epochs')
    flag('--patience', type=int, default=20, help='stop after this many epochs without progress')
    flag('--alpha', type=float, default=0.1, help='weight of the self-distillation loss (llmesr; 0: off)')
    flag('--n-similar', type=int, default=10, help='similar users per teacher')
    flag('--semantic', action=on_off, default=True, help='LLM-ESR: the semantic view')
    flag('--collaborative', action=on_off, default=True, help='LLM-ESR: the collaborative view')
    flag('--cross', action=on_off, default=True, help='LLM-ESR: cross-attention between the views')
    flag('--shared-encoder', action=on_off, default=True, help='LLM-ESR: one encoder for both views')
    flag('--pca-init', action=on_off, default=True, help='LLM-ESR: PCA-initialised collaborative table')
    flag('--adapter-layers', type=int, default=2, choices=[1, 2], help='LLM-ESR: adapter depth (ablation: 1)')
    flag('--ks', type=int, nargs='+', default=[10], help='cut-offs K reported for HR@K and NDCG@K')
    flag('--eval-batch', type=int, default=1024, help='users per evaluation batch')
    flag('--log-every', type=int, default=50, help='steps between log lines')
    flag('--threads', type=int, default=0, help='CPU threads for torch (0: torch decides)')
    flag('--compile', action='store_true', help='torch.compile the training step')
    flag('--resume', action='store_true', help='continue from <out>/last.pt')
    flag('--overwrite', action='store_true', help='replace the run in --out (its checkpoints and results)')
    return p.parse_args(argv)


# settings that may differ between a run and its resumption
RESUMABLE = {'resume', 'overwrite', 'out', 'device', 'threads', 'log_every', 'eval_batch', 'compile',
             'epochs', 'patience'}


def rng_state(np_rng, neg_gen):
    state = {'numpy': np_rng.bit_generator.state, 'torch': torch.get_rng_state(), 'neg': neg_gen.get_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, np_rng, neg_gen):
    np_rng.bit_generator.state = state['numpy']
    torch.set_rng_state(state['torch'])
    neg_gen.set_state(state['neg'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def epoch_batches(n_users, batch_size, rng):
    """One epoch's batches (a list of user-index arrays): every user once, uniformly at random.

    Length-sorted batches were tried (commit d923fdd, RESULTS.md): half the epoch time, but they
    trained worse, since a batch of one length weighs its users' positions unlike a random batch.
    """
    perm = rng.permutation(n_users)
    return [perm[i:i + batch_size] for i in range(0, n_users, batch_size)]


def to_device(t, device):
    """A CPU batch tensor on `device`; to CUDA through pinned memory, so the copy does not block."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == 'cuda' else t


def training_batch(rows, backbone, n_items, mask_prob, max_len, gen):
    """(B, L + 1) windows (inputs and the last target) -> (seq, pos, history), each (B', L'): the
    inputs, the item each position must score (0: none) and the items of each row's user.

      sasrec    every position scores the next item; B' = B
      gru4rec   only the newest position, as the official GRU4Rec; B' = B
      bert4rec  the official data loader's two halves, B' = 2B: first each window with its newest
                item masked (the task at test time), then each window with every item masked
                with probability mask_prob (of those, 80% become the mask token, 10% a random
                item, 10% stay); every masked item is a target. Departure: the official loader
                draws the two halves into separate batches; here a batch holds both for its users.
    """
    if backbone != 'bert4rec':
        seq, pos = rows[:, :-1], rows[:, 1:]
        if backbone == 'gru4rec':
            pos = torch.zeros_like(pos)
            pos[:, -1] = rows[:, -1]
        return seq, pos, rows
    rows = rows[:, -max_len:]                                      # (B, L') the window is the input
    mask_id = n_items + 1
    newest = rows.clone()
    newest[:, -1] = mask_id
    newest_pos = torch.zeros_like(rows)
    newest_pos[:, -1] = rows[:, -1]
    chosen = (torch.rand(rows.shape, generator=gen) < mask_prob) & (rows != 0)
    how = torch.rand(rows.shape, generator=gen)
    random_items = torch.randint(1, n_items + 1, rows.shape, generator=gen)
    cloze = torch.where(chosen & (how < 0.8), mask_id, torch.where(chosen & (how < 0.9), random_items, rows))
    seq, pos = torch.cat([newest, cloze]), torch.cat([newest_pos, torch.where(chosen, rows, 0)])  # (2B, L')
    return seq, pos, torch.cat([rows, rows])


def negatives_for(loss, targets, history, n_items, k, gen):
    """The `neg` argument of Recommender.forward for `loss`: bce, (B, L) one negative per target;
    sampled, (k,) uniform items shared by the batch; ce, an empty tensor (every item is a negative)."""
    if loss == 'ce':
        return torch.zeros(0, dtype=torch.long)
    if loss == 'sampled':
        return torch.randint(1, n_items + 1, (k,), generator=gen)
    return sample_negatives(targets, history, n_items, gen)


def sample_negatives(targets, history, n_items, gen):
    """(B, L) targets (0: none), (B, L') each user's items -> (B, L): one uniform negative per
    target, never an item of the user's; 0 where there is no target (so padding never sends
    items through the adapter)."""
    valid = targets != 0
    neg = torch.zeros_like(targets)
    owners = valid.nonzero()[:, 0]                                 # (N,) the row of each target
    draw = torch.randint(1, n_items + 1, (len(owners),), generator=gen)
    for _ in range(100):
        clash = (draw[:, None] == history[owners]).any(-1)         # (N,)
        if not clash.any():
            break
        draw[clash] = torch.randint(1, n_items + 1, (int(clash.sum()),), generator=gen)
    neg[valid] = draw
    return neg


class Tee:
    """stdout that also goes to a log file."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text):
        self.stream.write(text)
        self.log.write(text)

    def flush(self):
        self.stream.flush()
        self.log.flush()


def main(argv=None):
    args = get_args(argv)
    or_exit(start, args)


def start(args):
    """Check --out (it may hold only this run, and only with --resume or --overwrite), then train, the
    printed lines going to <out>/train.log too."""
    held = guard_out(args.out, 'a run', {'--data': args.data, '--emb': args.emb})
    files = set(os.listdir(args.out)) if held else set()          # only a run's own files (guard_out)
    # a folder with a log alone is a run that failed before its first checkpoint: start it afresh
    if files - {'train.log'}:
        if args.overwrite:                                         # the old run's files go, nothing else
            for name in files:
                os.remove(os.path.join(args.out, name))
        elif not args.resume:
            raise DataError(f'--out {args.out} holds a run ({", ".join(sorted(files))}). '
                            'Continue it with --resume, or replace it with --overwrite.')
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'train.log'), 'a') as log:   # appended to on --resume
        with contextlib.redirect_stdout(Tee(sys.stdout, log)):
            train(args)


def train(args):
    config = vars(args)
    commit = git_commit()                                          # the code this run starts from
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    last_path, best_path = os.path.join(args.out, 'last.pt'), os.path.join(args.out, 'best.pt')
    torch.manual_seed(args.seed)
    np_rng = np.random.default_rng(args.seed)
    neg_gen = torch.Generator().manual_seed(args.seed)
    data, model, llm_users, config['emb_id'] = build(config, device)
    print(f'{args.method}: {sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable '
          f'parameters, {data.n_users:,} users, {data.n_items:,} items, device {device}')
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    step_fn = torch.compile(model, dynamic=True) if args.compile else model  # lengths vary: one graph
    # bf16 on CUDA for the training step only: evaluation stays float32, where ties count against the target
    autocast = (torch.autocast('cuda', dtype=torch.bfloat16) if device.type == 'cuda'
                else contextlib.nullcontext())

    distill = args.method == 'llmesr' and args.alpha > 0
    similar = similar_users(torch.from_numpy(llm_users), args.n_similar) if distill else None  # (U, N)
    train_rows = data.padded(2, args.max_len + 1)                  # (U, max_len + 1) input + last target
    valid_in, valid_t = data.padded(2, args.max_len), data.target(2)
    valid_groups = group_masks(valid_t, data.head_items(), data.head_users())

    # state['teacher']: the self-distillation table, every user's representation (U, D)
    state = {'epoch': 0, 'next_batch': 0, 'batches': None, 'teacher': None, 'best': -1.0, 'best_epoch': -1,
             'bad_epochs': 0, 'step': 0, 'epoch_seconds': [], 'history': []}
    if args.resume:
        if not os.path.exists(last_path):
            raise TrainingError(f'--resume: {last_path} does not exist; start without --resume.')
        ckpt = load_checkpoint(last_path)
        saved = ckpt['config']
        changed = sorted(k for k in set(config) | set(saved)
                         if k not in RESUMABLE and config.get(k) != saved.get(k))
        if changed:
            raise TrainingError(f'--resume: {last_path} was trained with other settings: ' +
                                ', '.join(f'{k}={saved.get(k)!r} (now {config.get(k)!r})' for k in changed) +
                                '. Use the same flags, or a new --out.')
        model.load_state_dict(ckpt['model'])
        optimizer.load_state_dict(ckpt['optimizer'])
        set_rng_state(ckpt['rng'], np_rng, neg_gen)
        state = ckpt['state']
        print(f'resumed from {last_path}: epoch {state["epoch"]}, batch {state["next_batch"]}')

    def checkpoint(path):
        save_checkpoint(path, {'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                               'config': config, 'model_config': asdict(model.cfg),
                               'rng': rng_state(np_rng, neg_gen), 'state': state})

    interrupted = []
    signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    while state['epoch'] < args.epochs and state['bad_epochs'] < args.patience:
        epoch = state['epoch']
        started = time.time()
        if state['next_batch'] == 0:
            state['batches'] = epoch_batches(data.n_users, args.batch_size, np_rng)
            state['seconds'] = 0.0
            if distill and state['teacher'] is None:               # the first epoch's teachers
                state['teacher'] = user_vectors(model, valid_in, args.eval_batch, device)
        model.train()
        tick, seen = time.time(), 0
        state.setdefault('loss_sum', 0.0)
        n_batches = len(state['batches'])
        for b in range(state['next_batch'], n_batches):
            idx = state['batches'][b]
            rows = torch.from_numpy(trim(train_rows[idx], least=2))  # (B, L' + 1) input and targets
            seq, pos, history = training_batch(rows, args.backbone, data.n_items, args.mask_prob,
                                               args.max_len, neg_gen)
            neg = negatives_for(args.loss, pos, history, data.n_items, args.negatives, neg_gen)
            seq, pos, neg = (to_device(t, device) for t in (seq, pos, neg))
            teachers = to_device(teacher(state['teacher'], similar[idx]), device) if distill else None
            with autocast:
                loss, parts = step_fn(seq, pos, neg, teachers, args.alpha)
            for name, value in [('total', loss), *parts.items()]:
                if not torch.isfinite(value):
                    good = (f'The last good checkpoint is {last_path} (epoch {state["epoch"] - 1}).'
                            if os.path.exists(last_path) else 'No checkpoint was written yet.')
                    raise TrainingError(f'epoch {epoch}, step {state["step"]}: the {name} loss is '
                                        f'{value.item()}; stopped. {good} Try a lower --lr or --clip 1.')
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            state['step'] += 1
            state['loss_sum'] += loss.item()
            seen += len(idx)
            if state['step'] % args.log_every == 0:
                ms = (time.time() - tick) * 1000 / max(1, b + 1 - state['next_batch'])
                print(f'epoch {epoch} step {state["step"]} | loss {loss.item():.4f} ' +
                      ' '.join(f'{k} {v.item():.4f}' for k, v in parts.items()) +
                      f' | lr {args.lr:g} | {ms:.0f} ms/step | {seen / (time.time() - tick):.0f} seq/s',
                      flush=True)
            if interrupted:
                state['next_batch'] = b + 1
                state['seconds'] += time.time() - started
                checkpoint(last_path)
                print(f'interrupted: saved {last_path} (epoch {epoch}, batch {b + 1}); go on with --resume')
                sys.exit(130)
        state['epoch_seconds'].append(state.pop('seconds', 0.0) + time.time() - started)
        state['next_batch'] = 0

        started = time.time()
        results, _, vectors = evaluate(model, valid_in, valid_t, data.eval_negatives, valid_groups, [10],
                                       args.eval_batch, device, args.mask_history)
        if distill:
            state['teacher'] = vectors                             # next epoch's teachers, at no extra cost
        full = results['full']
        ndcg = full['overall']['NDCG@10']
        loss = state.pop('loss_sum') / n_batches
        state['history'].append({'epoch': epoch, 'train_loss': loss, 'valid': full})
        better = ndcg > state['best']
        if better:
            state['best'], state['best_epoch'], state['bad_epochs'] = ndcg, epoch, 0
        else:
            state['bad_epochs'] += 1
        state['epoch'] = epoch + 1
        if better:
            checkpoint(best_path)
        checkpoint(last_path)
        print(f'epoch {epoch} valid | NDCG@10 {ndcg:.4f} HR@10 {full["overall"]["HR@10"]:.4f} '
              f'| tail item {full["tail_item"]["NDCG@10"]:.4f}/{full["tail_item"]["HR@10"]:.4f} '
              f'| tail user {full["tail_user"]["NDCG@10"]:.4f}/{full["tail_user"]["HR@10"]:.4f} '
              f'| train {state["epoch_seconds"][-1]:.1f} s, eval {time.time() - started:.1f} s'
              f'{" *" if better else ""}', flush=True)

    test(args, config, data, model, state, device, commit)


def test(args, config, data, model, state, device, commit):
    model.load_state_dict(load_checkpoint(os.path.join(args.out, 'best.pt'))['model'])
    inputs, targets = data.padded(1, args.max_len), data.target(1)
    groups = group_masks(targets, data.head_items(), data.head_users())
    started = time.time()
    results, ranks, _ = evaluate(model, inputs, targets, data.eval_negatives, groups, args.ks,
                                 args.eval_batch, device, args.mask_history)
    out = {'test': results, 'config': config, 'best_epoch': state['best_epoch'],
           'best_valid_ndcg10': state['best'], 'epochs_run': state['epoch'],
           'epoch_seconds': state['epoch_seconds'], 'train_seconds': float(sum(state['epoch_seconds'])),
           'test_eval_seconds': time.time() - started, 'valid_history': state['history'],
           'data_fingerprint': data.fingerprint, 'device': str(device), 'torch': torch.__version__,
           'commit': commit}
    title = f'{args.method} ({args.backbone}), best epoch {state["best_epoch"]}, test'
    table = markdown_table(results, args.ks, title)
    write_atomic(os.path.join(args.out, 'test_ranks.npz'),
                 lambda f: np.savez(f, full=ranks['full'], sampled=ranks['sampled']))
    write_atomic(os.path.join(args.out, 'results.md'), lambda f: f.write(table.encode()))
    write_json_atomic(os.path.join(args.out, 'results.json'), out)  # last: a run with results is whole
    print(table)


if __name__ == '__main__':
    main()

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

Data parallel: `torchrun --nproc_per_node G train.py ...` trains with DistributedDataParallel. Each
rank takes its share of every batch's users and gradients are averaged, so the steps are those of
one process; every rank evaluates (ranking is cheap next to training), so all stop together; rank 0
alone writes the run folder. A resumed run goes on from the checkpoint, but only one process
resumes bit for bit (the other ranks' random states are not saved).
"""
import argparse
import contextlib
import os
import signal
import sys
import time
from dataclasses import asdict, fields

import numpy as np
import torch

from data import (DataError, at_least, git_commit, guard_out, load_checkpoint, lock, or_exit,
                  save_checkpoint, write_atomic, write_json_atomic)
from embed import load_inputs
from eval import evaluate, group_masks, markdown_table, rank_targets, trim
from model import ModelConfig, build_model, neighbour_mean, pick_device, similar_users


def get_args(argv=None):
    """(args, resumable): the flags, and the names of those that may change when a run is resumed.

    The model's flags are ModelConfig's fields (model.py), each defined there once with its help.
    """
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    resumable = set()

    def flag(name, resume=False, **kw):
        dest = p.add_argument(name, **kw).dest
        if resume:
            resumable.add(dest)
    # a run records its inputs' paths relative to --out and their fingerprints, which --resume checks
    flag('--data', required=True, resume=True, help='processed folder written by data.py')
    flag('--emb', resume=True, help='embedding folder written by embed.py (needed by llminit and llmesr)')
    flag('--out', required=True, resume=True, help='run folder: checkpoints and results')
    for f in fields(ModelConfig)[1:]:
        extra = dict(f.metadata)
        names = ['--' + f.name.replace('_', '-'), *extra.pop('also', [])]
        if f.type is bool:
            p.add_argument(*names, action=argparse.BooleanOptionalAction, default=f.default, **extra)
        else:
            p.add_argument(*names, type=f.type, default=f.default, **extra)
    flag('--mask-prob', type=float, default=0.6, help='BERT4Rec: share of items masked (official: 0.6)')
    flag('--mask-history', action=argparse.BooleanOptionalAction, default=True,
         help="full ranking hides the user's input items (--no-mask-history: the old protocol keeps them)")
    flag('--seed', type=int, default=42, help='seeds numpy, torch and the negative sampler')
    flag('--batch-size', type=int, default=128, help='users per training step')
    flag('--lr', type=float, default=1e-3, help='AdamW learning rate')
    flag('--weight-decay', type=float, default=0.0, help='AdamW weight decay (official l2: 0)')
    flag('--clip', type=float, default=0.0, help='clip the gradient norm to this (0: off)')
    flag('--alpha', type=float, default=0.1, help='weight of the self-distillation loss (llmesr; 0: off)')
    flag('--n-similar', type=int, default=10, help='similar users per teacher')
    flag('--ks', type=int, nargs='+', default=[10],
         help='cut-offs K of HR@K and NDCG@K, validation and test; early stopping on NDCG at the first')
    flag('--epochs', type=int, default=200, resume=True, help='most epochs')
    flag('--patience', type=int, default=20, resume=True, help='stop after this many epochs without progress')
    flag('--tail-item-below', type=int, default=4, resume=True,
         help="tail_item_paper: the target's popularity over all interactions is below this (eval.py)")
    flag('--tail-user-below', type=int, default=9, resume=True,
         help='tail_user_paper: the user has fewer items than this before the test item')
    flag('--device', default='auto', resume=True, help="'auto' (CUDA when there is one), 'cpu' or 'cuda'")
    flag('--threads', type=int, default=0, resume=True, help='CPU threads for torch (0: torch decides)')
    flag('--eval-batch', type=int, default=1024, resume=True, help='users per evaluation batch')
    flag('--eval-memory', type=int, default=1024, resume=True, help='MiB of scores per chunk of ranked items')
    flag('--log-every', type=int, default=50, resume=True, help='steps between log lines')
    flag('--resume', action='store_true', resume=True, help='continue from <out>/last.pt')
    flag('--overwrite', action='store_true', resume=True,
         help='replace the run in --out (its checkpoints and results)')
    args = p.parse_args(argv)
    check_args(p, args)
    args.out = os.path.realpath(args.out)                          # a link or a trailing slash: the folder
    return args, resumable


def check_args(p, args):
    """Refuse at once, naming the flag, what cannot work."""
    at_least(p, args, 1, 'd', 'max_len', 'layers', 'heads', 'cross_heads', 'negatives', 'batch_size',
             'n_similar', 'epochs', 'patience', 'eval_batch', 'eval_memory', 'log_every')
    for name in ('dropout', 'mask_prob'):
        if not 0 <= getattr(args, name) < 1:
            p.error(f'--{name.replace("_", "-")} {getattr(args, name)}: give a share in [0, 1)')
    at_least(p, args, 0, 'alpha', 'weight_decay', 'clip', 'threads')
    if args.lr <= 0 or min(args.ks) < 1:
        p.error('--lr takes a number above 0, --ks numbers of at least 1')
    for heads in ('heads', 'cross_heads'):
        if args.d % getattr(args, heads):
            p.error(f'--{heads.replace("_", "-")} {getattr(args, heads)} does not divide --d {args.d}')
    if args.method == 'llmesr' and not (args.semantic or args.collaborative):
        p.error('--no-semantic and --no-collaborative together leave LLM-ESR no view; drop one')
    if args.resume and args.overwrite:
        p.error('--resume continues the run in --out and --overwrite replaces it; give one of them')
    try:
        pick_device(args.device)
    except DataError as e:
        p.error(str(e))


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
    """The `neg` argument of Recommender.forward for `loss` (its docstring says what each loss takes)."""
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
    args, resumable = get_args(argv)
    or_exit(start, args, resumable)


def start(args, resumable):
    """Check --out (it may hold only this run, and only with --resume or --overwrite), then train, the
    printed lines going to <out>/train.log too. Under torchrun only rank 0 touches --out or prints."""
    if int(os.environ.get('RANK', 0)):
        with open(os.devnull, 'w') as quiet, contextlib.redirect_stdout(quiet):
            return train(args, resumable, load_inputs(vars(args)))
    with lock(args.out):
        held = guard_out(args.out, 'a run', {'--data': args.data, '--emb': args.emb})
        files = set(os.listdir(args.out)) if held else set()      # only a run's own files (guard_out)
        # a folder with a log alone is a run that failed before its first checkpoint: start it afresh
        if files - {'train.log'} and not (args.overwrite or args.resume):
            raise DataError(f'--out {args.out} holds a run ({", ".join(sorted(files))}). '
                            'Continue it with --resume, or replace it with --overwrite.')
        inputs = load_inputs(vars(args))                           # read and checked before --out changes
        if files - {'train.log'} and args.overwrite:               # the old run's files go, nothing else
            for name in files:
                os.remove(os.path.join(args.out, name))
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, 'train.log'), 'a') as log:   # appended to on --resume
            with contextlib.redirect_stdout(Tee(sys.stdout, log)):
                train(args, resumable, inputs)


def set_up_device(args):
    """(device, rank, world size): the device, with the precision and determinism settings that go
    with it, and this process's place under torchrun ((0, 1) without)."""
    device, rank, world = pick_device(args.device), int(os.environ.get('RANK', 0)), 1
    if 'RANK' in os.environ:
        torch.distributed.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
        world = torch.distributed.get_world_size()
        if device.type == 'cuda':
            device = torch.device('cuda', int(os.environ['LOCAL_RANK']))
            torch.cuda.set_device(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == 'cuda':           # the CPU is deterministic for a seed and a thread count already
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')  # deterministic cuBLAS
        torch.use_deterministic_algorithms(True, warn_only=True)  # some kernels have no such variant
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device, rank, world


def train(args, resumable, inputs):
    """inputs: load_inputs() of the run's flags, (data, LM items, LM users, embedding identity)."""
    config = dict(vars(args))                                      # the run's record; args stays as parsed
    commit = git_commit()                                          # the code this run starts from
    device, rank, world = set_up_device(args)
    last_path, best_path = os.path.join(args.out, 'last.pt'), os.path.join(args.out, 'best.pt')
    torch.manual_seed(args.seed)
    np_rng = np.random.default_rng(args.seed)
    neg_gen = torch.Generator().manual_seed(args.seed)
    data, llm_items, llm_users, config['emb_id'] = inputs
    config['data_fingerprint'] = data.fingerprint
    for name in ('data', 'emb'):                                   # found from the run wherever it runs
        config[name] = config[name] and os.path.relpath(os.path.realpath(config[name]), args.out)
    lm_table = None if llm_items is None else torch.from_numpy(llm_items)      # (n_items, d_llm)
    model = build_model(config, data.n_items, lm_table).to(device)
    print(f'{args.method}: {sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable '
          f'parameters, {data.n_users:,} users, {data.n_items:,} items, device {device}')
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    step_fn = model if world == 1 else torch.nn.parallel.DistributedDataParallel(   # gradients averaged
        model, device_ids=[device] if device.type == 'cuda' else None)                # over the ranks
    # bf16 on CUDA for the training step only: evaluation stays float32, where ties count against the target
    autocast = (torch.autocast('cuda', dtype=torch.bfloat16) if device.type == 'cuda'
                else contextlib.nullcontext())

    distill = args.method == 'llmesr' and args.alpha > 0
    if distill and args.n_similar >= data.n_users:
        raise DataError(f'--n-similar {args.n_similar}: the data has {data.n_users} users; give fewer.')
    similar = (similar_users(torch.from_numpy(llm_users).to(device), args.n_similar).cpu()  # (U, N)
               if distill else None)
    train_rows = data.padded(2, args.max_len + 1)                  # (U, max_len + 1) input + last target
    valid_in, valid_t = data.padded(2, args.max_len), data.target(2)
    valid_groups = group_masks(data, valid_t, args.tail_item_below, args.tail_user_below)
    k = args.ks[0]                                                 # early stopping on NDCG@k

    # every key of a run's state, saved in each checkpoint; user_reps: every user's representation
    # (U, D), the self-distillation teachers' table
    state = {'epoch': 0, 'next_batch': 0, 'batches': None, 'user_reps': None, 'best': -1.0, 'best_epoch': -1,
             'bad_epochs': 0, 'step': 0, 'seconds': 0.0, 'loss_sum': 0.0, 'epoch_seconds': [], 'history': []}
    if args.resume:
        if not os.path.exists(last_path):
            raise DataError(f'--resume: {last_path} does not exist; start without --resume.')
        ckpt = load_checkpoint(last_path)
        saved = ckpt['config']
        changed = sorted(key for key in set(config) | set(saved)
                         if key not in resumable and config.get(key) != saved.get(key))
        if changed:
            raise DataError(f'--resume: {last_path} was trained with other settings: ' +
                            ', '.join(f'{key}={saved.get(key)!r} (now {config.get(key)!r})'
                                      for key in changed) + '. Use the same flags, or a new --out.')
        model.load_state_dict(ckpt['model'])
        optimizer.load_state_dict(ckpt['optimizer'])
        set_rng_state(ckpt['rng'], np_rng, neg_gen)
        state.update(ckpt['state'])
        print(f'resumed from {last_path}: epoch {state["epoch"]}, batch {state["next_batch"]}')

    def checkpoint(path):
        if rank == 0:
            save_checkpoint(path, {'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                                   'config': config, 'model_config': asdict(model.cfg),
                                   'rng': rng_state(np_rng, neg_gen), 'state': state})

    def read_losses(sums, first_step):
        """The device-side loss sums since first_step, read (one host sync; under torchrun, averaged over
        the ranks) and checked for NaN."""
        if world > 1:
            total = torch.stack(list(sums.values()))
            torch.distributed.all_reduce(total)
            sums = dict(zip(sums, total / world))
        values = {name: float(v) for name, v in sums.items()}
        for name, value in values.items():
            if not np.isfinite(value):
                good = (f'The last good checkpoint is {last_path} (epoch {state["epoch"] - 1}).'
                        if os.path.exists(last_path) else 'No checkpoint was written yet.')
                raise DataError(f'epoch {state["epoch"]}, steps {first_step}-{state["step"]}: the '
                                f'{name} loss is {value}; stopped. {good} Try a lower --lr or --clip 1.')
        return values

    interrupted = []
    if world == 1:                                  # under torchrun, Ctrl-C stops every rank at once
        signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    while state['epoch'] < args.epochs and state['bad_epochs'] < args.patience:
        epoch = state['epoch']
        started = time.time()
        if state['next_batch'] == 0:
            state['batches'] = epoch_batches(data.n_users, args.batch_size, np_rng)
            state['seconds'], state['loss_sum'] = 0.0, 0.0
            if distill and state['user_reps'] is None:             # the first epoch's teachers
                _, _, state['user_reps'] = rank_targets(model, valid_in, valid_t, data.eval_negatives,
                                                        args.eval_batch, device, memory_mib=args.eval_memory)
        model.train()
        tick, seen, window_start = time.time(), 0, state['step'] + 1
        sums = {}                                                  # on the device, since the last read
        n_batches = len(state['batches'])
        for b in range(state['next_batch'], n_batches):
            idx = state['batches'][b][rank::world]                 # this rank's share of the batch
            idx = idx if len(idx) else state['batches'][b][:1]     # (a last batch smaller than the ranks)
            rows = torch.from_numpy(trim(train_rows[idx], least=2))  # (B, L' + 1) input and targets
            seq, pos, history = training_batch(rows, args.backbone, data.n_items, args.mask_prob,
                                               args.max_len, neg_gen)
            neg = negatives_for(args.loss, pos, history, data.n_items, args.negatives, neg_gen)
            seq, pos, neg = (to_device(t, device) for t in (seq, pos, neg))
            teacher = to_device(neighbour_mean(state['user_reps'], similar[idx]), device) if distill else None
            with autocast:
                loss, parts = step_fn(seq, pos, neg, teacher, args.alpha)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            state['step'] += 1
            seen += len(idx)
            for name, value in [('total', loss.detach()), *parts.items()]:
                sums[name] = sums.get(name, 0) + value.double()
            last = b + 1 == n_batches
            if state['step'] % args.log_every == 0 or last or interrupted:
                losses = read_losses(sums, window_start)
                state['loss_sum'] += losses['total']
                if state['step'] % args.log_every == 0:
                    n = state['step'] - window_start + 1
                    ms = (time.time() - tick) * 1000 / max(1, b + 1 - state['next_batch'])
                    print(f'epoch {epoch} step {state["step"]} | loss ' +
                          ' '.join(f'{name} {v / n:.4f}' for name, v in losses.items()) +
                          f' | lr {args.lr:g} | {ms:.0f} ms/step | {seen / (time.time() - tick):.0f} seq/s',
                          flush=True)
                sums, window_start = {}, state['step'] + 1
            if interrupted:
                state['next_batch'] = b + 1
                state['seconds'] += time.time() - started
                checkpoint(last_path)
                print(f'interrupted: saved {last_path} (epoch {epoch}, batch {b + 1}); go on with --resume')
                sys.exit(130)
        state['epoch_seconds'].append(state['seconds'] + time.time() - started)
        state['next_batch'] = 0

        started = time.time()
        results, _, vectors = evaluate(model, valid_in, valid_t, data.eval_negatives, valid_groups, args.ks,
                                       args.eval_batch, device, args.mask_history, args.eval_memory)
        if distill:
            state['user_reps'] = vectors                           # next epoch's teachers, at no extra cost
        full = results['full']
        ndcg = full['overall'][f'NDCG@{k}']
        state['history'].append({'epoch': epoch, 'train_loss': state['loss_sum'] / n_batches, 'valid': full})
        better = ndcg > state['best']
        if better:
            state['best'], state['best_epoch'], state['bad_epochs'] = ndcg, epoch, 0
        else:
            state['bad_epochs'] += 1
        state['epoch'] = epoch + 1
        if better:
            checkpoint(best_path)
        checkpoint(last_path)
        cell = lambda v: '-' if v is None else f'{v:.4f}'  # noqa: E731  (a group with no users)
        shown = {g: f'{cell(full[g][f"NDCG@{k}"])}/{cell(full[g][f"HR@{k}"])}'
                 for g in ('overall', 'tail_item', 'tail_user')}
        print(f'epoch {epoch} valid | NDCG@{k}/HR@{k} {shown["overall"]} | tail item {shown["tail_item"]} '
              f'| tail user {shown["tail_user"]} | train {state["epoch_seconds"][-1]:.1f} s, '
              f'eval {time.time() - started:.1f} s'
              f'{" *" if better else ""}', flush=True)

    if world > 1:
        torch.distributed.barrier()                 # best.pt is written
        torch.distributed.destroy_process_group()
    if rank == 0:
        test(args, config, data, model, state, device, commit)


def test(args, config, data, model, state, device, commit):
    model.load_state_dict(load_checkpoint(os.path.join(args.out, 'best.pt'))['model'])
    inputs, targets = data.padded(1, args.max_len), data.target(1)
    groups = group_masks(data, targets, args.tail_item_below, args.tail_user_below)
    started = time.time()
    results, ranks, _ = evaluate(model, inputs, targets, data.eval_negatives, groups, args.ks,
                                 args.eval_batch, device, args.mask_history, args.eval_memory)
    out = {'test': results, 'config': config, 'best_epoch': state['best_epoch'],
           f'best_valid_ndcg{args.ks[0]}': state['best'], 'epochs_run': state['epoch'],
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

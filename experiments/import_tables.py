"""Tables made elsewhere -> an embedding folder that train.py reads as if embed.py had made it.

    python experiments/import_tables.py --data processed/paper-beauty --tables handled --out emb/paper-ada

--tables holds either the authors' LLM-ESR archive tables, itm_emb_np.pkl and usr_emb_np.pkl
(text-embedding-ada-002, 1,536 dimensions; with the archive's inter.txt and id_map.json beside them,
which say whose each row is), or items.npy and users.npy whose rows follow the processed folder's
items.jsonl and users.jsonl. Rows are checked against the data's ids; a pickle is read as numpy
arrays and built-in containers only, so one that would run code is refused before anything in it
runs. The manifest names the files the tables came from, with their sha256s; `embed.py`'s checks
(data fingerprint, table hashes, shapes, finite values) then hold for them as for its own.
"""
import argparse
import os
import pickle
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import (DataError, git_commit, guard_out, load_processed, lock, or_exit, read_json,  # noqa: E402
                  sha256_file, sha256_json)
from embed import EMBED_VERSION, publish, reuse  # noqa: E402


PICKLED_ARRAY = {('numpy', 'ndarray'), ('numpy', 'dtype'), ('_codecs', 'encode')} | {
    (f'numpy.{core}.{m}', name) for core in ('core', '_core')          # numpy 1 and numpy 2 names
    for m, name in [('multiarray', '_reconstruct'), ('multiarray', 'scalar'), ('numeric', '_frombuffer')]}


class ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays and built-in containers, nothing else: a pickle that names any other
    callable (os.system, ...) is refused before anything in it runs."""

    def find_class(self, module, name):
        if (module, name) not in PICKLED_ARRAY:
            raise pickle.UnpicklingError(f'it names {module}.{name}, which is not part of a numpy array')
        return super().find_class(module, name)


def read_table(path):
    """(rows, dims) float32 from a .npy file or a pickled numpy array, read without running any code."""
    try:
        with open(path, 'rb') as f:                                # np.load refuses pickles by default
            table = np.load(f) if path.endswith('.npy') else ArraysOnly(f).load()
        table = np.asarray(table, dtype=np.float32)
    except Exception as e:                                         # whatever the bytes make the loader raise
        raise DataError(f'{path}: refused ({e}). Only a numpy array is read from it; nothing in it ran.') \
            from None
    if table.ndim != 2 or not np.isfinite(table).all():
        raise DataError(f'{path}: {"NaN or infinite values" if table.ndim == 2 else f"shape {table.shape}"}; '
                        'a table holds one finite row per item or user.')
    return table


def table_files(folder):
    """The tables to import: the authors' itm_emb_np.pkl and usr_emb_np.pkl, or items.npy and users.npy."""
    for pair in (('itm_emb_np.pkl', 'usr_emb_np.pkl'), ('items.npy', 'users.npy')):
        paths = [os.path.join(folder, name) for name in pair]
        if all(map(os.path.exists, paths)):
            return paths
    raise DataError(f'--tables {folder}: found neither itm_emb_np.pkl and usr_emb_np.pkl (the authors\' '
                    'archive) nor items.npy and users.npy (rows ordered as items.jsonl and users.jsonl).')


def archive_rows(folder, data, items, users):
    """The authors' tables in this data's order: their item row k is item k + 1 of id_map.json, their
    user row k the k-th user of inter.txt; each is matched to this data by its original id."""
    path, inter = os.path.join(folder, 'id_map.json'), os.path.join(folder, 'inter.txt')
    maps = read_json(path, 'id map', 'Take it from the same archive.') if os.path.exists(path) else {}
    if not os.path.exists(inter):
        raise DataError(f'{inter} is missing: the rows of usr_emb_np.pkl follow its users; put it there.')
    with open(inter) as f:
        archive_users = list(dict.fromkeys(line.split()[0] for line in f if line.strip()))
    archive_items = [str(k) for k in range(1, len(items) + 1)]
    tables = []
    for name, table, ids, to_raw in (('items', items, archive_items, maps.get('id2item', {})),
                                     ('users', users, archive_users, maps.get('id2user', {}))):
        raw = [to_raw.get(i, i) for i in ids]
        index = {r: k for k, r in enumerate(raw)}
        ours = [r['raw'] for r in data.read_jsonl(f'{name}.jsonl')]
        lost = [r for r in ours if r not in index]
        if len(raw) != len(table) or lost:
            why = (f'{len(lost)} of the data\'s {name} ({lost[0]}, ...) have no row' if lost else
                   f'{len(table)} rows stand for {len(raw)} {name}')
            raise DataError(f'--tables {folder}: {why}. Were the tables made for {data.folder}\'s dataset?')
        tables.append(table[[index[r] for r in ours]])
    return tables


def imported(files, data, partial):
    """Write the tables in `files` into `partial` as items.npy and users.npy, in the processed data's
    order; -> what the manifest says of them."""
    items, users = (read_table(f) for f in files)
    if files[0].endswith('.pkl'):
        items, users = archive_rows(os.path.dirname(files[0]), data, items, users)
    for path, table, rows in ((files[0], items, data.n_items), (files[1], users, data.n_users)):
        if table.shape[0] != rows or table.shape[1] != items.shape[1]:
            raise DataError(f'{path}: shape {table.shape}; the data has {rows} of these, and both tables '
                            'need the same width. Rows follow items.jsonl and users.jsonl of --data.')
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    for name, table in (('items', items), ('users', users)):
        np.save(os.path.join(partial, f'{name}.npy'), table)
    return ' (imported)'

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data', required=True, help='processed folder written by data.py')
    p.add_argument('--tables', required=True, help='folder holding the two tables (see above)')
    p.add_argument('--out', required=True, help='embedding folder to write (reused when nothing changed)')
    p.add_argument('--overwrite', action='store_true', help='replace embeddings in --out made otherwise')
    args = p.parse_args(argv)
    args.out = os.path.realpath(args.out)
    or_exit(lock(args.out)(build), args)


def build(args):
    held = guard_out(args.out, 'embeddings', {'--data': args.data, '--tables': args.tables})
    data = load_processed(args.data)
    files = table_files(args.tables)
    key = {'embed_version': EMBED_VERSION, 'lm': 'imported from ' + ' and '.join(map(os.path.abspath, files)),
           'model_fingerprint': sha256_json([sha256_file(f) for f in files]), 'pooling': 'as made there',
           'max_length': None, 'data_fingerprint': data.fingerprint,   # and the prompts, as embed.py's key
           **{f'{k[:-1]}_prompts_sha256': sha256_json([r['prompt'] for r in data.read_jsonl(f'{k}.jsonl')])
              for k in ('items', 'users')}}
    if held and not args.overwrite:
        return reuse(args.out, key)
    partial = f'{args.out.rstrip("/")}.partial'
    publish(partial, args.out, imported(files, data, partial), {**key, 'commit': git_commit()})


if __name__ == '__main__':
    main()

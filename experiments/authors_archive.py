"""Write an Amazon 2014 folder as the authors' LLM-ESR archive, to check data.py and import_tables.py.

    python experiments/authors_archive.py ../shared/data/amazon-beauty-2014 /tmp/handled
    python data.py --raw /tmp/handled --out /tmp/paper-proc
    python experiments/import_tables.py --data /tmp/paper-proc --tables /tmp/handled --out /tmp/paper-emb

The steps of the official data/data_process.py and its notebooks, rewritten: every review (a rating
filter of 0 keeps them all), one pass of at least 5 per user and per item (filter_common), each
user's items sorted by time, ids from 1 in order of first appearance, users with fewer than 3 items
dropped (their ids stay unused), then inter.txt (`user item` lines), id_map.json, item2attributes.json
(the original metadata of each kept item) and random float64 tables of 1,536 columns where the
authors' are text-embedding-ada-002's (itm_emb_np.pkl row k: item k + 1; usr_emb_np.pkl: the users of
inter.txt in order).
"""
import ast
import collections
import glob
import gzip
import json
import os
import pickle
import sys

import numpy as np


def main(raw, out):
    reviews = sorted(glob.glob(os.path.join(raw, 'reviews_*.json.gz')))[0]
    rows = [(r['reviewerID'], r['asin'], int(r['unixReviewTime']))
            for r in map(json.loads, gzip.open(reviews))]
    users, items = collections.Counter(r[0] for r in rows), collections.Counter(r[1] for r in rows)
    history = {}
    for user, item, when in rows:
        if users[user] >= 5 and items[item] >= 5:
            history.setdefault(user, []).append((when, item))
    user_id, item_id, kept = {}, {}, {}
    for user, events in history.items():
        uid = user_id.setdefault(user, str(len(user_id) + 1))
        events.sort(key=lambda e: e[0])                              # stable: file order within a time
        kept[uid] = [item_id.setdefault(item, str(len(item_id) + 1)) for _, item in events]
    kept = {uid: seq for uid, seq in kept.items() if len(seq) >= 3}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'inter.txt'), 'w') as f:
        f.writelines(f'{uid} {iid}\n' for uid, seq in kept.items() for iid in seq)
    with open(os.path.join(out, 'id_map.json'), 'w') as f:
        json.dump({'user2id': user_id, 'item2id': item_id, 'id2user': {v: k for k, v in user_id.items()},
                   'id2item': {v: k for k, v in item_id.items()}}, f)
    meta = {}
    for line in gzip.open(glob.glob(os.path.join(raw, 'meta_*.json.gz'))[0]):
        record = ast.literal_eval(line.decode())
        if record.get('asin') in item_id:
            meta[record['asin']] = record
    with open(os.path.join(out, 'item2attributes.json'), 'w') as f:
        json.dump(meta, f)
    rng = np.random.default_rng(0)
    for name, rows in (('itm_emb_np.pkl', len(item_id)), ('usr_emb_np.pkl', len(kept))):
        with open(os.path.join(out, name), 'wb') as f:
            pickle.dump(rng.normal(size=(rows, 1536)), f)
    print(f'wrote {out}: {len(kept):,} users, {len(item_id):,} items, '
          f'{sum(map(len, kept.values())):,} interactions')


if __name__ == '__main__':
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])

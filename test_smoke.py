"""Fast checks of facts that could be false. No network; about a minute on a 2-core CPU.

    python -m pytest -q test_smoke.py
"""
import contextlib
import functools
import gzip
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault('HF_HUB_OFFLINE', '1')                         # no test may wait on a model hub

import data
import embed
import eval as evaluation
import model as M
import train


# ---------------------------------------------------------------------------------------------
# fixtures: small datasets in each release's real layout


def synthetic_log(n_users=40, n_items=30, seed=0):
    """(user, item, time) rows where user u prefers items near u, so there is something to learn."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        start = u % n_items
        for t in range(6 + u % 5):
            rows.append((f'U{u:03d}', f'I{(start + t + rng.integers(0, 2)) % n_items:03d}', 1000 + 10 * t))
    return rows


def write_lines(path, lines):
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'wt', encoding='utf-8') as f:
        f.write(''.join(line + '\n' for line in lines))


def amazon2014(folder, rows, items=None, extra_review_lines=(), meta_lines=None):
    os.makedirs(folder, exist_ok=True)
    write_lines(f'{folder}/reviews_Beauty_5.json.gz',
                [json.dumps({'reviewerID': u, 'asin': i, 'unixReviewTime': t}) for u, i, t in rows] + list(extra_review_lines))
    items = items if items is not None else sorted({i for _, i, _ in rows})
    if meta_lines is None:
        meta_lines = [repr({'asin': i, 'title': f"Item {i}'s lipstick", 'brand': 'Acme', 'price': 5.5,
                            'categories': [['Beauty', 'Makeup']], 'salesRank': {'Beauty': 3}}) for i in items]
    write_lines(f'{folder}/meta_Beauty.json.gz', meta_lines)
    return folder


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """A processed synthetic dataset in the Amazon 2014 layout."""
    root = tmp_path_factory.mktemp('tiny')
    raw = amazon2014(str(root / 'raw'), synthetic_log())
    data.main(['--raw', raw, '--out', str(root / 'proc'), '--eval-negatives', '10'])
    return data.load_processed(str(root / 'proc'))


def tokenizer_folder(folder, texts, kind):
    """A word-level tokenizer made here from `texts`: no download. The LLaMA-like one has no pad token."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    split = pre_tokenizers.Whitespace()
    words = sorted({w for t in texts for w, _ in split.pre_tokenize_str(t.lower())})
    vocab = {w: i for i, w in enumerate(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '</s>'] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token='[UNK]'))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = split
    special = {'pad_token': '[PAD]'} if kind == 'bert' else {'eos_token': '</s>'}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token='[UNK]', **special)
    fast.save_pretrained(folder)
    return len(vocab)


def tiny_lm(folder, kind, texts):
    """A tiny randomly initialised BERT or LLaMA with its own tokenizer, saved to `folder`."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel
    torch.manual_seed(0)
    vocab = tokenizer_folder(folder, texts, kind)
    if kind == 'bert':
        lm = BertModel(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=128))
    else:
        lm = LlamaModel(LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128))
    lm.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------
# data.py


def test_amazon2014_layout_and_counts(tiny):
    s = tiny.stats
    assert s['layout'] == 'amazon2014' and s['users'] == 40 and s['interactions'] == len(tiny.sequences)
    items = tiny.read_jsonl('items.jsonl')
    assert len(items) == tiny.n_items and items[0]['id'] == 1
    assert items[0]['prompt'].startswith("The beauty item has following attributes: name is Item ")
    assert 'price is 5.50' in items[0]['prompt'] and 'unknown' not in items[0]['prompt']
    assert [a[0] for a in items[0]['attributes']] == ['name', 'brand', 'price', 'categories']


def test_amazon2018_layout(tmp_path):
    raw = tmp_path / 'raw'
    raw.mkdir()
    rows = synthetic_log()
    write_lines(str(raw / 'All_Beauty_5.json.gz'),
                [json.dumps({'overall': 5.0, 'reviewerID': u, 'asin': i, 'unixReviewTime': t, 'reviewTime': 'x'}) for u, i, t in rows])
    write_lines(str(raw / 'meta_All_Beauty.json.gz'),
                [json.dumps({'asin': i, 'title': f'Soap {i}', 'price': '$12.99', 'category': ['All Beauty', 'Soap'],
                             'description': ['Gentle', 'soap.'], 'feature': ['Vegan']})
                 for i in sorted({i for _, i, _ in rows})])
    data.main(['--raw', str(raw), '--out', str(tmp_path / 'p'), '--eval-negatives', '10'])
    d = data.load_processed(str(tmp_path / 'p'))
    prompt = d.read_jsonl('items.jsonl')[0]['prompt']
    assert d.stats['layout'] == 'amazon2018' and d.n_users == 40
    assert re.fullmatch(r'The all beauty item has following attributes: name is Soap I\d{3}; price is 12\.99\. '
                        r'The item has following features: All Beauty, Soap; Vegan\. '
                        r'The item has following descriptions: Gentle soap\.', prompt), prompt


def test_yelp_layout(tmp_path):
    raw = tmp_path / 'raw'
    raw.mkdir()
    rows = synthetic_log()
    write_lines(str(raw / 'yelp_academic_dataset_review.json'),
                [json.dumps({'review_id': str(k), 'user_id': u, 'business_id': i, 'stars': 4,
                             'date': f'2018-07-0{1 + (t - 1000) // 10 % 9} 22:09:11'}) for k, (u, i, t) in enumerate(rows)])
    write_lines(str(raw / 'yelp_academic_dataset_business.json'),
                [json.dumps({'business_id': i, 'name': f'Cafe {i}', 'city': 'Tucson', 'stars': 4.5,
                             'review_count': 12, 'categories': 'Coffee & Tea, Cafes'}) for i in sorted({i for _, i, _ in rows})])
    data.main(['--raw', str(raw), '--out', str(tmp_path / 'p'), '--eval-negatives', '10'])
    d = data.load_processed(str(tmp_path / 'p'))
    assert d.stats['layout'] == 'yelp'
    assert d.read_jsonl('items.jsonl')[0]['prompt'].startswith('The business has following attributes: name is Cafe')


def test_time_sort_is_stable_and_split_leaves_no_leak(tmp_path):
    # user A: three items on one day in file order z, y, x, then w and v later; extra users make a 1-core
    rows = [('A', 'z', 5), ('A', 'y', 5), ('A', 'x', 5), ('A', 'v', 9), ('A', 'w', 7), ('B', 'x', 1),
            ('B', 'y', 2), ('B', 'z', 3), ('C', 'p', 1), ('C', 'q', 2), ('C', 'r', 3)]
    raw = amazon2014(str(tmp_path / 'raw'), rows)
    data.main(['--raw', raw, '--out', str(tmp_path / 'p'), '--min-user', '3', '--min-item', '1', '--eval-negatives', '1'])
    d = data.load_processed(str(tmp_path / 'p'))
    raw_item = {r['id']: r['raw'] for r in d.read_jsonl('items.jsonl')}
    users = {r['raw']: r for r in d.read_jsonl('users.jsonl')}
    a = users['A']['id']
    seq = [raw_item[i] for i in d.sequences[d.offsets[a]:d.offsets[a + 1]]]
    assert seq == ['z', 'y', 'x', 'w', 'v']
    assert raw_item[d.target(2)[a]] == 'w' and raw_item[d.target(1)[a]] == 'v'
    train_in = d.padded(2, 10)[a]
    assert [raw_item[i] for i in train_in[train_in > 0]] == ['z', 'y', 'x']
    prompt = users['A']['prompt']      # training titles only, most recent last
    assert "Item x's" in prompt and "Item w's" not in prompt and "Item v's" not in prompt
    assert prompt.index("Item z's") < prompt.index("Item x's")
    # evaluation negatives are never items the user touched
    assert not set(d.eval_negatives[a]) & set(d.sequences[d.offsets[a]:d.offsets[a + 1]])


def test_kcore_is_iterative():
    # item 2 has 2 users; dropping user 1 (1 interaction after item 3 goes) cascades
    users = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    items = np.array([0, 1, 2, 2, 3, 0, 1, 2])
    keep, rounds = data.kcore(users, items, min_user=2, min_item=2)
    assert keep.tolist() == [True, True, True, False, False, True, True, True]
    keep, rounds = data.kcore(users, items, min_user=3, min_item=2)
    assert keep.tolist() == [True, True, True, False, False, True, True, True] and rounds >= 2


def test_kcore_once_is_one_pass_as_the_official_filter(tmp_path):
    # min 3 per user, 2 per item: U3 (2 items) goes; d then has 1 user, which one pass keeps and the
    # iterative core drops (U1 keeps 3 items); counted by hand
    seqs = {'U1': 'abcd', 'U2': 'abc', 'U3': 'ad', 'U4': 'bce', 'U5': 'eab'}
    raw = amazon2014(str(tmp_path / 'raw'), [(u, i, 10 * t) for u, s in seqs.items() for t, i in enumerate(s)])
    counts = {}
    for how in ('once', 'iterative'):
        data.main(['--raw', raw, '--out', str(tmp_path / how), '--min-user', '3', '--min-item', '2',
                   '--kcore', how, '--eval-negatives', '1'])
        s = data.load_processed(str(tmp_path / how)).stats
        counts[how] = (s['users'], s['items'], s['interactions'])
    assert counts == {'once': (4, 5, 13), 'iterative': (4, 4, 12)}


# your own data: RecBole atomic files, CSV/TSV with or without time, the authors' LLM-ESR archive
LAYOUTS = [('recbole', True, True), ('recbole', True, False), ('csv', True, True), ('csv', False, True),
           ('tsv', True, True), ('tsv', False, False), ('llmesr', False, True)]


def own_layout(folder, kind, rows, time=True, items=True):
    """`rows` (user, item, time), sorted by time within each user, written in `kind`'s layout: newest
    first when there is a time (it must sort them), in order when not; -> (folder, data.py flags).
    The archive is written as the authors' code writes it, with ids that differ from data.py's."""
    os.makedirs(folder, exist_ok=True)
    names = sorted({i for _, i, _ in rows})
    if kind == 'llmesr':
        users = list(dict.fromkeys(u for u, _, _ in rows))
        uid = {u: str(2 * (len(users) - k)) for k, u in enumerate(users)}    # reversed, with gaps
        iid = {i: str(len(names) - k) for k, i in enumerate(names)}
        write_lines(f'{folder}/inter.txt', [f'{uid[u]} {iid[i]}' for u, i, _ in rows])
        with open(f'{folder}/id_map.json', 'w') as f:
            json.dump({'user2id': uid, 'item2id': iid, 'id2user': {v: k for k, v in uid.items()},
                       'id2item': {v: k for k, v in iid.items()}}, f)
        with open(f'{folder}/item2attributes.json', 'w') as f:
            json.dump({i: {'asin': i, 'title': f'Lipstick {i}', 'brand': 'Acme', 'price': 5.5,
                           'categories': [['Beauty', 'Makeup']]} for i in names}, f)
        return folder, []
    sep = ',' if kind == 'csv' else '\t'
    cols = (['uid', 'iid', 'ts'] if kind == 'csv' else
            ['user_id:token', 'item_id:token', 'timestamp:float'] if kind == 'recbole' else ['user_id', 'item_id', 'timestamp'])
    cols = cols if time else cols[:2]
    stamp = '.0' if kind == 'recbole' else ''
    ext = {'recbole': ('tiny.inter', 'tiny.item'), 'csv': ('interactions.csv', 'items.csv'),
           'tsv': ('interactions.tsv.gz', 'items.tsv')}[kind]
    lines = [sep.join([u, i, f'{t}{stamp}'][:len(cols)]) for u, i, t in (rows[::-1] if time else rows)]
    write_lines(f'{folder}/{ext[0]}', [sep.join(cols)] + lines)
    if items:
        title = (lambda i: f'"Lipstick {i}, red"') if kind == 'csv' else (lambda i: f'Lipstick {i}')
        write_lines(f'{folder}/{ext[1]}', [sep.join([cols[1], 'title', 'brand'])] +
                    [sep.join([i, title(i), 'Acme']) for i in names])
    return folder, (['--columns', ','.join(cols)] if kind == 'csv' else [])


@pytest.mark.parametrize('kind,time,items', LAYOUTS)
def test_own_layouts_give_the_same_sequences_and_prompts(tmp_path, kind, time, items, capsys):
    rows = synthetic_log()
    raw, flags = own_layout(str(tmp_path / 'raw'), kind, rows, time, items)
    data.main(['--raw', raw, '--out', str(tmp_path / 'proc'), '--eval-negatives', '5', '--min-user', '3',
               '--min-item', '1', *flags])
    d = data.load_processed(str(tmp_path / 'proc'))
    item_rows, user_rows = d.read_jsonl('items.jsonl'), d.read_jsonl('users.jsonl')
    raw_item = {r['id']: r['raw'] for r in item_rows}
    got = {user_rows[u]['raw']: [raw_item[i] for i in d.sequences[d.offsets[u]:d.offsets[u + 1]]]
           for u in range(d.n_users)}
    want = {}
    for u, i, _ in rows:
        want.setdefault(u, []).append(i)
    assert got == want
    assert ('order' not in d.stats) == bool(time) and d.stats['layout'] == kind.replace('csv', 'table').replace('tsv', 'table')
    prompt = item_rows[0]['prompt']
    if items:
        title = f'Lipstick {item_rows[0]["raw"]}' + (', red' if kind == 'csv' else '')
        assert f'name is {title}; brand is Acme' in prompt and title in user_rows[0]['prompt']
    else:
        assert prompt == f'The item has following attributes: id is {item_rows[0]["raw"]}.'
        assert 'holds only its id' in capsys.readouterr().err


def test_a_spreadsheet_csv_with_a_byte_order_mark_and_crlf_reads(tmp_path):
    raw = tmp_path / 'raw'
    raw.mkdir()
    rows = ['\ufeffuser_id,item_id'] + [f'u{u},i{(u + t) % 8}' for u in range(12) for t in range(4)]
    (raw / 'interactions.csv').write_bytes('\r\n'.join(rows).encode())
    data.main(['--raw', str(raw), '--out', str(tmp_path / 'proc'), '--eval-negatives', '2', '--min-item', '1',
               '--min-user', '3'])
    assert data.load_processed(str(tmp_path / 'proc')).stats['interactions'] == 48


@pytest.mark.parametrize('case,match', [
    ('columns', r'interactions.csv: the header \(user, item\) has no column user_id. Name .* --columns'),
    ('time', r'interactions.tsv: 3 of 4 lines are malformed'),
    ('empty', r'interactions.csv: the file is empty; its first line should name the columns'),
    ('header', r'interactions.csv: the file holds no interactions, only a header'),
    ('archive', r'an LLM-ESR archive folder .* without its inter.txt'),
    ('item-columns', r'items.csv: the header \(asin, title\) has no column item_id')])
def test_own_data_mistakes_get_one_line_naming_the_file(tmp_path, case, match):
    raw = tmp_path / 'raw'
    raw.mkdir()
    files = {'columns': {'interactions.csv': ['user,item', 'a,b']},
             'time': {'interactions.tsv': ['user_id\titem_id\ttimestamp'] + ['a\tb\tyesterday'] * 3},
             'empty': {'interactions.csv': []},
             'header': {'interactions.csv': ['user_id,item_id']},
             'archive': {'id_map.json': ['{}'], 'item2attributes.json': ['{}']},
             'item-columns': {'interactions.csv': ['user_id,item_id', 'a,b'], 'items.csv': ['asin,title']}}[case]
    for name, lines in files.items():
        write_lines(str(raw / name), lines)
    build_fails(tmp_path, str(raw), match)


def test_sample_users_keeps_a_seeded_share_of_users_whole(tmp_path):
    raw = amazon2014(str(tmp_path / 'raw'), synthetic_log())
    full = tmp_path / 'full'
    data.main(['--raw', raw, '--out', str(full), '--min-item', '1', '--eval-negatives', '5'])
    runs = []
    for name in ('a', 'b'):
        data.main(['--raw', raw, '--out', str(tmp_path / name), '--sample-users', '0.5', '--min-item', '1',
                   '--eval-negatives', '5'])
        runs.append(data.load_processed(str(tmp_path / name)))
    a, b, whole = *runs, data.load_processed(str(full))
    assert a.n_users == 20 and np.array_equal(a.sequences, b.sequences)   # seeded: the same share twice
    assert a.stats['sample_users'] == 0.5 and 'sample_users' not in whole.stats
    titles = lambda d: {r['id']: dict(r['attributes'])['name'] for r in d.read_jsonl('items.jsonl')}  # noqa: E731
    users = lambda d: [r['raw'] for r in d.read_jsonl('users.jsonl')]  # noqa: E731
    ta, tw, uw = titles(a), titles(whole), users(whole)
    for u, raw_id in enumerate(users(a)):                              # each kept user's sequence is whole
        w = uw.index(raw_id)
        mine = [ta[i] for i in a.sequences[a.offsets[u]:a.offsets[u + 1]]]
        assert mine == [tw[i] for i in whole.sequences[whole.offsets[w]:whole.offsets[w + 1]]]


def test_pareto_threshold():
    counts = np.array([50, 40, 30, 20, 10, 9, 8, 7, 6, 5])
    t = data.pareto_threshold(counts)
    assert t == 40 and (counts >= t).sum() == 2
    assert data.pareto_threshold(np.array([3, 3, 3, 1, 1])) == 3   # ties join the head


def test_groups_match_stats(tiny):
    head = tiny.head_items()
    assert head[1:].sum() == tiny.stats['head_items'] and tiny.head_users().sum() == tiny.stats['head_users']
    pop = tiny.item_popularity()
    assert pop[head].min() >= pop[1:][~head[1:]].max()


def test_user_prompt_cut_from_the_front():
    titles = ['old one', 'middle', 'newest']
    prompt = data.render_user_prompt(titles, budget=len(data.USER_HEADER) + 16)
    assert prompt.endswith('middle; newest.') and 'old one' not in prompt


# ---------------------------------------------------------------------------------------------
# model.py


def test_pca_matches_svd():
    x = torch.randn(200, 16, dtype=torch.float64) @ torch.randn(16, 16, dtype=torch.float64)
    ours = M.pca(x, 4).double()
    centred = (x - x.mean(0)).numpy()
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    ref = centred @ vt[:4].T
    for j in range(4):  # equal up to the sign of each axis
        assert min(np.abs(ours[:, j].numpy() - ref[:, j]).max(), np.abs(ours[:, j].numpy() + ref[:, j]).max()) < 1e-6


def test_retrieval_matches_brute_force_and_never_returns_self():
    torch.manual_seed(0)
    emb = torch.randn(300, 8)
    got = M.similar_users(emb, 5, chunk=64)
    unit = emb / emb.norm(dim=1, keepdim=True)
    sims = unit @ unit.T
    sims.fill_diagonal_(-2)
    assert torch.equal(got, sims.topk(5, dim=1).indices)
    assert not (got == torch.arange(300)[:, None]).any()


def small_model(method='llmesr', n_items=30, d_llm=12, **kw):
    torch.manual_seed(0)
    cfg = M.ModelConfig(n_items=n_items, method=method, d=8, max_len=20, dropout=0.0, **kw)
    return M.Recommender(cfg, torch.randn(n_items, d_llm)).eval()


@pytest.mark.parametrize('method', ['base', 'llmesr'])
def test_causal_later_items_do_not_change_earlier_outputs(method):
    m = small_model(method)
    seq = torch.tensor([[0, 0, 3, 4, 5, 6, 7]])
    changed = seq.clone()
    changed[0, 5:] = torch.tensor([9, 10])
    a, b = m.user_states(seq), m.user_states(changed)
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6) and not torch.allclose(a[:, 5:], b[:, 5:])


@pytest.mark.parametrize('method', ['base', 'llmesr'])
def test_bert4rec_sees_later_items_while_sasrec_and_gru4rec_do_not(method):
    seq = torch.tensor([[0, 0, 3, 4, 5, 6, 7]])
    changed = seq.clone()
    changed[0, 5:] = torch.tensor([9, 10])
    for kind, bidirectional in [('sasrec', False), ('gru4rec', False), ('bert4rec', True)]:
        m = small_model(method, backbone=kind)
        a, b = m.user_states(seq), m.user_states(changed)
        assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6) != bidirectional, kind
        assert not torch.allclose(a[:, 5:], b[:, 5:])
        if method == 'llmesr' and kind != 'gru4rec':                # the cross-attention alone, too
            m = small_model(method, backbone=kind, layers=0)
            a, b = m.user_states(seq), m.user_states(changed)
            assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6) != bidirectional, kind
            m = small_model(method, backbone=kind, layers=0, attention='official')  # the official mask: sees later items
            a, b = m.user_states(seq), m.user_states(changed)
            assert not torch.allclose(a[:, :5], b[:, :5], atol=1e-6), kind


def test_bert4rec_scores_at_an_appended_mask_token():
    m = small_model(backbone='bert4rec')
    seq = torch.tensor([[0, 3, 4, 5], [1, 2, 3, 4]])
    assert m.item_table().shape[0] == 31 and m.with_mask(m.item_table()).shape[0] == 32
    got = m.user_vectors(seq)
    assert torch.allclose(got, m.user_states(torch.cat([seq, torch.full((2, 1), m.mask_id)], 1),
                                             m.with_mask(m.item_table()))[:, -1], atol=1e-6)
    assert not torch.allclose(got, m.user_states(seq)[:, -1])


def test_training_batches_per_backbone():
    rows = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5], [0, 7, 8, 9, 10]])
    gen = torch.Generator().manual_seed(0)

    def batch(rows, kind, n_items, mask_prob, max_len, gen):
        seq, pos, history = train.training_batch(rows, kind, n_items, mask_prob, max_len, gen)
        return seq, pos, train.negatives_for('bce', pos, history, n_items, 0, gen)
    seq, pos, neg = batch(rows, 'sasrec', 30, 0.6, 20, gen)
    assert torch.equal(seq, rows[:, :-1]) and torch.equal(pos, rows[:, 1:])
    assert torch.equal(neg != 0, pos != 0) and not ((neg[:, :, None] == rows[:, None, :]) & (rows != 0)[:, None]).any()
    seq, pos, neg = batch(rows, 'gru4rec', 30, 0.6, 20, gen)
    assert torch.equal(pos[:, -1], rows[:, -1]) and not pos[:, :-1].any() and torch.equal(neg != 0, pos != 0)
    seq, pos, neg = batch(rows, 'bert4rec', 30, 0.6, 4, gen)
    assert seq.shape == (6, 4)                                     # two rows per user, cut to max_len
    assert torch.equal(seq[:3, -1], torch.full((3,), 31)) and torch.equal(pos[:3, -1], rows[:, -1])
    assert not pos[:3, :-1].any()
    cloze, targets = seq[3:], pos[3:]
    assert torch.equal(targets[targets != 0], rows[:, 1:][targets != 0])       # targets are the masked items
    assert torch.equal(cloze[targets == 0], rows[:, 1:][targets == 0])         # the rest is unchanged
    assert torch.equal(neg != 0, pos != 0)
    # over many windows, about mask_prob of the items are targets and 80% of those the mask token
    many = torch.randint(1, 30, (2000, 11))
    seq, pos, _ = batch(many, 'bert4rec', 30, 0.6, 10, gen)
    chosen = pos[2000:] != 0
    assert abs(chosen.float().mean().item() - 0.6) < 0.01
    assert abs((seq[2000:][chosen] == 31).float().mean().item() - 0.8) < 0.01


@pytest.mark.parametrize('kind', ['sasrec', 'gru4rec', 'bert4rec'])
def test_trimming_padding_changes_no_output(kind):
    m = small_model(backbone=kind)
    seq = torch.tensor([[0, 0, 0, 3, 4, 5], [0, 1, 2, 3, 4, 5]])
    full = m.user_states(seq)
    more = m.user_states(torch.cat([torch.zeros(2, 4, dtype=torch.long), seq], 1))
    assert torch.allclose(full, more[:, 4:], atol=1e-6)


@pytest.mark.parametrize('kind', ['sasrec', 'gru4rec', 'bert4rec'])
@pytest.mark.parametrize('method', ['base', 'llmesr'])
def test_encoding_rows_in_length_groups_changes_no_output(method, kind):
    m = small_model(method, backbone=kind)
    torch.manual_seed(1)
    short = torch.cat([torch.zeros(7, 18, dtype=torch.long), torch.randint(1, 31, (7, 2))], 1)
    seq = torch.cat([short[:3], torch.arange(1, 21)[None], short[3:]])  # one 20-item user among 2-item ones
    assert len(M.length_groups((seq != 0).sum(1))) == 2
    assert len(M.length_groups(torch.tensor([5, 6, 4, 5]))) == 1
    assert torch.allclose(m.user_states(seq), m.encode(seq, m.item_table(), seq), atol=1e-6)


def test_epoch_batches_hold_every_user_once():
    batches = train.epoch_batches(1000, 32, np.random.default_rng(1))
    assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(1000))
    assert max(len(b) for b in batches) == 32 and len(batches) == 32


def test_gru4rec_gradients_stay_finite_behind_a_long_padded_prefix():
    m = small_model('base', backbone='gru4rec', n_items=30)
    m.encoder.gru.weight_hh_l0.data *= 30                          # a recurrence that grows gradients
    seq = torch.zeros(2, 400, dtype=torch.long)
    seq[0, -3:], seq[1, -1:] = torch.tensor([1, 2, 3]), 4
    m.encode(seq, m.item_table(), seq)[:, -1].sum().backward()  # one group: 397 columns of padding in row 0
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_pca_initialises_collaborative_table():
    m = small_model(lm_scale='xavier')
    reduced = M.pca(m.llm_items[1:], 8)          # PCA is unchanged by the table's rescaling, up to scale
    got = m.co_items.weight[1:]
    assert torch.allclose(got, reduced * (got.std() / reduced.std()), atol=1e-5)
    assert math.isclose(got.std().item(), math.sqrt(2 / (31 + 8)), rel_tol=1e-3)
    assert m.co_items.weight[0].abs().sum() == 0 and not m.llm_items.requires_grad


# ---------------------------------------------------------------------------------------------
# eval.py


def test_ndcg_for_known_ranks():
    r = evaluation.metrics([0, 1, 9, 10], [10])
    assert r['HR@10'] == 0.75
    assert math.isclose(r['NDCG@10'], (1 + 1 / math.log2(3) + 1 / math.log2(11)) / 4)


class Fixed(torch.nn.Module):
    """A 'model' whose scores are given: user vector = one-hot of the user, item table = scores.T."""

    def __init__(self, scores):
        super().__init__()
        self.scores = scores                                       # (U, n_items + 1)

    def item_table(self):
        return self.scores.T

    def user_vectors(self, seq, table=None):
        return torch.nn.functional.one_hot(seq[:, -1] - 100, len(self.scores)).float()


def test_ranks_scored_a_chunk_of_items_at_a_time_equal_the_unchunked(tiny, tiny_runs):
    model, d, config, device = evaluation.load_run(tiny_runs[1])
    inputs, targets = d.padded(1, config['max_len']), d.target(1)
    whole = evaluation.rank_targets(model, inputs, targets, d.eval_negatives, 16, device)
    chunked = evaluation.rank_targets(model, inputs, targets, d.eval_negatives, 16, device, memory_mib=3e-4)
    assert 3e-4 * (1 << 20) // (4 * 16) == 4                       # 4 items a chunk: 8 chunks of 29 items
    for a, b in zip(whole, chunked):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    scores = model.user_vectors(torch.from_numpy(inputs), model.item_table()) @ model.item_table().T
    scores[:, 0] = -float('inf')
    scores.scatter_(1, torch.from_numpy(inputs), -float('inf'))
    t = scores.gather(1, torch.from_numpy(targets)[:, None])
    assert np.array_equal(whole[0], ((scores >= t).sum(1) - 1).numpy())   # the count of items at least as high


def test_ties_count_against_the_target():
    scores = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.5], [0.0, 2.0, 1.0, 3.0, 0.0]])
    inputs = np.array([[100], [101]])                              # user u is encoded as item 100 + u
    full, sampled, _ = evaluation.rank_targets(Fixed(scores), inputs, np.array([1, 1]), np.array([[2, 4], [2, 4]]), 8, 'cpu',
                                               mask_history=False)
    assert full.tolist() == [2, 1] and sampled.tolist() == [1, 0]


def test_ranking_pass_returns_the_user_vectors_that_serve_as_teachers(tiny):
    m = small_model(n_items=tiny.n_items)
    inputs = tiny.padded(2, 10)
    _, _, vectors = evaluation.rank_targets(m, inputs, tiny.target(2), tiny.eval_negatives, 7, 'cpu')
    _, _, other = evaluation.rank_targets(m, inputs, tiny.target(2), tiny.eval_negatives, 5, 'cpu')
    assert torch.allclose(vectors, other, atol=1e-6)                  # batching changes no vector
    assert torch.allclose(vectors[:3], m.user_vectors(torch.from_numpy(inputs[:3])), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# embed.py and the whole pipeline


@pytest.mark.parametrize('kind', ['bert', 'llama'])
def test_embed_mean_pooling_ignores_padding(tmp_path, kind):
    texts = ['a short text', 'a much longer text with many more words in it than the first one']
    folder = tiny_lm(str(tmp_path / kind), kind, texts)
    tok, lm = embed.load_lm(folder, 'cpu')
    together = embed.embed_texts(texts, tok, lm, 64, 2)
    alone = np.stack([embed.embed_texts([t], tok, lm, 64, 1)[0] for t in texts])
    assert tok.pad_token is not None and tok.padding_side == 'right'
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_embed_refuses_other_data_and_missing_model(tmp_path, tiny):
    with pytest.raises(data.DataError, match='cannot be found locally'):
        embed.load_lm(str(tmp_path / 'no-such-model'), 'cpu')
    with pytest.raises(data.DataError, match='no embedding manifest'):
        embed.load_embeddings(str(tmp_path), tiny)


def test_bf16_on_the_cpu_is_close_to_float32_and_its_own_cache(tmp_path, tiny, monkeypatch, capsys):
    texts = [r['prompt'] for r in tiny.read_jsonl('items.jsonl') + tiny.read_jsonl('users.jsonl')]
    base = ['--data', tiny.folder, '--lm', tiny_lm(str(tmp_path / 'lm'), 'bert', texts)]
    monkeypatch.setattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', lambda: True)   # AVX-512 or AMX
    for name, flags in (('fp32', []), ('bf16', ['--bf16'])):
        embed.main(base + flags + ['--out', str(tmp_path / name)])
    assert 'warning' not in capsys.readouterr().err
    rows = {f: np.load(tmp_path / f / 'items.npy') for f in ('fp32', 'bf16')}
    assert not np.array_equal(rows['fp32'], rows['bf16'])                # bfloat16 did run
    cos = (rows['fp32'] * rows['bf16']).sum(1) / np.linalg.norm(rows['fp32'], axis=1) / np.linalg.norm(rows['bf16'], axis=1)
    assert cos.min() > 0.99
    assert json.load(open(tmp_path / 'bf16' / 'manifest.json'))['bf16'] is True
    monkeypatch.setattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', lambda: False)  # AVX2 only: 8x slower
    for name, flags in (('fp32', ['--bf16']), ('bf16', [])):               # neither passes for the other
        with pytest.raises(SystemExit, match='holds embeddings made with another model.*--overwrite'):
            embed.main(base + flags + ['--out', str(tmp_path / name)])
        assert ('warning: --bf16 with no native bfloat16' in capsys.readouterr().err) == bool(flags)
    ids = {f: embed.load_inputs({'data': tiny.folder, 'emb': str(tmp_path / f), 'method': 'llmesr'})[3]
           for f in ('fp32', 'bf16')}
    assert ids['fp32'] != ids['bf16']                                    # never pooled as seeds of one variant


# ---------------------------------------------------------------------------------------------
# contrastive fine-tuning (embed.py --finetune)


def test_attribute_views_never_drop_every_attribute_and_follow_the_seed():
    attrs = [['name', 'Lipstick'], ['brand', 'Acme'], ['price', '5.00'], ['categories', 'Makeup']]
    many = embed.attribute_views('The beauty item', attrs, 2000, 0.9, np.random.default_rng(0))
    assert all(v.startswith('The beauty item') and any(value in v for _, value in attrs) for v in many)  # never bare
    assert many == embed.attribute_views('The beauty item', attrs, 2000, 0.9, np.random.default_rng(0))
    assert many != embed.attribute_views('The beauty item', attrs, 2000, 0.9, np.random.default_rng(1))
    kept = np.mean([v.count(' is ') + ('features' in v) for v in embed.attribute_views('The beauty item', attrs, 4000, 0.2,
                                                                                      np.random.default_rng(0))])
    assert abs(kept - 4 * 0.8) < 0.05                              # each attribute kept with probability 1 - r
    prompt = data.render_item_prompt('The beauty item', attrs)
    assert embed.prompt_subject(prompt, attrs) == 'The beauty item'


def test_info_nce_matches_an_independent_computation():
    torch.manual_seed(0)
    K, B = 3, 4
    z = F.normalize(torch.randn(K, B, 6), dim=-1)
    log_scale = torch.tensor(math.log(1 / 0.1))
    views = z.reshape(K * B, 6).double().numpy()
    total, count = 0.0, 0
    for a in range(K * B):                                        # every anchor, every positive, written out
        logits = np.array([views[a] @ views[c] * 10 for c in range(K * B)])
        denominator = sum(np.exp(logits[c]) for c in range(K * B) if c != a)
        for p in range(K * B):
            if p != a and p % B == a % B:
                total, count = total - np.log(np.exp(logits[p]) / denominator), count + 1
    assert count == K * B * (K - 1)
    assert math.isclose(embed.info_nce(z, log_scale).item(), total / count, rel_tol=1e-5)


@pytest.mark.parametrize('kind', ['bert', 'llama'])
def test_lora_at_initialisation_changes_no_embedding(tmp_path, kind):
    pytest.importorskip('peft')
    texts = ['a short text', 'a much longer text with many more words in it than the first one', 'third']
    tok, lm = embed.load_lm(tiny_lm(str(tmp_path / kind), kind, texts), 'cpu')
    before = embed.embed_texts(texts, tok, lm, 64, 2)
    wrapped = embed.add_lora(lm, 4, 8, 0.0).eval()
    assert sum(p.numel() for p in wrapped.parameters() if p.requires_grad) > 0
    np.testing.assert_allclose(embed.embed_texts(texts, tok, wrapped, 64, 2), before, atol=1e-6)


def test_lora_finetuning_of_a_decoder_saves_only_the_adapter(tmp_path, tiny):
    pytest.importorskip('peft')
    texts = [r['prompt'] for r in tiny.read_jsonl('items.jsonl') + tiny.read_jsonl('users.jsonl')]
    lm = tiny_lm(str(tmp_path / 'lm'), 'llama', texts)
    embed.main(['--data', tiny.folder, '--lm', lm, '--out', str(tmp_path / 'emb'), '--finetune', '--lora', '--steps', '10',
                '--ft-batch-size', '8', '--lr', '1e-3'])
    saved = os.listdir(tmp_path / 'emb' / 'lm')
    assert 'adapter_config.json' in saved and not any(f.startswith('model') for f in saved)
    items, users, manifest = embed.load_embeddings(str(tmp_path / 'emb'), tiny)
    assert manifest['finetune']['lora'] and np.isfinite(items).all() and users.shape[0] == tiny.n_users


def test_finetune_loss_falls_and_the_cache_records_the_tuning(tmp_path, tiny):
    texts = [r['prompt'] for r in tiny.read_jsonl('items.jsonl') + tiny.read_jsonl('users.jsonl')]
    lm = tiny_lm(str(tmp_path / 'lm'), 'bert', texts)
    base = ['--data', tiny.folder, '--lm', lm]
    # synthetic items differ only in their names, so views must keep them: a low drop rate
    tuning = ['--finetune', '--steps', '150', '--ft-batch-size', '8', '--lr', '3e-3', '--drop', '0.1']
    embed.main(base + tuning + ['--out', str(tmp_path / 'tuned')])
    report = json.load(open(tmp_path / 'tuned' / 'finetune.json'))
    losses = [c['loss'] for c in report['loss_curve']]
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])
    assert len(report['heldout_items']) == tiny.n_items // 5 and set(report['heldout_items']) <= set(range(1, tiny.n_items + 1))
    manifest = json.load(open(tmp_path / 'tuned' / 'manifest.json'))
    assert manifest['finetune']['steps'] == 150 and manifest['tuned_fingerprint'] != manifest['model_fingerprint']
    assert os.path.exists(tmp_path / 'tuned' / 'lm' / 'config.json')
    # the tuned embeddings differ from the frozen model's, and neither cache passes for the other
    embed.main(base + ['--out', str(tmp_path / 'frozen')])
    items = {f: np.load(tmp_path / f / 'items.npy') for f in ('tuned', 'frozen')}
    assert not np.allclose(items['tuned'], items['frozen'], atol=1e-3)
    shutil.copytree(tmp_path / 'tuned', tmp_path / 'stale')
    with pytest.raises(SystemExit, match='holds embeddings made with another model.*--overwrite'):
        embed.main(base + ['--out', str(tmp_path / 'stale')])      # same folder, now asked for no tuning
    embed.main(base + ['--out', str(tmp_path / 'stale'), '--overwrite'])
    assert 'finetune' not in json.load(open(tmp_path / 'stale' / 'manifest.json'))
    ids = {f: embed.load_inputs({'data': tiny.folder, 'emb': str(tmp_path / f), 'method': 'llmesr'})[3]
           for f in ('tuned', 'frozen')}
    assert ids['tuned'] != ids['frozen']


def test_end_to_end_loss_falls_and_results_are_written(tmp_path, tiny, tiny_emb):
    items, users, manifest = embed.load_embeddings(tiny_emb, tiny)
    assert items.shape == (tiny.n_items, 32) and users.shape == (tiny.n_users, 32)
    args = ['--data', tiny.folder, '--emb', tiny_emb, '--max-len', '10', '--d', '16', '--dropout', '0.1',
            '--batch-size', '8', '--lr', '0.01', '--epochs', '15', '--patience', '15', '--n-similar', '3', '--log-every', '1000']
    train.main(args + ['--method', 'llmesr', '--out', str(tmp_path / 'run')])
    res = json.load(open(tmp_path / 'run' / 'results.json'))
    for protocol in ['full', 'sampled']:
        for group in evaluation.GROUPS:
            assert set(res['test'][protocol][group]) >= {'HR@10', 'NDCG@10', 'users'}
    assert len(res['epoch_seconds']) == 15
    ckpt = data.load_checkpoint(tmp_path / 'run' / 'last.pt')
    assert not any(k.startswith('_orig_mod') for k in ckpt['model'])
    # the training loss falls and validation improves on the first epoch's model
    history = res['valid_history']
    assert history[-1]['train_loss'] < 0.8 * history[0]['train_loss']
    assert max(h['valid']['overall']['NDCG@10'] for h in history) > history[0]['valid']['overall']['NDCG@10']
    # the plain baseline, every loss, and LLM-ESR with its teachers on every backbone run too
    train.main(args + ['--method', 'base', '--epochs', '1', '--out', str(tmp_path / 'base')])
    runs = ['base']
    for loss in ('ce', 'sampled'):
        runs.append(loss)
        train.main(args + ['--method', 'llmesr', '--loss', loss, '--negatives', '5', '--epochs', '1',
                           '--out', str(tmp_path / loss)])
    for backbone in ('gru4rec', 'bert4rec'):
        runs.append(backbone)
        train.main(args + ['--method', 'llmesr', '--backbone', backbone, '--epochs', '1', '--out', str(tmp_path / backbone)])
    for run in runs:
        assert os.path.exists(tmp_path / run / 'results.json')


@pytest.mark.parametrize('kind', ['sasrec', 'gru4rec', 'bert4rec'])
def test_tiny_model_overfits_one_batch(tiny, kind):
    torch.manual_seed(0)
    cfg = M.ModelConfig(n_items=tiny.n_items, method='base', backbone=kind, d=16, max_len=10, dropout=0.0)
    m = M.Recommender(cfg)
    rows = torch.from_numpy(tiny.padded(2, 11)[:8])
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(100):
        seq, pos, history = train.training_batch(rows, kind, tiny.n_items, 0.6, 10, gen)
        loss, _ = m(seq, pos, train.sample_negatives(pos, history, tiny.n_items, gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


@pytest.mark.parametrize('kind', ['sasrec', 'gru4rec', 'bert4rec'])
@pytest.mark.parametrize('method', ['base', 'llminit', 'llmesr'])
def test_every_loss_trains_every_backbone_and_method(method, kind):
    rows = torch.tensor([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6], [0, 7, 8, 9, 10, 11]])
    gen = torch.Generator().manual_seed(0)
    for loss in ('bce', 'ce', 'sampled'):
        m = small_model(method, backbone=kind, loss=loss, negatives=7).train()
        seq, pos, history = train.training_batch(rows, kind, 30, 0.6, 5, gen)
        value, _ = m(seq, pos, train.negatives_for(loss, pos, history, 30, 7, gen))
        value.backward()
        assert torch.isfinite(value) and all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_bpr_is_the_papers_pairwise_loss_written_out():
    m = small_model(loss='bpr')
    seq, pos = torch.tensor([[0, 3, 4, 5], [6, 7, 8, 9]]), torch.tensor([[0, 4, 5, 6], [7, 8, 9, 10]])
    neg = torch.tensor([[0, 11, 12, 13], [14, 15, 16, 17]])
    loss, _ = m(seq, pos, neg)
    users, table = m.user_states(seq)[pos != 0], m.item_table()    # (N, D), (n_items + 1, D)
    s_pos, s_neg = (users * table[pos[pos != 0]]).sum(1), (users * table[neg[pos != 0]]).sum(1)
    assert torch.allclose(loss, -torch.log(torch.sigmoid(s_pos - s_neg)).mean(), atol=1e-6)


class CpuTokenizer:
    """A tokenizer whose tensors are made on the CPU, as input batches are on a real machine."""

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, *a, **kw):
        with torch.device('cpu'):
            return self.tok(*a, **kw)


@pytest.mark.parametrize('loss', ['bce', 'bpr', 'ce', 'sampled'])
@pytest.mark.parametrize('kind', ['sasrec', 'gru4rec', 'bert4rec'])
@pytest.mark.parametrize('method', ['base', 'llminit', 'llmesr'])
def test_every_path_makes_its_tensors_on_the_inputs_device(method, kind, loss):
    # Inputs on the CPU, torch's default device 'meta': a tensor made without device= lands on another
    # device than the inputs and the op that meets them raises, as a CPU tensor beside CUDA inputs.
    m = small_model(method, backbone=kind, loss=loss, negatives=5).train()
    gen = torch.Generator().manual_seed(0)
    lengths = [19, 2, 3, 2, 3, 2, 2, 3]                             # one long row: length groups split
    rows = torch.tensor([[0] * (20 - n) + list(range(1, n + 1)) for n in lengths])
    seq, pos, history = train.training_batch(rows, kind, 30, 0.6, 20, gen)
    neg = train.negatives_for(loss, pos, history, 30, 5, gen)
    reps, similar, lm_users = torch.randn(8, m.item_table().shape[1]), torch.randint(0, 8, (8, 3)), torch.randn(8, 5)
    inputs, targets = rows[:, :-1].numpy(), rows[:, -1].numpy()
    with torch.device('meta'):
        out, _ = m(seq, pos, neg, M.neighbour_mean(reps, similar) if method == 'llmesr' else None, 0.1)
        out.backward()
        full, sampled, vectors = evaluation.rank_targets(m, inputs, targets, np.ones((8, 2), dtype=np.int64), 4,
                                                         'cpu', memory_mib=1)
        assert vectors.device.type == 'cpu' and vectors.shape == (8, m.item_table().shape[1])
        assert M.similar_users(lm_users, 3).device.type == 'cpu'


def test_embedding_and_fine_tuning_make_their_tensors_on_the_inputs_device(tmp_path, tiny):
    texts = [r['prompt'] for r in tiny.read_jsonl('items.jsonl')]
    tok, lm = embed.load_lm(tiny_lm(str(tmp_path / 'lm'), 'bert', texts), torch.device('cpu'))
    items = [(embed.prompt_subject(r['prompt'], r['attributes']), r['attributes']) for r in tiny.read_jsonl('items.jsonl')]
    cfg = {'views': 2, 'drop': 0.2, 'steps': 1, 'batch_size': 4, 'lr': 1e-3, 'temperature_lr': 1e-2, 'warmup': 0.1,
           'seed': 0, 'max_length': 32, 'lora': False, 'heldout': 0, 'temperature': 0.05}
    with torch.device('meta'):
        assert embed.embed_texts(texts[:5], CpuTokenizer(tok), lm, 32, 2).shape == (5, 32)
        embed.finetune(lm, CpuTokenizer(tok), items, cfg, torch.device('cpu'))


def test_sampled_softmax_against_written_out_losses():
    m = small_model('llmesr', loss='sampled')
    seq = torch.tensor([[0, 3, 4, 5], [6, 7, 8, 9]])
    pos = torch.tensor([[0, 4, 5, 6], [7, 8, 9, 10]])
    users = m.user_states(seq)[pos != 0]                            # (N, D)
    table, targets = m.item_table(), pos[pos != 0]
    # every item drawn once, the target among them: the log-Q term is 0 and the loss is the full softmax
    every = torch.arange(1, 31)
    loss, _ = m(seq, pos, every)
    assert torch.allclose(loss, F.cross_entropy(users @ table[1:].T, targets - 1), atol=1e-5)
    # three draws stand for 10 items each: each negative counts 10 times in the partition sum
    neg = torch.tensor([1, 2, 5])
    loss, _ = m(seq, pos, neg)
    expected = []
    for u, t in zip(users, targets.tolist()):
        others = [u @ table[j] for j in neg.tolist() if j != t]       # a draw equal to the target is dropped
        partition = torch.exp(u @ table[t]) + 10 * sum(torch.exp(s) for s in others)
        expected.append(torch.log(partition) - u @ table[t])
    assert torch.allclose(loss, torch.stack(expected).mean(), atol=1e-5)


@pytest.mark.parametrize('method', ['base', 'llmesr'])
def test_official_attention_lets_a_position_see_the_next_item(method):
    """Under 'official', changing item t + 1 changes position t's state (its training target leaks); not under 'causal'."""
    seq = torch.tensor([[0, 0, 3, 4, 5, 6, 7]])
    changed = seq.clone()
    changed[0, 5] = 9                                               # item t + 1 of position t = 4
    for attention, leaks in [('causal', False), ('official', True)]:
        m = small_model(method, attention=attention)
        a, b = m.user_states(seq), m.user_states(changed)
        assert (not torch.allclose(a[:, 4], b[:, 4], atol=1e-6)) == leaks, attention
        padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), seq], 1)  # padding keys stay hidden
        assert torch.allclose(m.user_states(padded)[:, 5:], a, atol=1e-5), attention


def test_official_lm_scale_reads_unit_rows_and_unscaled_pca():
    torch.manual_seed(1)
    lm = torch.randn(30, 12) * 3
    official = M.Recommender(M.ModelConfig(n_items=30, d=8, lm_scale='official'), lm)
    unit = F.normalize(lm, dim=1)
    assert torch.allclose(official.llm_items[1:], unit) and torch.allclose(official.co_items.weight[1:], M.pca(unit, 8))
    xavier = M.Recommender(M.ModelConfig(n_items=30, d=8, lm_scale='xavier'), lm)
    std = math.sqrt(2 / (31 + 8))
    assert abs(xavier.llm_items[1:].std().item() - std) < 1e-4 and abs(xavier.co_items.weight[1:].std().item() - std) < 1e-4
    assert torch.allclose(F.normalize(xavier.co_items.weight[1:], dim=1), F.normalize(M.pca(lm, 8), dim=1), atol=1e-5)


class ById(torch.nn.Module):
    """A model that scores item i as i (item 9 is best), for every user."""

    def item_table(self):
        return torch.arange(10.0)[:, None]

    def user_vectors(self, seq, table=None):
        return torch.ones(len(seq), 1)


def test_full_ranking_hides_the_inputs_and_so_a_repeated_target():
    inputs = np.array([[0, 9, 8], [7, 9, 5]])
    targets = np.array([6, 9])                                      # the second user's target is among its inputs
    negatives = np.array([[1, 2], [1, 2]])
    kept, sampled_kept, _ = evaluation.rank_targets(ById(), inputs, targets, negatives, 2, 'cpu', mask_history=False)
    hidden, sampled_hidden, _ = evaluation.rank_targets(ById(), inputs, targets, negatives, 2, 'cpu')
    assert kept.tolist() == [3, 0] and hidden.tolist() == [1, 9]  # 9, 8, 7 above 6; with 9, 8 hidden only 7
    assert np.array_equal(sampled_kept, sampled_hidden)            # the 100-negative protocol is unchanged


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_lines_are_reported_counted_and_bounded(tmp_path, capsys):
    rows = synthetic_log()
    raw = amazon2014(str(tmp_path / 'raw'), rows, extra_review_lines=['{"reviewerID": "U1", "asin": '])
    data.main(['--raw', raw, '--out', str(tmp_path / 'p'), '--eval-negatives', '10'])
    err = capsys.readouterr().err
    assert f'reviews_Beauty_5.json.gz, line {len(rows) + 1}' in err
    assert data.load_processed(str(tmp_path / 'p')).stats['skipped_lines'] == {f'{raw}/reviews_Beauty_5.json.gz': 1}
    with pytest.raises(SystemExit, match=f'line {len(rows) + 1}.*--strict'):
        data.main(['--raw', raw, '--out', str(tmp_path / 'q'), '--strict'])
    many_bad = amazon2014(str(tmp_path / 'raw2'), rows, extra_review_lines=['not json'] * 10)
    with pytest.raises(SystemExit, match='10 of .* lines are malformed'):
        data.main(['--raw', many_bad, '--out', str(tmp_path / 'r')])
    assert not os.path.exists(tmp_path / 'q') and not os.path.exists(tmp_path / 'r')


def test_missing_files_name_the_path_and_the_command(tmp_path):
    raw = amazon2014(str(tmp_path / 'raw'), synthetic_log())
    os.remove(f'{raw}/meta_Beauty.json.gz')
    with pytest.raises(SystemExit, match=r'meta_Beauty.json.gz: file is missing.*download.py'):
        data.main(['--raw', raw, '--out', str(tmp_path / 'p')])
    with pytest.raises(SystemExit, match=r'no such folder.*download.py'):
        data.main(['--raw', str(tmp_path / 'nothing'), '--out', str(tmp_path / 'p')])


def test_item_without_text_keeps_its_id(tmp_path, capsys):
    rows = synthetic_log()
    items = sorted({i for _, i, _ in rows})
    raw = amazon2014(str(tmp_path / 'raw'), rows, items=items[1:])          # the first item has no metadata
    data.main(['--raw', raw, '--out', str(tmp_path / 'p'), '--eval-negatives', '10'])
    d = data.load_processed(str(tmp_path / 'p'))
    assert f'1 of {d.n_items} items have no text' in capsys.readouterr().err
    bare = [r for r in d.read_jsonl('items.jsonl') if r['raw'] == items[0]][0]
    assert bare['attributes'] == [] and bare['prompt'] == 'The beauty item.' and d.stats['items_without_text'] == 1


def test_processed_folder_is_reused_and_embeddings_of_other_data_refused(tmp_path, tiny, capsys):
    raw = amazon2014(str(tmp_path / 'raw'), synthetic_log())
    args = ['--raw', raw, '--out', str(tmp_path / 'p'), '--eval-negatives', '10']
    data.main(args)
    data.main(args)
    assert 'is up to date' in capsys.readouterr().out
    # a folder written by other code (say, another prompt rendering) is rebuilt, not reused
    manifest = json.load(open(tmp_path / 'p' / 'manifest.json'))
    data.write_json_atomic(str(tmp_path / 'p' / 'manifest.json'), {**manifest, 'key': 'older code'})
    data.main(args)
    assert 'wrote' in capsys.readouterr().out
    assert json.load(open(tmp_path / 'p' / 'manifest.json'))['fingerprint'] == manifest['fingerprint']
    # other contents replace it only when asked
    with pytest.raises(SystemExit, match='holds other processed data.*--overwrite'):
        data.main(args + ['--eval-negatives', '5'])
    assert json.load(open(tmp_path / 'p' / 'manifest.json'))['fingerprint'] == manifest['fingerprint']
    data.main(args + ['--eval-negatives', '5', '--overwrite'])
    assert json.load(open(tmp_path / 'p' / 'manifest.json'))['config']['eval_negatives'] == 5
    data.main(args + ['--overwrite'])
    other = data.load_processed(str(tmp_path / 'p'))
    other.fingerprint = 'something else'
    folder = tmp_path / 'emb'
    folder.mkdir()
    data.write_json_atomic(str(folder / 'manifest.json'), {'embed_version': embed.EMBED_VERSION, 'data_fingerprint': tiny.fingerprint})
    with pytest.raises(data.DataError, match='other processed data.*python embed.py'):
        embed.load_embeddings(str(folder), other)


# ---------------------------------------------------------------------------------------------
# interrupted runs


@pytest.fixture(scope='module')
def tiny_emb(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp('emb')
    texts = [r['prompt'] for r in tiny.read_jsonl('items.jsonl') + tiny.read_jsonl('users.jsonl')]
    embed.main(['--data', tiny.folder, '--lm', tiny_lm(str(root / 'lm'), 'bert', texts), '--out', str(root / 'emb')])
    return str(root / 'emb')


def test_sigkill_then_resume_ends_at_the_same_metrics(tmp_path, tiny, tiny_emb):
    args = ['--data', tiny.folder, '--emb', tiny_emb, '--method', 'llmesr', '--max-len', '10', '--d', '16',
            '--batch-size', '8', '--lr', '0.01', '--epochs', '40', '--patience', '40', '--n-similar', '3',
            '--log-every', '1000', '--threads', '1']
    train.main(args + ['--out', str(tmp_path / 'whole')])
    killed = tmp_path / 'killed'
    proc = subprocess.Popen([sys.executable, 'train.py', *args, '--out', str(killed)], cwd=os.path.dirname(__file__),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None:
        if (killed / 'last.pt').exists() and data.load_checkpoint(killed / 'last.pt')['state']['epoch'] >= 3:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    assert proc.wait() == -signal.SIGKILL, 'the run ended before it could be killed'
    assert not (killed / 'results.json').exists()
    train.main(args + ['--out', str(killed), '--resume'])
    whole, resumed = (json.load(open(p / 'results.json')) for p in (tmp_path / 'whole', killed))
    assert resumed['test'] == whole['test']
    assert [h['valid'] for h in resumed['valid_history']] == [h['valid'] for h in whole['valid_history']]


def test_a_run_refuses_embeddings_made_by_another_model(tmp_path, tiny, tiny_emb):
    emb = tmp_path / 'emb'
    shutil.copytree(tiny_emb, emb)
    args = ['--data', tiny.folder, '--emb', str(emb), '--max-len', '10', '--d', '16', '--n-similar', '3',
            '--epochs', '1', '--log-every', '1000', '--out', str(tmp_path / 'run')]
    train.main(args)
    manifest = json.load(open(emb / 'manifest.json'))
    data.write_json_atomic(str(emb / 'manifest.json'), {**manifest, 'model_fingerprint': 'another model'})
    with pytest.raises(data.DataError, match='holds other embeddings than'):
        evaluation.load_run(str(tmp_path / 'run'))
    with pytest.raises(SystemExit, match='other settings: emb_id='):
        train.main(args + ['--resume'])


def test_resume_refuses_other_settings(tmp_path, tiny, tiny_emb):
    def args(d):
        return ['--data', tiny.folder, '--emb', tiny_emb, '--method', 'base', '--max-len', '10', '--d', d,
                '--epochs', '1', '--log-every', '1000', '--out', str(tmp_path / 'run')]
    train.main(args('16'))
    with pytest.raises(SystemExit, match=r"other settings: d=16 \(now 32\)"):
        train.main(args('32') + ['--resume'])
    train.main(args('16') + ['--resume', '--epochs', '2'])
    assert json.load(open(tmp_path / 'run' / 'results.json'))['epochs_run'] == 2


# ---------------------------------------------------------------------------------------------
# every bad input of the README's table: a clear message or a counted skip, never a partial folder


def build_fails(tmp_path, raw, match, extra=()):
    out = tmp_path / 'out'
    with pytest.raises(SystemExit, match=match):
        data.main(['--raw', raw, '--out', str(out), '--eval-negatives', '10', *extra])
    assert not out.exists() and not list(tmp_path.glob('out.tmp-*'))


def test_truncated_gzip(tmp_path):
    raw = amazon2014(str(tmp_path / 'raw'), synthetic_log())
    path = f'{raw}/reviews_Beauty_5.json.gz'
    blob = open(path, 'rb').read()
    open(path, 'wb').write(blob[:len(blob) // 2])
    build_fails(tmp_path, raw, r'reviews_Beauty_5.json.gz: the gzip stream is truncated.*Download the file again')


def test_empty_file(tmp_path):
    raw = amazon2014(str(tmp_path / 'raw'), synthetic_log())
    write_lines(f'{raw}/reviews_Beauty_5.json.gz', [])
    build_fails(tmp_path, raw, r'reviews_Beauty_5.json.gz: the file has no lines')


@pytest.mark.parametrize('line, why', [
    ('{"reviewerID": "U000", "asin": "I001"}', 'missing unixReviewTime'),
    ('{"reviewerID": "U000", "asin": "I001", "unixReviewTime": "yesterday"}', 'neither unix seconds nor a date'),
    ('{"reviewerID": ["U000"], "asin": "I001", "unixReviewTime": 5}', 'is not a string'),
    ('{"reviewerID": "U000", "asin": "I001", "unixReviewTime": 5', 'Expecting'),
])
def test_bad_review_lines_are_counted_skips(tmp_path, capsys, line, why):
    rows = synthetic_log()
    raw = amazon2014(str(tmp_path / 'raw'), rows, extra_review_lines=[line])
    data.main(['--raw', raw, '--out', str(tmp_path / 'p'), '--eval-negatives', '10'])
    assert f'line {len(rows) + 1}: ' in capsys.readouterr().err
    assert data.load_processed(str(tmp_path / 'p')).stats['interactions'] <= len(rows)
    build_fails(tmp_path, raw, why, ['--strict'])


def test_timestamps_as_text_and_prices_as_text_are_understood():
    from datetime import datetime, timezone
    assert data.parse_time('1405296000') == 1405296000
    assert data.parse_time('2018-07-07 22:09:11') == datetime(2018, 7, 7, 22, 9, 11, tzinfo=timezone.utc).timestamp()
    assert data.parse_price('$1,012.5') == '1012.50' and data.parse_price(5) == '5.00'
    assert data.parse_price('$5.99 - $12.99') == '' and data.parse_price(True) == ''


def test_non_utf8_and_invalid_literal_lines_are_counted_skips(tmp_path, capsys):
    rows = synthetic_log()
    items = sorted({i for _, i, _ in rows})
    metas = [repr({'asin': i, 'title': f'Item {i}'}) for i in items] + ["{'asin': 'I999', 'title': 'broken'"]
    raw = amazon2014(str(tmp_path / 'raw'), rows, meta_lines=metas)
    with gzip.open(f'{raw}/reviews_Beauty_5.json.gz', 'ab') as f:
        f.write(b'{"reviewerID": "U\xff", "asin": "I001", "unixReviewTime": 1}\n')
    data.main(['--raw', raw, '--out', str(tmp_path / 'p'), '--eval-negatives', '10', '--max-bad', '0.05'])
    err = capsys.readouterr().err
    assert f'line {len(rows) + 1}: not UTF-8' in err and f'meta_Beauty.json.gz, line {len(items) + 1}' in err


def test_duplicate_interactions_are_dropped_and_counted(tmp_path, capsys):
    rows = synthetic_log()
    raw = amazon2014(str(tmp_path / 'raw'), rows + rows[:3])
    data.main(['--raw', raw, '--out', str(tmp_path / 'p'), '--eval-negatives', '10'])
    assert 'dropped 3 exact duplicate interactions' in capsys.readouterr().err
    assert data.load_processed(str(tmp_path / 'p')).stats['duplicates_dropped'] == 3


def test_metadata_without_any_text_is_refused(tmp_path):
    rows = synthetic_log()
    raw = amazon2014(str(tmp_path / 'raw'), rows, meta_lines=[repr({'asin': i, 'salesRank': {}}) for _, i, _ in rows])
    build_fails(tmp_path, raw, 'not one of the .* items has any text')


def test_kcore_that_empties_the_dataset(tmp_path):
    raw = amazon2014(str(tmp_path / 'raw'), synthetic_log())
    build_fails(tmp_path, raw, 'no interaction survives the 50-user/5-item core', ['--min-user', '50'])


def test_processed_folder_of_an_older_format_is_refused(tmp_path, tiny):
    folder = tmp_path / 'old'
    shutil.copytree(tiny.folder, folder)
    manifest = json.load(open(folder / 'manifest.json'))
    data.write_json_atomic(str(folder / 'manifest.json'), {**manifest, 'format_version': 0})
    with pytest.raises(data.DataError, match=r'format 0, this code reads format 1\. Rebuild it with `python data.py'):
        data.load_processed(str(folder))


def test_unknown_lm_and_model_folder_without_tokenizer(tmp_path):
    with pytest.raises(data.DataError, match='cannot be found locally or fetched.*--lm at a local model folder'):
        embed.load_lm('no-such-org/no-such-model-xyz', 'cpu')
    folder = tiny_lm(str(tmp_path / 'lm'), 'bert', ['a b c'])
    for name in os.listdir(folder):
        if 'token' in name:
            os.remove(os.path.join(folder, name))
    with pytest.raises(data.DataError, match='the folder has no tokenizer files'):
        embed.load_lm(folder, 'cpu')


def test_embeddings_with_wrong_rows_or_nan_are_refused(tmp_path, tiny, tiny_emb):
    for name, array, match in [('users', np.zeros((tiny.n_users + 1, 32), dtype=np.float32), r'users.npy has shape'),
                               ('items', np.full((tiny.n_items, 32), np.nan, dtype=np.float32), 'NaN or infinite')]:
        folder = tmp_path / name
        shutil.copytree(tiny_emb, folder)
        np.save(folder / f'{name}.npy', array)
        manifest = json.load(open(folder / 'manifest.json'))
        del manifest['sha256']                                      # a folder from before the tables' hashes
        json.dump(manifest, open(folder / 'manifest.json', 'w'))
        with pytest.raises(data.DataError, match=match + '.*python embed.py'):
            embed.load_embeddings(str(folder), tiny)


def test_interrupted_embedding_resumes_from_the_last_chunk(tmp_path, tiny, monkeypatch):
    texts = [r['prompt'] for r in tiny.read_jsonl('items.jsonl') + tiny.read_jsonl('users.jsonl')]
    lm = tiny_lm(str(tmp_path / 'lm'), 'bert', texts)
    args = ['--data', tiny.folder, '--lm', lm, '--batch-size', '2']
    embed.main(args + ['--out', str(tmp_path / 'clean')])
    real, calls = embed.encode, []

    def dies_on_the_13th_batch(*a):
        calls.append(1)
        if len(calls) == 13 and not dies_on_the_13th_batch.died:
            dies_on_the_13th_batch.died = True
            raise KeyboardInterrupt
        return real(*a)
    dies_on_the_13th_batch.died = False
    monkeypatch.setattr(embed, 'encode', dies_on_the_13th_batch)
    monkeypatch.setattr(embed, 'embed_texts', functools.partial(embed.embed_texts, every=5))
    with pytest.raises(KeyboardInterrupt):
        embed.main(args + ['--out', str(tmp_path / 'emb')])
    assert not (tmp_path / 'emb').exists() and json.load(open(tmp_path / 'emb.partial' / 'progress.json'))['items'] == 10
    calls.clear()
    embed.main(args + ['--out', str(tmp_path / 'emb')])
    n_batches = math.ceil(tiny.n_items / 2) + math.ceil(tiny.n_users / 2)
    assert len(calls) == n_batches - 10
    for name in ('items', 'users'):
        np.testing.assert_array_equal(np.load(tmp_path / 'emb' / f'{name}.npy'), np.load(tmp_path / 'clean' / f'{name}.npy'))
    # interrupted again, then rerun with another batch size: the batches hold other texts, so it starts over
    dies_on_the_13th_batch.died = False
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        embed.main(args + ['--out', str(tmp_path / 'again')])
    calls.clear()
    embed.main(['--data', tiny.folder, '--lm', lm, '--batch-size', '3', '--out', str(tmp_path / 'again')])
    assert len(calls) == math.ceil(tiny.n_items / 3) + math.ceil(tiny.n_users / 3)
    for name in ('items', 'users'):
        again, clean = np.load(tmp_path / 'again' / f'{name}.npy'), np.load(tmp_path / 'clean' / f'{name}.npy')
        assert np.abs(again).sum(1).min() > 0 and np.allclose(again, clean, atol=1e-5)   # no row left unwritten


@pytest.mark.parametrize('at, said', [(7, r'epoch 1, steps 6-10: the distill loss is nan; stopped\. The last '
                                          r'good checkpoint is .*last.pt \(epoch 0\)'),
                                      (0, r'epoch 0, steps 1-5: .* No checkpoint was written yet')])
def test_nan_loss_stops_the_run_naming_step_and_part(tmp_path, tiny, tiny_emb, monkeypatch, at, said):
    real = M.Recommender.forward

    def poisoned(self, *a, **kw):
        loss, parts = real(self, *a, **kw)
        if self.training and poisoned.steps == at:
            parts['distill'] = parts['distill'] * float('nan')
        poisoned.steps += 1
        return loss, parts
    poisoned.steps = 0
    monkeypatch.setattr(M.Recommender, 'forward', poisoned)
    args = ['--data', tiny.folder, '--emb', tiny_emb, '--max-len', '10', '--d', '16', '--batch-size', '8',
            '--epochs', '5', '--n-similar', '3', '--log-every', '1000', '--out', str(tmp_path / 'run')]
    with pytest.raises(SystemExit, match=said):
        train.main(args)
    if at:
        assert data.load_checkpoint(tmp_path / 'run' / 'last.pt')['state']['epoch'] == 1


def test_ctrl_c_saves_mid_epoch_and_resume_matches(tmp_path, tiny, tiny_emb):
    args = ['--data', tiny.folder, '--emb', tiny_emb, '--max-len', '10', '--d', '16', '--batch-size', '4',
            '--epochs', '40', '--patience', '40', '--n-similar', '3', '--log-every', '1000', '--threads', '1']
    train.main(args + ['--out', str(tmp_path / 'whole')])
    run = tmp_path / 'run'
    proc = subprocess.Popen([sys.executable, 'train.py', *args, '--out', str(run)], cwd=os.path.dirname(__file__),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not (run / 'last.pt').exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    assert proc.wait() == 130, 'the run ended before Ctrl-C'
    assert data.load_checkpoint(run / 'last.pt')['state']['next_batch'] > 0
    train.main(args + ['--out', str(run), '--resume'])
    assert json.load(open(run / 'results.json'))['test'] == json.load(open(tmp_path / 'whole' / 'results.json'))['test']


# ---------------------------------------------------------------------------------------------
# nothing lost: each fault below exits non-zero with a message (a SystemExit carrying text: Python
# prints it without a traceback), changes no input file and leaves no temporary file


def tree_hashes(*folders):
    """{path: sha256} of every file below the folders but train.log, which every attempt appends to."""
    return {os.path.join(d, f): data.sha256_file(os.path.join(d, f))
            for folder in folders for d, _, files in os.walk(folder) for f in files if f != 'train.log'}


def leftovers(root):
    return [os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files
            if '.tmp-' in n or '.old-' in n]


def fails_cleanly(main, argv, match, watched, root):
    before = tree_hashes(*watched)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert isinstance(e.value.code, str) and re.search(match, e.value.code), e.value.code
    assert tree_hashes(*watched) == before, 'an input file changed'
    assert not leftovers(root)
    return e.value.code


@contextlib.contextmanager
def read_only(folder):
    """`folder` made unwritable, for root too (chattr +i), else by its mode; skips if neither holds."""
    os.chmod(folder, 0o555)
    immutable = os.geteuid() == 0 and subprocess.run(['chattr', '+i', folder], capture_output=True).returncode == 0
    try:
        try:
            open(os.path.join(folder, 'probe'), 'w').close()
            os.remove(os.path.join(folder, 'probe'))
            pytest.skip('cannot make a read-only folder here')
        except OSError:
            pass
        yield folder
    finally:
        if immutable:
            subprocess.run(['chattr', '-i', folder], check=True)
        os.chmod(folder, 0o755)


@pytest.fixture
def finished(tiny_runs, tmp_path):
    """A copy of a finished LLM-ESR run."""
    return shutil.copytree(tiny_runs[1], tmp_path / 'finished')


def train_args(tiny, tiny_emb, out, *more):
    return ['--data', tiny.folder, '--emb', tiny_emb, '--max-len', '10', '--d', '16', '--lr', '0.01',
            '--epochs', '3', '--n-similar', '3', '--log-every', '1000', '--out', str(out), *more]


def test_an_output_folder_never_destroys_an_input(tmp_path, tiny, tiny_emb, finished):
    raw = amazon2014(str(tmp_path / 'raw'), synthetic_log())
    (tmp_path / 'notes').mkdir()
    (tmp_path / 'notes' / 'notes.txt').write_text('mine')
    (tmp_path / 'broken').mkdir()
    (tmp_path / 'broken' / 'manifest.json').write_text('{"key": ')
    lm = os.path.join(os.path.dirname(tiny_emb), 'lm')
    watched = [raw, tiny.folder, tiny_emb, str(finished), str(tmp_path / 'notes'), str(tmp_path / 'broken')]
    cases = [
        (data.main, ['--raw', raw, '--out', raw], r'--out .* is --raw'),
        (data.main, ['--raw', raw, '--out', f'{raw}/processed'], r'is inside --raw'),
        (data.main, ['--raw', raw, '--out', str(tmp_path)], r'contains --raw'),
        (data.main, ['--raw', raw, '--out', str(tmp_path / 'notes')], r'holds files that are not processed data \(notes.txt\)'),
        (data.main, ['--raw', raw, '--out', tiny_emb], r'holds files that are not processed data'),
        (data.main, ['--raw', raw, '--out', f'{raw}/reviews_Beauty_5.json.gz'], r'is inside --raw'),
        (data.main, ['--raw', raw, '--out', str(tmp_path / 'notes' / 'notes.txt')], r'is a file, not a folder'),
        (data.main, ['--raw', raw, '--out', str(tmp_path / 'broken')], r'manifest is not valid JSON.*--overwrite'),
        (embed.main, ['--data', tiny.folder, '--lm', lm, '--out', str(tmp_path / 'broken')],
         r'manifest is not valid JSON.*--overwrite'),
        (embed.main, ['--data', tiny.folder, '--lm', lm, '--out', tiny.folder], r'is --data'),
        (embed.main, ['--data', tiny.folder, '--lm', lm, '--out', str(finished)], r'not embeddings \(best.pt'),
        (embed.main, ['--data', tiny.folder, '--lm', lm, '--out', str(tmp_path / 'notes')], r'not embeddings'),
        (train.main, train_args(tiny, tiny_emb, finished), r'holds a run .*--resume.*--overwrite'),
        (train.main, train_args(tiny, tiny_emb, tiny.folder), r'is --data'),
        (train.main, train_args(tiny, tiny_emb, f'{tiny_emb}/run'), r'is inside --emb'),
        (train.main, train_args(tiny, tiny_emb, tmp_path / 'notes'), r'not a run \(notes.txt\)'),
    ]
    for main, argv, match in cases:
        fails_cleanly(main, argv, match, watched, tmp_path)
    # --overwrite replaces the run's own files, and nothing else
    (finished / 'results.json').write_text('{}')
    train.main(train_args(tiny, tiny_emb, finished, '--overwrite', '--epochs', '1'))
    assert json.load(open(finished / 'results.json'))['epochs_run'] == 1


def test_the_three_destroying_commands_are_refused_fast_without_a_traceback(tmp_path, tiny, tiny_emb, finished):
    raw = amazon2014(str(tmp_path / 'raw'), synthetic_log())
    lm = os.path.join(os.path.dirname(tiny_emb), 'lm')
    for argv, folder in [(['data.py', '--raw', raw, '--out', raw], raw),
                         (['embed.py', '--data', tiny.folder, '--lm', lm, '--out', tiny.folder], tiny.folder),
                         (['train.py', *train_args(tiny, tiny_emb, finished)], str(finished))]:
        before, started = tree_hashes(folder), time.time()
        proc = subprocess.run([sys.executable, *argv], cwd=os.path.dirname(__file__), capture_output=True, text=True)
        assert proc.returncode != 0 and time.time() - started < 5
        assert proc.stderr.startswith('error: --out') and 'Traceback' not in proc.stderr, proc.stderr
        assert tree_hashes(folder) == before


def damage(path, how):
    blob = open(path, 'rb').read()
    if how == 'flipped':
        blob = blob[:len(blob) // 2] + bytes([blob[len(blob) // 2] ^ 1]) + blob[len(blob) // 2 + 1:]
    elif how == 'zeros':                                           # the middle third
        blob = blob[:len(blob) // 3] + bytes(len(blob) // 3) + blob[2 * (len(blob) // 3):]
    elif how == 'header':                                          # the recorded checksum itself
        blob = b'x' + blob[1:]
    open(path, 'wb').write({'truncated': blob[:len(blob) // 3], 'empty': b''}.get(how, blob))


@pytest.mark.parametrize('how', ['flipped', 'zeros', 'header', 'truncated', 'empty'])
def test_a_damaged_checkpoint_is_named_and_refused(tiny, tiny_emb, finished, tmp_path, how):
    best_too = how == 'flipped'
    damage(finished / 'last.pt', how)
    if best_too:
        damage(finished / 'best.pt', how)
    message = fails_cleanly(train.main, train_args(tiny, tiny_emb, finished, '--resume'),
                            r'last.pt is damaged', [str(finished)], tmp_path)
    if best_too:
        assert 'best.pt is damaged too' in message
        fails_cleanly(evaluation.main, ['--run', str(finished)], r'best.pt is damaged', [str(finished)], tmp_path)
    else:
        assert re.search(r'best.pt is intact \(epoch \d+\): to go on from it, `cp ', message)


def test_a_run_from_before_a_model_flag_existed_loads_with_its_default(tiny_runs, tmp_path):
    run = shutil.copytree(tiny_runs[1], tmp_path / 'run')
    ckpt = data.load_checkpoint(run / 'best.pt')
    del ckpt['config']['mask_history'], ckpt['config']['lm_scale']
    ckpt['config']['logit_adjust'] = 0.0                             # and a flag since retired
    data.save_checkpoint(str(run / 'best.pt'), ckpt)
    model, _, config, _ = evaluation.load_run(str(run), 'cpu')
    assert model.cfg.lm_scale == 'xavier' and 'mask_history' not in config   # their defaults before they existed


def test_eval_refuses_a_damaged_best_checkpoint(tiny_runs, tmp_path):
    run = shutil.copytree(tiny_runs[0], tmp_path / 'run')
    damage(run / 'best.pt', 'zeros')
    fails_cleanly(evaluation.main, ['--run', str(run)], r'best.pt is damaged', [str(run)], tmp_path)


def test_a_read_only_out_is_a_message(tmp_path, tiny, tiny_emb):
    raw = amazon2014(str(tmp_path / 'raw'), synthetic_log())
    lm = os.path.join(os.path.dirname(tiny_emb), 'lm')
    (tmp_path / 'ro').mkdir()
    with read_only(str(tmp_path / 'ro')) as ro:
        for main, argv in [(data.main, ['--raw', raw, '--out', f'{ro}/p', '--eval-negatives', '10']),
                           (embed.main, ['--data', tiny.folder, '--lm', lm, '--out', f'{ro}/emb']),
                           (train.main, train_args(tiny, tiny_emb, f'{ro}/run'))]:
            fails_cleanly(main, argv, r'/ro/\w+.*(Permission denied|Operation not permitted|Read-only).*'
                          'Nothing was half-written', [raw, tiny.folder, tiny_emb], tmp_path)


def test_a_full_disk_is_a_message_and_leaves_no_temporary_file(tmp_path, tiny, tiny_emb, monkeypatch):
    raw = amazon2014(str(tmp_path / 'raw'), synthetic_log())
    lm = os.path.join(os.path.dirname(tiny_emb), 'lm')

    def full(fd):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(os, 'fsync', full)
    for main, argv in [(data.main, ['--raw', raw, '--out', str(tmp_path / 'p'), '--eval-negatives', '10']),
                       (embed.main, ['--data', tiny.folder, '--lm', lm, '--out', str(tmp_path / 'emb')]),
                       (train.main, train_args(tiny, tiny_emb, tmp_path / 'run'))]:
        fails_cleanly(main, argv, r'No space left on device.*Nothing was half-written',
                      [raw, tiny.folder, tiny_emb], tmp_path)
    assert not (tmp_path / 'p').exists() and not (tmp_path / 'run' / 'last.pt').exists()


def test_the_training_log_is_written_and_appended_to_on_resume(tmp_path, tiny, tiny_emb):
    run = tmp_path / 'run'
    train.main(train_args(tiny, tiny_emb, run, '--epochs', '2'))
    log = (run / 'train.log').read_text()
    assert 'epoch 1 valid' in log and 'best epoch' in log
    train.main(train_args(tiny, tiny_emb, run, '--resume', '--epochs', '3'))
    log = (run / 'train.log').read_text()
    assert log.count('epoch 1 valid') == 1 and 'resumed from' in log and 'epoch 2 valid' in log


# ---------------------------------------------------------------------------------------------
# looking at a model: --show and --plot


@pytest.fixture(scope='module')
def tiny_runs(tiny, tiny_emb, tmp_path_factory):
    root = tmp_path_factory.mktemp('runs')
    for method in ('base', 'llmesr'):
        train.main(['--data', tiny.folder, '--emb', tiny_emb, '--method', method, '--max-len', '10', '--d', '16',
                    '--lr', '0.01', '--epochs', '3', '--n-similar', '3', '--log-every', '1000', '--out', str(root / method)])
    return str(root / 'base'), str(root / 'llmesr')


def test_groups_of_the_paper_and_the_buckets_follow_their_definitions(tiny):
    targets = tiny.target(1)
    masks = evaluation.group_masks(tiny, targets, tail_item_below=7, tail_user_below=8)
    total = np.bincount(tiny.sequences, minlength=tiny.n_items + 1)
    pop = tiny.item_popularity()
    for u in range(tiny.n_users):
        assert masks['tail_item_paper'][u] == (total[targets[u]] < 7) != masks['head_item_paper'][u]
        assert masks['tail_user_paper'][u] == (tiny.offsets[u + 1] - tiny.offsets[u] - 1 < 8)
        bucket = [g for g, (lo, hi) in evaluation.BUCKETS.items() if lo <= pop[targets[u]] < hi]
        assert [g for g in evaluation.BUCKETS if masks[g][u]] == bucket     # one bucket each
    ranks = np.random.default_rng(0).integers(0, 30, tiny.n_users)
    res = evaluation.results_of({'full': ranks}, masks, [10])['full']
    assert sum(res[g]['users'] for g in evaluation.BUCKETS) == tiny.n_users
    weighted = sum(res[g]['users'] * res[g]['NDCG@10'] for g in evaluation.BUCKETS if res[g]['users'])
    assert math.isclose(weighted / tiny.n_users, res['overall']['NDCG@10'])


def test_every_ablation_switch_changes_what_its_name_says():
    names = lambda m: {n.split('.')[0] for n, _ in m.named_parameters()}  # noqa: E731
    full = small_model()
    assert names(full) == {'co_items', 'adapter', 'cross_co', 'cross_sem', 'encoder'}
    assert names(small_model(semantic=False)) == {'co_items', 'encoder'}
    assert names(small_model(collaborative=False)) == {'adapter', 'encoder'}
    assert names(small_model(cross=False)) == {'co_items', 'adapter', 'encoder'}
    assert names(small_model(shared_encoder=False)) == names(full) | {'encoder2'}
    assert len(small_model(adapter_layers=1).adapter) == 1 and len(full.adapter) == 2
    assert not torch.allclose(small_model(pca_init=False).co_items.weight, full.co_items.weight)
    seq = torch.tensor([[0, 3, 4, 5]])
    assert small_model(semantic=False).item_table().shape[1] == 8 and full.item_table().shape[1] == 16
    no_cross = small_model(cross=False)
    no_cross.load_state_dict(full.state_dict(), strict=False)        # the same weights but the cross-attention
    assert not torch.allclose(no_cross.user_states(seq), full.user_states(seq))
    padding_mask = small_model(attention='official')
    assert names(padding_mask) == names(full)
    padding_mask.load_state_dict(full.state_dict())                 # the same weights, only the mask differs
    assert not torch.allclose(padding_mask.user_states(seq), full.user_states(seq))
    loss, parts = full(seq, seq.roll(-1, 1), seq)                   # no teacher: no distillation term
    assert set(parts) == {'rec'}


# ---------------------------------------------------------------------------------------------
# one writer at a time; destructive flags checked before they destroy


def test_a_second_writer_is_refused_naming_the_first_and_a_stale_lock_is_taken_over(tmp_path, tiny, tiny_emb):
    out = tmp_path / 'run'
    with data.lock(str(out)):                                       # a writer holds --out
        fails_cleanly(train.main, train_args(tiny, tiny_emb, out), rf'--out .*run is being written by another '
                      rf'process \(pid {os.getpid()}: .*\); wait for it', [tiny.folder, tiny_emb], tmp_path)
        fails_cleanly(embed.main, ['--data', tiny.folder, '--lm', 'x', '--out', str(out)],
                      'is being written by another process', [tiny.folder], tmp_path)
    (tmp_path / 'run.lock').write_text('pid 999999: a writer killed long ago')   # no one holds it
    train.main(train_args(tiny, tiny_emb, out, '--epochs', '1'))
    assert (out / 'results.json').exists() and not (tmp_path / 'run.lock').exists()


def test_overwrite_with_a_mistyped_input_or_with_resume_keeps_the_finished_run(tmp_path, tiny, tiny_emb, finished):
    kept = tree_hashes(str(finished))
    fails_cleanly(train.main, train_args(tiny, str(tmp_path / 'typo'), finished, '--overwrite'),
                  r'typo/manifest.json: no embedding manifest', [str(finished)], tmp_path)
    with pytest.raises(SystemExit):                                 # argparse: both flags, before anything
        train.main(train_args(tiny, tiny_emb, finished, '--resume', '--overwrite'))
    assert tree_hashes(str(finished)) == kept


def test_a_link_or_a_trailing_slash_names_the_folder_itself(tmp_path, tiny, tiny_emb):
    (tmp_path / 'real').mkdir()
    os.symlink(tmp_path / 'real', tmp_path / 'link')
    train.main(train_args(tiny, tiny_emb, str(tmp_path / 'link') + '/', '--epochs', '1'))
    train.main(train_args(tiny, tiny_emb, tmp_path / 'link', '--epochs', '1', '--overwrite'))
    assert os.path.islink(tmp_path / 'link') and (tmp_path / 'real' / 'results.json').exists()
    assert sorted(os.listdir(tmp_path)) == ['link', 'real']         # no .old-, .lock or .tmp- left


def test_a_run_reads_its_inputs_from_any_working_directory_and_refuses_rebuilt_data(tmp_path, tiny, tiny_emb,
                                                                                    monkeypatch):
    proc, emb = shutil.copytree(tiny.folder, tmp_path / 'proc'), shutil.copytree(tiny_emb, tmp_path / 'emb')
    monkeypatch.chdir(tmp_path)
    train.main(train_args(tiny, tiny_emb, 'run', '--epochs', '1')[:0] + ['--data', 'proc', '--emb', 'emb',
               '--max-len', '10', '--d', '16', '--epochs', '1', '--n-similar', '3', '--out', 'run'])
    monkeypatch.chdir(tmp_path / 'run')                             # elsewhere: the run still finds them
    assert evaluation.load_run('.', 'cpu')[1].fingerprint == tiny.fingerprint
    stats = json.load(open(proc / 'stats.json'))
    manifest = json.load(open(proc / 'manifest.json'))
    manifest['fingerprint'] = 'rebuilt'                             # the data rebuilt with another seed
    json.dump(manifest, open(proc / 'manifest.json', 'w'))
    with pytest.raises(data.DataError, match='have changed since data.py wrote them'):
        evaluation.load_run('.', 'cpu')
    assert stats['users'] == tiny.n_users and emb.exists()


def test_processed_data_and_embeddings_given_the_wrong_way_round(tiny, tiny_emb):
    with pytest.raises(data.DataError, match='holds embeddings .*swap --data and --emb'):
        data.load_processed(tiny_emb)
    with pytest.raises(data.DataError, match='holds processed data .*swap --data and --emb'):
        embed.load_embeddings(tiny.folder, tiny)


def test_data_without_out_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        data.main(['--raw', str(tmp_path)])
    assert 'the following arguments are required: --out' in capsys.readouterr().err


def test_a_write_cut_short_by_a_kill_does_not_block_the_resume(tiny, tiny_emb, finished):
    (finished / 'last.pt.tmp-999999').write_bytes(b'half a checkpoint')   # its writer is gone
    train.main(train_args(tiny, tiny_emb, finished, '--resume'))
    assert not (finished / 'last.pt.tmp-999999').exists() and (finished / 'results.json').exists()


def test_a_hand_edited_processed_array_is_refused(tmp_path, tiny):
    proc = shutil.copytree(tiny.folder, tmp_path / 'proc')
    seq = np.load(proc / 'sequences.npy')
    seq[0] = seq[1]                                                 # one interaction changed by hand
    np.save(proc / 'sequences.npy', seq)
    with pytest.raises(data.DataError, match=r'proc: its files have changed since data.py wrote them\. Rebuild'):
        data.load_processed(str(proc))


def test_a_stray_json_is_ignored_with_a_note_and_two_datasets_are_refused(tmp_path, capsys):
    raw = amazon2014(str(tmp_path / 'raw'), synthetic_log())
    (tmp_path / 'raw' / 'notes.json').write_text('{"mine": 1}')
    data.main(['--raw', raw, '--out', str(tmp_path / 'p'), '--eval-negatives', '5'])
    assert data.load_processed(str(tmp_path / 'p')).stats['layout'] == 'amazon2014'
    assert 'note: ignored notes.json in --raw: no meta_ file beside it' in capsys.readouterr().err
    shutil.copy(f'{raw}/meta_Beauty.json.gz', f'{raw}/meta_All_Beauty.json.gz')
    shutil.copy(f'{raw}/reviews_Beauty_5.json.gz', f'{raw}/All_Beauty_5.json.gz')   # a 2018 dataset beside
    fails_cleanly(data.main, ['--raw', raw, '--out', str(tmp_path / 'q')],
                  r'holds more than one dataset \(All_Beauty_5.json.gz, reviews_Beauty_5.json.gz\)', [raw], tmp_path)


def test_a_run_refuses_its_data_rebuilt_otherwise_at_eval_and_resume(tmp_path, tiny, tiny_emb):
    proc = tmp_path / 'proc'
    raw = amazon2014(str(tmp_path / 'raw'), synthetic_log())
    data.main(['--raw', raw, '--out', str(proc), '--eval-negatives', '10'])
    run = tmp_path / 'run'
    train.main(['--data', str(proc), '--method', 'base', '--max-len', '10', '--d', '16', '--epochs', '1',
                '--out', str(run)])
    data.main(['--raw', raw, '--out', str(proc), '--eval-negatives', '10', '--seed', '7', '--overwrite'])
    with pytest.raises(data.DataError, match='holds other processed data than .*run was trained on'):
        evaluation.load_run(str(run), 'cpu')
    fails_cleanly(train.main, ['--data', str(proc), '--method', 'base', '--max-len', '10', '--d', '16',
                               '--epochs', '2', '--out', str(run), '--resume'],
                  r'was trained with other settings: data_fingerprint=', [str(proc), str(run)], tmp_path)


def test_a_hand_edited_embedding_table_is_refused(tmp_path, tiny, tiny_emb):
    emb = shutil.copytree(tiny_emb, tmp_path / 'emb')
    items = np.load(emb / 'items.npy')
    items[3] = 0                                                    # one row zeroed by hand
    np.save(emb / 'items.npy', items)
    with pytest.raises(data.DataError, match=r'emb: its tables have changed since embed.py wrote them\. Rebuild'):
        embed.load_embeddings(str(emb), tiny)

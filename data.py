"""Raw review dumps -> a processed folder of training-ready arrays.

    python data.py --raw ../shared/data/amazon-beauty-2014 --out processed/beauty

Layouts, told apart by file names in --raw: amazon2014 (reviews_<Cat>[_5].json.gz + meta_<Cat>.json.gz),
amazon2018 (<Cat>[_5].json.gz + meta_<Cat>.json.gz), yelp (yelp_academic_dataset_*.json), RecBole
(<name>.inter [+ .item]), CSV/TSV (interactions.csv|tsv [+ items]) and the authors' LLM-ESR archive.

Pipeline: parse (bad lines reported by file and line, skipped and counted) -> drop exact duplicates
-> stable sort of each user's interactions by time -> iterative k-core -> leave-one-out split (last
item test, second-to-last validation) -> item and user prompts -> Pareto long-tail groups -> 100
evaluation negatives per user, drawn once. The folder (ids dense: users 0..U-1, items 1..I, 0 pads):
  sequences.npy (n,) int32, offsets.npy (U + 1,) int64  user u owns sequences[offsets[u]:offsets[u+1]]
  eval_negatives.npy (U, n_neg) int32                  items the user never touched
  items.jsonl, users.jsonl                             raw ids, attributes and prompts
  stats.json, manifest.json                            counts and thresholds; config, inputs' sha256,
                                                       the reuse key and a fingerprint of the contents
It is built under a temporary name and renamed into place, so it is whole or absent.
"""
import argparse
import ast
import contextlib
import csv
import fcntl
import functools
import gzip
import hashlib
import html
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

FORMAT_VERSION = 1


class DataError(Exception):
    """An expected failure: a mistake in the input or on the command line, or a run that cannot go on
    (a NaN loss); the message says what to do."""


# ---------------------------------------------------------------------------------------------
# small I/O helpers shared by every script


def sha256_file(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def folder_fingerprint(folder, names):
    """The sha256 of the named files' sha256s: what a processed folder's manifest calls its fingerprint."""
    return sha256_json([(name, sha256_file(os.path.join(folder, name))) for name in names])


def at_least(p, args, least, *names):
    """argparse's error naming the first flag of `names` (dests) whose value is below `least`."""
    for name in names:
        if getattr(args, name) < least:
            p.error(f'--{name.replace("_", "-")} {getattr(args, name)}: give a number of at least {least}')


def git_commit():
    """The commit the code ran from, with '+dirty' if the tree had changes; None outside git."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        run = lambda *cmd: subprocess.run(cmd, cwd=here, capture_output=True, text=True,  # noqa: E731
                                          check=True).stdout.strip()
        sha = run('git', 'rev-parse', 'HEAD')
        dirty = run('git', 'status', '--porcelain', '--untracked-files=no')
        return sha + ('+dirty' if dirty else '')
    except (OSError, subprocess.CalledProcessError):
        return None


def write_atomic(path, write):
    """Call write(f) on a temporary file beside `path`, then rename it into place: whole or absent."""
    tmp = f'{path}.tmp-{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(path, obj):
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=1, sort_keys=True).encode()))


def save_checkpoint(path, ckpt):
    """torch.save(ckpt) behind the sha256 of its bytes (64 hex digits and a newline), atomically."""
    import torch                                                   # only train.py and eval.py need it
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    payload = buffer.getvalue()
    write_atomic(path, lambda f: f.write(hashlib.sha256(payload).hexdigest().encode() + b'\n' + payload))


def load_checkpoint(path):
    """The checkpoint at `path` if its bytes match the checksum it was written with; else a DataError
    that names it and says how to go on."""
    import torch
    with open(path, 'rb') as f:
        blob = f.read()
    digest, payload = blob[:64], blob[65:]
    if blob[64:65] == b'\n' and hashlib.sha256(payload).hexdigest().encode() == digest:
        return torch.load(io.BytesIO(payload), map_location='cpu', weights_only=False)
    folder = os.path.dirname(path)
    why = ('was written by an older train.py, without a checksum' if blob.startswith(b'PK')
           else 'is damaged: its bytes do not match the checksum it was written with')
    advice = 'Train again with --overwrite (results.json, if there, keeps the run\'s results).'
    best = os.path.join(folder, 'best.pt')
    if os.path.basename(path) == 'last.pt' and os.path.exists(best):
        try:
            epoch = load_checkpoint(best)['state']['best_epoch']
            advice = (f'{best} is intact (epoch {epoch}): to go on from it, `cp {best} {path}` and run again '
                      'with --resume; or start again with --overwrite.')
        except DataError:
            advice = f'{best} is damaged too. Start again with --overwrite.'
    raise DataError(f'{path} {why}. {advice}')


def batches_by_length(lengths, batch_size):
    """Index batches of rows of similar length (shortest first), so each can be cut to its longest."""
    order = np.argsort(lengths, kind='stable')
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def replace_dir(tmp_dir, out_dir):
    """Move a finished folder into place; an old folder is swapped out, never half-overwritten."""
    old = None
    if os.path.exists(out_dir):
        old = f'{out_dir}.old-{os.getpid()}'
        os.rename(out_dir, old)
    os.rename(tmp_dir, out_dir)
    if old:
        shutil.rmtree(old)


# what each script writes into its --out; a folder holding anything else is not its artifact
ARTIFACT_FILES = {
    'processed data': {'manifest.json', 'sequences.npy', 'offsets.npy', 'eval_negatives.npy', 'items.jsonl',
                       'users.jsonl', 'stats.json'},
    'embeddings': {'manifest.json', 'items.npy', 'users.npy', 'finetune.json', 'lm'},
    'a run': {'last.pt', 'best.pt', 'results.json', 'results.md', 'test_ranks.npz', 'train.log'}}


def guard_out(out, kind, inputs):
    """Refuse an --out where writing could lose data, before anything is read; True if it holds `kind`.

    --out may not exist, be empty, or hold only the files of an artifact of its own `kind` (a key of
    ARTIFACT_FILES); it may not be, be inside, or contain any of `inputs` ({flag: folder}).
    """
    real = os.path.realpath(out)
    for flag, folder in inputs.items():
        other = os.path.realpath(folder) if folder else None
        if other and (real == other or real.startswith(other + os.sep) or other.startswith(real + os.sep)):
            where = 'is' if real == other else 'is inside' if real.startswith(other) else 'contains'
            raise DataError(f'--out {out} {where} {flag} {folder}: writing there would overwrite the input. '
                            'Give a new folder as --out.')
    if not os.path.exists(out):
        return False
    if not os.path.isdir(out):
        raise DataError(f'--out {out} is a file, not a folder. Give a new folder as --out.')
    entries = sorted(os.listdir(out))
    # a checkpoint write cut short by a kill (train.py, which holds the lock here, writes inside --out)
    for e in [e for e in entries if '.tmp-' in e and e.rsplit('.tmp-', 1)[0] in ARTIFACT_FILES[kind]]:
        os.remove(os.path.join(out, e))
        entries.remove(e)
    if not entries:
        return False
    strangers = [e for e in entries if e not in ARTIFACT_FILES[kind]]
    if strangers or (kind != 'a run' and 'manifest.json' not in entries):
        shown = ', '.join((strangers or entries)[:4]) + (', ...' if len(strangers or entries) > 4 else '')
        raise DataError(f'--out {out} holds files that are not {kind} ({shown}); they are never written '
                        'over. Give a new or empty folder as --out.')
    return True


@contextlib.contextmanager
def lock(out):
    """Hold <out>.lock while writing --out, so that a second writer is refused with the first's pid and
    command. The lock is the operating system's (flock), so a killed writer's lock is free again."""
    path = os.path.realpath(out).rstrip(os.sep) + '.lock'
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'a+') as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise DataError(f'--out {out} is being written by another process ({f.read().strip() or "?"}); '
                            'wait for it to end, or stop it, then run the command again.') from None
        f.truncate(0)
        f.write(f'pid {os.getpid()}: {" ".join(sys.argv)}')
        f.flush()
        try:
            yield
        finally:
            os.remove(path)


def or_exit(fn, *args):
    """fn(*args); an expected failure (a DataError, or a file-system error such as a read-only folder or
    a full disk) becomes one line on stderr and exit status 1, not a traceback."""
    try:
        return fn(*args)
    except DataError as e:
        sys.exit(f'error: {e}')
    except OSError as e:
        sys.exit(f'error: {e.filename or ""}: {e.strerror or e}. Nothing was half-written; check that the '
                 'folder exists, is writable and has free space, then run the command again.')


def run_path(path, run):
    """A folder named in a run's config: relative to the run folder (train.py writes them so), or, in a
    run from before, relative to where it ran."""
    beside = os.path.join(run, path) if run and path else path
    return beside if beside and os.path.exists(beside) else path


def read_json(path, what, remedy):
    if not os.path.exists(path):
        raise DataError(f'{path}: no {what} here. {remedy}')
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f'{path}: {what} is not valid JSON ({e}). {remedy}') from e


# ---------------------------------------------------------------------------------------------
# reading lines, counting bad ones


class BadLines:
    """Counts malformed lines; fails at the first one with --strict, or past a share at the end."""

    def __init__(self, strict, max_share, shown=5):
        self.strict, self.max_share, self.shown = strict, max_share, shown
        self.bad, self.total = {}, {}

    def report(self, path, lineno, why):
        where = f'{path}, line {lineno}: {why}'
        if self.strict:
            raise DataError(f'{where} (--strict stops at the first bad line; without it, a counted skip)')
        self.bad[path] = self.bad.get(path, 0) + 1
        if sum(self.bad.values()) <= self.shown:
            print(f'warning: skipped {where}', file=sys.stderr)

    def check(self, path):
        bad, total = self.bad.get(path, 0), self.total.get(path, 0)
        if total == 0:
            raise DataError(f'{path}: the file has no lines. Re-download it; it holds one record per line.')
        if bad > self.max_share * total:
            raise DataError(f'{path}: {bad} of {total} lines are malformed (more than {self.max_share:.0%}); '
                            'the file is damaged or not in the expected layout. The first ones are above.')
        if bad:
            print(f'warning: {path}: skipped {bad} malformed lines of {total}', file=sys.stderr)


def read_lines(path, bad, header=False):
    """Yield (line number, text) of a plain or gzip file; undecodable lines are reported, not yielded,
    and so is the first line if it is a `header`."""
    opener = gzip.open if path.endswith('.gz') else open
    lineno = 0
    try:
        with opener(path, 'rb') as f:
            for lineno, raw in enumerate(f, 1):
                bad.total[path] = lineno
                try:
                    text = raw.decode('utf-8').strip()
                except UnicodeDecodeError as e:
                    bad.report(path, lineno, f'not UTF-8 ({e.reason} at byte {e.start})')
                    continue
                if text and not header:
                    yield lineno, text
                header = header and not text
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f'{path}: the gzip stream is truncated or damaged after line {lineno} ({e}). '
                        'Download the file again.') from e
    bad.total.setdefault(path, 0)


# ---------------------------------------------------------------------------------------------
# the three layouts: each parser takes one line and returns a record or raises ValueError


def clean(value, limit):
    """Collapse whitespace and cut a value to `limit` characters; '' for anything empty."""
    if value is None:
        return ''
    if isinstance(value, (list, tuple)):
        value = ' '.join(str(v) for v in value if v)
    text = re.sub(r'\s+', ' ', html.unescape(str(value))).strip()
    return text[:limit].rstrip() + '...' if len(text) > limit else text


def parse_price(value):
    """2014 prices are numbers, 2018 prices text like '$12.99'; anything else is no price."""
    if isinstance(value, bool):
        return ''
    if isinstance(value, (int, float)):
        return f'{value:.2f}' if math.isfinite(value) and value >= 0 else ''
    match = re.fullmatch(r'\s*\$?\s*([0-9][0-9,]*(\.[0-9]+)?)\s*', str(value or ''))
    return f'{float(match.group(1).replace(",", "")):.2f}' if match else ''


def parse_time(value):
    """Unix seconds from an int, a numeric string, or a 'YYYY-MM-DD HH:MM:SS' date (Yelp)."""
    if isinstance(value, bool):
        raise ValueError(f'timestamp {value!r} is not a time')
    if isinstance(value, (int, float)):
        return int(value)
    if isinstance(value, str):
        if re.fullmatch(r'\s*-?\d+(\.\d*)?\s*', value):                 # RecBole writes 1391212800.0
            return int(float(value))
        try:
            when = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(f'timestamp {value!r} is neither unix seconds nor a date') from None
        return int(when.replace(tzinfo=when.tzinfo or timezone.utc).timestamp())
    raise ValueError(f'timestamp {value!r} is not a time')


def require(record, keys):
    if not isinstance(record, dict):
        raise ValueError(f'expected an object, got {type(record).__name__}')
    missing = [k for k in keys if k not in record or record[k] in (None, '')]
    if missing:
        raise ValueError(f'missing {", ".join(missing)}')
    return [record[k] for k in keys]


def ids(*values):
    for v in values:
        if not isinstance(v, (str, int)) or isinstance(v, bool):
            raise ValueError(f'id {v!r} is not a string')
    return [str(v) for v in values]


def amazon_review(text):
    user, item, when = require(json.loads(text), ['reviewerID', 'asin', 'unixReviewTime'])
    return (*ids(user, item), parse_time(when))


def categories_2014(value):
    if isinstance(value, str):
        return [value]
    names = []
    for path in value or []:
        for name in (path if isinstance(path, list) else [path]):
            if isinstance(name, str) and name not in names:
                names.append(name)
    return names


def amazon_attributes(meta, limit, categories, extra_features=()):
    attrs = [('name', clean(meta.get('title'), limit)),
             ('brand', clean(meta.get('brand'), limit)),
             ('price', parse_price(meta.get('price'))),
             ('categories', clean(', '.join(categories), limit)),
             ('features', clean('; '.join(f for f in extra_features if isinstance(f, str)), limit)),
             ('description', clean(meta.get('description'), limit))]
    return [(k, v) for k, v in attrs if v]


def amazon2014_meta(text, limit, meta=None):
    meta = ast.literal_eval(text) if meta is None else meta
    (item,) = ids(*require(meta, ['asin']))
    return [(item, amazon_attributes(meta, limit, categories_2014(meta.get('categories'))))]


def amazon2018_meta(text, limit):
    meta = json.loads(text)
    (item,) = ids(*require(meta, ['asin']))
    cats = meta.get('category') or []
    cats = [cats] if isinstance(cats, str) else [c for c in cats if isinstance(c, str)]
    feats = meta.get('feature') or []
    return [(item, amazon_attributes(meta, limit, cats, [feats] if isinstance(feats, str) else feats))]


def yelp_review(text):
    user, item, when = require(json.loads(text), ['user_id', 'business_id', 'date'])
    return (*ids(user, item), parse_time(when))


def yelp_meta(text, limit, meta=None):
    meta = json.loads(text) if meta is None else meta
    (item,) = ids(*require(meta, ['business_id']))
    attrs = [('name', clean(meta.get('name'), limit)),
             ('city', clean(meta.get('city'), limit)),
             ('stars', clean(meta.get('stars'), limit)),
             ('review count', clean(meta.get('review_count'), limit)),
             ('categories', clean(meta.get('categories'), limit))]
    return [(item, [(k, v) for k, v in attrs if v])]


def table(path):
    """(column names, line -> {name: value}) of a file whose first line names its columns: RecBole's
    atomic files (tab-separated; typed names such as user_id:token, the type dropped), TSV, or CSV."""
    csv_file = re.search(r'\.csv(\.gz)?$', path)
    split = (lambda text: next(csv.reader([text]))) if csv_file else (lambda text: text.split('\t'))
    names = next((split(text.lstrip('\ufeff')) for _, text in read_lines(path, BadLines(False, 1))), None)
    if not names:
        raise DataError(f'{path}: the file is empty; its first line should name the columns.')
    names = [name.split(':')[0].strip() for name in names]

    def row(text):
        values = split(text)
        if len(values) != len(names):
            raise ValueError(f'{len(values)} fields, the header names {len(names)}')
        return dict(zip(names, values))
    return names, row


def table_parsers(reviews, meta, columns):
    """The parsers of an interactions table (user, item, time columns; no time: file order) and of its
    items table (the item column, every other column an attribute; `title` is the item's name)."""
    names, row = table(reviews)
    user, item, *time = columns or ['user_id', 'item_id'] + [n for n in names if n == 'timestamp']
    missing = [c for c in [user, item, *time] if c not in names]
    meta_names, meta_row = table(meta) if meta else ([item], None)
    if missing or item not in meta_names:
        path, names = (reviews, names) if missing else (meta, meta_names)
        raise DataError(f'{path}: the header ({", ".join(names)}) has no column {(missing or [item])[0]}. '
                        'Name the user, item and time columns with --columns USER,ITEM[,TIME].')

    def parse_review(text):
        values = row(text)
        return (*ids(*require(values, [user, item])), parse_time(values[time[0]]) if time else None)

    def parse_meta(text, limit):
        values = meta_row(text)
        attrs = [('name' if k == 'title' else k, clean(v, limit)) for k, v in values.items() if k != item]
        return [(*ids(*require(values, [item])), [(k, v) for k, v in attrs if v])]
    return parse_review, parse_meta


def archive_parsers(folder):
    """The parsers of the authors' LLM-ESR files (data/<dataset>/handled/): inter.txt, `user item` per
    line in time order, ids mapped back to the originals by id_map.json; item2attributes.json, one JSON
    object of each item's original metadata."""
    path = os.path.join(folder, 'id_map.json')
    maps = read_json(path, 'id map', 'Take it from the same archive.') if os.path.exists(path) else {}

    def parse_review(text):
        user, item = text.split()                                  # ValueError unless two fields
        return maps.get('id2user', {}).get(user, user), maps.get('id2item', {}).get(item, item), None

    def parse_meta(text, limit):
        return [pair for key, meta in json.loads(text).items() if isinstance(meta, dict)
                for pair in (yelp_meta(None, limit, meta) if 'business_id' in meta else
                             amazon2014_meta(None, limit, {**meta, 'asin': key}))]
    return parse_review, parse_meta


@dataclass
class Layout:
    name: str
    reviews: str        # path
    meta: str           # path; None: no items file (each prompt holds the item's id)
    subject: str        # 'The beauty item': how the prompt names an item
    parse_review: callable
    parse_meta: callable
    header: bool = False    # the files' first lines name their columns
    also: tuple = ()        # other files read (id_map.json)


def detect_layout(raw, columns=None):
    """Find the interaction and item files in `raw` and say which layout they come in."""
    if not os.path.isdir(raw):
        raise DataError(f'--raw {raw}: no such folder. Put the original files there, or fetch them with '
                        f'`python experiments/download.py amazon2014-Beauty {raw}`.')
    files = sorted(os.listdir(raw))
    at = functools.partial(os.path.join, raw)
    if {'inter.txt', 'id_map.json', 'item2attributes.json'} & set(files):
        if 'inter.txt' not in files:
            raise DataError(f'--raw {raw}: an LLM-ESR archive folder (id_map.json, item2attributes.json) '
                            'without its inter.txt; take it from the same archive (`user item` lines).')
        meta = at('item2attributes.json') if 'item2attributes.json' in files else None
        return Layout('llmesr', at('inter.txt'), meta, 'The item', *archive_parsers(raw),
                      also=tuple(at(f) for f in ['id_map.json'] if f in files))
    tables = [f for f in files if re.fullmatch(r'.+\.inter|interactions\.(csv|tsv)(\.gz)?', f)]
    if len(tables) > 1:
        raise DataError(f'--raw {raw} holds more than one interactions file ({", ".join(tables)}); keep one.')
    if tables:
        recbole = tables[0].endswith('.inter')
        wanted = re.escape(tables[0][:-len('inter')]) + 'item' if recbole else r'items\.(csv|tsv)(\.gz)?'
        meta = next((at(f) for f in files if re.fullmatch(wanted, f)), None)
        return Layout('recbole' if recbole else 'table', at(tables[0]), meta, 'The item',
                      *table_parsers(at(tables[0]), meta, columns), header=True)
    if 'yelp_academic_dataset_review.json' in files:
        meta = os.path.join(raw, 'yelp_academic_dataset_business.json')
        return Layout('yelp', os.path.join(raw, 'yelp_academic_dataset_review.json'), meta,
                      'The business', yelp_review, yelp_meta)
    found = []                                     # (review file, category, 2014 or not, its meta_ files)
    for name in files:
        match = re.fullmatch(r'(reviews_)?(.+?)(_5)?\.json(\.gz)?', name)
        if match and not name.startswith('meta_'):  # 2014 names start with reviews_
            metas = [m for m in files if re.fullmatch(rf'meta_{re.escape(match.group(2))}\.json(\.gz)?', m)]
            found.append((name, match.group(2), bool(match.group(1)), metas))
    # a .json without its meta_ file beside it is a stray, unless no file has one (then reviews_ first)
    paired = [f for f in found if f[3]] or sorted(found, key=lambda f: not f[2])[:1]
    if len(paired) > 1:
        raise DataError(f'--raw {raw} holds more than one dataset ({", ".join(f[0] for f in paired)}); give '
                        'a folder with one review file and its meta_ file.')
    for f in [f for f in found if f not in paired]:
        print(f'note: ignored {f[0]} in --raw: no meta_ file beside it', file=sys.stderr)
    if paired:
        name, category, old, metas = paired[0]
        meta = os.path.join(raw, (metas or [f'meta_{category}.json.gz'])[0])
        release, parse = ('amazon2014', amazon2014_meta) if old else ('amazon2018', amazon2018_meta)
        subject = f'The {category.replace("_", " ").lower()} item'
        return Layout(release, os.path.join(raw, name), meta, subject, amazon_review, parse)
    raise DataError(f'--raw {raw}: found no interactions file (reviews_<Category>_5.json.gz for Amazon '
                    '2014, <Category>_5.json.gz for Amazon 2018, yelp_academic_dataset_review.json for Yelp, '
                    '<name>.inter for RecBole, interactions.csv or .tsv, inter.txt for the LLM-ESR archive). '
                    f'Files there: {", ".join(files) or "none"}.')


# ---------------------------------------------------------------------------------------------
# prompts

ITEM_SENTENCES = {'categories': 'features', 'features': 'features', 'description': 'descriptions'}


def render_item_prompt(subject, attrs):
    """The LLM-ESR item prompt from an ordered list of (name, value); absent attributes are left out.

    >>> render_item_prompt('The beauty item', [('name', 'Lipstick'), ('categories', 'Makeup')])
    'The beauty item has following attributes: name is Lipstick. The item has following features: Makeup.'
    """
    plain = [f'{k} is {v.rstrip(".")}' for k, v in attrs if k not in ITEM_SENTENCES]
    parts = [f'{subject} has following attributes: {"; ".join(plain)}.' if plain else f'{subject}.']
    for sentence in dict.fromkeys(ITEM_SENTENCES.values()):
        values = [v.rstrip('.') for k, v in attrs if ITEM_SENTENCES.get(k) == sentence]
        if values:
            parts.append(f'The item has following {sentence}: {"; ".join(values)}.')
    return ' '.join(parts)


USER_HEADER = 'The user has interacted with the following items, most recent last: '


def render_user_prompt(titles, budget):
    """Titles of the user's training items, oldest first, cut from the front to `budget` characters."""
    kept, used = [], len(USER_HEADER)
    for title in reversed(titles):
        if used + len(title) + 2 > budget:
            if not kept:
                kept.append(title[-(budget - used):])
            break
        kept.append(title)
        used += len(title) + 2
    return USER_HEADER + '; '.join(reversed(kept)) + '.'


# ---------------------------------------------------------------------------------------------
# the pipeline


def kcore(users, items, min_user, min_item, keep=None, once=False):
    """The mask of interactions (among `keep`) that survive the k-core on integer codes, and the rounds.

    Iterative by default: filter until every user and item has its minimum. `once` is the official
    code's filter_common: one pass over the counts, then users left with fewer than 3 interactions go
    (its filter_minmum), so items and users below the minimum may remain.
    """
    keep = np.ones(len(users), dtype=bool) if keep is None else keep
    for rounds in range(1, 1000):
        u_count = np.bincount(users[keep], minlength=users.max() + 1)
        i_count = np.bincount(items[keep], minlength=items.max() + 1)
        ok = keep & (u_count[users] >= min_user) & (i_count[items] >= min_item)
        if once:
            return ok & (np.bincount(users[ok], minlength=users.max() + 1)[users] >= 3), 1
        if ok.sum() == keep.sum():
            return keep, rounds
        keep = ok
    raise AssertionError('k-core did not converge')


def pareto_threshold(counts, head_share=0.2):
    """Smallest count of the head: the top `head_share` of entries by count are head (ties join them)."""
    ranked = np.sort(counts)[::-1]
    return int(ranked[max(1, math.ceil(head_share * len(ranked))) - 1])


def eval_negatives(sequences, offsets, n_items, n_neg, seed):
    """For each user, n_neg distinct items it never interacted with, uniform, drawn once."""
    rng = np.random.default_rng(seed)
    out = np.zeros((len(offsets) - 1, n_neg), dtype=np.int32)
    for u in range(len(offsets) - 1):
        seen = sequences[offsets[u]:offsets[u + 1]]
        if n_items - len(np.unique(seen)) < n_neg:
            raise DataError(f'user {u} has fewer than {n_neg} items left to draw evaluation negatives from; '
                            'lower --eval-negatives.')
        picked = np.empty(0, dtype=np.int64)
        while len(picked) < n_neg:
            draw = rng.integers(1, n_items + 1, size=2 * n_neg)
            draw = draw[~np.isin(draw, seen) & ~np.isin(draw, picked)]
            _, first = np.unique(draw, return_index=True)
            picked = np.concatenate([picked, draw[np.sort(first)]])
        out[u] = picked[:n_neg]
    return out


def training_popularity(sequences, offsets, n_items):
    """(n_items + 1,) training interactions per item (each user's last two held out); row 0 is padding."""
    train = np.ones(len(sequences), dtype=bool)
    train[offsets[1:] - 1] = False
    train[offsets[1:] - 2] = False
    return np.bincount(sequences[train], minlength=n_items + 1)


def length_stats(lengths):
    return {'mean': float(lengths.mean()), 'median': float(np.median(lengths)), 'min': int(lengths.min()),
            'max': int(lengths.max()), 'p90': float(np.percentile(lengths, 90))}


def process(layout, args):
    """Read, filter, split and describe one dataset; write it to a temporary folder; return its stats."""
    bad = BadLines(args.strict, args.max_bad)
    raw_users, raw_items, times, seen, duplicates, timeless = [], [], [], set(), 0, False
    for lineno, text in read_lines(layout.reviews, bad, layout.header):
        try:
            user, item, when = layout.parse_review(text)
        except (ValueError, SyntaxError, TypeError) as e:
            bad.report(layout.reviews, lineno, str(e) or type(e).__name__)
            continue
        if when is None:                                           # no time: the file's order
            timeless, when = True, lineno
        if (user, item, when) in seen:
            duplicates += 1
            continue
        seen.add((user, item, when))
        raw_users.append(user), raw_items.append(item), times.append(when)
    bad.check(layout.reviews)
    if not raw_users:
        raise DataError(f'{layout.reviews}: the file holds no interactions, only a header.')
    del seen
    if duplicates:
        print(f'warning: dropped {duplicates} exact duplicate interactions (same user, item and time)',
              file=sys.stderr)

    user_names, users = np.unique(np.array(raw_users), return_inverse=True)
    item_names, items = np.unique(np.array(raw_items), return_inverse=True)
    times = np.array(times, dtype=np.int64)
    keep = None
    if args.sample_users < 1:                                      # a random share of users, each kept whole
        chosen = np.random.default_rng(args.seed).permutation(len(user_names))
        keep = np.isin(users, chosen[:int(args.sample_users * len(user_names))])
    keep, rounds = kcore(users, items, args.min_user, args.min_item, keep, args.kcore == 'once')
    if not keep.any():
        raise DataError(f'{layout.reviews}: no interaction survives the {args.min_user}-user/'
                        f'{args.min_item}-item core; lower --min-user/--min-item.')
    order = np.flatnonzero(keep)
    order = order[np.lexsort((order, times[order], users[order]))]   # by user, then time, then file order
    users, items, times = users[order], items[order], times[order]

    # dense ids: users in order of raw id, items in order of first appearance in the sorted data
    user_ids, users = np.unique(users, return_inverse=True)
    item_ids, first = np.unique(items, return_index=True)
    item_ids = item_ids[np.argsort(first)]
    remap = np.zeros(item_names.size, dtype=np.int64)
    remap[item_ids] = np.arange(1, len(item_ids) + 1)
    items = remap[items].astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(users))]).astype(np.int64)
    n_users, n_items = len(user_ids), len(item_ids)
    if (np.diff(offsets) < 3).any():
        raise DataError('some users have fewer than 3 interactions after filtering: leave-one-out needs 3; '
                        'use --min-user 3 or more.')

    # item attributes: only items that survived are kept
    wanted = {item_names[i]: k + 1 for k, i in enumerate(item_ids)}
    attrs = [None] * (n_items + 1)
    for lineno, text in read_lines(layout.meta, bad, layout.header) if layout.meta else []:
        try:
            pairs = layout.parse_meta(text, args.max_value_chars)
        except (ValueError, SyntaxError, TypeError, AttributeError, MemoryError, RecursionError) as e:
            bad.report(layout.meta, lineno, str(e) or type(e).__name__)
            continue
        for item, item_attrs in pairs:
            if item in wanted and attrs[wanted[item]] is None:
                attrs[wanted[item]] = item_attrs
    if layout.meta:
        bad.check(layout.meta)
    else:
        print(f'warning: no items file beside {layout.reviews}; each item\'s prompt holds only its id',
              file=sys.stderr)
        attrs = [None] + [[('id', str(item_names[i]))] for i in item_ids]
    no_meta = sum(a is None for a in attrs[1:])
    no_text = sum(not a for a in attrs[1:])
    if no_text == n_items:
        raise DataError(f'{layout.meta}: not one of the {n_items} items has any text (title, brand, price, '
                        'categories, description); every prompt would be the same. Is it this dataset\'s?')
    if no_text:
        print(f'warning: {no_text} of {n_items} items have no text ({no_meta} absent from {layout.meta}); '
              'they keep their ids and get an empty-attribute prompt', file=sys.stderr)
    attrs = [a or [] for a in attrs]

    # popularity and lengths from the training part only: validation and test would leak
    lengths = np.diff(offsets)
    item_pop = training_popularity(items, offsets, n_items)
    train_len = lengths - 2
    item_threshold = pareto_threshold(item_pop[1:])
    user_threshold = pareto_threshold(train_len)

    os.makedirs(args.tmp, exist_ok=True)
    with open(os.path.join(args.tmp, 'items.jsonl'), 'w') as f:
        for i in range(1, n_items + 1):
            f.write(json.dumps({'id': i, 'raw': str(item_names[item_ids[i - 1]]), 'attributes': attrs[i],
                                'prompt': render_item_prompt(layout.subject, attrs[i])}) + '\n')
    titles = [dict(a).get('name', '') for a in attrs]
    with open(os.path.join(args.tmp, 'users.jsonl'), 'w') as f:
        for u in range(n_users):
            history = items[offsets[u]:offsets[u + 1] - 2]
            prompt = render_user_prompt([titles[i] for i in history if titles[i]], args.user_text_chars)
            f.write(json.dumps({'id': u, 'raw': str(user_names[user_ids[u]]), 'prompt': prompt}) + '\n')
    np.save(os.path.join(args.tmp, 'sequences.npy'), items)
    np.save(os.path.join(args.tmp, 'offsets.npy'), offsets)
    np.save(os.path.join(args.tmp, 'eval_negatives.npy'),
            eval_negatives(items, offsets, n_items, args.eval_negatives, args.seed))

    stats = {'layout': layout.name, 'users': n_users, 'items': n_items, 'interactions': int(len(items)),
             'density': len(items) / (n_users * n_items), 'kcore_rounds': rounds,
             'sequence_length': length_stats(lengths), 'train_length': length_stats(train_len),
             'item_threshold': item_threshold, 'user_threshold': user_threshold,
             'head_items': int((item_pop[1:] >= item_threshold).sum()),
             'head_users': int((train_len >= user_threshold).sum()),
             'skipped_lines': dict(bad.bad), 'duplicates_dropped': duplicates,
             'items_without_text': no_text, 'items_without_meta': no_meta}
    if args.kcore != 'iterative' or args.sample_users < 1:        # only then, so default folders keep their
        stats.update(kcore=args.kcore, sample_users=args.sample_users,   # fingerprint
                     interactions_per_item=len(items) / n_items)
    if timeless:
        stats['order'] = 'file order: the interactions have no time'
    write_json_atomic(os.path.join(args.tmp, 'stats.json'), stats)
    return stats


# ---------------------------------------------------------------------------------------------
# reading a processed folder (train.py, embed.py and eval.py use this)


@dataclass
class Processed:
    folder: str
    fingerprint: str
    stats: dict
    sequences: np.ndarray       # (n_interactions,) int32
    offsets: np.ndarray         # (U + 1,) int64
    eval_negatives: np.ndarray  # (U, n_neg) int32

    @property
    def n_users(self):
        return len(self.offsets) - 1

    @property
    def n_items(self):
        return self.stats['items']

    def item_popularity(self):
        """(n_items + 1,) training interactions per item; row 0 is padding."""
        return training_popularity(self.sequences, self.offsets, self.n_items)

    def head_items(self):
        """(n_items + 1,) bool: Pareto head items (the most popular 20% by training interactions)."""
        return self.item_popularity() >= self.stats['item_threshold']

    def head_users(self):
        """(U,) bool: Pareto head users (the 20% with the longest training sequences)."""
        return np.diff(self.offsets) - 2 >= self.stats['user_threshold']

    def padded(self, cut, max_len):
        """(U, max_len) int64: each user's sequence but its last `cut` items, last max_len, left-padded."""
        ends = self.offsets[1:] - cut
        take = np.minimum(ends - self.offsets[:-1], max_len)
        rows = np.repeat(np.arange(self.n_users), take)
        within = np.arange(take.sum()) - np.repeat(np.cumsum(take) - take, take)   # position inside each run
        cols = max_len - np.repeat(take, take) + within
        src = np.repeat(ends - take, take) + within
        out = np.zeros((self.n_users, max_len), dtype=np.int64)
        out[rows, cols] = self.sequences[src]
        return out

    def target(self, cut):
        """(U,) int64: the item `cut` places from the end (2 = validation, 1 = test)."""
        return self.sequences[self.offsets[1:] - cut].astype(np.int64)

    def read_jsonl(self, name):
        with open(os.path.join(self.folder, name)) as f:
            return [json.loads(line) for line in f]


def load_processed(folder):
    remedy = 'Make a processed folder with `python data.py --raw <raw folder> --out <new folder>`.'
    manifest = read_json(os.path.join(folder, 'manifest.json'), 'processed-data manifest', remedy)
    remedy = f'Rebuild it with `python data.py --raw <raw folder> --out {folder} --overwrite`.'
    if 'embed_version' in manifest:
        raise DataError(f'{folder} holds embeddings (embed.py), not processed data (data.py): swap --data '
                        'and --emb?')
    if manifest.get('format_version') != FORMAT_VERSION:
        raise DataError(f'{folder}: written by data format {manifest.get("format_version")}, this code reads '
                        f'format {FORMAT_VERSION}. {remedy}')
    missing = [name for name in manifest['outputs'] if not os.path.exists(os.path.join(folder, name))]
    if missing:
        raise DataError(f'{os.path.join(folder, missing[0])} is missing. {remedy}')
    # the fingerprint is the hash of every file: one edited or replaced since data.py wrote it is refused
    if folder_fingerprint(folder, manifest['outputs']) != manifest['fingerprint']:
        raise DataError(f'{folder}: its files have changed since data.py wrote them. {remedy}')
    arrays = {n: np.load(f'{folder}/{n}.npy') for n in ['sequences', 'offsets', 'eval_negatives']}
    return Processed(folder, manifest['fingerprint'], manifest['stats'], **arrays)


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--raw', required=True, help='folder with the original release files')
    p.add_argument('--out', required=True, help='processed folder to write (reused when unchanged)')
    p.add_argument('--min-user', type=int, default=5, help='k-core: least interactions per user')
    p.add_argument('--min-item', type=int, default=5, help='k-core: least interactions per item')
    p.add_argument('--kcore', default='iterative', choices=['iterative', 'once'],
                   help="iterative: until every user and item has its minimum; once: one pass, then users "
                        "with fewer than 3 dropped (the official code's filter, the paper's statistics)")
    p.add_argument('--sample-users', type=float, default=1.0, metavar='F',
                   help='keep a random share F of users, each whole, before the k-core (seeded by --seed)')
    p.add_argument('--columns', metavar='USER,ITEM[,TIME]', type=lambda v: v.split(','),
                   help='column names in a CSV, TSV or RecBole header (default user_id,item_id[,timestamp])')
    p.add_argument('--strict', action='store_true', help='fail on the first malformed line')
    p.add_argument('--max-bad', type=float, default=0.01, help='fail past this share of malformed lines')
    p.add_argument('--max-value-chars', type=int, default=300, help='cut each attribute value to this length')
    p.add_argument('--user-text-chars', type=int, default=1000, help='user prompt length; oldest cut first')
    p.add_argument('--eval-negatives', type=int, default=100, help='negatives per user, sampled protocol')
    p.add_argument('--seed', type=int, default=42, help='seed of the evaluation negatives and --sample-users')
    p.add_argument('--overwrite', action='store_true',
                   help='replace a processed --out made from other inputs or settings (or rebuild it)')
    args = p.parse_args(argv)
    if args.columns and not (2 <= len(args.columns) <= 3 and all(args.columns)):
        p.error(f'--columns {",".join(args.columns)}: give USER,ITEM or USER,ITEM,TIME, names in the header')
    at_least(p, args, 1, 'min_user', 'min_item', 'max_value_chars', 'user_text_chars', 'eval_negatives')
    if not (0 < args.sample_users <= 1 and 0 <= args.max_bad <= 1):
        p.error('--sample-users takes a share of users in (0, 1], --max-bad a share in [0, 1]')
    args.out = os.path.realpath(args.out)                          # a link or a trailing slash: the folder
    held = or_exit(guard_out, args.out, 'processed data', {'--raw': args.raw})   # before anything is read
    or_exit(lock(args.out)(build), args, held)                    # build() holding --out's lock


def build(args, held):
    """Process --raw into --out; `held`: guard_out() found a processed folder there already."""
    layout = detect_layout(args.raw, args.columns)
    if layout.name == 'llmesr':
        print("note: the authors' files are filtered already; no k-core (--min-user 3 --min-item 1)")
        args.min_user, args.min_item = 3, 1
    missing = [path for path in (layout.reviews, layout.meta) if path and not os.path.exists(path)]
    if missing:
        raise DataError(f'{missing[0]}: file is missing. Put the original file there, or fetch it with '
                        f'`python experiments/download.py <NAME> {args.raw}` (NAME like amazon2014-Beauty).')
    config = {k: getattr(args, k) for k in ['min_user', 'min_item', 'kcore', 'sample_users',
                                            'max_value_chars', 'user_text_chars', 'eval_negatives', 'seed']}
    config.update({'columns': args.columns} if args.columns else {})
    inputs = [{'path': os.path.abspath(p), 'bytes': os.path.getsize(p), 'sha256': sha256_file(p)}
              for p in (layout.reviews, layout.meta, *layout.also) if p]
    # `key` decides whether a folder may be reused: same inputs, config and code (this file's source,
    # so a change in how prompts are rendered rebuilds). `fingerprint` is a hash of what was
    # written; embeddings and runs check it, so they follow the content, not the code.
    key = sha256_json({'format_version': FORMAT_VERSION, 'config': config, 'layout': layout.name,
                       'inputs': [i['sha256'] for i in inputs], 'code': sha256_file(__file__)})
    old = {}
    if held and not args.overwrite:
        old = read_json(os.path.join(args.out, 'manifest.json'), 'processed-data manifest',
                        'Replace the folder with --overwrite, or give a new folder as --out.')
        if old.get('key') == key:
            s = old['stats']
            print(f'{args.out} is up to date: {s["users"]:,} users, {s["items"]:,} items, '
                  f'{s["interactions"]:,} interactions')
            return
    args.tmp = f'{args.out.rstrip("/")}.tmp-{os.getpid()}'
    try:
        stats = process(layout, args)
        outputs = sorted(os.listdir(args.tmp))
        fingerprint = folder_fingerprint(args.tmp, outputs)
        if old and old.get('fingerprint') != fingerprint:          # other code alone may rebuild the same
            raise DataError(f'--out {args.out} holds other processed data (made from other inputs, settings '
                            'or code); replace it with --overwrite, or give a new folder as --out.')
        write_json_atomic(os.path.join(args.tmp, 'manifest.json'), {
            'format_version': FORMAT_VERSION, 'key': key, 'fingerprint': fingerprint, 'layout': layout.name,
            'config': config, 'inputs': inputs, 'outputs': outputs, 'stats': stats,
            'command': ' '.join(sys.argv)})
        replace_dir(args.tmp, args.out)
    finally:
        shutil.rmtree(args.tmp, ignore_errors=True)
    print(f'wrote {args.out}: {stats["users"]:,} users, {stats["items"]:,} items, '
          f'{stats["interactions"]:,} interactions; head items have >= {stats["item_threshold"]} training '
          f'interactions ({stats["head_items"]:,}), head users >= {stats["user_threshold"]} training items '
          f'({stats["head_users"]:,})')


if __name__ == '__main__':
    main()

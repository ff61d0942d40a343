"""Tools across finished runs: a table of seeds, paired t-tests over users, accuracy by popularity.

    python experiments/compare.py --report runs/*/results.json        # mean ± std over seeds, per variant
    python experiments/compare.py --paired runs/llmesr runs/sasrec --group tail_item   # A,B,C for seeds
    python experiments/compare.py --plot longtail.png runs/sasrec runs/llmesr   # NDCG@10 by popularity
    python experiments/compare.py --table runs/sasrec runs/llminit runs/llmesr  # per group, paired t

Runs are pooled as seeds of one variant only when they trained the same thing: every setting that
changes results agrees (variant() names the ones off their defaults), and they read the same
processed data and embeddings (by hash). One run is never counted twice. Groups are eval.py's
(GROUPS); a run evaluated before a group existed lacks it (experiments/regroup.py adds it from the
run's test ranks). --plot needs matplotlib (pip install matplotlib).
"""
import argparse
import json
import math
import os
import sys
import zipfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import DataError, load_processed, or_exit, read_json, run_path, write_atomic  # noqa: E402
from eval import BUCKETS, GROUPS, PARETO, group_masks  # noqa: E402
from model import LEGACY  # noqa: E402
from train import get_args  # noqa: E402

DEFAULTS = vars(get_args(['--data', '-', '--out', '-'])[0])
# settings that do not change what a run learns, or that name its inputs (compared by hash instead)
NOT_VARIANT = {'data', 'emb', 'out', 'seed', 'device', 'threads', 'eval_batch', 'eval_memory', 'log_every',
               'compile', 'resume', 'overwrite', 'emb_id', 'data_fingerprint', 'ks', 'tail_item_below',
               'tail_user_below'}
LLMESR_ONLY = {'semantic', 'collaborative', 'cross', 'shared_encoder', 'pca_init', 'adapter_layers',
               'cross_heads', 'alpha', 'n_similar', 'teacher', 'cross_mask', 'cross_residual'}
# flags of older train.py versions: retired ones with their default, negated ones with today's name
RETIRED = {'teacher': 'table', 'cross_mask': 'causal', 'cross_residual': False, 'sort_pool': 0,
           'logit_adjust': 0.0}
NEGATED = {'no_semantic': 'semantic', 'no_collaborative': 'collaborative', 'no_cross': 'cross',
           'split_encoder': 'shared_encoder', 'random_init': 'pca_init'}


def settings(config):
    """{setting: value} of what a run trained, old configs read as today's flags, inputs left out."""
    config = {NEGATED.get(k, k): (not v if k in NEGATED else v) for k, v in config.items()}
    full = {**DEFAULTS, **LEGACY, **RETIRED, **config}
    ignored = {'base': LLMESR_ONLY | {'lm_scale'}, 'llminit': LLMESR_ONLY}.get(full['method'], set())
    ignored |= {'mask_prob'} if full['backbone'] != 'bert4rec' else set()
    ignored |= {'negatives'} if full['loss'] != 'sampled' else set()
    return {k: v for k, v in full.items() if k not in NOT_VARIANT | ignored}


def variant(config):
    """A readable name: method (backbone) and the flags, as typed, of every setting off its default."""
    s = settings(config)
    default = {**DEFAULTS, **RETIRED}
    flags = []
    for key in sorted(k for k in s if k not in ('method', 'backbone') and s[k] != default.get(k)):
        name = '--' + key.replace('_', '-')
        flags.append(name if s[key] is True else f'--no-{key.replace("_", "-")}' if s[key] is False
                     else f'{name} {s[key]}')
    return f'{s["method"]} ({s["backbone"]})' + ''.join(f' {f}' for f in flags)


def mean_std(values):
    """(mean, sample standard deviation); the deviation is 0 for one value."""
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def load_results(paths):
    """[(path, results)] of the readable results.json among `paths` (a run folder names its file); a
    note on stderr for each skipped one: unfinished, corrupt, or a run already given."""
    out, seen = [], set()
    for path in paths:
        path = os.path.join(path, 'results.json') if os.path.isdir(path) else path
        if not os.path.exists(path):
            print(f'note: skipped {path}: no results yet (a run still training?)', file=sys.stderr)
            continue
        if os.path.realpath(path) in seen:
            print(f'note: skipped {path}: given twice', file=sys.stderr)
            continue
        try:
            res = read_json(path, 'results', '')
            res['config']['seed'], res['test']['full']['overall']
        except (DataError, KeyError, TypeError) as e:
            print(f'note: skipped {path}: corrupt ({e})', file=sys.stderr)
            continue
        seen.add(os.path.realpath(path))
        out.append((path, res))
    return out


def report(paths, k=10):
    """Markdown: per variant and protocol, HR@k and NDCG@k of the Pareto groups, mean ± std over seeds,
    then NDCG@k of the paper's groups and the popularity buckets.

    Seeds are pooled only when the runs read the same data and the same embeddings (by hash), so runs
    on fine-tuned and frozen LM embeddings, or on two datasets, are never averaged together.
    """
    runs = {}
    for path, res in load_results(paths):
        key = (variant(res['config']), res.get('data_fingerprint'), res['config'].get('emb_id'))
        if f'NDCG@{k}' not in res['test']['full']['overall']:
            print(f'note: skipped {path}: it has no cut-off {k} (--ks)', file=sys.stderr)
            continue
        same = [p for p, r in runs.get(key, []) if r['config']['seed'] == res['config']['seed']]
        if same:
            print(f'note: skipped {path}: seed {res["config"]["seed"]} of this variant is {same[0]}',
                  file=sys.stderr)
            continue
        runs.setdefault(key, []).append((path, res))
    name = lambda p: os.path.basename(os.path.normpath(p)) if p else '?'  # noqa: E731
    tables = []
    for groups, metric_names in ((PARETO, (f'HR@{k}', f'NDCG@{k}')),
                                 ([g for g in GROUPS if g not in PARETO], (f'NDCG@{k}',))):
        cols = [f'{g} {m}' for g in groups for m in metric_names]
        lines = ['| variant | data, embeddings | seeds | protocol | ' + ' | '.join(cols) + ' | s/epoch | commits |',
                 '|---|---|---:|---|' + '---:|' * (len(cols) + 1) + '---|']
        for (variant_name, *_), results in runs.items():
            c = results[0][1]['config']
            read = name(c.get('data')) + (f', {name(c.get("emb"))}' if c.get('emb_id') else '')
            seeds = ', '.join(str(r['config']['seed']) for _, r in results)
            commits = ', '.join(sorted({(r.get('commit') or '?')[:7] for _, r in results}))
            seconds = np.median([s for _, r in results for s in r['epoch_seconds']])
            for protocol in ('full', 'sampled'):
                cells = []
                for g in groups:
                    for metric in metric_names:
                        values = [r['test'][protocol].get(g, {}).get(metric) for _, r in results]
                        if None in values:
                            cells.append('-')
                            continue
                        m, sd = mean_std(values)
                        cells.append(f'{m:.4f} ± {sd:.4f}' if len(values) > 1 else f'{m:.4f}')
                lines.append(f'| {variant_name} | {read} | {seeds} | {protocol} | {" | ".join(cells)} '
                             f'| {seconds:.1f} | {commits} |')
        tables.append('\n'.join(lines))
    return '\n\n'.join(tables) + '\n'


def user_ndcg(run_folders, k=10, protocol='full'):
    """(U,) each user's test NDCG@k under `protocol`, averaged over the runs (seeds) given."""
    ranks = []
    for folder in run_folders:
        path = os.path.join(folder, 'test_ranks.npz')
        if not os.path.exists(path):
            raise DataError(f'{path}: no test ranks yet; --paired needs finished runs ({folder} training?)')
        try:
            ranks.append(np.load(path)[protocol])
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise DataError(f'{path} is corrupt ({e}); evaluate the run again with eval.py --run.') from e
    if len({len(r) for r in ranks}) > 1:
        raise DataError(f'{", ".join(run_folders)}: the runs ranked different numbers of users; one dataset.')
    ranks = np.stack(ranks)                                        # (S, U)
    return ((ranks < k) / np.log2(ranks + 2)).mean(0)


def side(runs):
    """(config of the first run, data fingerprint) of one side of --paired, after checking that its
    runs are seeds of one variant on one dataset."""
    results = [read_json(os.path.join(r, 'results.json'), 'results', f'Train first: python train.py ... '
                         f'--out {r}') for r in runs]
    for r, res in zip(runs[1:], results[1:]):
        a, b = settings(results[0]['config']), settings(res['config'])
        differ = sorted(key for key in set(a) | set(b) if a.get(key) != b.get(key))
        other_emb = res['config'].get('emb_id') != results[0]['config'].get('emb_id')
        if differ or other_emb or res.get('data_fingerprint') != results[0].get('data_fingerprint'):
            raise DataError(f'--paired: {r} is not a seed of {runs[0]}: ' +
                            (', '.join(f'{key} {b.get(key)!r} against {a.get(key)!r}' for key in differ)
                             or ('other embeddings (emb_id)' if other_emb else 'other processed data')) +
                            '. Give seeds of one variant per side.')
    seeds = [res['config']['seed'] for res in results]
    if len(set(seeds)) < len(seeds):
        raise DataError(f'--paired: a seed is given twice on one side ({", ".join(runs)}).')
    return results[0]['config'], results[0].get('data_fingerprint')


def groups_of_run(run, config):
    """{group: (U,) bool} of the test users, for the data that `run` (its `config`) was trained on."""
    data = load_processed(run_path(config['data'], run))
    return group_masks(data, data.target(1), config.get('tail_item_below', 4),
                       config.get('tail_user_below', 9))


def paired_test(a, b):
    """Paired comparison of per-user scores a and b (U,): mean difference, t statistic, two-sided p.

    With thousands of users the t statistic is close to normal, so p uses the normal tail. When every
    difference is the same, t is undefined: None.
    """
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    sd = d.std(ddof=1) if len(d) > 1 else 0.0
    t = d.mean() / (sd / math.sqrt(len(d))) if sd > 0 else None
    return {'users': len(d), 'mean_a': float(np.mean(a)), 'mean_b': float(np.mean(b)),
            'mean_difference': float(d.mean()), 't': None if t is None else float(t),
            'p_two_sided': None if t is None else math.erfc(abs(t) / math.sqrt(2))}


class EmptyGroup(DataError):
    """--paired over a group that holds no test user of the data."""


def paired(a_runs, b_runs, group, k=10, protocol='full'):
    (config, fingerprint), (_, other) = side(a_runs), side(b_runs)
    if fingerprint != other:
        raise DataError('--paired: the two sides were trained on different processed data; use one dataset.')
    users = groups_of_run(a_runs[0], config)[group]
    if not users.any():
        raise EmptyGroup(f'--group {group}: no test user of this data is in it; choose another group.')
    return {'group': group, 'protocol': protocol,
            **paired_test(user_ndcg(a_runs, k, protocol)[users], user_ndcg(b_runs, k, protocol)[users])}


def table(sides, groups, k=10, protocol='full'):
    """Markdown: NDCG@k of each side (comma-separated seeds, averaged per user) in each group, and the
    paired t over that group's users of every side after the first against the first."""
    checked, ndcg = [side(runs) for runs in sides], {}
    config, fingerprint = checked[0]
    for runs, (_, other) in zip(sides, checked):
        if other != fingerprint:
            raise DataError(f'--table: {runs[0]} was trained on other processed data than {sides[0][0]}.')
        ndcg[','.join(runs)] = user_ndcg(runs, k, protocol)
    every = groups_of_run(sides[0][0], config)                     # the data is read and hashed once
    masks = {g: every[g] for g in groups}
    lines = ['| runs | ' + ' | '.join(f'{g} ({masks[g].sum():,})' for g in groups) + ' |',
             '|---|' + '---:|' * len(groups)]
    base = ndcg[','.join(sides[0])]
    for name, values in ndcg.items():
        cells = []
        for g in groups:
            m = masks[g]
            t = paired_test(values[m], base[m])['t'] if m.sum() > 1 and values is not base else None
            cells.append(f'{values[m].mean():.4f}' + (f' (t {t:+.2f})' if t is not None else '') if m.any() else '-')
        lines.append(f'| {name} | {" | ".join(cells)} |')
    return '\n'.join(lines) + '\n'


def plot(path, runs, k=10):
    """NDCG@k by the target's training popularity (eval.py's buckets), from each run's results.json:
    a text table, and a PNG at `path`."""
    if os.path.exists(path):
        raise DataError(f'--plot {path} exists and is never written over; give a new file name.')
    rows = {}
    for run, res in load_results(runs):
        full = res['test']['full']
        if any(b not in full for b in BUCKETS):
            raise DataError(f'{run} has no popularity buckets; add them with '
                            f'`python experiments/regroup.py {os.path.dirname(run)}`.')
        rows[os.path.basename(os.path.dirname(run))] = [full[b][f'NDCG@{k}'] for b in BUCKETS]
    users = [full[b]['users'] for b in BUCKETS]
    text = '\n'.join([f'| run | {" | ".join(BUCKETS)} |', '|---|' + '---:|' * len(BUCKETS),
                      *(f'| {name} | {" | ".join("-" if v is None else f"{v:.4f}" for v in values)} |'
                        for name, values in rows.items()),
                      f'| test users | {" | ".join(str(u) for u in users)} |'])
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        raise DataError(f'--plot {path} needs matplotlib (pip install matplotlib); the same numbers as '
                        f'text:\n{text}') from None
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(1, len(rows))
    for j, (name, values) in enumerate(rows.items()):
        ax.bar(np.arange(len(BUCKETS)) + j * width, [np.nan if v is None else v for v in values], width,
               label=name)
    ax.set(title=f'NDCG@{k} by the target\'s training interactions', xticks=np.arange(len(BUCKETS)),
           xticklabels=[b[4:] for b in BUCKETS], ylabel=f'NDCG@{k}')
    ax.legend()
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format='png', dpi=100))
    return text + f'\nwrote {path}'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument('--report', nargs='+', metavar='RESULTS', help='results.json files or run folders')
    how.add_argument('--paired', nargs=2, metavar=('RUNS_A', 'RUNS_B'),
                     help='paired t over users of test NDCG@K (full ranking) between two comma-separated '
                          'lists of run folders (seeds averaged per user)')
    how.add_argument('--plot', nargs='+', metavar=('PNG', 'RUN'), help='a PNG file, then run folders')
    how.add_argument('--table', nargs='+', metavar='RUNS', help='comma-separated seeds per variant, the first '
                     'the baseline: NDCG@K per group (--groups) with paired t against the baseline')
    p.add_argument('--groups', nargs='+', default=list(BUCKETS), choices=GROUPS, help='the groups of --table')
    p.add_argument('--group', default='overall', choices=GROUPS, help='users that --paired compares')
    p.add_argument('--k', type=int, default=10, help='the cut-off K')
    p.add_argument('--protocol', default='full', choices=['full', 'sampled'],
                   help='--paired and --table: full ranking, or the 100 stored negatives')
    args = p.parse_args(argv)
    if args.k < 1:
        p.error(f'--k {args.k}: give a cut-off of at least 1')
    if args.report:
        print(report(args.report, args.k))
    elif args.table:
        print(or_exit(table, [s.split(',') for s in args.table], args.groups, args.k, args.protocol))
    elif args.paired:
        a, b = (s.split(',') for s in args.paired)
        print(json.dumps(or_exit(paired, a, b, args.group, args.k, args.protocol), indent=1))
    else:
        if len(args.plot) < 2:
            p.error('--plot takes a PNG file and at least one run folder')
        print(or_exit(plot, args.plot[0], args.plot[1:], args.k))


if __name__ == '__main__':
    main()

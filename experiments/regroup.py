"""Add the groups a finished run lacks (the paper's groups, popularity buckets) from its test ranks.

    python experiments/regroup.py --data processed/beauty results/beauty/*/
    python experiments/regroup.py --data processed/clothing --tail-user-below 3 results/clothing/*/

Every run stores each user's 0-based test rank under both protocols (test_ranks.npz), so a group
defined after it ran costs no training: its metrics are computed from those ranks and the
processed data the run read (checked by fingerprint), and added to results.json beside the groups
it has, which are left as they were. results.json records what was added, with which thresholds
and at which commit ('regrouped'). A run that has every group is left untouched.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import DataError, git_commit, load_processed, or_exit, read_json, write_json_atomic  # noqa: E402
from eval import group_masks, results_of  # noqa: E402


def regroup(run, data, tail_item_below, tail_user_below):
    """Add the missing groups to <run>/results.json; the names of the groups added."""
    path = os.path.join(run, 'results.json')
    res = read_json(path, 'results', 'Only finished runs can be regrouped.')
    if res.get('data_fingerprint') != data.fingerprint:
        raise DataError(f'{run} was trained on other processed data than {data.folder}; give its --data.')
    with np.load(os.path.join(run, 'test_ranks.npz')) as f:
        ranks = {'full': f['full'], 'sampled': f['sampled']}
    ks = res['config'].get('ks', [10])
    groups = group_masks(data, data.target(1), tail_item_below, tail_user_below)
    missing = [g for g in groups if g not in res['test']['full']]
    if not missing:
        return []
    added = results_of(ranks, {g: groups[g] for g in missing}, ks)
    for protocol in res['test']:
        res['test'][protocol].update(added[protocol])
    res.setdefault('regrouped', []).append({'groups': missing, 'tail_item_below': tail_item_below,
                                            'tail_user_below': tail_user_below, 'commit': git_commit(),
                                            'command': ' '.join(sys.argv)})
    write_json_atomic(path, res)
    return missing


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('runs', nargs='+', help='finished run folders')
    p.add_argument('--data', required=True, help='the processed folder the runs were trained on')
    p.add_argument('--tail-item-below', type=int, default=4, help='as train.py (Beauty, Fashion: 4; Yelp: 13)')
    p.add_argument('--tail-user-below', type=int, default=9, help='as train.py (Beauty: 9; Fashion: 3; Yelp: 12)')
    args = p.parse_args(argv)
    data = or_exit(load_processed, args.data)
    for run in args.runs:
        if not os.path.exists(os.path.join(run, 'test_ranks.npz')):
            print(f'note: skipped {run}: no test ranks', file=sys.stderr)
            continue
        added = or_exit(regroup, run, data, args.tail_item_below, args.tail_user_below)
        print(f'{run}: added {", ".join(added)}' if added else f'{run}: has every group')


if __name__ == '__main__':
    main()

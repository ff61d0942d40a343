"""Issue 26's verdicts from the committed runs: each paper's claims under each condition, and the LM's
own effect with everything else held.

    python experiments/verdicts.py                  # reads results/, prints RESULTS.md's three tables

A cell is one paired comparison of test NDCG@10 over the users of a group, as `compare.py --paired A B
--group G [--protocol sampled]` makes it: each side's finished seeds (of 42, 43, 44) averaged per user,
the relative change of the mean, and the paired t. "held" needs t > 1.96 in the claimed direction
(p < 0.05, two-sided normal tail); a side with no finished seed reads "not run yet". Tail items are the
official code's group (total popularity below 4) on sparse Beauty; on the 5-core that group is empty,
so its cells use the Pareto tail, as `paper_table.py` does. The processed data must be there (the
groups are read from it): `python data.py ...` as RESULTS.md says.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from compare import EmptyGroup, paired  # noqa: E402
from data import or_exit  # noqa: E402
from paper_table import SEEDS, finished, results_folder  # noqa: E402

DATASETS = {'dense': 'beauty', 'sparse': 'beauty-sparse'}
TAIL_ITEMS = {'beauty': 'tail_item', 'beauty-sparse': 'tail_item_paper'}
PROTOCOLS = {'100 negatives': 'sampled', 'full ranking': 'full'}
HELD = 1.96

# LLM-ESR against SASRec trained the same way: (column, dataset, LLM-ESR's runs, SASRec's runs)
LLMESR_COLUMNS = [
    ('dense, official regime, MiniLM', 'beauty', 'sasrec-llmesr-official', 'sasrec-base-official'),
    ('dense, cross-entropy, MiniLM', 'beauty', 'sasrec-llmesr-ce-lmscale', 'sasrec-base-ce'),
    ('dense, cross-entropy, MPNet', 'beauty', 'sasrec-llmesr-ce-mpnet', 'sasrec-base-ce'),
    ('sparse, official regime, MiniLM', 'beauty-sparse', 'sasrec-llmesr-official-lmscale', 'sasrec-base-official'),
    ('sparse, official regime, MPNet', 'beauty-sparse', 'sasrec-llmesr-official-mpnet', 'sasrec-base-official'),
    ('sparse, cross-entropy, MiniLM', 'beauty-sparse', 'sasrec-llmesr-ce-lmscale', 'sasrec-base-ce'),
    ('sparse, cross-entropy, MPNet', 'beauty-sparse', 'sasrec-llmesr-ce-mpnet', 'sasrec-base-ce')]
# (claim, group: 'tail' is the dataset's tail items)
LLMESR_CLAIMS = [('better overall', 'overall'), ('gain on tail items, the largest', 'tail'),
                 ('gain on tail users', 'tail_user_paper')]
# the other papers' claims, cross-entropy, on either dataset: (claim, A, B, group)
OTHER_CLAIMS = [
    ('LLM-CFSR: tuning lifts accuracy over LLM-ESR (overall)', 'sasrec-cfsr-ce-cft', 'sasrec-llmesr-ce-lmscale',
     'overall'),
    ('LLM-CFSR: ... and on tail items', 'sasrec-cfsr-ce-cft', 'sasrec-llmesr-ce-lmscale', 'tail'),
    ("tuning lifts LLM-CFSR's own model (overall)", 'sasrec-cfsr-ce-cft', 'sasrec-cfsr-ce-lmscale', 'overall'),
    ('a stronger LM lifts LLM-ESR (overall)', 'sasrec-llmesr-ce-mpnet', 'sasrec-llmesr-ce-lmscale', 'overall'),
    ('a stronger LM lifts LLM-ESR (tail items)', 'sasrec-llmesr-ce-mpnet', 'sasrec-llmesr-ce-lmscale', 'tail'),
    ('a stronger LM lifts LLMInit (overall)', 'sasrec-llminit-ce-mpnet', 'sasrec-llminit-ce-lmscale', 'overall'),
    ('a stronger LM lifts LLMInit (tail items)', 'sasrec-llminit-ce-mpnet', 'sasrec-llminit-ce-lmscale', 'tail')]
# the LM's own effect: (row, A, B, datasets it was run on); a row of None is a heading
EFFECTS = [
    ('*a stronger LM: MPNet against MiniLM*', None, None, ()),
    ('LLMInit', 'sasrec-llminit-ce-mpnet', 'sasrec-llminit-ce-lmscale', ('beauty', 'beauty-sparse')),
    ('the recipe', 'sasrec-llmesr-ce-nocross-mpnet', 'sasrec-llmesr-ce-nocross-lmscale', ('beauty', 'beauty-sparse')),
    ('LLM-ESR', 'sasrec-llmesr-ce-mpnet', 'sasrec-llmesr-ce-lmscale', ('beauty', 'beauty-sparse')),
    ('LLM-ESR, official regime', 'sasrec-llmesr-official-mpnet', 'sasrec-llmesr-official-lmscale', ('beauty-sparse',)),
    ('*contrastive tuning: tuned against untuned MiniLM*', None, None, ()),
    ('LLMInit', 'sasrec-llminit-ce-cft', 'sasrec-llminit-ce-lmscale', ('beauty', 'beauty-sparse')),
    ('LLM-ESR', 'sasrec-llmesr-ce-cft', 'sasrec-llmesr-ce-lmscale', ('beauty', 'beauty-sparse')),
    ("LLM-CFSR's model", 'sasrec-cfsr-ce-cft', 'sasrec-cfsr-ce-lmscale', ('beauty', 'beauty-sparse')),
    ('*LLM-CFSR against its peers*', None, None, ()),
    ('LLM-CFSR against LLM-ESR, untuned MiniLM (the paper\'s comparison)', 'sasrec-cfsr-ce-cft',
     'sasrec-llmesr-ce-lmscale', ('beauty', 'beauty-sparse')),
    ('LLM-CFSR against LLM-ESR, both tuned', 'sasrec-cfsr-ce-cft', 'sasrec-llmesr-ce-cft', ('beauty', 'beauty-sparse')),
    ('LLM-CFSR against LLMInit, both tuned', 'sasrec-cfsr-ce-cft', 'sasrec-llminit-ce-cft', ('beauty', 'beauty-sparse'))]


class Runs:
    """The committed runs under `results`."""

    def __init__(self, results):
        self.results = results

    def seeds(self, dataset, name):
        """The run folders of `name`'s finished seeds on `dataset`."""
        return finished(self.results, dataset, name)

    def compare(self, dataset, a, b, group, protocol):
        """{'change', 't', 'seeds'} of runs `a` against runs `b` (names) in `group` ('empty': True when
        no test user is in it), or None when a side has no finished seed."""
        sides = self.seeds(dataset, a), self.seeds(dataset, b)
        if not all(sides):
            return None
        seeds = len(sides[0]), len(sides[1])
        try:
            test = paired(*sides, TAIL_ITEMS[dataset] if group == 'tail' else group, protocol=protocol)
        except EmptyGroup:
            return {'change': None, 't': None, 'seeds': seeds, 'empty': True}
        return {'change': test['mean_a'] / test['mean_b'] - 1 if test['mean_b'] else None, 't': test['t'],
                'seeds': seeds}


def effect(c):
    """'+30%, t +28.1' (fewer seeds than three on a side: named after it), or why there is none."""
    if c is None or c.get('empty'):
        return 'not run yet' if c is None else 'no test user in the group'
    change = '–' if c['change'] is None else f'{100 * c["change"]:+.0f}%'
    t = '–' if c['t'] is None else f'{c["t"]:+.1f}'
    seeds = '' if c['seeds'] == (len(SEEDS),) * 2 else ' ({} / {} seeds)'.format(*c['seeds'])
    return f'{change}, t {t}{seeds}'


def verdict(c, overall=None):
    """'**held**: +30%, t +28.1' or 'not held: ...'; with `overall` (the same comparison over every
    user), a held tail-item gain smaller than the overall one says so."""
    if c is None or c.get('empty'):
        return effect(c)
    held = c['t'] is not None and c['t'] > HELD
    smaller = held and overall and None not in (c['change'], overall['change']) and c['change'] < overall['change']
    return ('**held**, but smaller than overall' if smaller else '**held**' if held else 'not held') + \
        f': {effect(c)}'


def llmesr_table(runs):
    lines = ['| claim (protocol) | ' + ' | '.join(col for col, *_ in LLMESR_COLUMNS) + ' |',
             '|---|' + '---|' * len(LLMESR_COLUMNS)]
    for claim, group in LLMESR_CLAIMS:
        for label, protocol in PROTOCOLS.items():
            cells = []
            for _, dataset, a, b in LLMESR_COLUMNS:
                c = runs.compare(dataset, a, b, group, protocol)
                overall = runs.compare(dataset, a, b, 'overall', protocol) if group == 'tail' and c else None
                cells.append(verdict(c, overall))
            lines.append(f'| LLM-ESR: {claim} ({label}) | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def other_table(runs):
    columns = [(f'{name}, {label}', dataset, protocol) for name, dataset in DATASETS.items()
               for label, protocol in PROTOCOLS.items()]
    lines = ['| claim (cross-entropy) | ' + ' | '.join(col for col, *_ in columns) + ' |',
             '|---|' + '---|' * len(columns)]
    for claim, a, b, group in OTHER_CLAIMS:
        lines.append(f'| {claim} | ' + ' | '.join(verdict(runs.compare(dataset, a, b, group, protocol))
                                               for _, dataset, protocol in columns) + ' |')
    return '\n'.join(lines)


def effects_table(runs):
    cells = [(p, g) for p in ('full', 'sampled') for g in ('overall', 'tail')]
    lines = []
    for name, dataset in DATASETS.items():
        lines += [f'| A against B ({name} Beauty, cross-entropy unless named) | full: overall | full: tail '
                  'items | 100 negatives: overall | 100 negatives: tail items |', '|---|---:|---:|---:|---:|']
        for row, a, b, datasets in EFFECTS:
            if a is None:
                lines.append(f'| {row} | | | | |')
            elif dataset in datasets:
                compared = [runs.compare(dataset, a, b, g, p) for p, g in cells]
                lines.append(f'| {row} | ' + ' | '.join(effect(c) for c in compared) + ' |')
        lines.append('')
    return '\n'.join(lines).rstrip()


def main(argv=None):
    runs = Runs(results_folder(__doc__, argv))
    for title, make in (("LLM-ESR's claims, against SASRec trained the same way", llmesr_table),
                        ("LLM-CFSR's claims and the stronger LM's", other_table),
                        ("The LM's own effect, everything else held", effects_table)):
        print(f'{title}:\n\n{or_exit(make, runs)}\n')


if __name__ == '__main__':
    main()

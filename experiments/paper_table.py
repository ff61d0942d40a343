"""The paper's Table 1 (Beauty, SASRec backbone) beside every condition run here (issue 26).

    python experiments/paper_table.py               # reads results/, prints a Markdown table

Each row is the mean over the seeds that have finished (42, 43, 44) of the test HR@10 / NDCG@10 in
the run folders' results.json; a condition with no finished seed reads "not run yet". Tail items
are the official code's (total popularity below 4) on sparse Beauty; on the 5-core that group is
empty, so its rows use the Pareto tail (the items outside the 20% most popular in training).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from compare import side  # noqa: E402
from data import or_exit, read_json  # noqa: E402

# LLM-ESR (arXiv 2405.20646), Table 1, Beauty, SASRec: HR@10 / NDCG@10 with 100 sampled negatives,
# as quoted in third-party notes (not checked against the paper here: no internet)
PAPER = [('paper: SASRec (its Beauty, ada-002)', '0.4388 / 0.3030', '0.0870 / 0.0649'),
         ('paper: LLM-ESR', '0.5672 / 0.3713', '0.2257 / 0.1108')]
SEEDS = (42, 43, 44)
# the cross-entropy conditions, on either dataset: (row label, run name without -s<seed>)
CROSS_ENTROPY = [
    ('SASRec', 'sasrec-base-ce'),
    ('LLMInit, MiniLM', 'sasrec-llminit-ce-lmscale'),
    ('LLMInit, MPNet', 'sasrec-llminit-ce-mpnet'),
    ('LLMInit, tuned MiniLM', 'sasrec-llminit-ce-cft'),
    ('the recipe, MiniLM', 'sasrec-llmesr-ce-nocross-lmscale'),
    ('the recipe, MPNet', 'sasrec-llmesr-ce-nocross-mpnet'),
    ('LLM-ESR, MiniLM', 'sasrec-llmesr-ce-lmscale'),
    ('LLM-ESR, MPNet', 'sasrec-llmesr-ce-mpnet'),
    ('LLM-ESR, tuned MiniLM', 'sasrec-llmesr-ce-cft'),
    ('LLM-CFSR, tuned MiniLM', 'sasrec-cfsr-ce-cft'),
    ("LLM-CFSR's model, untuned MiniLM", 'sasrec-cfsr-ce-lmscale')]
# Conditions read on one dataset from runs of another name, once those have every seed (RESULTS.md). The
# 5-core's MiniLM was tuned twice by one command, on an AVX-512 and then an AVX2 CPU; the two are not
# bit-identical, so their seeds never pool, and only the second could be given all three seeds. Its
# bfloat16 MPNet table (AVX-512) cannot be remade on an AVX2 CPU in a session: MPNet runs again on a
# float32 one. The runs they replace stay under the plain names.
STAND_INS = {**{('beauty', f'sasrec-{m}-ce-cft'): f'sasrec-{m}-ce-cft-retuned' for m in ('cfsr', 'llminit', 'llmesr')},
             **{('beauty', f'sasrec-{m}-mpnet'): f'sasrec-{m}-mpnet-fp32'
                for m in ('llminit-ce', 'llmesr-ce-nocross', 'llmesr-ce')}}
# (heading, dataset folder under results/, its tail-item group, [(row label, run name)])
CONDITIONS = [
    ('dense Beauty (5-core), official regime', 'beauty', 'tail_item', [
        ('SASRec', 'sasrec-base-official'),
        ('LLM-ESR, MiniLM (LM tables rescaled)', 'sasrec-llmesr-official')]),
    ('dense Beauty, cross-entropy', 'beauty', 'tail_item', CROSS_ENTROPY),
    ('sparse Beauty, official regime', 'beauty-sparse', 'tail_item_paper', [
        ('SASRec', 'sasrec-base-official'),
        ('LLM-ESR, MiniLM', 'sasrec-llmesr-official-lmscale'),
        ('LLM-ESR, MPNet', 'sasrec-llmesr-official-mpnet')]),
    ('sparse Beauty, cross-entropy', 'beauty-sparse', 'tail_item_paper', CROSS_ENTROPY),
]


def row(label, runs, tail):
    """One Markdown row: the seeds, then HR@10 / NDCG@10 averaged over `runs` (their results.json)."""
    if not runs:
        return f'| {label} | not run yet | | | | |'

    def cell(protocol, group):
        mean = {k: sum(r['test'][protocol][group][k] for r in runs) / len(runs) for k in ('HR@10', 'NDCG@10')}
        return f'{mean["HR@10"]:.4f} / {mean["NDCG@10"]:.4f}'
    seeds = ', '.join(str(r['config']['seed']) for r in runs)
    return (f'| {label} | {seeds} | {cell("sampled", "overall")} | {cell("sampled", tail)} | '
            f'{cell("full", "overall")} | {cell("full", tail)} |')


def finished(results, dataset, name):
    """The run folders of `name`'s finished seeds (of SEEDS) on `dataset` under `results`, or of its
    stand-in's there once it has them all."""
    def seeds(name):
        folders = [os.path.join(results, dataset, f'{name}-s{s}') for s in SEEDS]
        return [f for f in folders if os.path.exists(os.path.join(f, 'results.json'))]
    stand_in = seeds(STAND_INS[dataset, name]) if (dataset, name) in STAND_INS else []
    return stand_in if len(stand_in) == len(SEEDS) else seeds(name)


def table(results):
    lines = ['| model | seeds | 100 negatives: overall | 100 negatives: tail items | full: overall | '
             'full: tail items |', '|---|---|---:|---:|---:|---:|',
             *(f'| {label} | | {overall} | {tail} | – | – |' for label, overall, tail in PAPER)]
    for heading, dataset, tail, rows in CONDITIONS:
        lines.append(f'| **{heading}** | | | | | |')
        for label, name in rows:
            folders = finished(results, dataset, name)
            if folders:
                side(folders)                          # seeds of one variant, data and embedding table
            runs = [read_json(os.path.join(f, 'results.json'), 'results', '') for f in folders]
            lines.append(row(label, runs, tail))
    return '\n'.join(lines)


def results_folder(doc, argv):
    """The folder of committed runs named on the command line (results/ when none is)."""
    p = argparse.ArgumentParser(description=doc.split('\n')[0])
    p.add_argument('results', nargs='?', default='results',
                   help='the folder holding the beauty/ and beauty-sparse/ run folders')
    folder = p.parse_args(argv).results
    if not os.path.isdir(folder):
        sys.exit(f'error: {folder} is not a folder; give the folder of committed runs (results/).')
    return folder


def main(argv=None):
    print(or_exit(table, results_folder(__doc__, argv)))


if __name__ == '__main__':
    main()

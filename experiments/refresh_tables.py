"""Put the tables that experiments/verdicts.py and experiments/paper_table.py make from the committed
runs into RESULTS.md, each in place of the table there with the same header row (issue 26).

    python experiments/refresh_tables.py            # rewrites those tables of RESULTS.md from results/
    python experiments/refresh_tables.py --check    # only names the stale ones; exit status 1 if any

A table is found by its header row, which must stand exactly once in the notebook: a new generated
table is pasted in by hand once (from the generator's own output), and from then on this keeps it
current. Nothing but those tables changes; the prose around them is for a person to update.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import paper_table  # noqa: E402
import verdicts  # noqa: E402
from data import DataError, or_exit, write_atomic  # noqa: E402


def tables(text):
    """The Markdown tables of `text`: lists of consecutive lines that start with '|'."""
    found, table = [], []
    for line in text.split('\n') + ['']:
        if line.startswith('|'):
            table.append(line)
        elif table:
            found, table = found + [table], []
    return found


def generated(results):
    """Every table the two generators make from the run folders under `results`."""
    runs = verdicts.Runs(results)
    made = [verdicts.llmesr_table(runs), verdicts.other_table(runs), verdicts.effects_table(runs),
            paper_table.table(results)]
    return [t for text in made for t in tables(text)]


def refresh(text, new, where='RESULTS.md'):
    """(text with each table of `new` in place of the one with its header row, the stale headers)."""
    lines, stale = text.split('\n'), []
    for table in new:
        at = [i for i, line in enumerate(lines) if line == table[0]]
        if len(at) != 1:
            how = ('is not there: paste the generator\'s table in by hand once' if not at else
                   f'stands {len(at)} times (lines {", ".join(str(i + 1) for i in at)}): keep one')
            raise DataError(f'{where}: the table headed "{table[0][:60]}..." {how}.')
        end = at[0]
        while end < len(lines) and lines[end].startswith('|'):
            end += 1
        if lines[at[0]:end] != table:
            lines[at[0]:end] = table
            stale.append(table[0])
    return '\n'.join(lines), stale


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--notebook', default='RESULTS.md', help='the Markdown file whose tables to refresh')
    p.add_argument('--results', default='results', help='the folder of committed runs')
    p.add_argument('--check', action='store_true', help='write nothing; exit 1 if a table is stale')
    args = p.parse_args(argv)
    for path, what in ((args.notebook, 'file'), (args.results, 'folder')):
        if not (os.path.isfile if what == 'file' else os.path.isdir)(path):
            sys.exit(f'error: {path} is not a {what}; run this from the repository root.')
    with open(args.notebook) as f:
        text = f.read()
    new, stale = or_exit(refresh, text, or_exit(generated, args.results), args.notebook)
    for header in stale:
        print(f'{"stale" if args.check else "refreshed"}: {header[:100]}')
    if args.check:
        sys.exit(1 if stale else 0)
    if stale:
        write_atomic(args.notebook, lambda f: f.write(new.encode()))
    print(f'{args.notebook}: {len(stale)} of its generated tables {"refreshed" if stale else "were current"}.')


if __name__ == '__main__':
    main()

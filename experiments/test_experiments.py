"""Tests of experiments/: the benchmarks and diagnostics that import the core.

    python -m pytest -q experiments/test_experiments.py
"""
import json
import math
import os
import pickle
import shutil
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_smoke import (LAYOUTS, ById, amazon2014, fails_cleanly, own_layout, synthetic_log, tiny,  # noqa: E402,F401
                        tiny_emb, tiny_lm, tiny_runs)


def test_bench_runs_its_sections_and_prints_a_table(tiny, tiny_emb, tmp_path, capsys):
    import bench
    out = tmp_path / 'bench.json'
    bench.main(['--data', tiny.folder, '--emb', tiny_emb, '--sections', 'step', 'eval', 'retrieval',
                '--step-batches', '2', '--batch-size', '8', '--max-len', '10', '--d', '16', '--retrieval-users', '3000',
                '--repeats', '1', '--threads', '1', '--out', str(out)])
    res = json.load(open(out))
    for kind in ('sasrec', 'gru4rec', 'bert4rec'):
        for loss in ('bce', 'ce', 'sampled'):
            assert res['step'][f'{kind}/{loss}']['llmesr_over_base_total'] > 0
    assert res['retrieval']['exact_on_subset'] and res['eval']['users'] == tiny.n_users
    assert '| step, bert4rec/ce: LLM-ESR / base' in capsys.readouterr().out


def test_bench_measures_each_fine_tuning_path(tiny, tmp_path):
    pytest.importorskip('peft')
    import bench
    texts = [r['prompt'] for r in tiny.read_jsonl('items.jsonl')]
    lm = tiny_lm(str(tmp_path / 'lm'), 'bert', texts)
    bench.main(['--data', tiny.folder, '--lm', lm, '--sections', 'finetune', '--ft-paths', 'full', 'lora',
                '--ft-steps', '2', '--ft-batch-size', '4', '--ft-heldout', '5', '--out', str(tmp_path / 'b.json')])
    res = json.load(open(tmp_path / 'b.json'))['finetune']
    trained = {p: res[p]['trainable_parameters'] for p in ('full', 'lora')}
    assert trained['full'] > trained['lora'] > 0 and res['lora']['items_per_second'] > 0
    assert res['lora']['view_retrieval_before']['items'] == 5 and 0 <= res['lora']['view_retrieval_after']['acc@1'] <= 1


def test_views_sum_is_the_runs_own_ranking_and_each_half_is_reported(tiny_runs, capsys):
    import views
    import eval as evaluation
    model, data, config, device = evaluation.load_run(tiny_runs[1], 'cpu')
    rows = views.view_rows(model, data, config, 'valid')
    assert set(rows) == {'co', 'sem', 'sum'}
    full, _, _ = evaluation.rank_targets(model, data.padded(2, config['max_len']), data.target(2),
                                         data.eval_negatives, 64, device, config['mask_history'])
    assert rows['sum']['all'] == evaluation.metrics(full, [10])
    assert all(0 <= r['tail_share'] <= 1 and r['score_std'] > 0 for r in rows.values())
    views.main(['--run', tiny_runs[0], '--run', tiny_runs[1]])
    out = capsys.readouterr().out
    assert out.count(f'| {tiny_runs[1]} |') == 3 and out.count(f'| {tiny_runs[0]} | co |') == 1


def test_runs_script_trains_skips_finished_runs_and_resumes_interrupted_ones(tiny, tiny_emb, tmp_path):
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = tmp_path / 'runs'
    listing = tmp_path / 'list.txt'
    listing.write_text('# a comment\n\n'
                       f'tiny/a {tiny.folder} {tiny_emb} --method llmesr --max-len 10 --d 16 --epochs 2 --n-similar 3\n'
                       f'tiny/b {tiny.folder} - --method base --max-len 10 --d 16 --epochs 2\n')
    go = lambda: subprocess.run(['bash', 'experiments/runs.sh', str(listing), '2'], cwd=root, capture_output=True,  # noqa: E731
                                text=True, env={**os.environ, 'RUNS': str(runs)}, check=True).stdout
    out = go()
    assert out.count('start') == 2 and all((runs / 'tiny' / n / 'results.json').exists() for n in 'ab')
    first = json.load(open(runs / 'tiny' / 'a' / 'results.json'))
    os.remove(runs / 'tiny' / 'a' / 'results.json')                # as if killed before the test pass
    out = go()
    assert 'done already: tiny/b' in out and 'start tiny/a' in out
    assert json.load(open(runs / 'tiny' / 'a' / 'results.json'))['test'] == first['test']
    assert 'resumed from' in (runs / 'tiny' / 'a' / 'train.log').read_text()


def test_drift_measures_rows_against_their_start_and_the_lm_neighbours(tiny_runs, capsys):
    import torch
    import drift
    from model import similar_users
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    near = similar_users(x, 1)
    assert near[:, 0].tolist() == [1, 0, 3, 2] and drift.shared(near, near).tolist() == [1.0] * 4
    lm, head = torch.randn(30, 8), torch.arange(30) < 6
    start = torch.randn(30, 4)
    same = drift.compare(start.clone(), start, lm, head)
    assert all(r['moved'] == 0 and abs(r['cosine'] - 1) < 1e-6 and r['lm_neighbours_start'] == r['lm_neighbours_end']
               for r in same.values())
    assert same['head']['items'] == 6 and same['tail']['items'] == 24
    moved = drift.compare(-start, start, lm, head)
    assert all(abs(r['moved'] - 2) < 1e-5 and abs(r['cosine'] + 1) < 1e-6 for r in moved.values())
    drift.main(['--run', tiny_runs[0], '--run', tiny_runs[1]])
    out = capsys.readouterr().out
    assert out.count(f'| {tiny_runs[0]} | ') == 2 and 'random →' in out and out.count(f'| {tiny_runs[1]} | ') == 2


# ---------------------------------------------------------------------------------------------
# compare.py: the multi-seed report, the paired test, the popularity plot; regroup.py


def test_report_and_paired_skip_or_name_unfinished_and_corrupt_runs(tiny_runs, tmp_path, capsys):
    import compare
    running = tmp_path / 'running'
    running.mkdir()
    corrupt = shutil.copytree(tiny_runs[1], tmp_path / 'corrupt')
    (corrupt / 'results.json').write_text('{"test": ')
    compare.main(['--report', f'{tiny_runs[0]}/results.json', f'{running}/results.json', f'{corrupt}/results.json',
                  tiny_runs[0]])
    out, err = capsys.readouterr()
    assert out.count('| base (sasrec)') == 4 and 'llmesr' not in out         # two tables, two protocols
    assert f'skipped {running}/results.json: no results yet' in err and f'skipped {corrupt}/results.json: corrupt' in err
    assert 'given twice' in err                                               # one run is one seed, once
    fails_cleanly(compare.main, ['--paired', tiny_runs[0], str(running)], r'running/results.json: no results here',
                  [tiny_runs[0]], tmp_path)
    (corrupt / 'results.json').write_bytes(open(f'{tiny_runs[1]}/results.json', 'rb').read())
    (corrupt / 'test_ranks.npz').write_bytes(b'not a zip')
    fails_cleanly(compare.main, ['--paired', tiny_runs[0], str(corrupt)], r'test_ranks.npz is corrupt',
                  [tiny_runs[0]], tmp_path)


def test_paired_test_of_one_group_compares_only_its_users(tiny, tiny_runs, capsys):
    import compare
    import eval as evaluation
    masks = evaluation.group_masks(tiny, tiny.target(1))
    bucket = next(g for g in evaluation.BUCKETS if masks[g].any())
    for group in ('overall', 'tail_user', 'tail_user_paper', bucket):
        compare.main(['--paired', tiny_runs[1], tiny_runs[0], '--group', group])
        got = json.loads(capsys.readouterr().out)
        a, b = (compare.user_ndcg([r])[masks[group]] for r in (tiny_runs[1], tiny_runs[0]))
        assert got['users'] == masks[group].sum()
        assert math.isclose(got['mean_difference'], float((a - b).mean()), abs_tol=1e-12)
    empty = next(g for g in evaluation.GROUPS if not masks[g].any())
    with pytest.raises(SystemExit, match=f'--group {empty}: no test user'):
        compare.main(['--paired', tiny_runs[1], tiny_runs[0], '--group', empty])


def test_paired_refuses_a_run_twice_and_runs_of_other_variants(tiny_runs, tmp_path, capsys):
    import compare
    fails_cleanly(compare.main, ['--paired', f'{tiny_runs[1]},{tiny_runs[1]}', tiny_runs[0]],
                  r'a seed is given twice', [tiny_runs[1]], tmp_path)
    fails_cleanly(compare.main, ['--paired', f'{tiny_runs[1]},{tiny_runs[0]}', tiny_runs[0]],
                  r'is not a seed of .*method', [tiny_runs[1]], tmp_path)
    other = shutil.copytree(tiny_runs[1], tmp_path / 'other-emb')            # a seed of it on other embeddings
    res = json.load(open(other / 'results.json'))
    res['config'].update(seed=res['config']['seed'] + 1, emb_id='another table')
    json.dump(res, open(other / 'results.json', 'w'))
    fails_cleanly(compare.main, ['--paired', f'{tiny_runs[1]},{other}', tiny_runs[0]],
                  r'is not a seed of .*other embeddings \(emb_id\)', [tiny_runs[1], other], tmp_path)
    compare.main(['--paired', tiny_runs[0], tiny_runs[0]])                   # no difference: t is null, valid JSON
    got = json.loads(capsys.readouterr().out)
    assert got['t'] is None and got['p_two_sided'] is None


def test_plot_text_and_missing_matplotlib(tiny, tiny_runs, capsys, monkeypatch, tmp_path):
    import compare
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    with pytest.raises(SystemExit, match=r'needs matplotlib \(pip install matplotlib\); the same numbers as text'):
        compare.main(['--plot', str(tmp_path / 'p.png'), tiny_runs[0], tiny_runs[1]])
    assert not (tmp_path / 'p.png').exists()
    (tmp_path / 'p.png').write_text('an earlier plot')
    fails_cleanly(compare.main, ['--plot', str(tmp_path / 'p.png'), tiny_runs[0]],
                  r'p.png exists and is never written over', [str(tmp_path)], tmp_path)


def fake_run(folder, seed, hr, ranks, **config):
    import eval as evaluation
    os.makedirs(folder)
    test = {p: {g: {'HR@10': hr, 'NDCG@10': hr / 2, 'users': 4} for g in evaluation.PARETO} for p in ('full', 'sampled')}
    base = {'method': 'llmesr', 'backbone': 'sasrec', 'seed': seed, 'loss': 'bce', 'alpha': 0.1, 'adapter_layers': 2,
            'mask_history': True, 'lm_scale': 'official',
            'teacher': 'table', 'no_cross': False, 'data': 'processed/beauty', 'emb': 'emb/minilm', 'emb_id': 'e1'}
    json.dump({'test': test, 'config': {**base, **config}, 'epoch_seconds': [1.0], 'commit': 'abc1234'},
              open(f'{folder}/results.json', 'w'))
    np.savez(f'{folder}/test_ranks.npz', full=np.array(ranks), sampled=np.array(ranks))


def test_report_mean_std_and_paired_statistic_match_independent_computations(tmp_path, capsys):
    import compare
    fake_run(tmp_path / 'a1', 1, 0.2, [0, 3, 20, 1])
    fake_run(tmp_path / 'a2', 2, 0.4, [0, 1, 20, 5])
    fake_run(tmp_path / 'b1', 1, 0.1, [2, 30, 9, 40], no_cross=True)                    # a flag's old name
    fake_run(tmp_path / 'b2', 2, 0.3, [2, 30, 9, 40], cross=False)                      # and its new one
    fake_run(tmp_path / 'c3', 3, 0.8, [0, 0, 0, 0], emb='emb/minilm-cft', emb_id='e2')   # other embeddings
    fake_run(tmp_path / 'd3', 3, 0.6, [0, 0, 0, 0], mask_history=False)                  # another protocol
    fake_run(tmp_path / 'e1', 1, 0.6, [0, 0, 0, 0], alpha=-1.0)                          # another alpha
    fake_run(tmp_path / 'a3', 1, 0.9, [0, 0, 0, 0])                                      # seed 1 again
    table = compare.report([str(tmp_path / r / 'results.json') for r in ('a1', 'a2', 'b1', 'b2', 'c3', 'd3', 'e1', 'a3')])
    assert '| llmesr (sasrec) --no-mask-history | beauty, minilm | 3 | full | 0.6000 | 0.3000 |' in table
    assert f'| llmesr (sasrec) | beauty, minilm | 1, 2 | full | 0.3000 ± {np.std([0.2, 0.4], ddof=1):.4f} |' in table
    assert f'| llmesr (sasrec) --no-cross | beauty, minilm | 1, 2 | full | 0.2000 ± {np.std([0.1, 0.3], ddof=1):.4f} |' in table
    assert '| llmesr (sasrec) | beauty, minilm-cft | 3 | full | 0.8000 | 0.4000 |' in table
    assert '| llmesr (sasrec) --alpha -1.0 | beauty, minilm | 1 | full | 0.6000 |' in table
    assert 'seed 1 of this variant is' in capsys.readouterr().err
    a = compare.user_ndcg([str(tmp_path / 'a1'), str(tmp_path / 'a2')])
    assert math.isclose(a[1], (1 / math.log2(5) + 1 / math.log2(3)) / 2)
    b = np.array([0.1, 0.5, 0.3, 0.2])
    got = compare.paired_test(a, b)
    from scipy import stats
    ref = stats.ttest_rel(a, b)
    assert math.isclose(got['t'], ref.statistic, rel_tol=1e-9)
    assert math.isclose(got['p_two_sided'], 2 * stats.norm.sf(abs(ref.statistic)), rel_tol=1e-9)


def test_variant_names_only_the_settings_its_method_uses():
    import compare
    config = {'backbone': 'sasrec', 'loss': 'ce', 'mask_history': True, 'cross': False, 'lm_scale': 'xavier'}
    name = lambda method: compare.variant({**config, 'method': method})  # noqa: E731
    assert name('llmesr') == 'llmesr (sasrec) --no-cross --lm-scale xavier --loss ce'
    assert name('llminit') == 'llminit (sasrec) --lm-scale xavier --loss ce'   # the scale of its PCA table
    assert name('base') == 'base (sasrec) --loss ce'                            # no LM table to scale
    assert compare.variant({'method': 'base', 'backbone': 'sasrec'}) == 'base (sasrec) --no-mask-history'  # an old run


def test_regroup_adds_the_missing_groups_from_the_test_ranks_and_nothing_else(tiny, tiny_runs, tmp_path):
    import eval as evaluation
    import regroup
    run = shutil.copytree(tiny_runs[1], tmp_path / 'run')
    res = json.load(open(run / 'results.json'))
    kept = {p: {g: res['test'][p][g] for g in evaluation.PARETO} for p in res['test']}
    for p in res['test']:                                                     # as a run from before the groups
        res['test'][p] = dict(kept[p])
    json.dump(res, open(run / 'results.json', 'w'))
    regroup.main(['--data', tiny.folder, str(run)])
    after = json.load(open(run / 'results.json'))
    original = json.load(open(f'{tiny_runs[1]}/results.json'))
    for p in after['test']:
        assert after['test'][p] == original['test'][p]                       # as the run computed them itself
    assert after['regrouped'][0]['groups'] == [g for g in evaluation.GROUPS if g not in evaluation.PARETO]
    regroup.main(['--data', tiny.folder, str(run)])                          # nothing left to add: untouched
    assert json.load(open(run / 'results.json')) == after


def test_table_gives_each_group_with_paired_t_against_the_first(tiny, tiny_runs, capsys):
    import compare
    compare.main(['--table', tiny_runs[0], tiny_runs[1], '--groups', 'overall', 'tail_user'])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith('| runs | overall (40) | tail_user (')
    assert '(t ' not in out[2] and out[3].count('(t ') == 2                # the baseline has no t against itself
    compare.main(['--paired', tiny_runs[1], tiny_runs[0], '--group', 'tail_user'])
    t = json.loads(capsys.readouterr().out)['t']
    assert f'(t {t:+.2f})' in out[3]


def test_scale_runs_each_catalogue_in_its_own_process_and_writes_the_table(tmp_path, capsys):
    import scale
    out = tmp_path / 'scale.json'
    scale.main(['--sizes', '300', '600', '--steps', '2', '--users', '16', '--batch-size', '4', '--max-len', '8',
                '--negatives', '8', '--eval-memory', '0.001', '--out', str(out)])
    res = json.load(open(out))
    assert [r['items'] for r in res['sizes']] == [300, 600] and all(r['ms_per_step'] > 0 for r in res['sizes'])
    assert '| 600 |' in capsys.readouterr().out
    with pytest.raises(SystemExit, match='exists and is never written over'):
        scale.main(['--out', str(out)])


def test_gpu_check_runs_on_the_cpu_with_a_tiny_model(tmp_path):
    import subprocess
    import test_smoke
    raw = test_smoke.amazon2014(str(tmp_path / 'raw'), test_smoke.synthetic_log())
    lm = tiny_lm(str(tmp_path / 'lm'), 'bert', ['the beauty item has following attributes'] * 3 +
                 [f"name is item i{i:03d}'s lipstick brand acme price 5.50 features beauty makeup" for i in range(30)])
    env = {**os.environ, 'RAW': raw, 'OUT': str(tmp_path / 'check.json'), 'DEVICE': 'cpu', 'EPOCHS': '1',
           'LM': lm, 'MAX_LENGTH': '32', 'EXTRA': '--hidden 8 --max-len 10 --n-similar 3', 'WORK': str(tmp_path / 'w'),
           'DATA_EXTRA': '--eval-negatives 10'}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(['bash', 'experiments/gpu_check.sh'], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    res = json.load(open(tmp_path / 'check.json'))
    assert res['device'] == 'cpu' and res['ranks_identical_cpu_vs_device'] == 1.0
    assert res['sasrec']['epoch_seconds'] and res['recipe']['test_ndcg10'] >= 0 and res['embedding_texts_per_second'] > 0


# ---------------------------------------------------------------------------------------------
# show.py


def test_top_k_shown_is_the_ranking_the_evaluation_scored(tiny, tiny_runs):
    import eval as evaluation
    import show
    model, d, config, device = evaluation.load_run(tiny_runs[1])
    inputs, targets = d.padded(1, config['max_len']), d.target(1)
    items, scores = show.recommend(model, inputs, 10, device)
    saved = np.load(os.path.join(tiny_runs[1], 'test_ranks.npz'))['full']
    for u in range(d.n_users):
        if saved[u] < 10:
            assert items[u, saved[u]] == targets[u]
        else:
            assert targets[u] not in items[u]
    assert (np.diff(scores, axis=1) <= 0).all()


def test_show_prints_both_runs_and_unknown_user_fails(tiny, tiny_runs, capsys):
    import show
    show.main(['--run', tiny_runs[0], '--compare', tiny_runs[1], '--user', 'tail', '--seed', '1'])
    out = capsys.readouterr().out
    assert 'history, oldest first' in out and 'test target:' in out and out.count('target rank') == 2
    with pytest.raises(SystemExit, match=r"--user nobody: no such user .* use --user tail"):
        show.main(['--run', tiny_runs[0], '--user', 'nobody'])


def test_recommend_hides_the_inputs_and_padding():
    import show
    top, _ = show.recommend(ById(), np.array([[0, 9, 8], [7, 9, 5]]), 2, 'cpu')
    assert top.tolist() == [[7, 6], [8, 6]]


def test_ab_step_times_two_checkouts_on_the_same_batches(tiny, tiny_emb, tmp_path, capsys):
    import ab_step
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ab_step.main(['--before', root, '--data', tiny.folder, '--emb', tiny_emb, '--steps', '7', '--losses', 'ce', '--d', '16',
                  '--out', str(tmp_path / 'ab.json')])
    res = json.load(open(tmp_path / 'ab.json'))['ms']
    assert set(res) == {'base/ce', 'llmesr/ce'} and all(r['before_ms'] > 0 and r['now_ms'] > 0 for r in res.values())


# ---------------------------------------------------------------------------------------------
# your own data, end to end: data.py -> import_tables.py -> train.py -> eval.py -> show.py
# and the authors' tables, read without running code


@pytest.mark.parametrize('kind,time,items', LAYOUTS)
def test_each_layout_trains_evaluates_and_shows(tmp_path, kind, time, items, capsys):
    import data
    import eval as evaluation
    import import_tables
    import show
    import train
    raw, flags = own_layout(str(tmp_path / 'raw'), kind, synthetic_log(), time, items)
    proc, emb, run = (str(tmp_path / name) for name in ('proc', 'emb', 'run'))
    data.main(['--raw', raw, '--out', proc, '--eval-negatives', '5', *flags])
    d = data.load_processed(proc)
    rng = np.random.default_rng(0)
    tables = raw if kind == 'llmesr' else str(tmp_path / 'tables')
    os.makedirs(tables, exist_ok=True)
    for name, rows in (('items', d.n_items), ('users', d.n_users)):
        table = rng.normal(size=(rows, 16)).astype(np.float32)      # the archive's: every item and user kept
        if kind == 'llmesr':
            with open(os.path.join(tables, {'items': 'itm_emb_np.pkl', 'users': 'usr_emb_np.pkl'}[name]), 'wb') as f:
                pickle.dump(table, f)
        else:
            np.save(os.path.join(tables, f'{name}.npy'), table)
    import_tables.main(['--data', proc, '--tables', tables, '--out', emb])
    train.main(['--data', proc, '--emb', emb, '--out', run, '--epochs', '1', '--max-len', '10', '--d', '16',
                '--n-similar', '3', '--log-every', '1000', '--lm-scale', 'official'])
    evaluation.main(['--run', run])
    show.main(['--run', run, '--user', 'tail'])
    out = capsys.readouterr().out
    assert '| full | overall |' in out and 'test target: ' in out
    assert json.load(open(os.path.join(run, 'results.json')))['test']['full']['overall']['users'] == d.n_users
    assert ('Lipstick' in out) == items


def test_the_authors_filter_written_as_their_archive_reads_back_as_kcore_once(tmp_path):
    import authors_archive
    import data
    rows = synthetic_log(n_users=60, n_items=40, seed=3)
    raw = amazon2014(str(tmp_path / 'raw'), rows)
    authors_archive.main(raw, str(tmp_path / 'handled'))
    data.main(['--raw', str(tmp_path / 'handled'), '--out', str(tmp_path / 'archive'), '--eval-negatives', '3'])
    data.main(['--raw', raw, '--out', str(tmp_path / 'once'), '--kcore', 'once', '--eval-negatives', '3'])
    sequences = []
    for name in ('archive', 'once'):
        d = data.load_processed(str(tmp_path / name))
        items = {r['id']: r['raw'] for r in d.read_jsonl('items.jsonl')}
        users = d.read_jsonl('users.jsonl')
        sequences.append({users[u]['raw']: [items[i] for i in d.sequences[d.offsets[u]:d.offsets[u + 1]]]
                          for u in range(d.n_users)})
    assert sequences[0] == sequences[1] and len(sequences[0]) > 10


def test_authors_tables_are_matched_by_original_id(tmp_path):
    import data
    import embed
    import import_tables
    rows = synthetic_log()
    raw, _ = own_layout(str(tmp_path / 'raw'), 'llmesr', rows)
    data.main(['--raw', raw, '--out', str(tmp_path / 'proc'), '--eval-negatives', '5'])
    d = data.load_processed(str(tmp_path / 'proc'))
    maps = json.load(open(f'{raw}/id_map.json'))
    archive_users = list(dict.fromkeys(line.split()[0] for line in open(f'{raw}/inter.txt')))
    # the authors' rows: item row k is item id k + 1; user row k the k-th user of inter.txt
    n_items = len(maps['id2item'])
    items = np.tile(np.arange(1, n_items + 1, dtype=np.float32)[:, None], (1, 4))
    users = np.tile(np.array([float(u) for u in archive_users], dtype=np.float32)[:, None], (1, 4))
    for name, table in (('itm_emb_np.pkl', items), ('usr_emb_np.pkl', users)):
        with open(f'{raw}/{name}', 'wb') as f:
            pickle.dump(table, f)
    import_tables.main(['--data', d.folder, '--tables', raw, '--out', str(tmp_path / 'emb')])
    got_items, got_users, manifest = embed.load_embeddings(str(tmp_path / 'emb'), d)
    assert [int(v) for v in got_items[:, 0]] == [int(maps['item2id'][r['raw']]) for r in d.read_jsonl('items.jsonl')]
    assert [int(v) for v in got_users[:, 0]] == [int(maps['user2id'][r['raw']]) for r in d.read_jsonl('users.jsonl')]
    assert manifest['lm'].startswith('imported from') and manifest['pooling'] == 'as made there'
    # an item table a row short; a user table a row short of inter.txt's users: both refused
    with open(f'{raw}/itm_emb_np.pkl', 'wb') as f:
        pickle.dump(items[:-1], f)
    with pytest.raises(SystemExit, match=r"1 of the data's items \(\w+, ...\) have no row. Were the tables made"):
        import_tables.main(['--data', d.folder, '--tables', raw, '--out', str(tmp_path / 'emb2')])
    with open(f'{raw}/itm_emb_np.pkl', 'wb') as f:
        pickle.dump(items, f)
    with open(f'{raw}/inter.txt', 'a') as f:
        f.write('999 1\n')
    with pytest.raises(SystemExit, match='40 rows stand for 41 users'):
        import_tables.main(['--data', d.folder, '--tables', raw, '--out', str(tmp_path / 'emb2')])
    assert not (tmp_path / 'emb2').exists()


class RunsCode:
    """A pickle of this makes the unpickler call os.mkdir: code run by merely loading the file."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path, tiny):
    import import_tables
    marker, tables = tmp_path / 'ran', tmp_path / 'tables'
    tables.mkdir()
    for name, obj in (('itm_emb_np.pkl', RunsCode(str(marker))), ('usr_emb_np.pkl', np.zeros((2, 2)))):
        with open(tables / name, 'wb') as f:
            pickle.dump(obj, f)
    with pytest.raises(SystemExit, match=r'itm_emb_np.pkl: refused \(it names posix.mkdir.*nothing in it ran'):
        import_tables.main(['--data', tiny.folder, '--tables', str(tables), '--out', str(tmp_path / 'emb')])
    assert not marker.exists() and not (tmp_path / 'emb').exists()
    # a pair of .npy files in the data's order; a row count that does not match is refused
    np.save(tables / 'items.npy', np.ones((tiny.n_items, 3)))
    np.save(tables / 'users.npy', np.ones((tiny.n_users + 1, 3)))
    for f in ('itm_emb_np.pkl', 'usr_emb_np.pkl'):
        os.remove(tables / f)
    with pytest.raises(SystemExit, match=rf'users.npy: shape \({tiny.n_users + 1}, 3\); the data has {tiny.n_users}'):
        import_tables.main(['--data', tiny.folder, '--tables', str(tables), '--out', str(tmp_path / 'emb')])


def test_download_names_the_5core_or_every_review():
    from download import download_urls
    assert download_urls('amazon2014-Beauty')[0].endswith('/categoryFiles/reviews_Beauty_5.json.gz')
    assert download_urls('amazon2014-Beauty-full')[0].endswith('/categoryFiles/reviews_Beauty.json.gz')
    assert download_urls('amazon2018-AMAZON_FASHION-full')[0].endswith('/categoryFiles/AMAZON_FASHION.json.gz')
    assert download_urls('amazon2018-All_Beauty')[0].endswith('/categoryFilesSmall/All_Beauty_5.json.gz')


@pytest.mark.parametrize('lora', [False, True])
def test_view_retrieval_before_and_after_a_tuning(tiny, tmp_path, capsys, lora):
    import embed
    import view_retrieval
    if lora:
        pytest.importorskip('peft')
    texts = [r['prompt'] for r in tiny.read_jsonl('items.jsonl')]
    lm = tiny_lm(str(tmp_path / 'lm'), 'llama' if lora else 'bert', texts)
    embed.main(['--data', tiny.folder, '--lm', lm, '--out', str(tmp_path / 'emb'), '--finetune', '--steps', '5',
                '--ft-batch-size', '8', '--lr', '1e-3', *(['--lora'] if lora else [])])
    capsys.readouterr()
    view_retrieval.main(['--data', tiny.folder, '--emb', str(tmp_path / 'emb')])
    res = json.loads(capsys.readouterr().out)
    assert res['before']['items'] == res['after']['items'] == tiny.n_items // 5
    assert all(0 <= res[w]['acc@1'] <= res[w]['acc@10'] <= 1 for w in res)


def test_view_retrieval_names_what_is_missing(tiny, tiny_emb, tmp_path):
    import view_retrieval
    with pytest.raises(SystemExit, match=r'finetune.json: no fine-tuning report here. Make it with .*--finetune'):
        view_retrieval.main(['--data', tiny.folder, '--emb', tiny_emb])
    old = shutil.copytree(tiny_emb, tmp_path / 'old')
    (old / 'finetune.json').write_text(json.dumps({'config': {}, 'view_retrieval_before': None}))
    with pytest.raises(SystemExit, match=r'lists no held-out items: it was tuned by an older embed.py'):
        view_retrieval.main(['--data', tiny.folder, '--emb', str(old)])


def test_paper_table_averages_the_finished_seeds_and_names_the_missing(tmp_path, capsys):
    import paper_table

    def finish(dataset, name, seed, full, sampled, emb_id=None):
        group = {'HR@10': full, 'NDCG@10': full / 2}
        res = {'config': {'seed': seed, 'emb_id': emb_id}, 'test': {
            'full': {'overall': group, 'tail_item_paper': group},
            'sampled': {'overall': {'HR@10': sampled, 'NDCG@10': sampled / 2},
                        'tail_item_paper': {'HR@10': sampled, 'NDCG@10': sampled / 2}}}}
        os.makedirs(tmp_path / dataset / f'{name}-s{seed}')
        json.dump(res, open(tmp_path / dataset / f'{name}-s{seed}' / 'results.json', 'w'))
    finish('beauty-sparse', 'sasrec-base-ce', 42, 0.04, 0.4)
    finish('beauty-sparse', 'sasrec-base-ce', 44, 0.06, 0.6)
    paper_table.main([str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    sparse = lines.index('| **sparse Beauty, cross-entropy** | | | | | |')
    assert lines[sparse + 1] == '| SASRec | 42, 44 | 0.5000 / 0.2500 | 0.5000 / 0.2500 | 0.0500 / 0.0250 | 0.0500 / 0.0250 |'
    assert lines[sparse + 2] == '| LLMInit, MiniLM | not run yet | | | | |'
    assert lines[2].startswith('| paper: SASRec') and len(lines) == 2 + 2 + sum(1 + len(c[3]) for c in paper_table.CONDITIONS)
    finish('beauty-sparse', 'sasrec-base-ce', 43, 0.05, 0.5, emb_id='another table')   # never averaged in
    with pytest.raises(SystemExit, match=r'-s43 is not a seed of .*-s42: other embeddings'):
        paper_table.main([str(tmp_path)])
    with pytest.raises(SystemExit, match='not a folder'):
        paper_table.main([str(tmp_path / 'none')])
    def done(dataset, *names):
        for name in names:
            os.makedirs(tmp_path / dataset / name)
            (tmp_path / dataset / name / 'results.json').write_text('{}')
    done('beauty', 'sasrec-llminit-ce-cft-s42', *(f'sasrec-llminit-ce-cft-retuned-s{s}' for s in (43, 44)))
    done('beauty-sparse', 'sasrec-llminit-ce-cft-s42', 'sasrec-llminit-ce-cft-retuned-s43')
    # the re-tuned MiniLM stands in on the 5-core once it has every seed, and there only
    assert paper_table.finished(str(tmp_path), 'beauty', 'sasrec-llminit-ce-cft') == \
        [str(tmp_path / 'beauty' / 'sasrec-llminit-ce-cft-s42')]
    done('beauty', 'sasrec-llminit-ce-cft-retuned-s42')
    assert paper_table.finished(str(tmp_path), 'beauty', 'sasrec-llminit-ce-cft') == \
        [str(tmp_path / 'beauty' / f'sasrec-llminit-ce-cft-retuned-s{s}') for s in (42, 43, 44)]
    assert paper_table.finished(str(tmp_path), 'beauty-sparse', 'sasrec-llminit-ce-cft') == \
        [str(tmp_path / 'beauty-sparse' / 'sasrec-llminit-ce-cft-s42')]


def test_verdicts_are_paired_tests_of_the_finished_seeds_and_name_the_missing(tiny, tiny_runs, tmp_path, capsys):
    import compare
    import verdicts
    for run, name in zip(tiny_runs, ('sasrec-base-ce-s42', 'sasrec-llmesr-ce-lmscale-s42')):
        copy = shutil.copytree(run, tmp_path / 'beauty-sparse' / name)
        res = json.load(open(copy / 'results.json'))
        res['config']['data'] = tiny.folder                                  # as seen from its new place
        json.dump(res, open(copy / 'results.json', 'w'))
    verdicts.main([str(tmp_path)])
    out = capsys.readouterr().out.splitlines()
    column = [c for c, *_ in verdicts.LLMESR_COLUMNS].index('sparse, cross-entropy, MiniLM')
    sampled_overall = out[4].split(' | ')
    assert sampled_overall[0] == '| LLM-ESR: better overall (100 negatives)'
    a, b = (str(tmp_path / 'beauty-sparse' / n) for n in ('sasrec-llmesr-ce-lmscale-s42', 'sasrec-base-ce-s42'))
    got = compare.paired([a], [b], 'overall', protocol='sampled')
    change = got['mean_a'] / got['mean_b'] - 1
    assert sampled_overall[1 + column].endswith(f'{100 * change:+.0f}%, t {got["t"]:+.1f} (1 / 1 seeds)')
    assert sampled_overall[1 + column].startswith('**held**' if got['t'] > 1.96 else 'not held')
    assert sum(c.strip(' |') == 'not run yet' for c in sampled_overall) == len(verdicts.LLMESR_COLUMNS) - 1
    three = (3, 3)
    assert verdicts.verdict({'change': 0.1, 't': 2.5, 'seeds': three}, {'change': 0.2, 't': 9.0, 'seeds': three}) \
        == '**held**, but smaller than overall: +10%, t +2.5'
    assert verdicts.verdict({'change': 0.3, 't': 1.9, 'seeds': three}) == 'not held: +30%, t +1.9'
    assert verdicts.verdict({'change': -0.3, 't': -5.0, 'seeds': three}) == 'not held: -30%, t -5.0'
    assert verdicts.verdict(None) == 'not run yet'
    with pytest.raises(SystemExit, match='not a folder'):
        verdicts.main([str(tmp_path / 'none')])


def test_refresh_tables_rewrites_only_the_generated_tables_and_checks_without_writing(tmp_path, capsys):
    import refresh_tables
    results = tmp_path / 'results'
    os.makedirs(results / 'beauty-sparse')
    made = refresh_tables.generated(str(results))                 # no runs: every cell "not run yet"
    assert len(made) == 5 and all(t[1].startswith('|---') for t in made)
    stale = [made[0][0], made[0][1], '| LLM-ESR: better overall (100 negatives) | held: +99%, t +9.9 |']
    other = ['| claim | a hand-made table |', '|---|---|', '| x | y |']
    text = '\n\n'.join('\n'.join(t) for t in [stale, other] + made[1:]) + '\n\nprose stays.\n'
    notebook = tmp_path / 'RESULTS.md'
    notebook.write_text(text)
    args = ['--notebook', str(notebook), '--results', str(results)]
    with pytest.raises(SystemExit) as stop:
        refresh_tables.main(args + ['--check'])
    assert stop.value.code == 1 and notebook.read_text() == text     # --check writes nothing
    assert capsys.readouterr().out == f'stale: {made[0][0][:100]}\n'
    refresh_tables.main(args)
    after = notebook.read_text()
    assert refresh_tables.tables(after) == [made[0], other] + made[1:] and after.endswith('\n\nprose stays.\n')
    with pytest.raises(SystemExit) as stop:
        refresh_tables.main(args + ['--check'])
    assert stop.value.code == 0
    notebook.write_text(after.replace('\n'.join(made[2]), ''))
    with pytest.raises(SystemExit, match='is not there: paste'):
        refresh_tables.main(args)
    notebook.write_text(after + '\n' + '\n'.join(made[2]) + '\n')
    with pytest.raises(SystemExit, match='stands 2 times'):
        refresh_tables.main(args)
    with pytest.raises(SystemExit, match='not a folder'):
        refresh_tables.main(['--notebook', str(notebook), '--results', str(tmp_path / 'none')])


def test_bf16_check_measures_both_ways_and_never_writes_over(tiny, tmp_path):
    import bf16_check
    texts = [r['prompt'] for r in tiny.read_jsonl('items.jsonl') + tiny.read_jsonl('users.jsonl')]
    lm = tiny_lm(str(tmp_path / 'lm'), 'bert', texts)
    out = tmp_path / 'bf16.json'
    bf16_check.main(['--data', tiny.folder, '--lm', lm, '--out', str(out), '--items', '12', '--users', '11'])
    report = json.load(open(out))
    assert report['items']['texts'] == 12 and report['users']['texts'] == 11
    for table in ('items', 'users'):
        assert 0.99 < report[table]['cosine_min'] <= report[table]['cosine_mean'] <= 1 + 1e-6
        assert 0 <= report[table]['top10_agreement'] <= 1 and report[table]['speedup'] > 0
    with pytest.raises(SystemExit, match='never written over'):
        bf16_check.main(['--data', tiny.folder, '--lm', lm, '--out', str(out)])
    assert json.load(open(out)) == report

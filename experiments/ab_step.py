"""CPU step time of model.py at two commits, interleaved step by step in one process.

    git worktree add /tmp/before <commit>
    python experiments/ab_step.py --before /tmp/before --data processed/beauty --emb emb/beauty-minilm

Both models start from the same seed and see the same batches; each step runs A then B or B then A
in turn, so a busy machine slows both alike. Prints the median ms per step of SASRec alone and of
LLM-ESR, per loss, and writes them as JSON with --out. Imports the core; the core never imports this.
"""
import argparse
import importlib.util
import json
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

from data import load_processed  # noqa: E402
from embed import load_embeddings  # noqa: E402
from eval import trim  # noqa: E402
from train import negatives_for, training_batch  # noqa: E402


def model_module(folder, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(folder, 'model.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--before', required=True, help='a checkout of the other commit (its model.py is A)')
    p.add_argument('--data', required=True, help='processed folder')
    p.add_argument('--emb', required=True, help='embedding folder')
    p.add_argument('--steps', type=int, default=60, help='steps per method and loss (the first 5 untimed)')
    p.add_argument('--losses', nargs='+', default=['bce', 'ce'], help='losses to time')
    p.add_argument('--d', type=int, default=64, help='hidden size of each view')
    p.add_argument('--out', help='JSON file for the figures')
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    sides = [model_module(a.before, 'model_before'), model_module(HERE, 'model_now')]
    data = load_processed(a.data)
    items = torch.from_numpy(load_embeddings(a.emb, data)[0])
    rows_all, out = data.padded(2, 201), {}
    for method in ('base', 'llmesr'):
        for loss in a.losses:
            models = []
            for M in sides:                      # the same initialisation and the same LM scale on both
                torch.manual_seed(0)
                models.append(M.Recommender(M.ModelConfig(n_items=data.n_items, method=method, loss=loss,
                                                          d=a.d, lm_scale='xavier'), items).train())
            optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in models]
            rng, gen, times = np.random.default_rng(0), torch.Generator().manual_seed(0), [[], []]
            for step in range(a.steps):
                idx = rng.choice(data.n_users, min(128, data.n_users), replace=False)
                seq, pos, history = training_batch(torch.from_numpy(trim(rows_all[idx], least=2)), 'sasrec',
                                                   data.n_items, 0.6, 200, gen)
                neg = negatives_for(loss, pos, history, data.n_items, 256, gen)
                teacher = torch.randn(len(idx), 2 * a.d) if method == 'llmesr' else None
                for j in ((0, 1) if step % 2 else (1, 0)):
                    started = time.perf_counter()
                    value, _ = models[j](seq, pos, neg, teacher, 0.1)
                    optimizers[j].zero_grad()
                    value.backward()
                    optimizers[j].step()
                    times[j].append(time.perf_counter() - started)
            before, now = (1000 * float(np.median(t[5:])) for t in times)
            out[f'{method}/{loss}'] = {'before_ms': before, 'now_ms': now, 'now_over_before': now / before}
            print(f'{method}/{loss}: {before:.1f} ms before, {now:.1f} ms now ({now / before:.3f})', flush=True)
    if a.out:
        with open(a.out, 'x') as f:
            json.dump({'before': os.path.abspath(a.before), 'steps_timed': a.steps, 'ms': out}, f, indent=1)


if __name__ == '__main__':
    main()

"""Does contrastive tuning bring an item's views together? View-to-view retrieval on the items a
fine-tuning held out (embed.py --finetune --heldout N), with the LM before and after tuning.

    python experiments/view_retrieval.py --data processed/beauty-sparse --emb emb/beauty-sparse-minilm-cft

Each held-out item gets two views (attributes dropped with probability 0.2); a view's rank is how
many second views of other items are nearer (cosine) than its own item's; acc@K is the share with
rank below K.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import DataError, load_processed, or_exit, read_json  # noqa: E402
from embed import attribute_views, embed_texts, load_lm, prompt_subject  # noqa: E402
from model import pick_device  # noqa: E402


def view_retrieval(model, tokenizer, items, max_length, batch_size, seed):
    """Held-out items -> accuracy@1 and @10: does one attribute-dropped view of an item find the
    other view of the same item among the second views of all held-out items (cosine)?"""
    rng = np.random.default_rng(seed)
    # r fixed at the paper's 0.2, not --drop, so that tunings with different drop rates are measured alike
    first, second = zip(*(attribute_views(subject, attrs, 2, 0.2, rng) for subject, attrs in items))
    embedded = (embed_texts(list(v), tokenizer, model, max_length, batch_size, 'views')
                for v in (first, second))
    a, b = (F.normalize(torch.from_numpy(e), dim=1) for e in embedded)
    sims = a @ b.T                                                 # (H, H)
    rank = (sims > sims.diagonal()[:, None]).sum(1)                # 0: the other view is the nearest
    return {'items': len(items), **{f'acc@{k}': float((rank < k).float().mean()) for k in (1, 10)}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data', required=True, help='processed folder the embeddings were made from')
    p.add_argument('--emb', required=True, help='embedding folder written by embed.py --finetune')
    p.add_argument('--device', default='auto', help="'auto', 'cpu' or 'cuda'")
    args = p.parse_args(argv)
    print(json.dumps(or_exit(measure, args), indent=1))


def measure(args):
    remedy = f'Make it with `python embed.py --data {args.data} --lm <model> --out {args.emb} --finetune`.'
    manifest = read_json(os.path.join(args.emb, 'manifest.json'), 'embedding manifest', remedy)
    report = read_json(os.path.join(args.emb, 'finetune.json'), 'fine-tuning report', remedy)
    if 'heldout_items' not in report:                              # embed.py before it listed them
        raise DataError(f'{args.emb}/finetune.json lists no held-out items: it was tuned by an older embed.py, '
                        'whose report holds view_retrieval_before and view_retrieval_after already.')
    data, device, cfg = load_processed(args.data), pick_device(args.device), report['config']
    items = [(prompt_subject(r['prompt'], r['attributes']), r['attributes'])
             for r in data.read_jsonl('items.jsonl')]
    heldout = [items[i - 1] for i in report['heldout_items']]
    tokenizer, base = load_lm(manifest['lm_path'], device)
    tuned_folder = os.path.join(args.emb, 'lm')
    if cfg['lora']:
        from peft import PeftModel
        tuned = PeftModel.from_pretrained(load_lm(manifest['lm_path'], device)[1], tuned_folder).eval()
    else:
        tuned = load_lm(tuned_folder, device)[1]
    return {name: view_retrieval(model, tokenizer, heldout, cfg['max_length'], 64, cfg['seed'] + 1)
            for name, model in (('before', base), ('after', tuned))}


if __name__ == '__main__':
    main()

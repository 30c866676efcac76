#!/usr/bin/env bash
# WRN-16-1's quick recipe against QuickNet's, side by side: each run on its own core
# (taskset, one thread), both started together, so their wall times share one machine and
# one load. Prints CA (with and without TTA) and the wall-time ratio of each pair.
#
#   benchmarks/quick_recipe.sh [OUT]                     clean data, seeds 0 and 1 (SEEDS="1": one)
#   PAIRS="badnets:0 blended:0" benchmarks/quick_recipe.sh  QuickNet on two attacks at once
#
# A pair "ATTACK:SEED" runs WRN-16-1 and QuickNet on that cell; with PAIRS given as
# "A:S B:T", QuickNet runs A:S and B:T together instead (no WRN run). Needs 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/quick-recipe}
MODEL=${MODEL:-quicknet-s}
U=${UNPOISON:-unpoison}
mkdir -p "$out"
one() {  # one() CORE NAME MODEL ATTACK SEED
  OMP_NUM_THREADS=1 taskset -c "$1" $U run --profile quick --no-progress --no-report --tta --resume \
    --model "$3" --attack "$4" --seed "$5" --out "$out/$2" > "$out/$2.log" 2>&1
}
if [ -z "${PAIRS:-}" ]; then
  for seed in ${SEEDS:-0 1}; do
    one 0 "wrn16-1-none-s$seed" wrn16-1 none "$seed" &
    one 1 "$MODEL-none-s$seed" "$MODEL" none "$seed" &
    wait
  done
else
  set -- $PAIRS
  one 0 "$MODEL-${1%%:*}-s${1##*:}" "$MODEL" "${1%%:*}" "${1##*:}" &
  one 1 "$MODEL-${2%%:*}-s${2##*:}" "$MODEL" "${2%%:*}" "${2##*:}" &
  wait
fi
python - "$out" "$MODEL" <<'PY'
import json, sys
from pathlib import Path
out, model = Path(sys.argv[1]), sys.argv[2]
rows = {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("*/metrics.json"))}
for name, m in rows.items():
    asr = "" if m.get("asr") is None else f"  ASR {100 * m['asr']:.2f} (no TTA {100 * m['asr_no_tta']:.2f})"
    print(f"{name:28s} CA {100 * m['clean_acc']:.2f} (no TTA {100 * m['clean_acc_no_tta']:.2f}){asr}  "
          f"wall {m['wall_seconds']:.0f} s")
for name, m in rows.items():
    mine = rows.get(name.replace("wrn16-1", model)) if name.startswith("wrn16-1-") else None
    if mine:
        print(f"wall ratio {model} / wrn16-1, {name[len('wrn16-1-'):]}: {mine['wall_seconds'] / m['wall_seconds']:.2f}")
PY

#!/usr/bin/env bash
# Run quick-profile cells in parallel lanes on one GPU, within a time budget.
#
#   BUDGET=520 OUT=/tmp/out bash benchmarks/gpu_lanes.sh LANE [LANE ...]
#
# A LANE is a comma-separated list of attack/defence cells run one after the other in one
# process chain (e.g. "badnets/none,badnets/dbr,badnets/dst"): cells of one attack share a
# lane so D-BR finds that attack's no-defence model in the model cache instead of training
# it again. A cell "wait:RUN" blocks the lane until RUN (e.g. trojannn-none) has finished,
# so two lanes do not train the same cached reference model at once. Lanes run side by side:
# WRN-16-1 at batch 128 leaves a large GPU mostly idle in one process, so several
# processes together use it far better. A cell that would start after the budget is skipped;
# at the budget every cell still running is stopped (rerun with --resume continues it).
# Each cell writes RUNS/<attack>-<defence>/ (metrics.json, report.html, logs). A cell
# "badnets/dlp~ema" runs with the extra arguments in the variable ARGS_ema (e.g.
# ARGS_ema="--set assft.ema_decay=0.999") and writes RUNS/badnets-dlp-ema/.
set -u
BUDGET=${BUDGET:-3000}
RUNS=${RUNS:-runs/gpu}
PROFILE=${PROFILE:-quick}
mkdir -p "$RUNS"
start=$(date +%s)
lane() {
  IFS=, read -ra cells <<< "$1"
  for cell in "${cells[@]}"; do
    if [[ $cell == wait:* ]]; then
      until [ -f "$RUNS/${cell#wait:}/metrics.json" ] || [ $(( $(date +%s) - start )) -ge "$BUDGET" ]; do sleep 2; done
      continue
    fi
    variant=""; [[ $cell == *~* ]] && { variant=${cell#*~}; cell=${cell%%~*}; }
    attack=${cell%/*}; defense=${cell#*/}
    left=$(( BUDGET - ($(date +%s) - start) ))
    [ "$left" -le 10 ] && { echo "skip $cell (budget spent)"; continue; }
    name="$attack-$defense${variant:+-$variant}"
    args_var="ARGS_$variant"; variant_args=${variant:+${!args_var}}
    echo "$(date +%T) start $name ${variant_args:-}"
    # shellcheck disable=SC2086  # the argument strings are meant to split into words
    timeout --signal=INT "$left" unpoison run --profile "$PROFILE" --attack "$attack" --defense "$defense" \
      --monitor epochs --no-progress --out "$RUNS/$name" ${variant_args:-} ${EXTRA_ARGS:-} > "$RUNS/$name.log" 2>&1
    rc=$?
    echo "$(date +%T) end $name rc=$rc ($(( $(date +%s) - start )) s)"
  done
}
for spec in "$@"; do lane "$spec" & done
wait

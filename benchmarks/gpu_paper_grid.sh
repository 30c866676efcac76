#!/usr/bin/env bash
# The paper grid in slices: run configs/paper-cifar10.yaml for BUDGET minutes, leave what the
# next slot needs in one folder, and continue from it when run again.
#
#   UNPOISON_DATA=DIR SLOT=runs/paper-slot BUDGET=12 [GPUS=N] bash benchmarks/gpu_paper_grid.sh [BENCH OPTIONS...]
#
# SLOT holds everything: bench/ (finished cells' metrics.json and reports, the interrupted
# cell's checkpoints, results.md) and cache/models/ (trained models later cells reuse, e.g.
# the no-defence model D-BR repairs). Copy SLOT to the next machine and run the same line.
# BUDGET is in minutes; the cell running when it is spent stops at its next epoch end
# (after its checkpoint), so leave the slot a few minutes more than BUDGET (a paper-profile
# FixMatch epoch of DLP is 1,024 steps). GPUS > 1 runs the grid under torchrun, each cell's
# batches split over the GPUs. Exit status: 0 the grid is finished, 3 cells are left (run
# again), anything else a failure (failed cells are retried by the next call too).
# BENCH OPTIONS go to `unpoison bench` (e.g. --shard 1/4, --only defense=dlp, --results DIR).
set -u
cd "$(dirname "$0")/.."
SLOT=${SLOT:-runs/paper-slot}
BUDGET=${BUDGET:-12}
GPUS=${GPUS:-1}
mkdir -p "$SLOT"
export UNPOISON_CACHE="$SLOT/cache" PYTHONUNBUFFERED=1
launch=(python3 -m unpoison.cli)
[ "$GPUS" -gt 1 ] && launch=(python3 -m torch.distributed.run --standalone --nproc-per-node "$GPUS" -m unpoison.cli)
"${launch[@]}" bench --grid configs/paper-cifar10.yaml --out "$SLOT/bench" --budget "$BUDGET" --no-progress "$@"
rc=$?
rm -rf "$SLOT/cache/decoded"   # decoded CIFAR-10 (180 MB) is rebuilt from UNPOISON_DATA in a minute
echo "[slot] $(du -sh "$SLOT" | cut -f1) in $SLOT"
case $rc in
  0) echo "[slot] the grid is finished: $SLOT/bench/results.md" ;;
  3) echo "[slot] budget spent, cells left: run this again with SLOT=$SLOT to continue" ;;
  *) echo "[slot] unpoison bench exited with $rc" ;;
esac
exit $rc

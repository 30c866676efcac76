#!/usr/bin/env bash
# The quick-cifar10 grid on one GPU machine, as the H200 rows of RESULTS.md were made.
#
#   UNPOISON_DATA=DIR BUDGET=470 bash benchmarks/gpu_quick_grid.sh [DEFENCES...] > lanes.log
#
# DIR holds cifar10-jpeg.tar.gz. DEFENCES (default: none dbr dst cbd dlp) are run in that order
# in one lane per attack, seven lanes side by side (benchmarks/gpu_lanes.sh); the LC lane waits
# for the TrojanNN lane's first cell, so the clean reference model both attacks use is trained
# once. Cells go to $RUNS (default runs/gpu)/<attack>-<defence>/. A cell cut off by the budget
# continues with EXTRA_ARGS=--resume and the same RUNS. Without `unpoison` on the PATH (a bare
# GPU machine with torch), PYTHONPATH=src and a wrapper `python3 -m unpoison.cli "$@"` will do.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
defences=("$@"); [ ${#defences[@]} -eq 0 ] && defences=(none dbr dst cbd dlp)
lane() { local a=$1 out="" d; for d in "${defences[@]}"; do out+="${out:+,}$a/$d"; done; echo "$out"; }
python3 -c 'from unpoison.data import load_dataset as L; L("cifar10", "train"); L("cifar10", "test")'  # decode once
RUNS=${RUNS:-runs/gpu} BUDGET=${BUDGET:-3000} bash benchmarks/gpu_lanes.sh \
  "$(lane none)" "$(lane badnets)" "$(lane blended)" "$(lane sig)" "$(lane wanet)" "$(lane trojannn)" \
  "wait:trojannn-${defences[0]},$(lane lc)"

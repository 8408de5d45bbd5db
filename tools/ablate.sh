#!/usr/bin/env bash
# tools/ablate.sh DATA NAME1 "FLAGS1" NAME2 "FLAGS2": two variants of the fast-cpu recipe trained
# side by side, one thread each, so that both see the same machine at the same moment (only such
# pairs compare: this machine's speed drifts by 2x from day to day). Each run goes to
# runs/ablation/NAME with its log; its small files are kept as benchmarks/results/runs/ablation-NAME.
# FLAGS override the recipe (e.g. "--label-smoothing 0"); seed 0, the resident loader, 1 worker.
# Example (the subset the ablation table used):
#   python -m fasttin.pack --src tiny-imagenet-200.zip --classes 20 --out data/tin20
#   tools/ablate.sh data/tin20 full "" res64 "--res-schedule none --epochs 12"
set -euo pipefail
[ $# -eq 5 ] || { echo "usage: tools/ablate.sh DATA NAME1 FLAGS1 NAME2 FLAGS2" >&2; exit 2; }
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
data=$1
mkdir -p runs/ablation
start() {  # NAME FLAGS
  # shellcheck disable=SC2086  # FLAGS is a list of flags
  OMP_NUM_THREADS=1 $py -m fasttin.train --data "$data" --recipe fast-cpu --device cpu --backend resident \
    --workers 1 --seed 0 --out "runs/ablation/$1" $2 > "runs/ablation/$1.log" 2>&1
}
start "$2" "$3" & p1=$!
start "$4" "$5" & p2=$!
rc=0
wait $p1 || rc=$?
wait $p2 || rc=$?
[ $rc -eq 0 ] || { echo "ablate: a run failed (exit $rc): see runs/ablation/$2.log and $4.log" >&2; exit $rc; }
for n in "$2" "$4"; do tools/keep_run.sh "runs/ablation/$n" "ablation-$n" "runs/ablation/$n.log"; done

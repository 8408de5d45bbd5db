#!/usr/bin/env bash
# STAGE=A|B|C benchmarks/gpu.sh OUT_DIR: the GPU proof, one stage per call, on a bare CUDA machine
# (Python with torch, torchvision, numpy, pillow, rich, matplotlib and OpenCV; no DALI, no network).
# A: synthetic data, the DALI-free checks, benchmarks.run, fast --compile; B: DALI (SITE) checks and
# rows; C: fast on the real data (DATA) for BUDGET_MIN minutes. Logs and JSON go to OUT_DIR, a short
# table is printed last. What each stage runs, and how its parts get there: BENCHMARKS.md's runbook.
#   PYTHON (python3), DEVICE (cuda), SITE (~/x/.xfer-src/site), DATA (C: ~/x/.xfer-src/data; A and B
#   make a synthetic set of SYNTH (100) train images per class here), BUDGET_MIN (C: 4.5), STAGE_S (A, B: 330)
# Rehearse on a CPU machine, small (REHEARSE=1: tiny sizes, 3x the time limits), with DALI hidden as on the GPU machine:
#   STAGE=A DEVICE=cpu PYTHON=.venv/bin/python REHEARSE=1 PYTHONPATH=tools/hide-dali benchmarks/gpu.sh /tmp/gpu-a
set -uo pipefail
out=${1:?usage: STAGE=A|B|C benchmarks/gpu.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
exec > >(tee -a "$out/gpu-${STAGE:-A}.log") 2>&1
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
stage=${STAGE:-A}
small=${REHEARSE:+1}  # a CPU rehearsal: tiny sizes, the same steps
pick() { [ -n "$small" ] && echo "$1" || echo "$2"; }  # pick REHEARSAL_VALUE VALUE
scale=$(pick 3 1)  # and 3x the time limits: compiling on 2 CPU cores is slow
t0=$(date +%s)
since() { echo $(( $(date +%s) - t0 )); }
left() { local s=$(( $1 * scale - $(since) )); echo $(( s > 10 ? s : 10 )); }  # seconds left of $1 x scale (>= 10)
status=0
step() {  # COMMAND...: run one part of the stage; a failure is said, kept as the exit status, and the rest still runs
  "$@"; local rc=$?
  [ $rc -eq 0 ] || { echo "!! exit $rc ($([ $rc -eq 124 ] && echo 'its timeout' || echo 'failed')): ${*:1:6}"; status=$rc; }
}
if [ "$stage" = B ]; then
  export PYTHONPATH="${SITE:-$HOME/x/.xfer-src/site}${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
$py -m fasttin.info
synth=${SYNTH:-$(pick 4 100)}
if [ "$stage" != C ]; then
  data=/tmp/fasttin-synthetic-$synth
  if [ ! -f "$data/manifest.json" ]; then
    echo "== a synthetic data set of $synth train images a class in $data ($(since) s in)"
    $py -m fasttin.pack --synthetic "$synth" --out "$data" || exit 1
  fi
else
  data=${DATA:-$HOME/x/.xfer-src/data}
fi
steps=$(pick 4 200)
limit=${STAGE_S:-330}  # A and B: the seconds the stage may run before its last part is stopped
bench=(--data "$data" --device "$device" --res 64,224 --batch-size "$(pick 8 256)" --repeats "$(pick 1 3)"
       --batches "$(pick 2 15)" --steps "$(pick 1 5)" --cache /tmp/fasttin-bench-cache)
case "$stage" in
A)
  echo "== checks without DALI ($(since) s in)"
  step timeout $((70 * scale)) $py -m benchmarks.gpu_checks --data "$data" --device "$device" --steps "$steps" --json "$out/checks-A.json"
  echo "== benchmarks, eager ($(since) s in)"
  step timeout $((110 * scale)) $py -m benchmarks.run "${bench[@]}" --stages model,loader,train --backends resident,pil,classic \
    --compiled none --json "$out/bench-A.json" --markdown "$out/bench-A.md"
  echo "== fasttin.train --recipe fast --epochs 2 --compile ($(since) s in)"
  step timeout $((100 * scale)) $py -m fasttin.train --data "$data" --recipe fast --res 64 --epochs 2 --compile --device "$device" \
    --out "$out/fast-synthetic" --overwrite ${small:+--batch-size 16 --stem imagenet}
  echo "== benchmarks, compiled model points ($(since) s in)"
  timeout "$(left "$limit")" $py -m benchmarks.run "${bench[@]}" --stages model \
    --compiled only $([ "$device" = cpu ] && echo --compile-cpu) --json "$out/bench-A-compiled.json" ||
    echo "(the compiled points stop at the stage's time; the records measured so far are kept)"
  ;;
B)
  echo "== checks with DALI ($(since) s in)"
  step timeout $((120 * scale)) $py -m benchmarks.gpu_checks --data "$data" --device "$device" --steps "$steps" --json "$out/checks-B.json"
  echo "== benchmarks, dali ($(since) s in)"
  step timeout "$(left "$limit")" $py -m benchmarks.run "${bench[@]}" --stages decode,resize,loader,train --backends dali \
    --compiled none --json "$out/bench-B.json" --markdown "$out/bench-B.md"
  ;;
C)
  budget=${BUDGET_MIN:-$(pick 0.5 4.5)}
  echo "== fast from scratch at res 64 on the real data, a $budget-minute budget ($(since) s in)"
  step timeout $((340 * scale)) $py -m fasttin.train --data "$data" --recipe fast --res 64 --epochs 30 --budget "$budget" \
    --device "$device" --out "$out/fast-real" --overwrite ${small:+--batch-size 16 --stem imagenet}
  ;;
*) echo "STAGE must be A, B or C" >&2; exit 2 ;;
esac
echo "== stage $stage done in $(since) s, exit $status"
for f in "$out"/checks-"$stage".json; do if [ -f "$f" ]; then $py -c "import json,sys
for r in json.load(open(sys.argv[1])): print(('skip' if r['ok'] is None else 'ok  ' if r['ok'] else 'FAIL'), r['check'])" "$f"; fi; done
for f in "$out"/bench-"$stage"*.json; do if [ -f "$f" ]; then $py -m benchmarks.run --summarize "$f"; fi; done
for f in "$out"/fast-*/summary.json; do if [ -f "$f" ]; then $py -c "import json,sys; s=json.load(open(sys.argv[1]))
print(sys.argv[1], 'epochs', round(s['epochs_fitted'], 2), 'best top-1', round(s['best_val_acc1'], 4), 's', round(s['train_s'], 1),
      'compile_s', s['compile_s'], s['verdict'])" "$f"; fi; done
exit $status

#!/usr/bin/env bash
# benchmarks/gpu.sh OUT_DIR: the whole benchmark suite and the GPU-only checks on a fresh CUDA
# machine that has Python with torch and nothing else of ours, in under 8 minutes on one H200.
#
#   WHEELS  folder of DALI wheels and their needs (default ~/x/wheels; made by shared/gpu/dali-wheels)
#   DATA    a packed data set to use (default: a synthetic one made here: 50k train, 10k val)
#   SITE    where the wheels are installed (default ~/site)
#   SYNTH, CHECK_STEPS, BENCH_ARGS   synthetic images per class (250), training steps per backend in
#           the checks (200), extra arguments for benchmarks.run (none)
# Writes OUT_DIR/{bench.json,bench.md,bench.png,checks.json,gpu.log}; prints a short summary last.
# Rehearse on a CPU machine, small:
#   DEVICE=cpu PYTHON=.venv/bin/python SYNTH=5 CHECK_STEPS=3 BENCH_ARGS=--quick benchmarks/gpu.sh /tmp/rehearsal
set -uo pipefail
out=${1:?usage: benchmarks/gpu.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
exec > >(tee -a "$out/gpu.log") 2>&1
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
wheels=${WHEELS:-$HOME/x/wheels}
site=${SITE:-$HOME/site}
t0=$(date +%s)
if [ -d "$wheels" ] && ! PYTHONPATH="$site" $py -c 'import nvidia.dali' 2>/dev/null; then
  echo "== installing $(ls "$wheels"/*.whl | wc -l) wheels into $site"
  $py -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl
  echo "__path__ = __import__('pkgutil').extend_path(__path__, __name__)" > "$site/nvidia/__init__.py"
fi
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
$py -m fasttin.info
data=${DATA:-/tmp/fasttin-synthetic-${SYNTH:-250}}
if [ ! -f "$data/manifest.json" ]; then
  echo "== making a synthetic data set in $data"
  $py -m fasttin.pack --synthetic "${SYNTH:-250}" --out "$data" || exit 1
fi
echo "== GPU-only checks ($(( $(date +%s) - t0 )) s in)"
timeout 150 $py -m benchmarks.gpu_checks --data "$data" --device "$device" --steps "${CHECK_STEPS:-200}" \
  --json "$out/checks.json"
echo "== benchmarks ($(( $(date +%s) - t0 )) s in)"
timeout 330 $py -m benchmarks.run --data "$data" --device "$device" --res 64,224 --batch-size 256 \
  --repeats 3 --batches 15 --steps 5 --cache /tmp/fasttin-bench-cache \
  --json "$out/bench.json" --markdown "$out/bench.md" --plot "$out/bench.png" ${BENCH_ARGS:-}
echo "== done in $(( $(date +%s) - t0 )) s"
[ -f "$out/checks.json" ] && cat "$out/checks.json"
[ -f "$out/bench.json" ] && $py -m benchmarks.run --summarize "$out/bench.json"

#!/usr/bin/env bash
# tools/rehearse-gpu.sh OUT: BENCHMARKS.md's GPU runbook rehearsed on this CPU machine, small
# (REHEARSE=1, DEVICE=cpu), the way the bare GPU machine will run it: each transfer's parts copied
# one by one into a fresh folder (OUT/x, the GPU machine's ~/x), rebuilt with the runbook's command,
# then the stage run from there.
#   A  no transfer; DALI hidden (tools/hide-dali), as on the GPU machine.
#   B  the Python 3.12 DALI site's parts (.xfer-b, made by the runbook) rebuilt and compared with
#      .xfer-src/site file by file; then, since this machine runs another Python, a site made the same
#      way for its own (dali-site DIR 3.X, xz, split, rebuilt) is the only DALI the stage can import.
#   C  the real splits' parts (.xfer-c, made by the runbook from .xfer-src/data) rebuilt and
#      checked against .xfer-src/data, then the stage trains on them (fasttin.train hashes every shard).
# Prints a table last: stage, seconds, exit code. Run it from an idle machine: it takes minutes.
set -uo pipefail
out=${1:?usage: tools/rehearse-gpu.sh OUT}
cd "$(dirname "$0")/.."
gpu=../shared/gpu
py=${PYTHON:-.venv/bin/python}
rm -rf "$out"; mkdir -p "$out/x"
out=$(cd "$out" && pwd); x=$out/x
rows=()
step() {  # NAME COMMAND...: run, time and keep one row
  local name=$1 t0 rc; shift
  echo "== $name"; t0=$(date +%s)
  "$@"; rc=$?
  rows+=("$name|$(( $(date +%s) - t0 ))|$rc")
}
parts() {  # SRC PREFIX: copy the parts one by one, as one call each would carry them
  for p in "$1"/part-*; do cp -r "$p" "$x/$2-$(basename "$p")"; done
}
pyver=$($py -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')

step "A: gpu.sh, DALI hidden" env STAGE=A DEVICE=cpu PYTHON=$py REHEARSE=1 PYTHONPATH=tools/hide-dali \
  benchmarks/gpu.sh "$out/a"

if [ -d .xfer-b ]; then
  step "B: 3.12 site rebuilt from $(ls -d .xfer-b/part-* | wc -l) parts, identical" bash -c "
    $(declare -f parts); x=$x; parts .xfer-b b && mkdir -p $x/b312 && cat $x/b-part-*/blob | xz -d | tar -x -C $x/b312 &&
    diff -r -q .xfer-src/site $x/b312/.xfer-src/site && rm -rf $x/b312 $x/b-part-*"
else
  rows+=("B: 3.12 site rebuilt (no .xfer-b: make it as the runbook says)|0|skipped")
fi
site=${SITE_HERE:-$out/site-here}
step "B: a $pyver site made, split, rebuilt" bash -c "
  $(declare -f parts); x=$x
  [ -d '$site' ] || $gpu/dali-site '$site' $pyver >/dev/null &&
  (cd \"\$(dirname '$site')\" && XZ=1 XZ_LEVEL=-1 $PWD/$gpu/split-for-transfer $out/xfer-b-here \"\$(basename '$site')\") >/dev/null &&
  parts $out/xfer-b-here bh && mkdir -p $x/site && cat $x/bh-part-*/blob | xz -d | tar -x -C $x/site"
rebuilt=$x/site/$(basename "$site")
step "B: DALI imports from the rebuilt site only" env PYTHONPATH="$rebuilt" $py -c "
import sys, nvidia.dali as d
assert d.__file__.startswith(sys.argv[1]), d.__file__
print('DALI', d.__version__, 'from', d.__file__)" "$rebuilt"
step "B: gpu.sh with that site" env STAGE=B DEVICE=cpu PYTHON=$py REHEARSE=1 SITE="$rebuilt" benchmarks/gpu.sh "$out/b"

if [ -d .xfer-c ]; then
  step "C: data rebuilt from $(ls -d .xfer-c/part-* | wc -l) parts, identical" bash -c "
    $(declare -f parts); x=$x; parts .xfer-c c && cat $x/c-part-*/blob | tar -x -C $x && diff -r -q .xfer-src/data $x/.xfer-src/data"
  step "C: gpu.sh on the rebuilt data" env STAGE=C DEVICE=cpu PYTHON=$py REHEARSE=1 DATA="$x/.xfer-src/data" \
    PYTHONPATH=tools/hide-dali benchmarks/gpu.sh "$out/c"
else
  rows+=("C: data rebuilt (no .xfer-c: make it as the runbook says)|0|skipped")
fi

echo; echo "| step | seconds | exit |"; echo "|---|---|---|"
for r in "${rows[@]}"; do echo "| ${r//|/ | } |"; done

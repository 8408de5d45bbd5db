#!/usr/bin/env bash
# The test command: set up (idempotent) and run the CPU suite. Extra arguments go to pytest:
#   tools/test.sh -m "not slow"      # the quick suite: no training runs, torchrun or main job
#   tools/test.sh -m "not realdata"  # without the real archive even when TIN_ZIP is set
# Real-data tests run when TIN_ZIP points at tiny-imagenet-200.zip, and skip otherwise; GPU tests
# skip without a CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
# Two test processes (pytest-xdist): most tests wait on one single-threaded subprocess, so the
# suite takes about half the time on 2 cores. FASTTIN_TEST_PROCS=0 runs it in one process.
procs=${FASTTIN_TEST_PROCS:-2}
# With several test processes, each (and every command it starts) gets its share of the cores in
# torch threads: two training runs at two OpenMP threads each on two cores spin against each other
# and ran several times slower (one test: 158 s, against 60 s). OMP_NUM_THREADS set by the caller wins.
dist=()
if [ "$procs" != 0 ]; then
  cores=$(nproc 2>/dev/null || echo 1)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / procs > 0 ? cores / procs : 1 ))}
  dist=(--dist worksteal)  # an idle process takes tests from a busy one's queue
fi
exec .venv/bin/python -m pytest -n "$procs" "${dist[@]}" "$@"

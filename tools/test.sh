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
exec .venv/bin/python -m pytest -n "${FASTTIN_TEST_PROCS:-2}" "$@"

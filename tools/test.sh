#!/usr/bin/env bash
# The test command: set up (idempotent) and run the CPU suite. Extra arguments go to pytest.
# Real-data tests run when TIN_ZIP points at tiny-imagenet-200.zip, and skip otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
exec .venv/bin/python -m pytest "$@"

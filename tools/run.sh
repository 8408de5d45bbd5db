#!/usr/bin/env bash
# The main job, end to end on a fresh machine: set up, get the data, pack it, train seed-224 (with a
# CUDA device; without one, the CPU recipe fast-cpu, after a line saying why and what it reaches).
#   tools/run.sh                                        # downloads the official archive (size and md5 checked)
#   FASTTIN_RECIPE=seed-224 tools/run.sh                # that recipe, whatever the machine
#   TIN_ZIP=path/to/tiny-imagenet-200.zip tools/run.sh  # uses that archive instead
#   FASTTIN_WEIGHTS=path/to/resnet18.pth tools/run.sh   # a local copy of the ImageNet weights (--pretrained PATH)
# Extra arguments go to fasttin.train and override the defaults here (e.g. --epochs 1, --device cpu).
# Environment: FASTTIN_CLASSES=N (pack only the first N classes: a short CPU run), FASTTIN_DATA (pack
# folder, default data/tiny-imagenet-200-packed, with -cN for a subset), FASTTIN_RUN (run folder,
# default runs/<recipe>, -cN likewise), FASTTIN_PYTHON (an interpreter that already has fasttin,
# used as it is, without tools/setup.sh; the tests use it).
# Idempotent: the venv and a complete pack are reused, and the trainer's --auto-resume continues
# the run folder from its last.pt (a finished run exits 0 at once; delete the folder to start over).
# Offline, with no weights in torch's cache, the trainer says so in one line, trains from scratch
# and records "pretrained": "none" with the reason in config.json and summary.json.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${FASTTIN_PYTHON:-}" ]; then
  py=$FASTTIN_PYTHON
else
  tools/setup.sh
  py=.venv/bin/python
fi
"$py" -m fasttin.info
# seed-224 with a CUDA device; without one, fast-cpu, saying why (fasttin.info --main-job)
if [ -n "${FASTTIN_RECIPE:-}" ]; then recipe=$FASTTIN_RECIPE; else recipe=$("$py" -m fasttin.info --main-job); fi
subset=${FASTTIN_CLASSES:+-c$FASTTIN_CLASSES}
data=${FASTTIN_DATA:-data/tiny-imagenet-200-packed$subset}
run=${FASTTIN_RUN:-runs/$recipe$subset}
pack=(--out "$data")
if [ -n "${TIN_ZIP:-}" ]; then pack+=(--src "$TIN_ZIP"); fi
if [ -n "${FASTTIN_CLASSES:-}" ]; then pack+=(--classes "$FASTTIN_CLASSES"); fi
"$py" -m fasttin.pack "${pack[@]}"
weights=()
if [ -n "${FASTTIN_WEIGHTS:-}" ]; then weights=(--pretrained "$FASTTIN_WEIGHTS"); fi
exec "$py" -m fasttin.train --data "$data" --recipe "$recipe" --out "$run" --auto-resume "${weights[@]}" "$@"

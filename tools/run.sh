#!/usr/bin/env bash
# The main job, end to end on a fresh machine: set up, get the data, pack it, train at --res 224.
#   tools/run.sh                 # downloads the official archive (checks size and md5)
#   TIN_ZIP=path/to/tiny-imagenet-200.zip tools/run.sh    # uses that archive instead
# Extra arguments go to fasttin.train (e.g. --epochs 1, --device cpu, --pretrained none).
# Idempotent: the venv and a complete pack are reused; training resumes if its run folder has
# a last.pt (delete runs/seed-224 to start over).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
py=.venv/bin/python
data=${FASTTIN_DATA:-data/tiny-imagenet-200-packed}
$py -m fasttin.info
if [ -n "${TIN_ZIP:-}" ]; then
  $py -m fasttin.pack --src "$TIN_ZIP" --out "$data"
else
  $py -m fasttin.pack --out "$data"
fi
resume=()
[ -f runs/seed-224/last.pt ] && resume=(--resume)
exec $py -m fasttin.train --data "$data" --res 224 "${resume[@]}" "$@"

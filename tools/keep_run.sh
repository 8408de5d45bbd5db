#!/usr/bin/env bash
# tools/keep_run.sh RUN_DIR NAME: a reported run's evidence into benchmarks/results/runs/NAME/:
# config.json, metrics.jsonl, summary.json and curves.png (never checkpoints: too large), plus the
# log when given as a third argument. Refuses to replace an existing record.
set -euo pipefail
run=${1:?usage: tools/keep_run.sh RUN_DIR NAME [LOG]}; name=${2:?usage: tools/keep_run.sh RUN_DIR NAME [LOG]}
cd "$(dirname "$0")/.."
dest=benchmarks/results/runs/$name
[ -e "$dest" ] && { echo "keep_run: $dest exists; remove it first" >&2; exit 2; }
for f in config.json metrics.jsonl summary.json curves.png; do
  [ -f "$run/$f" ] || { echo "keep_run: $run/$f is missing (a finished run has it)" >&2; exit 2; }
done
mkdir -p "$dest"
cp "$run"/{config.json,metrics.jsonl,summary.json,curves.png} "$dest/"
if [ -n "${3:-}" ]; then cp "$3" "$dest/train.log"; fi
echo "kept $run as $dest"

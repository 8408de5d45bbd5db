#!/usr/bin/env bash
# Creates .venv and installs fasttin with all it needs, from this repository's own files.
# Idempotent: a second run finds the stamp up to date and returns in about a second.
# Overrides: PYTHON (interpreter for the venv), TORCH_SPEC (e.g. "torch torchvision" to keep a
# preinstalled build), FASTTIN_NO_SIMD=1 (keep plain pillow).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$py" -m venv .venv
pip=".venv/bin/python -m pip"
stamp=.venv/.fasttin-setup
want=$(cat pyproject.toml tools/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
echo "setup: installing into .venv (first run takes a few minutes)" >&2
$pip install -q ${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
$pip install -q -e '.[test,bench]'
# pillow-simd: same API as Pillow, SIMD resize and faster decode paths. Only where AVX2 exists;
# plain Pillow stays if it cannot build (no compiler or no libjpeg headers). It is built from
# source with -mavx2 (about 2 minutes on 2 cores) once per machine and Python: the wheel is kept
# in our own folder, not pip's cache, which would also serve a wheel built without -mavx2.
simd_wheels=${FASTTIN_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/fasttin/wheels-avx2}
simd_install() { $pip install -q --no-index --find-links "$simd_wheels" --no-deps pillow-simd 2>/dev/null; }
if [ -z "${FASTTIN_NO_SIMD:-}" ] && grep -qw avx2 /proc/cpuinfo 2>/dev/null \
   && ! .venv/bin/python -c 'import PIL,sys; sys.exit(".post" not in PIL.__version__)' 2>/dev/null; then
  # both share the PIL folder: remove both, or pip believes a half-removed pillow-simd is present
  $pip uninstall -q -y pillow pillow-simd 2>/dev/null || true
  if ! simd_install; then
    echo "setup: building pillow-simd with AVX2 into $simd_wheels (once)" >&2
    if ! { CC="cc -mavx2" $pip wheel -q --no-cache-dir --no-deps -w "$simd_wheels" pillow-simd && simd_install; }; then
      echo "setup: pillow-simd did not build; keeping plain Pillow" >&2
      $pip install -q pillow
    fi
  fi
fi
echo "$want" > "$stamp"

#!/usr/bin/env bash
# Installs FFCV 1.0.2 for the `peers` benchmark into its own folder (FASTTIN_PEERS_SITE, default
# .peers-site), never into the main venv and never in CI: FFCV's declared dependencies would replace
# the headless OpenCV and numpy. Only the FFCV peer's worker puts this folder on its path; the rest
# comes from $PYTHON (default .venv/bin/python). Idempotent: nothing to do once FFCV imports.
#   bash benchmarks/peers/setup-ffcv.sh
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
SITE=${FASTTIN_PEERS_SITE:-$ROOT/.peers-site}
# numba 0.68 is the first release line whose wheels declare numpy < 2.6 (the main venv has 2.4);
# FFCV imports tqdm in its writer. Its other declared needs (fastargs, terminaltables, assertpy,
# psutil, pytorch_pfn_extras: GPU normalisation only) are not imported by the loader or writer.
PINS=(numba==0.68.1 llvmlite==0.50.0 tqdm==4.67.1)
APT=(libturbojpeg0-dev libopencv-dev pkg-config)

[ -x "$PY" ] || command -v "$PY" >/dev/null || { echo "setup-ffcv: no Python at $PY: set PYTHON" >&2; exit 2; }

check() {
    PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" "$PY" - <<'EOF'
from importlib.metadata import version
import ffcv, numba, numpy
print(f"ffcv {version('ffcv')}, numba {numba.__version__}, numpy {numpy.__version__}")
EOF
}

if check 2>/dev/null; then
    echo "setup-ffcv: already installed in $SITE"
    exit 0
fi

missing=()
for p in "${APT[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "setup-ffcv: FFCV builds against system libraries: run as root: apt-get install -y ${missing[*]}" >&2
        exit 2
    fi
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
fi

mkdir -p "$SITE"
# --no-deps everywhere: resolving ffcv's requirements would bring opencv-python and another numpy.
"$PY" -m pip install --disable-pip-version-check --target "$SITE" --upgrade --no-deps "${PINS[@]}"
"$PY" -m pip install --disable-pip-version-check --target "$SITE" --upgrade --no-deps ffcv==1.0.2
check

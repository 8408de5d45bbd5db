import os
import subprocess
import sys
from pathlib import Path

import pytest

from fasttin.pack import pack
from fasttin.synthetic import make_layout

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=300, env=None):
    """Run `python -m ...` as a user would; returns CompletedProcess with text output."""
    return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def synth_src(tmp_path_factory):
    """A 10-class synthetic source folder in the official layout (20 train, 5 val per class)."""
    return make_layout(tmp_path_factory.mktemp("synth"), n_classes=10, per_class=20, val_per_class=5, test_count=30)


@pytest.fixture(scope="session")
def packed(synth_src, tmp_path_factory):
    """synth_src packed as JPEG shards."""
    out = tmp_path_factory.mktemp("packed")
    pack(synth_src, out, workers=1, quiet=True)
    return out


@pytest.fixture(scope="session")
def packed_raw(synth_src, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed_raw")
    pack(synth_src, out, payload="raw", workers=1, quiet=True)
    return out


@pytest.fixture(scope="session")
def learnable(tmp_path_factory):
    """A learnable 10-class set with enough samples to train on (100 train, 20 val per class)."""
    out = tmp_path_factory.mktemp("learnable")
    pack(None, out, synthetic=100, classes=10, workers=2, quiet=True)
    return out


@pytest.fixture(scope="session")
def tin_zip():
    path = os.environ.get("TIN_ZIP")
    if not path or not Path(path).is_file():
        pytest.skip("TIN_ZIP does not point at the real tiny-imagenet-200.zip")
    return Path(path)


@pytest.fixture(scope="session")
def real_packed(tin_zip, tmp_path_factory):
    """The whole real archive packed once per session (about 12 s on 2 cores)."""
    out = tmp_path_factory.mktemp("real")
    pack(tin_zip, out, quiet=True)
    return out

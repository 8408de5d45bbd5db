import os
from pathlib import Path

import pytest

from fasttin.pack import pack
from fasttin.synthetic import make_layout

REALDATA_FIXTURES = {"tin_zip", "real_packed"}


def pytest_collection_modifyitems(config, items):
    """Every test that needs the real archive carries the realdata marker, whoever wrote it, so
    `-m "not realdata"` and docs/TESTING.md's marker list stay true; slow tests run first."""
    for item in items:
        if REALDATA_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.realdata)
    # Longest first (the real-data runs, then the other slow tests): pytest-xdist hands tests out
    # in this order and tools/test.sh lets an idle process take over a busy one's queue
    # (--dist worksteal), so no long test starts last with one process working alone.
    items.sort(key=lambda item: (item.get_closest_marker("slow") is None, item.get_closest_marker("realdata") is None))


@pytest.fixture(scope="session", autouse=True)
def probe_cache(tmp_path_factory):
    """The CPU probe's cache (fasttin/tuning.py) in the run's own temporary folder, shared by the test
    processes and every command they start: the suite writes nothing into ~/.cache, and probes once."""
    shared = tmp_path_factory.getbasetemp().parent if os.environ.get("PYTEST_XDIST_WORKER") else \
        tmp_path_factory.getbasetemp()
    os.environ["FASTTIN_CACHE"] = str(shared / "fasttin-cache")
    return shared / "fasttin-cache"


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
    """The whole real archive packed once per run, shared by the test processes (xdist's workers
    have their own temporary folders under one parent): the first to take the lock packs it
    (about 45 s on one core), the others wait for the lock and find it packed."""
    import fcntl
    shared = tmp_path_factory.getbasetemp().parent if os.environ.get("PYTEST_XDIST_WORKER") else \
        tmp_path_factory.getbasetemp()
    out = shared / "real-packed"
    with open(shared / "real-packed.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "manifest.json").is_file():
            pack(tin_zip, out, quiet=True)
    return out

"""tools/run.sh, the main job, end to end and offline, on a small archive made on the spot.

Offline, the seed-224 recipe cannot have torchvision's ImageNet weights: the job must still
finish, from scratch, and say so in config.json and summary.json. Re-invoking the job must reuse
the pack and the run instead of redoing them.
"""
import json
import os
import socket
import subprocess
import sys
import zipfile

import pytest
from helpers import CLI_TIMEOUT, ROOT

from fasttin.synthetic import make_layout

SHORT = ["--epochs", "1", "--res", "32", "--batch-size", "20", "--device", "cpu", "--backend", "resident",
         "--workers", "1", "--log-every", "1"]

# Loaded by every Python the job starts (through PYTHONPATH): a connection or a name look-up
# for anything but this machine fails at once, as on a machine without a network.
NO_NETWORK = '''
import socket

LOCAL = {"127.0.0.1", "::1", "localhost"}
_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo


def _check(address):
    if isinstance(address, tuple) and str(address[0]) not in LOCAL:
        raise OSError(101, f"network unreachable (blocked by tests/test_main_job.py): {address[0]}")


def connect(self, address):
    _check(address)
    return _connect(self, address)


def connect_ex(self, address):
    _check(address)
    return _connect_ex(self, address)


def getaddrinfo(host, *args, **kwargs):
    _check((host,))
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
'''


@pytest.fixture
def refused_port():
    """A local port bound but never listening: a connection to it is refused at once, for as long
    as the test holds it (no fixed port that something else might serve)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def offline_env(tmp_path, port):
    """The environment of a machine with no network and empty caches, running this checkout."""
    site = tmp_path / "offline-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_NETWORK)
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    dead = f"http://127.0.0.1:{port}"
    for var in ("http_proxy", "https_proxy", "ftp_proxy", "all_proxy"):
        env[var] = env[var.upper()] = dead
    paths = [str(site), env.get("PYTHONPATH", "")]
    env.update(PYTHONPATH=os.pathsep.join(p for p in paths if p),
               TORCH_HOME=str(tmp_path / "torch-home"), XDG_CACHE_HOME=str(tmp_path / "cache"),
               FASTTIN_CACHE=str(tmp_path / "fasttin-cache"), PIP_NO_INDEX="1", HF_HUB_OFFLINE="1",
               FASTTIN_PYTHON=sys.executable,  # this interpreter as it is: no set-up inside a test
               TIN_ZIP=str(small_archive(tmp_path)), FASTTIN_CLASSES="3", FASTTIN_DATA=str(tmp_path / "packed"),
               FASTTIN_RUN=str(tmp_path / "run"))
    return env


def small_archive(tmp_path):
    """A zip in the official layout: 4 classes, 14 train and 5 val images each."""
    src = make_layout(tmp_path / "src", n_classes=4, per_class=14, val_per_class=5, test_count=8)
    path = tmp_path / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(path, "w") as z:
        for f in sorted(src.rglob("*")):
            z.write(f, f.relative_to(src.parent).as_posix())
    return path


def main_job(env, *args):
    r = subprocess.run(["bash", str(ROOT / "tools" / "run.sh"), *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=CLI_TIMEOUT)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    return out


def file_stats(folder):
    """Every file's size and modification time: any rewrite shows, even of the same bytes."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()}


def read_rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_main_job_offline_from_scratch_then_reuses_its_work(tmp_path, refused_port):
    env = {**offline_env(tmp_path, refused_port), "FASTTIN_RECIPE": "seed-224"}  # the GPU's job, whatever is here
    data, run = tmp_path / "packed", tmp_path / "run"

    out = main_job(env, *SHORT)
    assert "scratch" in out.lower(), out[-4000:]  # the one line saying the weights cannot be had
    summary = json.loads((run / "summary.json").read_text())
    config = json.loads((run / "config.json").read_text())
    for name, record in (("summary.json", summary), ("config.json", config)):
        assert record["recipe"] == "seed-224", name
        assert record["pretrained"] == "none", name  # no figure can pass for the pretrained one
        assert isinstance(record["pretrained_reason"], str) and record["pretrained_reason"].strip(), name
    assert summary["epochs"] == 1 and [r["epoch"] for r in read_rows(run)] == [1]
    assert config["num_classes"] == 3  # FASTTIN_CLASSES packed a subset
    assert not list((tmp_path / "torch-home").rglob("*.pth")), "weights were downloaded: the network leaked"
    packed, done, rows = file_stats(data), file_stats(run), read_rows(run)
    assert any(name.endswith(".shard") for name in packed)

    # the same command again: the pack is reused and the finished run is not redone
    out = main_job(env, *SHORT)
    assert "already packed" in out, out[-4000:]
    assert file_stats(data) == packed
    assert {k: done[k] for k in ("last.pt", "best.pt", "metrics.jsonl")} == \
        {k: file_stats(run)[k] for k in ("last.pt", "best.pt", "metrics.jsonl")}

    # one more epoch: the run continues from its checkpoint, epoch 1 is not trained again
    extended = [*SHORT, "--epochs", "2"]
    main_job(env, *extended)
    assert file_stats(data) == packed
    now = read_rows(run)
    assert [r["epoch"] for r in now] == [1, 2] and now[0] == rows[0]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["pretrained"] == "none" and summary["pretrained_reason"]


def test_setup_a_second_time_sees_its_stamp_and_installs_nothing():
    """The README's 'both are idempotent': with the venv set up (CI's .ci/run has just done it), a
    second tools/setup.sh finds its stamp current, installs nothing and says nothing."""
    import hashlib
    stamp = ROOT / ".venv" / ".fasttin-setup"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + (ROOT / "tools" / "setup.sh").read_bytes())
    if not stamp.is_file() or stamp.read_text().strip() != want.hexdigest()[:16]:
        pytest.skip("the venv here is not set up from this checkout's files (tools/setup.sh would install)")
    before = stamp.stat().st_mtime_ns
    r = subprocess.run([str(ROOT / "tools" / "setup.sh")], capture_output=True, text=True, timeout=CLI_TIMEOUT)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stderr[-2000:]
    assert stamp.stat().st_mtime_ns == before


@pytest.mark.slow
def test_main_job_without_cuda_trains_the_cpu_recipe_and_says_why(tmp_path, refused_port):
    """No CUDA device: seed-224 would take hours an epoch; the job says so in one line, with what
    fast-cpu reaches on a CPU like this one and how to get seed-224 anyway, then trains fast-cpu."""
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the main job trains seed-224")
    from fasttin.tuning import fast_cpu_here
    out = main_job(offline_env(tmp_path, refused_port), *SHORT)
    said = [line for line in out.splitlines() if line.startswith("run.sh: no CUDA device here")]
    assert len(said) == 1 and "fast-cpu" in said[0] and "FASTTIN_RECIPE=seed-224" in said[0], out[-3000:]
    assert fast_cpu_here() in said[0]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["recipe"] == "fast-cpu"

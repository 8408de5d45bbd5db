"""fasttin installed the way users install packages: a wheel built from the project's files, put
into a fresh environment outside the checkout, runs every command. An editable install
(tools/setup.sh) hides a package missing from the wheel: the one built here has only what
pyproject.toml ships."""
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from helpers import CLI_TIMEOUT, ROOT

SOURCES = ("pyproject.toml", "README.md", "fasttin", "benchmarks")


def packages(root: Path) -> set[str]:
    """Every package of the checkout that the wheel must hold: a folder with an __init__.py."""
    return {".".join(p.parent.relative_to(root).parts) for top in ("fasttin", "benchmarks")
            for p in (root / top).rglob("__init__.py")}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the checkout's files (the build leaves nothing in the checkout)."""
    src, dist = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "results"))
        else:
            shutil.copy(ROOT / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "--no-index", "-w", str(dist), str(src)], capture_output=True, text=True, timeout=CLI_TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    (built,) = dist.glob("fasttin-*.whl")
    return built


def test_the_wheel_holds_every_package_and_nothing_of_the_checkout_besides(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {"/".join(n.split("/")[:-1]).replace("/", ".") for n in names if n.endswith("/__init__.py")}
    assert packages(ROOT) <= shipped, f"missing from the wheel: {sorted(packages(ROOT) - shipped)}"
    assert "fasttin.shards" in shipped  # the package a hand-written list once left out
    assert not [n for n in names if n.startswith(("tests/", "tools/", "benchmarks/results/", "data/"))]
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = [line for line in zipfile.ZipFile(wheel).read(meta).decode().splitlines()
                if line.startswith("Requires-Dist:")]
    assert any(" torch" in line for line in requires) and any("numpy" in line for line in requires)


@pytest.mark.slow
def test_installed_from_the_wheel_every_command_runs_outside_the_checkout(wheel, tmp_path):
    """A fresh venv with only the wheel installed (its dependencies seen through a .pth to this
    interpreter's site-packages, whose editable fasttin hook is never run); every command from a
    folder outside the checkout: synthetic pack, an epoch, eval, predict, info, benchmarks."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=CLI_TIMEOUT)
    py = venv / "bin" / "python"
    purelib = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                        str(purelib), str(wheel)], capture_output=True, text=True, timeout=CLI_TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    (purelib / "deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["FASTTIN_CACHE"] = str(tmp_path / "cache")

    def run(*args):
        r = subprocess.run([str(py), *map(str, args)], cwd=work, env=env, capture_output=True, text=True,
                           timeout=CLI_TIMEOUT)
        assert r.returncode == 0, f"{args}: {r.stderr[-3000:]}"
        assert "Traceback" not in r.stderr, r.stderr[-3000:]
        return r.stdout

    where = run("-c", "import fasttin, benchmarks, fasttin.shards; print(fasttin.__file__, benchmarks.__file__)")
    assert str(ROOT) not in where and all(str(purelib) in p for p in where.split()), where
    run("-m", "fasttin.info")
    run("-m", "fasttin.pack", "--synthetic", "6", "--classes", "3", "--out", "d")
    run("-m", "fasttin.train", "--data", "d", "--out", "r", "--recipe", "seed-64-scratch", "--res", "32",
        "--epochs", "1", "--batch-size", "6", "--device", "cpu", "--workers", "1")
    assert '"top1"' in run("-m", "fasttin.eval", "--ckpt", "r/best.pt", "--data", "d", "--device", "cpu")
    rows = run("-m", "fasttin.predict", "--ckpt", "r/best.pt", "--data", "d", "--split", "val", "--device", "cpu")
    assert len(rows.splitlines()) > 3, rows
    run("-m", "benchmarks.run", "--quick", "--device", "cpu", "--stages", "read,model", "--json", "b.json")
    assert (work / "b.json").is_file() and not (ROOT / "build").exists()

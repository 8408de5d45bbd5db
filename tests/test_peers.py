"""The peers benchmark stage: the runner with the peers the main venv has, the MAE, skip records."""
import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.peers import mae, run_peers
from benchmarks.peers.__main__ import main as peers_main
from benchmarks.peers.loaders import Spec
from benchmarks.peers.runner import CLASSIC_AT_64, _record, _start
from benchmarks.pipelines import image_folder, relative_paths, upscaled_folder
from fasttin.errors import EXIT_BAD_INPUT, EXIT_OK, UserError
from fasttin.loaders import dali
from fasttin.loaders.augment import normalize
from fasttin.shards import open_split

RES = 80  # an upscale, small enough to stay quick
SCHEMA = {"stage", "name", "backend", "res", "batch_size", "device", "dtype", "img_per_s", "mb_per_s", "repeats",
          "kernel"}


def _normalised(pixels: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    return normalize(x, dtype)


def test_mae_is_zero_for_pil_bicubic_and_measures_another_kernel(packed):
    ds = open_split(packed, "train")
    ref = mae.reference(ds, 8, RES)
    assert ref.shape == (8, RES, RES, 3)
    assert mae.mean_abs_error(mae.to_pixels(_normalised(ref)), ref) == 0.0
    area = np.stack([cv2.resize(ds.image(i), (RES, RES), interpolation=cv2.INTER_AREA) for i in range(8)])
    err = mae.mean_abs_error(mae.to_pixels(_normalised(area)), ref)
    assert err == pytest.approx(np.abs(area.astype(float) - ref).mean())
    assert err > 0.5
    with pytest.raises(ValueError, match="reference"):
        mae.mean_abs_error(mae.to_pixels(_normalised(area[:4])), ref)


def test_mae_reference_at_64_is_the_image_itself(packed):
    ds = open_split(packed, "train")
    assert np.array_equal(mae.reference(ds, 3, 64), ds.images(np.arange(3)))
    pil = np.asarray(Image.fromarray(ds.image(0)).resize((RES, RES), Image.BICUBIC))
    assert np.array_equal(mae.reference(ds, 1, RES)[0], pil)


def test_prepared_folders_hold_every_image_once(packed_raw, tmp_path):
    ds = open_split(packed_raw, "train")
    folder = image_folder(ds, tmp_path)
    rel = relative_paths(ds)
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png")) == sorted(rel)
    decoded = cv2.cvtColor(cv2.imread(str(folder / rel[5])), cv2.COLOR_BGR2RGB)
    assert np.array_equal(decoded, ds.image(5))  # PNG for raw payloads: lossless
    assert image_folder(ds, tmp_path) == folder  # made once
    up = upscaled_folder(ds, tmp_path, RES)
    assert cv2.imread(str(up / rel[0])).shape == (RES, RES, 3)
    assert not list(tmp_path.glob("*.tmp*"))


@pytest.mark.slow
def test_runner_measures_the_installed_peers_and_skips_the_rest(packed, tmp_path):
    out = tmp_path / "peers.json"
    peers = "fasttin-resident,fasttin-pil,fasttin-dali,dali-files,torchvision,classic,ffcv-raw"
    rc = peers_main(["--data", str(packed), "--split", "train", "--res", str(RES), "--batch-size", "50",
                     "--rounds", "2", "--workers", "1", "--mae-images", "20", "--peers", peers,
                     "--cache", str(tmp_path / "cache"), "--ffcv-site", str(tmp_path / "no-ffcv"), "--json", str(out)])
    assert rc == EXIT_OK
    records = {r["backend"]: r for r in json.loads(out.read_text())["records"]}
    assert list(records) == peers.split(",")
    for r in records.values():
        assert SCHEMA <= r.keys() and r["stage"] == "peers" and r["batch_size"] == 50 and r["res"] == RES
    assert "setup-ffcv.sh" in records["ffcv-raw"]["skipped"]
    measured = [r for r in records.values() if not r.get("skipped")]
    assert {r["backend"] for r in measured} == {"fasttin-resident", "fasttin-pil", "torchvision", "classic"} | (
        {"fasttin-dali", "dali-files"} if dali.available() is None else set())
    for r in measured:
        assert r["img_per_s"] > 0 and r["repeats"] == 2 and len(r["runs"]) == 2, r
        assert r["mae_images"] == 20 and "vs_ffcv_raw" not in r
        assert r["dtype"] == ("float16" if r["backend"] == "dali-files" else "bfloat16")
    for backend in ("fasttin-resident", "fasttin-pil", "torchvision"):  # PIL's kernel exactly
        assert records[backend]["mae_vs_pil"] == 0.0
    assert records["classic"]["mae_vs_pil"] > 0.3  # OpenCV's cubic (a = -0.75) and a JPEG on disk
    assert records["classic"]["kernel"].startswith("OpenCV INTER_CUBIC")


def test_classic_at_64_is_skipped_without_a_worker(packed, tmp_path):
    (rec,) = run_peers(packed, "train", (64,), batch_size=50, peers=["classic"], cache=tmp_path)
    assert rec["skipped"] == CLASSIC_AT_64 and rec["kernel"] == "none (native 64 px)" and rec["img_per_s"] is None


def test_a_worker_that_fails_becomes_a_skipped_record(packed, tmp_path):
    spec = Spec(peer="fasttin-resident", data=str(tmp_path / "missing"), split="train", res=64, batch_size=10,
                workers=1, dtype="bfloat16", cache=str(tmp_path), folder=str(tmp_path), upscaled=None)
    records = {"fasttin-resident": _record("fasttin-resident", 64, 10, 1)}
    live = _start({"fasttin-resident": spec}, records, tmp_path, timeout_s=300)
    assert live == {}
    assert records["fasttin-resident"]["skipped"].startswith("failed to start: worker exited with status 1")


def test_bad_input_is_one_line(packed, tmp_path, capsys):
    assert peers_main(["--data", str(tmp_path / "nowhere")]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("benchmarks.peers: error:") and err.count("\n") == 1
    with pytest.raises(UserError, match="fewer than one batch"):
        run_peers(packed, "val", batch_size=1000)
    with pytest.raises(UserError, match="unknown peer"):
        run_peers(packed, "train", peers=["ffcv-raw", "tensorflow"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # the parser's one line, as for every command's flags
        peers_main(["--data", str(packed), "--res", "64,big"])
    err = capsys.readouterr().err
    assert e.value.code == EXIT_BAD_INPUT and err.count("\n") == 1 and "--res" in err and "big" in err

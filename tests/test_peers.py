"""The peers benchmark stage: the runner with the peers the main venv has, the MAE, skip records."""
import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.peers import mae
from benchmarks.peers.loaders import Spec
from benchmarks.peers.stage import CLASSIC_AT_64, Worker
from benchmarks.pipelines import relative_paths, split_files
from benchmarks.run import main as run_main
from benchmarks.runner import Skip
from benchmarks.stages import add_ratios
from fasttin.errors import EXIT_BAD_INPUT, EXIT_OK
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
    folder = split_files(ds, tmp_path)
    rel = relative_paths(ds)
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png")) == sorted(rel)
    decoded = cv2.cvtColor(cv2.imread(str(folder / rel[5])), cv2.COLOR_BGR2RGB)
    assert np.array_equal(decoded, ds.image(5))  # PNG for raw payloads: lossless
    assert split_files(ds, tmp_path) == folder  # made once
    up = split_files(ds, tmp_path, upscale=RES)
    assert cv2.imread(str(up / rel[0])).shape == (RES, RES, 3)
    assert not list(tmp_path.glob("*.tmp*"))


def peers_run(packed, tmp_path, *flags, peers="fasttin-resident", res=RES):
    out = tmp_path / "peers.json"
    rc = run_main(["--data", str(packed), "--split", "train", "--stages", "peers", "--res", str(res),
                   "--batch-size", "50", "--repeats", "2", "--workers", "1", "--mae-images", "20", "--peers", peers,
                   "--cache", str(tmp_path / "cache"), "--ffcv-site", str(tmp_path / "no-ffcv"), "--json", str(out),
                   "--device", "cpu", *flags])
    return rc, {r["backend"]: r for r in json.loads(out.read_text())["records"]} if out.exists() else {}


@pytest.mark.slow
def test_the_peers_stage_measures_the_installed_peers_and_skips_the_rest(packed, tmp_path):
    peers = "fasttin-resident,fasttin-pil,fasttin-dali,ffcv-raw,dali-files,torchvision,classic"
    rc, records = peers_run(packed, tmp_path, peers=peers)
    assert rc == EXIT_OK
    assert list(records) == peers.split(",")  # the table's order
    for r in records.values():
        assert SCHEMA <= r.keys() and r["stage"] == "peers" and r["batch_size"] == 50 and r["res"] == RES
        assert r["workers"] == 1 and r["device"] == "cpu"
    assert "setup-ffcv.sh" in records["ffcv-raw"]["skipped"]
    measured = [r for r in records.values() if not r.get("skipped")]
    assert {r["backend"] for r in measured} == {"fasttin-resident", "fasttin-pil", "torchvision", "classic"} | (
        {"fasttin-dali", "dali-files"} if dali.available() is None else set())
    for r in measured:
        assert r["img_per_s"] > 0 and r["repeats"] == 2 and len(r["runs"]) == 2, r
        assert r["mae_images"] == 20 and "vs_ffcv_raw" not in r and r["version"]
        assert r["dtype"] == ("float16" if r["backend"] == "dali-files" else "bfloat16")
    for backend in ("fasttin-resident", "fasttin-pil", "torchvision"):  # PIL's kernel exactly
        assert records[backend]["mae_vs_pil"] == 0.0
    assert records["classic"]["mae_vs_pil"] > 0.3  # OpenCV's cubic (a = -0.75) and a JPEG on disk
    assert records["classic"]["kernel"].startswith("OpenCV INTER_CUBIC")


def test_vs_ffcv_raw_is_each_peer_against_the_ffcv_raw_record_of_its_resolution():
    recs = [{"stage": "peers", "res": r, "backend": k, "img_per_s": v}
            for r, k, v in ((64, "ffcv-raw", 100.0), (64, "fasttin-resident", 250.0), (224, "fasttin-resident", 9.0))]
    add_ratios(recs)
    assert [r.get("vs_ffcv_raw") for r in recs] == [1.0, 2.5, None]  # no FFCV figure at 224: no ratio


def test_classic_at_64_and_a_split_smaller_than_a_batch_are_skipped_without_a_worker(packed, tmp_path):
    rc, records = peers_run(packed, tmp_path, peers="classic", res=64)
    assert rc == EXIT_OK and records["classic"]["skipped"] == CLASSIC_AT_64
    assert records["classic"]["kernel"] == "none (native 64 px)" and records["classic"]["img_per_s"] is None
    rc, records = peers_run(packed, tmp_path, "--batch-size", "1000")
    assert "fewer than one batch of 1000" in records["fasttin-resident"]["skipped"]


def test_a_worker_that_fails_to_start_dies_or_hangs_is_a_skip_and_is_stopped(tmp_path):
    spec = Spec(peer="fasttin-resident", data=str(tmp_path / "missing"), split="train", res=64, batch_size=10,
                workers=1, dtype="bfloat16", cache=str(tmp_path), folder=str(tmp_path))
    w = Worker(spec, tmp_path, timeout_s=300)
    with pytest.raises(Skip, match="worker exited with status 1"):  # the split cannot be opened
        w.ask()
    w.close()
    w = Worker(spec, tmp_path, timeout_s=0.01)  # its imports alone take longer than that
    with pytest.raises(Skip, match="no answer to 'start' within 0.01 s"):
        w.ask()
    w.proc.join(timeout=30)
    assert w.proc.exitcode is not None and w.proc.exitcode != 0  # killed, not left running
    w.close()


def test_a_worker_whose_runner_is_gone_ends_cleanly(packed, tmp_path):
    """A runner killed outright leaves its workers a closed pipe: they end as at quit, not with a traceback."""
    spec = Spec(peer="fasttin-resident", data=str(packed), split="train", res=64, batch_size=10, workers=1,
                dtype="bfloat16", cache=str(tmp_path), folder="")
    w = Worker(spec, tmp_path, timeout_s=300)
    assert "ready" in w.ask()
    w.conn.close()
    w.proc.join(timeout=120)
    assert w.proc.exitcode == 0


def test_an_unknown_peer_is_one_line_before_any_work(packed, tmp_path, capsys):
    assert run_main(["--data", str(packed), "--stages", "peers", "--peers", "ffcv-raw,tensorflow"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("benchmarks.run: error: --peers: unknown peers tensorflow") and err.count("\n") == 1

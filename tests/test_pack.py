"""The packer and the shard reader: round trips, labels, subsets, bad input, atomicity, verify."""
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, STOP_AT_SHARD, refused, run_cli, snapshot, stopped, wait_for
from PIL import Image

from fasttin import shards
from fasttin.pack import PackError, check_image, clean_leftovers, is_complete, pack, rgb8, verify
from fasttin.shards import FormatError, open_split
from fasttin.source import SourceError, download_official
from fasttin.synthetic import make_layout


def source_file(src, split, key, wnid=None):
    if split == "train":
        return src / "train" / wnid / "images" / key
    return src / split / "images" / key


@pytest.mark.parametrize("fixture", ["packed", "packed_raw"])
def test_round_trip_matches_pil_decode_of_source(request, synth_src, fixture):
    out = request.getfixturevalue(fixture)
    for split in ("train", "val", "test"):
        ds = open_split(out, split)
        assert len(ds) == {"train": 200, "val": 50, "test": 30}[split]
        for i in range(0, len(ds), 7):
            wnid = ds.classes[ds.labels[i]] if split == "train" else None
            expected = np.asarray(Image.open(source_file(synth_src, split, ds.keys[i], wnid)).convert("RGB"))
            img = ds.image(i)
            assert img.shape == (64, 64, 3) and img.dtype == np.uint8
            np.testing.assert_array_equal(img, expected)


def test_jpeg_payload_is_the_original_bytes_and_zero_copy(packed, synth_src):
    ds = open_split(packed, "val")
    view = ds.encoded(3)
    assert view.dtype == np.uint8 and not view.flags.owndata and not view.flags.writeable
    assert view.tobytes() == (synth_src / "val" / "images" / ds.keys[3]).read_bytes()


def test_labels_classes_and_order(packed, synth_src):
    ds = open_split(packed, "train")
    assert ds.classes == sorted(ds.classes) and len(ds.classes) == 10
    for key, label in zip(ds.keys, ds.labels):
        assert key.split("_")[0] == ds.classes[label]  # train label comes from the folder
    assert list(ds.keys) != sorted(ds.keys, key=lambda k: (k.split("_")[0], int(k.split("_")[1][:-5])))  # shuffled
    ann = dict(line.split("\t")[:2] for line in (synth_src / "val" / "val_annotations.txt").read_text().splitlines())
    val = open_split(packed, "val")
    assert [val.classes[lab] for lab in val.labels] == [ann[k] for k in val.keys]
    assert (open_split(packed, "test").labels == -1).all()
    image, label = val[7]  # the indexed-dataset protocol (FFCV's writer reads it)
    assert label == val.labels[7] and type(label) is int and (image == val.image(7)).all()
    assert (val[-1][0] == val.image(len(val) - 1)).all()
    with pytest.raises(IndexError):
        val[len(val)]
    m = json.loads((packed / "manifest.json").read_text())
    assert m["classes"][0]["words"] == "synthetic class 0"
    assert m["splits"]["val"]["shuffle_seed"] == [0, 1]


def test_same_seed_same_order_other_seed_other_order(synth_src, packed, tmp_path):
    again = pack(synth_src, tmp_path / "a", workers=2, quiet=True)
    other = pack(synth_src, tmp_path / "b", workers=1, seed=1, quiet=True)
    assert open_split(tmp_path / "a", "train").keys == open_split(packed, "train").keys
    assert open_split(tmp_path / "b", "train").keys != open_split(packed, "train").keys
    assert again["options"]["seed"] == 0 and other["options"]["seed"] == 1


def test_overhead_under_two_percent(packed):
    m = json.loads((packed / "manifest.json").read_text())
    for split in m["splits"].values():
        total = sum(s["bytes"] for s in split["shards"])
        assert (total - split["payload_bytes"]) / split["payload_bytes"] < 0.02


def test_several_shards_random_access(synth_src, tmp_path):
    pack(synth_src, tmp_path, shard_mb=0.05, workers=1, quiet=True)
    ds = open_split(tmp_path, "train")
    assert len(ds.manifest["splits"]["train"]["shards"]) > 3
    ref = open_split(tmp_path, "train")
    for i in (0, 57, 123, 199):
        np.testing.assert_array_equal(ds.image(i), ref.image(i))
    assert sum(len(ds.encoded(i)) for i in range(len(ds))) == ds.manifest["splits"]["train"]["payload_bytes"]


def test_subsets(synth_src, tmp_path):
    m = pack(synth_src, tmp_path, classes=3, per_class=4, workers=1, quiet=True)
    tr, va = open_split(tmp_path, "train"), open_split(tmp_path, "val")
    assert len(tr) == 12 and set(tr.labels) == {0, 1, 2}
    assert sorted(k for k in tr.keys if k.startswith(tr.classes[0])) == sorted(
        f"{tr.classes[0]}_{k}.JPEG" for k in range(4))  # the first 4 by file name (natural order)
    assert len(va) == 15 and set(va.labels) == {0, 1, 2}
    assert "test" not in m["splits"]
    with pytest.raises(ValueError, match="unknown split 'test'"):
        open_split(tmp_path, "test")


def test_rerun_is_noop_unless_force(synth_src, tmp_path):
    pack(synth_src, tmp_path, workers=1, quiet=True)
    mtime = (tmp_path / "manifest.json").stat().st_mtime_ns
    r = run_cli("fasttin.pack", "--src", synth_src, "--out", tmp_path)
    assert r.returncode == 0 and "nothing to do" in r.stdout
    assert (tmp_path / "manifest.json").stat().st_mtime_ns == mtime
    with pytest.raises(PackError, match="other options"):
        pack(synth_src, tmp_path, classes=2, quiet=True)
    pack(synth_src, tmp_path, workers=1, force=True, quiet=True)
    assert (tmp_path / "manifest.json").stat().st_mtime_ns != mtime


def test_a_complete_pack_is_reused_only_for_its_own_source(synth_src, tmp_path):
    """Another --src, or one that is gone, was answered 'already packed, nothing to do' (exit 0)."""
    out, other = tmp_path / "out", tmp_path / "other"
    pack(synth_src, out, workers=1, quiet=True)
    shutil.copytree(synth_src, other)
    before = snapshot(out)
    with pytest.raises(PackError, match=f"packed from .*, not from --src {other}"):
        pack(other, out, quiet=True)
    with pytest.raises(PackError, match="gone.zip: no such file"):
        pack(tmp_path / "gone.zip", out, quiet=True)
    assert pack(synth_src, out, quiet=True) and snapshot(out) == before


def test_a_mount_point_as_out_is_refused_before_the_work(synth_src, tmp_path, monkeypatch):
    """The pack is built beside --out and renamed into place: a mount point failed only at the end."""
    out = tmp_path / "vol"
    out.mkdir()
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == out)
    with pytest.raises(PackError, match="mount point"):
        pack(synth_src, out, workers=1, quiet=True)
    assert list(tmp_path.iterdir()) == [out] and list(out.iterdir()) == []


def test_out_inside_src_refused(synth_src):
    with pytest.raises(PackError, match="inside --src"):
        pack(synth_src, synth_src / "packed", quiet=True)
    assert not (synth_src / "packed").exists()


@pytest.mark.parametrize("mb", [0, -1, float("nan"), 1e-9, 4096])
def test_a_shard_size_the_writer_cannot_hold_is_refused_by_name(mb, tmp_path):
    """Under one byte (the writer's size is whole bytes) or past u32 offsets: refused before any work."""
    with pytest.raises(PackError, match="--shard-mb"):
        pack(None, tmp_path / "out", synthetic=1, classes=2, shard_mb=mb, quiet=True)
    assert not (tmp_path / "out").exists()


def test_zip_source_read_in_place(synth_src, packed, tmp_path):
    z = tmp_path / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in sorted(synth_src.rglob("*")):
            zf.write(p, "tiny-imagenet-200/" + str(p.relative_to(synth_src)))
    m = pack(z, tmp_path / "out", workers=2, quiet=True)
    assert m["source"]["kind"] == "zip" and len(m["source"]["sha256"]) == 64
    assert open_split(tmp_path / "out", "val").keys == open_split(packed, "val").keys
    np.testing.assert_array_equal(open_split(tmp_path / "out", "train").image(5), open_split(packed, "train").image(5))


def test_synthetic_flag(tmp_path):
    r = run_cli("fasttin.pack", "--synthetic", "6", "--classes", "4", "--out", tmp_path, "--workers", "1")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["source"]["kind"] == "synthetic" and m["splits"]["train"]["count"] == 24
    assert m["splits"]["test"]["count"] > 0 and len(m["classes"]) == 4


# ---- conversions and bad input -------------------------------------------------------------------

@pytest.fixture
def bad_src(tmp_path):
    return make_layout(tmp_path / "src", n_classes=3, per_class=4, val_per_class=2, test_count=2)


def test_png_and_cmyk_are_reencoded_as_444_jpeg(bad_src, tmp_path):
    png = bad_src / "train" / "n90000000" / "images" / "n90000000_0.JPEG"
    rgb = np.asarray(Image.open(png).convert("RGB"))
    Image.fromarray(rgb).save(png, "PNG")
    cmyk = bad_src / "train" / "n90000001" / "images" / "n90000001_1.JPEG"
    Image.open(cmyk).convert("CMYK").save(cmyk, "JPEG", quality=95)
    gray = bad_src / "val" / "images" / "val_0.JPEG"
    Image.open(gray).convert("L").save(gray, "JPEG")
    m = pack(bad_src, tmp_path / "out", workers=1, quiet=True)
    assert sorted(m["splits"]["train"]["converted"]) == [
        "train/n90000000/images/n90000000_0.JPEG", "train/n90000001/images/n90000001_1.JPEG"]
    assert m["splits"]["val"]["converted"] == []  # grayscale JPEG is kept as is
    ds = open_split(tmp_path / "out", "train")
    i = ds.keys.index("n90000000_0.JPEG")
    with Image.open(io.BytesIO(ds.encoded(i).tobytes())) as im:
        assert im.format == "JPEG" and im.mode == "RGB"
        assert im.layer[0][1:3] == (1, 1)  # 4:4:4: no chroma subsampling
    assert np.abs(ds.image(i).astype(int) - rgb).mean() < 2
    val = open_split(tmp_path / "out", "val")
    j = val.keys.index("val_0.JPEG")
    assert val.encoded(j).tobytes() == gray.read_bytes() and val.image(j).shape == (64, 64, 3)


def break_everything(src):
    (src / "train" / "n90000000" / "images" / "n90000000_1.JPEG").write_bytes(b"not an image at all")
    t = src / "train" / "n90000001" / "images" / "n90000001_2.JPEG"
    t.write_bytes(t.read_bytes()[:300])  # truncated
    Image.new("RGB", (64, 48)).save(src / "train" / "n90000002" / "images" / "n90000002_3.JPEG")
    (src / "val" / "images" / "val_1.JPEG").unlink()  # annotated but missing
    stray = src / "train" / "n99999999" / "images"
    stray.mkdir(parents=True)
    shutil.copy(src / "train" / "n90000000" / "images" / "n90000000_0.JPEG", stray / "n99999999_0.JPEG")
    return ["n90000000_1.JPEG", "n90000001_2.JPEG", "n90000002_3.JPEG", "val_1.JPEG", "n99999999_0.JPEG"]


def test_bad_files_fail_naming_every_one_and_write_nothing_complete(bad_src, tmp_path):
    culprits = break_everything(bad_src)
    r = run_cli("fasttin.pack", "--src", bad_src, "--out", tmp_path / "out")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    for name in culprits:
        assert name in r.stderr, name
    assert "not 64x64" in r.stderr and "not in wnids.txt" in r.stderr and "missing" in r.stderr
    assert not is_complete(tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.shard*"))


def test_skip_bad_packs_the_rest_and_counts_add_up(bad_src, tmp_path):
    culprits = break_everything(bad_src)
    m = pack(bad_src, tmp_path / "out", skip_bad=True, workers=2, quiet=True)
    skipped = [s["file"].rsplit("/", 1)[1] for sp in m["splits"].values() for s in sp["skipped"]]
    assert sorted(skipped) == sorted(culprits)
    for name, sp in m["splits"].items():
        assert sp["count"] + len(sp["skipped"]) == sp["found"]
        assert len(open_split(tmp_path / "out", name)) == sp["count"]
    assert m["splits"]["train"]["count"] == 12 - 3


@pytest.mark.parametrize("missing", ["wnids.txt", "val/val_annotations.txt"])
def test_missing_index_files(bad_src, tmp_path, missing):
    (bad_src / missing).unlink()
    r = run_cli("fasttin.pack", "--src", bad_src, "--out", tmp_path / "out")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert missing.split("/")[-1] in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not is_complete(tmp_path / "out")


def test_killed_repack_keeps_the_old_pack_and_the_next_run_cleans_up(tmp_path):
    src = make_layout(tmp_path / "src", n_classes=4, per_class=30, val_per_class=2, test_count=2)
    out = tmp_path / "out"
    pack(src, out, classes=2, workers=1, quiet=True)
    before = snapshot(out)
    proc = subprocess.Popen([sys.executable, "-c", STOP_AT_SHARD, "train-002.shard", "--src", str(src),
                             "--out", str(out), "--shard-mb", "0.02", "--workers", "1", "--force"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: stopped(proc.pid), proc, what="the repack stopping at its third shard")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob("out.tmp*/train-002.shard.tmp*"))  # killed mid-build
    assert snapshot(out) == before and len(open_split(out, "train", verify=True)) == 60
    r = run_cli("fasttin.pack", "--src", src, "--out", out, "--shard-mb", "0.02", "--force")
    assert r.returncode == 0, r.stderr
    assert len(open_split(out, "train")) == 120 and not list(tmp_path.glob("out.*tmp*"))


def test_kill_between_the_swaps_renames_is_repaired(synth_src, tmp_path):
    out = tmp_path / "out"
    pack(synth_src, out, classes=2, workers=1, quiet=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    old = tmp_path / f"out.old.tmp{dead}"
    os.rename(out, old)  # what a kill leaves between "old pack aside" and "new pack in"
    half = tmp_path / f"out.tmp{dead}"
    half.mkdir()
    (half / "train-000.shard.tmp1").write_bytes(b"x")
    removed = clean_leftovers(out)
    assert is_complete(out) and len(open_split(out, "train")) == 40
    assert removed == [half] and not old.exists()


def test_verify_hashes_each_shard_once_per_process(packed, monkeypatch):
    calls = []
    real = shards.reader.digest
    monkeypatch.setattr(shards.reader, "digest", lambda p, *a: calls.append(p) or real(p, *a))
    monkeypatch.setattr(shards.reader, "_VERIFIED", set())
    open_split(packed, "train", verify=True)
    open_split(packed, "train", verify=True)
    open_split(packed, "val", verify=True)
    assert [p.name for p in calls] == ["train-000.shard", "val-000.shard"]


def test_describe_names_shard_sample_and_file(synth_src, tmp_path):
    pack(synth_src, tmp_path, shard_mb=0.02, workers=1, quiet=True)
    ds = open_split(tmp_path, "train")
    first = [i for i in range(len(ds)) if ds._shard[i] == 1]
    assert ds.describe(first[2]) == f"train-001.shard sample 2 ({ds.keys[first[2]]})"


# ---- every image mode to 8-bit RGB -----------------------------------------------------------------

GRADIENT = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.int64)  # 0..65520


def png(im):
    b = io.BytesIO()
    im.save(b, "PNG")
    return b.getvalue()


def test_16bit_png_is_scaled_not_clipped():
    data = png(Image.fromarray(GRADIENT.astype(np.uint16)))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    raw, converted, err = check_image(data, "raw")
    assert err is None and converted
    got = np.frombuffer(raw, np.uint8).reshape(64, 64, 3)
    np.testing.assert_array_equal(got, np.repeat(((GRADIENT + 128) // 257)[..., None], 3, -1).astype(np.uint8))
    jpeg = check_image(data, "jpeg")[0]
    assert np.abs(np.asarray(Image.open(io.BytesIO(jpeg))).astype(int) - got).mean() < 2


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16bit_modes_scale_alike(mode):
    dtype = {"I;16": "<u2", "I;16B": ">u2", "I": "<i4"}[mode]
    im = Image.frombytes(mode, (64, 64), GRADIENT.astype(dtype).tobytes())
    rgb, why = rgb8(im)
    assert why is None and rgb.dtype == np.uint8 and (rgb[..., 0] == (GRADIENT + 128) // 257).all()


def test_out_of_range_and_float_modes_are_refused_by_name():
    assert "outside the 16-bit range" in rgb8(Image.frombytes("I", (64, 64), (-GRADIENT).astype("<i4").tobytes()))[1]
    assert "pixel mode F" in rgb8(Image.new("F", (64, 64)))[1]


def test_transparency_is_composited_on_black():
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 200, 128
    rgba[0, 0, 3] = 0
    got = rgb8(Image.fromarray(rgba, "RGBA"))[0]
    assert got[1, 1].tolist() == [100, 100, 100] and got[0, 0].tolist() == [0, 0, 0]
    la = rgb8(Image.merge("LA", [Image.new("L", (64, 64), 255), Image.new("L", (64, 64), 51)]))[0]
    assert (la == 51).all()
    pal = Image.new("P", (64, 64), 1)
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.info["transparency"] = 0
    rgb, _, err = check_image(png(pal), "raw")
    got = np.frombuffer(rgb, np.uint8).reshape(64, 64, 3)
    assert err is None and got[0, 0].tolist() == [0, 0, 0] and got[5, 5].tolist() == [0, 255, 0]


def test_one_bit_and_palette_without_transparency():
    bw = Image.new("1", (64, 64), 0)
    bw.putpixel((3, 3), 1)
    got = rgb8(bw)[0]
    assert got[3, 3].tolist() == [255] * 3 and got[0, 0].tolist() == [0] * 3
    pal = Image.new("P", (64, 64), 1)
    pal.putpalette([255, 0, 0, 10, 20, 30] + [0] * 762)
    assert (rgb8(pal)[0] == [10, 20, 30]).all()


def test_verify_catches_one_flipped_byte(synth_src, tmp_path):
    pack(synth_src, tmp_path, workers=1, quiet=True)
    assert verify(tmp_path) == []
    shard = tmp_path / "train-000.shard"
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0x01
    shard.write_bytes(bytes(data))
    problems = verify(tmp_path)
    assert len(problems) == 1 and "train-000.shard" in problems[0] and "sha256" in problems[0]
    r = run_cli("fasttin.pack", "--verify", tmp_path)
    assert r.returncode == 1 and "train-000.shard" in r.stderr
    with pytest.raises(FormatError, match="sha256"):
        open_split(tmp_path, "train", verify=True)


def test_reader_refuses_truncated_missing_and_foreign(packed, tmp_path):
    shutil.copytree(packed, tmp_path / "c")
    shard = tmp_path / "c" / "val-000.shard"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(FormatError, match="truncated"):
        open_split(tmp_path / "c", "val")
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="missing shard"):
        open_split(tmp_path / "c", "val")
    with pytest.raises(FileNotFoundError, match="not a packed data set"):
        open_split(tmp_path, "val")
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    m["version"] = 99
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(FormatError, match="version 99"):
        open_split(tmp_path / "c", "train")


def test_download_refuses_mismatch_and_offline_names_src(tmp_path):
    fake = tmp_path / "fake.zip"
    fake.write_bytes(b"x" * 1000)
    with pytest.raises(SourceError, match="refused"):
        download_official(tmp_path / "cache", url=fake.as_uri())
    assert not list((tmp_path / "cache").glob("*"))
    with pytest.raises(SourceError, match="--src"):
        download_official(tmp_path / "cache", url="http://127.0.0.1:9/tiny-imagenet-200.zip")


def test_info_runs():
    r = run_cli("fasttin.info")
    assert r.returncode == 0 and "torch" in r.stdout and "pillow_simd" in r.stdout


# ---- the real archive ---------------------------------------------------------------------------

@pytest.mark.realdata
def test_real_archive(real_packed, tin_zip):
    m = json.loads((real_packed / "manifest.json").read_text())
    assert {k: v["count"] for k, v in m["splits"].items()} == {"train": 100_000, "val": 10_000, "test": 10_000}
    assert len(m["classes"]) == 200 and all(c["words"] for c in m["classes"])
    with zipfile.ZipFile(tin_zip) as z:
        wnids = sorted(z.read("tiny-imagenet-200/wnids.txt").decode().split())
        ann = dict(line.split("\t")[:2] for line in
                   z.read("tiny-imagenet-200/val/val_annotations.txt").decode().splitlines())
        tr, va, te = (open_split(real_packed, s) for s in ("train", "val", "test"))
        assert tr.classes == wnids
        assert all(k.split("_")[0] == wnids[lab] for k, lab in zip(tr.keys, tr.labels))
        assert all(wnids[lab] == ann[k] for k, lab in zip(va.keys, va.labels))
        assert (te.labels == -1).all() and np.bincount(tr.labels).tolist() == [500] * 200
        gray = 0
        for i in range(0, len(va), 10):
            raw = z.read(f"tiny-imagenet-200/val/images/{va.keys[i]}")
            assert va.encoded(i).tobytes() == raw
            with Image.open(io.BytesIO(raw)) as im:
                if im.mode == "L":
                    gray += 1
                    rgb = va.image(i)
                    assert rgb.shape == (64, 64, 3) and (rgb[..., 0] == rgb[..., 1]).all()
        assert gray > 0  # about 1.8% of the images are grayscale


def test_payload_that_does_not_decode_names_its_shard_and_sample(packed, tmp_path):
    shutil.copytree(packed, tmp_path / "c")
    ds = open_split(tmp_path / "c", "val")
    start = int(ds._start[4])
    shard = tmp_path / "c" / "val-000.shard"
    data = bytearray(shard.read_bytes())
    data[start:start + 4] = b"GARB"  # the JPEG's SOI marker
    shard.write_bytes(bytes(data))
    ds = open_split(tmp_path / "c", "val")  # sizes agree: opening does not hash
    with pytest.raises(FormatError, match=rf"val-000.shard sample 4 \({ds.keys[4]}\): does not decode.*--force"):
        ds.image(4)
    r = run_cli("fasttin.pack", "--verify", tmp_path / "c")
    assert r.returncode == 1 and "val-000.shard" in r.stderr and "Traceback" not in r.stderr


def test_every_rename_is_in_fileio():
    """One writer and one folder replacer (issue 18): a rename written anywhere else is a second way
    of writing files, with its own failure modes; this finds it."""
    import re

    from helpers import ROOT
    renames = re.compile(r"os\.replace\(|os\.rename\(|\.rename\(|shutil\.move\(")
    found = [(f.relative_to(ROOT), n) for d in ("fasttin", "benchmarks", "tools") for f in (ROOT / d).rglob("*.py")
             if f.name != "fileio.py" for n, line in enumerate(f.read_text().splitlines(), 1) if renames.search(line)]
    assert found == []
    assert renames.search((ROOT / "fasttin" / "fileio.py").read_text())  # the pattern still finds them there



# ---- only the packer's own leftovers are ever removed ------------------------------------------------

def dead_pid() -> str:
    """The pid of a process that has exited: what a killed pack's leftovers are named after."""
    return subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()


def users_lookalikes(tmp_path, dead):
    """A user's files and folders named like temporaries of a dead process, in and beside --out."""
    out = tmp_path / "photos"
    out.mkdir()
    (out / f"thesis.tmp{dead}.txt").write_text("b")
    for name in (f"photos.tmp{dead}", f"photos.old.tmp{dead}"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "precious.txt").write_text("c")
    return out


@pytest.mark.parametrize("force", [False, True])
def test_a_refused_out_loses_nothing_even_files_named_like_temporaries(tmp_path, force):
    """A folder of a user's files is refused, and the refusal touches nothing: neither the files in
    it nor the folders beside it that only look like a killed pack's (thesis.tmp<N>.txt, photos.tmp<N>/)."""
    out = users_lookalikes(tmp_path, dead_pid())
    (out / "thesis.txt").write_text("a")
    before = snapshot(tmp_path)
    r = run_cli("fasttin.pack", "--synthetic", "2", "--classes", "3", "--out", out, "--workers", "1",
                *(["--force"] if force else []))
    refused(r, 2, str(out), "not a packed data set")
    assert snapshot(tmp_path) == before


def test_force_over_a_pack_holding_a_users_lookalike_file_is_refused(tmp_path):
    """--force replaces the whole folder: a user's `notes.tmp<N>.txt` in it is not part of the pack."""
    out = tmp_path / "out"
    pack(None, out, synthetic=2, classes=3, workers=1, quiet=True)
    (out / f"notes.tmp{dead_pid()}.txt").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(PackError, match=r"notes\.tmp\d+\.txt"):
        pack(None, out, synthetic=2, classes=3, workers=1, quiet=True, force=True)
    assert snapshot(tmp_path) == before


def test_a_new_pack_keeps_a_users_folders_beside_it(tmp_path):
    dead = dead_pid()
    out = users_lookalikes(tmp_path, dead)
    (out / f"thesis.tmp{dead}.txt").unlink()  # an empty --out: packed into
    pack(None, out, synthetic=2, classes=3, workers=1, quiet=True)
    assert is_complete(out)
    for name in (f"photos.tmp{dead}", f"photos.old.tmp{dead}"):
        assert (tmp_path / name / "precious.txt").read_text() == "c"


def test_the_packers_own_leftovers_are_still_removed(tmp_path):
    dead = dead_pid()
    out = tmp_path / "out"
    pack(None, out, synthetic=2, classes=3, workers=1, quiet=True)
    mine = [out / f"manifest.json.tmp{dead}.json", out / f"train-001.shard.tmp{dead}"]
    for p in mine:
        p.write_bytes(b"x")
    empty, half = tmp_path / f"out.tmp{dead}", tmp_path / f"out.old.tmp{dead}"
    empty.mkdir()
    half.mkdir()
    (half / "val-000.shard").write_bytes(b"x")
    live = out / f"train-002.shard.tmp{os.getpid()}"  # a live process's: kept
    live.write_bytes(b"x")
    assert sorted(clean_leftovers(out)) == sorted([empty, half, *mine])
    assert live.exists() and is_complete(out)


# ---- a hostile source: a decompression bomb, invisible characters in names --------------------------

def small_src(tmp_path):
    return make_layout(tmp_path / "src", n_classes=3, per_class=2, val_per_class=1, test_count=2)


def test_a_decompression_bomb_is_refused_by_its_declared_size_and_skippable(tmp_path):
    """A 17 MiB member in a small zip (a 1.5 GiB one peaked at 3.2 GB): refused unread, by name, a
    per-file fault --skip-bad skips. Its name holds ': ', which the reason must not be cut at."""
    src = small_src(tmp_path)
    bomb = "train/n90000000/images/n90000000_9: big.JPEG"
    z = tmp_path / "t.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                zf.write(p, "tiny-imagenet-200/" + str(p.relative_to(src)))
        with zf.open("tiny-imagenet-200/" + bomb, "w") as f:
            for _ in range(17):
                f.write(bytes(1 << 20))
    assert z.stat().st_size < 1 << 20
    r = run_cli("fasttin.pack", "--src", z, "--out", tmp_path / "out", "--workers", "1")
    refused(r, 2, bomb, "17,825,792 bytes", "16 MiB", "--skip-bad")
    m = pack(z, tmp_path / "out", skip_bad=True, workers=1, quiet=True)
    assert m["splits"]["train"]["skipped"] == [{"file": bomb, "reason": (
        "holds 17,825,792 bytes, more than the 16 MiB any file of a 64x64 data set could need "
        "(a decompression bomb?): not read")}]


def test_a_huge_file_of_a_folder_source_is_refused_by_its_size(tmp_path):
    src = small_src(tmp_path)
    huge = src / "train" / "n90000001" / "images" / "n90000001_0.JPEG"
    os.truncate(huge, 17 << 20)  # sparse: no disk used
    with pytest.raises(PackError, match=r"n90000001_0\.JPEG: holds 17,825,792 bytes, more than the 16 MiB"):
        pack(src, tmp_path / "out", workers=1, quiet=True)


def test_a_file_holding_more_than_it_declares_is_read_no_further_than_the_bound(tmp_path, monkeypatch):
    """The declared size (zip header, stat) may lie: what is read is bounded too, at limit + 1 bytes."""
    from types import SimpleNamespace

    from fasttin import source
    src = source.Source(small_src(tmp_path))
    member = "train/n90000000/images/n90000000_0.JPEG"
    assert len(src.read(member)) > 100
    monkeypatch.setattr(source.os, "fstat", lambda fd: SimpleNamespace(st_size=10))
    with pytest.raises(source.MemberError, match="more bytes than it declares"):
        src.read(member, limit=100)


@pytest.mark.parametrize("index", ["wnids.txt", "val/val_annotations.txt"])
def test_a_byte_order_mark_before_an_index_file_is_an_encoding_not_a_name(tmp_path, index):
    """Notepad's BOM before wnids.txt made the first wnid '\\ufeffn90000000': its class folder was
    then 'not in wnids.txt', and with --skip-bad a class of no samples shifted the labels."""
    src = small_src(tmp_path)
    plain = pack(src, tmp_path / "plain", workers=1, quiet=True)
    (src / index).write_bytes(b"\xef\xbb\xbf" + (src / index).read_bytes())
    m = pack(src, tmp_path / "bom", workers=1, quiet=True)
    assert m["classes"] == plain["classes"] and [c["wnid"] for c in m["classes"]][0] == "n90000000"
    for split in ("train", "val"):
        assert m["splits"][split]["skipped"] == []
        a, b = open_split(tmp_path / "bom", split), open_split(tmp_path / "plain", split)
        assert (a.keys, a.labels.tolist()) == (b.keys, b.labels.tolist())


@pytest.mark.parametrize("char", ["\ufeff", "\u200d", "\u202e"])
def test_an_invisible_format_character_in_a_name_is_refused(tmp_path, char):
    """BOM, zero-width joiner, right-to-left override (Unicode category Cf): two names that look
    alike are not one. In wnids.txt it is fatal; in a file name, one skippable bad file."""
    assert "invisible format character" in shards.name_problem(f"n9000{char}0000")
    assert shards.name_problem("n90000000_0\xa0.JPEG") is None  # a no-break space is visible
    src = small_src(tmp_path)
    (src / "wnids.txt").write_text((src / "wnids.txt").read_text() + f"n9{char}9\n")
    r = run_cli("fasttin.pack", "--src", src, "--out", tmp_path / "out", "--workers", "1", "--skip-bad")
    refused(r, 2, "wnids.txt line 4", "invisible format character")
    (src / "wnids.txt").write_text("".join((src / "wnids.txt").read_text().splitlines(True)[:3]))
    d = src / "train" / "n90000001" / "images"
    (d / "n90000001_0.JPEG").rename(d / f"n90000001_0{char}.JPEG")
    (d / "n90000001_1.JPEG").rename(d / "n90000001_1\xa0.JPEG")
    m = pack(src, tmp_path / "out", workers=1, skip_bad=True, quiet=True)
    assert [s["file"] for s in m["splits"]["train"]["skipped"]] == [f"train/n90000001/images/n90000001_0{char}.JPEG"]
    assert "n90000001_1\xa0.JPEG" in open_split(tmp_path / "out", "train").keys


def test_a_shard_key_with_a_format_character_is_refused_at_open(packed, tmp_path):
    shutil.copytree(packed, tmp_path / "c")
    shard = tmp_path / "c" / "val-000.shard"
    buf = bytearray(shard.read_bytes())
    keys_start = shards.HEADER.unpack_from(bytes(buf[:shards.HEADER.size]))[7]
    buf[keys_start:keys_start + 3] = "\u200b".encode()
    shard.write_bytes(bytes(buf))
    with pytest.raises(FormatError, match="val-000.shard: sample 0: name .* invisible format character"):
        open_split(tmp_path / "c", "val")


# ---- a hostile manifest, a manifest given for its folder ------------------------------------------------

def nested_in(field, depth):
    """A pack's own manifest with one more field nested `depth` deep (the parser takes under 1000)."""
    def f(text):
        i = text.index(f'"{field}": {{') + len(f'"{field}": {{')
        return text[:i] + '"x": ' + "[" * depth + "]" * depth + ", " + text[i:]
    return f


HOSTILE_MANIFESTS = {
    "nested past the parser": lambda text: "[" * 100_000 + "]" * 100_000,
    "an integer of 5001 digits": lambda text: '{"format": "fasttin-shards", "version": ' + "9" * 5001 + "}",
    "a field nested 900 deep": nested_in("source", 900),  # parsed, then any dump or repr of it may overflow
}


@pytest.mark.parametrize("case", list(HOSTILE_MANIFESTS))
def test_a_hostile_manifest_is_one_line_and_force_replaces_it(packed, tmp_path, case):
    out = tmp_path / "p"
    shutil.copytree(packed, out)
    (out / "manifest.json").write_text(HOSTILE_MANIFESTS[case]((out / "manifest.json").read_text()))
    with pytest.raises(FormatError, match="manifest.json: not a valid manifest|manifest.json: not valid JSON"):
        open_split(out, "val")
    refused(run_cli("fasttin.pack", "--verify", out), 2, str(out / "manifest.json"), "pack --force")
    if case == "nested past the parser":
        r = run_cli("fasttin.train", "--data", out, "--out", tmp_path / "run", "--epochs", "1", "--device", "cpu")
        refused(r, 2, str(out / "manifest.json"))
    r = run_cli("fasttin.pack", "--synthetic", "2", "--classes", "3", "--out", out, "--workers", "1", "--force")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert is_complete(out) and verify(out) == []


def test_a_manifest_given_for_its_folder_names_the_folder(packed, tmp_path):
    manifest = packed / "manifest.json"
    with pytest.raises(FormatError, match=rf"{manifest} is a file: --data takes the pack's folder \({packed}\)"):
        shards.read_manifest(manifest)
    refused(run_cli("fasttin.pack", "--verify", manifest), 2, f"{manifest} is a file: --verify takes", f"({packed})")
    r = run_cli("fasttin.train", "--data", manifest, "--out", tmp_path / "run", "--epochs", "1", "--device", "cpu")
    refused(r, 2, f"{manifest} is a file", f"folder ({packed})")


def test_other_options_of_a_hand_made_manifest_are_shown_in_a_short_line(tmp_path):
    out = tmp_path / "out"
    pack(None, out, synthetic=2, classes=3, workers=1, quiet=True)
    m = json.loads((out / "manifest.json").read_text())
    m["options"]["seed"] = "x" * 100_000
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PackError, match="other options") as e:
        pack(None, out, synthetic=2, classes=3, workers=1, quiet=True)
    assert len(str(e.value)) < 500 and "'payload': 'jpeg'" in str(e.value)


def test_a_name_no_file_system_takes_is_refused():
    """A zip member may be named with 300 bytes; a file may not: a tool writing per-sample files failed."""
    assert "255 bytes" in shards.name_problem("é" * 128 + ".JPEG")  # 261 bytes in UTF-8
    assert shards.name_problem("é" * 125 + ".JPEG") is None

"""Faults against the data layer, run through `python -m fasttin.pack` as a user would (issue 10).

Every case asserts the exit code, a one-line message naming the culprit, no traceback, and that
nothing was lost: no complete-looking output from a failed command, no temporary file or folder
left, and an earlier pack byte-identical after a failed --force repack.
"""
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from helpers import ROOT, STOP_AT_SHARD, refused, run_cli, snapshot, stopped, wait_for
from PIL import Image

from fasttin.pack import is_complete, pack
from fasttin.shards import HEADER, open_split
from fasttin.synthetic import make_layout

W0, W1 = "n90000000", "n90000001"  # the synthetic layout's first two wnids


def small_source(tmp_path):
    return make_layout(tmp_path / "src", n_classes=3, per_class=2, val_per_class=1, test_count=2)


def to_zip(root, path, extra=(), method=zipfile.ZIP_STORED):
    """`root` zipped as tiny-imagenet-200/...; `extra` (name, bytes) members appended verbatim."""
    with zipfile.ZipFile(path, "w", method) as z:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                z.write(p, "tiny-imagenet-200/" + str(p.relative_to(root)))
        for name, data in extra:
            z.writestr(name, data)
    return path


def damage_member(zpath, member, at=0):
    """Flip one byte of a member's stored data inside the archive (its CRC no longer matches)."""
    with zipfile.ZipFile(zpath) as z:
        info = z.getinfo(member)
    raw = bytearray(zpath.read_bytes())
    name_len, extra_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    raw[info.header_offset + 30 + name_len + extra_len + at] ^= 0xFF
    zpath.write_bytes(bytes(raw))


def leftovers(tmp_path):
    return [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def image_bytes(mode, fmt="PNG"):
    """A 64x64 image in `mode` made by PIL."""
    arr = {"F": np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)}[mode]
    out = io.BytesIO()
    Image.fromarray(arr, mode).save(out, fmt)
    return out.getvalue()


# ---- bad source files: (the source to pass, the culprit the message must name) -----------------------

def ann_line(line):
    def f(root, tmp):
        with open(root / "val" / "val_annotations.txt", "a") as fh:
            fh.write(line)
        return root
    return f


def rename_train(new_name):
    def f(root, tmp):
        d = root / "train" / W0 / "images"
        (d / f"{W0}_0.JPEG").rename(d / new_name)
        return root
    return f


def zip_extra(name, data=None):
    def f(root, tmp):
        payload = data or (root / "train" / W0 / "images" / f"{W0}_0.JPEG").read_bytes()
        return to_zip(root, tmp / "t.zip", [(name, payload)])
    return f


def zip_damaged(method):
    def f(root, tmp):
        z = to_zip(root, tmp / "t.zip", method=method)
        damage_member(z, f"tiny-imagenet-200/train/{W1}/images/{W1}_1.JPEG", at=40)
        return z
    return f


def replace_train(data):
    def f(root, tmp):
        (root / "train" / W1 / "images" / f"{W1}_0.JPEG").write_bytes(data() if callable(data) else data)
        return root
    return f


def symlink_out(root, tmp):
    outside = tmp / "outside.JPEG"
    outside.write_bytes((root / "train" / W0 / "images" / f"{W0}_0.JPEG").read_bytes())
    (root / "train" / W0 / "images" / "link.JPEG").symlink_to(outside)
    return root


def same_name_twice(root, tmp):
    a = root / "train" / W0 / "images" / f"{W0}_1.JPEG"
    (root / "train" / W1 / "images" / a.name).write_bytes(a.read_bytes())
    return root


def same_name_but_case(root, tmp):
    a = root / "train" / W0 / "images" / f"{W0}_1.JPEG"
    (root / "train" / W1 / "images" / f"{W0}_1.jpeg").write_bytes(a.read_bytes())
    return root


def same_name_but_normalisation(root, tmp):
    a = root / "train" / W0 / "images" / f"{W0}_1.JPEG"
    a.rename(a.with_name("caf\u00e9.JPEG"))  # composed
    (root / "train" / W1 / "images" / "cafe\u0301.JPEG").write_bytes(a.with_name("caf\u00e9.JPEG").read_bytes())
    return root


def words_control(root, tmp):
    with open(root / "words.txt", "a") as fh:
        fh.write(f"{W1}\tbell\x07 ringer\n")
    return root


SKIPPABLE = {  # each skipped with --skip-bad and listed in the manifest
    "annotation ../": (ann_line(f"../../escape.JPEG\t{W0}\t0\t0\t63\t63\n"), "../../escape.JPEG"),
    "annotation absolute": (ann_line(f"/etc/hostname\t{W0}\t0\t0\t63\t63\n"), "/etc/hostname"),
    "annotation separator": (ann_line(f"sub/val_0.JPEG\t{W0}\t0\t0\t63\t63\n"), "sub/val_0.JPEG"),
    "annotation repeated": (ann_line(f"val_0.JPEG\t{W1}\t0\t0\t63\t63\n"), "annotated again"),
    "file name with newline": (rename_train(f"{W0}_0\n.JPEG"), "_0\\n.JPEG"),
    "file name with escape": (rename_train(f"{W0}_0\x1b[2J.JPEG"), "\\x1b"),
    "symlink out of the source": (symlink_out, "link.JPEG"),
    "one name in two classes": (same_name_twice, f"{W1}/images/{W0}_1.JPEG"),
    "one name up to case": (same_name_but_case, "up to case"),
    "one name up to normalisation": (same_name_but_normalisation, "up to case or Unicode normalisation"),
    "zip member with ..": (zip_extra(f"tiny-imagenet-200/train/{W0}/images/../../../evil.JPEG"), "evil.JPEG"),
    "zip member with newline": (zip_extra(f"tiny-imagenet-200/train/{W0}/images/a\nb.JPEG"), "a\\nb.JPEG"),
    "zip member twice": (zip_extra(f"tiny-imagenet-200/train/{W0}/images/{W0}_0.JPEG"), "appears 2 times"),
    "zip bad CRC": (zip_damaged(zipfile.ZIP_STORED), f"{W1}_1.JPEG"),
    "zip broken deflate": (zip_damaged(zipfile.ZIP_DEFLATED), f"{W1}_1.JPEG"),
    "undecodable image": (replace_train(b"\xff\xd8\xff\xe0 not really a jpeg"), "does not decode"),
    "float image": (replace_train(lambda: image_bytes("F", "TIFF")), "pixel mode F"),
    "words.txt control char": (words_control, "words.txt line"),
}


@pytest.mark.filterwarnings("ignore:Duplicate name")
@pytest.mark.parametrize("case", list(SKIPPABLE))
def test_bad_source_file_is_named_and_skippable(case, tmp_path):
    make, culprit = SKIPPABLE[case]
    src = make(small_source(tmp_path), tmp_path)
    out = tmp_path / "out"
    r = run_cli("fasttin.pack", "--src", src, "--out", out, "--workers", "1")
    refused(r, 2, culprit, "--skip-bad")
    assert not is_complete(out) and not leftovers(tmp_path)
    r = run_cli("fasttin.pack", "--src", src, "--out", out, "--workers", "1", "--skip-bad")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    listed = m["source_skipped"] + [s for sp in m["splits"].values() for s in sp["skipped"]]
    assert len(listed) == 1 and culprit in repr(listed[0])
    for split in m["splits"]:
        ds = open_split(out, split, verify=True)  # what was packed reads back
        assert all("/" not in k and k.isprintable() for k in ds.keys)
    assert not leftovers(tmp_path)


def wnids_extra(text):
    def f(root, tmp):
        with open(root / "wnids.txt", "a") as fh:
            fh.write(text)
        return root
    return f


def not_utf8(root, tmp):
    (root / "val" / "val_annotations.txt").write_bytes(b"val_0.JPEG\t\xff\xfe\n")
    return root


FATAL = {  # the class list or an index file itself is wrong: refused even with --skip-bad
    "repeated wnid": (wnids_extra(f"{W1}\n"), f"wnid {W1} is listed again"),
    "wnid with ..": (wnids_extra("..\n"), "wnids.txt line 4"),
    "annotations not UTF-8": (not_utf8, "val_annotations.txt is not UTF-8"),
}


@pytest.mark.parametrize("case", list(FATAL))
def test_bad_index_file_is_refused_by_name(case, tmp_path):
    make, culprit = FATAL[case]
    src = make(small_source(tmp_path), tmp_path)
    r = run_cli("fasttin.pack", "--src", src, "--out", tmp_path / "out", "--skip-bad")
    refused(r, 2, culprit)
    assert not is_complete(tmp_path / "out") and not leftovers(tmp_path)


# ---- outputs: an earlier pack is never lost -----------------------------------------------------------

@pytest.fixture
def old_pack(tmp_path):
    """A complete pack in tmp_path/out, and the source it came from."""
    src = small_source(tmp_path)
    pack(src, tmp_path / "out", workers=1, quiet=True)
    return src, tmp_path / "out", snapshot(tmp_path / "out")


def test_failed_force_repack_keeps_the_old_pack(old_pack, tmp_path):
    src, out, before = old_pack
    (src / "train" / W0 / "images" / f"{W0}_1.JPEG").write_bytes(b"garbage")
    r = run_cli("fasttin.pack", "--src", src, "--out", out, "--force", "--workers", "1")
    refused(r, 2, f"{W0}_1.JPEG")
    assert snapshot(out) == before and not leftovers(tmp_path)
    assert len(open_split(out, "train", verify=True)) == 6


def test_write_failure_midway_is_one_line_and_keeps_the_old_pack(old_pack, tmp_path):
    """A disk that fills (here: a file size limit, EFBIG) while the repack writes its shards."""
    src, out, before = old_pack
    cmd = (f"trap '' XFSZ; ulimit -f 4; exec {sys.executable} -m fasttin.pack --src {src} --out {out} "
           "--force --workers 1 --format raw")
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=ROOT, timeout=300)
    refused(r, 2, "cannot write", "train-000.shard")
    assert snapshot(out) == before and not leftovers(tmp_path)


@pytest.mark.parametrize("kind", ["a file", "a folder of other files", "under a file"])
def test_unusable_out_is_refused_before_any_work(kind, tmp_path):
    src = small_source(tmp_path)
    target = tmp_path / "target"
    if kind == "a file":
        target.write_text("precious")
        out, culprit = target, "is a file"
    elif kind == "a folder of other files":
        target.mkdir()
        (target / "notes.txt").write_text("precious")
        out, culprit = target, "notes.txt"
    else:
        target.write_text("precious")
        out, culprit = target / "packed", str(target)
    before = snapshot(tmp_path)
    r = run_cli("fasttin.pack", "--src", src, "--out", out, "--workers", "1")
    refused(r, 2, culprit)
    assert snapshot(tmp_path) == before


# ---- damaged packs: caught at open, named, with the fix ------------------------------------------------

def edit_manifest(fn):
    def f(out):
        m = json.loads((out / "manifest.json").read_text())
        m = fn(m) or m
        (out / "manifest.json").write_text(json.dumps(m))
    return f


def edit_shard(fn):
    """Change train-000.shard and record its new hash: a hand-made or mis-written pack whose
    hashes agree, so only the structural checks can catch it."""
    def f(out):
        path = out / "train-000.shard"
        buf = bytearray(path.read_bytes())
        fn(buf)
        path.write_bytes(bytes(buf))
        m = json.loads((out / "manifest.json").read_text())
        m["splits"]["train"]["shards"][0]["sha256"] = hashlib.sha256(bytes(buf)).hexdigest()
        (out / "manifest.json").write_text(json.dumps(m))
    return f


def _header(buf):
    return HEADER.unpack_from(bytes(buf[:HEADER.size]))


def set_label(buf):
    *_, n, _p, index_start, _k, _s = _header(buf)
    buf[index_start + 4 * (n + 1):index_start + 4 * (n + 2)] = (999).to_bytes(4, "little", signed=True)


def set_key(buf):
    *_, keys_start, _s = _header(buf)
    buf[keys_start:keys_start + 3] = b"../"


def swap_offsets(buf):
    *_, n, _p, index_start, _k, _s = _header(buf)
    a, b = index_start + 4, index_start + 8
    buf[a:a + 4], buf[b:b + 4] = buf[b:b + 4], buf[a:a + 4]


def flip_payload(buf):
    buf[HEADER.size + 100] ^= 0xFF


def flip_byte_keep_hash_stale(out):
    flip_payload_buf = bytearray((out / "train-000.shard").read_bytes())
    flip_payload(flip_payload_buf)
    (out / "train-000.shard").write_bytes(bytes(flip_payload_buf))


DAMAGE = {  # (damage, exit code, what the one line names)
    "flipped byte": (flip_byte_keep_hash_stale, 1, ["train-000.shard", "sha256", "pack --force"]),
    "label out of range": (edit_shard(set_label), 1, ["train-000.shard", "sample 0 (", "label 999", "pack --force"]),
    "key with a path": (edit_shard(set_key), 1, ["train-000.shard", "sample 0", "path separator"]),
    "offsets not increasing": (edit_shard(swap_offsets), 1, ["train-000.shard", "sample 1 (", "not increasing"]),
    "manifest a list": (lambda out: (out / "manifest.json").write_text("[1, 2]"), 2, ["manifest.json", "format"]),
    "manifest field of the wrong type": (edit_manifest(lambda m: m["splits"]["val"]["shards"][0].update(bytes="9")), 2,
                                         ["manifest.json", "splits.val.shards[0].bytes", "an integer"]),
    "manifest shard outside the folder": (edit_manifest(lambda m: m["splits"]["val"]["shards"][0].update(
        file="../x.shard")), 2, ["manifest.json", "splits.val.shards[0].file"]),
    "manifest class twice": (edit_manifest(lambda m: m["classes"].append(m["classes"][0])), 2,
                             ["manifest.json", "classes[10].wnid", "twice"]),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_pack_is_caught_at_open(case, packed, tmp_path):
    damage, code, names = DAMAGE[case]
    out = tmp_path / "p"
    shutil.copytree(packed, out)
    damage(out)
    r = run_cli("fasttin.pack", "--verify", out)
    refused(r, code, *names)


def test_sigterm_during_repack_keeps_the_old_pack_and_leaves_nothing(old_pack, tmp_path):
    """SIGTERM (timeout, Slurm, kill) while the repack writes: exit 130, old pack untouched, and
    the build folder removed at once. The repack is stopped at a chosen shard, not raced."""
    src, out, before = old_pack
    proc = subprocess.Popen([sys.executable, "-c", STOP_AT_SHARD, "val-000.shard", "--src", str(src),
                             "--out", str(out), "--force", "--workers", "2"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: stopped(proc.pid), proc, what="the repack stopping at its val shard")
    os.kill(proc.pid, signal.SIGTERM)
    os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(out) == before and not leftovers(tmp_path)


# ---- every output write (fasttin.fileio): links, devices, long names, a full disk -------------------

def test_a_write_through_a_symlink_updates_its_target_and_keeps_the_link(tmp_path):
    from fasttin.fileio import ensure_writable, write_atomic
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "r.json").write_text("old")
    (tmp_path / "link.json").symlink_to(tmp_path / "real" / "r.json")
    ensure_writable(tmp_path / "link.json")
    write_atomic(tmp_path / "link.json", b"new")
    assert (tmp_path / "link.json").is_symlink() and (tmp_path / "real" / "r.json").read_text() == "new"


def test_a_pipe_or_device_is_never_replaced_by_a_regular_file(tmp_path):
    from fasttin.fileio import OutputError, ensure_writable, write_atomic
    os.mkfifo(tmp_path / "fifo")
    for check in (lambda: ensure_writable(tmp_path / "fifo"), lambda: write_atomic(tmp_path / "fifo", b"x")):
        with pytest.raises(OutputError, match="not a regular file"):
            check()
    assert (tmp_path / "fifo").is_fifo() and os.listdir(tmp_path) == ["fifo"]


def test_a_file_name_the_file_system_refuses_is_one_line(tmp_path):
    from fasttin.fileio import OutputError, ensure_writable, write_atomic
    long = tmp_path / ("x" * 300)
    for check in (lambda: write_atomic(long, b"data"), lambda: ensure_writable(long)):
        with pytest.raises(OutputError, match="cannot write .*: .*too long"):
            check()
    assert list(tmp_path.iterdir()) == []
    r = run_cli("benchmarks.run", "--stages", "read", "--device", "cpu", "--json", tmp_path / ("x" * 300 + ".json"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_long_output_name_that_the_file_system_takes_is_written(tmp_path):
    """255 bytes is the limit of the name, not of name + '.tmp<pid>.json': the temporary is cut short."""
    from fasttin.fileio import ensure_writable, write_atomic
    path = tmp_path / ("r" * 250 + ".json")
    ensure_writable(path)
    write_atomic(path, b"{}")
    assert path.read_bytes() == b"{}" and os.listdir(tmp_path) == [path.name]


def test_the_writability_probe_leaves_nothing_behind_on_a_full_disk(tmp_path):
    """RLIMIT_FSIZE 0: the probe's one byte fails as on a full disk; the probe file is removed too."""
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))\n"
            "from fasttin.errors import run_command\nfrom fasttin.fileio import ensure_writable\n"
            "sys.exit(run_command('probe', lambda: ensure_writable(sys.argv[1]) or 0))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out" / "r.json")], cwd=ROOT,
                       capture_output=True, text=True)
    refused(r, 2, "r.json")
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []


def test_json_outputs_are_strict_json_whatever_the_numbers(tmp_path):
    """A nan or inf (an eval's loss that overflowed) was written as NaN/Infinity: not JSON."""
    from fasttin.fileio import write_json_atomic
    write_json_atomic(tmp_path / "r.json", {"loss": float("nan"), "runs": [1.5, float("inf")], "n": (2, -float("inf"))})

    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    back = json.loads((tmp_path / "r.json").read_text(), parse_constant=refuse)
    assert back == {"loss": None, "runs": [1.5, None], "n": [2, None]}

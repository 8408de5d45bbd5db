"""The fasttin shard format: writer and reader. Byte layout: docs/FORMAT.md (keep them in step).

A packed data set is a folder: `manifest.json` (written last; its presence means complete) and,
per split, shards `<split>-NNN.shard`. A shard is a 64-byte header, the payloads back to back,
then an index (u32 offsets, i32 labels) and the original file names. Everything is
little-endian and memory-mapped on read, so `encoded(i)` is a zero-copy slice.
"""
from __future__ import annotations

import io
import json
import mmap
import os
import re
import struct
from pathlib import Path

import numpy as np

from fasttin.errors import UserError
from fasttin.fileio import OutputError, digest

FORMAT_NAME = "fasttin-shards"
FORMAT_VERSION = 1
MAGIC = b"FTINSHRD"
HEADER = struct.Struct("<8sHBBIQQQQ16x")  # magic, version, payload kind, reserved, n, 4 offsets
assert HEADER.size == 64
PAYLOAD_KINDS = {"jpeg": 0, "raw": 1}
IMAGE_SHAPE = (64, 64, 3)
MANIFEST = "manifest.json"
# Characters no name read from the data may hold: path separators, ASCII/C1 control characters
# (newline included) and everything str.splitlines() breaks on, so a name is always one line.
_BAD_CHARS = re.compile(r"[/\\\x00-\x1f\x7f-\x9f\u2028\u2029]")


def name_problem(name: str) -> str | None:
    """Why `name` cannot be a bare file name taken from the data (None if it can): keeps every
    name that later becomes a path, a shard key or a line of output inside its folder and line."""
    if not name:
        return "is empty"
    if name in (".", ".."):
        return f"is {name!r}"
    bad = _BAD_CHARS.search(name)
    if bad:
        kind = "a path separator" if bad.group() in "/\\" else "a control character"
        return f"holds {kind} ({bad.group()!r})"
    return None


class FormatError(UserError, ValueError):
    """A packed data set that is incomplete, corrupt, hand-made wrongly or of an unknown version."""


class NotPackedError(FormatError, FileNotFoundError):
    """The folder, its manifest or one of its shards is missing."""


def repack_hint(data_dir) -> str:
    return f"repack it: python -m fasttin.pack --force --out {data_dir}"


class ShardWriter:
    """Writes one split as shards of about `shard_bytes` each, under temporary names.

    `finish()` completes the last shard and returns the manifest entries, still under temporary
    names; `commit()` renames them to their final names; `abort()` removes everything written.
    A write that fails (full disk, file size limit) raises OutputError naming the shard.
    """

    def __init__(self, out_dir: Path, split: str, payload: str, shard_bytes: int = 64 << 20):
        if not 0 < shard_bytes < 1 << 32:
            raise ValueError("shard size must be between 1 byte and 4 GiB (u32 offsets)")
        self.out_dir, self.split, self.kind = Path(out_dir), split, PAYLOAD_KINDS[payload]
        self.shard_bytes = shard_bytes
        self.done: list[dict] = []
        self.tmp_paths: list[Path] = []
        self._f = None

    def _io(self, fn, *args):
        try:
            return fn(*args)
        except OSError as e:
            raise OutputError(f"cannot write {self.tmp_paths[-1]}: {os.strerror(e.errno) if e.errno else e}") from None

    def _open(self):
        name = f"{self.split}-{len(self.done):03d}.shard"
        tmp = self.out_dir / (name + f".tmp{os.getpid()}")
        self.tmp_paths.append(tmp)
        self._f, self._name = self._io(open, tmp, "wb"), name
        self._io(self._f.write, b"\0" * HEADER.size)  # header goes in at the end, when the offsets are known
        self._offsets, self._labels, self._keys, self._pos = [0], [], [], 0

    def add(self, key: str, label: int, payload: bytes) -> None:
        if name_problem(key):  # the source checks names; this guards the format's one-line keys
            raise ValueError(f"shard key {key!r} {name_problem(key)}")
        if self._f is None:
            self._open()
        self._io(self._f.write, payload)
        self._pos += len(payload)
        self._offsets.append(self._pos)
        self._labels.append(label)
        self._keys.append(key)
        if self._pos >= self.shard_bytes:
            self._io(self._finish)

    def _finish(self):
        f, n = self._f, len(self._labels)
        pad = -(HEADER.size + self._pos) % 8
        f.write(b"\0" * pad)
        index_start = HEADER.size + self._pos + pad
        f.write(np.asarray(self._offsets, "<u4").tobytes())
        f.write(np.asarray(self._labels, "<i4").tobytes())
        keys_start = index_start + 4 * (n + 1) + 4 * n
        f.write("\n".join(self._keys).encode())
        size = f.tell()
        f.seek(0)
        f.write(HEADER.pack(MAGIC, FORMAT_VERSION, self.kind, 0, n, HEADER.size, index_start, keys_start, size))
        f.flush()
        os.fsync(f.fileno())
        f.close()
        self._f = None
        self.done.append({"file": self._name, "count": n, "bytes": size,
                          "payload_bytes": self._pos, "sha256": digest(self.tmp_paths[-1])})

    def finish(self) -> list[dict]:
        if self._f is not None:
            self._io(self._finish)
        return self.done

    def commit(self) -> list[dict]:
        self.finish()
        for tmp, entry in zip(self.tmp_paths, self.done):
            os.replace(tmp, self.out_dir / entry["file"])
        self.tmp_paths = []
        return self.done

    def abort(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except OSError:
                pass  # the write already failed (full disk): the file goes anyway
            self._f = None
        for p in self.tmp_paths:
            p.unlink(missing_ok=True)
        self.tmp_paths = []


# ---- the manifest's structure ----------------------------------------------------------------------

_TYPE_NAMES = {int: "an integer", str: "a string", list: "a list", dict: "an object"}


def _need(obj, key, kind, where: str, path: Path):
    """obj[key] if it is a `kind` (bool is never an int here), else a FormatError naming the
    manifest and the field."""
    field = f"{where}.{key}" if where else key
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: field {where or 'top level'} must be an object")
    if key not in obj:
        raise FormatError(f"{path}: field {field} is missing")
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, kind):
        raise FormatError(f"{path}: field {field} must be {_TYPE_NAMES[kind]}, got {json.dumps(v)[:60]}")
    return v


def _check_classes(m: dict, path: Path) -> None:
    classes = _need(m, "classes", list, "", path)
    if not classes:
        raise FormatError(f"{path}: field classes is empty")
    seen = set()
    for i, c in enumerate(classes):
        wnid = _need(c, "wnid", str, f"classes[{i}]", path)
        _need(c, "words", str, f"classes[{i}]", path)
        if name_problem(wnid) or wnid in seen:
            why = name_problem(wnid) or "is listed twice"
            raise FormatError(f"{path}: field classes[{i}].wnid {wnid!r} {why}")
        seen.add(wnid)


def _check_split(name: str, entry, path: Path) -> None:
    where = f"splits.{name}"
    if not isinstance(entry, dict):
        raise FormatError(f"{path}: field {where} must be an object")
    count = _need(entry, "count", int, where, path)
    shards = _need(entry, "shards", list, where, path)
    total = 0
    for j, sh in enumerate(shards):
        w = f"{where}.shards[{j}]"
        file = _need(sh, "file", str, w, path)
        if name_problem(file) or not file.endswith(".shard"):
            raise FormatError(f"{path}: field {w}.file {file!r} is not a shard file name in this folder")
        n, size = _need(sh, "count", int, w, path), _need(sh, "bytes", int, w, path)
        sha = _need(sh, "sha256", str, w, path)
        if n < 0 or size < HEADER.size or not re.fullmatch("[0-9a-f]{64}", sha):
            raise FormatError(f"{path}: field {w} has an impossible count, bytes or sha256")
        total += n
    if count != total:
        raise FormatError(f"{path}: field {where}.count is {count}, its shards hold {total}")


def read_manifest(data_dir: str | os.PathLike) -> dict:
    """The manifest of a complete packed data set, its structure checked: a FormatError naming
    the file and the field otherwise (NotPackedError when the folder or manifest is missing)."""
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST
    if not data_dir.is_dir():
        raise NotPackedError(f"{data_dir}: no such folder (pack it first: python -m fasttin.pack --out {data_dir})")
    if not path.is_file():
        raise NotPackedError(f"{data_dir}: not a packed data set (no {MANIFEST}; an interrupted pack? "
                             f"re-run python -m fasttin.pack --out {data_dir})")
    try:
        m = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON ({e}); {repack_hint(data_dir)}") from None
    except OSError as e:
        raise FormatError(f"{path}: cannot be read ({e.strerror})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise FormatError(f"{path}: not a {FORMAT_NAME} manifest (field format)")
    if m.get("version") != FORMAT_VERSION:
        raise FormatError(f"{path}: format version {m.get('version')}, this fasttin reads {FORMAT_VERSION}")
    if _need(m, "payload", str, "", path) not in PAYLOAD_KINDS:
        raise FormatError(f"{path}: field payload is {m['payload']!r}, not one of {sorted(PAYLOAD_KINDS)}")
    if _need(m, "image_shape", list, "", path) != list(IMAGE_SHAPE):
        raise FormatError(f"{path}: field image_shape is {m['image_shape']}, this fasttin reads {list(IMAGE_SHAPE)}")
    _check_classes(m, path)
    for name, entry in _need(m, "splits", dict, "", path).items():
        if name_problem(name):
            raise FormatError(f"{path}: field splits has a bad split name {name!r}")
        _check_split(name, entry, path)
    return m


# ---- shard hashes, once per process --------------------------------------------------------------

_VERIFIED: set[tuple] = set()


def _hash_ok(path: Path, sha256: str) -> bool:
    """sha256 of `path` equals the manifest's; a file already checked in this process (same size
    and mtime) is not hashed again, so train and val opened together hash each shard once."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, sha256)
    if key in _VERIFIED:
        return True
    if digest(path) != sha256:
        return False
    _VERIFIED.add(key)
    return True


# ---- the reader ----------------------------------------------------------------------------------

class SplitDataset:
    """One packed split, memory-mapped. Sample i is O(1): shard and offsets come from the index.

    Opening checks the manifest's structure, every shard's header, index (offsets monotonic and
    in bounds, labels in range of the class list) and keys (bare, unique names), and with
    verify=True the shard hashes: a damaged pack fails here, in one line naming the shard.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str, verify: bool = False):
        self.data_dir = Path(data_dir)
        self.manifest = read_manifest(self.data_dir)
        splits = self.manifest["splits"]
        if split not in splits:
            raise FormatError(f"unknown split {split!r} in {self.data_dir}: packed splits are {sorted(splits)}")
        self.split = split
        self.payload = self.manifest["payload"]
        self.classes = [c["wnid"] for c in self.manifest["classes"]]
        self.class_words = [c["words"] for c in self.manifest["classes"]]
        self._maps, self._bufs, self.shard_files = [], [], []
        offs, labels, keys, shard_ids = [], [], [], []
        for s, entry in enumerate(splits[split]["shards"]):
            buf = self._open_shard(entry, verify)
            off, lab, k = self._read_index(buf, entry)
            offs.append(off)
            labels.append(lab)
            keys += k
            shard_ids.append(np.full(len(lab), s, np.int32))
            self.shard_files.append(entry["file"])
        self.keys = keys
        self.labels = np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64)
        self._shard = np.concatenate(shard_ids) if shard_ids else np.zeros(0, np.int32)
        self._first = np.cumsum([0] + [len(lab) for lab in labels])  # split index of each shard's sample 0
        self._start = np.concatenate([o[:-1] for o in offs]) if offs else np.zeros(0, np.int64)
        self._end = np.concatenate([o[1:] for o in offs]) if offs else np.zeros(0, np.int64)
        if len(set(keys)) != len(keys):
            raise FormatError(f"{self.data_dir}/{split}: sample name {_first_duplicate(keys)!r} appears twice; "
                              f"{repack_hint(self.data_dir)}")

    def __getstate__(self):
        """Pickled by name: a worker process maps the shards itself (memory maps do not travel)."""
        return {"data_dir": self.data_dir, "split": self.split}

    def __setstate__(self, state):
        self.__init__(state["data_dir"], state["split"])

    def _bad(self, path: Path, what: str) -> FormatError:
        return FormatError(f"shard {path}: {what}; {repack_hint(self.data_dir)}")

    def _open_shard(self, entry: dict, verify: bool) -> np.ndarray:
        path = self.data_dir / entry["file"]
        if not path.is_file():
            raise NotPackedError(f"missing shard {path}; {repack_hint(self.data_dir)}")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise self._bad(path, f"{size} bytes, manifest says {entry['bytes']} (truncated or replaced)")
        if verify and not _hash_ok(path, entry["sha256"]):
            raise self._bad(path, "sha256 disagrees with the manifest (corrupt)")
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._maps.append(mm)
        buf = np.frombuffer(mm, np.uint8)
        self._bufs.append(buf)
        return buf

    def _read_index(self, buf: np.ndarray, entry: dict) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(offsets from the file start, labels, keys) of one shard, every field checked."""
        path, size = self.data_dir / entry["file"], len(buf)
        magic, version, kind, _, n, payload_start, index_start, keys_start, file_size = HEADER.unpack_from(buf, 0)
        if magic != MAGIC or version != FORMAT_VERSION:
            raise self._bad(path, f"bad header (magic {magic!r}, version {version})")
        if kind != PAYLOAD_KINDS[self.payload]:
            raise self._bad(path, f"payload kind {kind} disagrees with the manifest's {self.payload!r}")
        if n != entry["count"]:
            raise self._bad(path, f"header says {n} samples, manifest says {entry['count']}")
        if (payload_start != HEADER.size or index_start % 8 or not payload_start <= index_start
                or keys_start != index_start + 8 * n + 4 or not keys_start <= file_size == size):
            raise self._bad(path, "header offsets out of bounds")
        keys = self._read_keys(buf, keys_start, n, path)
        off = np.frombuffer(buf, "<u4", n + 1, index_start).astype(np.int64)
        step = np.diff(off)
        if off[0] != 0 or (step < 0).any() or not 0 <= index_start - payload_start - off[-1] < 8:
            i = int(np.argmax(step < 0)) if (step < 0).any() else n - 1
            raise self._bad(path, f"sample {i} ({keys[i] if n else '-'}): offsets not increasing or out of bounds")
        wrong = step != np.prod(IMAGE_SHAPE) if self.payload == "raw" else step == 0
        if wrong.any():
            i = int(np.argmax(wrong))
            raise self._bad(path, f"sample {i} ({keys[i]}): a payload of {step[i]} bytes")
        labels = np.frombuffer(buf, "<i4", n, index_start + 4 * (n + 1))
        low = -1 if self.split == "test" else 0
        out = (labels < low) | (labels >= len(self.classes))
        if out.any():
            i = int(np.argmax(out))
            raise self._bad(path, f"sample {i} ({keys[i]}): label {labels[i]} outside the {len(self.classes)} classes")
        return off + payload_start, labels, keys

    def _read_keys(self, buf: np.ndarray, keys_start: int, n: int, path: Path) -> list[str]:
        try:
            text = bytes(buf[keys_start:]).decode()
        except UnicodeDecodeError:
            raise self._bad(path, "sample names are not UTF-8") from None
        keys = text.split("\n") if n else []
        if len(keys) != n or (not n and text):
            raise self._bad(path, f"{len(keys)} sample names for {n} samples")
        if _BAD_CHARS.search(text.replace("\n", "")) or "" in keys or "." in keys or ".." in keys:
            i = next(i for i, k in enumerate(keys) if name_problem(k))
            raise self._bad(path, f"sample {i}: name {keys[i]!r} {name_problem(keys[i])}")
        return keys

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self, i: int) -> str:
        """Where sample i lives, for a message: 'train-001.shard sample 17 (n01443537_3.JPEG)'."""
        s = int(self._shard[i])
        return f"{self.shard_files[s]} sample {int(i - self._first[s])} ({self.keys[i]})"

    @property
    def payload_bytes(self) -> np.ndarray:
        return self._end - self._start

    def encoded(self, i: int) -> np.ndarray:
        """The stored payload of sample i: a zero-copy uint8 view into the memory-mapped shard."""
        return self._bufs[self._shard[i]][self._start[i]:self._end[i]]

    def encoded_batch(self, idx) -> list[np.ndarray]:
        """Zero-copy views for many samples (the DALI feed); no decoding, no copies."""
        bufs, shard, start, end = self._bufs, self._shard[idx], self._start[idx], self._end[idx]
        return [bufs[s][a:b] for s, a, b in zip(shard.tolist(), start.tolist(), end.tolist())]

    def image(self, i: int) -> np.ndarray:
        """RGB uint8 [64, 64, 3], decoded on the CPU; a payload that does not decode is a
        FormatError naming its shard and sample."""
        data = self.encoded(i)
        if self.payload == "raw":
            return data.reshape(IMAGE_SHAPE)
        from PIL import Image
        try:
            with Image.open(io.BytesIO(data)) as im:
                rgb = np.asarray(im.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as e:  # what PIL raises for a damaged JPEG
            raise FormatError(f"{self.data_dir}/{self.describe(i)}: does not decode ({e}); "
                              f"{repack_hint(self.data_dir)}") from None
        if rgb.shape != IMAGE_SHAPE:
            raise FormatError(f"{self.data_dir}/{self.describe(i)}: decodes to {rgb.shape}, not {IMAGE_SHAPE}")
        return rgb

    def images(self, idx=None) -> np.ndarray:
        """Many samples decoded on the CPU into one uint8 [N, 64, 64, 3] array."""
        idx = np.arange(len(self)) if idx is None else np.asarray(idx)
        out = np.empty((len(idx), *IMAGE_SHAPE), np.uint8)
        for j, i in enumerate(idx.tolist()):
            out[j] = self.image(i)
        return out


def _first_duplicate(names: list[str]) -> str:
    seen = set()
    for k in names:
        if k in seen:
            return k
        seen.add(k)
    return ""


def open_split(data_dir: str | os.PathLike, split: str, verify: bool = False) -> SplitDataset:
    """Open a packed split, checked (see SplitDataset); verify=True also checks the shard hashes,
    each shard hashed at most once per process."""
    return SplitDataset(data_dir, split, verify)

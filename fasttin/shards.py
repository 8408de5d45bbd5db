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
import struct
from pathlib import Path

import numpy as np

from fasttin.fileio import digest

FORMAT_NAME = "fasttin-shards"
FORMAT_VERSION = 1
MAGIC = b"FTINSHRD"
HEADER = struct.Struct("<8sHBBIQQQQ16x")  # magic, version, payload kind, reserved, n, 4 offsets
assert HEADER.size == 64
PAYLOAD_KINDS = {"jpeg": 0, "raw": 1}
IMAGE_SHAPE = (64, 64, 3)
MANIFEST = "manifest.json"


class FormatError(ValueError):
    """A packed data set that is missing, incomplete, corrupt or of an unknown version."""


class ShardWriter:
    """Writes one split as shards of about `shard_bytes` each, under temporary names.

    `finish()` completes the last shard and returns the manifest entries, still under temporary
    names; `commit()` renames them to their final names; `abort()` removes everything written.
    """

    def __init__(self, out_dir: Path, split: str, payload: str, shard_bytes: int = 64 << 20):
        if not 0 < shard_bytes < 1 << 32:
            raise ValueError("shard size must be between 1 byte and 4 GiB (u32 offsets)")
        self.out_dir, self.split, self.kind = Path(out_dir), split, PAYLOAD_KINDS[payload]
        self.shard_bytes = shard_bytes
        self.done: list[dict] = []
        self.tmp_paths: list[Path] = []
        self._f = None

    def _open(self):
        name = f"{self.split}-{len(self.done):03d}.shard"
        tmp = self.out_dir / (name + f".tmp{os.getpid()}")
        self.tmp_paths.append(tmp)
        self._f, self._name = open(tmp, "wb"), name
        self._f.write(b"\0" * HEADER.size)  # header goes in at the end, when the offsets are known
        self._offsets, self._labels, self._keys, self._pos = [0], [], [], 0

    def add(self, key: str, label: int, payload: bytes) -> None:
        if self._f is None:
            self._open()
        self._f.write(payload)
        self._pos += len(payload)
        self._offsets.append(self._pos)
        self._labels.append(label)
        self._keys.append(key)
        if self._pos >= self.shard_bytes:
            self._finish()

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
            self._finish()
        return self.done

    def commit(self) -> list[dict]:
        self.finish()
        for tmp, entry in zip(self.tmp_paths, self.done):
            os.replace(tmp, self.out_dir / entry["file"])
        self.tmp_paths = []
        return self.done

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        for p in self.tmp_paths:
            p.unlink(missing_ok=True)
        self.tmp_paths = []


def read_manifest(data_dir: str | os.PathLike) -> dict:
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir}: no such folder (pack it first: python -m fasttin.pack --out {data_dir})")
    if not path.is_file():
        raise FileNotFoundError(f"{data_dir}: not a packed data set (no {MANIFEST}; an interrupted pack? "
                                f"re-run python -m fasttin.pack --out {data_dir})")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None
    if m.get("format") != FORMAT_NAME:
        raise FormatError(f"{path}: not a {FORMAT_NAME} manifest")
    if m.get("version") != FORMAT_VERSION:
        raise FormatError(f"{path}: format version {m.get('version')}, this fasttin reads {FORMAT_VERSION}")
    return m


class SplitDataset:
    """One packed split, memory-mapped. Sample i is O(1): shard and offsets come from the index."""

    def __init__(self, data_dir: str | os.PathLike, split: str, verify: bool = False):
        self.data_dir = Path(data_dir)
        self.manifest = read_manifest(self.data_dir)
        splits = self.manifest["splits"]
        if split not in splits:
            raise ValueError(f"unknown split {split!r} in {self.data_dir}: packed splits are {sorted(splits)}")
        self.split = split
        self.payload = self.manifest["payload"]
        self.classes = [c["wnid"] for c in self.manifest["classes"]]
        self.class_words = [c["words"] for c in self.manifest["classes"]]
        self._maps, self._bufs = [], []
        offs, labels, keys, shard_ids = [], [], [], []
        for s, entry in enumerate(splits[split]["shards"]):
            buf = self._open_shard(entry, verify)
            _, _, kind, _, n, payload_start, index_start, keys_start, _ = HEADER.unpack_from(buf, 0)
            if kind != PAYLOAD_KINDS[self.payload]:
                raise FormatError(f"{entry['file']}: payload kind {kind} disagrees with the manifest")
            off = np.frombuffer(buf, "<u4", n + 1, index_start).astype(np.int64) + payload_start
            offs.append(off)
            labels.append(np.frombuffer(buf, "<i4", n, index_start + 4 * (n + 1)))
            keys += bytes(buf[keys_start:]).decode().split("\n") if n else []
            shard_ids.append(np.full(n, s, np.int32))
        self.keys = keys
        self.labels = np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64)
        self._shard = np.concatenate(shard_ids) if shard_ids else np.zeros(0, np.int32)
        self._start = np.concatenate([o[:-1] for o in offs]) if offs else np.zeros(0, np.int64)
        self._end = np.concatenate([o[1:] for o in offs]) if offs else np.zeros(0, np.int64)
        if len(self.labels) != splits[split]["count"] or len(keys) != len(self.labels):
            raise FormatError(f"{self.data_dir}/{split}: shards hold {len(self.labels)} samples, "
                              f"manifest says {splits[split]['count']}")

    def __getstate__(self):
        """Pickled by name: a worker process maps the shards itself (memory maps do not travel)."""
        return {"data_dir": self.data_dir, "split": self.split}

    def __setstate__(self, state):
        self.__init__(state["data_dir"], state["split"])

    def _open_shard(self, entry: dict, verify: bool) -> np.ndarray:
        path = self.data_dir / entry["file"]
        if not path.is_file():
            raise FileNotFoundError(f"missing shard {path}")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise FormatError(f"shard {path} is {size} bytes, manifest says {entry['bytes']} (truncated or replaced)")
        if verify and digest(path) != entry["sha256"]:
            raise FormatError(f"shard {path}: sha256 disagrees with the manifest (corrupt)")
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = np.frombuffer(mm, np.uint8)
        magic, version, *_rest, file_size = HEADER.unpack_from(buf, 0)
        if magic != MAGIC or version != FORMAT_VERSION or file_size != size:
            raise FormatError(f"shard {path}: bad header (magic {magic!r}, version {version})")
        self._maps.append(mm)
        self._bufs.append(buf)
        return buf

    def __len__(self) -> int:
        return len(self.labels)

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
        """RGB uint8 [64, 64, 3], decoded on the CPU."""
        data = self.encoded(i)
        if self.payload == "raw":
            return data.reshape(IMAGE_SHAPE)
        from PIL import Image
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))

    def images(self, idx=None) -> np.ndarray:
        """Many samples decoded on the CPU into one uint8 [N, 64, 64, 3] array."""
        idx = np.arange(len(self)) if idx is None else np.asarray(idx)
        out = np.empty((len(idx), *IMAGE_SHAPE), np.uint8)
        for j, i in enumerate(idx.tolist()):
            out[j] = self.image(i)
        return out


def open_split(data_dir: str | os.PathLike, split: str, verify: bool = False) -> SplitDataset:
    """Open a packed split; a clear error if `data_dir` is not a complete packed data set."""
    return SplitDataset(data_dir, split, verify)

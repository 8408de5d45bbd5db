"""The fasttin shard format's reader: one packed split, memory-mapped and checked at open, sample i
in O(1). Byte layout: docs/FORMAT.md."""
from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

from fasttin.fileio import digest
from fasttin.shards.layout import (
    IMAGE_SHAPE,
    DataError,
    FormatError,
    NotPackedError,
    check_index,
    decode,
    read_manifest,
    repack_hint,
)

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

    def _bad(self, path: Path, what: str) -> FormatError:  # a damaged shard, named
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
        try:
            return check_index(buf, entry, self.payload, len(self.classes), labelled=self.split != "test")
        except ValueError as e:
            raise self._bad(self.data_dir / entry["file"], str(e)) from None

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
        """RGB uint8 [64, 64, 3], decoded on the CPU; a payload that does not decode is a DataError
        naming its shard and sample."""
        try:
            return decode(self.encoded(i), self.payload)
        except ValueError as e:
            raise DataError(f"{self.data_dir}/{self.describe(i)}: {e}; {repack_hint(self.data_dir)}") from None

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        """(image, label) of sample i: the indexed-dataset protocol (torch's Dataset, FFCV's writer)."""
        i = range(len(self))[i]  # a negative index names its sample as the positive one; IndexError past the end
        return self.image(i), int(self.labels[i])

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

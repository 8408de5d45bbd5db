"""The fasttin shard format's writer: one split as shards, under temporary names until committed.
Byte layout: docs/FORMAT.md."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fasttin.fileio import OutputError, digest, os_reason, publish, tmp_name
from fasttin.shards.layout import FORMAT_VERSION, HEADER, MAGIC, PAYLOAD_KINDS, name_problem


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
            raise OutputError(f"cannot write {self.tmp_paths[-1]}: {os_reason(e)}") from None

    def _open(self):
        name = f"{self.split}-{len(self.done):03d}.shard"
        tmp = tmp_name(self.out_dir / name)
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
            publish(tmp, self.out_dir / entry["file"])
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

"""The official Tiny-ImageNet-200 layout, read from its zip (in place) or its extracted folder.

This module only *lists* what the source holds and reads raw member bytes; deciding what is a
good image is the packer's job. It also downloads the official archive when asked.
"""
from __future__ import annotations

import hashlib
import os
import re
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from fasttin.fileio import digest

OFFICIAL_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
OFFICIAL_BYTES = 248_100_043
OFFICIAL_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
SPLITS = ("train", "val", "test")


class SourceError(Exception):
    """The source cannot be used at all (missing wnids.txt, not a zip, checksum mismatch...)."""


@dataclass(frozen=True)
class Item:
    key: str  # original file name, e.g. "n01443537_0.JPEG"
    label: int  # index into the sorted wnids; -1 for test
    member: str  # path relative to the data set root, e.g. "train/n01443537/images/n01443537_0.JPEG"


@dataclass
class Layout:
    wnids: list[str]  # sorted: index = label (torchvision ImageFolder order)
    words: dict[str, str]
    items: dict[str, list[Item]]  # split -> items kept
    problems: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # split -> (file, reason)

    def found(self, split: str) -> int:
        return len(self.items[split]) + len(self.problems.get(split, []))


def natural_key(name: str):
    """'x_2' before 'x_10': the order a person means by 'the first N images by file name'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


class Source:
    """A Tiny-ImageNet-200 zip or folder. Picklable by path: workers reopen it themselves."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise SourceError(f"source {self.path} does not exist")
        self.kind = "zip" if self.path.is_file() else "folder"
        self._zip, self._zip_pid = None, None
        if self.kind == "zip":
            try:
                names = self._open_zip().namelist()
            except zipfile.BadZipFile:
                raise SourceError(f"{self.path} is not a zip archive") from None
            roots = [n[: -len("wnids.txt")] for n in names if n.endswith("wnids.txt") and n.count("/") <= 1]
            if not roots:
                raise SourceError(f"{self.path}: no wnids.txt in the archive (is it tiny-imagenet-200.zip?)")
            self.root = roots[0]
            self._names = [n[len(self.root):] for n in names if n.startswith(self.root) and not n.endswith("/")]
        else:
            base = self.path / "tiny-imagenet-200" if (self.path / "tiny-imagenet-200").is_dir() else self.path
            if not (base / "wnids.txt").is_file():
                raise SourceError(f"{base}: missing wnids.txt (is it the tiny-imagenet-200 folder?)")
            self.root = base
            self._names = None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_zip"} | {"_zip": None}

    def _open_zip(self) -> zipfile.ZipFile:
        if self._zip is None or self._zip_pid != os.getpid():  # a forked worker needs its own handle
            self._zip, self._zip_pid = zipfile.ZipFile(self.path), os.getpid()
        return self._zip

    def read(self, member: str) -> bytes:
        if self.kind == "zip":
            return self._open_zip().read(self.root + member)
        return (self.root / member).read_bytes()

    def exists(self, member: str) -> bool:
        if self.kind == "zip":
            return member in self._member_set
        return (self.root / member).is_file()

    def listdir(self, prefix: str) -> list[str]:
        """Relative member names under `prefix` (a folder path ending in '/'), recursively."""
        if self.kind == "zip":
            return [n for n in self._names if n.startswith(prefix)]
        base = self.root / prefix
        if not base.is_dir():
            return []
        return [str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file()]

    @property
    def _member_set(self):
        if not hasattr(self, "_set"):
            self._set = set(self._names)
        return self._set

    def checksum(self) -> dict:
        """sha256 of the archive, or of the sorted (name, size) listing of a folder."""
        if self.kind == "zip":
            return {"sha256": digest(self.path), "bytes": self.path.stat().st_size}
        h = hashlib.sha256()
        for p in sorted(self.root.rglob("*")):
            if p.is_file():
                h.update(f"{p.relative_to(self.root)}\t{p.stat().st_size}\n".encode())
        return {"listing_sha256": h.hexdigest()}

    def layout(self, classes: int | None = None, per_class: int | None = None) -> Layout:
        """Every sample of every split with its label; structural problems listed, not raised."""
        if not self.exists("wnids.txt"):
            raise SourceError(f"{self.path}: missing wnids.txt")
        if not self.exists("val/val_annotations.txt"):
            raise SourceError(f"{self.path}: missing val/val_annotations.txt")
        wnids = sorted(w.strip() for w in self.read("wnids.txt").decode().split() if w.strip())
        if classes is not None:
            if not 1 <= classes <= len(wnids):
                raise SourceError(f"--classes {classes}: the source has {len(wnids)} classes")
            wnids = wnids[:classes]
        all_wnids = {w.strip() for w in self.read("wnids.txt").decode().split()}
        label_of = {w: i for i, w in enumerate(wnids)}
        words = {}
        if self.exists("words.txt"):
            for line in self.read("words.txt").decode("utf-8", "replace").splitlines():
                wnid, _, text = line.partition("\t")
                if wnid in label_of:
                    words[wnid] = text.strip()
        items = {s: [] for s in SPLITS}
        problems = {s: [] for s in SPLITS}

        # train: train/<wnid>/images/<file>; label from the folder
        by_class: dict[str, list[str]] = {}
        for m in self.listdir("train/"):
            parts = m.split("/")
            if len(parts) == 4 and parts[2] == "images":
                by_class.setdefault(parts[1], []).append(m)
        for wnid in sorted(by_class):
            members = sorted(by_class[wnid], key=natural_key)
            if wnid not in all_wnids:
                problems["train"] += [(m, f"class folder {wnid} is not in wnids.txt") for m in members]
                continue
            if wnid not in label_of:
                continue  # dropped by --classes
            if per_class is not None:
                members = members[:per_class]
            items["train"] += [Item(m.rsplit("/", 1)[1], label_of[wnid], m) for m in members]

        # val: val/images/<file>; label from val_annotations.txt; files are never moved
        annotated = set()
        for n, line in enumerate(self.read("val/val_annotations.txt").decode().splitlines(), 1):
            if not line.strip():
                continue
            fields = line.split("\t")
            member = f"val/images/{fields[0]}"
            annotated.add(member)
            if len(fields) < 2 or fields[1] not in all_wnids:
                problems["val"].append((member, f"val_annotations.txt line {n} names no known class"))
            elif not self.exists(member):
                problems["val"].append((member, f"named by val_annotations.txt line {n} but missing"))
            elif fields[1] in label_of:
                items["val"].append(Item(fields[0], label_of[fields[1]], member))
        for m in self.listdir("val/images/"):
            if m not in annotated:
                problems["val"].append((m, "not in val_annotations.txt"))
        items["val"].sort(key=lambda it: natural_key(it.key))

        # test: unlabeled; kept whole only without --classes
        if classes is None:
            items["test"] = [Item(m.rsplit("/", 1)[1], -1, m)
                             for m in sorted(self.listdir("test/images/"), key=natural_key)]
        return Layout(wnids, words, items, problems)


def default_cache() -> Path:
    return Path(os.environ.get("FASTTIN_CACHE", Path.home() / ".cache" / "fasttin"))


def download_official(cache: Path | None = None, url: str = OFFICIAL_URL) -> Path:
    """The official archive in the cache, downloaded with a progress bar and checked (size, md5)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    cache = cache or default_cache()
    dest = cache / "tiny-imagenet-200.zip"
    if dest.exists() and digest(dest, "md5") == OFFICIAL_MD5:
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(f".zip.part{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f, Progress(
            "[progress.description]{task.description}", BarColumn(), DownloadColumn(),
            TransferSpeedColumn(), TimeRemainingColumn()) as bar:
            task = bar.add_task("download", total=int(r.headers.get("Content-Length") or OFFICIAL_BYTES))
            while chunk := r.read(1 << 20):
                f.write(chunk)
                bar.advance(task, len(chunk))
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SourceError(f"cannot download {url} ({e}); offline? pass --src PATH to a "
                          "tiny-imagenet-200.zip or its folder") from None
    size, md5 = tmp.stat().st_size, digest(tmp, "md5")
    if size != OFFICIAL_BYTES or md5 != OFFICIAL_MD5:
        tmp.unlink()
        raise SourceError(f"downloaded {url}: {size} bytes, md5 {md5}; expected {OFFICIAL_BYTES} bytes, "
                          f"md5 {OFFICIAL_MD5}: refused")
    os.replace(tmp, dest)
    return dest

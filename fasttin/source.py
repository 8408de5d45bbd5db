"""The official Tiny-ImageNet-200 layout, read from its zip (in place) or its extracted folder.

This module only *lists* what the source holds and reads raw member bytes; deciding what is a
good image is the packer's job. It also downloads the official archive when asked.
"""
from __future__ import annotations

import hashlib
import os
import re
import unicodedata
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from fasttin.errors import UserError, shown
from fasttin.fileio import cache_folder, digest, write_with
from fasttin.shards import name_problem

OFFICIAL_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
OFFICIAL_BYTES = 248_100_043
OFFICIAL_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
SPLITS = ("train", "val", "test")
# what reading one zip member can raise for a damaged archive (bad CRC, broken deflate stream,
# truncated data, unsupported compression, encryption) or a folder file (permissions, I/O error)
READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, OSError)
# The most one file of the source may hold. A 64x64 image is 12 KiB as raw RGB and a few KiB as a
# JPEG (the official files are 1-5 KiB); even a 16-bit RGBA PNG of it, uncompressed, is 32 KiB. Far
# past any sane one, 16 MiB, keeps a hostile member (a 1.6 MB zip member that inflates to 1.5 GiB:
# a decompression bomb) from being read into memory. Index files are bounded more loosely: the
# official words.txt is 2.7 MB.
MAX_IMAGE_BYTES = 16 << 20
MAX_INDEX_BYTES = 256 << 20


class SourceError(UserError):
    """The source cannot be used at all (missing wnids.txt, not a zip, checksum mismatch...)."""


class MemberError(SourceError):
    """One file of the source cannot be read: a per-file fault that --skip-bad skips."""


def member_problem(member: str) -> str | None:
    """Why a relative member path (e.g. 'train/n01/images/x.JPEG') could leave the source's root
    or break a one-line name: absolute, '..', '.', empty parts, backslashes, control characters,
    invisible format characters (a BOM, zero-width joiners: see shards.name_problem)."""
    if member.startswith("/"):
        return "is an absolute path"
    for part in member.split("/"):
        why = name_problem(part)
        if why:
            return f"has a part that {why}"
    return None


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
    # split (or "source" for index-file lines) -> (file, reason)
    problems: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def found(self, split: str) -> int:
        return len(self.items[split]) + len(self.problems.get(split, []))


def natural_key(name: str):
    """'x_2' before 'x_10': the order a person means by 'the first N images by file name'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


class Source:
    """A Tiny-ImageNet-200 zip or folder. Picklable by path: workers reopen it themselves.

    Only names that stay inside the root are ever read: a member whose name is absolute, holds
    '..', a control or invisible format character, or (zip) appears twice, or (folder) is a symlink leading out of
    the root, is listed in `bad_members` instead of being listed.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise SourceError(f"source {self.path} does not exist")
        self.kind = "zip" if self.path.is_file() else "folder"
        self._zip, self._zip_pid = None, None
        self.bad_members: list[tuple[str, str]] = []
        if self.kind == "zip":
            self._init_zip()
        else:
            base = self.path / "tiny-imagenet-200" if (self.path / "tiny-imagenet-200").is_dir() else self.path
            if not (base / "wnids.txt").is_file():
                raise SourceError(f"{base}: missing wnids.txt (is it the tiny-imagenet-200 folder?)")
            self.root = base
            self._real_root = base.resolve()
            self._names = None

    def _init_zip(self) -> None:
        try:
            names = self._open_zip().namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise SourceError(f"{self.path} is not a readable zip archive ({e})") from None
        roots = [n[: -len("wnids.txt")] for n in names if n.endswith("wnids.txt") and n.count("/") <= 1]
        if not roots:
            raise SourceError(f"{self.path}: no wnids.txt in the archive (is it tiny-imagenet-200.zip?)")
        self.root = roots[0]
        counts: dict[str, int] = {}
        for n in names:
            if n.startswith(self.root) and not n.endswith("/"):
                counts[n[len(self.root):]] = counts.get(n[len(self.root):], 0) + 1
        self._names = []
        for n, c in counts.items():
            why = member_problem(n) or (f"appears {c} times in the archive" if c > 1 else None)
            if why:
                self.bad_members.append((n, f"the name {why}"))
            else:
                self._names.append(n)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_zip"} | {"_zip": None}

    def _open_zip(self) -> zipfile.ZipFile:
        if self._zip is None or self._zip_pid != os.getpid():  # a forked worker needs its own handle
            self._zip, self._zip_pid = zipfile.ZipFile(self.path), os.getpid()
        return self._zip

    def read(self, member: str, limit: int = MAX_IMAGE_BYTES) -> bytes:
        """The bytes of one member; MemberError (naming it) if it cannot be read or holds more than
        `limit` bytes (by its declared size, and by what is actually read: at most limit + 1)."""
        why = member_problem(member)
        if why:  # never reached through layout(): a guard for any other caller
            raise MemberError(f"{shown(member)}: the name {why}")
        try:
            if self.kind == "zip":
                info = self._open_zip().getinfo(self.root + member)
                self._check_size(member, info.file_size, limit)
                with self._open_zip().open(info) as f:
                    data = f.read(limit + 1)
            else:
                with open(self.root / member, "rb") as f:
                    self._check_size(member, os.fstat(f.fileno()).st_size, limit)
                    data = f.read(limit + 1)
        except (*READ_ERRORS, KeyError) as e:
            raise MemberError(f"{shown(member)}: cannot be read ({type(e).__name__}: {e})") from None
        self._check_size(member, len(data), limit, declared=False)  # a header that lies, a file that grew
        return data

    @staticmethod
    def _check_size(member: str, size: int, limit: int, declared: bool = True) -> None:
        if size > limit:
            what = f"holds {size:,} bytes" if declared else "holds more bytes than it declares"
            raise MemberError(f"{shown(member)}: {what}, more than the {limit >> 20} MiB any file of a "
                              "64x64 data set could need (a decompression bomb?): not read")

    def exists(self, member: str) -> bool:
        if self.kind == "zip":
            return member in self._member_set
        return member_problem(member) is None and (self.root / member).is_file()

    def listdir(self, prefix: str) -> list[str]:
        """Relative member names under `prefix` (a folder path ending in '/'), recursively; names
        that could escape the root go to `bad_members` instead."""
        if self.kind == "zip":
            return [n for n in self._names if n.startswith(prefix)]
        base = self.root / prefix
        if not base.is_dir():
            return []
        names = []
        for p in base.rglob("*"):
            if not p.is_file():
                continue
            n = str(p.relative_to(self.root))
            why = member_problem(n)
            if why is None and p.is_symlink() and not p.resolve().is_relative_to(self._real_root):
                why = "is a symlink leading out of the source folder"
            if why:
                self.bad_members.append((n, f"the name {why}" if not why.startswith("is a symlink") else why))
            else:
                names.append(n)
        return names

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

    def text(self, member: str) -> str:
        """An index file (wnids.txt, val_annotations.txt...) as text; SourceError if unreadable."""
        if not self.exists(member):
            raise SourceError(f"{self.path}: missing {member}")
        try:
            return self.read(member, MAX_INDEX_BYTES).decode("utf-8-sig")  # a leading BOM is encoding, not text
        except UnicodeDecodeError as e:
            raise SourceError(f"{self.path}: {member} is not UTF-8 text ({e})") from None
        except MemberError as e:
            raise SourceError(f"{self.path}: {e}") from None

    def layout(self, classes: int | None = None, per_class: int | None = None) -> Layout:
        """Every sample of every split with its label; per-file problems listed, not raised."""
        return _LayoutReader(self, classes, per_class).read()


class _LayoutReader:
    """Reads the index files and listings of one Source into a Layout, checking every name."""

    def __init__(self, src: Source, classes: int | None, per_class: int | None):
        self.src, self.classes, self.per_class = src, classes, per_class
        self.problems: dict[str, list[tuple[str, str]]] = {s: [] for s in (*SPLITS, "source")}
        self.items: dict[str, list[Item]] = {s: [] for s in SPLITS}

    def read(self) -> Layout:
        src = self.src
        annotations = src.text("val/val_annotations.txt")  # both index files present before any work
        self.all_wnids = self._wnids(src.text("wnids.txt"))
        wnids = sorted(self.all_wnids)
        if self.classes is not None:
            if not 1 <= self.classes <= len(wnids):
                raise SourceError(f"--classes {self.classes}: the source has {len(wnids)} classes")
            wnids = wnids[:self.classes]
        self.label_of = {w: i for i, w in enumerate(wnids)}
        words = self._words()
        self._train()
        self._val(annotations)
        if self.classes is None:  # test: unlabeled; kept whole only without --classes
            self._test()
        self._bad_members()
        for split in SPLITS:
            self._unique_keys(split)
        return Layout(wnids, words, self.items, {k: v for k, v in self.problems.items() if v})

    def _wnids(self, text: str) -> dict[str, int]:
        """wnid -> line of wnids.txt; a bad or repeated wnid is refused: it defines the labels."""
        seen: dict[str, int] = {}
        for n, line in enumerate(text.splitlines(), 1):
            for w in line.split():
                why = name_problem(w) or (f"is listed again (first on line {seen[w]})" if w in seen else None)
                if why:
                    raise SourceError(f"{self.src.path}: wnids.txt line {n}: the wnid {shown(w)} {why}; "
                                      "the class list must be exact, so nothing was packed")
                seen[w] = n
        if not seen:
            raise SourceError(f"{self.src.path}: wnids.txt lists no classes")
        return seen

    def _words(self) -> dict[str, str]:
        words, first = {}, {}
        if not self.src.exists("words.txt"):
            return words
        try:
            text = self.src.read("words.txt", MAX_INDEX_BYTES).decode("utf-8-sig", "replace")
        except MemberError as e:
            raise SourceError(f"{self.src.path}: {e}") from None
        for n, line in enumerate(text.splitlines(), 1):
            wnid, _, desc = line.partition("\t")
            if wnid not in self.label_of:
                continue
            desc = desc.strip()
            why = (f"{wnid} is described again (first on line {first[wnid]})" if wnid in first else
                   None if desc.isprintable() else f"the description of {wnid} holds a control character")
            if why:
                self.problems["source"].append((f"words.txt line {n}", why))
                continue
            first[wnid], words[wnid] = n, desc
        return words

    def _train(self) -> None:
        """train/<wnid>/images/<file>; the label comes from the folder."""
        by_class: dict[str, list[str]] = {}
        for m in self.src.listdir("train/"):
            parts = m.split("/")
            if len(parts) == 4 and parts[2] == "images":
                by_class.setdefault(parts[1], []).append(m)
        for wnid in sorted(by_class):
            members = sorted(by_class[wnid], key=natural_key)
            if wnid not in self.all_wnids:
                self.problems["train"] += [(m, f"class folder {wnid} is not in wnids.txt") for m in members]
                continue
            if wnid not in self.label_of:
                continue  # dropped by --classes
            if self.per_class is not None:
                members = members[:self.per_class]
            self.items["train"] += [Item(m.rsplit("/", 1)[1], self.label_of[wnid], m) for m in members]

    def _val(self, annotations: str) -> None:
        """val/images/<file>; the label comes from val_annotations.txt; files are never moved."""
        annotated: dict[str, int] = {}
        problems, listed = self.problems["val"], set(self.src.listdir("val/images/"))
        for n, line in enumerate(annotations.splitlines(), 1):
            if not line.strip():
                continue
            fields = line.split("\t")
            member, where = f"val/images/{fields[0]}", f"val_annotations.txt line {n}"
            if name_problem(fields[0]):
                problems.append((member, f"{where}: the file name {name_problem(fields[0])}"))
            elif member in annotated:
                problems.append((member, f"{where}: annotated again (first on line {annotated[member]})"))
            elif len(fields) < 2 or fields[1] not in self.all_wnids:
                problems.append((member, f"{where} names no known class"))
            elif member not in listed:
                problems.append((member, f"named by {where} but missing"))
            elif fields[1] in self.label_of:
                self.items["val"].append(Item(fields[0], self.label_of[fields[1]], member))
            annotated.setdefault(member, n)
        problems += [(m, "not in val_annotations.txt") for m in sorted(listed - annotated.keys())]
        self.items["val"].sort(key=lambda it: natural_key(it.key))

    def _test(self) -> None:
        members = [m for m in self.src.listdir("test/images/") if m.count("/") == 2]
        self.items["test"] = [Item(m.rsplit("/", 1)[1], -1, m) for m in sorted(members, key=natural_key)]

    def _bad_members(self) -> None:
        """Names that could escape the root, under a folder this pack reads: a problem of that split."""
        for m, why in self.src.bad_members:
            parts = m.split("/")
            if parts[0] == "train" and len(parts) > 1 and parts[1] in self.all_wnids and parts[1] not in self.label_of:
                continue  # a class dropped by --classes
            read = parts[0] == "train" or parts[0] in ("val", "test") and parts[1:2] == ["images"]
            if read and (parts[0] != "test" or self.classes is None):
                self.problems[parts[0]].append((m, why))

    def _unique_keys(self, split: str) -> None:
        """Two samples of a split with one file name (train/a/images/x and train/b/images/x), or
        names one file on a case-insensitive or normalising file system (X.JPEG and x.JPEG; an é
        composed or not, as macOS and Windows take them): the later one is a problem, since names
        key per-sample outputs."""
        seen, kept = {}, []
        for it in self.items[split]:
            same = unicodedata.normalize("NFC", it.key).casefold()
            if same in seen:
                first = seen[same]
                alike = "" if first.rsplit("/", 1)[-1] == it.key else " up to case or Unicode normalisation"
                self.problems[split].append((it.member, f"has the same file name as {first}{alike}"))
            else:
                seen[same] = it.member
                kept.append(it)
        self.items[split] = kept


def download_official(cache: Path | None = None, url: str = OFFICIAL_URL) -> Path:
    """The official archive in the cache, downloaded with a progress bar and checked (size, md5)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    cache = cache or cache_folder()
    dest = cache / "tiny-imagenet-200.zip"
    if dest.exists() and digest(dest, "md5") == OFFICIAL_MD5:
        return dest
    cache.mkdir(parents=True, exist_ok=True)

    def download(tmp: Path) -> None:
        try:
            with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f, Progress(
                "[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                TransferSpeedColumn(), TimeRemainingColumn()) as bar:
                task = bar.add_task("download", total=int(r.headers.get("Content-Length") or OFFICIAL_BYTES))
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    bar.advance(task, len(chunk))
        except OSError as e:
            raise SourceError(f"cannot download {url} ({e}); offline? pass --src PATH to a "
                              "tiny-imagenet-200.zip or its folder") from None
        size, md5 = tmp.stat().st_size, digest(tmp, "md5")
        if size != OFFICIAL_BYTES or md5 != OFFICIAL_MD5:
            raise SourceError(f"downloaded {url}: {size} bytes, md5 {md5}; expected {OFFICIAL_BYTES} bytes, "
                              f"md5 {OFFICIAL_MD5}: refused")
    write_with(dest, download)
    return dest

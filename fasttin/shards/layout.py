"""The fasttin shard format's types and checks: constants, errors, names, the manifest's structure,
a shard's index, and the one decoder of a stored sample. Byte layout: docs/FORMAT.md (keep them in
step). Pure functions over bytes and dicts: the writer and the reader both use them.

A packed data set is a folder: `manifest.json` (written last; its presence means complete) and,
per split, shards `<split>-NNN.shard`. A shard is a 64-byte header, the payloads back to back,
then an index (u32 offsets, i32 labels) and the original file names. Everything is little-endian.
"""
from __future__ import annotations

import io
import json
import os
import re
import struct
import unicodedata
from pathlib import Path

import numpy as np

from fasttin.errors import UserError
from fasttin.fileio import os_reason

FORMAT_NAME = "fasttin-shards"
FORMAT_VERSION = 1
MAGIC = b"FTINSHRD"
HEADER = struct.Struct("<8sHBBIQQQQ16x")  # magic, version, payload kind, reserved, n, 4 offsets
assert HEADER.size == 64
PAYLOAD_KINDS = {"jpeg": 0, "raw": 1}
IMAGE_SHAPE = (64, 64, 3)
MANIFEST = "manifest.json"
# Characters no name read from the data may hold: path separators, ASCII/C1 control characters
# (newline included) and everything str.splitlines() breaks on, so a name is always one line;
# `name_problem` also refuses Unicode format characters (category Cf: BOM, zero-width joiners).
_BAD_CHARS = re.compile(r"[/\\\x00-\x1f\x7f-\x9f\u2028\u2029]")


def name_problem(name: str) -> str | None:
    """Why `name` cannot be a bare file name taken from the data (None if it can): keeps every
    name that later becomes a path, a shard key or a line of output inside its folder and line."""
    if not name:
        return "is empty"
    if name in (".", ".."):
        return f"is {name!r}"
    if len(name.encode("utf-8", "surrogatepass")) > 255:  # every tool that writes it as a file would fail
        return "is longer than 255 bytes, more than a file system takes for a file name"
    bad = _BAD_CHARS.search(name)
    if bad:
        kind = "a path separator" if bad.group() in "/\\" else "a control character"
        return f"holds {kind} ({bad.group()!r})"
    if not name.isprintable():  # fast path: names of printable characters hold no format character
        fmt = next((c for c in name if unicodedata.category(c) == "Cf"), None)
        if fmt:  # a byte-order mark, zero-width joiner, bidi override: two names that look alike
            return f"holds an invisible format character ({fmt!r})"
    return None


class FormatError(UserError, ValueError):
    """A packed data set that is incomplete, corrupt, hand-made wrongly or of an unknown version."""


class NotPackedError(FormatError, FileNotFoundError):
    """The folder, its manifest or one of its shards is missing."""


class DataError(FormatError):
    """A stored sample that does not decode into a 64x64 RGB image; names its shard and sample."""


def repack_hint(data_dir) -> str:
    return f"repack it: python -m fasttin.pack --force --out {data_dir}"


# ---- the manifest's structure ----------------------------------------------------------------------

_TYPE_NAMES = {int: "an integer", str: "a string", list: "a list", dict: "an object"}


def field(obj, key, kind, where: str, path: Path):
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
    classes = field(m, "classes", list, "", path)
    if not classes:
        raise FormatError(f"{path}: field classes is empty")
    seen = set()
    for i, c in enumerate(classes):
        wnid = field(c, "wnid", str, f"classes[{i}]", path)
        field(c, "words", str, f"classes[{i}]", path)
        if name_problem(wnid) or wnid in seen:
            why = name_problem(wnid) or "is listed twice"
            raise FormatError(f"{path}: field classes[{i}].wnid {wnid!r} {why}")
        seen.add(wnid)


def _check_split(name: str, entry, path: Path) -> None:
    where = f"splits.{name}"
    if not isinstance(entry, dict):
        raise FormatError(f"{path}: field {where} must be an object")
    count = field(entry, "count", int, where, path)
    shards = field(entry, "shards", list, where, path)
    total = 0
    for j, sh in enumerate(shards):
        w = f"{where}.shards[{j}]"
        file = field(sh, "file", str, w, path)
        if name_problem(file) or not file.endswith(".shard"):
            raise FormatError(f"{path}: field {w}.file {file!r} is not a shard file name in this folder")
        n, size = field(sh, "count", int, w, path), field(sh, "bytes", int, w, path)
        sha = field(sh, "sha256", str, w, path)
        if n < 0 or size < HEADER.size or not re.fullmatch("[0-9a-f]{64}", sha):
            raise FormatError(f"{path}: field {w} has an impossible count, bytes or sha256")
        total += n
    if count != total:
        raise FormatError(f"{path}: field {where}.count is {count}, its shards hold {total}")


# A manifest the packer writes nests 5 deep (splits.train.shards[0].file); anything far deeper is
# hostile, and would break json.dumps or a comparison made later from a deeper call stack.
_MAX_DEPTH = 64


def _depth(obj) -> int:
    """How deep lists and objects nest in `obj` (a scalar is 0), without recursion."""
    deepest, todo = 0, [(obj, 1)]
    while todo:
        o, d = todo.pop()
        if isinstance(o, (list, dict)):
            deepest = max(deepest, d)
            if deepest > _MAX_DEPTH:
                break
            todo.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return deepest


def read_manifest(data_dir: str | os.PathLike) -> dict:
    """The manifest of a complete packed data set, its structure checked: a FormatError naming
    the file and the field otherwise (NotPackedError when the folder or manifest is missing)."""
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST
    if data_dir.exists() and not data_dir.is_dir():  # e.g. DIR/manifest.json given for DIR
        raise NotPackedError(f"{data_dir} is a file: --data takes the pack's folder ({data_dir.parent})")
    if not data_dir.is_dir():
        raise NotPackedError(f"{data_dir}: no such folder (pack it first: python -m fasttin.pack --out {data_dir})")
    if not path.is_file():
        raise NotPackedError(f"{data_dir}: not a packed data set (no {MANIFEST}; an interrupted pack? "
                             f"re-run python -m fasttin.pack --out {data_dir})")
    try:
        m = json.loads(path.read_bytes())
        if _depth(m) > _MAX_DEPTH:
            raise RecursionError
    except RecursionError:  # '[[[[...' past the parser's limit, or deep enough to break a later dump
        raise FormatError(f"{path}: not a valid manifest (nested too deeply); {repack_hint(data_dir)}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        reason = str(e).split(";")[0]  # not int's advice to call sys.set_int_max_str_digits()
        raise FormatError(f"{path}: not valid JSON ({reason}); {repack_hint(data_dir)}") from None
    except OSError as e:
        raise FormatError(f"{path}: cannot be read ({os_reason(e)})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise FormatError(f"{path}: not a {FORMAT_NAME} manifest (field format)")
    if m.get("version") != FORMAT_VERSION:
        raise FormatError(f"{path}: format version {m.get('version')}, this fasttin reads {FORMAT_VERSION}")
    if field(m, "payload", str, "", path) not in PAYLOAD_KINDS:
        raise FormatError(f"{path}: field payload is {m['payload']!r}, not one of {sorted(PAYLOAD_KINDS)}")
    if field(m, "image_shape", list, "", path) != list(IMAGE_SHAPE):
        raise FormatError(f"{path}: field image_shape is {m['image_shape']}, this fasttin reads {list(IMAGE_SHAPE)}")
    _check_classes(m, path)
    for name, entry in field(m, "splits", dict, "", path).items():
        if name_problem(name):
            raise FormatError(f"{path}: field splits has a bad split name {name!r}")
        _check_split(name, entry, path)
    return m



def check_split(manifest: dict, data, split: str) -> None:
    """The split a command scores or predicts: one the pack holds, and not empty (a FormatError
    naming the flag, the folder and what it holds)."""
    splits = manifest["splits"]
    if split not in splits:
        raise FormatError(f"--split {split}: {data} holds the splits {', '.join(sorted(splits))}")
    if splits[split].get("count") == 0:
        raise FormatError(f"--split {split}: the {split} split of {data} is empty (0 samples)")


# ---- a shard's index ---------------------------------------------------------------------------------

def check_index(buf: np.ndarray, entry: dict, payload: str, n_classes: int, labelled: bool):
    """(offsets from the file start, labels, keys) of one shard's bytes, every field checked against
    its manifest `entry`; a shard that disagrees raises ValueError saying what (the reader names the
    file). `labelled`: every label must be a class (test may hold -1, no label)."""
    size = len(buf)
    magic, version, kind, _, n, payload_start, index_start, keys_start, file_size = HEADER.unpack_from(buf, 0)
    if magic != MAGIC or version != FORMAT_VERSION:
        raise ValueError(f"bad header (magic {magic!r}, version {version})")
    if kind != PAYLOAD_KINDS[payload]:
        raise ValueError(f"payload kind {kind} disagrees with the manifest's {payload!r}")
    if n != entry["count"]:
        raise ValueError(f"header says {n} samples, manifest says {entry['count']}")
    if (payload_start != HEADER.size or index_start % 8 or not payload_start <= index_start
            or keys_start != index_start + 8 * n + 4 or not keys_start <= file_size == size):
        raise ValueError("header offsets out of bounds")
    keys = check_keys(buf, keys_start, n)
    off = np.frombuffer(buf, "<u4", n + 1, index_start).astype(np.int64)
    step = np.diff(off)
    if off[0] != 0 or (step < 0).any() or not 0 <= index_start - payload_start - off[-1] < 8:
        i = int(np.argmax(step < 0)) if (step < 0).any() else n - 1
        raise ValueError(f"sample {i} ({keys[i] if n else '-'}): offsets not increasing or out of bounds")
    wrong = step != np.prod(IMAGE_SHAPE) if payload == "raw" else step == 0
    if wrong.any():
        i = int(np.argmax(wrong))
        raise ValueError(f"sample {i} ({keys[i]}): a payload of {step[i]} bytes")
    labels = np.frombuffer(buf, "<i4", n, index_start + 4 * (n + 1))
    out = (labels < (0 if labelled else -1)) | (labels >= n_classes)
    if out.any():
        i = int(np.argmax(out))
        raise ValueError(f"sample {i} ({keys[i]}): label {labels[i]} outside the {n_classes} classes")
    return off + payload_start, labels, keys


def check_keys(buf: np.ndarray, keys_start: int, n: int) -> list[str]:
    """The `n` sample names stored from `keys_start` on: UTF-8, one a line, each a bare name."""
    try:
        text = bytes(buf[keys_start:]).decode()
    except UnicodeDecodeError:
        raise ValueError("sample names are not UTF-8") from None
    keys = text.split("\n") if n else []
    if len(keys) != n or (not n and text):
        raise ValueError(f"{len(keys)} sample names for {n} samples")
    flat = text.replace("\n", "")
    too_long = any(len(k) > 63 and len(k.encode()) > 255 for k in keys)  # UTF-8: 4 bytes a char at most
    if too_long or _BAD_CHARS.search(flat) or not flat.isprintable() or "" in keys or "." in keys or ".." in keys:
        i = next((i for i, k in enumerate(keys) if name_problem(k)), None)  # none: e.g. a no-break space
        if i is not None:
            raise ValueError(f"sample {i}: name {keys[i]!r} {name_problem(keys[i])}")
    return keys


# ---- a sample ----------------------------------------------------------------------------------------

def decode(data: np.ndarray, payload: str) -> np.ndarray:
    """A stored payload as RGB uint8 [64, 64, 3] (the one CPU decoder); ValueError saying why not."""
    if payload == "raw":
        if data.size != np.prod(IMAGE_SHAPE):
            raise ValueError(f"{data.size} bytes, a raw sample has {np.prod(IMAGE_SHAPE)}")
        return data.reshape(IMAGE_SHAPE)
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as im:
            rgb = np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # what PIL raises for bad data
        raise ValueError(f"does not decode ({type(e).__name__}: {e})") from None
    if rgb.shape != IMAGE_SHAPE:
        raise ValueError(f"decodes to {rgb.shape}, not {IMAGE_SHAPE}")
    return rgb

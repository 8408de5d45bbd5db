"""Each peer's own input, made once from the packed split into a cache folder.

An ImageFolder of the 64 px files (the packed JPEG payloads byte for byte; PNG for raw payloads)
feeds torchvision and DALI's file reader; an ImageFolder of the same files upscaled on disk with
OpenCV INTER_CUBIC feeds the classic pipeline. A folder is built under a temporary name and
renamed when complete, so an interrupted preparation is never mistaken for a finished one.
FFCV's .beton files are written by the FFCV worker itself (it needs ffcv importable).
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from fasttin.fileio import alive, tmp_name


def split_tag(ds) -> str:
    """Names the cache entries of one split: data set folder, split, count, manifest digest."""
    manifest = (ds.data_dir / "manifest.json").read_bytes()
    return f"{ds.data_dir.resolve().name}-{ds.split}-{len(ds)}-{hashlib.sha1(manifest).hexdigest()[:10]}"


def relative_paths(ds) -> list[str]:
    """`class/file` of every sample in pack order (the ImageFolder layout both folders share)."""
    out = []
    for key, label in zip(ds.keys, ds.labels.tolist()):
        name = key if ds.payload == "jpeg" else Path(key).stem + ".png"
        out.append(f"{ds.classes[label] if label >= 0 else 'unlabeled'}/{name}")
    return out


def _build(root: Path, write) -> Path:
    """`root`, made by write(tmp_folder) under a temporary name unless it exists already."""
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    for stale in root.parent.glob(root.name + ".tmp*"):
        pid = stale.name.rsplit(".tmp", 1)[1]
        if pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = tmp_name(root)
    try:
        write(tmp)
        os.rename(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def image_folder(ds, cache: Path) -> Path:
    """The split as an ImageFolder of 64 px files."""
    import cv2

    def write(tmp: Path):
        for i, rel in enumerate(relative_paths(ds)):
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if ds.payload == "jpeg":
                path.write_bytes(ds.encoded(i).tobytes())
            else:
                cv2.imwrite(str(path), cv2.cvtColor(ds.image(i), cv2.COLOR_RGB2BGR))
    return _build(Path(cache) / f"folder-{split_tag(ds)}", write)


def upscaled_folder(ds, cache: Path, res: int) -> Path:
    """The split as an ImageFolder of files upscaled to res x res with OpenCV INTER_CUBIC (the
    classic pipeline's input; written as the file names say: JPEG at OpenCV's quality 95, or PNG)."""
    import cv2

    def write(tmp: Path):
        for i, rel in enumerate(relative_paths(ds)):
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            im = cv2.cvtColor(ds.image(i), cv2.COLOR_RGB2BGR)
            if not cv2.imwrite(str(path), cv2.resize(im, (res, res), interpolation=cv2.INTER_CUBIC)):
                raise OSError(f"OpenCV could not write {path}")
    return _build(Path(cache) / f"upscaled{res}-{split_tag(ds)}", write)

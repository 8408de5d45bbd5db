"""What the loaders report as one line (UserError): a bad argument to make_loader, a sample that
does not decode. Both name the culprit; neither ends in a traceback in a command's main."""
from __future__ import annotations

import io

import numpy as np

from fasttin.errors import UserError
from fasttin.shards import IMAGE_SHAPE


class LoaderArgumentError(UserError, ValueError):
    """A bad make_loader argument (still a ValueError, as it was before UserError existed)."""


class DataError(UserError):
    """A packed sample that cannot be decoded into a 64x64 RGB image; names its shard and sample."""


def describe(ds, i: int) -> str:
    """Shard and sample of split position `i` (SplitDataset.describe, or the split and key)."""
    named = getattr(ds, "describe", None)
    if named is not None:
        return named(i)
    return f"{ds.split} sample {i} ({ds.keys[i]})"


def decode(ds, i: int) -> np.ndarray:
    """Sample `i` as RGB uint8 [64, 64, 3], or DataError naming it (never a decoder's traceback)."""
    from PIL import Image
    data = ds.encoded(i)
    if ds.payload == "raw":
        if data.size != np.prod(IMAGE_SHAPE):
            raise DataError(f"{describe(ds, i)}: {data.size} bytes, a raw sample has {np.prod(IMAGE_SHAPE)}; "
                            "repack with python -m fasttin.pack --force")
        return data.reshape(IMAGE_SHAPE)
    try:
        with Image.open(io.BytesIO(data)) as im:
            x = np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # what PIL raises for bad data
        raise DataError(f"{describe(ds, i)} does not decode ({type(e).__name__}: {e}); "
                        "repack with python -m fasttin.pack --force") from None
    if x.shape != IMAGE_SHAPE:
        raise DataError(f"{describe(ds, i)} decodes to {x.shape}, not {IMAGE_SHAPE}; "
                        "repack with python -m fasttin.pack --force")
    return x


def decode_many(ds, idx) -> np.ndarray:
    """Samples `idx` as uint8 [n, 64, 64, 3], each through `decode`."""
    idx = np.asarray(idx)
    out = np.empty((len(idx), *IMAGE_SHAPE), np.uint8)
    for j, i in enumerate(idx.tolist()):
        out[j] = decode(ds, i)
    return out

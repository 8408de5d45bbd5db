"""The fasttin shard format, in three parts as FFCV keeps its own: `layout` (constants, errors, the
manifest's and a shard's checks, the decoder), `writer` (ShardWriter) and `reader` (open_split).
Byte layout: docs/FORMAT.md."""
from fasttin.shards.layout import (
    FORMAT_NAME,
    FORMAT_VERSION,
    HEADER,
    IMAGE_SHAPE,
    MAGIC,
    MANIFEST,
    PAYLOAD_KINDS,
    DataError,
    FormatError,
    NotPackedError,
    check_split,
    decode,
    name_problem,
    read_manifest,
    repack_hint,
)
from fasttin.shards.reader import SplitDataset, open_split
from fasttin.shards.writer import ShardWriter

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "HEADER", "IMAGE_SHAPE", "MAGIC", "MANIFEST", "PAYLOAD_KINDS", "DataError",
           "FormatError", "NotPackedError", "check_split", "decode", "name_problem", "read_manifest", "repack_hint",
           "SplitDataset", "open_split", "ShardWriter"]

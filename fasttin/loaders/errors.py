"""What the loaders report as one line (UserError): a bad argument to make_loader, a sample that
does not decode (the format's DataError, naming its shard and sample), a split that does not fit.
None ends in a traceback in a command's main."""
from __future__ import annotations

from fasttin.errors import UserError
from fasttin.shards import DataError

__all__ = ["LoaderArgumentError", "DataError", "DoesNotFit"]


class LoaderArgumentError(UserError, ValueError):
    """A bad make_loader argument (still a ValueError, as it was before UserError existed)."""


class DoesNotFit(UserError):
    """The resident store would not fit in the device's free memory (checked before allocating:
    a real out-of-memory later is a MemoryError and keeps its traceback)."""

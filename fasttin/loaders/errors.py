"""What the loaders report as one line (UserError): a bad argument to make_loader, a sample that
does not decode (the format's DataError, naming its shard and sample), a split that does not fit,
a backend that cannot run here, workers that stopped handing out batches.
None ends in a traceback in a command's main."""
from __future__ import annotations

from fasttin.errors import UserError
from fasttin.shards import DataError

__all__ = ["LoaderArgumentError", "DataError", "DoesNotFit", "Unavailable", "WorkersStalled"]


class LoaderArgumentError(UserError, ValueError):
    """A bad make_loader argument (still a ValueError, as it was before UserError existed)."""


class WorkersStalled(UserError):
    """The pil workers handed out no batch for WORKER_TIMEOUT_S: one failed to pass a batch on
    (torch prints its error and drops the batch, and the loader would wait forever)."""


class DoesNotFit(UserError):
    """The resident store would not fit in the device's free memory (checked before allocating:
    a real out-of-memory later is a MemoryError and keeps its traceback)."""


class Unavailable(UserError):
    """A backend that cannot run here (DALI not importable, say): its reason and the alternatives."""

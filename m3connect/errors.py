"""One exception root for everything m3connect raises on purpose.

Catch :class:`M3Error` to handle any of them. Each subclass also derives from the
built-in exception a caller would expect (``ValueError``, ``TypeError``,
``ImportError``, ``ConnectionError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "M3Error",
    "ModelLoadError",
    "InvalidInputError",
    "InvalidTypeError",
    "FilterError",
    "SchemaMismatchError",
    "BackendUnavailableError",
    "EncoderUnavailableError",
    "BackendError",
    "IngestError",
    "MissingDependencyError",
]


class M3Error(Exception):
    """Root of every error m3connect raises on purpose."""


class ModelLoadError(M3Error, OSError):
    """A checkpoint could not be loaded (missing file, wrong shape, hub unreachable)."""


class InvalidInputError(M3Error, ValueError):
    """An argument has the right type but an unusable value."""


class InvalidTypeError(M3Error, TypeError):
    """An argument has the wrong type."""


class FilterError(InvalidInputError):
    """A metadata filter does not follow the filter language."""


class SchemaMismatchError(M3Error, ValueError):
    """An existing collection was written for another model, dimension or layout."""


class BackendUnavailableError(M3Error, ConnectionError):
    """The database server cannot be reached."""


class EncoderUnavailableError(BackendUnavailableError):
    """An encoder service (``m3connect serve``) cannot be reached, stays busy or fails a request."""


class BackendError(M3Error, RuntimeError):
    """The database rejected an operation."""


class IngestError(M3Error, RuntimeError):
    """A database write failed part-way through an ingestion.

    Everything written before ``batch_index`` is kept; re-running the same
    ingestion (same ids) resumes without duplicates.
    """

    def __init__(self, message: str, *, batch_index: int, ids: Sequence[str]) -> None:
        super().__init__(message)
        self.batch_index = batch_index
        self.ids = list(ids)


class MissingDependencyError(M3Error, ImportError):
    """An optional extra is not installed; the message names the pip command."""

    @classmethod
    def for_extra(cls, package: str, extra: str) -> MissingDependencyError:
        return cls(
            f"{package} is not installed; install it with: pip install 'm3connect[{extra}]'"
        )

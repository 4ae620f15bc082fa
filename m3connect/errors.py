"""One exception root for everything m3connect raises on purpose.

Catch :class:`M3Error` to handle any of them. Each subclass also derives from the
built-in exception a caller would expect (``ValueError``, ``TypeError``,
``ImportError``, ``ConnectionError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = [
    "M3Error",
    "ModelLoadError",
    "InvalidInputError",
    "InvalidTypeError",
    "FilterError",
    "SchemaMismatchError",
    "CollectionNotFoundError",
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


class CollectionNotFoundError(M3Error, LookupError):
    """The collection does not exist (never created, or dropped). Only writes create one."""


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


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret (password, API key, token) replaced by ``***``.

    >>> redact("auth failed for admin:hunter22", ["hunter22"])
    'auth failed for admin:***'
    """
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def redact_error(exc: BaseException, secrets: Iterable[str]) -> BaseException:
    """Redact ``secrets`` from ``exc``'s message in place (and from the errors it chains); returns ``exc``."""
    secrets = [s for s in secrets if s]
    seen: set[int] = set()
    current: BaseException | None = exc
    while secrets and current is not None and id(current) not in seen:
        seen.add(id(current))
        try:
            current.args = tuple(redact(a, secrets) if isinstance(a, str) else a for a in current.args)
        except Exception:  # pragma: no cover - exotic exception types with read-only args
            pass
        current = current.__cause__ or current.__context__
    return exc

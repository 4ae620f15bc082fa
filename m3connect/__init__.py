"""m3connect: BGE-M3 dense + sparse + ColBERT behind Milvus, Qdrant and OpenSearch.

>>> import m3connect
>>> enc = m3connect.M3Encoder("BAAI/bge-m3")                                  # doctest: +SKIP
>>> store = m3connect.connect("milvus:///tmp/m3.db", collection="docs", encoder=enc)  # doctest: +SKIP
>>> store.add(["BGE-M3 is multilingual."]); store.search("multilingual model", k=3)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import fusion, scoring
from .adapters.base import CollectionSpec
from .errors import (
    BackendError,
    BackendUnavailableError,
    FilterError,
    IngestError,
    InvalidInputError,
    InvalidTypeError,
    M3Error,
    MissingDependencyError,
    ModelLoadError,
    SchemaMismatchError,
)
from .protocols import Encoder
from .scoring import Weights
from .store import M3Store, connect
from .types import Document, EncodeOutput, Hit, Vectors

if TYPE_CHECKING:
    from .encoder import DEFAULT_MODEL, M3Encoder

_LAZY = {"M3Encoder", "DEFAULT_MODEL"}  # torch loads only when a local model is asked for


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import encoder

        return getattr(encoder, name)
    raise AttributeError(f"module 'm3connect' has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "DEFAULT_MODEL",
    "M3Encoder",
    "Encoder",
    "EncodeOutput",
    "Vectors",
    "CollectionSpec",
    "Hit",
    "Document",
    "Weights",
    "scoring",
    "fusion",
    "connect",
    "M3Store",
    "M3Error",
    "ModelLoadError",
    "InvalidInputError",
    "InvalidTypeError",
    "FilterError",
    "SchemaMismatchError",
    "BackendUnavailableError",
    "BackendError",
    "IngestError",
    "MissingDependencyError",
]

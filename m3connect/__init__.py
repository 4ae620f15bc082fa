"""m3connect: BGE-M3 dense + sparse + ColBERT behind Milvus, Qdrant and OpenSearch.

>>> import m3connect
>>> enc = m3connect.M3Encoder("BAAI/bge-m3")                                  # doctest: +SKIP
>>> store = m3connect.connect("milvus:///tmp/m3.db", collection="docs", encoder=enc)  # doctest: +SKIP
>>> store.add(["BGE-M3 is multilingual."]); store.search("multilingual model", k=3)  # doctest: +SKIP
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _distribution_version
from typing import TYPE_CHECKING, Any

from . import fusion, scoring
from .adapters.base import CollectionSpec
from .defaults import DEFAULT_MODEL
from .errors import (
    BackendError,
    BackendUnavailableError,
    CollectionNotFoundError,
    EncoderUnavailableError,
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
    from .encoder import M3Encoder
    from .remote import RemoteEncoder

_LAZY = {"M3Encoder"}  # torch loads only when a local model is asked for


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        try:
            from . import encoder
        except ImportError as exc:
            if exc.name not in ("torch", "transformers", "tokenizers", "huggingface_hub"):
                raise
            raise MissingDependencyError(
                f"{exc.name} is not installed; the local encoder (M3Encoder) needs it: "
                "pip install 'm3connect[encoder]'. A client of 'm3connect serve' needs no torch: "
                "use m3connect.RemoteEncoder('http://host:8080')"
            ) from exc
        return getattr(encoder, name)
    if name == "RemoteEncoder":  # httpx and msgpack load only when a server is used
        from .remote import RemoteEncoder

        return RemoteEncoder
    raise AttributeError(f"module 'm3connect' has no attribute {name!r}")

try:  # the version lives in pyproject.toml only
    __version__: str = _distribution_version("m3connect")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "__version__",
    "DEFAULT_MODEL",
    "M3Encoder",
    "RemoteEncoder",
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
    "CollectionNotFoundError",
    "BackendUnavailableError",
    "EncoderUnavailableError",
    "BackendError",
    "IngestError",
    "MissingDependencyError",
]

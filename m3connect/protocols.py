"""The encoder protocol: what the store, the CLI and the integrations need of an encoder.

:class:`~m3connect.M3Encoder` implements it; so can a remote client or a test fake.
The store never imports a concrete encoder class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from .types import EncodeOutput, Vectors

__all__ = ["Encoder"]


@runtime_checkable
class Encoder(Protocol):
    """Produces BGE-M3 representations; identifies its model for the collection spec."""

    @property
    def model_name(self) -> str: ...

    @property
    def fingerprint(self) -> str: ...

    @property
    def dense_dim(self) -> int: ...

    @property
    def colbert_dim(self) -> int: ...

    def encode(
        self,
        texts: Sequence[str],
        *,
        max_length: int | None = None,
        return_dense: bool = True,
        return_sparse: bool = True,
        return_colbert: bool = True,
        show_progress: bool | None = None,
    ) -> EncodeOutput: ...

    def encode_one(self, text: str, *, max_length: int | None = None) -> Vectors: ...

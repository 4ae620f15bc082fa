"""Plain data types shared by the encoder, the scoring module and the stores."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

__all__ = ["Route", "ROUTES", "Vectors", "EncodeOutput", "Hit", "Document"]

Route = Literal["dense", "sparse", "colbert"]
ROUTES: tuple[Route, Route, Route] = ("dense", "sparse", "colbert")


@dataclass
class Vectors(Mapping[str, Any]):
    """The three BGE-M3 representations of one text; any of them may be ``None``.

    The one type for an encoder row, a stored record's vectors and a query. It is
    also a read-only mapping, so ``v["dense"]`` works where a dict did.

    >>> v = Vectors(dense=np.ones(2, np.float32) / np.sqrt(2), sparse={7: 0.5})
    >>> sorted(k for k in v if v[k] is not None)
    ['dense', 'sparse']
    """

    dense: np.ndarray | None = None  #: ``float32 [d]``, L2-normalised
    sparse: dict[int, float] | None = None  #: ``{token_id: weight}``
    colbert: np.ndarray | None = None  #: ``float32 [t, d]``, one row per token

    @classmethod
    def of(cls, value: Vectors | Mapping[str, Any]) -> Vectors:
        """``value`` itself, or a ``Vectors`` built from a mapping with route keys."""
        if isinstance(value, Vectors):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"expected Vectors or a mapping of routes, got {type(value).__name__}")
        return cls(dense=value.get("dense"), sparse=value.get("sparse"), colbert=value.get("colbert"))

    def __getitem__(self, route: str) -> Any:
        if route not in ROUTES:
            raise KeyError(route)
        return getattr(self, route)

    def __iter__(self) -> Iterator[str]:
        return iter(ROUTES)

    def __len__(self) -> int:
        return len(ROUTES)

    def nbytes(self) -> int:
        """Bytes of the vectors as held in memory (sparse: 4-byte id + 4-byte weight)."""
        size = 0 if self.dense is None else int(self.dense.nbytes)
        size += 0 if self.sparse is None else 8 * len(self.sparse)
        return size + (0 if self.colbert is None else int(self.colbert.nbytes))


@dataclass
class EncodeOutput:
    """The three BGE-M3 representations of a list of texts, in input order.

    A representation that was not asked for is ``None``.

    Attributes:
        dense: ``float32 [n, d]``, L2-normalised CLS vectors.
        sparse: one ``{token_id: weight}`` dict per text.
        colbert: one ``float32 [t_i, d]`` array per text (CLS dropped, EOS kept).
        num_tokens: tokens per text after truncation, CLS and EOS included.
        truncated: indices of the texts that were cut at ``max_length``.
    """

    dense: np.ndarray | None
    sparse: list[dict[int, float]] | None
    colbert: list[np.ndarray] | None
    num_tokens: list[int] = field(default_factory=list)
    truncated: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.num_tokens)

    @property
    def num_truncated(self) -> int:
        """How many texts were cut at ``max_length``."""
        return len(self.truncated)

    def item(self, i: int) -> Vectors:
        """Representations of text ``i``."""
        return Vectors(
            dense=None if self.dense is None else self.dense[i],
            sparse=None if self.sparse is None else self.sparse[i],
            colbert=None if self.colbert is None else self.colbert[i],
        )


@dataclass
class Document:
    """A stored text with its id and metadata, and (from ``M3Store.get(ids, vectors=...)``) the
    stored vectors of the routes asked for; ``vectors`` is ``None`` when none were asked."""

    id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)
    vectors: Vectors | None = None


@dataclass
class Hit:
    """One search result.

    ``score`` is the exact weighted M3 score ``sum(w*s)/sum(w)`` unless the store
    was queried with ``fusion="engine"`` or ``"rrf"``; ``scores`` holds the
    per-route scores that went into it.
    """

    id: str
    score: float
    text: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)

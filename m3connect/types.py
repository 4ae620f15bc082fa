"""Plain data types shared by the encoder, the scoring module and the stores."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["EncodeOutput", "Hit", "Document"]


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

    def item(self, i: int) -> dict[str, Any]:
        """Representations of text ``i`` as ``{"dense": ..., "sparse": ..., "colbert": ...}``."""
        return {
            "dense": None if self.dense is None else self.dense[i],
            "sparse": None if self.sparse is None else self.sparse[i],
            "colbert": None if self.colbert is None else self.colbert[i],
        }


@dataclass
class Document:
    """A stored text with its id and metadata."""

    id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


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

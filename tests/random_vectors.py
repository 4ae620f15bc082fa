"""Random precomputed vectors of a given shape, for tests where the model is beside the point."""

from __future__ import annotations

import numpy as np

from m3connect import Vectors


def unit(x: np.ndarray) -> np.ndarray:
    """``x`` scaled to unit length along its last axis, float32."""
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def random_corpus(
    n: int, *, dense_dim: int, colbert_dim: int, vocab: int, max_terms: int, max_rows: int, seed: int = 0
) -> list[Vectors]:
    """``n`` documents: a unit dense vector, 1 to ``max_terms - 1`` sparse terms below ``vocab``
    (weights 0.01-0.4), 1 to ``max_rows - 1`` unit ColBERT rows; reproducible by ``seed``."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        terms = rng.choice(vocab, size=int(rng.integers(1, max_terms)), replace=False)
        out.append(Vectors(
            dense=unit(rng.normal(size=dense_dim)),
            sparse={int(t): float(rng.uniform(0.01, 0.4)) for t in terms},
            colbert=unit(rng.normal(size=(int(rng.integers(1, max_rows)), colbert_dim))),
        ))
    return out

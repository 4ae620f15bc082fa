"""BGE-M3's lexical-weight post-processing, shared by every encoder backend (numpy only)."""

from __future__ import annotations

import numpy as np

__all__ = ["lexical_weights"]


def lexical_weights(
    ids: np.ndarray, mask: np.ndarray, weights: np.ndarray, special_ids: np.ndarray
) -> list[dict[int, float]]:
    """``{token_id: max weight}`` per row, special tokens and non-positive weights dropped.

    ``ids``, ``mask`` and ``weights`` are ``[rows, width]``; a token id repeated in a row
    keeps its largest weight, as the reference does.
    """
    keep = mask & (weights > 0) & ~np.isin(ids, special_ids)
    rows, cols = np.nonzero(keep)
    tok, w = ids[rows, cols], weights[rows, cols]
    order = np.lexsort((-w, tok, rows))  # the first of each (row, token) run is its max
    rows, tok, w = rows[order], tok[order], w[order]
    first = np.ones(len(rows), dtype=bool)
    first[1:] = (rows[1:] != rows[:-1]) | (tok[1:] != tok[:-1])
    rows, tok, w = rows[first], tok[first], w[first]
    bounds = np.searchsorted(rows, np.arange(ids.shape[0] + 1))
    tok_list, w_list = tok.tolist(), w.tolist()
    return [
        dict(zip(tok_list[bounds[i] : bounds[i + 1]], w_list[bounds[i] : bounds[i + 1]]))
        for i in range(ids.shape[0])
    ]

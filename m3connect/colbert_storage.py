"""ColBERT storage forms: what a collection keeps of each document's token vectors.

Two collection-level options, fixed when the collection is created (recorded in its
:class:`~m3connect.CollectionSpec`; a reopen that asks for others is refused):

``colbert_dtype``
    How each stored token row is encoded:

    - ``"float32"``: 4 bytes per value, the encoder's vectors as they are.
    - ``"float16"``: 2 bytes per value (IEEE half, round to nearest even).
    - ``"int8"``: per-row scaled integers. ``codes = rint(x * 127 / max|x|)`` in
      ``[-127, 127]`` and one float32 ``scale = |x| / |codes|`` per row (so the stored
      row keeps the norm of ``x``); the stored row is ``float32(codes) * scale`` in
      float32 arithmetic. ``dim + 4`` bytes per row.
    - ``"binary"``: 1 bit per value, documents only (queries stay float: asymmetric
      MaxSim, as Vespa's binarised ColBERT). Bit ``t`` is ``x[t] > 0``; the stored row is
      ``+c`` where the bit is set and ``-c`` elsewhere, with
      ``c = float32(1 / sqrt(dim))``, so every stored row has unit norm.
      ``ceil(dim / 8)`` bytes per row.

``colbert_pool_factor`` (int, default 1)
    Token pooling at ingestion (Answer.AI's hierarchical "token pooling" for ColBERT):
    a document's ``n`` token rows are clustered by Ward linkage
    (:func:`scipy.cluster.hierarchy.linkage`, Euclidean) into exactly
    ``max(1, ceil(n / factor))`` clusters (the first ``n - clusters`` merges of the
    tree); each cluster is replaced by the mean of its rows, renormalised to unit length
    (so :func:`m3connect.fusion.colbert_upper_bound` stays a bound), in the order of
    each cluster's first token. Queries are never pooled. Factor 1 stores every row.
    Ward linkage is quadratic in the rows (8,192 rows x 1024: ~15 s and ~700 MB in one piece,
    0.9 s windowed, on a 2-core EPYC), so a document
    of more than :data:`POOL_WINDOW` rows is pooled window by window (consecutive, balanced
    windows of at most that many rows, ``ceil(rows / factor)`` clusters each): clusters
    never span windows, and such a document keeps up to one row more per extra window.

The stored form of a document is ``decode(encode(pool(matrix)))``
(:func:`stored_form`): the float32 matrix that the engine scores. Every engine's
ColBERT score equals :func:`m3connect.scoring.colbert_score` of the query against
this matrix, and ``fetch`` returns it.

Byte layout (:func:`to_bytes` / :func:`from_bytes`, used by the Milvus and OpenSearch
adapters; rows one after another, little-endian):

- float32 / float16: ``dim`` values per row.
- int8: per row, the float32 scale (4 bytes) then ``dim`` int8 codes.
- binary: per row, ``ceil(dim / 8)`` bytes; bit ``t`` of the row is bit ``t % 8``
  (least significant first) of byte ``t // 8``; padding bits are 0.

>>> import numpy as np
>>> row_bytes(1024, "int8"), row_bytes(1024, "binary")
(1028, 128)
>>> m = np.array([[0.6, -0.8]], np.float32)
>>> decode_binary(encode_binary(m), 2)
array([[ 0.70710677, -0.70710677]], dtype=float32)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .errors import BackendError, InvalidInputError, MissingDependencyError

__all__ = [
    "POOL_WINDOW",
    "COLBERT_DTYPES",
    "check_pool_factor",
    "row_bytes",
    "pool_tokens",
    "encode_int8",
    "decode_int8",
    "binary_value",
    "encode_binary",
    "decode_binary",
    "to_bytes",
    "from_bytes",
    "stored_form",
    "require_dtype",
]

#: the ``colbert_dtype`` values a :class:`~m3connect.CollectionSpec` accepts
COLBERT_DTYPES = ("float32", "float16", "int8", "binary")


def _check_dtype(dtype: str) -> str:
    if dtype not in COLBERT_DTYPES:
        raise InvalidInputError(f"colbert_dtype must be one of {COLBERT_DTYPES}, got {dtype!r}")
    return dtype


def check_pool_factor(factor: Any) -> int:
    """``factor`` if it is an int >= 1, else :class:`~m3connect.InvalidInputError`."""
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1:
        raise InvalidInputError(f"colbert_pool_factor must be an int >= 1, got {factor!r}")
    return int(factor)


def row_bytes(dim: int, dtype: str) -> int:
    """Bytes of one stored token row of ``dim`` values."""
    _check_dtype(dtype)
    if dtype == "float32":
        return 4 * dim
    if dtype == "float16":
        return 2 * dim
    if dtype == "int8":
        return dim + 4
    return (dim + 7) // 8


def _matrix(matrix: Any) -> np.ndarray:
    m = np.asarray(matrix, np.float32)
    if m.ndim != 2:
        raise InvalidInputError(f"a ColBERT matrix must be 2-d [tokens, dim], got shape {m.shape}")
    return m


# -- pooling ------------------------------------------------------------------------------------


#: most token rows Ward-clustered in one piece; longer documents are pooled window by window
POOL_WINDOW = 1024


def pool_tokens(matrix: Any, factor: int) -> np.ndarray:
    """Hierarchical token pooling (see the module docstring): float32 ``[clusters, dim]``.

    >>> pool_tokens(np.eye(4, dtype=np.float32), 1).shape, pool_tokens(np.eye(4, dtype=np.float32), 3).shape
    ((4, 4), (2, 4))
    """
    factor = check_pool_factor(factor)
    m = _matrix(matrix)
    n = m.shape[0]
    if factor == 1 or n == 0:
        return m
    if n > POOL_WINDOW:
        pieces = math.ceil(n / POOL_WINDOW)
        return np.concatenate([_pool_window(w, factor) for w in np.array_split(m, pieces)])
    return _pool_window(m, factor)


def _pool_window(m: np.ndarray, factor: int) -> np.ndarray:
    n = m.shape[0]
    clusters = max(1, math.ceil(n / factor))
    x = m.astype(np.float64)
    if clusters >= n:  # one token: nothing to merge
        groups = [[i] for i in range(n)]
    else:
        try:
            from scipy.cluster.hierarchy import linkage
        except ImportError as exc:  # pragma: no cover - scipy ships with the test environment
            raise MissingDependencyError(
                "colbert_pool_factor > 1 needs scipy (Ward linkage): pip install 'm3connect[pooling]'"
            ) from exc
        merges = linkage(x, method="ward", metric="euclidean")
        # Replay the first n - clusters merges: exactly `clusters` groups remain.
        members: dict[int, list[int]] = {i: [i] for i in range(n)}
        for step in range(n - clusters):
            a, b = int(merges[step, 0]), int(merges[step, 1])
            members[n + step] = members.pop(a) + members.pop(b)
        groups = sorted((sorted(g) for g in members.values()), key=lambda g: g[0])
    out = np.empty((len(groups), m.shape[1]), np.float64)
    for i, g in enumerate(groups):
        out[i] = x[g].mean(axis=0)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out.astype(np.float32)


# -- int8 ---------------------------------------------------------------------------------------


def encode_int8(matrix: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per-row scaled int8: ``(codes int8 [n, dim], scales float32 [n])``.

    ``codes = rint(x * 127 / max|x|)``; ``scale = |x| / |codes|`` (0 for a zero row), so
    :func:`decode_int8` keeps each row's norm (up to float32 rounding).
    """
    x = _matrix(matrix).astype(np.float64)
    amax = np.abs(x).max(axis=1) if x.shape[1] else np.zeros(x.shape[0])
    step = np.where(amax > 0, 127.0 / np.where(amax > 0, amax, 1.0), 0.0)
    codes = np.clip(np.rint(x * step[:, None]), -127, 127).astype(np.int8)
    code_norm = np.linalg.norm(codes.astype(np.float64), axis=1)
    x_norm = np.linalg.norm(x, axis=1)
    scales = np.where(code_norm > 0, x_norm / np.where(code_norm > 0, code_norm, 1.0), 0.0)
    return codes, scales.astype(np.float32)


def decode_int8(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The stored rows ``float32(codes) * scale`` (float32 arithmetic), ``[n, dim]``."""
    c = np.asarray(codes, np.int8)
    s = np.asarray(scales, np.float32).reshape(-1, 1)
    return c.astype(np.float32) * s


# -- binary -------------------------------------------------------------------------------------


def binary_value(dim: int) -> np.float32:
    """``c = float32(1 / sqrt(dim))``, the magnitude of every stored binary value."""
    c: np.float32 = np.float32(1.0 / math.sqrt(dim))
    return c


def encode_binary(matrix: Any) -> np.ndarray:
    """Sign bits (``x > 0``), packed least significant bit first: uint8 ``[n, ceil(dim / 8)]``."""
    return np.packbits(_matrix(matrix) > 0, axis=1, bitorder="little")


def decode_binary(packed: np.ndarray, dim: int) -> np.ndarray:
    """The stored rows: ``+c`` where a bit is set, ``-c`` elsewhere (float32 ``[n, dim]``)."""
    p = np.asarray(packed, np.uint8).reshape(-1, (dim + 7) // 8)
    bits = np.unpackbits(p, axis=1, count=dim, bitorder="little").astype(bool)
    c = binary_value(dim)
    out: np.ndarray = np.where(bits, c, -c).astype(np.float32)
    return out


# -- bytes --------------------------------------------------------------------------------------


def to_bytes(matrix: Any, dtype: str) -> bytes:
    """The stored bytes of a ColBERT matrix (layout in the module docstring)."""
    _check_dtype(dtype)
    m = _matrix(matrix)
    if dtype in ("float32", "float16"):
        return np.ascontiguousarray(m, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
    if dtype == "int8":
        codes, scales = encode_int8(m)
        out = np.empty((m.shape[0], m.shape[1] + 4), np.uint8)
        out[:, :4] = scales.astype("<f4").view(np.uint8).reshape(-1, 4)
        out[:, 4:] = codes.view(np.uint8)
        return out.tobytes()
    return encode_binary(m).tobytes()


def from_bytes(raw: bytes | bytearray | memoryview, dim: int, dtype: str, n_tokens: int | None = None) -> np.ndarray:
    """The stored form (float32 ``[n, dim]``) of bytes written by :func:`to_bytes`.

    Raises :class:`~m3connect.BackendError` if the length does not fit ``dim`` (or
    ``n_tokens`` rows, when given).
    """
    size = row_bytes(dim, dtype)
    buf = np.frombuffer(raw, np.uint8)
    n, rest = divmod(buf.size, size)
    if rest or (n_tokens is not None and n != n_tokens):
        expected = f"{n_tokens} rows of" if n_tokens is not None else "whole rows of"
        raise BackendError(
            f"stored ColBERT data has {buf.size} bytes, expected {expected} {size} bytes "
            f"({dtype}, dim {dim}); re-ingest the document"
        )
    if dtype in ("float32", "float16"):
        floats: np.ndarray = buf.view(np.dtype(dtype).newbyteorder("<")).astype(np.float32)
        return floats.reshape(n, dim)
    rows = buf.reshape(n, size)
    if dtype == "int8":
        scales = np.ascontiguousarray(rows[:, :4]).view("<f4").reshape(n)
        return decode_int8(rows[:, 4:].view(np.int8), scales)
    return decode_binary(rows, dim)


def stored_form(
    matrix: Any, spec: Any = None, *, colbert_dtype: str = "float32", colbert_pool_factor: int = 1
) -> np.ndarray:
    """What a collection stores, and its engine scores, for a document's ColBERT ``matrix``.

    ``spec`` (a :class:`~m3connect.CollectionSpec`) gives both options; without it they
    come from the keywords. ``colbert_score(q, stored_form(m, spec))`` is the ColBERT
    score that a search of that collection reports.
    """
    if spec is not None:
        colbert_dtype = spec.colbert_dtype
        colbert_pool_factor = getattr(spec, "colbert_pool_factor", 1)
    pooled = pool_tokens(matrix, colbert_pool_factor)
    if colbert_dtype == "float32":
        return pooled
    return from_bytes(to_bytes(pooled, colbert_dtype), pooled.shape[1], colbert_dtype)


#: why an engine keeps only some dtypes (shown in the refusal)
_WHY_NOT_QDRANT = (
    "Qdrant scores multivectors itself and has no exact equivalent of these stored forms "
    "(its uint8 datatype takes integers in [0, 255] with no per-row scale; its binary, scalar "
    "and turbo quantizations approximate the vectors and rescore with the originals)"
)
_WHY_NOT = {"Qdrant": _WHY_NOT_QDRANT, "Qdrant Edge": _WHY_NOT_QDRANT}


def require_dtype(engine: str, spec: Any, supported: tuple[str, ...]) -> None:
    """Refuse, with :class:`~m3connect.InvalidInputError`, a ``colbert_dtype`` that ``engine`` cannot
    score exactly. Called before a collection is created."""
    dtype = spec.colbert_dtype
    if dtype in supported:
        return
    why = _WHY_NOT.get(engine)
    raise InvalidInputError(
        f"{engine} cannot store ColBERT as colbert_dtype={dtype!r}" + (f": {why}" if why else "") + ". "
        f"{engine} supports colbert_dtype {' or '.join(supported)}, with any colbert_pool_factor; "
        "Milvus and OpenSearch store int8 and binary natively."
    )

"""Input checks the store runs before anything reaches an engine: texts, ids, metadata (JSON
values a filter can name), batch sizes, route names and precomputed vectors. Each failure is an
``InvalidInputError`` or ``InvalidTypeError`` whose message names the bad item."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from . import fusion as _fusion
from .errors import InvalidInputError, InvalidTypeError
from .types import ROUTES, Vectors

if TYPE_CHECKING:
    from .adapters.base import CollectionSpec

_MAX_K = 10_000  # OpenSearch's result window and Milvus' topk limit; Qdrant takes more, no user needs it


_BAD_KEY_CHARS = frozenset('."\'\\`$')


def _check_text(text: Any, where: str, need_text: bool) -> None:
    if not isinstance(text, str):
        raise InvalidTypeError(f"{where} is {type(text).__name__}, not str")
    if need_text and not text.strip():
        raise InvalidInputError(f"{where} is empty or only whitespace")
    if "\x00" in text:
        raise InvalidInputError(f"{where} holds a NUL character at {text.index(chr(0))}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(f"{where} is not valid Unicode (a lone surrogate at {exc.start})") from None


def _check_id(rid: str, where: str) -> None:
    if not rid.strip():
        raise InvalidInputError(f"{where} is empty")
    if "\x00" in rid:
        raise InvalidInputError(f"{where} {rid!r} holds a NUL character")
    try:
        rid.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInputError(f"{where} {rid!r} is not valid Unicode") from None


def _check_metadata(meta: Mapping[str, Any], where: str) -> None:
    """Metadata must survive every engine unchanged: string keys a filter can name, JSON values."""
    for key, value in meta.items():
        if not isinstance(key, str):
            raise InvalidTypeError(f"{where} has a non-string key {key!r}")
        if not key or key.startswith("$") or _BAD_KEY_CHARS & set(key) or not key.isprintable():
            raise InvalidInputError(
                f"{where} key {key!r} is not allowed: keys must be non-empty, not start with '$', "
                "and hold no dots, quotes, backslashes or control characters"
            )
        _check_json_value(value, f"{where}[{key!r}]")


def _check_json_value(value: Any, where: str) -> None:
    if value is None or isinstance(value, (str, bool, int)):
        if isinstance(value, str):
            _check_text(value, where, False)
        return
    if isinstance(value, float):
        if not np.isfinite(value):
            raise InvalidInputError(f"{where} is {value}: NaN and infinity are not JSON values")
        return
    if isinstance(value, (list, tuple)):
        for j, item in enumerate(value):
            _check_json_value(item, f"{where}[{j}]")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidTypeError(f"{where} has a non-string key {key!r}")
            _check_json_value(item, f"{where}[{key!r}]")
        return
    raise InvalidTypeError(
        f"{where} is {type(value).__name__}; metadata values must be str, int, float, bool, None, "
        "or lists/dicts of them"
    )


def _check_batch_size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_K:
        raise InvalidInputError(f"batch_size must be an int in 1..{_MAX_K}, got {value!r}")
    return value


def _check_routes(vectors: Any) -> tuple[str, ...]:
    """``get(vectors=...)``: a route name or names of routes, checked; ``()`` for none."""
    if vectors is None:
        return ()
    if isinstance(vectors, str):
        vectors = (vectors,)
    if not isinstance(vectors, Iterable):
        raise InvalidTypeError(f"vectors must name routes of {ROUTES}, got {type(vectors).__name__}")
    named = list(vectors)
    unknown = [r for r in named if not isinstance(r, str) or r not in ROUTES]
    if unknown:
        raise InvalidInputError(f"vectors must name routes of {ROUTES}, got {unknown[0]!r}")
    return tuple(dict.fromkeys(named))


def _check_ids(ids: Sequence[str]) -> list[str]:
    if isinstance(ids, str):
        raise InvalidTypeError("ids must be a list of strings, not a single string")
    if not isinstance(ids, Iterable):
        raise InvalidTypeError(f"ids must be a list of strings, got {type(ids).__name__}")
    out = []
    for i, value in enumerate(ids):
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise InvalidTypeError(f"ids[{i}] is {type(value).__name__}, not str")
        _check_id(str(value), f"ids[{i}]")
        out.append(str(value))
    return out


def _check_vectors(value: Any, i: int, spec: CollectionSpec) -> Vectors:
    """``vectors[i]`` of ``add_vectors`` as float32 Vectors, checked against the collection's ``spec``."""
    try:
        v = Vectors.of(value)
    except TypeError as exc:
        raise InvalidTypeError(f"vectors[{i}]: {exc}") from None
    dense = np.asarray(v.dense, np.float32) if v.dense is not None else None
    if dense is None or dense.shape != (spec.dense_dim,):
        raise InvalidInputError(
            f"vectors[{i}].dense must have shape ({spec.dense_dim},), got "
            f"{None if dense is None else dense.shape}"
        )
    colbert = np.asarray(v.colbert, np.float32) if v.colbert is not None else None
    if colbert is None or colbert.ndim != 2 or colbert.shape[1] != spec.colbert_dim:
        raise InvalidInputError(
            f"vectors[{i}].colbert must have shape (tokens, {spec.colbert_dim}), got "
            f"{None if colbert is None else colbert.shape}"
        )
    if not isinstance(v.sparse, Mapping):
        raise InvalidTypeError(f"vectors[{i}].sparse must be a dict {{token_id: weight}}")
    sparse: dict[int, float] = {}
    for key, weight in v.sparse.items():
        if isinstance(key, bool) or not isinstance(key, (int, np.integer)) or key < 0:
            raise InvalidTypeError(f"vectors[{i}].sparse key {key!r} is not a non-negative int token id")
        sparse[int(key)] = float(weight)
    if not (np.isfinite(dense).all() and np.isfinite(colbert).all() and np.isfinite(list(sparse.values())).all()):
        raise InvalidInputError(f"vectors[{i}] holds NaN or infinite values")
    norms = np.linalg.norm(colbert, axis=1)
    if len(norms) and norms.max() > _fusion.COLBERT_NORM_LIMIT:
        row = int(norms.argmax())
        raise InvalidInputError(
            f"vectors[{i}].colbert row {row} has norm {norms[row]:.4f}: ColBERT rows must be "
            "L2-normalised, as BGE-M3 makes them (exact fusion relies on it)"
        )
    return Vectors(dense=dense, sparse=sparse, colbert=colbert)

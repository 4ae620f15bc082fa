"""The encoder service's wire format, shared by :mod:`m3connect.server` and :mod:`m3connect.remote`.

Torch-free: numpy, plus msgpack for the binary form. A request is a map

``{"texts": [str, ...], "outputs": ["dense", "sparse", "colbert"], "max_length": int | null,
"dtype": "float32" | "float16", "truncate": bool}``

sent as JSON or msgpack. The binary (msgpack) response carries every array as raw little-endian
bytes, never as lists of floats::

    n, dtype, fingerprint, num_tokens [n], truncated [k]
    dense            bytes [n, dense_dim] in dtype          (+ dense_dim)
    sparse_offsets   bytes int32 [n + 1]: text i owns entries offsets[i]:offsets[i+1]
    sparse_ids       bytes int32 [nnz], sparse_weights bytes float32 [nnz]
    colbert_lengths  bytes int32 [n]; colbert bytes [sum(lengths), colbert_dim] in dtype

Sparse weights always travel as float32 (the encoder's own precision); ``dtype`` applies to
the dense and ColBERT vectors. The JSON response holds the same fields as lists, sparse as
``{"token_id": weight}`` objects, for curl users.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from typing import Any

import numpy as np

from .types import ROUTES, EncodeOutput

__all__ = [
    "WIRE_VERSION",
    "MSGPACK",
    "JSON",
    "WIRE_DTYPES",
    "packb",
    "unpackb",
    "slice_output",
    "output_to_binary",
    "output_from_binary",
    "output_to_json",
    "output_from_json",
    "check_outputs",
]

WIRE_VERSION = 1
MSGPACK = "application/msgpack"
JSON = "application/json"
WIRE_DTYPES = {"float32": "<f4", "float16": "<f2"}
_I4 = "<i4"
_F4 = "<f4"


def packb(obj: Any) -> bytes:
    import msgpack

    return bytes(msgpack.packb(obj, use_bin_type=True))


def unpackb(data: bytes, *, max_bytes: int | None = None) -> Any:
    import msgpack

    limit = max_bytes if max_bytes is not None else len(data)
    return msgpack.unpackb(
        data, raw=False, strict_map_key=False,
        max_str_len=limit, max_bin_len=limit, max_array_len=limit, max_map_len=limit,
    )


def slice_output(out: EncodeOutput, start: int, stop: int) -> EncodeOutput:
    """Rows ``start:stop`` of an encoder output (views, no copies)."""
    return EncodeOutput(
        dense=None if out.dense is None else out.dense[start:stop],
        sparse=None if out.sparse is None else out.sparse[start:stop],
        colbert=None if out.colbert is None else out.colbert[start:stop],
        num_tokens=list(out.num_tokens[start:stop]),
        truncated=[i - start for i in out.truncated if start <= i < stop],
    )


def _header(out: EncodeOutput, dtype: str, fingerprint: str) -> dict[str, Any]:
    return {
        "v": WIRE_VERSION,
        "n": len(out.num_tokens),
        "dtype": dtype,
        "fingerprint": fingerprint,
        "num_tokens": [int(t) for t in out.num_tokens],
        "truncated": [int(i) for i in out.truncated],
    }


def output_to_binary(out: EncodeOutput, *, dtype: str = "float32", fingerprint: str = "") -> dict[str, Any]:
    """The msgpack-ready map of an output: arrays as raw bytes (see the module doc)."""
    wire = WIRE_DTYPES[dtype]
    msg = _header(out, dtype, fingerprint)
    if out.dense is not None:
        dense = np.ascontiguousarray(out.dense, dtype=wire)
        msg["dense"] = dense.tobytes()
        msg["dense_dim"] = int(dense.shape[1]) if dense.ndim == 2 else 0
    if out.sparse is not None:
        sizes = np.fromiter((len(s) for s in out.sparse), dtype=np.int64, count=len(out.sparse))
        offsets = np.zeros(len(sizes) + 1, dtype=_I4)
        np.cumsum(sizes, out=offsets[1:])
        nnz = int(offsets[-1])
        ids = np.fromiter(chain.from_iterable(out.sparse), dtype=np.int64, count=nnz)
        weights = np.fromiter(chain.from_iterable(s.values() for s in out.sparse), dtype=np.float32, count=nnz)
        msg["sparse_offsets"] = offsets.tobytes()
        msg["sparse_ids"] = ids.astype(_I4).tobytes()
        msg["sparse_weights"] = weights.astype(_F4, copy=False).tobytes()
    if out.colbert is not None:
        lengths = np.fromiter((len(c) for c in out.colbert), dtype=_I4, count=len(out.colbert))
        dim = int(out.colbert[0].shape[1]) if out.colbert else 0
        if out.colbert:
            flat = np.concatenate(out.colbert, axis=0).astype(wire, copy=False)
        else:
            flat = np.zeros((0, dim), dtype=wire)
        msg["colbert_lengths"] = lengths.tobytes()
        msg["colbert_dim"] = dim
        msg["colbert"] = np.ascontiguousarray(flat).tobytes()
    return msg


def _array(buf: Any, dtype: str) -> np.ndarray:
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise ValueError(f"expected raw bytes, got {type(buf).__name__}")
    return np.frombuffer(buf, dtype=dtype)


def output_from_binary(msg: dict[str, Any]) -> EncodeOutput:
    """Rebuild an :class:`EncodeOutput` (float32 arrays) from :func:`output_to_binary`'s map."""
    n = int(msg["n"])
    wire = WIRE_DTYPES[msg.get("dtype", "float32")]
    dense = sparse = colbert = None
    if "dense" in msg:
        dim = int(msg["dense_dim"])
        dense = _array(msg["dense"], wire).astype(np.float32).reshape(n, dim)
    if "sparse_offsets" in msg:
        offsets = _array(msg["sparse_offsets"], _I4).tolist()
        ids = _array(msg["sparse_ids"], _I4).tolist()
        weights = _array(msg["sparse_weights"], _F4).tolist()
        if len(offsets) != n + 1 or len(ids) != len(weights) or (n and offsets[-1] != len(ids)):
            raise ValueError("inconsistent sparse arrays in the response")
        sparse = [dict(zip(ids[offsets[i] : offsets[i + 1]], weights[offsets[i] : offsets[i + 1]])) for i in range(n)]
    if "colbert" in msg:
        dim = int(msg["colbert_dim"])
        lengths = _array(msg["colbert_lengths"], _I4)
        flat = _array(msg["colbert"], wire).astype(np.float32)
        flat = flat.reshape(-1, dim) if dim else flat.reshape(0, 0)
        if len(lengths) != n or int(lengths.sum()) != flat.shape[0]:
            raise ValueError("inconsistent ColBERT arrays in the response")
        colbert = np.split(flat, np.cumsum(lengths)[:-1]) if n else []
    return EncodeOutput(
        dense=dense, sparse=sparse, colbert=colbert,
        num_tokens=[int(t) for t in msg.get("num_tokens", [])],
        truncated=[int(i) for i in msg.get("truncated", [])],
    )


def output_to_json(out: EncodeOutput, *, dtype: str = "float32", fingerprint: str = "") -> dict[str, Any]:
    """The JSON form: the same fields, vectors as nested lists, sparse as ``{"id": weight}``."""
    wire = WIRE_DTYPES[dtype]
    msg = _header(out, dtype, fingerprint)

    def floats(a: np.ndarray) -> Any:
        return np.asarray(a, dtype=wire).astype(np.float32).tolist() if dtype != "float32" else np.asarray(a).tolist()

    if out.dense is not None:
        msg["dense"] = floats(out.dense)
    if out.sparse is not None:
        msg["sparse"] = [{str(k): float(v) for k, v in s.items()} for s in out.sparse]
    if out.colbert is not None:
        msg["colbert"] = [floats(c) for c in out.colbert]
    return msg


def output_from_json(msg: dict[str, Any]) -> EncodeOutput:
    """Rebuild an :class:`EncodeOutput` from :func:`output_to_json`'s map."""
    dense = sparse = colbert = None
    if "dense" in msg:
        dense = np.asarray(msg["dense"], dtype=np.float32)
        if dense.ndim != 2:
            dense = dense.reshape(len(msg["dense"]), -1)
    if "sparse" in msg:
        sparse = [{int(k): float(v) for k, v in s.items()} for s in msg["sparse"]]
    if "colbert" in msg:
        colbert = [np.asarray(c, dtype=np.float32) for c in msg["colbert"]]
    return EncodeOutput(
        dense=dense, sparse=sparse, colbert=colbert,
        num_tokens=[int(t) for t in msg.get("num_tokens", [])],
        truncated=[int(i) for i in msg.get("truncated", [])],
    )


def check_outputs(outputs: Sequence[str]) -> tuple[bool, bool, bool]:
    """``(dense, sparse, colbert)`` flags of an ``outputs`` list; raises ``ValueError`` on junk."""
    unknown = [o for o in outputs if o not in ROUTES]
    if unknown:
        raise ValueError(f"unknown output {unknown[0]!r}; choose from {list(ROUTES)}")
    return ("dense" in outputs, "sparse" in outputs, "colbert" in outputs)

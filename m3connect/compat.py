"""Drop-in shapes for code written against FlagEmbedding and milvus-model.

Two classes over any :class:`~m3connect.Encoder` (a local :class:`~m3connect.M3Encoder`,
a :class:`~m3connect.RemoteEncoder`, ...), so that existing code keeps working while the
vectors come from m3connect:

* :class:`BGEM3EmbeddingFunction`: the ``pymilvus.model.hybrid.BGEM3EmbeddingFunction``
  (milvus-model) interface. ``ef(docs)`` / ``ef.encode_documents(docs)`` /
  ``ef.encode_queries(queries)`` return ``{"dense": [float32 [d]], "sparse": csr_array [n, vocab],
  "colbert_vecs": [float32 [t, d]]}`` (the keys asked for), and ``ef.dim`` the three widths,
  so the pymilvus hybrid-search tutorials run unchanged.
* :class:`FlagStyleM3`: the ``FlagEmbedding.BGEM3FlagModel`` interface. ``encode`` returns
  ``{"dense_vecs", "lexical_weights", "colbert_vecs"}`` with FlagEmbedding's types (a 2-d dense
  array, lexical weights keyed by the token id as a ``str``, one ColBERT matrix per text).

>>> from m3connect.compat import BGEM3EmbeddingFunction              # doctest: +SKIP
>>> ef = BGEM3EmbeddingFunction("BAAI/bge-m3", device="cpu", use_fp16=False)  # doctest: +SKIP
>>> out = ef(["BGE-M3 is multilingual."])                             # doctest: +SKIP
>>> out["dense"][0].shape, out["sparse"].shape                        # doctest: +SKIP
((1024,), (1, 250002))

Like FlagEmbedding's ``BGEM3FlagModel`` (which milvus-model wraps), texts are cut at 512
tokens unless ``max_length`` (or ``query_max_length`` / ``passage_max_length``) says otherwise.
``use_fp16=True`` computes in fp16 on a GPU and in fp32 on a CPU, as FlagEmbedding does.
Importing this module loads neither torch nor scipy: torch loads when a model is loaded by
name, scipy when a sparse matrix is built.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import scoring
from .defaults import DEFAULT_MODEL
from .errors import InvalidInputError, InvalidTypeError, M3Error, MissingDependencyError
from .protocols import Encoder
from .types import EncodeOutput

__all__ = [
    "BGEM3EmbeddingFunction",
    "FlagStyleM3",
    "DEFAULT_MAX_LENGTH",
    "BGE_M3_VOCAB_SIZE",
    "load_encoder",
    "to_flag_output",
    "sparse_to_csr",
]

#: FlagEmbedding's ``query_max_length`` / ``passage_max_length`` default.
DEFAULT_MAX_LENGTH = 512
#: ``len(tokenizer)`` of BAAI/bge-m3 (XLM-RoBERTa's vocabulary): milvus-model's sparse width.
BGE_M3_VOCAB_SIZE = 250002


# -- encoder construction ----------------------------------------------------------------------


def _one_device(device: Any, devices: Any) -> Any:
    """FlagEmbedding's ``devices`` (a str or a one-element list) folded into ``device``."""
    if devices is None:
        return device
    if isinstance(devices, (list, tuple)):
        if len(devices) != 1:
            raise InvalidInputError(
                f"m3connect encodes on one device per encoder, got devices={list(devices)!r}; "
                "run one encoder per device, or serve the model once ('m3connect serve')"
            )
        devices = devices[0]
    if device is not None and str(device) != str(devices):
        raise InvalidInputError(f"device={device!r} and devices={devices!r} disagree")
    return devices


def load_encoder(
    model_name_or_encoder: Any = DEFAULT_MODEL,
    *,
    device: Any = None,
    use_fp16: bool = False,
    dtype: str | None = None,
    **encoder_kwargs: Any,
) -> Encoder:
    """An :class:`~m3connect.Encoder` from a hub id, a local directory, a server URL or an encoder.

    ``use_fp16`` follows FlagEmbedding: fp16 on CUDA, fp32 on CPU (FlagEmbedding casts a CPU
    model back to fp32). ``dtype`` (``"float32"``, ``"bfloat16"``, ``"auto"``...) overrides it.
    An encoder object is returned as it is: it is configured already, so ``use_fp16`` is
    ignored and ``device``, ``dtype`` or other options are an error.
    """
    target = model_name_or_encoder
    if isinstance(target, Encoder):
        if device is not None or dtype is not None or encoder_kwargs:
            given = sorted(encoder_kwargs) + [n for n, v in (("device", device), ("dtype", dtype)) if v is not None]
            raise InvalidInputError(
                f"{given} apply when loading a model by name; the encoder passed in is configured already"
            )
        return target
    if not isinstance(target, (str, os.PathLike)):
        raise InvalidTypeError(
            f"model_name_or_encoder must be a model name, a path, a server URL or an m3connect Encoder, "
            f"got {type(target).__name__}"
        )
    from .remote import is_remote_model

    if is_remote_model(target):
        from .remote import RemoteEncoder

        return RemoteEncoder(str(target), **encoder_kwargs)
    import m3connect

    m3_encoder = m3connect.M3Encoder  # MissingDependencyError without torch / transformers
    if dtype is None:
        dtype = "float32"
        if use_fp16:
            import torch

            kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
            dtype = "float16" if kind == "cuda" else "float32"
    encoder_kwargs.setdefault("show_progress", False)
    return m3_encoder(target, device=device, dtype=dtype, **encoder_kwargs)


def _encode_parameters(encoder: Any) -> tuple[frozenset[str], bool]:
    """The keyword names ``encoder.encode`` takes, and whether it takes ``**kwargs``."""
    try:
        params = inspect.signature(encoder.encode).parameters.values()
    except (TypeError, ValueError):  # a builtin or C-implemented encode: assume the protocol only
        return frozenset({"max_length", "show_progress"}), False
    names = frozenset(p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def _check_texts(texts: Any, what: str = "texts") -> list[str]:
    if isinstance(texts, str):
        raise InvalidTypeError(f"{what} must be a list of strings, not a single string (wrap it: [{what[:-1]}])")
    try:
        items = list(texts)
    except TypeError:
        raise InvalidTypeError(f"{what} must be a list of strings, got {type(texts).__name__}") from None
    for i, t in enumerate(items):
        if not isinstance(t, str):
            raise InvalidTypeError(f"{what}[{i}] is {type(t).__name__}, not str")
    return items


class _EncoderFront:
    """What both compatibility classes share: one encoder, the max lengths, the output flags."""

    def __init__(
        self,
        encoder: Encoder,
        *,
        batch_size: int | None,
        max_length: int | None,
        query_max_length: int | None,
        passage_max_length: int | None,
        normalize_embeddings: bool,
    ) -> None:
        if not normalize_embeddings:
            raise InvalidInputError(
                "normalize_embeddings=False is not supported: BGE-M3's dense vectors are always "
                "L2-normalised in m3connect (inner product = cosine)"
            )
        bad_size = isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        if batch_size is not None and bad_size:
            raise InvalidInputError(f"batch_size must be a positive int or None, got {batch_size!r}")
        self.encoder = encoder
        self.batch_size = batch_size
        self.normalize_embeddings = True
        default = self._default_max_length(encoder)
        self.query_max_length = int(query_max_length or max_length or default)
        self.passage_max_length = int(passage_max_length or max_length or default)
        self._params, self._any_kwargs = _encode_parameters(encoder)

    @staticmethod
    def _default_max_length(encoder: Any) -> int:
        limit = getattr(encoder, "model_max_length", None)
        return min(DEFAULT_MAX_LENGTH, int(limit)) if isinstance(limit, int) and limit >= 2 else DEFAULT_MAX_LENGTH

    def _accepts(self, name: str) -> bool:
        return self._any_kwargs or name in self._params

    def _encode(
        self,
        texts: list[str],
        max_length: int,
        *,
        dense: bool,
        sparse: bool,
        colbert: bool,
        batch_size: int | None = None,
    ) -> EncodeOutput:
        kwargs: dict[str, Any] = {"max_length": int(max_length)}
        if self._accepts("show_progress"):
            kwargs["show_progress"] = False
        for name, flag in (("return_dense", dense), ("return_sparse", sparse), ("return_colbert", colbert)):
            if self._accepts(name):
                kwargs[name] = bool(flag)
        size = batch_size if batch_size is not None else self.batch_size
        if size is not None and self._accepts("batch_size"):
            kwargs["batch_size"] = int(size)
        out = self.encoder.encode(texts, **kwargs)
        for route, wanted in (("dense", dense), ("sparse", sparse), ("colbert", colbert)):
            if wanted and getattr(out, route) is None:
                raise M3Error(f"the encoder returned no {route} output for a request that asked for it")
        return out

    @property
    def model_name(self) -> str:
        return str(getattr(self.encoder, "model_name", "bge-m3"))

    @property
    def vocab_size(self) -> int:
        """Width of the sparse space: ``len(tokenizer)`` as milvus-model has it, else the config's."""
        tokenizer = getattr(self.encoder, "tokenizer", None)
        sizes = []
        if tokenizer is not None:
            try:
                sizes.append(len(tokenizer))
            except TypeError:
                pass
        vocab = getattr(self.encoder, "vocab_size", None)
        if isinstance(vocab, int):
            sizes.append(vocab)
        return max(sizes) if sizes else BGE_M3_VOCAB_SIZE


# -- milvus-model ----------------------------------------------------------------------------


def sparse_to_csr(rows: Sequence[Mapping[Any, float]], vocab_size: int) -> Any:
    """Lexical weights as a ``scipy.sparse.csr_array`` of shape ``[len(rows), vocab_size]``.

    One row per text, float64 values and sorted column indices, as milvus-model returns them;
    ``matrix[[i]]`` (or ``matrix._getrow(i)``) is the ``[1, vocab]`` row pymilvus inserts into a
    ``SPARSE_FLOAT_VECTOR`` field. Keys may be ints or FlagEmbedding's str token ids.
    """
    try:
        from scipy.sparse import csr_array
    except ImportError as exc:  # pragma: no cover - scipy comes with the compat extra
        raise MissingDependencyError.for_extra("scipy", "compat") from exc
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    cols: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    for i, row in enumerate(rows):
        c = np.fromiter((int(k) for k in row), dtype=np.int64, count=len(row))
        v = np.fromiter((float(w) for w in row.values()), dtype=np.float64, count=len(row))
        order = np.argsort(c, kind="stable")
        cols.append(c[order])
        vals.append(v[order])
        indptr[i + 1] = indptr[i] + len(c)
    indices = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    data = np.concatenate(vals) if vals else np.zeros(0, np.float64)
    width = max(int(vocab_size), int(indices.max()) + 1 if indices.size else 0)
    index_dtype = np.int32 if width < 2**31 and indptr[-1] < 2**31 else np.int64
    matrix = csr_array(
        (data, indices.astype(index_dtype), indptr.astype(index_dtype)), shape=(len(rows), width)
    )
    matrix.has_sorted_indices = True
    return matrix


class BGEM3EmbeddingFunction(_EncoderFront):
    """milvus-model's ``BGEM3EmbeddingFunction``, computed by m3connect.

    Args:
        model_name_or_encoder: a hub id or local directory (an :class:`~m3connect.M3Encoder` is
            loaded), an ``http(s)://`` encoder service (:class:`~m3connect.RemoteEncoder`), or
            any :class:`~m3connect.Encoder` object. ``model_name=`` is accepted as in milvus-model.
        batch_size: cap on texts per forward pass; ``None`` (default) leaves batching to the
            encoder's token budget.
        device, use_fp16: as in milvus-model (fp16 applies on CUDA only, like FlagEmbedding);
            ``devices=`` (FlagEmbedding's spelling, one device) is accepted too.
        normalize_embeddings: must be ``True`` (BGE-M3 dense vectors are normalised).
        return_dense, return_sparse, return_colbert_vecs: which keys the outputs carry.
        max_length: token limit for queries and documents (default 512, FlagEmbedding's);
            ``query_max_length`` / ``passage_max_length`` set them apart.
        **kwargs: passed to the encoder when it is loaded by name (``dtype``, ``cache_dir``...).

    Outputs (``__call__`` = :meth:`encode_documents`): ``"dense"`` a list of ``float32 [d]``
    arrays, ``"sparse"`` a ``scipy.sparse.csr_array`` ``[n, dim["sparse"]]``, ``"colbert_vecs"``
    a list of ``float32 [t_i, d]`` arrays.
    """

    def __init__(
        self,
        model_name_or_encoder: Any = DEFAULT_MODEL,
        batch_size: int | None = None,
        device: Any = None,
        normalize_embeddings: bool = True,
        use_fp16: bool = False,
        return_dense: bool = True,
        return_sparse: bool = True,
        return_colbert_vecs: bool = False,
        max_length: int | None = None,
        *,
        query_max_length: int | None = None,
        passage_max_length: int | None = None,
        model_name: str | None = None,
        devices: Any = None,
        dtype: str | None = None,
        **kwargs: Any,
    ) -> None:
        if model_name is not None:
            if model_name_or_encoder != DEFAULT_MODEL:
                raise InvalidInputError("pass the model once: model_name_or_encoder or model_name")
            model_name_or_encoder = model_name
        if not (return_dense or return_sparse or return_colbert_vecs):
            raise InvalidInputError("at least one of return_dense, return_sparse, return_colbert_vecs must be True")
        device = _one_device(device, devices)
        encoder = load_encoder(model_name_or_encoder, device=device, use_fp16=use_fp16, dtype=dtype, **kwargs)
        super().__init__(
            encoder,
            batch_size=batch_size,
            max_length=max_length,
            query_max_length=query_max_length,
            passage_max_length=passage_max_length,
            normalize_embeddings=normalize_embeddings,
        )
        self.device = device if device is not None else getattr(encoder, "device", None)
        self.use_fp16 = bool(use_fp16)
        self.return_dense = bool(return_dense)
        self.return_sparse = bool(return_sparse)
        self.return_colbert_vecs = bool(return_colbert_vecs)

    def __call__(self, texts: Sequence[str]) -> dict[str, Any]:
        return self.encode_documents(texts)

    def encode_documents(self, documents: Sequence[str]) -> dict[str, Any]:
        """Documents, cut at ``passage_max_length`` tokens."""
        return self._milvus(_check_texts(documents, "documents"), self.passage_max_length)

    def encode_queries(self, queries: Sequence[str]) -> dict[str, Any]:
        """Queries, cut at ``query_max_length`` tokens (BGE-M3 takes no query instruction)."""
        return self._milvus(_check_texts(queries, "queries"), self.query_max_length)

    @property
    def dim(self) -> dict[str, int]:
        """``{"dense": d, "colbert_vecs": d_colbert, "sparse": vocabulary size}``."""
        return {
            "dense": int(self.encoder.dense_dim),
            "colbert_vecs": int(self.encoder.colbert_dim),
            "sparse": self.vocab_size,
        }

    def dense_embed_dim(self) -> int:
        return self.dim["dense"]

    def _milvus(self, texts: list[str], max_length: int) -> dict[str, Any]:
        out = self._encode(
            texts, max_length, dense=self.return_dense, sparse=self.return_sparse, colbert=self.return_colbert_vecs
        )
        result: dict[str, Any] = {}
        if self.return_dense:
            assert out.dense is not None
            result["dense"] = list(np.asarray(out.dense, dtype=np.float32))
        if self.return_sparse:
            assert out.sparse is not None
            result["sparse"] = sparse_to_csr(out.sparse, self.vocab_size)
        if self.return_colbert_vecs:
            assert out.colbert is not None
            result["colbert_vecs"] = [np.asarray(c, dtype=np.float32) for c in out.colbert]
        return result

    def __repr__(self) -> str:
        return f"BGEM3EmbeddingFunction(model={self.model_name!r}, dim={self.dim})"


# -- FlagEmbedding ---------------------------------------------------------------------------


def to_flag_output(
    out: EncodeOutput,
    *,
    return_dense: bool = True,
    return_sparse: bool = True,
    return_colbert_vecs: bool = True,
    single: bool = False,
) -> dict[str, Any]:
    """An :class:`~m3connect.EncodeOutput` in FlagEmbedding's ``BGEM3FlagModel.encode`` shape.

    ``{"dense_vecs": float32 [n, d], "lexical_weights": [{"<token id>": weight}],
    "colbert_vecs": [float32 [t_i, d]]}``; a route not asked for is ``None``. ``single``
    unwraps the one text's outputs, as FlagEmbedding does for a ``str`` input.
    """
    dense = lexical = colbert = None
    if return_dense:
        if out.dense is None:
            raise M3Error("the encoder output has no dense vectors")
        dense = np.asarray(out.dense, dtype=np.float32)
    if return_sparse:
        if out.sparse is None:
            raise M3Error("the encoder output has no lexical weights")
        lexical = [{str(int(t)): float(w) for t, w in row.items()} for row in out.sparse]
    if return_colbert_vecs:
        if out.colbert is None:
            raise M3Error("the encoder output has no ColBERT vectors")
        colbert = [np.asarray(c, dtype=np.float32) for c in out.colbert]
    if single:
        return {
            "dense_vecs": None if dense is None else dense[0],
            "lexical_weights": None if lexical is None else lexical[0],
            "colbert_vecs": None if colbert is None else colbert[0],
        }
    return {"dense_vecs": dense, "lexical_weights": lexical, "colbert_vecs": colbert}


class FlagStyleM3(_EncoderFront):
    """FlagEmbedding's ``BGEM3FlagModel`` interface, computed by m3connect.

    ``encode`` / ``encode_queries`` / ``encode_corpus`` return ``{"dense_vecs",
    "lexical_weights", "colbert_vecs"}`` (``None`` for a representation not asked for); a
    ``str`` input gives the one text's outputs unwrapped. Defaults follow FlagEmbedding:
    ``return_dense=True``, ``return_sparse=False``, ``return_colbert_vecs=False``,
    ``query_max_length = passage_max_length = 512``, ``use_fp16=True`` (on CUDA only).
    ``encode`` cuts texts at ``passage_max_length``, ``encode_queries`` at ``query_max_length``
    (after prefixing ``query_instruction_for_retrieval``, when set).

    Args:
        model_name_or_encoder: a hub id, a local directory, an ``http(s)://`` encoder service or
            an :class:`~m3connect.Encoder`; ``model_name_or_path=`` is accepted as in FlagEmbedding.
        batch_size: cap on texts per forward pass (``None``: the encoder's token budget).
        **kwargs: passed to the encoder when it is loaded by name (``dtype``, ``cache_dir``...).
    """

    def __init__(
        self,
        model_name_or_encoder: Any = DEFAULT_MODEL,
        *,
        normalize_embeddings: bool = True,
        use_fp16: bool = True,
        query_instruction_for_retrieval: str | None = None,
        query_instruction_format: str = "{}{}",
        devices: Any = None,
        device: Any = None,
        batch_size: int | None = None,
        query_max_length: int | None = None,
        passage_max_length: int | None = None,
        max_length: int | None = None,
        return_dense: bool = True,
        return_sparse: bool = False,
        return_colbert_vecs: bool = False,
        model_name_or_path: str | None = None,
        dtype: str | None = None,
        **kwargs: Any,
    ) -> None:
        if model_name_or_path is not None:
            if model_name_or_encoder != DEFAULT_MODEL:
                raise InvalidInputError("pass the model once: model_name_or_encoder or model_name_or_path")
            model_name_or_encoder = model_name_or_path
        device = _one_device(device, devices)
        encoder = load_encoder(model_name_or_encoder, device=device, use_fp16=use_fp16, dtype=dtype, **kwargs)
        super().__init__(
            encoder,
            batch_size=batch_size,
            max_length=max_length,
            query_max_length=query_max_length,
            passage_max_length=passage_max_length,
            normalize_embeddings=normalize_embeddings,
        )
        self.query_instruction_for_retrieval = query_instruction_for_retrieval
        self.query_instruction_format = query_instruction_format
        self.return_dense = bool(return_dense)
        self.return_sparse = bool(return_sparse)
        self.return_colbert_vecs = bool(return_colbert_vecs)

    @property
    def tokenizer(self) -> Any:
        """The encoder's tokenizer (local encoders only)."""
        tokenizer = getattr(self.encoder, "tokenizer", None)
        if tokenizer is None:
            raise M3Error(f"{type(self.encoder).__name__} has no local tokenizer")
        return tokenizer

    def _flag_encode(
        self,
        sentences: str | Sequence[str],
        max_length: int,
        batch_size: int | None,
        flags: tuple[bool | None, bool | None, bool | None],
        prefix: bool = False,
    ) -> dict[str, Any]:
        single = isinstance(sentences, str)
        texts = [sentences] if isinstance(sentences, str) else _check_texts(sentences, "sentences")
        if prefix and self.query_instruction_for_retrieval:
            texts = [self.query_instruction_format.format(self.query_instruction_for_retrieval, t) for t in texts]
        defaults = (self.return_dense, self.return_sparse, self.return_colbert_vecs)
        dense, sparse, colbert = (d if f is None else bool(f) for f, d in zip(flags, defaults))
        if not (dense or sparse or colbert):
            raise InvalidInputError("at least one of return_dense, return_sparse, return_colbert_vecs must be True")
        out = self._encode(texts, max_length, dense=dense, sparse=sparse, colbert=colbert, batch_size=batch_size)
        return to_flag_output(
            out, return_dense=dense, return_sparse=sparse, return_colbert_vecs=colbert, single=single
        )

    def encode(
        self,
        sentences: str | Sequence[str],
        batch_size: int | None = None,
        max_length: int | None = None,
        return_dense: bool | None = None,
        return_sparse: bool | None = None,
        return_colbert_vecs: bool | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Passages (or any text): ``{"dense_vecs", "lexical_weights", "colbert_vecs"}``."""
        _refuse_unknown(kwargs)
        length = self.passage_max_length if max_length is None else max_length
        return self._flag_encode(sentences, length, batch_size, (return_dense, return_sparse, return_colbert_vecs))

    def encode_corpus(
        self,
        corpus: str | Sequence[str],
        batch_size: int | None = None,
        max_length: int | None = None,
        return_dense: bool | None = None,
        return_sparse: bool | None = None,
        return_colbert_vecs: bool | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Passages, cut at ``passage_max_length`` tokens."""
        return self.encode(corpus, batch_size, max_length, return_dense, return_sparse, return_colbert_vecs, **kwargs)

    def encode_queries(
        self,
        queries: str | Sequence[str],
        batch_size: int | None = None,
        max_length: int | None = None,
        return_dense: bool | None = None,
        return_sparse: bool | None = None,
        return_colbert_vecs: bool | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Queries, with the retrieval instruction (if any) and cut at ``query_max_length``."""
        _refuse_unknown(kwargs)
        length = self.query_max_length if max_length is None else max_length
        flags = (return_dense, return_sparse, return_colbert_vecs)
        return self._flag_encode(queries, length, batch_size, flags, prefix=True)

    # -- FlagEmbedding's scoring helpers ---------------------------------------------------

    @staticmethod
    def compute_lexical_matching_score(
        lexical_weights_1: Mapping[Any, float] | Sequence[Mapping[Any, float]],
        lexical_weights_2: Mapping[Any, float] | Sequence[Mapping[Any, float]],
    ) -> float | np.ndarray:
        """Sum of weight products over shared tokens: a float for two dicts, ``[n1, n2]`` for two lists."""
        if isinstance(lexical_weights_1, Mapping) and isinstance(lexical_weights_2, Mapping):
            return scoring.sparse_score(lexical_weights_1, lexical_weights_2)
        if isinstance(lexical_weights_1, Sequence) and isinstance(lexical_weights_2, Sequence):
            return np.array(
                [[scoring.sparse_score(a, b) for b in lexical_weights_2] for a in lexical_weights_1], dtype=np.float64
            )
        raise InvalidTypeError("lexical weights must be two dicts or two lists of dicts")

    @staticmethod
    def colbert_score(q_reps: np.ndarray, p_reps: np.ndarray) -> float:
        """MaxSim averaged over the query vectors (FlagEmbedding's ``colbert_score``)."""
        return scoring.colbert_score(np.asarray(q_reps), np.asarray(p_reps))

    def convert_id_to_token(
        self, lexical_weights: Mapping[Any, float] | Sequence[Mapping[Any, float]]
    ) -> dict[str, float] | list[dict[str, float]]:
        """Lexical weights keyed by the decoded token; a list of one dict gives that dict, as FlagEmbedding."""
        rows = [lexical_weights] if isinstance(lexical_weights, Mapping) else list(lexical_weights)
        decode = getattr(self.encoder, "convert_id_to_token", None)
        if decode is None:
            tokenizer = self.tokenizer
            converted = [{tokenizer.decode([int(t)]): float(w) for t, w in row.items()} for row in rows]
        else:
            converted = [decode({int(t): float(w) for t, w in row.items()}) for row in rows]
        return converted[0] if len(converted) == 1 else converted

    def compute_score(
        self,
        sentence_pairs: Sequence[tuple[str, str]] | tuple[str, str],
        batch_size: int | None = None,
        max_query_length: int | None = None,
        max_passage_length: int | None = None,
        weights_for_different_modes: Sequence[float] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """FlagEmbedding's ``compute_score``: ``dense``, ``sparse``, ``colbert``, ``sparse+dense``,
        ``colbert+sparse+dense`` lists (weights ``(dense, sparse, colbert)``, default ``(1, 1, 1)`` as
        there); one ``(query, passage)`` tuple gives one float per key."""
        _refuse_unknown(kwargs)
        compute = getattr(self.encoder, "compute_score", None)
        if compute is None:
            raise M3Error(f"{type(self.encoder).__name__} has no compute_score")
        single = isinstance(sentence_pairs, tuple) and len(sentence_pairs) == 2 and isinstance(sentence_pairs[0], str)
        pairs = [sentence_pairs] if single else sentence_pairs
        weights = (1.0, 1.0, 1.0) if weights_for_different_modes is None else tuple(weights_for_different_modes)
        scores = compute(
            list(pairs),
            weights,
            max_query_length=max_query_length or self.query_max_length,
            max_passage_length=max_passage_length or self.passage_max_length,
            batch_size=batch_size if batch_size is not None else self.batch_size,
        )
        return {key: values[0] for key, values in scores.items()} if single else scores

    def __repr__(self) -> str:
        return f"FlagStyleM3(model={self.model_name!r})"


def _refuse_unknown(kwargs: Mapping[str, Any]) -> None:
    if kwargs:
        raise InvalidInputError(f"unsupported options {sorted(kwargs)}")

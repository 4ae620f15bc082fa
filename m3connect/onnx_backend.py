"""BGE-M3 on onnxruntime: the checkpoint's backbone exported to ONNX, the three heads in numpy.

This is the design of ``bge-m3-lite`` and of most "BGE-M3 without torch" projects: only the
transformer runs in onnxruntime; CLS pooling, the sparse ``relu(linear)`` and the ColBERT
projection are a few numpy lines. In fp32 its outputs equal FlagEmbedding's (and
``M3Encoder(dtype="float32")``'s) to 1e-5. ``pip install 'm3connect[onnx]'``.

>>> from m3connect.onnx_backend import OnnxM3Encoder          # doctest: +SKIP
>>> enc = OnnxM3Encoder("/models/bge-m3")     # doctest: +SKIP  (exports once, beside the weights)
>>> out = enc.encode(["hello world"])                          # doctest: +SKIP

Exporting needs torch and transformers (once); encoding then needs only onnxruntime, numpy
and the tokenizer. Texts are tokenised, truncated, sorted by length and batched by a
padded-token budget exactly like ``M3Encoder`` does, so the two compare like for like.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InvalidInputError, InvalidTypeError, ModelLoadError
from .lexical import lexical_weights
from .types import EncodeOutput, Vectors

__all__ = ["OnnxM3Encoder", "export_backbone", "ONNX_FILE"]

ONNX_FILE = "m3connect-backbone.onnx"
HEADS_FILE = "m3connect-heads.npz"
_OPSET = 17
# Padded tokens per onnxruntime call, capped like M3Encoder's CPU budget (16 MiB of
# feed-forward activations per batch).
_ACTIVATION_BYTES = 16 * 1024 * 1024
_MIN_TOKEN_BUDGET, _MAX_TOKEN_BUDGET = 512, 16384


def export_backbone(model_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None) -> Path:
    """Export a BGE-M3 checkpoint's backbone to ONNX (fp32) and its heads to ``.npz``.

    Writes ``m3connect-backbone.onnx`` (inputs ``input_ids`` and ``attention_mask``, int64
    ``[batch, tokens]``; output ``last_hidden_state``) and ``m3connect-heads.npz`` into
    ``out_dir`` (default: the checkpoint directory) and returns the ``.onnx`` path.
    Needs torch, transformers and onnx (torch's TorchScript exporter).
    """
    import torch
    import transformers
    from transformers import AutoConfig, AutoModel

    src = Path(model_dir)
    dst = Path(out_dir) if out_dir is not None else src
    dst.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.from_pretrained(src)
    kwargs: dict[str, Any] = {"attn_implementation": "eager"}
    if config.model_type in {"xlm-roberta", "roberta", "bert"}:
        kwargs["add_pooling_layer"] = False
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        # A model of its own: tracing for export leaves the module it traced unusable.
        backbone = AutoModel.from_pretrained(src, **kwargs).eval().float()
    finally:
        hf_logging.set_verbosity(verbosity)
    # transformers >= 5 builds its attention mask with code the tracer freezes to the example
    # shape; a ready additive [batch, 1, 1, keys] bias is taken as is and traces generically.
    additive = int(transformers.__version__.split(".")[0]) >= 5

    class Backbone(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            mask: torch.Tensor = attention_mask
            if additive:
                keep = attention_mask[:, None, None, :].to(torch.float32)
                mask = (1.0 - keep) * torch.finfo(torch.float32).min
            hidden: torch.Tensor = self.inner(input_ids=input_ids, attention_mask=mask).last_hidden_state
            return hidden

    ids = torch.full((2, 16), 5, dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    onnx_path = dst / ONNX_FILE
    dynamic = {0: "batch", 1: "tokens"}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter
        torch.onnx.export(
            Backbone(backbone),
            (ids, mask),
            str(onnx_path),
            dynamo=False,
            input_names=["input_ids", "attention_mask"],
            output_names=["last_hidden_state"],
            dynamic_axes={"input_ids": dynamic, "attention_mask": dynamic, "last_hidden_state": dynamic},
            opset_version=_OPSET,
        )
    heads: dict[str, Any] = {}  # arrays; Any, as np.savez's stub also types its allow_pickle= keyword
    for prefix, name in (("sparse", "sparse_linear.pt"), ("colbert", "colbert_linear.pt")):
        file = src / name
        if not file.is_file():
            raise ModelLoadError(f"{file} is missing: a BGE-M3 checkpoint needs both head files")
        state = torch.load(file, map_location="cpu", weights_only=True)
        heads[f"{prefix}_weight"] = state["weight"].float().numpy()
        bias = state.get("bias")
        heads[f"{prefix}_bias"] = (
            bias.float().numpy() if bias is not None else np.zeros(state["weight"].shape[0], np.float32)
        )
    np.savez(dst / HEADS_FILE, **heads)
    return onnx_path


class OnnxM3Encoder:
    """Encodes texts into BGE-M3's dense, sparse and ColBERT outputs with onnxruntime.

    Args:
        model_dir: a local BGE-M3 checkpoint (tokenizer, config, weights, head files).
        onnx_dir: where the exported backbone lives (default ``model_dir``); exported there
            on first use when missing (or always, with ``export=True``).
        threads: onnxruntime intra-op threads (default: onnxruntime's choice, all cores).
        max_length: default token limit per text (CLS and EOS included).
        tokens_per_batch: padded-token budget of one call (default: as ``M3Encoder`` on CPU).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        onnx_dir: str | os.PathLike[str] | None = None,
        export: bool = False,
        threads: int | None = None,
        max_length: int = 8192,
        tokens_per_batch: int | None = None,
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("the onnxruntime backend needs: pip install 'm3connect[onnx]'") from exc
        from transformers import AutoConfig, AutoTokenizer

        self.path = Path(model_dir)
        where = Path(onnx_dir) if onnx_dir is not None else self.path
        if export or not (where / ONNX_FILE).is_file() or not (where / HEADS_FILE).is_file():
            export_backbone(self.path, where)
        config = AutoConfig.from_pretrained(self.path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(where / ONNX_FILE), options, providers=["CPUExecutionProvider"])
        with np.load(where / HEADS_FILE) as heads:
            self._sparse_w = heads["sparse_weight"][0].astype(np.float32)  # [hidden]
            self._sparse_b = np.float32(heads["sparse_bias"][0])
            self._colbert_wt = np.ascontiguousarray(heads["colbert_weight"].T, dtype=np.float32)  # [hidden, d]
            self._colbert_b = heads["colbert_bias"].astype(np.float32)
        self.hidden_size = int(config.hidden_size)
        self.colbert_dim = int(self._colbert_wt.shape[1])
        self.model_max_length = int(getattr(config, "max_position_embeddings", 514)) - 2
        if not 2 <= max_length <= self.model_max_length:
            raise InvalidInputError(f"max_length must be in [2, {self.model_max_length}], got {max_length}")
        self.max_length = max_length
        width = int(getattr(config, "intermediate_size", 0) or 4 * self.hidden_size)
        self.tokens_per_batch = tokens_per_batch or max(
            _MIN_TOKEN_BUDGET, min(_MAX_TOKEN_BUDGET, _ACTIVATION_BYTES // (width * 4))
        )
        tok = self.tokenizer
        specials = {tok.cls_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id} - {None}
        self._special_ids = np.array(sorted(specials), dtype=np.int64)
        self.compute_dtype = "float32"

    @property
    def dense_dim(self) -> int:
        return self.hidden_size

    def _tokenize(self, texts: list[str], max_length: int) -> tuple[list[list[int]], list[int]]:
        enc = self.tokenizer(
            texts,
            truncation=True,
            max_length=max_length + 1,
            add_special_tokens=True,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        eos = self.tokenizer.eos_token_id
        ids: list[list[int]] = enc["input_ids"]
        truncated = []
        for i, row in enumerate(ids):
            if len(row) > max_length:
                ids[i] = row[: max_length - 1] + [eos]
                truncated.append(i)
        return ids, truncated

    def _batches(self, lengths: np.ndarray, order: np.ndarray, batch_size: int | None) -> Iterator[np.ndarray]:
        start = 0
        while start < len(order):
            count = max(1, self.tokens_per_batch // max(int(lengths[order[start]]), 1))
            if batch_size:
                count = min(count, batch_size)
            yield order[start : start + count]
            start += count

    def _run(
        self, rows: list[list[int]], flags: tuple[bool, bool, bool]
    ) -> tuple[np.ndarray | None, list[dict[int, float]] | None, list[np.ndarray] | None]:
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        width = int(lengths.max())
        ids = np.full((len(rows), width), self.tokenizer.pad_token_id, dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
        mask = np.arange(width)[None, :] < lengths[:, None]
        (hidden,) = self.session.run(None, {"input_ids": ids, "attention_mask": mask.astype(np.int64)})
        dense = sparse = colbert = None
        if flags[0]:
            cls = hidden[:, 0]
            dense = cls / np.maximum(np.linalg.norm(cls, axis=1, keepdims=True), 1e-12)
        if flags[1]:
            weights = np.maximum(hidden @ self._sparse_w + self._sparse_b, 0.0)
            sparse = lexical_weights(ids, mask, weights, self._special_ids)
        if flags[2]:
            tokens = hidden[:, 1:][mask[:, 1:]]  # the real tokens after CLS, row after row
            vecs = tokens @ self._colbert_wt + self._colbert_b
            vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
            colbert = np.split(vecs, np.cumsum(lengths - 1)[:-1])
        return dense, sparse, colbert

    def encode(
        self,
        texts: Sequence[str],
        *,
        batch_size: int | None = None,
        max_length: int | None = None,
        return_dense: bool = True,
        return_sparse: bool = True,
        return_colbert: bool = True,
    ) -> EncodeOutput:
        """Like ``M3Encoder.encode``: all three outputs in input order, fp32."""
        if isinstance(texts, str):
            raise InvalidTypeError("encode() takes a list of strings, not a single string; wrap it: [text]")
        items = list(texts)
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise InvalidTypeError(f"texts[{i}] is {type(item).__name__}, not str")
        max_len = self.max_length if max_length is None else int(max_length)
        if not 2 <= max_len <= self.model_max_length:
            raise InvalidInputError(f"max_length must be in [2, {self.model_max_length}], got {max_len}")
        flags = (return_dense, return_sparse, return_colbert)
        if not items:
            return EncodeOutput(
                dense=np.zeros((0, self.dense_dim), np.float32) if return_dense else None,
                sparse=[] if return_sparse else None,
                colbert=[] if return_colbert else None,
            )
        ids, truncated = self._tokenize(items, max_len)
        lengths = np.fromiter((len(r) for r in ids), dtype=np.int64, count=len(ids))
        order = np.argsort(-lengths, kind="stable")
        dense_rows: list[Any] = [None] * len(ids)
        sparse_rows: list[Any] = [None] * len(ids)
        colbert_rows: list[Any] = [None] * len(ids)
        for batch in self._batches(lengths, order, batch_size):
            dense, sparse, colbert = self._run([ids[i] for i in batch], flags)
            for j, i in enumerate(batch.tolist()):
                if dense is not None:
                    dense_rows[i] = dense[j]
                if sparse is not None:
                    sparse_rows[i] = sparse[j]
                if colbert is not None:
                    colbert_rows[i] = colbert[j]
        return EncodeOutput(
            dense=np.stack(dense_rows).astype(np.float32, copy=False) if return_dense else None,
            sparse=sparse_rows if return_sparse else None,
            colbert=colbert_rows if return_colbert else None,
            num_tokens=lengths.tolist(),
            truncated=truncated,
        )

    def encode_one(self, text: str, *, max_length: int | None = None) -> Vectors:
        """All three representations of a single text."""
        return self.encode([text], max_length=max_length).item(0)

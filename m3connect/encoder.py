"""BGE-M3 encoder: dense, sparse and ColBERT outputs from one forward pass.

The encoder knows nothing of databases. Its outputs follow REFERENCE.md
section 2 exactly, so that in fp32 they match FlagEmbedding's ``BGEM3FlagModel``.

>>> enc = M3Encoder("BAAI/bge-m3", device="cpu")          # doctest: +SKIP
>>> out = enc.encode(["hello world"])                      # doctest: +SKIP
>>> out.dense.shape, list(out.sparse[0].items())[:1]        # doctest: +SKIP
((1, 1024), [(33600, 0.1875)])
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, NamedTuple, cast

import numpy as np
import torch
from tqdm.auto import tqdm

from . import scoring
from .defaults import DEFAULT_MODEL
from .errors import InvalidInputError, InvalidTypeError, ModelLoadError
from .lexical import lexical_weights
from .types import EncodeOutput, Vectors

__all__ = ["M3Encoder", "DEFAULT_MODEL", "cpu_has_native_bf16", "resolve_dtype"]

logger = logging.getLogger(__name__)

SPARSE_HEAD_FILE = "sparse_linear.pt"
COLBERT_HEAD_FILE = "colbert_linear.pt"
DTypeName = Literal["auto", "float32", "float16", "bfloat16", "int8"]
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
# Padded tokens per forward pass when the caller gives no batch size. Large enough
# to keep the matrix kernels busy, small enough that an 8192-token text runs alone.
_DEFAULT_TOKEN_BUDGET = {"cpu": 16384, "cuda": 65536}
# On CPU the budget is also capped so that the largest activation of a batch (tokens x
# intermediate size, the feed-forward output) stays at 16 MiB. Blocks over glibc's largest
# mmap threshold (32 MiB) are mmap-ed fresh and unmapped on free, so every forward pass
# page-faults them in again (~1M faults per 18k tokens with 3 layers of BGE-M3's width), and
# smaller batches keep the memory-bound element-wise ops in cache. Measured on a 2-core VM:
# 20-30% more tokens/s than a flat 16384, for BGE-M3's shape (cap 1024 tokens) as for a
# 256-wide model (cap 4096); the matrix kernels stay busy at those sizes.
_CPU_ACTIVATION_BYTES = 16 * 1024 * 1024
# bf16 (oneDNN-fused linears) wants bigger batches: every new batch shape costs oneDNN a kernel
# set-up of a few ms, and attention gets more blocks to share out. Same VM and 256-wide model:
# 2.9-3.0 CPU-s at 16384 and 32768 tokens, 3.4-3.6 at 8192, 4.6 at 4096 (for 96 texts).
_CPU_ACTIVATION_BYTES_BF16 = 32 * 1024 * 1024
_CPU_MIN_TOKEN_BUDGET = 512
# compile=True: batch widths are padded up to one of these (then to the model's limit), and
# rows to a power of two, so that the compiled backbone meets a bounded set of static shapes.
_COMPILE_WIDTHS = (64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)
_COMPILE_RECOMPILE_LIMIT = 64
# Page size used to touch (fault in) a fresh host buffer before a GPU batch's outputs land in it.
_PAGE_BYTES = 4096
# Below this many texts the progress bar stays hidden unless asked for.


def _resolve_checkpoint(name_or_path: str | os.PathLike[str], cache_dir: str | None) -> Path:
    """Return a local directory for a hub id or a path; never guesses weights."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists() or name.startswith((".", "/", "~")):
        raise ModelLoadError(f"model path {name!r} is not a directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, cache_dir=cache_dir))
    except Exception as exc:  # the hub raises many types; all mean "not available here"
        raise ModelLoadError(
            f"could not fetch model {name!r} from the Hugging Face hub ({type(exc).__name__}: "
            f"{exc}). Without hub access, download the model elsewhere and pass its local "
            f"directory, e.g. --model /models/bge-m3 or M3Encoder('/models/bge-m3')"
        ) from exc


def _load_head(directory: Path, filename: str, in_dim: int, out_dim: int | None) -> torch.nn.Linear:
    """Load a ``Linear`` head saved as a state dict; a missing or misshapen file is an error."""
    file = directory / filename
    if not file.is_file():
        raise ModelLoadError(
            f"{file} is missing: a BGE-M3 checkpoint needs {SPARSE_HEAD_FILE} and "
            f"{COLBERT_HEAD_FILE} beside its weights (m3connect never substitutes random heads)"
        )
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{file} could not be read: {exc}") from exc
    weight, bias = state.get("weight"), state.get("bias")
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise ModelLoadError(f"{file} has no 2-d 'weight' tensor (keys: {sorted(state)})")
    rows, cols = weight.shape
    if cols != in_dim or (out_dim is not None and rows != out_dim):
        expected = f"[{out_dim if out_dim is not None else 'any'}, {in_dim}]"
        raise ModelLoadError(
            f"{file} has weight shape {list(weight.shape)}, expected {expected} for a backbone "
            f"with hidden size {in_dim}"
        )
    if bias is not None and tuple(bias.shape) != (rows,):
        raise ModelLoadError(f"{file} has bias shape {list(bias.shape)}, expected [{rows}]")
    head = torch.nn.Linear(in_dim, rows, bias=bias is not None)
    head.load_state_dict(state)
    return head


class _FusedLinear(torch.nn.Module):
    """A CPU ``nn.Linear`` as one oneDNN matmul with the bias (and a GELU) applied in its epilogue.

    torch's own CPU ``addmm`` first copies the broadcast bias into the output and then runs the
    matrix product, and a GELU is a third pass over memory; in bf16 those passes cost as much as
    the product itself. ``mkldnn::_linear_pointwise`` is the op ``torch.compile`` emits for this.
    """

    def __init__(self, linear: torch.nn.Linear, gelu: bool = False) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.out_features = linear.out_features
        self._attr, self._algorithm = ("gelu", "none") if gelu else ("none", "")  # "none": erf GELU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        y: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            flat, self.weight, self.bias, self._attr, [], self._algorithm
        )
        return y.view(*x.shape[:-1], self.out_features)


class _FusedResidualOutput(torch.nn.Module):
    """``LayerNorm(dense(h) + residual)`` of a BERT-family block with the add fused into the matmul.

    Replaces ``XLMRobertaSelfOutput`` / ``XLMRobertaOutput`` (same call signature; dropout is a
    no-op at inference).
    """

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        dense = cast(torch.nn.Linear, block.dense)
        self.weight, self.bias = dense.weight, dense.bias
        self.LayerNorm = cast(torch.nn.LayerNorm, block.LayerNorm)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        width = hidden_states.shape[-1]
        residual = input_tensor.reshape(-1, input_tensor.shape[-1])
        y: torch.Tensor = torch.ops.mkldnn._linear_pointwise.binary(
            hidden_states.reshape(-1, width), residual.contiguous(), self.weight, self.bias, "add"
        )
        out: torch.Tensor = self.LayerNorm(y.view(input_tensor.shape))
        return out


def _onednn_fusion_works(dtype: torch.dtype) -> bool:
    """Whether this torch has oneDNN's fused linear ops and they agree with ``F.linear`` here."""
    try:
        gen = torch.Generator().manual_seed(0)
        x, other = torch.randn(5, 8, generator=gen).to(dtype), torch.randn(5, 3, generator=gen).to(dtype)
        lin = torch.nn.Linear(8, 3).to(dtype)
        with torch.inference_mode():
            ref = torch.nn.functional.linear(x, lin.weight, lin.bias).float()
            ok = torch.allclose(_FusedLinear(lin)(x).float(), ref, atol=0.05, rtol=0.02)
            act = _FusedLinear(lin, gelu=True)(x).float()
            ok = ok and torch.allclose(act, torch.nn.functional.gelu(ref), atol=0.05, rtol=0.02)
            add = torch.ops.mkldnn._linear_pointwise.binary(x, other, lin.weight, lin.bias, "add").float()
            return bool(ok and torch.allclose(add, ref + other.float(), atol=0.05, rtol=0.02))
    except Exception:  # op missing (no oneDNN) or refused: keep the plain modules
        return False


def _fuse_cpu_linears(backbone: torch.nn.Module, config: Any) -> int:
    """Swap a BERT-family backbone's linears for oneDNN-fused ones; returns how many were swapped."""
    if getattr(config, "model_type", None) not in {"xlm-roberta", "roberta", "bert"}:
        return 0
    gelu = getattr(config, "hidden_act", None) == "gelu"  # the exact (erf) GELU
    swapped = 0
    retired: set[int] = set()  # replaced blocks, still in the list below: leave them be
    for parent in list(backbone.modules()):
        if id(parent) in retired:
            continue
        for name, child in list(parent.named_children()):
            kind = type(child).__name__
            dense = getattr(child, "dense", None)
            if isinstance(child, torch.nn.Linear):
                setattr(parent, name, _FusedLinear(child))
                swapped += 1
            elif kind.endswith("Intermediate") and isinstance(dense, torch.nn.Linear) and gelu:
                child.dense = _FusedLinear(dense, gelu=True)
                child.intermediate_act_fn = torch.nn.Identity()
                swapped += 1
            elif (
                kind.endswith("Output")
                and isinstance(dense, torch.nn.Linear)
                and isinstance(getattr(child, "LayerNorm", None), torch.nn.LayerNorm)
            ):
                setattr(parent, name, _FusedResidualOutput(child))
                retired.add(id(child))
                swapped += 1
    return swapped


#: the (dense, sparse, colbert) output tensors of a batch, ``None`` for a route not asked for
_Outputs = tuple["torch.Tensor | None", "torch.Tensor | None", "torch.Tensor | None"]


class _Launched(NamedTuple):
    """A batch whose forward pass is queued: host-side ids and mask, and its output tensors.

    On GPU the outputs are pinned host tensors that a side stream is still filling; ``ready``
    is the event to wait on. On CPU they are the finished tensors and ``ready`` is ``None``.
    """

    ids: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray
    outputs: _Outputs
    ready: Any  # torch.cuda.Event | None


# /proc/cpuinfo flags of the x86 units that multiply bf16 natively: AVX512-BF16's dot product
# (Cooper Lake, Sapphire Rapids, Zen 4 and later) and AMX's bf16 tiles (Sapphire Rapids on).
_NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def _cpu_flags() -> frozenset[str] | None:
    """The CPU feature flags Linux lists in ``/proc/cpuinfo``; ``None`` where there are none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AMX or AVX512-BF16), so bf16 runs faster than fp32.

    Reads the flags of ``/proc/cpuinfo``; where there is none (not Linux), asks torch's own
    CPU capability check. Elsewhere bf16 is emulated and about 2-3x slower than fp32.
    """
    flags = _cpu_flags()
    if flags is not None:
        return bool(flags & _NATIVE_BF16_FLAGS)
    cpu = getattr(torch, "cpu", None)
    checks = (getattr(cpu, "_is_avx512_bf16_supported", None), getattr(cpu, "_is_amx_tile_supported", None))
    try:
        return any(bool(check()) for check in checks if check is not None)
    except Exception:  # a private torch helper that changed: take the safe answer
        return False


def resolve_dtype(dtype: str | None, device: str | torch.device) -> str:
    """The compute dtype an ``M3Encoder`` runs in: ``"auto"`` (or ``None``) made concrete.

    ``auto`` is fp16 on CUDA, bf16 on a CPU with native bf16 (``cpu_has_native_bf16``; 2.7x
    m3connect fp32 and 1.16x onnxruntime fp32 on a 2-core AVX512-BF16 EPYC, dense cosine to fp32
    0.99994, see benchmarks/README.md) and fp32 elsewhere (CPUs where bf16 is emulated, MPS).
    Any other value is checked and spelled canonically; ``"int8"`` is CPU only.
    """
    kind = torch.device(device).type
    name = "auto" if dtype is None else str(dtype).replace("torch.", "")
    if name == "auto":
        if kind == "cuda":
            return "float16"
        if kind == "cpu" and cpu_has_native_bf16():
            return "bfloat16"
        return "float32"
    if name == "int8":
        if kind != "cpu":
            raise InvalidInputError("dtype='int8' (dynamic quantisation) runs on CPU only")
        return name
    if name not in _DTYPES:
        raise InvalidInputError(f"dtype must be one of auto, float32, float16, bfloat16, int8; got {dtype!r}")
    return {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}.get(name, name)


def _pick_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class M3Encoder:
    """Loads a BGE-M3 checkpoint and encodes texts into all three representations.

    Args:
        model_name_or_path: hub id (``"BAAI/bge-m3"``) or a local model directory
            holding the backbone, tokenizer, ``sparse_linear.pt`` and ``colbert_linear.pt``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; ``None`` picks CUDA when present.
        dtype: ``"auto"`` (the default; ``None`` is the same) picks fp16 on GPU, bf16 on a
            CPU with native bf16 (AMX or AVX512-BF16) and fp32 on other CPUs; what it picked
            is ``compute_dtype``. ``"float32"`` matches FlagEmbedding's fp32 outputs to 1e-5;
            ``"float16"``, ``"bfloat16"``; ``"int8"`` (CPU only) quantises the linear layers
            dynamically.
        max_length: default token limit per text (CLS and EOS included), at most 8192.
        tokens_per_batch: padded-token budget of one forward pass (default per device).
        show_progress: ``True`` draws progress bars; library code stays quiet by default.
        cache_dir: hub download cache.
        compile: run the backbone through ``torch.compile`` (static shapes: each batch is padded
            to a length bucket and a power-of-two row count, and every new shape compiles once,
            tens of seconds). Opt-in, for long GPU jobs; fp32 outputs stay within 1e-5.
    """

    # On GPU, queue batch k+1 before fetching batch k's outputs, so that the device-to-host
    # copies and the host post-processing overlap the next forward pass (False: one batch at a
    # time, as on CPU; same kernels, same numbers).
    _pipeline: bool = True
    _copy_stream: Any = None  # torch.cuda.Stream for those copies, made on first use
    # The threaded pipeline (on GPU, with ``_pipeline``): texts are tokenised chunk by chunk on
    # one background thread while earlier chunks run, each chunk sorted by length (with the
    # previous chunk's unfilled last batch carried over), and every batch is finished (outputs
    # copied into ordinary memory, lexical weights) on another, so that the main thread only
    # queues forward passes. None: on GPU, for calls of more than ``_first_chunk_texts`` texts;
    # True forces it (the CPU tests exercise it that way); False: tokenise everything first and
    # finish each batch on the calling thread (on GPU still queueing batch k+1 first).
    _threaded: bool | None = None
    _pipeline_depth = 2  # batches queued and not yet finished, at most (bounds host and GPU memory)
    # The first chunk is small and its batches run at once, even unfilled, so that the GPU starts
    # soon (False: its unfilled last batch waits for the next chunk, like any other chunk's).
    _first_chunk_texts = 32
    _early_first_chunk = True
    _max_chunk_budgets = 8  # later chunks double the texts tokenised, by this many budgets at most
    # The last batch of a call runs as up to this many smaller ones of a quarter budget or more:
    # the host work left once the GPU is done (copies, lexical weights) is then that much smaller.
    _tail_pieces = 4
    # CPU bf16: run the backbone's linear layers as oneDNN matmuls with their bias, GELU and
    # residual add fused in (False: torch's plain modules; same maths, other rounding).
    _fuse_cpu: bool = True

    def __init__(
        self,
        model_name_or_path: str | os.PathLike[str] = DEFAULT_MODEL,
        *,
        device: str | torch.device | None = None,
        dtype: DTypeName | str | None = "auto",
        max_length: int = 8192,
        tokens_per_batch: int | None = None,
        show_progress: bool | None = None,
        cache_dir: str | None = None,
        compile: bool = False,
    ) -> None:
        import transformers
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.model_name = str(model_name_or_path)
        self.device = _pick_device(device)
        self.dtype_name = self._check_dtype(dtype)
        self.compiled = bool(compile)
        if self.compiled and self.dtype_name == "int8":
            raise InvalidInputError("compile=True does not apply to dtype='int8' (dynamic quantisation)")
        self.show_progress = show_progress
        path = _resolve_checkpoint(model_name_or_path, cache_dir)
        self.path = path

        try:
            config = AutoConfig.from_pretrained(path)
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as exc:
            raise ModelLoadError(f"{path} is not a loadable model directory: {exc}") from exc
        kwargs: dict[str, Any] = {"output_loading_info": True, "attn_implementation": "sdpa"}
        if config.model_type in {"xlm-roberta", "roberta", "bert"}:
            kwargs["add_pooling_layer"] = False  # the pooler is never used; skip its matmul
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()  # the unused pooler is reported as "unexpected"
        if not show_progress:
            hf_logging.disable_progress_bar()  # transformers' "Loading weights" bar
        try:
            backbone, info = AutoModel.from_pretrained(path, **kwargs)
        except Exception as exc:
            raise ModelLoadError(f"could not load the backbone weights in {path}: {exc}") from exc
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        missing = [k for k in info.get("missing_keys", []) if "pooler" not in k]
        if missing:
            raise ModelLoadError(
                f"the weights in {path} lack {len(missing)} backbone tensors (e.g. {missing[:3]}); "
                "refusing to fill them with random values"
            )
        hidden = int(config.hidden_size)
        sparse_head = _load_head(path, SPARSE_HEAD_FILE, hidden, 1)
        colbert_head = _load_head(path, COLBERT_HEAD_FILE, hidden, None)

        # transformers >= 5 takes a ready 4-d mask from these families as is; 4.x wants 2-d.
        self._pass_bias = (
            int(transformers.__version__.split(".")[0]) >= 5
            and config.model_type in {"xlm-roberta", "roberta", "bert"}
            and getattr(backbone.config, "_attn_implementation", None) in {"sdpa", "eager"}
        )
        self.config = config
        self.hidden_size = hidden
        self.colbert_dim = colbert_head.out_features
        self.vocab_size = int(config.vocab_size)
        limit = int(getattr(config, "max_position_embeddings", 514)) - 2  # RoBERTa offsets positions by 2
        self.model_max_length = limit
        if not 2 <= max_length <= limit:
            raise InvalidInputError(f"max_length must be in [2, {limit}] for this model, got {max_length}")
        self.max_length = max_length
        self.tokens_per_batch = tokens_per_batch or self._default_token_budget(config)
        # Read once: the tokenizer's Rust side must not be borrowed by the main thread while the
        # tokenising thread may reconfigure it (pad_token_id is a lookup in the Rust vocabulary).
        self._pad_id: Any = self.tokenizer.pad_token_id
        self._special_ids = np.array(
            sorted(
                {
                    i
                    for i in (
                        self.tokenizer.cls_token_id,
                        self.tokenizer.eos_token_id,
                        self.tokenizer.pad_token_id,
                        self.tokenizer.unk_token_id,
                    )
                    if i is not None
                }
            ),
            dtype=np.int64,
        )
        self.fingerprint = self._fingerprint(path, config)

        self._backbone = backbone.eval()
        self._sparse_head = sparse_head.eval()
        self._colbert_head: torch.nn.Module = colbert_head.eval()
        self._place_modules()
        self._run_backbone: Any = self._backbone
        if self.compiled:
            self._run_backbone = self._compile_backbone()

    # -- set-up -----------------------------------------------------------------------------

    def _check_dtype(self, dtype: str | None) -> str:
        name = resolve_dtype(dtype, self.device)
        if dtype is None or str(dtype) == "auto":
            logger.info("dtype='auto' on %s: computing in %s", self.device, name)
        return name

    def _place_modules(self) -> None:
        modules = (self._backbone, self._sparse_head, self._colbert_head)
        self.fused_linears = 0
        if self.dtype_name == "int8":
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

            # One weight scale per output row rather than per matrix: about half the error
            # (dense cosine to fp32 ~0.9993 instead of ~0.9986 on random test models), same speed.
            spec = {torch.nn.Linear: per_channel_dynamic_qconfig}
            self._backbone = quantize_dynamic(self._backbone, spec, dtype=torch.qint8)
            self._colbert_head = quantize_dynamic(torch.nn.Sequential(self._colbert_head), spec, dtype=torch.qint8)
            return
        dtype = _DTYPES[self.dtype_name]
        for module in modules:
            module.to(device=self.device, dtype=dtype)
        # bf16 on CPU: bias, GELU and residual add inside oneDNN's matmul (~1.3x the tokens/s of
        # torch's unfused bf16 modules on a 2-core AVX512-BF16 VM at the same token budget).
        # fp32 keeps torch's own kernels, which are FlagEmbedding's, for exact parity.
        fuse = self._fuse_cpu and not self.compiled  # torch.compile does its own fusing
        if fuse and self.device.type == "cpu" and dtype == torch.bfloat16 and _onednn_fusion_works(dtype):
            self.fused_linears = _fuse_cpu_linears(self._backbone, self.config)
            self._colbert_head = _FusedLinear(cast(torch.nn.Linear, self._colbert_head))  # still the loaded Linear

    def _compile_backbone(self) -> Any:
        import torch._dynamo

        # Each (rows, width) bucket is one static graph; the default limit (8) would send the
        # 9th shape back to eager mode. This is a process-wide setting; it is only ever raised.
        cfg = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, name) and getattr(cfg, name) < _COMPILE_RECOMPILE_LIMIT:
                setattr(cfg, name, _COMPILE_RECOMPILE_LIMIT)
        return torch.compile(self._backbone, dynamic=False)

    def _compile_width(self, width: int) -> int:
        """The padded width of a batch whose longest text has ``width`` tokens (compile=True)."""
        bucket = next((b for b in _COMPILE_WIDTHS if b >= width), width)
        return max(width, min(bucket, self.model_max_length))

    def _default_token_budget(self, config: Any) -> int:
        budget = _DEFAULT_TOKEN_BUDGET.get(self.device.type, _DEFAULT_TOKEN_BUDGET["cpu"])
        if self.device.type != "cpu":
            return budget
        width = int(getattr(config, "intermediate_size", 0) or 4 * int(config.hidden_size))
        itemsize = 4 if self.dtype_name == "int8" else _DTYPES[self.dtype_name].itemsize  # int8: fp32 activations
        cap = _CPU_ACTIVATION_BYTES_BF16 if self.dtype_name == "bfloat16" else _CPU_ACTIVATION_BYTES
        return max(_CPU_MIN_TOKEN_BUDGET, min(budget, cap // (width * itemsize)))

    @staticmethod
    def _fingerprint(path: Path, config: Any) -> str:
        """Short id of the weights: a store refuses to mix vectors of two models."""
        digest = hashlib.sha256()
        digest.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
        for name in (SPARSE_HEAD_FILE, COLBERT_HEAD_FILE):
            digest.update((path / name).read_bytes())
        return digest.hexdigest()[:16]

    @property
    def dense_dim(self) -> int:
        """Length of the dense vector (the backbone's hidden size)."""
        return self.hidden_size

    @property
    def compute_dtype(self) -> str:
        """The precision the forward pass runs in (what ``dtype="auto"`` resolved to)."""
        return self.dtype_name

    # -- tokens -----------------------------------------------------------------------------

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry of a token id."""
        return str(self.tokenizer.convert_ids_to_tokens(int(token_id)))

    def token_to_id(self, token: str) -> int:
        """The id of a vocabulary entry (the unk id when it is unknown)."""
        return int(cast(int, self.tokenizer.convert_tokens_to_ids(token)))  # one token: one id

    def convert_id_to_token(self, lexical_weights: dict[int, float]) -> dict[str, float]:
        """Readable lexical weights: ``{decoded token: weight}``, like FlagEmbedding's."""
        return {cast(str, self.tokenizer.decode([int(i)])): w for i, w in lexical_weights.items()}

    def _tokenize(self, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], list[int]]:
        """Token ids per text, truncated to ``max_length``; also the indices that were cut."""
        # One extra token tells truncated texts apart without a second tokenisation.
        enc = self.tokenizer(
            list(texts),
            truncation=True,
            max_length=max_length + 1,
            add_special_tokens=True,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        eos = self.tokenizer.eos_token_id
        ids: list[list[int]] = enc["input_ids"]
        truncated: list[int] = []
        for i, row in enumerate(ids):
            if len(row) > max_length:
                ids[i] = row[: max_length - 1] + [eos]
                truncated.append(i)
        return ids, truncated

    # -- encoding ---------------------------------------------------------------------------

    @staticmethod
    def _check_texts(texts: Any) -> list[str]:
        if isinstance(texts, str):
            raise InvalidTypeError("encode() takes a list of strings, not a single string; wrap it: [text]")
        try:
            items = list(texts)
        except TypeError as exc:
            raise InvalidTypeError(f"texts must be a list of strings, got {type(texts).__name__}") from exc
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise InvalidTypeError(f"texts[{i}] is {type(item).__name__}, not str")
        return items

    def _batches(
        self,
        lengths: np.ndarray,
        order: np.ndarray,
        batch_size: int | None,
        rest: list[np.ndarray] | None = None,
        tail_pieces: int = 1,
    ) -> Iterator[np.ndarray]:
        """Cut length-sorted indices into batches by a padded-token budget.

        With ``rest`` given, a last batch that would not be full is not yielded but appended to
        ``rest`` (the threaded pipeline sorts it in with the next chunk of texts). Otherwise, with
        ``tail_pieces`` > 1, the last batch is cut into up to that many of a quarter budget or more.
        """
        start = 0
        n = len(order)
        while start < n:
            longest = int(lengths[order[start]])
            if self.compiled:
                longest = self._compile_width(longest)
            count = max(1, self.tokens_per_batch // max(longest, 1))  # read per batch: OOM lowers it
            if batch_size:
                count = min(count, batch_size)
            if rest is not None and start + count > n:
                rest.append(order[start:])
                return
            pieces = min(tail_pieces, (n - start) * longest * 4 // self.tokens_per_batch)
            if pieces > 1 and start + count >= n:
                size = -(-(n - start) // pieces)
                if self.compiled:  # compiled batches are padded to a power-of-two rows: no waste
                    size = 1 << (size - 1).bit_length()
                yield from (order[i : i + size] for i in range(start, n, size))
                return
            if not self.compiled and count > 1:  # compiled batches keep their static shapes
                count = self._padding_aware_count(lengths[order[start : start + count]])
            yield order[start : start + count]
            start += count

    def _padding_aware_count(self, sorted_lengths: np.ndarray) -> int:
        """How many of these length-sorted texts (longest first, all within the budget) to batch.

        A batch pads every text to its longest, so a wide spread of lengths wastes work: a
        server's call of ~50 mixed texts padded to ~1.46x its tokens in budget-filling batches.
        The batch taken is the prefix with the best ratio of real tokens to padded tokens plus a
        fixed per-batch cost of 1/16 budget (fewer, larger batches win ties; equal lengths keep
        the whole budget), which brought that call to ~1.15x.
        """
        real = np.cumsum(sorted_lengths)
        padded = int(sorted_lengths[0]) * np.arange(1, len(sorted_lengths) + 1)
        efficiency = real / (self.tokens_per_batch / 16 + padded)
        return len(efficiency) - int(np.argmax(efficiency[::-1]))  # the last of equal maxima

    @torch.inference_mode()
    def _forward(
        self, rows: list[list[int]], want_dense: bool, want_sparse: bool, want_colbert: bool
    ) -> tuple[np.ndarray | None, list[dict[int, float]] | None, list[np.ndarray] | None]:
        """Encode one padded batch and post-process it on the host, vectorised."""
        return self._finish(self._launch(rows, want_dense, want_sparse, want_colbert))

    @torch.inference_mode()
    def _launch(self, rows: list[list[int]], want_dense: bool, want_sparse: bool, want_colbert: bool) -> _Launched:
        """Pad one batch and run (on GPU: queue) its forward pass, heads and copies to the host."""
        n = len(rows)
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=n)
        width = int(lengths.max())
        padded_rows = n
        if self.compiled:  # static shapes: bucketed width, power-of-two rows (within the budget)
            width = self._compile_width(width)
            padded_rows = max(n, min(1 << (n - 1).bit_length(), self.tokens_per_batch // width))
        ids = np.full((padded_rows, width), self._pad_id, dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
        all_lengths = np.concatenate([lengths, np.ones(padded_rows - n, np.int64)])
        ids[n:, 0] = rows[0][0]  # filler rows: one (CLS) token each, never an all-masked row
        mask_np = np.arange(width)[None, :] < all_lengths[:, None]
        input_ids = self._to_device(torch.from_numpy(ids))
        if int(lengths.min()) == width and not self.compiled:
            mask = None  # nothing padded: SDPA's unmasked kernel
        elif self._pass_bias:
            mask = self._attention_bias(mask_np)
        else:
            mask = self._to_device(torch.from_numpy(mask_np.astype(np.int64)))
        hidden = self._run_backbone(input_ids=input_ids, attention_mask=mask).last_hidden_state
        if padded_rows > n:
            hidden, ids, mask_np = hidden[:n], ids[:n], mask_np[:n]

        dense = sparse = colbert = None
        if want_dense:
            # Normalise in fp32: a bf16/fp16 norm leaves vectors up to ~0.5% off unit length.
            dense = torch.nn.functional.normalize(hidden[:, 0].float(), dim=-1)
        if want_sparse:
            sparse = torch.relu(self._sparse_head(hidden)).squeeze(-1).float()
        if want_colbert:
            colbert = torch.nn.functional.normalize(self._colbert_head(hidden[:, 1:]).float(), dim=-1)
        outputs = (dense, sparse, colbert)
        ready = None
        if self.device.type == "cuda":
            outputs, ready = self._copy_to_host(outputs)
        return _Launched(ids, mask_np, lengths, outputs, ready)

    def _finish(
        self, batch: _Launched, helper: ThreadPoolExecutor | None = None
    ) -> tuple[np.ndarray | None, list[dict[int, float]] | None, list[np.ndarray] | None]:
        """Wait for a launched batch's outputs and turn them into per-text host results.

        With ``helper`` (a GPU batch with ColBERT and sparse outputs), the ColBERT vectors are
        copied out on that thread while this one computes the lexical weights.
        """
        dense_t, sparse_t, colbert_t = batch.outputs
        if helper is None or batch.ready is None or colbert_t is None or sparse_t is None:
            return self._post_process(batch, self._fetch(batch))
        vecs = helper.submit(self._fetch, batch._replace(outputs=(None, None, colbert_t)))
        try:
            dense, sparse, _ = self._post_process(batch, self._fetch(batch._replace(outputs=(dense_t, sparse_t, None))))
        finally:
            colbert = vecs.result()[2]  # waited for even on an error: the copy uses the batch's memory
        return dense, sparse, self._post_process(batch, [None, None, colbert])[2]

    def _fetch(self, batch: _Launched) -> list[np.ndarray | None]:
        """Wait for a launched batch; its (dense, sparse, colbert) outputs as ordinary host arrays."""
        if batch.ready is None:
            return [None if t is None else t.cpu().numpy() for t in batch.outputs]
        # Out of the pinned staging buffers into ordinary memory (a multi-threaded copy), so that
        # results kept by the caller never hold page-locked memory. The destinations are made
        # and paged in before the wait, while the GPU still works on this batch.
        hosts = [None if t is None else self._host_buffer(t) for t in batch.outputs]
        batch.ready.synchronize()
        for host, t in zip(hosts, batch.outputs):
            if host is not None and t is not None:
                torch.from_numpy(host).copy_(t)
        return hosts

    @staticmethod
    def _host_buffer(t: torch.Tensor) -> np.ndarray:
        """An uninitialised pageable array for ``t``'s values, its pages already faulted in.

        numpy rather than torch allocates it: numpy asks the kernel for transparent huge pages
        on large blocks (``madvise``), torch does not, and faulting in a batch's 268 MB of ColBERT
        vectors page by page cost ~90 ms on a 2-core VM (numpy's: ~8 ms).
        """
        out = np.empty(tuple(t.shape), dtype=torch.empty((), dtype=t.dtype).numpy().dtype)
        if out.nbytes >= 64 * _PAGE_BYTES:
            out.reshape(-1).view(np.uint8)[::_PAGE_BYTES] = 0  # one write per page faults it in
        return out

    def _post_process(
        self, batch: _Launched, arrays: list[np.ndarray | None]
    ) -> tuple[np.ndarray | None, list[dict[int, float]] | None, list[np.ndarray] | None]:
        """Per-text results of a batch from its host arrays: lexical weights, ColBERT slices."""
        dense, weights, vecs = arrays
        sparse = colbert = None
        if weights is not None:
            sparse = lexical_weights(batch.ids, batch.mask, weights, self._special_ids)
        if vecs is not None:
            colbert = [vecs[i, : batch.lengths[i] - 1] for i in range(len(batch.lengths))]
        return dense, sparse, colbert

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            # From pageable memory a copy waits for the GPU queue to drain, which would stop
            # the next batch being queued while the previous one still runs.
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _copy_to_host(self, outputs: _Outputs) -> tuple[_Outputs, Any]:
        """Queue copies of a batch's GPU outputs into pinned host tensors on a side stream.

        The copies run beside the next batch's forward pass (queued before ``_finish`` waits on
        the returned event), at full DMA speed rather than through pageable staging.
        """
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        stream = self._copy_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        host: list[torch.Tensor | None] = []
        with torch.cuda.stream(stream):
            for t in outputs:
                if t is None:
                    host.append(None)
                    continue
                staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                staged.copy_(t, non_blocking=True)
                t.record_stream(stream)  # its memory is not reused before the copy is done
                host.append(staged)
            ready = torch.cuda.Event()
            ready.record(stream)
        return cast(_Outputs, tuple(host)), ready  # one per output

    def _attention_bias(self, mask: np.ndarray) -> torch.Tensor:
        """Padding mask as the additive ``[batch, 1, 1, keys]`` bias attention adds to its scores.

        Built once per batch in the compute dtype: given a 2-d mask, transformers builds a
        boolean ``[batch, 1, q, k]`` mask that SDPA then converts to this same 0 / -inf bias
        again in every layer. The attention scores are identical either way.
        """
        dtype = torch.float32 if self.dtype_name == "int8" else _DTYPES[self.dtype_name]
        bias = torch.zeros(mask.shape, dtype=dtype)
        bias.masked_fill_(torch.from_numpy(~mask), float("-inf"))
        return self._to_device(bias[:, None, None, :])

    def _forward_resilient(
        self, rows: list[list[int]], flags: tuple[bool, bool, bool]
    ) -> list[tuple[np.ndarray | None, dict[int, float] | None, np.ndarray | None]]:
        """Run a batch; on GPU out-of-memory split it in two and retry just this batch."""
        try:
            dense, sparse, colbert = self._forward(rows, *flags)
        except torch.cuda.OutOfMemoryError:
            if len(rows) == 1:
                raise
            torch.cuda.empty_cache()
            self.tokens_per_batch = max(1, self.tokens_per_batch // 2)
            logger.warning("GPU out of memory; token budget lowered to %d", self.tokens_per_batch)
            half = len(rows) // 2
            return self._forward_resilient(rows[:half], flags) + self._forward_resilient(rows[half:], flags)
        return self._per_text(dense, sparse, colbert, len(rows))

    @staticmethod
    def _per_text(
        dense: np.ndarray | None, sparse: list[dict[int, float]] | None, colbert: list[np.ndarray] | None, n: int
    ) -> list[tuple[np.ndarray | None, dict[int, float] | None, np.ndarray | None]]:
        return [
            (
                None if dense is None else dense[i],
                None if sparse is None else sparse[i],
                None if colbert is None else colbert[i],
            )
            for i in range(n)
        ]

    def _launch_or_none(self, rows: list[list[int]], flags: tuple[bool, bool, bool]) -> _Launched | None:
        """Queue a batch; ``None`` on GPU out-of-memory (the caller then runs it the resilient way)."""
        try:
            return self._launch(rows, *flags)
        except torch.cuda.OutOfMemoryError:
            return None

    def encode(
        self,
        texts: Sequence[str],
        *,
        batch_size: int | None = None,
        max_length: int | None = None,
        return_dense: bool = True,
        return_sparse: bool = True,
        return_colbert: bool = True,
        show_progress: bool | None = None,
    ) -> EncodeOutput:
        """Encode texts into dense, sparse and ColBERT representations in one pass.

        Args:
            texts: strings; an empty string is valid, a non-string is a ``TypeError``.
            batch_size: cap on texts per forward pass (the token budget still applies).
            max_length: token limit per text; longer texts are truncated and listed in
                ``EncodeOutput.truncated``.
            return_dense / return_sparse / return_colbert: skip what you do not need.
            show_progress: overrides the encoder's progress setting.
        """
        items = self._check_texts(texts)
        max_len = self.max_length if max_length is None else int(max_length)
        if not 2 <= max_len <= self.model_max_length:
            raise InvalidInputError(f"max_length must be in [2, {self.model_max_length}], got {max_len}")
        if batch_size is not None and batch_size < 1:
            raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
        n = len(items)
        flags = (return_dense, return_sparse, return_colbert)
        if n == 0:
            return EncodeOutput(
                dense=np.zeros((0, self.dense_dim), np.float32) if return_dense else None,
                sparse=[] if return_sparse else None,
                colbert=[] if return_colbert else None,
            )
        results: list[Any] = [None] * n
        progress = show_progress if show_progress is not None else self.show_progress
        bar = tqdm(
            total=n,
            desc="Encoding",
            unit="text",
            disable=not progress,  # a library draws nothing unless asked
        )
        pipelined = self.device.type == "cuda" and self._pipeline
        # Auto: not for a call of one first chunk or less (nothing to overlap the tokenising
        # with, and the threads' start-up would only add latency to a short call).
        threaded = (pipelined and n > self._first_chunk_texts) if self._threaded is None else self._threaded

        def collect(batch: np.ndarray, outs: list[Any]) -> None:
            for i, out in zip(batch.tolist(), outs):
                results[i] = out
            bar.update(len(batch))

        with bar:
            if threaded:
                lengths, truncated = self._encode_threaded(items, max_len, batch_size, flags, collect)
            else:
                lengths, truncated = self._encode_serial(items, max_len, batch_size, flags, collect, pipelined)
        return EncodeOutput(
            dense=np.stack([r[0] for r in results]).astype(np.float32, copy=False) if return_dense else None,
            sparse=[r[1] for r in results] if return_sparse else None,
            colbert=[r[2] for r in results] if return_colbert else None,
            num_tokens=lengths.tolist(),
            truncated=truncated,
        )

    def _encode_serial(
        self,
        items: list[str],
        max_len: int,
        batch_size: int | None,
        flags: tuple[bool, bool, bool],
        collect: Callable[[np.ndarray, list[Any]], None],
        pipelined: bool,
    ) -> tuple[np.ndarray, list[int]]:
        """Tokenise everything, then run the batches from the longest texts down on this thread.

        ``pipelined`` (GPU): batch k+1 is queued before batch k's outputs are fetched.
        """
        ids, truncated = self._tokenize(items, max_len)
        lengths = np.fromiter((len(r) for r in ids), dtype=np.int64, count=len(ids))
        order = np.argsort(-lengths, kind="stable")
        pending: tuple[np.ndarray, _Launched] | None = None  # queued, outputs not fetched yet
        for batch in self._batches(lengths, order, batch_size):
            rows = [ids[i] for i in batch]
            launched = self._launch_or_none(rows, flags) if pipelined else None
            if pending is not None:  # fetch the previous batch while this one runs
                collect(pending[0], self._per_text(*self._finish(pending[1]), len(pending[0])))
                pending = None
            if launched is not None:
                pending = (batch, launched)
            else:
                collect(batch, self._forward_resilient(rows, flags))
        if pending is not None:
            collect(pending[0], self._per_text(*self._finish(pending[1]), len(pending[0])))
        return lengths, truncated

    def _tokenized_chunks(
        self, items: list[str], max_len: int, pool: ThreadPoolExecutor
    ) -> Iterator[tuple[int, list[list[int]], list[int]]]:
        """``(first index, ids, truncated indices within the chunk)`` chunk by chunk.

        The next chunk is tokenised on ``pool`` while the caller works on this one (the fast
        tokenizer releases the GIL). Chunks grow: ``_first_chunk_texts`` texts, then one token
        budget's worth (at the mean length seen so far), then each chunk doubles the tokens
        tokenised in all, adding ``_max_chunk_budgets`` budgets at most.
        """
        n = len(items)
        start, size = 0, min(n, self._first_chunk_texts)
        future = pool.submit(self._tokenize, items[:size], max_len)
        texts_seen = tokens_seen = target = 0  # target: tokens tokenised in all after the next chunk
        while True:
            ids, truncated = future.result()
            end = start + len(ids)
            if end < n:  # queue the next chunk before handing this one over
                texts_seen += len(ids)
                tokens_seen += sum(len(r) for r in ids)
                budget = self.tokens_per_batch
                grow = min(target, self._max_chunk_budgets * budget)
                target = target + grow if target else tokens_seen + budget
                per_text = max(1.0, tokens_seen / texts_seen)
                size = max(self._first_chunk_texts, int((target - tokens_seen) / per_text + 0.999))
                future = pool.submit(self._tokenize, items[end : end + size], max_len)
            yield start, ids, truncated
            if end >= n:
                return
            start = end

    def _encode_threaded(
        self,
        items: list[str],
        max_len: int,
        batch_size: int | None,
        flags: tuple[bool, bool, bool],
        collect: Callable[[np.ndarray, list[Any]], None],
    ) -> tuple[np.ndarray, list[int]]:
        """The threaded pipeline (see ``_threaded``): this thread only cuts and queues batches.

        Batches are cut as in ``_encode_serial`` but from each chunk (plus the texts the previous
        chunk left over) sorted by length, so every batch is full but those of the first chunk
        (``_early_first_chunk``) and the last ones (``_tail_pieces``). At most ``_pipeline_depth``
        batches are queued and not yet finished.
        """
        n = len(items)
        ids: list[list[int]] = []
        lengths = np.zeros(n, dtype=np.int64)
        truncated: list[int] = []
        depth = max(1, int(self._pipeline_depth))
        in_flight: deque[tuple[np.ndarray, Future[list[Any]]]] = deque()

        def finish(launched: _Launched, count: int) -> list[Any]:
            return self._per_text(*self._finish(launched, copying), count)

        def drain(keep: int) -> None:
            while len(in_flight) > keep:
                batch, future = in_flight.popleft()
                collect(batch, future.result())

        tokenizing = ThreadPoolExecutor(1, thread_name_prefix="m3connect-tokenize")
        finishing = ThreadPoolExecutor(1, thread_name_prefix="m3connect-finish")
        copying = ThreadPoolExecutor(1, thread_name_prefix="m3connect-copy")  # ColBERT copies
        try:
            left: np.ndarray = np.zeros(0, dtype=np.int64)  # indices not batched yet
            for start, chunk, cut in self._tokenized_chunks(items, max_len, tokenizing):
                end = start + len(chunk)
                ids.extend(chunk)
                lengths[start:end] = [len(r) for r in chunk]
                truncated.extend(start + i for i in cut)
                pool = np.concatenate([left, np.arange(start, end, dtype=np.int64)])
                order = pool[np.argsort(-lengths[pool], kind="stable")]  # ties: lower index first
                final = end >= n
                rest: list[np.ndarray] | None = None if final or (start == 0 and self._early_first_chunk) else []
                tail = int(self._tail_pieces) if final else 1
                for batch in self._batches(lengths, order, batch_size, rest, tail):
                    rows = [ids[i] for i in batch]
                    launched = self._launch_or_none(rows, flags)
                    if launched is None:  # GPU out of memory: free what is queued, then split
                        drain(0)
                        collect(batch, self._forward_resilient(rows, flags))
                        continue
                    in_flight.append((batch, finishing.submit(finish, launched, len(batch))))
                    drain(depth - 1)
                left = rest[0] if rest else np.zeros(0, dtype=np.int64)
            drain(0)
        finally:
            tokenizing.shutdown(wait=True, cancel_futures=True)
            finishing.shutdown(wait=True, cancel_futures=True)
            copying.shutdown(wait=True, cancel_futures=True)
        return lengths, truncated

    def encode_one(self, text: str, *, max_length: int | None = None) -> Vectors:
        """All three representations of a single text (e.g. a query)."""
        return self.encode([text], max_length=max_length, show_progress=False).item(0)

    def compute_score(
        self,
        pairs: Sequence[tuple[str, str]],
        weights: Sequence[float] = (1.0, 1.0, 1.0),
        *,
        max_query_length: int = 512,
        max_passage_length: int = 512,
        batch_size: int | None = None,
    ) -> dict[str, list[float]]:
        """Score ``(query, passage)`` pairs like FlagEmbedding's ``compute_score``.

        Returns lists under ``"dense"``, ``"sparse"``, ``"colbert"``, ``"sparse+dense"`` and
        ``"colbert+sparse+dense"``. ``weights`` are ``(dense, sparse, colbert)``.
        """
        w = scoring.validate_weights(weights)
        pair_list = scoring.check_pairs(pairs)
        queries = self.encode([p[0] for p in pair_list], max_length=max_query_length, batch_size=batch_size)
        passages = self.encode([p[1] for p in pair_list], max_length=max_passage_length, batch_size=batch_size)
        return scoring.score_pairs(queries, passages, w)

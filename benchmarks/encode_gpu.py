"""GPU encoding throughput and model FLOP utilisation: m3connect's ``M3Encoder`` against
FlagEmbedding's M3 embedder, in one run, on a random checkpoint of BGE-M3's true shape.

Checkpoint: ``make_tiny_checkpoint`` with BGE-M3's width and depth (hidden 1024, 24 layers,
16 heads, feed-forward 4096, ColBERT dim 1024, positions up to 8194), ``initializer_range=0.02``.
Its toy tokenizer is trained on the bundled sample texts, so its vocabulary is a few hundred
pieces, not 250,002, and the embedding matrix has that many rows (``make_tiny_checkpoint`` sizes
it from the tokenizer). That changes no FLOP count that matters: the embedding is a row lookup.
Speed does not depend on the weight values.

Rows, each returning all three outputs (dense, sparse, ColBERT) for every text:

* ``flagembedding-fp16``: FlagEmbedding's ``M3Embedder(path, use_fp16=True, devices="cuda:0")``
  (what ``BGEM3FlagModel`` is), ``encode(texts, batch_size=256, max_length=L,
  return_dense=True, return_sparse=True, return_colbert_vecs=True)``: its default batch size.
* ``m3connect-fp16`` / ``m3connect-bf16``: ``M3Encoder(path, device="cuda", dtype=...)``,
  ``encode(texts, max_length=L)`` (default 65,536-token batches; the threaded pipeline:
  texts tokenised chunk by chunk on a background thread while earlier chunks run, each batch's
  outputs fetched and post-processed on a worker thread while the calling thread queues the next).
* ``m3connect-bf16-compile`` (with ``--compile``): ``M3Encoder(..., dtype="bfloat16", compile=True)``,
  the backbone through ``torch.compile`` (static shapes: length buckets, power-of-two rows); its
  compile time is spent in the warm-up, outside the timing, and reported. The results then go to
  ``encode-gpu-compile-<card>.json/md`` so that a full run's files are kept.
* ``m3connect-fp16-serial`` (one length only, ``--serial-length``; 0 leaves it out): the same
  encoder with all overlap switched off (``enc._pipeline = False``: one batch at a time).

For each max_length L (default 128, 512, 8192) the corpus is synthetic text of ~1.2 L tokens per
text (words per text from the toy tokenizer's measured tokens per word), so nearly every text is
cut at exactly L tokens (CLS and EOS included; the JSON's ``texts_cut_at_max_length`` says how
many: 766 of 768 at L=512 on the H200); tokens/s counts
tokens after truncation. Each row is warmed up on the same texts once, then the rows are timed
round-robin (``torch.cuda.synchronize`` before and after each ``encode``), and the best of
``--reps`` repetitions is reported (medians in the JSON). Tokenisation, host post-processing and
copies to the host are all inside the timing: it is the wall time of ``encode``.

Model FLOPs (forward pass, multiply-add = 2 FLOPs) of a text of n tokens, for hidden size h,
feed-forward size f, l layers and ColBERT dim c:

    n * [ l * (8 h^2 + 4 h f)      # Q, K, V, O projections (4 h^2) and the two FFN matmuls (2 h f)
          + 2 h (c + 1) ]          # ColBERT and sparse heads
    + l * 4 h n^2                  # attention: Q K^T and P V, 2 n^2 h each

For BGE-M3 (h=1024, f=4096, l=24) that is 0.604 GFLOP/token in the matmuls, + 0.050 at n=512
for attention (0.654 in all; 0.656 with the heads), and 1.41 GFLOP/token at n=8192.
Padding FLOPs are not counted (n is each text's own length).
MFU = model FLOPs / wall time / the card's dense fp16/bf16 tensor-core peak from its datasheet
(H100 SXM and H200: 989.4 TFLOP/s; ``--peak-tflops`` overrides). A measured 8192^3 matmul rate
and the bare backbone forward (no tokenisation, heads or host work, 65,536-token batches) are
reported beside it, to show where the time goes.

Parity: max abs difference of m3connect fp16 against FlagEmbedding fp16 (dense, sparse, ColBERT)
on the timed corpora, and dense cosine of fp16 / bf16 (both libraries) against an fp32 run of
m3connect on a few texts.

    python3 benchmarks/encode_gpu.py                          # full run on the GPU, ~100 s on an H200
    .venv/bin/python benchmarks/encode_gpu.py --device cpu --quick --out /tmp/x   # smoke, seconds
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import platform
import re
import socket
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # FlagEmbedding's progress bars would flood the log

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from m3connect import M3Encoder  # noqa: E402
from m3connect.testing import make_tiny_checkpoint, synthetic_corpus  # noqa: E402

FULL_SHAPE = dict(
    hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096, vocab_size=250002, initializer_range=0.02
)
QUICK_SHAPE = dict(
    hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256, vocab_size=1000, initializer_range=0.02
)
FULL_LENGTHS = (128, 512, 8192)
QUICK_LENGTHS = (32, 128)
FULL_TOKENS = 393_216  # tokens per corpus and length: 3072 x 128, 768 x 512; L=8192: 32 texts
QUICK_TOKENS = 4096
FLAG = "flagembedding-fp16"
M3_ROWS = {"m3connect-fp16": "float16", "m3connect-bf16": "bfloat16"}
SERIAL = "m3connect-fp16-serial"
COMPILED = "m3connect-bf16-compile"
FLAG_BATCH = 256  # FlagEmbedding's default
BACKBONE_TOKENS = 65536  # = m3connect's default CUDA token budget
N_FP32_TEXTS = 16
TARGET_MFU = 0.5
# Dense (no sparsity) fp16/bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s.
PEAKS = [
    (r"H100.*(PCIe)", 756.0),
    (r"H100.*NVL", 835.0),
    (r"H100", 989.4),
    (r"H200.*NVL", 835.0),
    (r"H200", 989.4),
    (r"GH200", 989.4),
    (r"B200", 2250.0),
    (r"A100", 312.0),
    (r"L40S", 362.0),
    (r"\bL4\b", 121.0),
    (r"A10G", 70.0),
    (r"\bA10\b", 125.0),
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- machine ----------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "unknown"


def _versions() -> dict[str, str]:
    import transformers

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "transformers": transformers.__version__,
        "numpy": np.__version__,
    }
    try:  # never import the package itself: its __init__ breaks with transformers 5
        from importlib.metadata import version

        out["FlagEmbedding"] = version("FlagEmbedding")
    except Exception:
        out["FlagEmbedding"] = "?"
    return out


def _machine(device: torch.device) -> dict[str, Any]:
    m: dict[str, Any] = {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "hostname": socket.gethostname(),
        **_versions(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        m.update(
            card=torch.cuda.get_device_name(device),
            sm_count=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
        )
    else:
        m["card"] = "cpu"
    return m


def _peak_tflops(card: str, override: float | None) -> float | None:
    if override:
        return override
    for pattern, peak in PEAKS:
        if re.search(pattern, card):
            return peak
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 8192, reps: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


# -- FLOPs ------------------------------------------------------------------------------------


def text_flops(n: int, cfg: dict[str, int]) -> float:
    """Forward FLOPs of one text of ``n`` tokens (formula in the module docstring)."""
    h, f, layers, c = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_layers"], cfg["colbert_dim"]
    per_token = layers * (8 * h * h + 4 * h * f) + 2 * h * (c + 1)
    return float(n * per_token + layers * 4 * h * n * n)


def corpus_flops(num_tokens: list[int], cfg: dict[str, int]) -> float:
    return sum(text_flops(n, cfg) for n in num_tokens)


# -- encoders ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _flag_class() -> tuple[Any, str | None]:
    """FlagEmbedding's M3Embedder, loaded bare as the tests do (``tests/flag_reference.py``)."""
    note = None
    try:
        import datasets  # noqa: F401  (FlagEmbedding's fine-tuning modules import it)
    except Exception as exc:  # not installed (or broken) here: the inference path never uses it
        # FlagEmbedding's fine-tuning modules only name datasets.Dataset etc. in annotations at
        # import time; a stand-in whose every attribute is an empty class is enough.
        import importlib.machinery

        def placeholder(name: str) -> type:
            if name.startswith("_"):
                raise AttributeError(name)
            return type(name, (), {})

        stub = types.ModuleType("datasets")
        stub.__spec__ = importlib.machinery.ModuleSpec("datasets", None)
        stub.__getattr__ = placeholder  # type: ignore[method-assign]
        sys.modules["datasets"] = stub
        note = (
            f"the datasets package is not installed here ({type(exc).__name__}); FlagEmbedding's fine-tuning "
            "modules import it, its inference path never uses it: a stand-in module was used"
        )
    from tests.flag_reference import flag_m3_embedder_class

    return flag_m3_embedder_class(), note


class FlagRow:
    def __init__(self, path: Path, device: torch.device) -> None:
        cls, self.note = _flag_class()
        dev = "cuda:0" if device.type == "cuda" else "cpu"
        self.model = cls(str(path), use_fp16=True, devices=dev)
        self.device = device
        inner = self.model.model
        forward = inner.forward
        self.calls: list[float] = []

        def timed_forward(*a: Any, **kw: Any) -> Any:  # the first call of each encode is its batch probe
            _sync(device)
            t0 = time.perf_counter()
            try:
                return forward(*a, **kw)
            finally:
                _sync(device)
                self.calls.append(time.perf_counter() - t0)

        inner.forward = timed_forward

    def __call__(self, texts: list[str], max_length: int) -> dict[str, Any]:
        self.calls.clear()
        out = self.model.encode(
            texts,
            batch_size=FLAG_BATCH,
            max_length=max_length,
            return_dense=True,
            return_sparse=True,
            return_colbert_vecs=True,
        )
        return {
            "dense": np.asarray(out["dense_vecs"], np.float32),
            "sparse": out["lexical_weights"],
            "colbert": list(out["colbert_vecs"]),
            "num_tokens": [len(c) + 1 for c in out["colbert_vecs"]],  # ColBERT drops CLS only
            "probe_seconds": self.calls[0] if self.calls else 0.0,
        }


class M3Row:
    def __init__(
        self, path: Path, device: torch.device, dtype: str, pipeline: bool = True, compile: bool = False
    ) -> None:
        self.enc = M3Encoder(path, device=str(device), dtype=dtype, show_progress=False, compile=compile)
        if not pipeline:
            self.enc._pipeline = False
        self.note = None

    def __call__(self, texts: list[str], max_length: int) -> dict[str, Any]:
        out = self.enc.encode(texts, max_length=max_length)
        return {"dense": out.dense, "sparse": out.sparse, "colbert": out.colbert, "num_tokens": out.num_tokens}


# -- measurements -----------------------------------------------------------------------------


def _time_rows(
    runners: dict[str, Callable[[list[str], int], dict[str, Any]]],
    texts: list[str],
    max_length: int,
    reps: int,
    device: torch.device,
) -> tuple[dict[str, dict[str, list[float]]], dict[str, dict[str, Any]], dict[str, str]]:
    errors: dict[str, str] = {}
    names = []
    warmup: dict[str, float] = {}
    for name, run in runners.items():
        try:
            _sync(device)
            t0 = time.perf_counter()
            run(texts, max_length)
            _sync(device)
            warmup[name] = time.perf_counter() - t0
            log(f"  L={max_length} warm-up {name:<22} {warmup[name]:7.2f} s")
            names.append(name)
        except Exception as exc:  # one broken row must not cost the others
            errors[name] = f"{type(exc).__name__}: {exc}"
            log(f"  L={max_length} {name} FAILED: {errors[name]}")
    times: dict[str, dict[str, Any]] = {n: {"wall": [], "probe": [], "warmup": warmup[n]} for n in names}
    outputs: dict[str, dict[str, Any]] = {}
    for rep in range(reps if names else 0):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:  # rotate the order each repetition
            if name in errors:
                continue
            outputs.pop(name, None)  # free the previous repetition's arrays first
            try:
                _sync(device)
                t0 = time.perf_counter()
                out = runners[name](texts, max_length)
                _sync(device)
            except Exception as exc:
                errors[name] = f"{type(exc).__name__}: {exc}"
                log(f"  L={max_length} {name} FAILED: {errors[name]}")
                continue
            times[name]["wall"].append(time.perf_counter() - t0)
            times[name]["probe"].append(out.pop("probe_seconds", 0.0))
            outputs[name] = out
            log(f"  L={max_length} rep {rep + 1}/{reps} {name:<22} {times[name]['wall'][-1]:7.2f} s")
    times = {n: t for n, t in times.items() if n not in errors and t["wall"]}
    return times, outputs, errors


def _tokens_per_word(path: Path) -> float:
    """Tokens per word of ``synthetic_corpus`` text under the checkpoint's tokenizer (CLS/EOS excluded)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    sample = synthetic_corpus(64, min_words=200, max_words=200, seed=99)
    ids = tok(sample, add_special_tokens=False)["input_ids"]
    return sum(len(x) for x in ids) / (200 * len(sample))


def _backbone_forward(
    enc: M3Encoder,
    length: int,
    device: torch.device,
    cfg: dict[str, int],
    peak: float | None,
    tokens: int = BACKBONE_TOKENS,
    reps: int = 5,
) -> dict[str, Any]:
    """The bare backbone on one full batch of random ids: no tokenisation, heads or host work."""
    batch = max(1, tokens // length)
    gen = torch.Generator().manual_seed(length)
    ids = torch.randint(4, enc.vocab_size - 1, (batch, length), generator=gen).to(device)
    run, mask = enc._backbone, None
    if getattr(enc, "compiled", False):
        # The compiled backbone always gets an additive mask (one graph per shape): an all-zero one.
        run, mask = enc._run_backbone, enc._attention_bias(np.ones((batch, length), dtype=bool))
    times = []
    with torch.inference_mode():
        for i in range(reps + 1):
            _sync(device)
            t0 = time.perf_counter()
            run(input_ids=ids, attention_mask=mask)
            _sync(device)
            if i:
                times.append(time.perf_counter() - t0)
    # Backbone only: the heads' 2h(c+1) FLOPs per token are left out of the count.
    flops = batch * (text_flops(length, cfg) - length * 2 * cfg["hidden_size"] * (cfg["colbert_dim"] + 1))
    best = min(times)
    return {
        "batch": batch,
        "tokens": batch * length,
        "seconds_best": best,
        "tokens_per_s": batch * length / best,
        "tflops": flops / best / 1e12,
        "mfu": flops / best / 1e12 / peak if peak else None,
    }


def _max_abs(a: list[np.ndarray], b: list[np.ndarray]) -> tuple[float, bool]:
    worst, same_shape = 0.0, True
    for x, y in zip(a, b):
        if x.shape != y.shape:
            same_shape = False
            continue
        if x.size:
            worst = max(worst, float(np.abs(x.astype(np.float32) - y.astype(np.float32)).max()))
    return worst, same_shape


def _sparse_max_abs(a: list[dict[Any, float]], b: list[dict[Any, float]]) -> tuple[float, int]:
    worst, missing = 0.0, 0
    for x, y in zip(a, b):
        x = {int(k): float(v) for k, v in x.items()}
        y = {int(k): float(v) for k, v in y.items()}
        for key in set(x) | set(y):
            if key in x and key in y:
                worst = max(worst, abs(x[key] - y[key]))
            elif max(x.get(key, 0.0), y.get(key, 0.0)) > 1e-3:  # near 0 may land on either side of > 0
                missing += 1
    return worst, missing


def _parity(ours: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    colbert, shapes = _max_abs(ours["colbert"], ref["colbert"])
    sparse, missing = _sparse_max_abs(ours["sparse"], ref["sparse"])
    a, b = ours["dense"].astype(np.float64), ref["dense"].astype(np.float64)
    cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {
        "dense_max_abs_diff": float(np.abs(a - b).max()),
        "dense_cos_min": float(cos.min()),
        "sparse_max_abs_diff": sparse,
        "sparse_key_mismatches": missing,
        "colbert_max_abs_diff": colbert,
        "colbert_shapes_equal": shapes,
        "num_tokens_equal": list(ours["num_tokens"]) == list(ref["num_tokens"]),
    }


def _cos(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    a, b = a.astype(np.float64), b.astype(np.float64)
    cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"dense_cos_mean": float(cos.mean()), "dense_cos_min": float(cos.min()), "max_abs_diff": float(np.abs(a - b).max())}


# -- report -----------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _markdown(report: dict[str, Any]) -> str:
    m, c = report["machine"], report["config"]
    peak = c["peak_tflops"]
    lines = [
        f"## GPU encoding: m3connect vs FlagEmbedding ({'quick smoke run' if c['quick'] else 'full run'})",
        "",
        f"- card: {m['card']}"
        + (f" ({m['sm_count']} SMs, {m['memory_gib']} GiB, sm_{m['capability'].replace('.', '')})" if "sm_count" in m else "")
        + f"; host: {m['cpu']}, {m['logical_cores']} logical cores; torch {m['torch']} (CUDA {m['cuda']}), "
        f"transformers {m['transformers']}, FlagEmbedding {m['FlagEmbedding']}, Python {m['python']}; {report['date']}",
        f"- peak used for MFU: {_fmt(peak, '.1f')} TFLOP/s dense fp16/bf16 (datasheet); measured 8192^3 matmul: "
        f"fp16 {_fmt(report['matmul_tflops'].get('float16'), '.0f')}, bf16 {_fmt(report['matmul_tflops'].get('bfloat16'), '.0f')} TFLOP/s",
        f"- checkpoint: random XLM-R {c['checkpoint']} ({c['params_nonembedding'] / 1e6:.1f} M non-embedding parameters; "
        f"tokenizer vocabulary {c['vocab_actual']}, see the script's docstring); "
        f"FLOPs/token at n=512: {c['gflop_per_token_512']:.4g} GFLOP ({c['gflop_per_token_512_backbone']:.4g} without the heads)",
        f"- timing: warm-up, then {c['reps']} repetitions round-robin, **best** shown; wall time of one `encode` call "
        "(tokenisation, forward, host post-processing) returning dense + sparse + ColBERT for every text",
        "",
        "| max_length | texts | tokens | implementation | best s | tokens/s | MFU | x FlagEmbedding | x FlagEmbedding w/o probe |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for L in report["lengths"]:
        for r in L["rows"]:
            lines.append(
                f"| {L['max_length']} | {L['n_texts']} | {L['tokens']:,} | {r['name']} | {r['seconds_best']:.3f} | "
                f"{r['tokens_per_s']:,.0f} | {_fmt(r['mfu'], '.1%')} | {_fmt(r.get('speedup_vs_flag'), '.2f')} | "
                f"{_fmt(r.get('speedup_vs_flag_without_probe'), '.2f')} |"
            )
        for name, err in L["errors"].items():
            lines.append(f"| {L['max_length']} | {L['n_texts']} | {L['tokens']:,} | {name} | failed: {err[:120]} | | | | |")
    lines += [
        "",
        "FlagEmbedding runs one extra forward pass per `encode` (a batch-size probe on its first batch); the last "
        "column is the speedup against FlagEmbedding's time without that pass. `m3connect-fp16-serial` is the same "
        "encoder fetching each batch's outputs before queueing the next, all on one thread (no overlap).",
        "",
        f"Bare backbone forward (random ids, one batch of ~{c['backbone_tokens']:,} tokens, no tokenisation / heads / host work):",
        "",
        "| max_length | dtype | batch | tokens/s | TFLOP/s | MFU |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for L in report["lengths"]:
        for dtype, b in L["backbone"].items():
            if "error" in b:
                lines.append(f"| {L['max_length']} | {dtype} | failed: {b['error'][:120]} | | | |")
                continue
            lines.append(
                f"| {L['max_length']} | {dtype} | {b['batch']} | {b['tokens_per_s']:,.0f} | {b['tflops']:.0f} | "
                f"{_fmt(b['mfu'], '.1%')} |"
            )
    lines += ["", "Parity, m3connect fp16 vs FlagEmbedding fp16 (same checkpoint, same texts):", ""]
    lines += [
        "| max_length | dense max abs diff | dense cos min | sparse max abs diff (key mismatches) | ColBERT max abs diff | token counts equal |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for L in report["lengths"]:
        p = L.get("parity_fp16_vs_flag")
        if p:
            lines.append(
                f"| {L['max_length']} | {p['dense_max_abs_diff']:.2e} | {p['dense_cos_min']:.6f} | "
                f"{p['sparse_max_abs_diff']:.2e} ({p['sparse_key_mismatches']}) | {p['colbert_max_abs_diff']:.2e} | "
                f"{p['num_tokens_equal'] and p['colbert_shapes_equal']} |"
            )
    for L in report["lengths"]:
        cv = L.get("compile_vs_eager_bf16")
        if cv:
            warm = next((r["warmup_seconds"] for r in L["rows"] if r["name"] == COMPILED), None)
            lines.append(
                f"\n{COMPILED} vs m3connect-bf16 (L={L['max_length']}, same texts): dense cos min "
                f"{cv['dense_cos_min']:.6f}, dense max abs diff {cv['dense_max_abs_diff']:.2e}, ColBERT max abs diff "
                f"{cv['colbert_max_abs_diff']:.2e}; its warm-up (compiling included) took {_fmt(warm, '.1f')} s"
            )
    serial = [L for L in report["lengths"] if L.get("overlap_vs_serial_identical") is not None]
    for L in serial:
        lines.append(
            f"\nm3connect fp16 with and without the batch overlap (L={L['max_length']}): outputs identical: "
            f"{L['overlap_vs_serial_identical']}"
        )
    f32 = report.get("vs_fp32")
    if f32:
        lines += [
            "",
            f"Dense vectors against m3connect fp32 on the same device ({f32['n_texts']} texts, max_length {f32['max_length']}):",
            "",
            "| implementation | dense cos mean | dense cos min | max abs diff |",
            "|---|---:|---:|---:|",
        ]
        for name, v in f32["rows"].items():
            lines.append(f"| {name} | {v['dense_cos_mean']:.6f} | {v['dense_cos_min']:.6f} | {v['max_abs_diff']:.2e} |")
    t = report.get("target")
    if t:
        lines += ["", f"Target: {t['text']}: **{'met' if t['met'] else 'MISSED'}** ({t['value']})"]
    if report["notes"]:
        lines += ["", "Notes: " + "; ".join(report["notes"])]
    lines.append(f"\nWhole run: {report['wall_seconds']:.0f} s; phases: "
                 + ", ".join(f"{k} {v:.0f} s" for k, v in report["phase_seconds"].items()))
    return "\n".join(lines) + "\n"


def _write(report: dict[str, Any], out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(_markdown(report))


# -- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (for a smoke run)")
    ap.add_argument("--quick", action="store_true", help="tiny model and corpora: a smoke run of seconds")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="results directory")
    ap.add_argument("--lengths", default=None, help="comma-separated max_length values (default 128,512,8192)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per corpus (default 393216; --quick 4096)")
    ap.add_argument("--max-texts-8192", type=int, default=32, help="texts in the corpus at L >= 4096")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5; --quick 2)")
    ap.add_argument("--serial-length", type=int, default=None, help="L with the serial m3connect row (default 512; 0: none)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the card's dense fp16/bf16 peak")
    ap.add_argument("--no-flag", action="store_true", help="skip FlagEmbedding")
    ap.add_argument("--compile", action="store_true", help="add a torch.compile'd bf16 row")
    ap.add_argument("--no-fp32-check", action="store_true", help="skip the dense check against fp32")
    args = ap.parse_args(argv)

    started = time.perf_counter()
    phases: dict[str, float] = {}

    def phase(name: str) -> None:
        phases[name] = time.perf_counter() - started - sum(phases.values())

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("CUDA is not available here: use --device cpu (with --quick for a smoke run)")
    quick = args.quick
    args.reps = args.reps or (2 if quick else 5)
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else list(QUICK_LENGTHS if quick else FULL_LENGTHS)
    tokens_target = args.tokens or (QUICK_TOKENS if quick else FULL_TOKENS)
    serial_length = args.serial_length if args.serial_length is not None else (lengths[-1] if quick else 512)
    shape = dict(QUICK_SHAPE if quick else FULL_SHAPE)
    machine = _machine(device)
    peak = _peak_tflops(machine["card"], args.peak_tflops) if device.type == "cuda" else args.peak_tflops
    notes: list[str] = []
    if device.type == "cuda" and peak is None:
        notes.append(f"no datasheet peak known for {machine['card']!r}: MFU not reported (use --peak-tflops)")
    log(f"{machine['card']} | torch {machine['torch']} | transformers {machine['transformers']} | peak {peak}")

    matmul: dict[str, float] = {}
    if device.type == "cuda":
        for name, dt_ in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
            matmul[name] = _matmul_tflops(device, dt_)
        log(f"matmul 8192^3: {matmul}")
    phase("setup")

    report: dict[str, Any] = {"benchmark": "encode_gpu"}
    stem = f"encode-gpu-{'quick-' if quick else ''}{'compile-' if args.compile else ''}"
    stem += _slug(machine["card"] if device.type == "cuda" else "cpu")
    with tempfile.TemporaryDirectory(prefix="m3-encode-gpu-") as tmp:
        path = make_tiny_checkpoint(Path(tmp) / "ckpt", **shape)
        cfg_json = json.loads((path / "config.json").read_text())
        phase("checkpoint")
        log(f"checkpoint built in {phases['checkpoint']:.1f} s (vocab {cfg_json['vocab_size']})")
        cfg = {
            "hidden_size": shape["hidden_size"],
            "intermediate_size": shape["intermediate_size"],
            "num_layers": shape["num_layers"],
            "colbert_dim": shape["hidden_size"],
        }
        h, f, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_layers"]
        tokens_per_word = _tokens_per_word(path)
        log(f"toy tokenizer: {tokens_per_word:.2f} tokens per synthetic word")

        runners: dict[str, Any] = {}
        if not args.no_flag:
            try:
                runners[FLAG] = FlagRow(path, device)
                if runners[FLAG].note:
                    notes.append(runners[FLAG].note)
            except Exception as exc:
                notes.append(f"FlagEmbedding could not be loaded: {type(exc).__name__}: {exc}")
                log(notes[-1])
        for name, dtype in M3_ROWS.items():
            runners[name] = M3Row(path, device, dtype)
        if args.compile:
            runners[COMPILED] = M3Row(path, device, "bfloat16", compile=True)
        serial = M3Row(path, device, "float16", pipeline=False) if serial_length in lengths else None
        phase("load")

        config = {
            "quick": quick,
            "device": str(device),
            "checkpoint": ", ".join(f"{k}={v}" for k, v in shape.items() if k != "initializer_range"),
            "init_range": shape["initializer_range"],
            "vocab_actual": cfg_json["vocab_size"],
            "params_nonembedding": layers * (4 * h * h + 2 * h * f),
            "gflop_per_token_512": text_flops(512, cfg) / 512 / 1e9,
            "gflop_per_token_512_backbone": (text_flops(512, cfg) / 512 - 2 * h * (h + 1)) / 1e9,
            "peak_tflops": peak,
            "backbone_tokens": min(BACKBONE_TOKENS, tokens_target),
            "reps": args.reps,
            "statistic": "best (min) of reps; medians also given",
            "flag_call": f"M3Embedder(path, use_fp16=True, devices='cuda:0').encode(texts, batch_size={FLAG_BATCH}, "
            "max_length=L, return_dense=True, return_sparse=True, return_colbert_vecs=True)",
            "m3_call": "M3Encoder(path, device='cuda', dtype=D, show_progress=False).encode(texts, max_length=L)",
            "flops_formula": "n*[l*(8h^2+4hf) + 2h(c+1)] + l*4*h*n^2 per text of n tokens",
            "tokens_per_word": tokens_per_word,
        }
        report.update(
            date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            machine=machine,
            config=config,
            matmul_tflops=matmul,
            lengths=[],
            notes=notes,
        )

        for L in lengths:
            n_texts = max(1, tokens_target // L)
            if L >= 4096:
                n_texts = min(n_texts, args.max_texts_8192)
            # Words for ~1.2 L tokens with this checkpoint's toy tokenizer: nearly every text is cut at L.
            words = int(1.2 * L / tokens_per_word) + 16
            texts = synthetic_corpus(n_texts, min_words=words, max_words=words, seed=L)
            rows_here = dict(runners)
            if serial is not None and L == serial_length:
                rows_here[SERIAL] = serial
            log(f"L={L}: {n_texts} texts of {words} words, rows {list(rows_here)}")
            times, outputs, errors = _time_rows(rows_here, texts, L, args.reps, device)
            ref_name = next(iter(outputs))
            num_tokens = list(outputs[ref_name]["num_tokens"]) if outputs else []
            tokens = int(sum(num_tokens))
            flops = corpus_flops(num_tokens, cfg)
            rows = []
            for name, t in times.items():
                best, median = min(t["wall"]), statistics.median(t["wall"])
                row = {
                    "name": name,
                    "seconds_best": best,
                    "seconds_median": median,
                    "seconds_all": t["wall"],
                    "tokens_per_s": tokens / best,
                    "tokens_per_s_median": tokens / median,
                    "tflops": flops / best / 1e12,
                    "mfu": flops / best / 1e12 / peak if peak else None,
                    "tokens_equal_to_reference": list(outputs[name]["num_tokens"]) == num_tokens,
                    "warmup_seconds": t["warmup"],
                }
                if name == FLAG:
                    row["probe_seconds_all"] = t["probe"]
                    row["seconds_best_without_probe"] = min(w - p for w, p in zip(t["wall"], t["probe"]))
                rows.append(row)
            by = {r["name"]: r for r in rows}
            if FLAG in by:
                for r in rows:
                    r["speedup_vs_flag"] = by[FLAG]["seconds_best"] / r["seconds_best"]
                    r["speedup_vs_flag_without_probe"] = by[FLAG]["seconds_best_without_probe"] / r["seconds_best"]
            entry: dict[str, Any] = {
                "max_length": L,
                "n_texts": n_texts,
                "words_per_text": words,
                "tokens": tokens,
                "texts_cut_at_max_length": int(sum(n == L for n in num_tokens)),
                "model_tflop": flops / 1e12,
                "rows": rows,
                "errors": errors,
            }
            if FLAG in outputs and "m3connect-fp16" in outputs:
                entry["parity_fp16_vs_flag"] = _parity(outputs["m3connect-fp16"], outputs[FLAG])
            if COMPILED in outputs and "m3connect-bf16" in outputs:
                a, b = outputs[COMPILED], outputs["m3connect-bf16"]
                entry["compile_vs_eager_bf16"] = {
                    "dense_cos_min": float(np.min(np.sum(a["dense"] * b["dense"], axis=1))),
                    "dense_max_abs_diff": float(np.abs(a["dense"] - b["dense"]).max()),
                    "colbert_max_abs_diff": _max_abs(a["colbert"], b["colbert"])[0],
                }
            if SERIAL in outputs and "m3connect-fp16" in outputs:
                a, b = outputs["m3connect-fp16"], outputs[SERIAL]
                entry["overlap_vs_serial_identical"] = bool(
                    np.array_equal(a["dense"], b["dense"])
                    and a["sparse"] == b["sparse"]
                    and all(np.array_equal(x, y) for x, y in zip(a["colbert"], b["colbert"]))
                )
            del outputs
            entry["backbone"] = {}
            backbones = {dtype: name for name, dtype in M3_ROWS.items()}
            if COMPILED in runners:
                backbones["bfloat16-compile"] = COMPILED
            for dtype, name in backbones.items():
                try:
                    entry["backbone"][dtype] = _backbone_forward(
                        runners[name].enc, L, device, cfg, peak, tokens=min(BACKBONE_TOKENS, tokens_target)
                    )
                except Exception as exc:
                    entry["backbone"][dtype] = {"error": f"{type(exc).__name__}: {exc}"}
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            log(
                f"L={L}: "
                + ", ".join(f"{r['name']} {r['tokens_per_s']:,.0f} tok/s MFU {_fmt(r['mfu'], '.1%')}" for r in rows)
                + " | backbone "
                + ", ".join(f"{d} MFU {_fmt(b.get('mfu'), '.1%')}" for d, b in entry["backbone"].items())
            )
            report["lengths"].append(entry)
            phase(f"L={L}")
            report["wall_seconds"] = time.perf_counter() - started
            report["phase_seconds"] = dict(phases)
            _write(report, args.out, stem)  # a run cut short keeps what it finished

        # Dense vectors against an fp32 run of m3connect, on a few texts.
        Lp = 512 if 512 in lengths else lengths[-1]
        words = int(1.2 * Lp / tokens_per_word) + 16
        few = synthetic_corpus(N_FP32_TEXTS, min_words=words // 2, max_words=words, seed=7)
        try:
            if args.no_fp32_check:
                raise RuntimeError("skipped (--no-fp32-check)")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            fp32 = M3Encoder(path, device=str(device), dtype="float32", show_progress=False).encode(few, max_length=Lp)
            vs: dict[str, Any] = {}
            for name, run in runners.items():
                vs[name] = _cos(run(few, Lp)["dense"], fp32.dense)
            report["vs_fp32"] = {"n_texts": len(few), "max_length": Lp, "rows": vs}
        except Exception as exc:
            notes.append(f"fp32 comparison failed: {type(exc).__name__}: {exc}")
        phase("fp32_check")

    if device.type == "cuda" and peak:
        at512 = next((L for L in report["lengths"] if L["max_length"] == 512), None)
        best = max((r for r in at512["rows"] if r["name"].startswith("m3connect")), key=lambda r: r["mfu"], default=None) if at512 else None
        if best:
            report["target"] = {
                "text": f"m3connect >= {TARGET_MFU:.0%} MFU at max_length 512 with all three outputs",
                "met": bool(best["mfu"] >= TARGET_MFU),
                "value": f"{best['name']} {best['mfu']:.1%}",
            }
    report["wall_seconds"] = time.perf_counter() - started
    report["phase_seconds"] = dict(phases)
    _write(report, args.out, stem)
    print(_markdown(report))
    log(f"wrote {args.out / stem}.json and .md in {report['wall_seconds']:.0f} s")
    return report


if __name__ == "__main__":
    main()

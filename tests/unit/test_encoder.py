"""The encoder against FlagEmbedding's reference implementation, plus its input contract."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import m3connect.encoder as encoder_module
from m3connect import InvalidInputError, InvalidTypeError, M3Encoder, ModelLoadError
from m3connect.testing import make_tiny_checkpoint, synthetic_corpus

from ..flag_reference import flag_model

TEXTS = [
    "BGE-M3 produces dense, sparse and multi-vector representations.",
    "",
    "Модель строит плотные, разреженные и многовекторные представления текста.",
    "向量数据库可以同时存储稠密向量和稀疏向量。",
    "Die Bibliothek speichert dichte und spärliche Vektoren.",
    "vector vector vector search search",  # repeated tokens: max over repeats
    "هذا نص عربي قصير",
    " ".join(["long"] + synthetic_corpus(1, min_words=300, max_words=300, seed=5)),  # > max_length
]
MAX_LENGTH = 64


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path):
    return flag_model(tiny_checkpoint)


def test_outputs_match_flagembedding(encoder: M3Encoder, reference) -> None:
    ours = encoder.encode(TEXTS, max_length=MAX_LENGTH)
    ref = reference.encode(
        TEXTS, max_length=MAX_LENGTH, batch_size=3, return_dense=True, return_sparse=True, return_colbert_vecs=True
    )
    np.testing.assert_allclose(ours.dense, ref["dense_vecs"], atol=1e-5, rtol=0)
    assert ours.sparse is not None and ours.colbert is not None
    for mine, theirs in zip(ours.sparse, ref["lexical_weights"]):
        assert set(mine) == {int(k) for k in theirs}
        assert all(isinstance(k, int) for k in mine)
        for key, value in theirs.items():
            assert abs(mine[int(key)] - float(value)) <= 1e-5
    for mine, theirs in zip(ours.colbert, ref["colbert_vecs"]):
        assert mine.shape == theirs.shape
        np.testing.assert_allclose(mine, theirs, atol=1e-5, rtol=0)
    assert ours.truncated == [len(TEXTS) - 1]
    assert ours.num_tokens[-1] == MAX_LENGTH
    assert ours.num_tokens[1] == 2  # empty text: CLS + EOS
    assert ours.colbert[1].shape == (1, encoder.colbert_dim)  # EOS kept


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (0.4, 0.2, 0.4), (1.0, 0.3, 1.0)])
def test_compute_score_matches_flagembedding(encoder: M3Encoder, reference, weights) -> None:
    pairs = [(TEXTS[i], TEXTS[j]) for i in range(len(TEXTS)) for j in (0, 2, 5, 7)]
    ours = encoder.compute_score(pairs, weights=weights, max_query_length=32, max_passage_length=MAX_LENGTH)
    # batch_size=1: FlagEmbedding pads passages of a batch together and its MaxSim then also
    # sees the zero padding vectors; one pair per batch is the exact formula of REFERENCE.md.
    ref = reference.compute_score(
        pairs,
        batch_size=1,
        max_query_length=32,
        max_passage_length=MAX_LENGTH,
        weights_for_different_modes=list(weights),
    )
    for key in ("dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense"):
        np.testing.assert_allclose(ours[key], ref[key], atol=1e-4, rtol=0, err_msg=key)


def test_batching_does_not_change_results(encoder: M3Encoder) -> None:
    texts = synthetic_corpus(30, min_words=1, max_words=120, seed=3)
    whole = encoder.encode(texts, max_length=256)
    small = M3Encoder(encoder.path, device="cpu", dtype="float32", tokens_per_batch=300, show_progress=False)
    split = small.encode(texts, max_length=256, batch_size=2)
    np.testing.assert_allclose(whole.dense, split.dense, atol=1e-5)
    for a, b in zip(whole.colbert, split.colbert):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_flags_skip_representations(encoder: M3Encoder) -> None:
    out = encoder.encode(["a b c"], return_sparse=False, return_colbert=False)
    assert out.dense is not None and out.sparse is None and out.colbert is None


def test_long_input_up_to_8192_tokens(encoder: M3Encoder) -> None:
    out = encoder.encode(["word " * 20000], max_length=8192)
    assert out.num_tokens == [8192] and out.truncated == [0]
    assert out.colbert[0].shape[0] == 8191


def test_empty_list_gives_empty_outputs(encoder: M3Encoder) -> None:
    out = encoder.encode([])
    assert out.dense.shape == (0, encoder.dense_dim) and out.sparse == [] and out.colbert == []


def test_non_string_names_its_index(encoder: M3Encoder) -> None:
    with pytest.raises(TypeError, match=r"texts\[2\] is int"):
        encoder.encode(["a", "b", 3])
    with pytest.raises(InvalidTypeError, match="single string"):
        encoder.encode("just one")


@pytest.mark.parametrize("weights", [(-1, 1, 1), (0, 0, 0), (1, 1), (float("nan"), 1, 1)])
def test_bad_weights(encoder: M3Encoder, weights) -> None:
    with pytest.raises(ValueError):
        encoder.compute_score([("a", "b")], weights=weights)


def test_bad_max_length(encoder: M3Encoder) -> None:
    with pytest.raises(InvalidInputError, match="max_length"):
        encoder.encode(["a"], max_length=100_000)


def test_token_conversion(encoder: M3Encoder) -> None:
    out = encoder.encode(["vector search"])
    readable = encoder.convert_id_to_token(out.sparse[0])
    assert len(readable) == len(out.sparse[0])
    token_id = next(iter(out.sparse[0]))
    assert encoder.token_to_id(encoder.id_to_token(token_id)) == token_id


@pytest.mark.parametrize("missing", ["sparse_linear.pt", "colbert_linear.pt"])
def test_missing_head_is_an_error(tiny_checkpoint: Path, tmp_path: Path, missing: str) -> None:
    copy = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    (copy / missing).unlink()
    with pytest.raises(ModelLoadError, match=missing):
        M3Encoder(copy, device="cpu")


def test_misshapen_head_is_an_error(tiny_checkpoint: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    torch.save(torch.nn.Linear(7, 1).state_dict(), copy / "sparse_linear.pt")
    with pytest.raises(ModelLoadError, match="sparse_linear.pt.*shape"):
        M3Encoder(copy, device="cpu")


def test_missing_weights_never_fall_back_to_random(tiny_checkpoint: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    (copy / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError):
        M3Encoder(copy, device="cpu")


def test_bin_weights_load_like_safetensors(tmp_path: Path, encoder: M3Encoder) -> None:
    path = make_tiny_checkpoint(tmp_path / "bin", safetensors=False)
    other = M3Encoder(path, device="cpu", dtype="float32")
    np.testing.assert_allclose(other.encode(["x y"]).dense, encoder.encode(["x y"]).dense, atol=1e-6)


def test_unreachable_hub_says_how_to_use_a_local_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="local directory"):
        M3Encoder("nobody/no-such-model-xyz", device="cpu")


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_fast_cpu_modes_stay_close(encoder: M3Encoder, dtype: str) -> None:
    texts = synthetic_corpus(8, seed=9, max_words=60)
    fast = M3Encoder(encoder.path, device="cpu", dtype=dtype, show_progress=False)
    cos = (fast.encode(texts).dense * encoder.encode(texts).dense).sum(axis=1)
    # A tiny wide-init random model is harsher on int8 than a trained one; the fidelity
    # target (cosine >= 0.99) is measured on a mid-size model in benchmarks/encode.py.
    assert cos.mean() > 0.97 and cos.min() > 0.9, cos.tolist()


# -- dtype="auto" --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calm_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64-wide checkpoint with a trained-model-like init range: reduced precision can be judged.

    (The default tiny checkpoint's init range of 0.6 makes the network chaotic: rounding noise
    alone moves its dense vectors to cosine ~0.8, whatever the precision.)
    """
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("calm-m3"), hidden_size=64, num_layers=2, intermediate_size=256, initializer_range=0.1
    )


@pytest.mark.parametrize(
    ("flags", "device", "expected"),
    [
        ({"fpu", "avx2", "avx512f", "avx512_bf16"}, "cpu", "bfloat16"),  # Cooper Lake, Zen 4
        ({"avx512f", "amx_bf16", "amx_tile", "amx_int8"}, "cpu", "bfloat16"),  # Sapphire Rapids
        ({"fpu", "avx2", "avx512f", "avx512_vnni"}, "cpu", "float32"),  # Ice Lake, Cascade Lake
        ({"fpu", "avx2"}, "cpu", "float32"),
        ({"avx512_bf16"}, "cuda", "float16"),
        ({"fpu", "avx2"}, "cuda:1", "float16"),
        ({"avx512_bf16"}, "mps", "float32"),
    ],
)
def test_auto_dtype_follows_the_cpu_flags(monkeypatch: pytest.MonkeyPatch, flags, device, expected) -> None:
    monkeypatch.setattr(encoder_module, "_cpu_flags", lambda: frozenset(flags))
    assert encoder_module.resolve_dtype("auto", device) == expected
    assert encoder_module.resolve_dtype(None, device) == expected  # None means auto


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_asks_torch_without_cpuinfo(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(encoder_module, "_cpu_flags", lambda: None)  # e.g. macOS, Windows
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert encoder_module.resolve_dtype("auto", "cpu") == ("bfloat16" if native else "float32")


def test_cpu_flags_are_read_from_proc_cpuinfo() -> None:
    flags = encoder_module._cpu_flags()
    if not Path("/proc/cpuinfo").is_file():
        assert flags is None
    else:
        text = Path("/proc/cpuinfo").read_text()
        assert flags is not None and ("flags" not in text or flags)
        assert encoder_module.cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [("float32", "float32"), ("fp32", "float32"), ("bf16", "bfloat16"), ("torch.float16", "float16"), ("int8", "int8")],
)
def test_explicit_dtypes_are_kept(monkeypatch: pytest.MonkeyPatch, dtype: str, expected: str) -> None:
    monkeypatch.setattr(encoder_module, "_cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert encoder_module.resolve_dtype(dtype, "cpu") == expected


def test_bad_dtypes() -> None:
    with pytest.raises(InvalidInputError, match="auto, float32"):
        encoder_module.resolve_dtype("float64", "cpu")
    with pytest.raises(InvalidInputError, match="CPU only"):
        encoder_module.resolve_dtype("int8", "cuda")


@pytest.mark.parametrize(("flags", "expected"), [({"avx512_bf16"}, "bfloat16"), ({"avx2"}, "float32")])
def test_encoder_default_is_auto_and_reports_it(
    monkeypatch: pytest.MonkeyPatch, encoder: M3Encoder, flags, expected: str
) -> None:
    monkeypatch.setattr(encoder_module, "_cpu_flags", lambda: frozenset(flags))
    enc = M3Encoder(encoder.path, device="cpu", show_progress=False)
    assert enc.compute_dtype == expected
    assert next(enc._backbone.parameters()).dtype == getattr(torch, expected)
    if expected == "float32":  # auto on a CPU without bf16 is exactly the fp32 encoder
        texts = ["vector search", "", "dense sparse colbert " * 20]
        np.testing.assert_array_equal(enc.encode(texts).dense, encoder.encode(texts).dense)


def _cosines(a: list[np.ndarray], b: list[np.ndarray]) -> np.ndarray:
    x, y = np.concatenate(a).astype(np.float64), np.concatenate(b).astype(np.float64)
    return (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))


@pytest.mark.parametrize("fused", [True, False])
def test_bf16_stays_close_to_fp32(calm_checkpoint: Path, fused: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(M3Encoder, "_fuse_cpu", fused)
    texts = synthetic_corpus(24, seed=11, min_words=1, max_words=150) + TEXTS
    fp32 = M3Encoder(calm_checkpoint, device="cpu", dtype="float32", show_progress=False).encode(texts, max_length=128)
    bf16_enc = M3Encoder(calm_checkpoint, device="cpu", dtype="bfloat16", show_progress=False)
    assert (bf16_enc.fused_linears > 0) == (fused and encoder_module._onednn_fusion_works(torch.bfloat16))
    bf16 = bf16_enc.encode(texts, max_length=128)
    assert bf16.dense.dtype == np.float32
    cos = (bf16.dense * fp32.dense).sum(1)
    assert cos.min() >= 0.999, cos.min()
    np.testing.assert_allclose(np.linalg.norm(bf16.dense, axis=1), 1.0, atol=1e-5)
    assert _cosines(bf16.colbert, fp32.colbert).min() >= 0.99
    assert [c.shape for c in bf16.colbert] == [c.shape for c in fp32.colbert]
    assert bf16.num_tokens == fp32.num_tokens and bf16.truncated == fp32.truncated
    for mine, ref in zip(bf16.sparse, fp32.sparse):  # same tokens up to ones at the edge of 0
        for key in set(mine) ^ set(ref):
            assert max(mine.get(key, 0.0), ref.get(key, 0.0)) < 0.05
        for key in set(mine) & set(ref):
            assert abs(mine[key] - ref[key]) <= 0.02 + 0.02 * ref[key]


def test_fused_bf16_matches_torch_bf16_modules(calm_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not encoder_module._onednn_fusion_works(torch.bfloat16):
        pytest.skip("this torch has no oneDNN fused linear ops")
    texts = synthetic_corpus(12, seed=4, min_words=1, max_words=100)
    fused = M3Encoder(calm_checkpoint, device="cpu", dtype="bfloat16", show_progress=False)
    monkeypatch.setattr(M3Encoder, "_fuse_cpu", False)
    plain = M3Encoder(calm_checkpoint, device="cpu", dtype="bfloat16", show_progress=False)
    assert fused.fused_linears == 2 * 6 and plain.fused_linears == 0  # q, k, v, 2 outputs, FFN in
    a, b = fused.encode(texts), plain.encode(texts)
    assert (a.dense * b.dense).sum(1).min() >= 0.999


# -- onnxruntime peer ----------------------------------------------------------------------------


def test_onnx_backend_matches_flagembedding(calm_checkpoint: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from m3connect.onnx_backend import OnnxM3Encoder

    ours = OnnxM3Encoder(calm_checkpoint, onnx_dir=tmp_path / "onnx", threads=1).encode(TEXTS, max_length=MAX_LENGTH)
    ref = flag_model(calm_checkpoint).encode(
        TEXTS, max_length=MAX_LENGTH, batch_size=3, return_dense=True, return_sparse=True, return_colbert_vecs=True
    )
    np.testing.assert_allclose(ours.dense, ref["dense_vecs"], atol=1e-5, rtol=0)
    for mine, theirs in zip(ours.sparse, ref["lexical_weights"]):
        assert set(mine) == {int(k) for k in theirs}
        for key, value in theirs.items():
            assert abs(mine[int(key)] - float(value)) <= 1e-5
    for mine, theirs in zip(ours.colbert, ref["colbert_vecs"]):
        assert mine.shape == theirs.shape
        np.testing.assert_allclose(mine, theirs, atol=1e-5, rtol=0)
    assert ours.truncated == [len(TEXTS) - 1] and ours.num_tokens[1] == 2


# -- compile=True --------------------------------------------------------------------------------


def test_compiled_backbone_matches_eager_fp32(calm_checkpoint: Path) -> None:
    if shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("clang++") is None:
        pytest.skip("torch.compile on CPU needs a C++ compiler")
    eager = M3Encoder(calm_checkpoint, device="cpu", dtype="float32", show_progress=False)
    comp = M3Encoder(calm_checkpoint, device="cpu", dtype="float32", show_progress=False, compile=True)
    assert comp.compiled and not eager.compiled
    # Batches of 3, 3 and 2 texts, padded to width 64 and to 4, 4 and 2 rows: two static shapes,
    # filler rows included (they must not leak into the outputs).
    a = eager.encode(TEXTS, max_length=MAX_LENGTH, batch_size=3)
    b = comp.encode(TEXTS, max_length=MAX_LENGTH, batch_size=3)
    np.testing.assert_allclose(b.dense, a.dense, atol=1e-5, rtol=0)
    for x, y in zip(b.colbert, a.colbert):
        assert x.shape == y.shape
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)
    for x, y in zip(b.sparse, a.sparse):
        assert set(x) == set(y)
        assert all(abs(x[k] - y[k]) <= 1e-5 for k in x)
    assert b.num_tokens == a.num_tokens and b.truncated == a.truncated


def test_compile_shapes_are_bucketed(encoder: M3Encoder) -> None:
    enc = object.__new__(M3Encoder)  # only the shape rule, no model
    enc.model_max_length = 8192
    assert [enc._compile_width(w) for w in (1, 64, 65, 300, 513, 5000, 8192)] == [64, 64, 128, 384, 768, 6144, 8192]
    enc.model_max_length = 512
    assert enc._compile_width(400) == 512 and enc._compile_width(100) == 128


def test_compile_refuses_int8(tiny_checkpoint: Path) -> None:
    with pytest.raises(InvalidInputError, match="int8"):
        M3Encoder(tiny_checkpoint, device="cpu", dtype="int8", compile=True)

"""The encoder against FlagEmbedding's reference implementation, plus its input contract."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

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
    small = M3Encoder(encoder.path, device="cpu", tokens_per_batch=300, show_progress=False)
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
    other = M3Encoder(path, device="cpu")
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

"""m3connect.compat: milvus-model's and FlagEmbedding's output shapes over an M3 encoder.

Values are checked against ``M3Encoder.encode`` (same numbers, other containers) and the
FlagEmbedding-shaped outputs against FlagEmbedding's own ``M3Embedder`` on the same tiny
checkpoint (same keys, types, shapes and, in fp32, values).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

pytest.importorskip("scipy")

from scipy import sparse as sp  # noqa: E402

import m3connect  # noqa: E402
from m3connect.compat import BGEM3EmbeddingFunction, FlagStyleM3, sparse_to_csr, to_flag_output  # noqa: E402

TEXTS = [
    "dense and sparse vectors in one engine",
    "BGE-M3 is multilingual and handles long documents",
    "a",
    "",
]
LONG = " ".join(["retrieval with lexical weights and late interaction"] * 12)


def _row_dict(matrix: Any, i: int) -> dict[int, float]:
    row = matrix[[i]]
    return dict(zip(row.indices.tolist(), row.data.tolist()))


# -- milvus-model ------------------------------------------------------------------------------


def test_milvus_function_matches_encoder(encoder: Any) -> None:
    ef = BGEM3EmbeddingFunction(encoder, return_colbert_vecs=True)
    out = ef(TEXTS)
    ref = encoder.encode(TEXTS, max_length=512)
    assert set(out) == {"dense", "sparse", "colbert_vecs"}

    assert isinstance(out["dense"], list) and len(out["dense"]) == len(TEXTS)
    for got, want in zip(out["dense"], ref.dense):
        assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (encoder.dense_dim,)
        np.testing.assert_array_equal(got, want)

    matrix = out["sparse"]
    assert isinstance(matrix, sp.csr_array) and matrix.format == "csr"
    assert matrix.shape == (len(TEXTS), ef.dim["sparse"]) and matrix.dtype == np.float64
    assert matrix.has_sorted_indices
    for i, weights in enumerate(ref.sparse):
        assert _row_dict(matrix, i) == pytest.approx({int(k): float(v) for k, v in weights.items()})
        assert matrix._getrow(i).shape == (1, ef.dim["sparse"])  # the pymilvus tutorial's row access

    assert len(out["colbert_vecs"]) == len(TEXTS)
    for got, want in zip(out["colbert_vecs"], ref.colbert):
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_array_equal(got, want)

    assert ef.dim == {"dense": encoder.dense_dim, "colbert_vecs": encoder.colbert_dim, "sparse": len(encoder.tokenizer)}
    docs, queries = ef.encode_documents(TEXTS[:2]), ef.encode_queries(TEXTS[:2])
    for key in ("dense", "colbert_vecs"):
        for a, b in zip(docs[key], queries[key]):  # BGE-M3 takes no query instruction
            np.testing.assert_array_equal(a, b)
    assert (docs["sparse"] != queries["sparse"]).nnz == 0


def test_milvus_function_defaults_and_max_lengths(encoder: Any) -> None:
    ef = BGEM3EmbeddingFunction(encoder)  # milvus-model's defaults: dense + sparse
    assert set(ef(["x"])) == {"dense", "sparse"}
    assert ef.query_max_length == ef.passage_max_length == 512  # FlagEmbedding's default

    ef = BGEM3EmbeddingFunction(encoder, query_max_length=8, passage_max_length=16)
    q, d = ef.encode_queries([LONG]), ef.encode_documents([LONG])
    np.testing.assert_array_equal(q["dense"][0], encoder.encode([LONG], max_length=8).dense[0])
    np.testing.assert_array_equal(d["dense"][0], encoder.encode([LONG], max_length=16).dense[0])
    assert not np.allclose(q["dense"][0], d["dense"][0])

    both = BGEM3EmbeddingFunction(
        encoder, max_length=8, return_dense=False, return_sparse=False, return_colbert_vecs=True
    )
    assert set(both([LONG])) == {"colbert_vecs"}
    assert both([LONG])["colbert_vecs"][0].shape[0] == 7  # 8 tokens, CLS dropped
    assert both.encode_queries([LONG])["colbert_vecs"][0].shape[0] == 7


def test_milvus_function_inputs(encoder: Any) -> None:
    ef = BGEM3EmbeddingFunction(encoder)
    empty = ef([])
    assert empty["dense"] == [] and empty["sparse"].shape == (0, ef.dim["sparse"])
    with pytest.raises(TypeError):
        ef("one string")
    with pytest.raises(TypeError):
        ef(["ok", 3])
    with pytest.raises(ValueError):
        BGEM3EmbeddingFunction(encoder, normalize_embeddings=False)
    with pytest.raises(ValueError):
        BGEM3EmbeddingFunction(encoder, return_dense=False, return_sparse=False)
    with pytest.raises(ValueError):
        BGEM3EmbeddingFunction(encoder, device="cpu")  # an encoder object is configured already
    with pytest.raises(ValueError):
        BGEM3EmbeddingFunction(encoder, devices=["cuda:0", "cuda:1"])
    with pytest.raises(TypeError):
        BGEM3EmbeddingFunction(42)


def test_milvus_function_loads_by_path(tiny_checkpoint: Any, encoder: Any) -> None:
    ef = BGEM3EmbeddingFunction(model_name=str(tiny_checkpoint), device="cpu", use_fp16=True)
    assert isinstance(ef.encoder, m3connect.M3Encoder)
    assert ef.encoder.compute_dtype == "float32"  # fp16 is for GPUs, as in FlagEmbedding
    np.testing.assert_allclose(ef(TEXTS[:1])["dense"][0], encoder.encode(TEXTS[:1], max_length=512).dense[0], atol=1e-6)


def test_sparse_to_csr_takes_str_keys_and_grows() -> None:
    m = sparse_to_csr([{"7": 0.5, "2": 0.25}, {}, {11: 1.0}], vocab_size=10)
    assert m.shape == (3, 12)  # widened to hold token 11
    assert m.indices.tolist() == [2, 7, 11] and m.indptr.tolist() == [0, 2, 2, 3]


# -- FlagEmbedding ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flag(tiny_checkpoint: Any) -> Any:
    import importlib.util

    if importlib.util.find_spec("FlagEmbedding") is None:  # its __init__ breaks under transformers 5
        pytest.skip("FlagEmbedding is a test dependency: pip install -e '.[dev]'")
    from ..flag_reference import flag_model

    return flag_model(tiny_checkpoint)


def _same_flag_output(ours: dict[str, Any], ref: dict[str, Any]) -> None:
    assert set(ours) == set(ref) == {"dense_vecs", "lexical_weights", "colbert_vecs"}
    for key in ours:
        assert (ours[key] is None) == (ref[key] is None), key
    if ref["dense_vecs"] is not None:
        assert type(ours["dense_vecs"]) is type(ref["dense_vecs"])
        assert ours["dense_vecs"].shape == ref["dense_vecs"].shape
        np.testing.assert_allclose(ours["dense_vecs"], ref["dense_vecs"], atol=1e-5)
    if ref["lexical_weights"] is not None:
        ours_lw, ref_lw = ours["lexical_weights"], ref["lexical_weights"]
        if isinstance(ref_lw, dict):
            ours_lw, ref_lw = [ours_lw], [ref_lw]
        assert isinstance(ours["lexical_weights"], dict) == isinstance(ref["lexical_weights"], dict)
        assert len(ours_lw) == len(ref_lw)
        for a, b in zip(ours_lw, ref_lw):
            assert all(isinstance(k, str) for k in a) and all(isinstance(k, str) for k in b)
            assert set(a) == set(b)
            assert a == pytest.approx({k: float(v) for k, v in b.items()}, abs=1e-5)
    if ref["colbert_vecs"] is not None:
        ours_c, ref_c = ours["colbert_vecs"], ref["colbert_vecs"]
        if isinstance(ref_c, np.ndarray):
            assert isinstance(ours_c, np.ndarray)
            ours_c, ref_c = [ours_c], [ref_c]
        assert len(ours_c) == len(ref_c)
        for a, b in zip(ours_c, ref_c):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize(
    "flags",
    [
        {},
        {"return_sparse": True},
        {"return_dense": True, "return_sparse": True, "return_colbert_vecs": True},
        {"return_dense": False, "return_sparse": True, "return_colbert_vecs": True},
    ],
)
def test_flag_style_matches_flagembedding(encoder: Any, flag: Any, flags: dict[str, bool]) -> None:
    ours = FlagStyleM3(encoder)
    texts = TEXTS[:3]
    _same_flag_output(ours.encode(texts, **flags), flag.encode(texts, **flags))
    _same_flag_output(ours.encode(texts[0], **flags), flag.encode(texts[0], **flags))  # a str unwraps
    _same_flag_output(ours.encode_queries(texts, **flags), flag.encode_queries(texts, **flags))
    _same_flag_output(ours.encode_corpus(texts, **flags), flag.encode_corpus(texts, **flags))


def test_flag_style_max_lengths_and_defaults(encoder: Any, flag: Any) -> None:
    ours = FlagStyleM3(encoder, query_max_length=8, passage_max_length=16, return_sparse=True)
    assert (ours.query_max_length, ours.passage_max_length) == (8, 16)
    flag_q = flag.encode_queries([LONG], max_length=8, return_sparse=True)
    flag_p = flag.encode_corpus([LONG], max_length=16, return_sparse=True)
    _same_flag_output(ours.encode_queries([LONG]), flag_q)
    _same_flag_output(ours.encode_corpus([LONG]), flag_p)
    _same_flag_output(ours.encode([LONG]), flag_p)
    _same_flag_output(ours.encode([LONG], max_length=8), flag_q)

    with_instruction = FlagStyleM3(encoder, query_instruction_for_retrieval="query: ")
    np.testing.assert_allclose(
        with_instruction.encode_queries(["rivers"])["dense_vecs"],
        encoder.encode(["query: rivers"], max_length=512).dense,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        with_instruction.encode(["rivers"])["dense_vecs"], encoder.encode(["rivers"], max_length=512).dense, atol=1e-6
    )
    with pytest.raises(ValueError):
        ours.encode(["x"], return_dense=False, return_sparse=False)
    with pytest.raises(ValueError):
        ours.encode(["x"], convert_to_numpy=False)


def test_flag_style_scoring_helpers(encoder: Any, flag: Any) -> None:
    ours = FlagStyleM3(encoder)
    a = ours.encode(TEXTS[:2], return_sparse=True, return_colbert_vecs=True)
    b = flag.encode(TEXTS[:2], return_sparse=True, return_colbert_vecs=True)
    lw_a, lw_b = a["lexical_weights"], b["lexical_weights"]
    assert ours.compute_lexical_matching_score(lw_a[0], lw_a[1]) == pytest.approx(
        float(flag.compute_lexical_matching_score(lw_b[0], lw_b[1])), abs=1e-5
    )
    np.testing.assert_allclose(
        ours.compute_lexical_matching_score(lw_a, lw_a), flag.compute_lexical_matching_score(lw_b, lw_b), atol=1e-5
    )
    assert ours.colbert_score(a["colbert_vecs"][0], a["colbert_vecs"][1]) == pytest.approx(
        float(flag.colbert_score(b["colbert_vecs"][0], b["colbert_vecs"][1])), abs=1e-5
    )
    assert ours.convert_id_to_token(lw_a) == [pytest.approx(d) for d in flag.convert_id_to_token(lw_b)]
    assert ours.convert_id_to_token(lw_a[0]) == pytest.approx(flag.convert_id_to_token(lw_b[0]))

    pairs = [(TEXTS[0], TEXTS[1]), (TEXTS[1], TEXTS[1])]
    for weights in (None, [0.4, 0.2, 0.4]):
        got = ours.compute_score(pairs, weights_for_different_modes=weights)
        want = flag.compute_score(pairs, weights_for_different_modes=weights)
        assert set(got) == set(want)
        for key in want:
            assert got[key] == pytest.approx(want[key], abs=1e-5), key
    one, ref = ours.compute_score(pairs[0]), flag.compute_score(pairs[0])
    assert {k: float(v) for k, v in one.items()} == pytest.approx({k: float(v) for k, v in ref.items()}, abs=1e-5)


def test_to_flag_output_from_encode_output(encoder: Any) -> None:
    out = encoder.encode(TEXTS[:2])
    flag_shape = to_flag_output(out)
    assert flag_shape["dense_vecs"].shape == (2, encoder.dense_dim)
    assert flag_shape["lexical_weights"][0] == {str(k): v for k, v in out.sparse[0].items()}
    assert [c.shape for c in flag_shape["colbert_vecs"]] == [c.shape for c in out.colbert]
    only_sparse = encoder.encode(TEXTS[:1], return_dense=False, return_colbert=False)
    assert to_flag_output(only_sparse, return_dense=False, return_colbert_vecs=False, single=True)["dense_vecs"] is None
    with pytest.raises(m3connect.M3Error):
        to_flag_output(only_sparse)


def test_compat_import_is_light() -> None:
    import subprocess
    import sys

    code = (
        "import sys, m3connect.compat\n"
        "assert 'torch' not in sys.modules and 'scipy' not in sys.modules, sorted(sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr

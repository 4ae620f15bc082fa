"""ColBERT storage forms (m3connect.colbert_storage): pure numpy, no engine."""

from __future__ import annotations

import math

import numpy as np
import pytest

from m3connect import CollectionSpec, InvalidInputError
from m3connect import colbert_storage as cs
from m3connect.errors import BackendError
from m3connect.fusion import COLBERT_NORM_LIMIT
from m3connect.scoring import colbert_score


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    m = rng.standard_normal((n, dim)).astype(np.float32)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def _clustered(rng: np.random.Generator, centres: int, per: int, dim: int, noise: float = 0.05) -> np.ndarray:
    c = _unit(rng, centres, dim)
    rows = np.repeat(c, per, axis=0) + noise * rng.standard_normal((centres * per, dim)).astype(np.float32)
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("dtype,size", [("float32", 4 * 10), ("float16", 2 * 10), ("int8", 10 + 4), ("binary", 2)])
def test_row_bytes_and_round_trip_shapes(dtype: str, size: int) -> None:
    m = _unit(np.random.default_rng(0), 7, 10)
    raw = cs.to_bytes(m, dtype)
    assert cs.row_bytes(10, dtype) == size and len(raw) == 7 * size
    back = cs.from_bytes(raw, 10, dtype, 7)
    assert back.dtype == np.float32 and back.shape == (7, 10)


def test_float_forms_are_the_plain_casts() -> None:
    m = _unit(np.random.default_rng(1), 5, 16)
    np.testing.assert_array_equal(cs.from_bytes(cs.to_bytes(m, "float32"), 16, "float32"), m)
    np.testing.assert_array_equal(cs.from_bytes(cs.to_bytes(m, "float16"), 16, "float16"),
                                  m.astype(np.float16).astype(np.float32))
    assert cs.to_bytes(m, "float32") == m.astype("<f4").tobytes()


def test_int8_codes_scale_and_stored_form() -> None:
    m = _unit(np.random.default_rng(2), 6, 64)
    codes, scales = cs.encode_int8(m)
    assert codes.dtype == np.int8 and scales.dtype == np.float32 and scales.shape == (6,)
    assert np.abs(codes).max(axis=1).tolist() == [127] * 6  # the largest value of each row maps to +-127
    stored = cs.decode_int8(codes, scales)
    np.testing.assert_array_equal(stored, codes.astype(np.float32) * scales[:, None])
    np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1.0, atol=1e-6)  # the row norm is kept
    assert np.abs(stored - m).max() < 0.5 * scales.max() * 1.01 + 1e-3
    # the byte layout: per row a little-endian float32 scale, then the codes
    raw = cs.to_bytes(m, "int8")
    row = np.frombuffer(raw[: 64 + 4], np.uint8)
    assert row[:4].view("<f4")[0] == scales[0] and np.array_equal(row[4:].view(np.int8), codes[0])
    np.testing.assert_array_equal(cs.from_bytes(raw, 64, "int8", 6), stored)


def test_int8_zero_row_and_idempotence() -> None:
    m = np.zeros((2, 8), np.float32)
    m[1, 3] = 1.0
    stored = cs.from_bytes(cs.to_bytes(m, "int8"), 8, "int8")
    np.testing.assert_array_equal(stored, m)
    once = cs.stored_form(_unit(np.random.default_rng(3), 9, 32), colbert_dtype="int8")
    np.testing.assert_array_equal(cs.stored_form(once, colbert_dtype="int8"), once)


def test_binary_stored_form_is_signs_over_sqrt_dim() -> None:
    m = _unit(np.random.default_rng(4), 4, 20)  # 20 is not a multiple of 8: padding bits
    packed = cs.encode_binary(m)
    assert packed.shape == (4, 3) and packed.dtype == np.uint8
    stored = cs.decode_binary(packed, 20)
    c = np.float32(1 / math.sqrt(20))
    np.testing.assert_array_equal(stored, np.where(m > 0, c, -c).astype(np.float32))
    np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1.0, atol=1e-6)
    # bit t is bit t % 8 (least significant first) of byte t // 8
    first = np.zeros((1, 20), np.float32) - 1
    first[0, 0] = first[0, 9] = 1
    assert cs.encode_binary(first).tolist() == [[1, 2, 0]]


def test_from_bytes_refuses_a_wrong_length() -> None:
    raw = cs.to_bytes(np.ones((2, 8), np.float32) / math.sqrt(8), "int8")
    with pytest.raises(BackendError, match="bytes"):
        cs.from_bytes(raw[:-1], 8, "int8")
    with pytest.raises(BackendError, match="3 rows"):
        cs.from_bytes(raw, 8, "int8", 3)


def test_pool_tokens_counts_and_unit_norm() -> None:
    rng = np.random.default_rng(5)
    m = _unit(rng, 151, 32)
    for factor, expected in ((1, 151), (2, 76), (3, 51), (151, 1), (1000, 1)):
        pooled = cs.pool_tokens(m, factor)
        assert pooled.shape == (expected, 32) and pooled.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(pooled, axis=1), 1.0, atol=1e-6)
    assert cs.pool_tokens(m, 1) is m or np.array_equal(cs.pool_tokens(m, 1), m)
    assert cs.pool_tokens(np.zeros((0, 32), np.float32), 2).shape == (0, 32)
    one = cs.pool_tokens(m[:1] * 0.99, 2)
    np.testing.assert_allclose(one, m[:1], atol=1e-6)  # a single token is renormalised too


def test_pool_tokens_merges_the_clusters_it_should() -> None:
    rng = np.random.default_rng(6)
    m = _clustered(rng, centres=5, per=4, dim=64, noise=0.01)
    order = rng.permutation(len(m))
    pooled = cs.pool_tokens(m[order], 4)  # 20 tokens / 4 = 5 clusters: exactly the 5 centres
    assert pooled.shape == (5, 64)
    means = m.reshape(5, 4, 64).mean(axis=1)
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    sims = pooled @ means.T
    assert np.allclose(np.sort(sims.max(axis=1)), 1.0, atol=1e-5)
    # deterministic, and ordered by each cluster's first token
    np.testing.assert_array_equal(cs.pool_tokens(m[order], 4), pooled)


def test_pool_tokens_is_ward_linkage() -> None:
    from scipy.cluster.hierarchy import fcluster, linkage

    m = _unit(np.random.default_rng(7), 40, 16)
    pooled = cs.pool_tokens(m, 2)
    labels = fcluster(linkage(m.astype(np.float64), "ward"), t=20, criterion="maxclust")
    expected = []
    for label in sorted(set(labels), key=lambda lab: int(np.argmax(labels == lab))):
        mean = m[labels == label].astype(np.float64).mean(axis=0)
        expected.append(mean / np.linalg.norm(mean))
    np.testing.assert_allclose(pooled, np.array(expected, np.float32), atol=1e-6)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_pool_factor_is_checked(bad) -> None:
    with pytest.raises(InvalidInputError, match="colbert_pool_factor"):
        cs.pool_tokens(np.zeros((3, 4), np.float32), bad)
    with pytest.raises(InvalidInputError, match="colbert_pool_factor"):
        CollectionSpec("m", "f", 4, 4, colbert_pool_factor=bad)


def test_stored_form_follows_the_spec_and_stays_within_the_norm_limit() -> None:
    rng = np.random.default_rng(8)
    m = _clustered(rng, centres=30, per=5, dim=128, noise=0.3)
    q = _unit(rng, 12, 128)
    for dtype in cs.COLBERT_DTYPES:
        for factor in (1, 2, 3):
            spec = CollectionSpec("m", "f", 8, 128, colbert_dtype=dtype, colbert_pool_factor=factor)
            stored = cs.stored_form(m, spec)
            assert stored.shape == (math.ceil(150 / factor), 128)
            assert np.linalg.norm(stored, axis=1).max() <= COLBERT_NORM_LIMIT
            np.testing.assert_array_equal(
                stored, cs.stored_form(m, colbert_dtype=dtype, colbert_pool_factor=factor))
            expected = cs.from_bytes(cs.to_bytes(cs.pool_tokens(m, factor), dtype), 128, dtype)
            np.testing.assert_array_equal(stored, expected)
            score = colbert_score(q, stored)
            assert abs(score - colbert_score(q, m)) < (0.5 if dtype == "binary" else 0.1)


def test_spec_json_is_backward_compatible() -> None:
    old = ('{"colbert_dim": 8, "colbert_dtype": "float16", "dense_dim": 8, "fingerprint": "f", "model": "m", '
           '"schema_version": 1}')
    spec = CollectionSpec.from_json(old)
    assert spec.colbert_pool_factor == 1 and spec.colbert_dtype == "float16"
    new = CollectionSpec("m", "f", 8, 1024, colbert_dtype="binary", colbert_pool_factor=3)
    assert CollectionSpec.from_json(new.to_json()) == new
    assert new.colbert_row_bytes == 128 and new.colbert_itemsize == 1
    with pytest.raises(InvalidInputError, match="colbert_dtype"):
        CollectionSpec("m", "f", 8, 8, colbert_dtype="int4")


def test_qdrant_refusal_names_the_engine_and_the_options() -> None:
    spec = CollectionSpec("m", "f", 8, 8, colbert_dtype="int8")
    with pytest.raises(InvalidInputError, match=r"Qdrant cannot store ColBERT as colbert_dtype='int8'.*float32 or fl"):
        cs.require_dtype("Qdrant", spec, ("float32", "float16"))
    cs.require_dtype("Qdrant", CollectionSpec("m", "f", 8, 8, colbert_pool_factor=2), ("float32", "float16"))


def test_long_documents_are_pooled_window_by_window(monkeypatch) -> None:
    """Ward is quadratic in rows: past POOL_WINDOW rows each balanced window pools on its own,
    so clusters never span windows and the result is the windows' results in order."""
    monkeypatch.setattr(cs, "POOL_WINDOW", 40)
    rng = np.random.default_rng(5)
    m = rng.standard_normal((100, 16)).astype(np.float32)
    pooled = cs.pool_tokens(m, 2)
    windows = np.array_split(m, 3)  # ceil(100 / 40) balanced windows: 34, 33, 33 rows
    expected = np.concatenate([cs.pool_tokens(w, 2) for w in windows])
    np.testing.assert_array_equal(pooled, expected)
    assert len(pooled) == 17 + 17 + 17  # one row more than ceil(100 / 2): one per extra window
    assert np.allclose(np.linalg.norm(pooled, axis=1), 1.0, atol=1e-6)
    short = m[:40]  # at the window size: one piece, exactly ceil(n / factor) rows
    assert len(cs.pool_tokens(short, 2)) == 20

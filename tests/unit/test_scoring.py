"""The exact scoring module on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from m3connect import scoring


def test_dense_is_inner_product() -> None:
    assert scoring.dense_score(np.array([0.6, 0.8]), np.array([0.8, 0.6])) == pytest.approx(0.96)


def test_sparse_sums_shared_tokens_only() -> None:
    assert scoring.sparse_score({1: 0.5, 2: 0.25, 9: 1.0}, {2: 0.4, 1: 0.2, 7: 3.0}) == pytest.approx(0.2)
    assert scoring.sparse_score({}, {1: 1.0}) == 0.0


def test_colbert_is_maxsim_over_query_vectors() -> None:
    q = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    p = np.array([[0.8, 0.6], [0.0, 1.0]])
    # max per query row: 0.8, 1.0, max(0.48+0.48, 0.8) = 0.96 -> mean
    assert scoring.colbert_score(q, p) == pytest.approx((0.8 + 1.0 + 0.96) / 3)


def test_colbert_takes_negative_maxima() -> None:
    q = np.array([[1.0, 0.0]])
    p = np.array([[-0.6, 0.8], [-1.0, 0.0]])
    assert scoring.colbert_score(q, p) == pytest.approx(-0.6)


def test_combine_drops_zero_weight_routes() -> None:
    s = {"dense": 0.9, "sparse": 0.1, "colbert": 0.5}
    assert scoring.combine(s, (1, 0, 0)) == pytest.approx(0.9)
    assert scoring.combine(s, (0.4, 0.2, 0.4)) == pytest.approx((0.36 + 0.02 + 0.2) / 1.0)
    assert scoring.combine({"dense": 0.9, "sparse": 0.1}, (1, 1, 0)) == pytest.approx(0.5)


def test_weights_accept_mapping_and_name_active_routes() -> None:
    w = scoring.validate_weights({"dense": 1, "colbert": 2})
    assert w == (1.0, 0.0, 2.0) and w.active_routes == ("dense", "colbert")


@pytest.mark.parametrize("bad", [(1, -1, 0), (0, 0, 0), (1, 2), ("a", 1, 1), {"bm25": 1.0}, (True, 1, 1)])
def test_bad_weights_are_value_errors(bad) -> None:
    with pytest.raises(ValueError):
        scoring.validate_weights(bad)

"""The fusion module's pure parts and the Vectors type."""

from __future__ import annotations

import numpy as np
import pytest

from m3connect import InvalidInputError, Vectors
from m3connect.adapters.base import CollectionSpec
from m3connect.fusion import candidate_routes
from m3connect.scoring import Weights


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ((0.4, 0.2, 0.4), ("dense", "sparse")),  # the paper: re-rank dense and sparse candidates
        ((1, 0, 0), ("dense",)),
        ((1, 0, 1), ("dense",)),
        ((0, 1, 0), ("sparse",)),
        ((0, 1, 1), ("sparse", "colbert")),  # no dense route: every active route generates
        ((0, 0, 1), ("colbert",)),
    ],
)
def test_candidate_routes_follow_the_paper(weights, expected) -> None:
    assert candidate_routes(Weights(*weights)) == expected


def test_candidate_routes_can_be_asked_for() -> None:
    assert candidate_routes(Weights(1, 0, 1), ["dense", "colbert", "dense"]) == ("dense", "colbert")
    with pytest.raises(InvalidInputError, match="candidate_routes"):
        candidate_routes(Weights(1, 0, 0), ["bm25"])
    with pytest.raises(InvalidInputError, match="candidate_routes"):
        candidate_routes(Weights(1, 0, 0), [])


def test_vectors_is_a_mapping_of_routes() -> None:
    v = Vectors(dense=np.ones(4, np.float32), sparse={3: 0.5}, colbert=np.zeros((2, 4), np.float32))
    assert list(v) == ["dense", "sparse", "colbert"] and v["sparse"] == {3: 0.5}
    assert dict(v)["colbert"].shape == (2, 4)
    assert v.nbytes() == 16 + 8 + 32
    assert Vectors.of({"dense": v.dense}).sparse is None
    assert Vectors.of(v) is v
    with pytest.raises(KeyError):
        v["bm25"]
    with pytest.raises(TypeError, match="mapping"):
        Vectors.of([1, 2])


def test_collection_spec_checks_itself() -> None:
    with pytest.raises(InvalidInputError, match="colbert_dtype"):
        CollectionSpec(model="m", fingerprint="f", dense_dim=8, colbert_dim=8, colbert_dtype="int4")
    with pytest.raises(InvalidInputError, match="dense_dim"):
        CollectionSpec(model="m", fingerprint="f", dense_dim=0, colbert_dim=8)
    spec = CollectionSpec(model="m", fingerprint="f", dense_dim=8, colbert_dim=8, colbert_dtype="float16")
    assert CollectionSpec.from_json(spec.to_json()) == spec and spec.colbert_itemsize == 2

"""Bad input on every engine: a one-line M3Error naming the culprit, and the store unchanged.

Each case runs against a filled store; afterwards the count and the stored ids, texts and
metadata are exactly what they were (``_fingerprint``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from typing import Any

import m3connect
from m3connect import M3Store

DOCS = {
    "a": ("Milvus keeps dense and sparse vectors side by side.", {"lang": "en", "n": 1}),
    "b": ("Qdrant stores ColBERT as a multivector.", {"lang": "en", "n": 2}),
    "c": ("OpenSearch scores ColBERT with a painless script.", {"lang": "de", "n": 3}),
}


def _fill(store: M3Store) -> None:
    ids = list(DOCS)
    store.add([DOCS[i][0] for i in ids], ids=ids, metadata=[DOCS[i][1] for i in ids])


def _fingerprint(store: M3Store) -> tuple[int, str]:
    docs = store.get(list(DOCS) + ["x", "new"])
    body = json.dumps([(d.id, d.text, d.metadata) for d in docs], sort_keys=True)
    return store.count(), hashlib.sha256(body.encode()).hexdigest()


Case = tuple[str, Callable[[M3Store], Any], type[Exception], str]

CASES: list[Case] = [
    # texts
    ("texts None", lambda s: s.add(None), m3connect.InvalidTypeError, "texts"),
    ("texts int", lambda s: s.add([7]), m3connect.InvalidTypeError, r"texts\[0\]"),
    ("texts bytes", lambda s: s.add([b"x"]), m3connect.InvalidTypeError, r"texts\[0\]"),
    ("single string", lambda s: s.add("hello"), m3connect.InvalidTypeError, "single string"),
    ("None inside", lambda s: s.add(["ok", None], ids=["new", "x"]), m3connect.InvalidTypeError, r"texts\[1\]"),
    ("empty text", lambda s: s.add([""], ids=["x"]), m3connect.InvalidInputError, r"texts\[0\].*empty"),
    ("blank text", lambda s: s.add(["  \n\t"], ids=["x"]), m3connect.InvalidInputError, r"texts\[0\].*empty"),
    ("NUL", lambda s: s.add(["a\x00b"], ids=["x"]), m3connect.InvalidInputError, r"texts\[0\].*NUL"),
    ("lone surrogate", lambda s: s.add(["a\ud800b"], ids=["x"]), m3connect.InvalidInputError, "surrogate"),
    # ids
    ("id None", lambda s: s.add(["t"], ids=[None]), m3connect.InvalidTypeError, r"ids\[0\]"),
    ("id empty", lambda s: s.add(["t"], ids=[""]), m3connect.InvalidInputError, r"ids\[0\]"),
    ("id float", lambda s: s.add(["t"], ids=[1.5]), m3connect.InvalidTypeError, r"ids\[0\]"),
    ("ids a string", lambda s: s.add(["t"], ids="x"), m3connect.InvalidTypeError, "ids"),
    ("ids too few", lambda s: s.add(["t", "u"], ids=["x"]), m3connect.InvalidInputError, "ids"),
    ("get ids a string", lambda s: s.get("a"), m3connect.InvalidTypeError, "ids"),
    ("delete empty id", lambda s: s.delete([""]), m3connect.InvalidInputError, r"ids\[0\]"),
    # metadata
    ("meta set", lambda s: s.add(["t"], ids=["x"], metadata=[{"k": {1}}]), m3connect.InvalidTypeError, "'k'"),
    ("meta bytes", lambda s: s.add(["t"], ids=["x"], metadata=[{"k": b"v"}]), m3connect.InvalidTypeError, "'k'"),
    ("meta object", lambda s: s.add(["t"], ids=["x"], metadata=[{"k": object()}]), m3connect.InvalidTypeError, "'k'"),
    ("meta NaN", lambda s: s.add(["t"], ids=["x"], metadata=[{"k": math.nan}]), m3connect.InvalidInputError, "NaN"),
    ("meta inf", lambda s: s.add(["t"], ids=["x"], metadata=[{"k": math.inf}]), m3connect.InvalidInputError, "'k'"),
    ("meta dotted key", lambda s: s.add(["t"], ids=["x"], metadata=[{"a.b": 1}]), m3connect.InvalidInputError, "a.b"),
    ("meta quote key", lambda s: s.add(["t"], ids=["x"], metadata=[{'a"b': 1}]), m3connect.InvalidInputError, "key"),
    ("meta $ key", lambda s: s.add(["t"], ids=["x"], metadata=[{"$where": 1}]), m3connect.InvalidInputError, r"\$where"),  # noqa: E501
    ("meta empty key", lambda s: s.add(["t"], ids=["x"], metadata=[{"": 1}]), m3connect.InvalidInputError, "key"),
    ("meta int key", lambda s: s.add(["t"], ids=["x"], metadata=[{1: 1}]), m3connect.InvalidTypeError, "key"),
    ("meta not a dict", lambda s: s.add(["t"], ids=["x"], metadata=["lang=en"]), m3connect.InvalidTypeError, "metadata"),  # noqa: E501
    # a bad item late in a batch: nothing of that batch is written
    ("bad 2nd item", lambda s: s.add(["fine", "t"], ids=["new", "x"], metadata=[{}, {"k": {1}}]),
     m3connect.InvalidTypeError, r"metadata\[1\]"),
    # search arguments
    ("query None", lambda s: s.search(None), m3connect.InvalidTypeError, "query"),
    ("query int", lambda s: s.search(5), m3connect.InvalidTypeError, "query"),
    ("query empty", lambda s: s.search("  "), m3connect.InvalidInputError, "query"),
    ("k 0", lambda s: s.search("x", k=0), m3connect.InvalidInputError, "k must"),
    ("k -1", lambda s: s.search("x", k=-1), m3connect.InvalidInputError, "k must"),
    ("k True", lambda s: s.search("x", k=True), m3connect.InvalidInputError, "k must"),
    ("k 10^7", lambda s: s.search("x", k=10**7), m3connect.InvalidInputError, "k="),
    ("k str", lambda s: s.search("x", k="3"), m3connect.InvalidInputError, "k must"),
    ("depth -5", lambda s: s.search("x", candidate_depth=-5), m3connect.InvalidInputError, "candidate_depth"),
    ("weights None", lambda s: s.search("x", weights=None), m3connect.InvalidTypeError, "weights"),
    ("weights NaN", lambda s: s.search("x", weights=(math.nan, 1, 1)), m3connect.InvalidInputError, "dense"),
    ("weights inf", lambda s: s.search("x", weights=(1, math.inf, 1)), m3connect.InvalidInputError, "sparse"),
    ("weights negative", lambda s: s.search("x", weights=(1, 1, -1)), m3connect.InvalidInputError, "colbert"),
    ("weights zero", lambda s: s.search("x", weights=(0, 0, 0)), m3connect.InvalidInputError, "zero"),
    ("weights 2", lambda s: s.search("x", weights=(1, 1)), m3connect.InvalidInputError, "3 numbers"),
    ("weights str", lambda s: s.search("x", weights="1,1,1"), m3connect.InvalidTypeError, "weights"),
    ("fusion", lambda s: s.search("x", fusion="magic"), m3connect.InvalidInputError, "fusion"),
    # filters
    ("filter op", lambda s: s.search("x", filter={"n": {"$regex": ".*"}}), m3connect.FilterError, r"\$regex"),
    ("filter top op", lambda s: s.search("x", filter={"$not": {"lang": "en"}}), m3connect.FilterError, r"\$not"),
    ("filter empty and", lambda s: s.search("x", filter={"$and": [{}]}), m3connect.FilterError, "empty"),
    ("filter empty in", lambda s: s.search("x", filter={"lang": {"$in": []}}), m3connect.FilterError, "lang"),
    ("filter not dict", lambda s: s.search("x", filter="lang=en"), m3connect.FilterError, "dict"),
    ("filter dotted", lambda s: s.search("x", filter={"a.b": 1}), m3connect.FilterError, "a.b"),
    ("filter list value", lambda s: s.search("x", filter={"lang": ["en"]}), m3connect.FilterError, "lang"),
    ("filter NaN", lambda s: s.search("x", filter={"n": math.nan}), m3connect.FilterError, "NaN"),
]


def test_bad_input_is_refused_and_changes_nothing(store_factory) -> None:
    """All cases on one filled store per engine (a store per case would take minutes)."""
    store = store_factory()
    _fill(store)
    before = _fingerprint(store)
    problems: list[str] = []
    for name, call, error, culprit in CASES:
        try:
            call(store)
        except m3connect.M3Error as exc:
            if not isinstance(exc, error) or not re.search(culprit, str(exc)) or "\n" in str(exc):
                problems.append(f"{name}: {type(exc).__name__}: {exc}")
        except Exception as exc:  # a raw exception escaped
            problems.append(f"{name}: raw {type(exc).__name__}: {exc}")
        else:
            problems.append(f"{name}: accepted")
        if _fingerprint(store) != before:
            problems.append(f"{name}: the stored content changed")
            break
    assert not problems, "\n".join(problems)
    assert len(CASES) >= 50


INJECTIONS = [
    'en" || id != "',
    "en' OR '1'='1",
    'en") or (1 == 1',
    "en\\",
    'en" } } ], "should": [{"match_all": {}}',
    "*",
    "en\nOR lang != ''",
]


def test_filter_values_are_literals(store_factory) -> None:
    store = store_factory()
    _fill(store)
    for value in INJECTIONS:
        for fusion in ("exact", "engine"):
            hits = store.search("ColBERT", k=3, filter={"lang": value}, fusion=fusion)
            assert hits == [], (value, fusion)
            hits = store.search("ColBERT", k=3, filter={"lang": {"$in": [value, "de"]}}, fusion=fusion)
            assert [h.id for h in hits] == ["c"], (value, fusion)
    # a filter on a key no document has matches nothing, without an error
    assert store.search("ColBERT", k=3, filter={"missing_key": 1}) == []


def test_awkward_but_valid_input_round_trips(store_factory) -> None:
    store = store_factory()
    odd_ids = ["C:\\docs\\x.txt", "line\nbreak", 'q"uote', "ünï-çødé/😀", "it's"]
    texts = [f"awkward identifier number {i}" for i in range(len(odd_ids))]
    store.add(texts, ids=odd_ids, metadata=[{"i": i, "tags": ["a", "b"], "nested": {"x": 1.5}} for i in range(5)])
    assert store.count() == 5
    assert [d.id for d in store.get(odd_ids)] == odd_ids
    assert store.get(["C:\\docs\\x.txt"])[0].metadata == {"i": 0, "tags": ["a", "b"], "nested": {"x": 1.5}}
    hit = store.search("awkward identifier number 3", k=1, filter={"i": 3})[0]
    assert hit.id == odd_ids[3]
    store.delete(["C:\\docs\\x.txt", "line\nbreak"])
    assert store.count() == 3
    # duplicate ids in one call: the last one wins, as a sequence of upserts would
    store.add(["first version", "second version"], ids=["dup", "dup"])
    assert store.get(["dup"])[0].text == "second version"

"""The encoder's threaded pipeline (chunked tokenisation, batches finished on a worker thread).

On GPU it is the default; here it is forced on CPU (``_threaded = True``) with the tiny
checkpoint and compared with the serial path. With the batches it cuts made the serial path's
(texts given longest first, no early first batch, no split tail) it must reproduce it bit for
bit; otherwise texts share batches differently and values may differ in the last bits.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from m3connect import M3Encoder
from m3connect.encoder import _Launched
from m3connect.testing import synthetic_corpus
from m3connect.types import EncodeOutput

MAX_LENGTH = 48


def _encoder(path: Path, threaded: bool, same_batches: bool = True) -> M3Encoder:
    enc = M3Encoder(path, device="cpu", dtype="float32", show_progress=False, tokens_per_batch=160)
    enc._threaded = threaded
    enc._first_chunk_texts = 3  # many small chunks: leftovers carried from chunk to chunk
    enc._max_chunk_budgets = 2
    if same_batches:
        enc._early_first_chunk = False
        enc._tail_pieces = 1
    return enc


@pytest.fixture(scope="module")
def serial(tiny_checkpoint: Path) -> M3Encoder:
    return _encoder(tiny_checkpoint, threaded=False)


@pytest.fixture(scope="module")
def threaded(tiny_checkpoint: Path) -> M3Encoder:
    return _encoder(tiny_checkpoint, threaded=True)


@pytest.fixture(scope="module")
def threaded_gpu_style(tiny_checkpoint: Path) -> M3Encoder:
    """The default cutting: an early, unfilled first batch and the last batch split in two."""
    return _encoder(tiny_checkpoint, threaded=True, same_batches=False)


def _texts(n: int, seed: int) -> list[str]:
    texts = synthetic_corpus(n, min_words=0, max_words=70, seed=seed)  # some cut at MAX_LENGTH
    texts[3] = ""
    texts[11] = ""
    return texts


def _sorted_by_length(enc: M3Encoder, texts: list[str]) -> list[str]:
    """Longest first (stable): the chunked batches are then exactly the serial path's batches."""
    ids, _ = enc._tokenize(texts, MAX_LENGTH)
    order = np.argsort(-np.array([len(r) for r in ids]), kind="stable")
    return [texts[i] for i in order]


def _assert_identical(a: EncodeOutput, b: EncodeOutput) -> None:
    assert a.num_tokens == b.num_tokens
    assert a.truncated == b.truncated
    assert (a.dense is None) == (b.dense is None)
    if a.dense is not None and b.dense is not None:
        assert a.dense.dtype == b.dense.dtype and np.array_equal(a.dense, b.dense)
    assert (a.sparse is None) == (b.sparse is None)
    if a.sparse is not None and b.sparse is not None:
        assert a.sparse == b.sparse
        assert [list(d) for d in a.sparse] == [list(d) for d in b.sparse]  # same key order too
    assert (a.colbert is None) == (b.colbert is None)
    if a.colbert is not None and b.colbert is not None:
        assert len(a.colbert) == len(b.colbert)
        for x, y in zip(a.colbert, b.colbert):
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)


def _assert_close(a: EncodeOutput, b: EncodeOutput) -> None:
    assert a.num_tokens == b.num_tokens
    assert a.truncated == b.truncated
    assert a.dense is not None and b.dense is not None
    np.testing.assert_allclose(a.dense, b.dense, atol=1e-5, rtol=0)
    assert a.sparse is not None and b.sparse is not None
    for x, y in zip(a.sparse, b.sparse):
        assert set(x) == set(y)
        assert all(abs(x[k] - y[k]) <= 1e-5 for k in x)
    assert a.colbert is not None and b.colbert is not None
    for x, y in zip(a.colbert, b.colbert):
        assert x.shape == y.shape
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)


@pytest.mark.parametrize("batch_size", [None, 2, 5])
def test_threaded_path_reproduces_serial_path_exactly(
    serial: M3Encoder, threaded: M3Encoder, batch_size, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = _sorted_by_length(serial, _texts(40, seed=11))
    chunks: list[int] = []
    tokenize = threaded._tokenize

    def spy(texts: Any, max_length: int) -> Any:
        chunks.append(len(texts))
        return tokenize(texts, max_length)

    monkeypatch.setattr(threaded, "_tokenize", spy)
    ours = threaded.encode(texts, max_length=MAX_LENGTH, batch_size=batch_size)
    assert len(chunks) >= 3 and sum(chunks) == len(texts)
    ref = serial.encode(texts, max_length=MAX_LENGTH, batch_size=batch_size)
    assert ref.truncated and ref.num_tokens[-1] == 2  # the cases that matter are there
    _assert_identical(ours, ref)


@pytest.mark.parametrize(
    "flags", [(True, False, False), (False, True, False), (False, False, True), (True, True, False)]
)
def test_threaded_path_honours_output_flags(serial: M3Encoder, threaded: M3Encoder, flags) -> None:
    texts = _sorted_by_length(serial, _texts(17, seed=4))
    kw = dict(zip(("return_dense", "return_sparse", "return_colbert"), flags))
    ours = threaded.encode(texts, max_length=MAX_LENGTH, **kw)
    _assert_identical(ours, serial.encode(texts, max_length=MAX_LENGTH, **kw))


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_threaded_path_few_texts(serial: M3Encoder, threaded: M3Encoder, n: int) -> None:
    texts = _texts(12, seed=2)[:n]
    _assert_identical(threaded.encode(texts, max_length=MAX_LENGTH), serial.encode(texts, max_length=MAX_LENGTH))


@pytest.mark.parametrize("batch_size", [None, 7])
def test_threaded_path_unsorted_input_keeps_order(
    serial: M3Encoder, threaded: M3Encoder, threaded_gpu_style: M3Encoder, batch_size
) -> None:
    # Unsorted: chunks batch texts differently from the global sort, so values may differ in the
    # last bits; everything else is exact, and every text lands at its own index.
    texts = _texts(60, seed=5)
    ref = serial.encode(texts, max_length=MAX_LENGTH, batch_size=batch_size)
    alone = serial.encode([texts[41]], max_length=MAX_LENGTH)
    for enc in (threaded, threaded_gpu_style):
        ours = enc.encode(texts, max_length=MAX_LENGTH, batch_size=batch_size)
        _assert_close(ours, ref)
        assert ours.dense is not None and alone.dense is not None
        np.testing.assert_allclose(ours.dense[41], alone.dense[0], atol=1e-5)


def _batch_sizes(enc: M3Encoder, texts: list[str], monkeypatch: pytest.MonkeyPatch) -> list[int]:
    sizes: list[int] = []
    launch = enc._launch

    def spy(rows: list[list[int]], *flags: bool) -> _Launched:
        sizes.append(len(rows))
        return launch(rows, *flags)

    monkeypatch.setattr(enc, "_launch", spy)
    enc.encode(texts, max_length=MAX_LENGTH)
    monkeypatch.undo()
    return sizes


def test_threaded_batches_are_full_but_the_last(
    threaded: M3Encoder, threaded_gpu_style: M3Encoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = ["word " * 200] * 23  # all cut at 48 tokens: 3 texts per 160-token batch
    assert _batch_sizes(threaded, texts, monkeypatch) == [3] * 7 + [2]
    # The first chunk (3 texts) runs at once; the last batch (2 texts, 96 tokens) runs as two,
    # of a quarter budget or more each.
    assert _batch_sizes(threaded_gpu_style, texts, monkeypatch) == [3] * 7 + [1, 1]
    assert _batch_sizes(threaded_gpu_style, texts[:2], monkeypatch) == [1, 1]
    assert _batch_sizes(threaded_gpu_style, texts[:1], monkeypatch) == [1]
    gpu_style = _encoder(threaded.path, threaded=True, same_batches=False)
    gpu_style._first_chunk_texts = 4
    assert _batch_sizes(gpu_style, texts[:10], monkeypatch) == [3, 1, 3, 1, 1, 1]  # early unfilled first batch


@pytest.mark.parametrize("compiled", [False, True])
def test_last_batch_is_split_for_a_short_tail(tiny_checkpoint: Path, compiled: bool) -> None:
    enc = M3Encoder(tiny_checkpoint, device="cpu", dtype="float32", show_progress=False, tokens_per_batch=65536)
    enc.compiled = compiled  # only the cutting is exercised: compiled batches have power-of-two rows
    lengths = np.full(256, 512)  # indexed by every order below
    sizes = [len(b) for b in enc._batches(lengths, np.arange(228), None, tail_pieces=4)]
    assert sizes == ([128, 64, 36] if compiled else [128, 34, 34, 32])  # 100 rows: 3 quarter budgets
    assert [len(b) for b in enc._batches(lengths, np.arange(192), None, tail_pieces=4)] == [128, 32, 32]
    assert [len(b) for b in enc._batches(lengths, np.arange(256), None, tail_pieces=4)] == [128, 32, 32, 32, 32]
    assert [len(b) for b in enc._batches(lengths, np.arange(160), None, tail_pieces=4)] == [128, 32]  # < 1/2
    assert [len(b) for b in enc._batches(lengths, np.arange(256), None)] == [128, 128]


def test_batches_hold_back_an_unfilled_last_batch(serial: M3Encoder) -> None:
    lengths = np.array([40, 40, 40, 40, 40, 40, 40])
    order = np.arange(7)
    rest: list[np.ndarray] = []
    assert [b.tolist() for b in serial._batches(lengths, order, None, rest)] == [[0, 1, 2, 3]]  # 160 // 40
    assert [r.tolist() for r in rest] == [[4, 5, 6]]
    assert [b.tolist() for b in serial._batches(lengths, order, None)] == [[0, 1, 2, 3], [4, 5, 6]]
    rest = []
    assert [b.tolist() for b in serial._batches(lengths, order[:4], None, rest)] == [[0, 1, 2, 3]] and rest == []


def test_out_of_memory_fallback_in_threaded_path(tiny_checkpoint: Path, serial: M3Encoder, monkeypatch) -> None:
    enc = _encoder(tiny_checkpoint, threaded=True)
    launch = enc._launch
    refused: list[int] = []

    def small_only(rows: list[list[int]], *flags: bool) -> _Launched:
        if len(rows) > 2:
            refused.append(len(rows))
            raise torch.cuda.OutOfMemoryError("test: batch too large")
        return launch(rows, *flags)

    monkeypatch.setattr(enc, "_launch", small_only)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    texts = _texts(30, seed=8)
    ours = enc.encode(texts, max_length=MAX_LENGTH)
    assert refused and enc.tokens_per_batch < 160
    _assert_close(ours, serial.encode(texts, max_length=MAX_LENGTH))


def test_worker_errors_reach_the_caller(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    enc = _encoder(tiny_checkpoint, threaded=True)
    finish = enc._finish
    calls = []

    def fail_second(batch: _Launched, helper: Any = None) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("finish failed")
        return finish(batch, helper)

    monkeypatch.setattr(enc, "_finish", fail_second)
    with pytest.raises(ValueError, match="finish failed"):
        enc.encode(_texts(40, seed=9), max_length=MAX_LENGTH)
    assert not [t for t in threading.enumerate() if t.name.startswith("m3connect-")]


def test_tokenizer_errors_reach_the_caller(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    enc = _encoder(tiny_checkpoint, threaded=True)
    tokenize = enc._tokenize

    def fail_late(texts: Any, max_length: int) -> Any:
        if "boom" in texts:
            raise RuntimeError("tokenizer failed")
        return tokenize(texts, max_length)

    monkeypatch.setattr(enc, "_tokenize", fail_late)
    texts = _texts(40, seed=9)
    texts[30] = "boom"
    with pytest.raises(RuntimeError, match="tokenizer failed"):
        enc.encode(texts, max_length=MAX_LENGTH)
    assert not [t for t in threading.enumerate() if t.name.startswith("m3connect-")]


class _Ready:
    """Stands in for the CUDA event of a launched GPU batch."""

    def __init__(self) -> None:
        self.waited = False

    def synchronize(self) -> None:
        self.waited = True


def test_finish_with_a_helper_thread_gives_the_same_results(serial: M3Encoder) -> None:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 60, (5, 40), generator=gen).numpy()
    mask = np.arange(40)[None, :] < np.array([40, 33, 20, 7, 2])[:, None]
    staged = (
        torch.randn(5, 16, generator=gen),
        torch.relu(torch.randn(5, 40, generator=gen)),
        torch.randn(5, 39, 16, generator=gen),
    )
    batch = _Launched(ids, mask, mask.sum(1), staged, _Ready())
    with ThreadPoolExecutor(1) as helper:
        dense, sparse, colbert = serial._finish(batch, helper)
    ref_dense, ref_sparse, ref_colbert = serial._finish(batch)
    assert dense is not None and ref_dense is not None and np.array_equal(dense, ref_dense)
    assert sparse == ref_sparse and sparse is not None and len(sparse[0]) > 3
    assert colbert is not None and ref_colbert is not None
    assert [c.shape for c in colbert] == [(39, 16), (32, 16), (19, 16), (6, 16), (1, 16)]
    assert all(np.array_equal(a, b) for a, b in zip(colbert, ref_colbert))


def test_fetch_copies_staged_outputs_into_ordinary_arrays(serial: M3Encoder) -> None:
    # The GPU branch of _fetch (ready is an event), on CPU tensors standing in for pinned ones.
    gen = torch.Generator().manual_seed(0)
    staged = (torch.randn(4, 8, generator=gen), None, torch.randn(4, 300, 256, generator=gen))
    ready = _Ready()
    batch = _Launched(np.zeros((4, 301), np.int64), np.ones((4, 301), bool), np.full(4, 301), staged, ready)
    dense, sparse, colbert = serial._fetch(batch)
    assert ready.waited and sparse is None
    assert dense is not None and colbert is not None
    for host, t in ((dense, staged[0]), (colbert, staged[2])):
        assert t is not None
        assert host.dtype == np.float32 and host.shape == tuple(t.shape)
        assert np.array_equal(host, t.numpy()) and host.flags.owndata  # a copy, not a view of staging


def test_threaded_path_is_the_gpu_default_for_more_than_a_chunk(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    enc = M3Encoder(tiny_checkpoint, device="cpu", dtype="float32", show_progress=False)
    taken: list[str] = []

    def spy(name: str) -> Any:
        def run(items: list[str], *args: Any) -> Any:
            taken.append(name)
            return np.full(len(items), 2), []

        return run

    monkeypatch.setattr(enc, "_encode_threaded", spy("threaded"))
    monkeypatch.setattr(enc, "_encode_serial", spy("serial"))
    calls = [(dev, n) for dev in ("cpu", "cuda") for n in (2, enc._first_chunk_texts, enc._first_chunk_texts + 1)]
    for dev, n in calls:
        enc.device = torch.device(dev)  # the spies run nothing on it
        enc.encode(["x"] * n, return_dense=False, return_sparse=False, return_colbert=False)
    assert taken == ["serial"] * 5 + ["threaded"]
    enc.device = torch.device("cuda")
    enc._pipeline = False
    enc.encode(["x"] * 100, return_dense=False, return_sparse=False, return_colbert=False)
    assert taken[-1] == "serial"


def test_batches_are_cut_where_padding_would_waste_work(tiny_checkpoint: Path) -> None:
    """Mixed lengths: a batch stops before texts much shorter than its longest (each text is
    padded to it); equal lengths: batches still fill the budget."""
    enc = M3Encoder(tiny_checkpoint, device="cpu", dtype="float32", show_progress=False, tokens_per_batch=4096)
    lengths = np.array([200] * 8 + [40] * 60)  # one budget would hold 20 rows of 200 tokens
    batches = list(enc._batches(lengths, np.arange(len(lengths)), None))
    assert [len(b) for b in batches][:2] == [8, 60]  # 8 long ones alone, then the short ones together
    padded = sum(len(b) * int(lengths[b].max()) for b in batches)
    assert padded == lengths.sum()  # no padding at all here; the budget-only cut padded 12 x 160
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    equal = np.full(100, 64)
    assert [len(b) for b in enc._batches(equal, np.arange(100), None)] == [64, 36]
    enc.compiled = True  # static shapes: budget cuts only
    assert [len(b) for b in enc._batches(lengths, np.arange(len(lengths)), None)][0] == 4096 // enc._compile_width(200)

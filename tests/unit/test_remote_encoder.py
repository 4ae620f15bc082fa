"""``m3connect serve`` and ``RemoteEncoder``: parity with the local encoder, the store through the
server, bad requests, backpressure, draining, a killed server, and a client without torch."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("httpx")
pytest.importorskip("msgpack")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

import httpx  # noqa: E402

import m3connect  # noqa: E402
from m3connect import wire  # noqa: E402
from m3connect.cli import main  # noqa: E402
from m3connect.server import BackgroundServer, Limits, create_app, running  # noqa: E402
from m3connect.testing import sample_corpus  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TEXTS = [d["text"] for d in sample_corpus()[:12]] + ["", "x", "river valley rain " * 60]


@pytest.fixture(scope="module")
def server(encoder) -> Iterator[BackgroundServer]:
    with running(encoder, Limits(max_texts_per_request=64, max_text_chars=20_000)) as srv:
        yield srv


@pytest.fixture(scope="module")
def remote(server) -> Iterator[m3connect.RemoteEncoder]:
    with m3connect.RemoteEncoder(server.url) as enc:
        yield enc


class Gated:
    """Wraps an encoder; ``encode`` blocks until ``gate`` opens and records each call's size."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.calls: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def encode(self, texts: list[str], **kwargs: Any) -> Any:
        self.calls.append(len(texts))
        self.entered.set()
        assert self.gate.wait(30), "test gate never opened"
        return self.inner.encode(texts, **kwargs)


def _wait(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def _post_in_thread(url: str, body: dict[str, Any], results: list[Any], *, tagged: bool = False) -> threading.Thread:
    def go() -> None:
        response = httpx.post(url + "/v1/encode", json=body, timeout=60)
        results.append((body, response) if tagged else response)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


def assert_sparse_close(a: list[dict[int, float]], b: list[dict[int, float]], atol: float = 1e-5) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y)
        assert all(abs(x[k] - y[k]) <= atol for k in x)


def assert_same(a: Any, b: Any, atol: float = 1e-5) -> None:
    """Equal to 1e-5: the server batches texts differently, which moves fp32 results by ~1e-7."""
    assert a.num_tokens == b.num_tokens and a.truncated == b.truncated
    np.testing.assert_allclose(a.dense, b.dense, atol=atol, rtol=0)
    assert_sparse_close(a.sparse, b.sparse, atol)
    assert len(a.colbert) == len(b.colbert)
    for x, y in zip(a.colbert, b.colbert):
        assert x.shape == y.shape
        np.testing.assert_allclose(x, y, atol=atol, rtol=0)


# -- parity -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["m3connect.wire", "m3connect.remote", "m3connect.server"])
def test_modules_export_what_they_list(name):
    import importlib

    module = importlib.import_module(name)
    assert module.__all__ and all(hasattr(module, n) for n in module.__all__)


def test_remote_matches_local_encoder(encoder, remote):
    assert isinstance(remote, m3connect.Encoder)
    for name in ("fingerprint", "model_name", "dense_dim", "colbert_dim", "model_max_length"):
        assert getattr(remote, name) == getattr(encoder, name), name
    assert remote.compute_dtype == encoder.compute_dtype == "float32"
    for max_length in (None, 16, 512):
        assert_same(remote.encode(TEXTS, max_length=max_length), encoder.encode(TEXTS, max_length=max_length))
    assert remote.encode(TEXTS, max_length=16).truncated  # the long text was cut
    q_local, q_remote = encoder.encode_one("hybrid search"), remote.encode_one("hybrid search")
    np.testing.assert_allclose(q_remote.dense, q_local.dense, atol=1e-5)
    assert q_remote.dense.dtype == np.float32 and q_remote.colbert.dtype == np.float32


def test_outputs_selection_chunking_and_fp16(encoder, server):
    local = encoder.encode(TEXTS)
    with m3connect.RemoteEncoder(server.url, texts_per_request=4, concurrency=3) as small:
        assert_same(small.encode(TEXTS), local)  # 4 requests in flight, rows back in order
        out = small.encode(TEXTS, return_dense=False, return_colbert=False)
        assert out.dense is None and out.colbert is None
        assert_sparse_close(out.sparse, local.sparse)
        empty = small.encode([])
        assert empty.dense.shape == (0, encoder.dense_dim) and empty.sparse == [] and len(empty) == 0
    with m3connect.RemoteEncoder(server.url, dtype="float16") as half:
        out = half.encode(TEXTS)
        assert out.dense.dtype == np.float32
        np.testing.assert_allclose(out.dense, local.dense, atol=2e-3)
        assert_sparse_close(out.sparse, local.sparse)  # sparse weights always travel as float32
        for x, y in zip(out.colbert, local.colbert):
            np.testing.assert_allclose(x, y, atol=2e-3)


def test_compute_score_matches_local(encoder, remote):
    pairs = [("what is sparse retrieval", TEXTS[0]), ("rain", TEXTS[5]), ("", "x")]
    for weights in [(1, 1, 1), (0.4, 0.2, 0.4)]:
        a, b = remote.compute_score(pairs, weights), encoder.compute_score(pairs, weights)
        assert set(a) == set(b)
        for key in a:
            np.testing.assert_allclose(a[key], b[key], atol=1e-5)


def test_json_form_for_curl(encoder, server):
    r = httpx.post(server.url + "/v1/encode", json={"texts": ["hello world"], "outputs": ["dense", "sparse"]})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["fingerprint"] == encoder.fingerprint and "colbert" not in body
    out = wire.output_from_json(body)
    local = encoder.encode(["hello world"])
    np.testing.assert_allclose(out.dense, local.dense, atol=1e-5)
    assert_sparse_close(out.sparse, local.sparse)
    # msgpack in, JSON out when Accept says so
    r = httpx.post(server.url + "/v1/encode", content=wire.packb({"texts": ["a"]}),
                   headers={"Content-Type": "application/msgpack", "Accept": "application/json"})
    assert r.status_code == 200 and r.json()["n"] == 1


def test_info_health_metrics(encoder, server, remote):
    info = httpx.get(server.url + "/v1/info").json()
    assert info["fingerprint"] == encoder.fingerprint and info["dense_dim"] == encoder.dense_dim
    assert info["compute_dtype"] == "float32" and info["max_length"] == encoder.max_length
    assert httpx.get(server.url + "/healthz").status_code == 200
    assert httpx.get(server.url + "/readyz").status_code == 200 and remote.health()
    remote.encode(TEXTS[:3])
    text = httpx.get(server.url + "/metrics").text
    for name in ("m3_queue_texts ", "m3_batch_texts_bucket", "m3_batch_tokens_bucket", "m3_tokens_total",
                 "m3_request_latency_seconds_bucket", "m3_tokens_per_second", 'm3_requests_total{code="200"}'):
        assert name in text, name


# -- the store through the server ---------------------------------------------------------------


def test_store_end_to_end_and_fingerprint_check(tmp_path, encoder, remote, tiny_checkpoint):
    uri = f"qdrant://{tmp_path}/q"
    docs = sample_corpus()
    query = "sparse vectors in Qdrant"
    with m3connect.connect(uri, "docs", encoder) as store:  # written by the local model
        store.add(docs[:20])
    with m3connect.connect(uri, "docs", remote) as store:  # the same model, served: accepted
        store.add(docs[20:])
        assert store.count() == len(docs)
        hits = store.search(query, k=5)
        local_hits = store.search_by_vectors(encoder.encode_one(query), k=5)
        assert [h.id for h in hits] == [h.id for h in local_hits]
        np.testing.assert_allclose([h.score for h in hits], [h.score for h in local_hits], atol=1e-5)
    with m3connect.connect("qdrant://:memory:", "mem", remote) as store:
        store.add(docs)
        assert store.search(docs[3]["text"], k=1)[0].id == docs[3]["id"]

    from m3connect.testing import make_tiny_checkpoint

    other = m3connect.M3Encoder(make_tiny_checkpoint(tmp_path / "other", seed=1), device="cpu", dtype="float32")
    with running(other) as srv, m3connect.RemoteEncoder(srv.url) as wrong:
        assert wrong.fingerprint != encoder.fingerprint
        with pytest.raises(m3connect.SchemaMismatchError, match="fingerprint"):
            m3connect.connect(uri, "docs", wrong)


def test_cli_with_remote_model(capsys, tmp_path, server, encoder):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in sample_corpus()), encoding="utf-8")
    base = ["--uri", f"qdrant://{tmp_path}/q", "--collection", "docs", "--model", server.url]
    assert main(["ingest", str(path), *base, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["written"] == 40
    assert main(["search", "rain", *base, "--json", "-k", "3"]) == 0
    assert len(json.loads(capsys.readouterr().out)["hits"]) == 3
    assert main(["info", *base, "--json"]) == 0
    enc = json.loads(capsys.readouterr().out)["encoder"]
    assert enc["fingerprint"] == encoder.fingerprint and enc["compatible"] is True
    assert main(["search", "rain", *base, "--device", "cpu"]) == 2
    assert "--device and --dtype apply to a local model" in capsys.readouterr().err
    assert main(["serve", "--model", server.url]) == 2
    assert "serve needs a local model" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path), "--max-queue", "0"]) == 2
    assert "--max-queue must be >= 1" in capsys.readouterr().err


# -- bad requests -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"", 400, "the body is empty"),
        ([1, 2], 422, "must be an object"),
        ({"text": ["a"]}, 422, "unknown field 'text'"),
        ({"outputs": ["dense"]}, 422, "'texts' is missing"),
        ({"texts": "a"}, 422, "'texts' must be a list of strings, got str"),
        ({"texts": []}, 422, "'texts' is empty"),
        ({"texts": ["a", 3]}, 422, "texts[1] is int, not a string"),
        ({"texts": [None]}, 422, "texts[0] is null"),
        ({"texts": ["a" * 20_001]}, 422, "texts[0] has 20001 characters; the limit is 20000"),
        ({"texts": ["a"] * 65}, 413, "65 texts in one request; the limit is 64"),
        ({"texts": ["a"], "max_length": "512"}, 422, "'max_length' must be an int, got str"),
        ({"texts": ["a"], "max_length": True}, 422, "'max_length' must be an int"),
        ({"texts": ["a"], "max_length": 10**6}, 422, "'max_length' must be in [2, 8192]"),
        ({"texts": ["a"], "outputs": ["dense", "lexical"]}, 422, "unknown output 'lexical'"),
        ({"texts": ["a"], "outputs": []}, 422, "'outputs' is empty"),
        ({"texts": ["a"], "outputs": "dense"}, 422, "'outputs' must be a list"),
        ({"texts": ["a"], "dtype": "int8"}, 422, "'dtype' must be 'float32' or 'float16'"),
        ({"texts": ["a b c d e f"], "max_length": 4, "truncate": False}, 422, "exceed max_length=4"),
    ],
)
def test_bad_requests_get_4xx_with_one_line_reason(server, body, status, reason):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + "/v1/encode", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert reason in err and "\n" not in err


def test_bad_msgpack_oversize_body_wrong_method(encoder):
    app = create_app(encoder, Limits(max_body_bytes=1000))
    with BackgroundServer(app) as srv:
        r = httpx.post(srv.url + "/v1/encode", content=b"\xc1\xc1", headers={"Content-Type": "application/msgpack"})
        assert r.status_code == 400 and "not valid msgpack" in r.json()["error"]
        r = httpx.post(srv.url + "/v1/encode", json={"texts": ["a" * 2000]})
        assert r.status_code == 413 and "the limit is 1000" in r.json()["error"]
        assert httpx.get(srv.url + "/v1/encode").status_code == 405
        with m3connect.RemoteEncoder(srv.url) as enc:  # the client surfaces 4xx as M3 errors
            with pytest.raises(m3connect.InvalidInputError, match="413"):
                enc.encode(["a" * 2000])
            with pytest.raises(m3connect.InvalidTypeError):
                enc.encode("not a list")  # refused before any request
            with pytest.raises(m3connect.InvalidInputError, match="max_length"):
                enc.encode(["a"], max_length=1)


# -- load: batching, backpressure, draining ----------------------------------------------------


def test_concurrent_requests_share_batches(encoder):
    gated = Gated(encoder)
    with running(gated, Limits(batch_window_ms=0)) as srv:
        first: list[Any] = []
        t0 = _post_in_thread(srv.url, {"texts": ["warm"]}, first)
        assert gated.entered.wait(10)  # the worker is busy with the first request
        results: list[Any] = []
        threads = [_post_in_thread(srv.url, {"texts": [f"text {i}", "rain"]}, results, tagged=True)
                   for i in range(8)]
        _wait(lambda: srv.app.state.m3.batcher.pending_texts == 16)
        gated.gate.set()
        for t in [t0, *threads]:
            t.join(30)
    assert first[0].status_code == 200 and len(results) == 8
    assert gated.calls == [1, 16]  # eight clients' requests went through the model as one batch
    for body, response in results:  # and each got its own rows back
        assert response.status_code == 200
        assert_same(wire.output_from_json(response.json()), encoder.encode(body["texts"]))


def test_full_queue_gets_429_with_retry_after(encoder):
    gated = Gated(encoder)
    with running(gated, Limits(max_queue=4, batch_window_ms=0)) as srv:
        results: list[Any] = []
        threads = [_post_in_thread(srv.url, {"texts": ["a", "b", "c", "d"]}, results)]
        assert gated.entered.wait(10)
        threads.append(_post_in_thread(srv.url, {"texts": ["e", "f", "g", "h"]}, results))
        _wait(lambda: srv.app.state.m3.batcher.pending_texts == 4)
        r = httpx.post(srv.url + "/v1/encode", json={"texts": ["late"]})
        assert r.status_code == 429
        assert int(r.headers["Retry-After"]) >= 1 and "queue is full" in r.json()["error"]
        assert httpx.get(srv.url + "/readyz").status_code == 503
        with m3connect.RemoteEncoder(srv.url, retries=0) as enc:
            with pytest.raises(m3connect.EncoderUnavailableError, match="busy"):
                enc.encode(["late"])
        assert 'm3_rejected_total{reason="queue_full"}' in httpx.get(srv.url + "/metrics").text
        gated.gate.set()
        for t in threads:
            t.join(30)
        assert [r.status_code for r in results] == [200, 200]
        with m3connect.RemoteEncoder(srv.url) as enc:
            assert len(enc.encode(["now there is room"])) == 1


def test_request_of_a_client_that_hung_up_is_dropped(encoder):
    gated = Gated(encoder)
    with running(gated, Limits(batch_window_ms=0)) as srv:
        results: list[Any] = []
        t = _post_in_thread(srv.url, {"texts": ["first"]}, results)
        assert gated.entered.wait(10)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/encode", json={"texts": ["impatient", "client"]}, timeout=0.5)
        _wait(lambda: srv.app.state.m3.batcher.pending_texts == 0)
        gated.gate.set()
        t.join(30)
        assert results[0].status_code == 200
        _wait(lambda: 'm3_requests_total{code="499"} 1.0' in httpx.get(srv.url + "/metrics").text)
    assert gated.calls == [1]  # the abandoned request never reached the model


def test_graceful_shutdown_drains_in_flight_work(encoder):
    gated = Gated(encoder)
    srv = BackgroundServer(create_app(gated, Limits(batch_window_ms=0))).start()
    results: list[Any] = []
    threads = [_post_in_thread(srv.url, {"texts": ["first"]}, results)]
    assert gated.entered.wait(10)
    threads.append(_post_in_thread(srv.url, {"texts": ["queued", "too"]}, results))
    _wait(lambda: srv.app.state.m3.batcher.pending_texts == 2)
    stopper = threading.Thread(target=srv.stop, daemon=True)
    stopper.start()
    _wait(lambda: srv.app.state.m3.batcher.draining)
    time.sleep(0.2)
    gated.gate.set()
    for t in threads:
        t.join(30)
    stopper.join(30)
    assert not stopper.is_alive()
    assert sorted(len(r.json()["dense"]) for r in results) == [1, 2]  # both answered in full
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.url + "/healthz")


def test_stopped_server_gives_a_clear_m3_error(encoder):
    srv = BackgroundServer(create_app(encoder)).start()
    enc = m3connect.RemoteEncoder(srv.url)
    assert len(enc.encode(["ok"])) == 1
    srv.stop()
    with pytest.raises(m3connect.EncoderUnavailableError, match="cannot reach the encoder server") as info:
        enc.encode(["gone"])
    assert isinstance(info.value, ConnectionError) and isinstance(info.value, m3connect.BackendUnavailableError)
    with pytest.raises(m3connect.EncoderUnavailableError, match="is 'm3connect serve' running"):
        m3connect.RemoteEncoder(srv.url)


# -- a client without torch, a server in its own process ----------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


NO_TORCH = textwrap.dedent(
    """
    import sys
    for name in ("torch", "transformers", "tokenizers"):
        sys.modules[name] = None  # importing any of them now fails
    """
)

CLIENT = NO_TORCH + textwrap.dedent(
    """
    import json, tempfile
    import m3connect
    from m3connect.cli import main
    from m3connect.testing import sample_corpus

    url, model_dir = sys.argv[1], sys.argv[2]
    try:
        m3connect.M3Encoder(model_dir)
        raise SystemExit("M3Encoder loaded without torch?")
    except m3connect.MissingDependencyError as exc:
        assert "pip install 'm3connect[encoder]'" in str(exc), exc
    enc = m3connect.RemoteEncoder(url)
    docs = sample_corpus()
    with m3connect.connect("qdrant://:memory:", "docs", enc) as store:
        store.add(docs)
        hits = store.search(docs[7]["text"], k=3)
        assert hits[0].id == docs[7]["id"], hits
    d = tempfile.mkdtemp()
    with open(d + "/docs.jsonl", "w") as fh:
        fh.writelines(json.dumps(x) + "\\n" for x in docs[:10])
    base = ["--uri", "qdrant+local://" + d + "/q", "--collection", "c", "--model", url]
    assert main(["ingest", d + "/docs.jsonl", *base, "--no-progress"]) == 0
    assert main(["search", "rain", *base, "-k", "2"]) == 0
    loaded = [m for m in ("torch", "transformers") if sys.modules.get(m) is not None]
    assert not loaded, loaded
    print("CLIENT-OK", enc.fingerprint)
    """
)


def test_torch_free_client_against_a_server_process(tiny_checkpoint, encoder):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "m3connect.cli", "serve", "--model", str(tiny_checkpoint), "--port", str(port),
         "--device", "cpu", "--dtype", "float32", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        result = subprocess.run([sys.executable, "-c", CLIENT, url, str(tiny_checkpoint)],
                                capture_output=True, text=True, timeout=180, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"CLIENT-OK {encoder.fingerprint}" in result.stdout

        # The server dies hard: the client gets an M3 error that says so, not a raw httpx one.
        remote = m3connect.RemoteEncoder(url)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        with pytest.raises(m3connect.EncoderUnavailableError, match="cannot reach the encoder server"):
            remote.encode(["after the crash"])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.slow
def test_serve_benchmark_quick(tmp_path):
    """``benchmarks/serve.py`` runs end to end and writes its report (tiny model, a few requests)."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "serve.py"), "--quick", "--requests", "8", "--reps", "1",
         "--clients", "1,16", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    [report] = tmp_path.glob("serve-*.json")
    data = json.loads(report.read_text())
    assert set(data["rows"]) == {"in-process", "serve-1", "serve-16"}
    tokens = {row["best"]["tokens"] for row in data["rows"].values()}
    assert len(tokens) == 1 and tokens.pop() > 0  # every row encoded the same texts
    assert data["rows"]["serve-16"]["best"]["p95_ms"] > 0 and "Target" in data["verdict"]
    assert report.with_suffix(".md").is_file()


def test_connect_takes_a_server_url_as_encoder(tmp_path, server, encoder) -> None:
    from m3connect import InvalidInputError, connect

    with pytest.raises(InvalidInputError, match="server URL"):
        connect("qdrant://:memory:", collection="c", encoder="not-a-url")
    uri = f"qdrant://{tmp_path}/url"
    with connect(uri, collection="c", encoder=server.url) as store:
        store.add(["served by url"], ids=["u"])
        assert store.search("served", k=1)[0].id == "u"
    with connect(uri, collection="c", encoder=encoder) as store:  # same model, local: accepted
        assert store.count() == 1

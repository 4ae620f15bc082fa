"""``m3connect serve``: one process holds the model, many clients share it over HTTP.

Requests from all clients go into one bounded queue. A single worker thread runs the model: each
round it takes everything queued (up to ``max_round_texts``), groups it by ``max_length`` and
encodes each group with one ``encoder.encode`` call, i.e. the encoder's own length-sorted
token-budget batches. Requests that arrive while a round runs are packed into the next one, so
many small concurrent requests cost about what one large batch does.

Endpoints:

* ``POST /v1/encode``: ``{"texts": [...], "outputs": ["dense", "sparse", "colbert"],
  "max_length": 512, "dtype": "float32" | "float16", "truncate": true}`` as JSON or msgpack
  (``Content-Type: application/msgpack``); the answer is msgpack with raw numpy bytes when the
  request was msgpack or ``Accept`` names msgpack, JSON otherwise (see :mod:`m3connect.wire`).
* ``GET /v1/info``: model name, fingerprint, dims, max length, compute dtype, limits.
* ``GET /healthz`` (liveness) and ``GET /readyz`` (readiness: 503 while draining or saturated).
* ``GET /metrics``: Prometheus text: queue depth, batch sizes, tokens, latency histograms.

A full queue answers 429 with ``Retry-After``; a draining server 503. Malformed bodies get 400,
wrong types or values 422, too many texts or bytes 413, each with a one-line ``{"error": ...}``.
On SIGTERM/SIGINT the server stops accepting connections, finishes every queued and running
request, then exits.

>>> app = create_app(M3Encoder("BAAI/bge-m3"))              # doctest: +SKIP
>>> serve("BAAI/bge-m3", host="127.0.0.1", port=8080)       # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

from .errors import InvalidInputError, M3Error, MissingDependencyError
from .types import ROUTES, EncodeOutput
from .wire import (
    JSON,
    MSGPACK,
    WIRE_DTYPES,
    WIRE_VERSION,
    check_outputs,
    output_to_binary,
    output_to_json,
    packb,
    slice_output,
    unpackb,
)

try:
    import prometheus_client as prom
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError.for_extra(f"{exc.name} (needed by 'm3connect serve')", "serve") from exc

__all__ = ["Limits", "create_app", "serve", "BackgroundServer", "running"]

logger = logging.getLogger(__name__)

_MSGPACK_TYPES = {MSGPACK, "application/x-msgpack", "application/vnd.msgpack"}
_DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16"}
_FIELDS = {"texts", "outputs", "max_length", "dtype", "truncate"}


@dataclass
class Limits:
    """What one server accepts and holds.

    Attributes:
        max_queue: texts waiting to be encoded (all clients together); beyond it, 429.
        max_texts_per_request: texts in one request; beyond it, 413.
        max_text_chars: characters in one text (default: 32 per token of the model's limit).
        max_body_bytes: bytes of one request body; beyond it, 413.
        batch_window_ms: after an idle spell, how long the first request waits for others to
            join its batch.
        gather_ms: after a batch, when fewer requests wait than that batch held (its clients
            are still reading their answers and sending the next), how long the model may wait
            for them to catch up, at most (and at most 5% of that batch's time); the wait ends
            as soon as they are back. Bigger batches pack texts of similar length together.
        max_round_texts: texts taken into one encoder call.
        drain_timeout_s: on shutdown, how long in-flight requests may take to finish.
    """

    max_queue: int = 4096
    max_texts_per_request: int = 512
    max_text_chars: int | None = None
    max_body_bytes: int = 32 * 1024 * 1024
    batch_window_ms: float = 2.0
    gather_ms: float = 50.0
    max_round_texts: int = 1024
    drain_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("max_queue", "max_texts_per_request", "max_body_bytes", "max_round_texts"):
            if int(getattr(self, name)) < 1:
                raise InvalidInputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_window_ms < 0 or self.gather_ms < 0:
            raise InvalidInputError("batch_window_ms and gather_ms must be >= 0")
        self.max_texts_per_request = min(self.max_texts_per_request, self.max_queue)


class _Reject(Exception):
    """A request the server answers with a 4xx/5xx and a one-line reason."""

    def __init__(self, status: int, message: str, *, kind: str = "InvalidInputError",
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.retry_after = retry_after


@dataclass(eq=False)
class _Job:
    texts: list[str]
    max_length: int
    flags: tuple[bool, bool, bool]
    future: asyncio.Future[EncodeOutput]
    enqueued: float = field(default_factory=time.perf_counter)
    queued: bool = True  # counted in the batcher's pending_texts


class _Metrics:
    def __init__(self) -> None:
        self.registry = prom.CollectorRegistry(auto_describe=True)
        r = self.registry
        self.queue_texts = prom.Gauge("m3_queue_texts", "Texts waiting to be encoded", registry=r)
        self.queue_requests = prom.Gauge("m3_queue_requests", "Requests waiting to be encoded", registry=r)
        self.running_texts = prom.Gauge("m3_running_texts", "Texts in the encoder call now running", registry=r)
        self.batch_texts = prom.Histogram(
            "m3_batch_texts", "Texts per encoder call (one dynamic batch)", registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
        )
        self.batch_requests = prom.Histogram(
            "m3_batch_requests", "Requests packed into one encoder call", registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.batch_tokens = prom.Histogram(
            "m3_batch_tokens", "Tokens per encoder call", registry=r,
            buckets=tuple(2**i for i in range(4, 21)),
        )
        self.encode_seconds = prom.Histogram(
            "m3_encode_seconds", "Wall time of one encoder call", registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.latency = prom.Histogram(
            "m3_request_latency_seconds", "Encode request latency, body read to response built", registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.queue_wait = prom.Histogram(
            "m3_queue_wait_seconds", "Time a request waits before its encoder call starts", registry=r,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.tokens = prom.Counter("m3_tokens", "Tokens encoded", registry=r)
        self.texts = prom.Counter("m3_texts", "Texts encoded", registry=r)
        self.tokens_per_second = prom.Gauge(
            "m3_tokens_per_second", "Tokens per second of the encoder (moving average over calls)", registry=r
        )
        self.requests = prom.Counter("m3_requests", "Encode requests answered, by status", ["code"], registry=r)
        self.rejected = prom.Counter("m3_rejected", "Requests refused for load", ["reason"], registry=r)


class _Batcher:
    """The bounded queue and the one worker thread that runs the model."""

    def __init__(self, encoder: Any, limits: Limits, metrics: _Metrics) -> None:
        self.encoder = encoder
        self.limits = limits
        self.metrics = metrics
        self.pending: deque[_Job] = deque()
        self.pending_texts = 0
        self.pending_requests = 0
        self.draining = False
        self._closing = False
        self._texts_per_s = 0.0  # moving average, for Retry-After
        self._tokens_per_s = 0.0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="m3-encoder")
        self._task = asyncio.create_task(self._loop(), name="m3-batcher")

    async def close(self) -> None:
        """Finish everything queued, then stop the worker."""
        self.draining = True
        self._closing = True
        if self._wake is not None:
            self._wake.set()
        if self._task is not None:
            await self._task
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def retry_after(self) -> int:
        if self._texts_per_s <= 0:
            return 1
        return max(1, min(60, math.ceil(self.pending_texts / self._texts_per_s)))

    def submit(self, texts: list[str], max_length: int, flags: tuple[bool, bool, bool]) -> asyncio.Future[EncodeOutput]:
        if self.draining:
            self.metrics.rejected.labels("draining").inc()
            raise _Reject(503, "the server is shutting down; retry on another replica",
                          kind="EncoderUnavailableError", retry_after=self.retry_after())
        if self.pending_texts + len(texts) > self.limits.max_queue:
            self.metrics.rejected.labels("queue_full").inc()
            raise _Reject(
                429,
                f"the queue is full ({self.pending_texts} texts waiting, limit {self.limits.max_queue}); retry later",
                kind="EncoderUnavailableError", retry_after=self.retry_after(),
            )
        future: asyncio.Future[EncodeOutput] = asyncio.get_running_loop().create_future()
        job = _Job(texts, max_length, flags, future)
        future.add_done_callback(lambda f: self._dequeue(job) if f.cancelled() else None)
        self.pending.append(job)
        self.pending_texts += len(texts)
        self.pending_requests += 1
        self._gauges()
        assert self._wake is not None
        self._wake.set()
        return future

    def _gauges(self) -> None:
        self.metrics.queue_texts.set(self.pending_texts)
        self.metrics.queue_requests.set(self.pending_requests)

    def _dequeue(self, job: _Job) -> None:
        """Stop counting a job as waiting (taken into a round, or its client hung up)."""
        if job.queued:
            job.queued = False
            self.pending_texts -= len(job.texts)
            self.pending_requests -= 1
            self._gauges()

    def _take(self) -> list[_Job]:
        jobs: list[_Job] = []
        count = 0
        while self.pending and (not jobs or count + len(self.pending[0].texts) <= self.limits.max_round_texts):
            job = self.pending.popleft()
            if job.future.done():  # cancelled: the client went away
                self._dequeue(job)
                continue
            count += len(job.texts)
            self._dequeue(job)
            jobs.append(job)
        self._gauges()
        return jobs

    async def _gather(self, want: int, seconds: float) -> None:
        """Wait until ``want`` requests are queued, or ``seconds`` have passed."""
        assert self._wake is not None
        deadline = time.perf_counter() + seconds
        while self.pending_requests < want and not self._closing:
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except asyncio.TimeoutError:
                return

    async def _loop(self) -> None:
        assert self._wake is not None
        window = self.limits.batch_window_ms / 1000
        last_requests, last_seconds = 0, 0.0
        while True:
            if not self.pending:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                if window and not self._closing:
                    await asyncio.sleep(window)  # let requests sent together share the first batch
                continue
            if 0 < self.pending_requests < last_requests and self.limits.gather_ms:
                # Under a steady load the clients of the last batch are about to send again.
                await self._gather(last_requests, min(self.limits.gather_ms / 1000, 0.05 * last_seconds))
            started = time.perf_counter()
            jobs = self._take()
            last_requests = len(jobs)
            groups: dict[int, list[_Job]] = {}
            for job in jobs:
                groups.setdefault(job.max_length, []).append(job)
            for max_length, group in groups.items():
                await self._run_group(max_length, group)
            last_seconds = time.perf_counter() - started

    async def _run_group(self, max_length: int, group: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        flags = tuple(any(j.flags[i] for j in group) for i in range(3))
        texts = list(chain.from_iterable(j.texts for j in group))
        started = time.perf_counter()
        for job in group:
            self.metrics.queue_wait.observe(started - job.enqueued)
        self.metrics.running_texts.set(len(texts))
        try:
            out: EncodeOutput = await loop.run_in_executor(self._executor, self._encode, texts, max_length, flags)
        except BaseException as exc:  # noqa: BLE001 - every waiting client must hear of it
            for job in group:
                if not job.future.done():
                    job.future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            self.metrics.running_texts.set(0)
        seconds = max(time.perf_counter() - started, 1e-9)
        tokens = int(sum(out.num_tokens))
        m = self.metrics
        m.encode_seconds.observe(seconds)
        m.batch_texts.observe(len(texts))
        m.batch_requests.observe(len(group))
        m.batch_tokens.observe(tokens)
        m.tokens.inc(tokens)
        m.texts.inc(len(texts))
        alpha = 0.3
        self._tokens_per_s = (
            tokens / seconds if not self._tokens_per_s
            else (1 - alpha) * self._tokens_per_s + alpha * tokens / seconds
        )
        self._texts_per_s = (
            len(texts) / seconds if not self._texts_per_s
            else (1 - alpha) * self._texts_per_s + alpha * len(texts) / seconds
        )
        m.tokens_per_second.set(self._tokens_per_s)
        start = 0
        for job in group:
            stop = start + len(job.texts)
            if not job.future.done():
                job.future.set_result(slice_output(out, start, stop))
            start = stop

    def _encode(self, texts: list[str], max_length: int, flags: tuple[bool, ...]) -> EncodeOutput:
        out: EncodeOutput = self.encoder.encode(
            texts, max_length=max_length, return_dense=flags[0], return_sparse=flags[1],
            return_colbert=flags[2], show_progress=False,
        )
        return out


# -- request handling -------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:500]


def _error(
    status: int, message: str, *, kind: str = "InvalidInputError", retry_after: int | None = None
) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    body = {"error": _one_line(message), "type": kind, "status": status}
    return JSONResponse(body, status_code=status, headers=headers)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


class _App:
    """Request handlers around one encoder and its batcher."""

    def __init__(self, encoder: Any, limits: Limits) -> None:
        self.encoder = encoder
        self.limits = limits
        self.metrics = _Metrics()
        self.batcher = _Batcher(encoder, limits, self.metrics)
        self.model_max_length = int(getattr(encoder, "model_max_length", 8192))
        self.default_max_length = int(getattr(encoder, "max_length", self.model_max_length))
        self.max_text_chars = limits.max_text_chars or 32 * self.model_max_length
        self.fingerprint = str(encoder.fingerprint)
        from . import __version__

        self.info = {
            "model": str(encoder.model_name),
            "fingerprint": self.fingerprint,
            "dense_dim": int(encoder.dense_dim),
            "colbert_dim": int(encoder.colbert_dim),
            "max_length": self.default_max_length,
            "model_max_length": self.model_max_length,
            "compute_dtype": str(getattr(encoder, "compute_dtype", getattr(encoder, "dtype_name", "unknown"))),
            "device": str(getattr(encoder, "device", "unknown")),
            "vocab_size": getattr(encoder, "vocab_size", None),
            "tokens_per_batch": getattr(encoder, "tokens_per_batch", None),
            "outputs": list(ROUTES),
            "dtypes": list(WIRE_DTYPES),
            "wire_version": WIRE_VERSION,
            "version": __version__,
            "limits": {
                "max_queue": limits.max_queue,
                "max_texts_per_request": limits.max_texts_per_request,
                "max_text_chars": self.max_text_chars,
                "max_body_bytes": limits.max_body_bytes,
            },
        }

    # -- endpoints ------------------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        b = self.batcher
        if b.draining:
            return _error(503, "draining: the server is shutting down", kind="EncoderUnavailableError",
                          retry_after=b.retry_after())
        if b.pending_texts >= self.limits.max_queue:
            return _error(503, "saturated: the queue is full", kind="EncoderUnavailableError",
                          retry_after=b.retry_after())
        return JSONResponse({"status": "ready", "queue_texts": b.pending_texts})

    async def info_endpoint(self, request: Request) -> Response:
        return JSONResponse(self.info, headers={"X-M3-Fingerprint": self.fingerprint})

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(prom.generate_latest(self.metrics.registry), media_type=prom.CONTENT_TYPE_LATEST)

    async def encode(self, request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            response = await self._encode(request, t0)
        except _Reject as rej:
            response = _error(rej.status, str(rej), kind=rej.kind, retry_after=rej.retry_after)
        self.metrics.requests.labels(str(response.status_code)).inc()
        return response

    async def _encode(self, request: Request, t0: float) -> Response:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        binary_in = ctype in _MSGPACK_TYPES
        accept = request.headers.get("accept", "").lower()
        binary_out = any(t in accept for t in _MSGPACK_TYPES) or (binary_in and JSON not in accept)
        body = await self._read_body(request)
        try:
            payload = unpackb(body, max_bytes=self.limits.max_body_bytes) if binary_in else json.loads(body)
        except Exception as exc:  # noqa: BLE001 - any decoding failure is the client's
            fmt = "msgpack" if binary_in else "JSON"
            raise _Reject(400, f"the body is not valid {fmt}: {exc}") from None
        texts, max_length, flags, dtype, truncate = self._validate(payload)
        future = self.batcher.submit(texts, max_length, flags)
        gone = asyncio.Event()
        watcher = asyncio.create_task(self._watch_disconnect(request, future, gone))
        try:
            out = await future
        except asyncio.CancelledError:
            if not gone.is_set():
                raise
            raise _Reject(499, "the client closed the connection before the answer") from None
        except M3Error as exc:
            raise _Reject(422, str(exc), kind=type(exc).__name__) from None
        except (ValueError, TypeError) as exc:
            raise _Reject(422, f"{type(exc).__name__}: {exc}") from None
        except Exception as exc:  # noqa: BLE001
            logger.exception("encoding failed")
            raise _Reject(
                500, f"encoding failed: {type(exc).__name__}: {exc}", kind="EncoderUnavailableError"
            ) from None
        finally:
            watcher.cancel()
        if not truncate and out.truncated:
            raise _Reject(422, f"texts{out.truncated[:5]} exceed max_length={max_length} tokens and truncate is false")
        out = EncodeOutput(
            dense=out.dense if flags[0] else None,
            sparse=out.sparse if flags[1] else None,
            colbert=out.colbert if flags[2] else None,
            num_tokens=out.num_tokens,
            truncated=out.truncated,
        )
        headers = {"X-M3-Fingerprint": self.fingerprint}
        if binary_out:
            msg = output_to_binary(out, dtype=dtype, fingerprint=self.fingerprint)
            response: Response = Response(packb(msg), media_type=MSGPACK, headers=headers)
        else:
            response = JSONResponse(output_to_json(out, dtype=dtype, fingerprint=self.fingerprint), headers=headers)
        self.metrics.latency.observe(time.perf_counter() - t0)
        return response

    @staticmethod
    async def _watch_disconnect(request: Request, future: asyncio.Future[Any], gone: asyncio.Event) -> None:
        """Drop a queued request whose client hung up (a timed-out client that retries would
        otherwise have its work done twice)."""
        while not future.done():
            message = await request.receive()
            if message["type"] == "http.disconnect":
                if not future.done():
                    gone.set()
                    future.cancel()
                return

    async def _read_body(self, request: Request) -> bytes:
        limit = self.limits.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise _Reject(413, f"the body has {length} bytes; the limit is {limit} (split the request)")
        chunks = bytearray()
        async for chunk in request.stream():
            chunks += chunk
            if len(chunks) > limit:
                raise _Reject(413, f"the body exceeds {limit} bytes (split the request)")
        if not chunks:
            raise _Reject(400, 'the body is empty; send {"texts": ["..."]}')
        return bytes(chunks)

    def _validate(self, payload: Any) -> tuple[list[str], int, tuple[bool, bool, bool], str, bool]:
        if not isinstance(payload, dict):
            raise _Reject(422, f'the body must be an object like {{"texts": ["..."]}}, got {_type_name(payload)}',
                          kind="InvalidTypeError")
        unknown = sorted(str(k) for k in payload if k not in _FIELDS)
        if unknown:
            raise _Reject(422, f"unknown field {unknown[0]!r}; the fields are {sorted(_FIELDS)}")
        if "texts" not in payload:
            raise _Reject(422, "'texts' is missing: send a list of strings")
        texts = payload["texts"]
        if not isinstance(texts, list):
            raise _Reject(422, f"'texts' must be a list of strings, got {_type_name(texts)}", kind="InvalidTypeError")
        if not texts:
            raise _Reject(422, "'texts' is empty: send at least one string")
        if len(texts) > self.limits.max_texts_per_request:
            raise _Reject(413, f"{len(texts)} texts in one request; the limit is "
                               f"{self.limits.max_texts_per_request} (split the request)")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise _Reject(422, f"texts[{i}] is {_type_name(text)}, not a string", kind="InvalidTypeError")
            if len(text) > self.max_text_chars:
                raise _Reject(422, f"texts[{i}] has {len(text)} characters; the limit is {self.max_text_chars}")
        max_length = payload.get("max_length")
        if max_length is None:
            max_length = self.default_max_length
        elif isinstance(max_length, bool) or not isinstance(max_length, int):
            raise _Reject(422, f"'max_length' must be an int, got {_type_name(max_length)}", kind="InvalidTypeError")
        elif not 2 <= max_length <= self.model_max_length:
            raise _Reject(422, f"'max_length' must be in [2, {self.model_max_length}], got {max_length}")
        outputs = payload.get("outputs", list(ROUTES))
        if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
            raise _Reject(
                422, f"'outputs' must be a list like {list(ROUTES)}, got {outputs!r}", kind="InvalidTypeError"
            )
        if not outputs:
            raise _Reject(422, f"'outputs' is empty; choose from {list(ROUTES)}")
        try:
            flags = check_outputs(outputs)
        except ValueError as exc:
            raise _Reject(422, f"'outputs': {exc}") from None
        dtype = payload.get("dtype", "float32")
        if not isinstance(dtype, str) or dtype.lower() not in _DTYPE_ALIASES:
            raise _Reject(422, f"'dtype' must be 'float32' or 'float16', got {dtype!r}")
        truncate = payload.get("truncate", True)
        if not isinstance(truncate, bool):
            raise _Reject(422, f"'truncate' must be true or false, got {truncate!r}", kind="InvalidTypeError")
        return texts, int(max_length), flags, _DTYPE_ALIASES[dtype.lower()], truncate


def create_app(encoder: Any, limits: Limits | None = None) -> Starlette:
    """The ASGI app serving ``encoder`` (an :class:`~m3connect.M3Encoder` or anything with its
    ``encode(texts, max_length=, return_dense=, return_sparse=, return_colbert=, show_progress=)``).

    ``app.state.m3`` holds the handlers; ``app.state.m3.batcher.draining = True`` makes the
    server refuse new work (503) while it finishes what it holds.
    """
    handlers = _App(encoder, limits or Limits())

    @asynccontextmanager
    async def lifespan(app: Starlette) -> Any:
        await handlers.batcher.start()
        try:
            yield
        finally:
            await handlers.batcher.close()

    routes = [
        Route("/healthz", handlers.healthz, methods=["GET"]),
        Route("/livez", handlers.healthz, methods=["GET"]),
        Route("/readyz", handlers.readyz, methods=["GET"]),
        Route("/v1/info", handlers.info_endpoint, methods=["GET"]),
        Route("/v1/encode", handlers.encode, methods=["POST"]),
        Route("/metrics", handlers.metrics_endpoint, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.m3 = handlers
    return app


class _Server(uvicorn.Server):
    """uvicorn's server, marking the app as draining as soon as a stop is asked for."""

    def __init__(self, config: uvicorn.Config, handlers: _App) -> None:
        super().__init__(config)
        self._handlers = handlers

    def handle_exit(self, sig: int, frame: Any) -> None:
        self._handlers.batcher.draining = True
        super().handle_exit(sig, frame)


def _config(app: Starlette, limits: Limits, **kwargs: Any) -> uvicorn.Config:
    return uvicorn.Config(
        # uvicorn types it as int, but only hands it to asyncio.wait_for, which takes a float
        app, lifespan="on", timeout_graceful_shutdown=limits.drain_timeout_s,  # type: ignore[arg-type]
        server_header=False, **kwargs,
    )


def serve(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    device: str | None = None,
    dtype: str | None = None,
    max_length: int | None = None,
    max_batch_tokens: int | None = None,
    limits: Limits | None = None,
    log_level: str = "info",
    on_ready: Any = None,
) -> None:
    """Load ``model`` and serve it until SIGTERM/SIGINT (blocking)."""
    from . import M3Encoder

    kwargs: dict[str, Any] = {"device": device, "dtype": dtype, "show_progress": False}
    if max_length is not None:
        kwargs["max_length"] = max_length
    if max_batch_tokens is not None:
        kwargs["tokens_per_batch"] = max_batch_tokens
    encoder = M3Encoder(model, **kwargs)
    limits = limits or Limits()
    app = create_app(encoder, limits)
    server = _Server(_config(app, limits, host=host, port=port, log_level=log_level), app.state.m3)
    if on_ready is not None:
        on_ready(encoder)
    server.run()


class BackgroundServer:
    """Serve an app from a thread on 127.0.0.1 and a free port (tests, benchmarks).

    >>> with BackgroundServer(create_app(encoder)) as srv:    # doctest: +SKIP
    ...     RemoteEncoder(srv.url).encode(["hello"])
    """

    def __init__(self, app: Starlette, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        self.app = app
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        limits = app.state.m3.limits
        self.server = _Server(_config(app, limits, log_level=log_level), app.state.m3)
        self._thread = threading.Thread(target=self._run, name="m3-serve", daemon=True)

    def _run(self) -> None:
        self.server.run(sockets=[self._sock])

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the background server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Graceful: refuse new work, finish what is held, then return."""
        self.app.state.m3.batcher.draining = True
        self.server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def running(encoder: Any, limits: Limits | None = None) -> Iterator[BackgroundServer]:
    """``with running(encoder) as srv: ...``: a :class:`BackgroundServer` for ``encoder``."""
    with BackgroundServer(create_app(encoder, limits)) as srv:
        yield srv

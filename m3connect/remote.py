"""``RemoteEncoder``: the client of ``m3connect serve``, torch-free.

It implements the :class:`~m3connect.protocols.Encoder` protocol with the same methods as
:class:`~m3connect.M3Encoder` (``encode``, ``encode_one``, ``compute_score``, dims,
fingerprint), so a store, the CLI or an integration uses it wherever a local encoder goes.
Its ``fingerprint`` is the served model's: a collection written with the local model accepts
the remote one, and refuses a server that holds another model.

>>> enc = RemoteEncoder("http://127.0.0.1:8080")                                  # doctest: +SKIP
>>> store = connect("qdrant://:memory:", collection="docs", encoder=enc)           # doctest: +SKIP
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from . import scoring
from .errors import (
    EncoderUnavailableError,
    InvalidInputError,
    InvalidTypeError,
    M3Error,
    MissingDependencyError,
    SchemaMismatchError,
)
from .types import ROUTES, EncodeOutput, Vectors
from .wire import MSGPACK, WIRE_DTYPES, output_from_binary, packb, unpackb

__all__ = ["RemoteEncoder", "is_remote_model"]

_DEFAULT_TEXTS_PER_REQUEST = 64
_ERRORS: dict[str, type[M3Error]] = {
    "InvalidInputError": InvalidInputError,
    "InvalidTypeError": InvalidTypeError,
}


def is_remote_model(name: Any) -> bool:
    """Whether a ``--model`` / ``encoder=`` value names an encoder service (``http(s)://``)."""
    return isinstance(name, str) and name.lower().startswith(("http://", "https://"))


class RemoteEncoder:
    """Encodes through an ``m3connect serve`` server.

    Args:
        url: the server, e.g. ``"http://127.0.0.1:8080"``.
        dtype: ``"float32"`` (exact) or ``"float16"`` (half the bytes on the wire) for dense and
            ColBERT vectors; the client always hands back float32 arrays.
        max_length: default token limit per text (default: the server's).
        timeout: seconds per HTTP request.
        retries: how often a 429/503 answer (queue full, draining) or a dropped connection is
            retried, waiting as the server's ``Retry-After`` says (capped by ``max_wait``).
        texts_per_request: texts per request (default 64, capped by the server's limit); an
            ``encode`` of more texts sends several requests, ``concurrency`` at a time.
        headers: extra HTTP headers (e.g. an auth token for a proxy in front).
    """

    def __init__(
        self,
        url: str,
        *,
        dtype: str = "float32",
        max_length: int | None = None,
        timeout: float = 300.0,
        retries: int = 5,
        max_wait: float = 30.0,
        texts_per_request: int | None = None,
        concurrency: int = 2,
        headers: dict[str, str] | None = None,
        show_progress: bool | None = None,
    ) -> None:
        try:
            import httpx
        except ImportError:
            raise MissingDependencyError.for_extra("httpx (needed by RemoteEncoder)", "client") from None
        if not is_remote_model(url):
            raise InvalidInputError(f"RemoteEncoder needs an http:// or https:// URL, got {url!r}")
        if dtype not in WIRE_DTYPES:
            raise InvalidInputError(f"dtype must be one of {list(WIRE_DTYPES)}, got {dtype!r}")
        if concurrency < 1 or retries < 0:
            raise InvalidInputError("concurrency must be >= 1 and retries >= 0")
        self.url = url.rstrip("/")
        self.wire_dtype = dtype
        self.retries = int(retries)
        self.max_wait = float(max_wait)
        self.concurrency = int(concurrency)
        self.show_progress = show_progress
        self._httpx = httpx
        # httpx's default pool (100 connections): one RemoteEncoder may be shared by many threads.
        self._client = httpx.Client(base_url=self.url, timeout=timeout, headers=headers or {})
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        info = self._request("GET", "/v1/info").json()
        self.info: dict[str, Any] = info
        self.model_name: str = str(info["model"])
        self.fingerprint: str = str(info["fingerprint"])
        self.dense_dim: int = int(info["dense_dim"])
        self.colbert_dim: int = int(info["colbert_dim"])
        self.model_max_length: int = int(info["model_max_length"])
        self.vocab_size: int | None = info.get("vocab_size")
        self.device: str = f"{self.url} ({info.get('device', 'remote')})"
        self.dtype_name: str = str(info.get("compute_dtype", "unknown"))
        server_max = int(info.get("limits", {}).get("max_texts_per_request", 256))
        # 64 texts a request by default: bounded response sizes (ColBERT of long texts is large), and
        # with concurrency >= 2 the server encodes one chunk while this client decodes another.
        self.texts_per_request = min(int(texts_per_request or _DEFAULT_TEXTS_PER_REQUEST), server_max)
        if self.texts_per_request < 1:
            raise InvalidInputError(f"texts_per_request must be >= 1, got {texts_per_request}")
        default = int(info.get("max_length", self.model_max_length))
        self.max_length = default if max_length is None else self._check_max_length(max_length)

    # -- Encoder protocol ---------------------------------------------------------------------

    @property
    def compute_dtype(self) -> str:
        """The precision the server's forward pass runs in."""
        return self.dtype_name

    def encode(
        self,
        texts: Sequence[str],
        *,
        batch_size: int | None = None,
        max_length: int | None = None,
        return_dense: bool = True,
        return_sparse: bool = True,
        return_colbert: bool = True,
        show_progress: bool | None = None,
    ) -> EncodeOutput:
        """Encode texts on the server; same arguments and result as :meth:`M3Encoder.encode`.

        ``batch_size`` caps the texts per request (the server batches across clients anyway).
        """
        items = self._check_texts(texts)
        max_len = self.max_length if max_length is None else self._check_max_length(max_length)
        if batch_size is not None and batch_size < 1:
            raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
        flags = (return_dense, return_sparse, return_colbert)
        outputs = [r for r, f in zip(ROUTES, flags) if f]
        if not items:
            return EncodeOutput(
                dense=np.zeros((0, self.dense_dim), np.float32) if return_dense else None,
                sparse=[] if return_sparse else None,
                colbert=[] if return_colbert else None,
            )
        if not outputs:  # nothing asked for: still count tokens, cheaply
            outputs = ["dense"]
        step = min(self.texts_per_request, batch_size or self.texts_per_request)
        chunks = [items[i : i + step] for i in range(0, len(items), step)]
        if len(chunks) == 1 or self.concurrency == 1:
            parts = [self._encode_chunk(c, max_len, outputs) for c in chunks]
        else:
            pool = self._executor()
            parts = list(pool.map(lambda c: self._encode_chunk(c, max_len, outputs), chunks))
        return self._join(parts, flags, step)

    def encode_one(self, text: str, *, max_length: int | None = None) -> Vectors:
        """All three representations of a single text (e.g. a query)."""
        return self.encode([text], max_length=max_length, show_progress=False).item(0)

    def compute_score(
        self,
        pairs: Sequence[tuple[str, str]],
        weights: Sequence[float] = (1.0, 1.0, 1.0),
        *,
        max_query_length: int = 512,
        max_passage_length: int = 512,
        batch_size: int | None = None,
    ) -> dict[str, list[float]]:
        """Score ``(query, passage)`` pairs like :meth:`M3Encoder.compute_score` (scored here, in numpy)."""
        w = scoring.validate_weights(weights)
        pair_list = scoring.check_pairs(pairs)
        queries = self.encode([p[0] for p in pair_list], max_length=max_query_length, batch_size=batch_size)
        passages = self.encode([p[1] for p in pair_list], max_length=max_passage_length, batch_size=batch_size)
        return scoring.score_pairs(queries, passages, w)

    # -- plumbing -----------------------------------------------------------------------------

    def health(self) -> bool:
        """Whether the server answers its readiness probe with 200."""
        try:
            return self._client.get("/readyz").status_code == 200
        except self._httpx.HTTPError:
            return False

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._client.close()

    def __enter__(self) -> RemoteEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RemoteEncoder({self.url!r}, model={self.model_name!r}, fingerprint={self.fingerprint!r})"

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="m3-remote")
            return self._pool

    @staticmethod
    def _check_texts(texts: Any) -> list[str]:
        if isinstance(texts, str):
            raise InvalidTypeError("encode() takes a list of strings, not a single string; wrap it: [text]")
        try:
            items = list(texts)
        except TypeError as exc:
            raise InvalidTypeError(f"texts must be a list of strings, got {type(texts).__name__}") from exc
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise InvalidTypeError(f"texts[{i}] is {type(item).__name__}, not str")
        return items

    def _check_max_length(self, max_length: Any) -> int:
        if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)):
            raise InvalidTypeError(f"max_length must be an int, got {type(max_length).__name__}")
        if not 2 <= int(max_length) <= self.model_max_length:
            raise InvalidInputError(f"max_length must be in [2, {self.model_max_length}], got {max_length}")
        return int(max_length)

    def _encode_chunk(self, texts: list[str], max_length: int, outputs: Sequence[str]) -> EncodeOutput:
        body = packb({"texts": texts, "outputs": outputs, "max_length": max_length, "dtype": self.wire_dtype})
        response = self._request(
            "POST", "/v1/encode", content=body, headers={"Content-Type": MSGPACK, "Accept": MSGPACK}
        )
        try:
            msg = unpackb(response.content)
            out = output_from_binary(msg)
        except Exception as exc:  # noqa: BLE001 - a garbled answer
            raise EncoderUnavailableError(f"{self.url} sent an unreadable encode response: {exc}") from None
        fingerprint = msg.get("fingerprint")
        if fingerprint and fingerprint != self.fingerprint:
            raise SchemaMismatchError(
                f"the server at {self.url} now serves model fingerprint {fingerprint}, not {self.fingerprint} "
                "as when this RemoteEncoder connected; its vectors would not match. Reconnect deliberately."
            )
        if len(out.num_tokens) != len(texts):
            raise EncoderUnavailableError(f"{self.url} answered {len(out.num_tokens)} rows for {len(texts)} texts")
        return out

    def _join(self, parts: list[EncodeOutput], flags: tuple[bool, bool, bool], step: int) -> EncodeOutput:
        if len(parts) == 1:
            out = parts[0]
        else:
            out = EncodeOutput(
                dense=np.concatenate([p.dense for p in parts]) if parts[0].dense is not None else None,
                sparse=[s for p in parts for s in (p.sparse or [])] if parts[0].sparse is not None else None,
                colbert=[c for p in parts for c in (p.colbert or [])] if parts[0].colbert is not None else None,
                num_tokens=[t for p in parts for t in p.num_tokens],
                truncated=[k * step + i for k, p in enumerate(parts) for i in p.truncated],
            )
        if not flags[0]:
            out.dense = None
        if not flags[1]:
            out.sparse = None
        if not flags[2]:
            out.colbert = None
        return out

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        httpx = self._httpx
        attempt = 0
        while True:
            try:
                response = self._client.request(method, path, **kwargs)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                # Nothing reached the server: safe to retry, briefly (a restarting server).
                if attempt < min(self.retries, 2):
                    attempt += 1
                    time.sleep(0.2 * attempt)
                    continue
                raise EncoderUnavailableError(
                    f"cannot reach the encoder server at {self.url} ({type(exc).__name__}: {exc}); "
                    "is 'm3connect serve' running there?"
                ) from None
            except httpx.TimeoutException as exc:
                raise EncoderUnavailableError(
                    f"the encoder server at {self.url} did not answer in time ({type(exc).__name__})"
                ) from None
            except httpx.HTTPError as exc:  # reset, closed mid-response, protocol error
                if attempt < self.retries and isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError)):
                    attempt += 1
                    time.sleep(min(self.max_wait, 0.2 * attempt))
                    continue
                raise EncoderUnavailableError(
                    f"the connection to the encoder server at {self.url} failed ({type(exc).__name__}: {exc})"
                ) from None
            status = response.status_code
            if status < 400:
                return response
            message, kind = self._reason(response)
            if status in (429, 503) and attempt < self.retries:
                attempt += 1
                time.sleep(self._retry_delay(response, attempt))
                continue
            if status in (429, 503):
                raise EncoderUnavailableError(
                    f"the encoder server at {self.url} is busy ({status}: {message}) after {attempt} retries"
                )
            if 400 <= status < 500:
                error = _ERRORS.get(kind, InvalidInputError)
                raise error(f"the encoder server refused the request ({status}): {message}")
            raise EncoderUnavailableError(f"the encoder server at {self.url} failed ({status}): {message}")

    def _retry_delay(self, response: Any, attempt: int) -> float:
        try:
            wait = float(response.headers.get("Retry-After", ""))
        except ValueError:
            wait = 0.5 * attempt
        return max(0.05, min(self.max_wait, wait))

    @staticmethod
    def _reason(response: Any) -> tuple[str, str]:
        try:
            body = response.json()
            return str(body.get("error") or body), str(body.get("type", ""))
        except Exception:  # noqa: BLE001 - not our JSON error (a proxy page...)
            return " ".join(response.text.split())[:300] or response.reason_phrase, ""

"""What the commands share: the usage error, option values parsed into library values, and
opening the encoder and the store from the parsed arguments."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from ..defaults import DEFAULT_MODEL, DEFAULT_WEIGHTS

PROG = "m3connect"
#: ``--weights``' default as the command line spells it: ``0.4,0.2,0.4``
DEFAULT_WEIGHTS_ARG = ",".join(f"{w:g}" for w in DEFAULT_WEIGHTS)


class UsageError(Exception):
    """A bad command line (exit status 2)."""



def _default_model() -> str:
    return os.environ.get("M3_MODEL") or DEFAULT_MODEL


def _parse_weights(text: str) -> tuple[float, float, float]:
    from ..scoring import validate_weights

    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise UsageError(
            f"--weights must be three numbers 'dense,sparse,colbert' like {DEFAULT_WEIGHTS_ARG}, got {text!r}"
        ) from None
    try:
        w = validate_weights(values)
    except ValueError as exc:
        raise UsageError(f"--weights {text!r}: {exc}") from None
    return (w.dense, w.sparse, w.colbert)


def _parse_filter(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    from ..filters import parse_filter

    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--filter is not valid JSON ({exc.msg} at column {exc.colno}): {text!r}") from None
    if not isinstance(spec, dict):
        raise UsageError(f"--filter must be a JSON object like '{{\"lang\": \"en\"}}', got {text!r}")
    try:
        parse_filter(spec)
    except ValueError as exc:
        raise UsageError(f"--filter {text!r}: {exc}") from None
    return spec


def _check_uri(uri: str | None) -> str:
    """The store URI to use: a bare ``*.db`` path is a Milvus Lite file, as pymilvus takes it."""
    from ..uri import parse_uri

    if not uri:
        raise UsageError("--uri is required (or set M3_URI), e.g. --uri milvus://./m3.db")
    if "://" not in uri:
        if uri.endswith(".db"):
            uri = "milvus://" + str(Path(uri).expanduser().resolve())
        else:
            raise UsageError(
                f"--uri {uri!r} is not a store URI: say qdrant://./{uri.lstrip('./')} (Qdrant Edge directory), "
                "milvus://./m3.db (Milvus Lite file) or opensearch://host:9200"
            )
    try:
        parse_uri(uri)
    except ValueError as exc:
        raise UsageError(f"--uri: {exc}") from None
    return uri


def _shown_uri(uri: str) -> str:
    from ..uri import safe_uri

    return safe_uri(uri)


def _fields(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [f.strip() for f in text.split(",") if f.strip()]


def _progress(args: argparse.Namespace) -> bool:
    if getattr(args, "progress", None) is not None:
        return bool(args.progress)
    return sys.stderr.isatty()


def _info(args: argparse.Namespace, message: str) -> None:
    """A status line on stderr (stdout stays clean for --json)."""
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr, flush=True)


def _load_encoder(args: argparse.Namespace) -> Any:
    from ..remote import is_remote_model

    if is_remote_model(args.model):  # an 'm3connect serve' server: no torch in this process
        if getattr(args, "device", None) or getattr(args, "dtype", None):
            raise UsageError("--device and --dtype apply to a local model; an encoder server chooses its own")
        from ..remote import RemoteEncoder

        return RemoteEncoder(args.model, max_length=getattr(args, "max_length", None))
    from .. import M3Encoder

    if not _progress(args):
        try:  # transformers' "Loading weights" bar
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except Exception:  # pragma: no cover - cosmetic only
            pass
    kwargs: dict[str, Any] = {"device": args.device, "dtype": args.dtype, "show_progress": False}
    if getattr(args, "max_length", None) is not None:
        kwargs["max_length"] = args.max_length
    return M3Encoder(args.model, **kwargs)


def _credentials(args: argparse.Namespace) -> dict[str, Any]:
    """The credential options given on the command line or in ``M3_*`` variables."""
    return {k: getattr(args, k) for k in ("user", "password", "api_key", "token") if getattr(args, k, None)}


def _connect(args: argparse.Namespace, encoder: Any) -> Any:
    from ..store import connect

    options = _credentials(args)
    if getattr(args, "colbert_dtype", None):
        options["colbert_dtype"] = args.colbert_dtype
    if getattr(args, "colbert_pool_factor", None):
        options["colbert_pool_factor"] = args.colbert_pool_factor
    if getattr(args, "store_colbert", None) is False:
        options["store_colbert"] = False
    if getattr(args, "candidate_depth", None):
        options["candidate_depth"] = args.candidate_depth
    return connect(args.uri, args.collection, encoder, **options)



def _open_existing(args: argparse.Namespace) -> Any:
    """Open an existing collection without an encoder; a missing one is a one-line error with a hint."""
    from ..errors import CollectionNotFoundError
    from ..store import connect

    try:
        return connect(args.uri, args.collection, encoder=None, **_credentials(args))
    except CollectionNotFoundError:
        raise CollectionNotFoundError(
            f"collection {args.collection!r} does not exist at {_shown_uri(args.uri)}; "
            "create it with 'm3connect ingest'"
        ) from None


"""The ``m3connect`` command line: ingest, search, info and eval.

::

    m3connect ingest docs.jsonl --uri milvus:///abs/m3.db --collection docs --model BAAI/bge-m3
    m3connect search "how does hybrid search work" --uri milvus:///abs/m3.db --collection docs -k 5
    m3connect info --uri milvus:///abs/m3.db --collection docs
    m3connect drop --uri milvus:///abs/m3.db --collection docs --yes
    m3connect eval path/to/beir/scifact --model BAAI/bge-m3 --tune --plot quality.png

``--model``, ``--uri`` and ``--collection`` default to ``$M3_MODEL``, ``$M3_URI`` and
``$M3_COLLECTION``; credentials come from ``--user/--password/--api-key/--token`` or
``$M3_USER``, ``$M3_PASSWORD``, ``$M3_API_KEY``, ``$M3_TOKEN`` (or ``user:password@`` in the
URI) and are never printed. Every failure is one line
``m3connect: error: ...`` on stderr, exit status 2 for a bad command line and 1 for
anything that fails while running; ``--debug`` shows the traceback instead.

Here: :func:`main` (the entry point); ``parser`` builds the arguments, ``commands`` runs them,
``readers`` streams input files, ``common`` holds what the commands share.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Callable, Sequence

from ..errors import redact
from .common import PROG, UsageError
from .parser import build_parser
from .readers import BadRecordError as BadRecordError  # distributed.py reads files with these
from .readers import _detect_format as _detect_format
from .readers import _Reader as _Reader

__all__ = ["main", "build_parser"]


def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    if isinstance(exc, FileNotFoundError) and exc.filename and exc.strerror:
        msg = f"{exc.strerror}: {exc.filename}"
    elif isinstance(exc, OSError) and exc.strerror and exc.filename:
        msg = f"{exc.strerror}: {exc.filename}"
    from ..errors import M3Error

    if not msg:
        msg = type(exc).__name__
    elif not isinstance(exc, (M3Error, OSError, ValueError, BadRecordError, UsageError)):
        msg = f"{type(exc).__name__}: {msg}"
    msg = " ".join(msg.split())
    if len(msg) > 1200:
        msg = msg[:1200] + "…"
    return msg


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 runtime error, 2 bad command line)."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    debug = bool(getattr(args, "debug", False))
    func: Callable[[argparse.Namespace], int] = args.func
    secrets = [getattr(args, name, None) or "" for name in ("password", "api_key", "token")]
    if not debug:
        # pymilvus logs a full traceback at ERROR for every failed call; the one-line error says it all
        logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            if not debug:
                warnings.simplefilter("ignore")
            return func(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except UsageError as exc:
        if debug:
            raise
        print(f"{PROG}: error: {redact(_one_line(exc), secrets)}", file=sys.stderr)
        return 2
    except Exception as exc:
        if debug:
            raise
        from ..errors import ModelLoadError

        msg = _one_line(exc)
        if isinstance(exc, ModelLoadError) and "hub" in msg and "M3_MODEL" not in msg:
            msg += " (or set M3_MODEL to that directory)"
        print(f"{PROG}: error: {redact(msg, secrets)}", file=sys.stderr)
        return 1

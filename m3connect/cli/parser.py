"""The argument parser: subcommands, their options and defaults (``$M3_*`` variables included)."""

from __future__ import annotations

import argparse
import os

from ..defaults import DEFAULT_MODEL
from .commands import cmd_drop, cmd_eval, cmd_info, cmd_ingest, cmd_search, cmd_serve
from .common import DEFAULT_WEIGHTS_ARG, PROG, UsageError, _default_model


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")



def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="BGE-M3 dense + sparse + ColBERT search in Milvus, Qdrant or OpenSearch.")
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--collection", default=os.environ.get("M3_COLLECTION") or "m3connect",
                        help="collection (index) name (default: $M3_COLLECTION or m3connect)")
    creds = common.add_argument_group("credentials (never printed)")
    creds.add_argument("--user", default=os.environ.get("M3_USER") or None, help="user name (default: $M3_USER)")
    creds.add_argument("--password", default=os.environ.get("M3_PASSWORD") or None,
                       help="password (default: $M3_PASSWORD; prefer the variable: arguments show in ps)")
    creds.add_argument("--api-key", default=os.environ.get("M3_API_KEY") or None,
                       help="API key: Qdrant, OpenSearch (default: $M3_API_KEY)")
    creds.add_argument("--token", default=os.environ.get("M3_TOKEN") or None,
                       help="Milvus token 'user:password' or API key (default: $M3_TOKEN)")
    uri_default = os.environ.get("M3_URI") or None
    uri_help = "milvus://./m3.db, milvus:///abs/m3.db, qdrant:///abs/dir, qdrant://host:6333, ... (default: $M3_URI)"

    model = _Parser(add_help=False)
    model.add_argument("--model", default=_default_model(),
                       help=f"hub id or local directory of the model (default: $M3_MODEL or {DEFAULT_MODEL})")
    model.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when present)")
    model.add_argument("--dtype", default=None, choices=["auto", "float32", "float16", "bfloat16", "int8"],
                       help="compute dtype (default auto: float16 on GPU, bfloat16 on CPUs with native "
                            "bf16, else float32)")
    model.add_argument("--max-length", type=int, default=None, help="token limit per text (default: 8192)")

    prog = _Parser(add_help=False)
    prog.add_argument("--progress", dest="progress", action="store_true", default=None,
                      help="show progress bars (default: when stderr is a terminal)")
    prog.add_argument("--no-progress", dest="progress", action="store_false")

    p = sub.add_parser("ingest", parents=[common, model, prog], help="encode and store a file or directory",
                       description="Encode JSONL, CSV, Parquet or a directory of .txt/.md files and store them. "
                                   "Resumable: ids already stored are skipped unless --no-resume.")
    p.add_argument("file", metavar="FILE",
                   help="a .jsonl, .csv/.tsv or .parquet file, or a directory of .txt/.md files")
    p.add_argument("--uri", default=uri_default, help=uri_help)
    p.add_argument("--format", default="auto", choices=["auto", "jsonl", "csv", "parquet", "dir"])
    p.add_argument("--text-field", default="text", help="field holding the text (default: text)")
    p.add_argument("--id-field", default="id", help="field holding the id (default: id; absent: derived from content)")
    p.add_argument("--metadata-fields", default=None,
                   help="comma-separated fields stored as metadata (default: all other fields)")
    p.add_argument("--delimiter", default=None, help="CSV delimiter (default: ',' or tab for .tsv)")
    p.add_argument("--batch-size", type=int, default=256, help="documents per encode/write step (default: 256)")
    p.add_argument("--colbert-dtype", default=None, choices=["float32", "float16", "int8", "binary"],
                   help="ColBERT storage of a new collection (default float32; an existing one keeps its own)")
    p.add_argument("--colbert-pool-factor", type=int, default=None,
                   help="token pooling at ingestion: keep 1/N of each document's ColBERT vectors (default 1)")
    p.add_argument("--no-colbert", dest="store_colbert", action="store_false", default=None,
                   help="a new collection keeps no ColBERT vectors (searches then use dense + sparse)")
    p.add_argument("--resume", dest="resume", action="store_true", default=True,
                   help="skip ids already stored (default)")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="re-encode and overwrite stored ids")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip and count malformed lines instead of stopping")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--ray", action="store_true",
                   help="encode on a Ray cluster: a pool of encoder actors, parallel writers (m3connect[ray])")
    p.add_argument("--ray-address", default=None,
                   help="with --ray: 'auto' or ray://HOST:10001 joins a cluster (default: start a local Ray)")
    p.add_argument("--encoders", type=int, default=None,
                   help="with --ray: encoder actors, one model each (default: one per GPU, else 1)")
    p.add_argument("--writers", type=int, default=None,
                   help="with --ray: writer processes for servers (default 2; Milvus Lite/Qdrant dirs: 1)")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("search", parents=[common, model], help="hybrid search",
                       description="Search with M3's weighted fusion of dense, sparse and ColBERT scores.")
    p.add_argument("query", metavar="QUERY")
    p.add_argument("--uri", default=uri_default, help=uri_help)
    p.add_argument("-k", type=int, default=10, help="number of hits (default: 10)")
    p.add_argument("--weights", default=None,
                   help=f"dense,sparse,colbert (default: {DEFAULT_WEIGHTS_ARG}; "
                        "without ColBERT on a collection that keeps none)")
    p.add_argument("--filter", default=None, help='metadata filter as JSON, e.g. \'{"lang": "en"}\'')
    p.add_argument("--fusion", default="exact", choices=["exact", "engine", "rrf"])
    p.add_argument("--reencode-colbert", action="store_true",
                   help="a collection kept without ColBERT (--no-colbert): score ColBERT by encoding the "
                        "candidates' texts again (exact fusion; an encoder pass per search)")
    p.add_argument("--candidate-depth", type=int, default=None, help="candidates per route (default: max(100, 10k))")
    p.add_argument("--width", type=int, default=60, help="text snippet width in the table (default: 60)")
    p.add_argument("--json", action="store_true", help="print the hits as JSON")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("info", parents=[common], help="schema, model and count of a collection")
    p.add_argument("--uri", default=uri_default, help=uri_help)
    p.add_argument("--model", default=None, help="also load this model and check it matches the collection")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "float16", "bfloat16", "int8"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("drop", parents=[common], help="delete a collection and everything stored beside it",
                       description="Delete a collection. Asks for --yes; a missing collection is an error.")
    p.add_argument("--uri", default=uri_default, help=uri_help)
    p.add_argument("--yes", action="store_true", help="confirm the deletion")
    p.set_defaults(func=cmd_drop)

    p = sub.add_parser("eval", parents=[common, model, prog], help="nDCG@10 / Recall@100 on a BEIR dataset",
                       description="Ingest a BEIR dataset and report nDCG@10 and Recall@100 per route "
                                   "(dense, sparse, colbert, dense+sparse, all).")
    p.add_argument("dataset", metavar="DATASET", help="directory with corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    p.add_argument("--uri", default="qdrant://:memory:", help="where to index the corpus (default: qdrant://:memory:)")
    p.add_argument("--split", default="test", help="qrels file to score (default: test)")
    p.add_argument("--max-queries", type=int, default=None, help="score only the first N queries")
    p.add_argument("--candidate-depth", type=int, default=100, help="candidates per route (default: 100)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--colbert-dtype", default=None, choices=["float32", "float16", "int8", "binary"],
                   help="ColBERT storage of a new collection (default float32; an existing one keeps its own)")
    p.add_argument("--colbert-pool-factor", type=int, default=None,
                   help="token pooling at ingestion: keep 1/N of each document's ColBERT vectors (default 1)")
    p.add_argument("--tune", action="store_true", help="grid-search the fusion weights")
    p.add_argument("--tune-split", default=None,
                   help="qrels split to tune on (e.g. dev); default: a random half of the test queries")
    p.add_argument("--tune-step", type=float, default=0.1, help="weight grid step (default: 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random tuning half (default: 0)")
    p.add_argument("--plot", default=None, metavar="PNG", help="write a bar chart of quality per route")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no status lines on stderr")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("serve", parents=[model], help="serve the encoder over HTTP to many clients",
                       description="Hold the model in one process and encode for many clients, batching "
                                   "concurrent requests together. Clients: --model http://HOST:PORT or "
                                   "m3connect.RemoteEncoder. Needs 'm3connect[serve]'.")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="padded tokens per forward pass (default: the encoder's per-device budget)")
    p.add_argument("--max-queue", type=int, default=4096,
                   help="texts waiting, all clients together, before requests get 429 (default: 4096)")
    p.add_argument("--max-texts-per-request", type=int, default=512, help="texts in one request (default: 512)")
    p.add_argument("--batch-window-ms", type=float, default=2.0,
                   help="after an idle spell, how long to wait for more requests to batch (default: 2)")
    p.add_argument("--gather-ms", type=float, default=50.0,
                   help="after a batch, how long to wait at most for its clients' next requests (default: 50)")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="seconds in-flight requests may take to finish on shutdown (default: 60)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--quiet", action="store_true", help="no status line on stderr")
    p.set_defaults(func=cmd_serve)
    return parser

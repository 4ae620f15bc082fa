"""m3connect quickstart: BGE-M3 dense + sparse + ColBERT in Qdrant Edge, hybrid search in a few lines.

Run it from any directory::

    python examples/quickstart.py                      # tiny demo model, Qdrant Edge directory ./m3connect_demo
    M3_MODEL=BAAI/bge-m3 python examples/quickstart.py # the real model (hub id or a local directory)
    python examples/quickstart.py --uri milvus:///tmp/m3-demo.db   # any store URI works

Without ``M3_MODEL`` (or ``--model``) the script builds a tiny random checkpoint in the
real BGE-M3 layout under ``.m3cache/tiny-m3`` (reused on later runs), so it works with
no hub access; its rankings are meaningless, the plumbing is the real one. Re-running
is cheap: documents already stored are skipped.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from m3connect import M3Encoder, connect
from m3connect.testing import make_tiny_checkpoint, sample_corpus

WEIGHTS = (0.4, 0.2, 0.4)  # dense, sparse, colbert: the BGE-M3 paper's hybrid setting


def pick_model(requested: str | None) -> str:
    """The model to use: --model, else $M3_MODEL, else a tiny demo checkpoint built once."""
    if requested:
        return requested
    if os.environ.get("M3_MODEL"):
        return os.environ["M3_MODEL"]
    tiny = Path(".m3cache") / "tiny-m3"
    if not (tiny / "colbert_linear.pt").is_file() or not (tiny / "config.json").is_file():
        print(f"building a tiny demo checkpoint in {tiny} (set M3_MODEL=BAAI/bge-m3 for the real model)")
        make_tiny_checkpoint(tiny)
    else:
        print(f"reusing the tiny demo checkpoint in {tiny}")
    return str(tiny.resolve())


def show(title: str, hits: list) -> None:
    print(f"\n{title}")
    print(f"{'rank':>4}  {'id':<6} {'score':>7} {'dense':>7} {'sparse':>7} {'colbert':>7}  text")
    for rank, hit in enumerate(hits, 1):
        s = hit.scores
        text = hit.text if len(hit.text) <= 60 else hit.text[:59] + "…"
        print(f"{rank:>4}  {hit.id:<6} {hit.score:7.4f} {s['dense']:7.4f} {s['sparse']:7.4f} {s['colbert']:7.4f}"
              f"  [{hit.metadata.get('lang')}] {text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Qdrant Edge (Qdrant's Rust engine, in-process) is the embedded engine that measured fastest
    # for both writes and exact hybrid queries (benchmarks/results/query-scale-*.md).
    parser.add_argument("--uri", default=f"qdrant://{Path.cwd().resolve() / 'm3connect_demo'}",
                        help="store URI (default: Qdrant Edge directory ./m3connect_demo)")
    parser.add_argument("--collection", default="quickstart")
    parser.add_argument(
        "--model", default=None, help="hub id or local directory (default: $M3_MODEL or a tiny demo model)"
    )
    parser.add_argument("--device", default=None, help="cpu / cuda (default: CUDA when present)")
    args = parser.parse_args()

    # 1. The encoder: one forward pass gives all three representations.
    model = pick_model(args.model)
    encoder = M3Encoder(model, device=args.device, show_progress=False)
    print(f"model: {model} ({encoder.dense_dim}-d dense, ColBERT {encoder.colbert_dim}-d, on {encoder.device})")

    # 2. A collection holding dense, sparse and ColBERT vectors for every document.
    docs = sample_corpus()  # 40 short multilingual documents: id, text, lang, topic
    with connect(args.uri, collection=args.collection, encoder=encoder) as store:
        report = store.ingest(
            [{"id": d["id"], "text": d["text"], "metadata": {"lang": d["lang"], "topic": d["topic"]}} for d in docs],
            skip_existing=True,  # re-running the script writes nothing twice
            show_progress=False,
        )
        print(f"store: {args.uri} (collection {args.collection!r})")
        print(f"ingested: {report.written} written, {report.skipped} already stored; {store.count()} documents")

        # 3. Hybrid search: M3's weighted sum of the three route scores, computed exactly.
        query = "How does hybrid search combine dense and sparse vectors?"
        hits = store.search(query, k=5, weights=WEIGHTS)
        show(f"hybrid search, weights {WEIGHTS}: {query!r}", hits)

        # 4. The same with a metadata filter, applied inside the engine.
        query = "Wie speichert die Bibliothek Vektoren?"
        hits = store.search(query, k=3, weights=WEIGHTS, filter={"lang": "de"})
        show(f"filtered search, lang == 'de': {query!r}", hits)


if __name__ == "__main__":
    main()

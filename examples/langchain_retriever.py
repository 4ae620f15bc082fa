"""BGE-M3 hybrid retrieval in LangChain: M3VectorStore + M3Retriever.

Run:  python examples/langchain_retriever.py [--uri qdrant://:memory: | milvus:///abs/m3.db]

Uses the model named by $M3_MODEL (e.g. BAAI/bge-m3) when set, otherwise a tiny
random checkpoint built in a temporary directory (results are then meaningless,
but every code path runs).
"""

from __future__ import annotations

import argparse
import os
import tempfile

from m3connect import M3Encoder, connect
from m3connect.integrations.langchain import M3Retriever, M3VectorStore
from m3connect.testing import make_tiny_checkpoint, sample_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uri", default="qdrant://:memory:", help="store URI (embedded Qdrant by default)")
    parser.add_argument("--query", default="dense and sparse vectors in one engine")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = os.environ.get("M3_MODEL") or str(make_tiny_checkpoint(os.path.join(tmp, "tiny-m3")))
        encoder = M3Encoder(model, show_progress=False)
        store = connect(args.uri, collection="langchain_example", encoder=encoder)
        try:
            vs = M3VectorStore(store)
            docs = sample_corpus()
            vs.add_texts(
                [d["text"] for d in docs],
                metadatas=[{"lang": d["lang"], "topic": d["topic"]} for d in docs],
                ids=[d["id"] for d in docs],
                show_progress=False,
            )
            print(f"indexed {store.count()} documents in {args.uri}")

            print(f"\nsimilarity_search_with_score({args.query!r}, k=3)  [M3 weights 0.4/0.2/0.4]")
            for doc, score in vs.similarity_search_with_score(args.query, k=3):
                print(f"  {score:.4f}  {doc.id}  {doc.page_content[:70]}")

            retriever = M3Retriever(store=store, k=3, weights=(1.0, 0.3, 1.0), filter={"lang": "en"})
            print(f"\nM3Retriever(weights=(1, 0.3, 1), filter={{'lang': 'en'}}).invoke({args.query!r})")
            for doc in retriever.invoke(args.query):
                routes = ", ".join(f"{r}={s:.3f}" for r, s in doc.metadata["m3_scores"].items())
                print(f"  {doc.metadata['m3_score']:.4f}  {doc.id}  ({routes})")

            dense_only = vs.as_retriever(search_kwargs={"k": 3, "weights": (1, 0, 0)})
            found = ", ".join(d.id or "" for d in dense_only.invoke(args.query))
            print("\nas_retriever(weights=(1, 0, 0)) -> " + found)
        finally:
            store.drop()
            store.close()


if __name__ == "__main__":
    main()

"""BGE-M3 in LlamaIndex: a VectorStoreIndex over M3LlamaVectorStore, queried in each mode.

Run:  python examples/llamaindex_query.py [--uri qdrant://:memory: | milvus:///abs/m3.db]

Uses the model named by $M3_MODEL (e.g. BAAI/bge-m3) when set, otherwise a tiny
random checkpoint built in a temporary directory (results are then meaningless,
but every code path runs). No LLM is needed: this only retrieves.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from llama_index.core import Document, StorageContext, VectorStoreIndex
from llama_index.core.vector_stores.types import FilterOperator, MetadataFilter, MetadataFilters

from m3connect import M3Encoder, connect
from m3connect.integrations.llamaindex import M3LlamaEmbedding, M3LlamaRetriever, M3LlamaVectorStore
from m3connect.testing import make_tiny_checkpoint, sample_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uri", default="qdrant://:memory:", help="store URI (embedded Qdrant by default)")
    parser.add_argument("--query", default="dense and sparse vectors in one engine")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = os.environ.get("M3_MODEL") or str(make_tiny_checkpoint(os.path.join(tmp, "tiny-m3")))
        encoder = M3Encoder(model, show_progress=False)
        store = connect(args.uri, collection="llamaindex_example", encoder=encoder)
        try:
            vector_store = M3LlamaVectorStore(store=store)
            documents = [
                Document(text=d["text"], id_=d["id"], metadata={"lang": d["lang"], "topic": d["topic"]})
                for d in sample_corpus()
            ]
            index = VectorStoreIndex.from_documents(
                documents,
                storage_context=StorageContext.from_defaults(vector_store=vector_store),
                embed_model=M3LlamaEmbedding(encoder=encoder),
            )
            print(f"indexed {store.count()} nodes in {args.uri}")

            for mode in ("default", "sparse", "hybrid"):
                nodes = index.as_retriever(vector_store_query_mode=mode, similarity_top_k=3).retrieve(args.query)
                print(f"\nmode={mode}:")
                for n in nodes:
                    print(f"  {n.score:.4f}  {n.node.ref_doc_id}  {n.node.get_content()[:70]}")

            english = MetadataFilters(filters=[MetadataFilter(key="lang", value=["en"], operator=FilterOperator.IN)])
            nodes = index.as_retriever(vector_store_query_mode="hybrid", similarity_top_k=3, filters=english).retrieve(
                args.query
            )
            print("\nmode=hybrid, filter lang in ['en']: " + ", ".join(str(n.node.ref_doc_id) for n in nodes))

            retriever = M3LlamaRetriever(vector_store, k=3, weights=(1.0, 0.3, 1.0))
            print("M3LlamaRetriever(weights=(1, 0.3, 1)): " + ", ".join(
                f"{n.node.ref_doc_id}={n.score:.4f}" for n in retriever.retrieve(args.query)
            ))
        finally:
            store.drop()
            store.close()


if __name__ == "__main__":
    main()

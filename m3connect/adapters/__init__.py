"""Engine adapters. Each imports its client library lazily, inside its module.

- :mod:`m3connect.adapters.milvus`: pymilvus (Milvus Lite embedded, or a server)
- :mod:`m3connect.adapters.qdrant`: qdrant-client (local mode, or a server)
- :mod:`m3connect.adapters.opensearch`: opensearch-py (a server)
"""

from .base import Adapter, CollectionSpec, Record

__all__ = ["Adapter", "CollectionSpec", "Record"]

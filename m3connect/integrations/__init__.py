"""Framework integrations: LangChain and LlamaIndex.

Each submodule imports its framework lazily and raises
:class:`~m3connect.MissingDependencyError` naming the extra to install when it is absent::

    from m3connect.integrations.langchain import M3VectorStore, M3Retriever     # pip install 'm3connect[langchain]'
    from m3connect.integrations.llamaindex import M3LlamaVectorStore            # pip install 'm3connect[llamaindex]'
"""

from __future__ import annotations

__all__ = ["langchain", "llamaindex"]

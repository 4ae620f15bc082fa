"""Load FlagEmbedding's M3 embedder without its package ``__init__``.

FlagEmbedding 1.4's ``__init__`` imports every model family, and some of them
(MiniCPM reranker) import modules that transformers 5 removed. The M3 code path
itself works with transformers 5, so we register bare parent packages and import
only ``encoder_only.m3``: the reference code that runs is unchanged.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

_PACKAGES = (
    "",
    "abc",
    "inference",
    "inference/embedder",
    "inference/embedder/encoder_only",
    "finetune",
    "finetune/embedder",
    "finetune/embedder/encoder_only",
)


def flag_m3_embedder_class() -> Any:
    loaded = sys.modules.get("FlagEmbedding.inference.embedder.encoder_only.m3")
    if loaded is not None:  # the bare parents have no __spec__, so find_spec works only once
        return loaded.M3Embedder
    spec = importlib.util.find_spec("FlagEmbedding")
    if spec is None or spec.origin is None:
        raise ImportError("FlagEmbedding is a test dependency: pip install -e '.[dev]'")
    root = Path(spec.origin).parent
    for rel in _PACKAGES:
        name = "FlagEmbedding" + ("." + rel.replace("/", ".") if rel else "")
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = [str(root / rel)]
            sys.modules[name] = module
    from FlagEmbedding.inference.embedder.encoder_only.m3 import M3Embedder

    return M3Embedder


def flag_model(path: Path) -> Any:
    """``BGEM3FlagModel`` equivalent on CPU in fp32."""
    return flag_m3_embedder_class()(str(path), use_fp16=False, devices="cpu")

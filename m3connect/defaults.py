"""Defaults shared by the library, the CLI and the integrations, defined once (no heavy imports)."""

from __future__ import annotations

__all__ = ["DEFAULT_MODEL", "DEFAULT_WEIGHTS"]

#: the model an encoder loads when none is named (a hub id)
DEFAULT_MODEL = "BAAI/bge-m3"
#: the fusion weights ``(dense, sparse, colbert)`` of a search that names none
DEFAULT_WEIGHTS: tuple[float, float, float] = (0.4, 0.2, 0.4)

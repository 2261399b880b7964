"""clipdex indexer: walk folders and caption files, decode in workers, encode, commit incrementally.

Names are imported on first use, so that importing a light module of this package does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clipdex.indexer.pipeline import IndexConfig, Summary, run_index

_LAZY = {
    "IndexConfig": "clipdex.indexer.pipeline",
    "Summary": "clipdex.indexer.pipeline",
    "run_index": "clipdex.indexer.pipeline",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'clipdex.indexer' has no attribute {name!r}")


__all__ = ["IndexConfig", "Summary", "run_index"]

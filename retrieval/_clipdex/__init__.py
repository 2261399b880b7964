"""clipdex: cross-modal image–text search with open_clip, FAISS and DuckDB.

This file is the `clipdex` import package; the source folders `retrieval/`, `indexer/` and `cli/` are
installed as its subpackages (see `[tool.setuptools.package-dir]` in pyproject.toml). Names are imported on
first use, so that `import clipdex` does not load torch.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

# ONNX Runtime's Linux wheels (1.32) record an event about the machine (CPU, system, a device id) at each import, in
# an SQLite file under ~/.cache/Microsoft that their telemetry client keeps for upload. A local photo library writes
# nothing of the kind; a user who sets the variable keeps their setting.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

if TYPE_CHECKING:
    from clipdex.indexer.pipeline import IndexConfig, Summary, run_index
    from clipdex.retrieval.config import EncoderConfig
    from clipdex.retrieval.errors import ClipdexError
    from clipdex.retrieval.model.encoder import Encoder, load_encoder
    from clipdex.retrieval.search.query import Query
    from clipdex.retrieval.search.searcher import Hit, Searcher, Target

_LAZY = {
    "ClipdexError": "clipdex.retrieval.errors",
    "EncoderConfig": "clipdex.retrieval.config",
    "Encoder": "clipdex.retrieval.model.encoder",
    "load_encoder": "clipdex.retrieval.model.encoder",
    "Hit": "clipdex.retrieval.search.searcher",
    "Query": "clipdex.retrieval.search.query",
    "Searcher": "clipdex.retrieval.search.searcher",
    "Target": "clipdex.retrieval.search.searcher",
    "IndexConfig": "clipdex.indexer.pipeline",
    "Summary": "clipdex.indexer.pipeline",
    "run_index": "clipdex.indexer.pipeline",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name == "__version__":
        from importlib.metadata import version

        return version("clipdex")
    raise AttributeError(f"module 'clipdex' has no attribute {name!r}")


__all__ = [
    "ClipdexError",
    "Encoder",
    "EncoderConfig",
    "Hit",
    "IndexConfig",
    "Query",
    "Searcher",
    "Summary",
    "Target",
    "load_encoder",
    "run_index",
]

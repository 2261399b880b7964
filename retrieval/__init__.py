"""clipdex retrieval: encode with open_clip, store and search embeddings, measure recall@k.

Names are imported on first use, so that `clipdex info` or `check` start without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from clipdex.retrieval.config import DEFAULT_MODEL, DEFAULT_PRETRAINED, EncoderConfig, ModelSpec
from clipdex.retrieval.errors import ClipdexError

if TYPE_CHECKING:
    from clipdex.retrieval.model.encoder import Encoder, load_encoder
    from clipdex.retrieval.search.searcher import Hit, Searcher, Target

_LAZY = {
    "Encoder": "clipdex.retrieval.model.encoder",
    "load_encoder": "clipdex.retrieval.model.encoder",
    "Hit": "clipdex.retrieval.search.searcher",
    "Searcher": "clipdex.retrieval.search.searcher",
    "Target": "clipdex.retrieval.search.searcher",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'retrieval' has no attribute {name!r}")


__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_PRETRAINED",
    "ClipdexError",
    "Encoder",
    "EncoderConfig",
    "Hit",
    "ModelSpec",
    "Searcher",
    "Target",
    "load_encoder",
]

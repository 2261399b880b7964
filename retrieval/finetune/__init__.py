"""Contrastive fine-tuning on a user's own image–caption pairs (full, last-n, lora, lit); see run.py.

Layer: above `evaluation/` and `model/` (it validates with recall@k and trains open_clip models); below `serve/`.
"""

from typing import Any

from clipdex.retrieval.finetune.config import FinetuneConfig, FinetuneResult, Method

__all__ = ["FinetuneConfig", "FinetuneResult", "Method", "finetune"]


def __getattr__(name: str) -> Any:
    """`finetune` imports torch: only when it is used, so that checking a run's options does not."""
    if name == "finetune":
        from clipdex.retrieval.finetune.run import finetune

        return finetune
    raise AttributeError(name)

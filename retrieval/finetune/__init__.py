"""Contrastive fine-tuning on a user's own image–caption pairs (full, last-n, lora, lit); see run.py.

Layer: above `evaluation/` and `model/` (it validates with recall@k and trains open_clip models); below `serve/`.
"""

from clipdex.retrieval.finetune.config import FinetuneConfig, FinetuneResult
from clipdex.retrieval.finetune.methods import Method
from clipdex.retrieval.finetune.run import finetune

__all__ = ["FinetuneConfig", "FinetuneResult", "Method", "finetune"]

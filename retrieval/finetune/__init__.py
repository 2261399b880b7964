"""Contrastive fine-tuning on a user's own image–caption pairs (full, last-n, lora, lit); see run.py."""

from clipdex.retrieval.finetune.methods import Method
from clipdex.retrieval.finetune.run import FinetuneConfig, FinetuneResult, finetune

__all__ = ["FinetuneConfig", "FinetuneResult", "Method", "finetune"]

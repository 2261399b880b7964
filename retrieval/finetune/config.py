"""What a fine-tuning run is asked to do (`FinetuneConfig`) and what it reports (`FinetuneResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from clipdex.retrieval.config import EncoderConfig
from clipdex.retrieval.errors import InputError
from clipdex.retrieval.evaluation.datasets import DatasetName

CHECKPOINT = "checkpoint.safetensors"


class Method(str, Enum):
    FULL = "full"
    LAST_N = "last-n"
    LORA = "lora"
    LIT = "lit"
    RERANK = "rerank"  # a cross-attention re-ranking head over the frozen towers (finetune/rerank.py)

    @classmethod
    def parse(cls, name: str) -> Method:
        try:
            return cls(name)
        except ValueError:
            raise InputError(f"unknown method {name!r}: use {', '.join(m.value for m in cls)}") from None


ADAPTER = "adapter"
STATE = "state"
DEFAULT_LR = {Method.FULL: 1e-5, Method.LAST_N: 1e-5, Method.LORA: 1e-4, Method.LIT: 1e-5, Method.RERANK: 2e-3}
# A head learns from nothing, and cheaply (the towers' features are computed once): on the compositional domain its
# best epoch was 67 of 80, and 80 epochs gained R@1 over 40 (benchmarks/RESULTS.md); the rest start from a model
DEFAULT_EPOCHS = {Method.FULL: 5, Method.LAST_N: 5, Method.LORA: 5, Method.LIT: 5, Method.RERANK: 80}


def check_out(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse an --out that would lose or mix up work, before anything loads: `resume` needs an unfinished run there;
    otherwise an unfinished run, or a finished one's checkpoint, is kept unless `overwrite`."""
    unfinished = (out / STATE / "resume.pt").is_file()
    if resume:
        if not unfinished:
            raise InputError(f"nothing to resume in {out}: no unfinished run there (start one without --resume)")
        return
    if unfinished and not overwrite:
        raise InputError(f"{out} holds an unfinished run: continue it with --resume, or give a new --out")
    if (out / CHECKPOINT).exists() and not overwrite:
        raise InputError(
            f"{out} holds an earlier run's checkpoint ({CHECKPOINT}): give a new --out, or --overwrite to replace it"
        )


@dataclass(frozen=True)
class FinetuneConfig:
    out: Path
    encoder: EncoderConfig
    pairs: Path | None = None  # a caption file with an image column, or:
    dataset: DatasetName | None = None  # Flickr30k / COCO, Karpathy train split (val split for validation)
    root: Path | None = None
    text_column: str | None = None
    image_column: str | None = None
    val: Path | None = None  # validation pairs; default: a held-out share of the images
    val_fraction: float = 0.1
    keep: Path | None = None  # a general set measured before and after, to show forgetting
    method: Method = Method.FULL
    layers: int | None = None  # last-n
    rank: int = 8  # lora
    epochs: int | None = None  # default per method (DEFAULT_EPOCHS)
    batch_size: int = 64
    lr: float | None = None  # default per method (DEFAULT_LR)
    weight_decay: float = 0.1
    warmup: float = 0.1  # share of all steps
    accum_freq: int = 1
    grad_checkpointing: bool = False
    patience: int | None = None
    wise: float | None = None  # 1.0: the tuned weights; 0.0: the starting ones
    hard_negatives: int | None = None  # batches made of groups of this many similar images (by the starting model)
    seed: int = 0
    workers: int = 0
    resume: bool = False
    overwrite: bool = False  # replace an earlier run in `out`

    def __post_init__(self) -> None:
        if self.epochs is None:
            object.__setattr__(self, "epochs", DEFAULT_EPOCHS[self.method])

    @property
    def total_epochs(self) -> int:
        """The epochs to train: those asked for, else the method's default."""
        return self.epochs if self.epochs is not None else DEFAULT_EPOCHS[self.method]


@dataclass
class FinetuneResult:
    checkpoint: Path
    method: Method
    epochs: int  # epochs trained (fewer than asked when stopped early)
    train_pairs: int
    val_pairs: int
    before: dict[str, dict[str, float]]
    after: dict[str, dict[str, float]]
    best_epoch: int
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "checkpoint": str(self.checkpoint),
            "method": self.method.value,
            "epochs": self.epochs,
            "train_pairs": self.train_pairs,
            "val_pairs": self.val_pairs,
            "before": self.before,
            "after": self.after,
            "best_epoch": self.best_epoch,
            **self.details,
        }


def check_config(config: FinetuneConfig) -> None:
    """The options, checked before anything heavy loads (torch, the model, the data)."""
    if (config.pairs is None) == (config.dataset is None):
        raise InputError("give either a pairs file or --dataset flickr30k|coco --root DIR (not both)")
    if config.pairs is not None and not config.pairs.is_file():
        raise InputError(f"pairs file not found: {config.pairs}")
    if config.dataset is not None and config.root is None:
        raise InputError(f"--dataset {config.dataset.value} needs --root DIR (see data/README.md)")
    if config.out.exists() and not config.out.is_dir():
        raise InputError(f"--out {config.out} is a file; give a folder")
    if not 0.0 < config.val_fraction < 1.0:
        raise InputError(f"--val-fraction must be between 0 and 1 (got {config.val_fraction})")
    if config.wise is not None and not 0.0 <= config.wise <= 1.0:
        raise InputError(f"--wise must be between 0 and 1 (got {config.wise})")
    for name in ("total_epochs", "batch_size", "accum_freq"):
        if getattr(config, name) < 1:
            raise InputError(f"--{name.removeprefix('total_').replace('_', '-')} must be at least 1")
    if config.lr is not None and not config.lr > 0:
        raise InputError(f"--lr must be positive (got {config.lr})")
    if config.method is Method.RERANK:
        given = [
            option
            for option, used in (
                ("--wise", config.wise is not None),
                ("--hard-negatives", config.hard_negatives is not None),
                ("--keep", config.keep is not None),
                ("--accum-freq", config.accum_freq != 1),
                ("--grad-checkpointing", config.grad_checkpointing),
                ("--layers", config.layers is not None),
            )
            if used
        ]
        if given:
            raise InputError(f"--method rerank trains a head over the frozen model: {', '.join(given)} do not apply")

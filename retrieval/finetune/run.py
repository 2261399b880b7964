"""`finetune`: pairs in, a tuned checkpoint out, validation recall before and after, resumable by epoch.

The run: load the starting model; read and check the pairs (unreadable images are reported and left out);
split by image; measure validation recall with the same code as `clipdex eval`; train epoch by epoch, keeping
the best epoch by validation recall (early stopping with `patience`); optionally interpolate with the starting
weights (WiSE-FT); write the checkpoint, the adapter (LoRA), the log, the report and the plot.
"""

from __future__ import annotations

import logging
import math
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import save_file

from clipdex.retrieval.config import EncoderConfig
from clipdex.retrieval.errors import InputError
from clipdex.retrieval.evaluation.datasets import DatasetName, RetrievalDataset, Skipped, load_dataset, read_pairs
from clipdex.retrieval.evaluation.evaluate import BENCHMARK_DECODE, dataset_recall, keep_decodable
from clipdex.retrieval.finetune.loop import Step, Trainer, make_optimizer, make_schedule
from clipdex.retrieval.finetune.methods import Method, prepare
from clipdex.retrieval.finetune.pairs import epoch_batches, split_by_image
from clipdex.retrieval.finetune.report import TrainLog, plot, write_report
from clipdex.retrieval.imaging.decode import DecodeOptions
from clipdex.retrieval.model.encoder import Encoder, LoadedModel, load_model
from clipdex.retrieval.store.atomic import replace_with

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.safetensors"
ADAPTER = "adapter"
STATE = "state"
DEFAULT_LR = {Method.FULL: 1e-5, Method.LAST_N: 1e-5, Method.LORA: 1e-4, Method.LIT: 1e-5}


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
    epochs: int = 5
    batch_size: int = 64
    lr: float | None = None  # default per method (DEFAULT_LR)
    weight_decay: float = 0.1
    warmup: float = 0.1  # share of all steps
    accum_freq: int = 1
    grad_checkpointing: bool = False
    patience: int | None = None
    wise: float | None = None  # 1.0: the tuned weights; 0.0: the starting ones
    seed: int = 0
    workers: int = 0
    resume: bool = False


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


class TrainProgress(Protocol):
    def start(self, epoch: int, epochs: int, steps: int) -> None: ...
    def step(self, step: Step) -> None: ...
    def note(self, message: str) -> None: ...


class _Quiet:
    def start(self, epoch: int, epochs: int, steps: int) -> None:
        pass

    def step(self, step: Step) -> None:
        pass

    def note(self, message: str) -> None:
        log.info(message)


@dataclass
class _Data:
    train: RetrievalDataset
    val: RetrievalDataset
    keep: RetrievalDataset | None
    options: DecodeOptions
    skipped: Skipped


def finetune(config: FinetuneConfig, *, progress: TrainProgress | None = None) -> FinetuneResult:
    progress = progress or _Quiet()
    _check(config)
    out = config.out
    state_path = out / STATE / "resume.pt"
    if config.resume and not state_path.is_file():
        raise InputError(f"nothing to resume in {out}: no unfinished run there (start one without --resume)")
    if not config.resume and state_path.is_file():
        raise InputError(f"{out} holds an unfinished run: continue it with --resume, or give a new --out")
    torch.manual_seed(config.seed)
    loaded = load_model(config.encoder)
    if config.grad_checkpointing:
        loaded.model.set_grad_checkpointing(True)  # type: ignore[operator]
    start_weights = (
        {k: v.detach().cpu().clone() for k, v in loaded.model.state_dict().items()} if config.wise is not None else {}
    )
    prepared = prepare(config.method, loaded.model, layers=config.layers, rank=config.rank)  # checks its options
    data = _read_data(config, loaded, progress)
    trainable = prepared.trainable()
    batch_size = min(config.batch_size, len(data.train.images))
    if batch_size < config.batch_size:
        progress.note(f"{len(data.train.images)} training images: the batch shrinks to {batch_size}")
    steps_per_epoch = math.ceil(math.ceil(len(data.train.images) / batch_size) / config.accum_freq)
    total = steps_per_epoch * config.epochs
    optimizer = make_optimizer(trainable, lr=config.lr or DEFAULT_LR[config.method], weight_decay=config.weight_decay)
    scheduler = make_schedule(optimizer, warmup=max(1, int(config.warmup * total)), total=total)
    trainer = Trainer(prepared.model, optimizer, scheduler, device=loaded.device, accum_freq=config.accum_freq)
    out.mkdir(parents=True, exist_ok=True)

    def recall(ds: RetrievalDataset) -> dict[str, dict[str, float]]:
        prepared.model.eval()
        encoder = Encoder(prepared.model, loaded.preprocess, loaded.tokenizer, loaded.device, loaded.spec)
        return dataset_recall(encoder, ds, batch_size=batch_size, workers=config.workers, options=data.options).recalls

    if config.resume:
        state = torch.load(state_path, weights_only=True)
        prepared.restore(state["current"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        trainer.step_count = int(state["step"])
        history, best_epoch, best = state["history"], int(state["best_epoch"]), state["best"]
        first = int(state["epoch"]) + 1
        before, keep_before = history[0]["val"], state.get("keep_before")
        progress.note(f"resuming after epoch {first - 1} of {config.epochs}")
    else:
        before = recall(data.val)
        keep_before = recall(data.keep) if data.keep is not None else None
        history = [{"epoch": 0, "val": before}]
        best_epoch, best, first = 0, prepared.snapshot(), 1
    train_log = TrainLog(out, keep_epochs_below=first if config.resume else None)
    if not config.resume:
        train_log.write(history[0])
    speeds: list[float] = []

    def on_step(step: Step) -> None:
        speeds.append(step.pairs_per_s)
        train_log.write({"epoch": step.epoch, "step": step.step, "loss": step.loss, "lr": step.lr})
        progress.step(step)

    trained = first - 1
    started = time.perf_counter()
    for epoch in range(first, config.epochs + 1):
        progress.start(epoch, config.epochs, steps_per_epoch)
        prepared.train_mode()
        trainer.epoch(epoch, _batches(config, data, loaded, batch_size, epoch), on_step)
        scores = recall(data.val)
        history.append({"epoch": epoch, "val": scores})
        train_log.write(history[-1])
        trained = epoch
        if _score(scores) > _score(history[best_epoch]["val"]):
            best_epoch, best = epoch, prepared.snapshot()
        stop = config.patience is not None and epoch - best_epoch >= config.patience
        _save_state(
            state_path,
            {
                "current": prepared.snapshot(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": trainer.step_count,
                "epoch": epoch,
                "history": history,
                "best_epoch": best_epoch,
                "best": best,
                "keep_before": keep_before,
            },
        )
        if stop:
            progress.note(f"no better validation recall for {config.patience} epochs: stopping after epoch {epoch}")
            break
    seconds = time.perf_counter() - started

    prepared.restore(best)
    adapter = None
    if prepared.save_adapter is not None:
        adapter = out / ADAPTER
        prepared.save_adapter(adapter)
    weights = prepared.export()
    if config.wise is not None:
        weights = _wise(start_weights, weights, config.wise)
    loaded.model.load_state_dict(weights)
    after = recall(data.val)
    keep_after = recall(data.keep) if data.keep is not None else None
    checkpoint = out / CHECKPOINT
    _save_checkpoint(checkpoint, weights)
    history.append({"epoch": "kept", "val": after})
    details = {
        "best_epoch_by": "mean of R@1/5/10 in both directions on the validation set",
        "wise": config.wise,
        "adapter": str(adapter) if adapter else None,
        "trainable_params": sum(p.numel() for _, p in trainable),
        "total_params": sum(p.numel() for p in loaded.model.parameters()),
        "pairs_per_s": float(np.median(speeds)) if speeds else None,
        "train_seconds": seconds,
        "peak_memory_mib": _peak_memory_mib(loaded.device),
        "checkpoint_bytes": checkpoint.stat().st_size,
        "adapter_bytes": sum(p.stat().st_size for p in adapter.rglob("*") if p.is_file()) if adapter else None,
        "skipped": [{"what": w, "why": y} for w, y in data.skipped.items],
        "history": history,
        "model": config.encoder.model,
        "pretrained": config.encoder.pretrained,
        "keep": {"before": keep_before, "after": keep_after} if data.keep is not None else None,
    }
    result = FinetuneResult(
        checkpoint, config.method, trained, data.train.n_texts, data.val.n_texts, before, after, best_epoch, details
    )
    details["report"] = str(write_report(out, result.to_json()))
    details["plot"] = str(plot(out, train_log.records(), title=f"clipdex finetune: {config.method.value}"))
    write_report(out, result.to_json())
    shutil.rmtree(out / STATE, ignore_errors=True)
    return result


def _check(config: FinetuneConfig) -> None:
    if (config.pairs is None) == (config.dataset is None):
        raise InputError("give either a pairs file or --dataset flickr30k|coco --root DIR (not both)")
    if config.dataset is not None and config.root is None:
        raise InputError(f"--dataset {config.dataset.value} needs --root DIR (see data/README.md)")
    if config.out.exists() and not config.out.is_dir():
        raise InputError(f"--out {config.out} is a file; give a folder")
    if not 0.0 < config.val_fraction < 1.0:
        raise InputError(f"--val-fraction must be between 0 and 1 (got {config.val_fraction})")
    if config.wise is not None and not 0.0 <= config.wise <= 1.0:
        raise InputError(f"--wise must be between 0 and 1 (got {config.wise})")
    for name in ("epochs", "batch_size", "accum_freq"):
        if getattr(config, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1")
    if config.lr is not None and not config.lr > 0:
        raise InputError(f"--lr must be positive (got {config.lr})")


def _read_data(config: FinetuneConfig, loaded: LoadedModel, progress: TrainProgress) -> _Data:
    skipped = Skipped()
    if config.dataset is not None:
        assert config.root is not None
        options = BENCHMARK_DECODE  # as `clipdex eval` decodes these datasets
        train = load_dataset(config.dataset, config.root, split="train")
        val = None if config.val else load_dataset(config.dataset, config.root, split="val")
    else:
        assert config.pairs is not None
        options = loaded.encoder().decode_options()  # as indexing decodes the user's images
        train = read_pairs(
            config.pairs, text_column=config.text_column, image_column=config.image_column, skipped=skipped
        )
        val = None
    if config.val is not None:
        val = read_pairs(config.val, text_column=config.text_column, image_column=config.image_column, skipped=skipped)
    keep = None
    if config.keep is not None:
        keep = read_pairs(
            config.keep, text_column=config.text_column, image_column=config.image_column, skipped=skipped
        )
    train = keep_decodable(train, options, config.workers, skipped)
    if val is None:
        train, val = split_by_image(train, config.val_fraction, config.seed)
    else:
        val = keep_decodable(val, options, config.workers, skipped)
        shared = set(val.images)
        if shared & set(train.images):
            progress.note(
                f"{len(shared & set(train.images))} validation images are also in the training pairs: left out of training"
            )
            train = train.subset(i for i, p in enumerate(train.images) if p not in shared)
    if keep is not None:
        keep = keep_decodable(keep, options, config.workers, skipped)
    if len(train.images) < 2 or not val.images:
        raise InputError(
            f"{len(train.images)} training and {len(val.images)} validation images are usable: too few to train "
            "and measure (a contrastive batch needs two pairs)"
        )
    if skipped.items:
        what, why = skipped.items[0]
        progress.note(f"left out {len(skipped.items)} pairs or images that cannot be used (e.g. {what}: {why})")
    return _Data(train, val, keep, options, skipped)


def _batches(config: FinetuneConfig, data: _Data, loaded: LoadedModel, batch_size: int, epoch: int) -> Any:
    """(pixels, tokens) batches of one epoch, decoded with the training augmentation in the indexer's workers."""
    from clipdex.retrieval.imaging.loader import ImageFiles, iter_decoded

    seed = config.seed * 100_003 + epoch  # each epoch's order and augmentation, the same when resumed
    pairs = epoch_batches(data.train, batch_size, np.random.default_rng(seed))
    torch.manual_seed(seed)
    files = ImageFiles(data.train.images, loaded.preprocess_train, options=data.options)
    decoded = iter_decoded(files, workers=config.workers, batches=[[i for i, _ in b] for b in pairs], seed=seed)
    for batch, images in zip(pairs, decoded, strict=True):
        usable = [k for k, d in enumerate(images) if d.pixels is not None]  # a file gone since the check
        if len(usable) < 2:
            continue
        pixels = torch.stack([images[k].pixels for k in usable])  # type: ignore[misc]
        yield pixels, loaded.tokenizer([batch[k][1] for k in usable])


def _score(recalls: dict[str, dict[str, float]]) -> float:
    values = [v for direction in recalls.values() for v in direction.values()]
    return float(sum(values) / len(values))


def _wise(start: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """WiSE-FT: (1 - alpha) * start + alpha * tuned, weight by weight."""
    return {
        k: ((1 - alpha) * start[k].to(v.dtype) + alpha * v.detach().cpu()) if v.is_floating_point() else v
        for k, v in tuned.items()
    }


def _save_state(path: Path, state: dict[str, Any]) -> None:
    """Resume state, written atomically at the end of each epoch (loaded with weights_only=True)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_with(path, lambda tmp: torch.save(state, tmp))


def _save_checkpoint(path: Path, weights: dict[str, torch.Tensor]) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    replace_with(path, lambda tmp: save_file(tensors, str(tmp)))


def _peak_memory_mib(device: torch.device) -> dict[str, float]:
    peak = {"cpu_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        peak["cuda_allocated"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak

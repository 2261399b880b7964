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

from clipdex.retrieval.evaluation.datasets import RetrievalDataset
from clipdex.retrieval.evaluation.evaluate import dataset_recall
from clipdex.retrieval.finetune.config import (
    ADAPTER,
    CHECKPOINT,
    DEFAULT_LR,
    STATE,
    FinetuneConfig,
    FinetuneResult,
    Method,
    check_config,
    check_out,
)
from clipdex.retrieval.finetune.data import Data, epoch_pairs, mine_neighbours, read_data
from clipdex.retrieval.finetune.loop import Step, Trainer, make_optimizer, make_schedule, save_resume_state
from clipdex.retrieval.finetune.methods import Prepared, prepare
from clipdex.retrieval.finetune.report import TrainLog, plot, write_report
from clipdex.retrieval.model.encoder import Encoder, LoadedModel, load_model
from clipdex.retrieval.store.atomic import replace_with

log = logging.getLogger(__name__)


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


def finetune(config: FinetuneConfig, *, progress: TrainProgress | None = None) -> FinetuneResult:
    check_config(config)
    check_out(config.out, resume=config.resume, overwrite=config.overwrite)
    if config.method is Method.RERANK:
        from clipdex.retrieval.finetune.rerank_train import train_rerank

        return train_rerank(config, (progress or _Quiet()).note)
    state_path = config.out / STATE / "resume.pt"
    torch.manual_seed(config.seed)
    session = _Session.open(config, progress or _Quiet(), state_path)
    history = session.resume() if config.resume else session.begin()
    seconds = session.train(history)
    return session.finish(history, seconds)


@dataclass
class _History:
    """Validation recall epoch by epoch, and the best epoch's weights (what early stopping and resuming keep)."""

    epochs: list[dict[str, Any]]
    best_epoch: int
    best: Any
    first: int  # the next epoch to train
    keep_before: dict[str, dict[str, float]] | None

    @property
    def before(self) -> dict[str, dict[str, float]]:
        return self.epochs[0]["val"]


@dataclass
class _Session:
    """One fine-tuning run's model, data and optimiser; `finetune` calls its steps in order."""

    config: FinetuneConfig
    progress: TrainProgress
    state_path: Path
    loaded: LoadedModel
    prepared: Prepared
    data: Data
    batch_size: int
    steps_per_epoch: int
    trainer: Trainer
    start_weights: dict[str, torch.Tensor]
    trainable_params: int  # counted before training (merging a LoRA adapter on export changes the model)
    speeds: list[float] = field(default_factory=list)
    log: TrainLog | None = None

    @classmethod
    def open(cls, config: FinetuneConfig, progress: TrainProgress, state_path: Path) -> _Session:
        loaded = load_model(config.encoder)
        if config.grad_checkpointing:
            loaded.model.set_grad_checkpointing(True)  # type: ignore[operator]
        start_weights = (
            {k: v.detach().cpu().clone() for k, v in loaded.model.state_dict().items()}
            if config.wise is not None
            else {}
        )
        prepared = prepare(config.method, loaded.model, layers=config.layers, rank=config.rank)  # checks its options
        data = read_data(config, loaded, progress.note)
        batch_size = min(config.batch_size, len(data.train.images))
        if batch_size < config.batch_size:
            progress.note(f"{len(data.train.images)} training images: the batch shrinks to {batch_size}")
        mine_neighbours(config, data, loaded, batch_size)  # before any weight changes: the starting model's view
        steps_per_epoch = math.ceil(math.ceil(len(data.train.images) / batch_size) / config.accum_freq)
        total = steps_per_epoch * config.total_epochs
        lr = config.lr or DEFAULT_LR[config.method]
        trainable = prepared.trainable()
        optimizer = make_optimizer(trainable, lr=lr, weight_decay=config.weight_decay)
        scheduler = make_schedule(optimizer, warmup=max(1, int(config.warmup * total)), total=total)
        trainer = Trainer(prepared.model, optimizer, scheduler, device=loaded.device, accum_freq=config.accum_freq)
        config.out.mkdir(parents=True, exist_ok=True)
        count = sum(p.numel() for _, p in trainable)
        return cls(
            config, progress, state_path, loaded, prepared, data, batch_size, steps_per_epoch, trainer, start_weights,
            count,
        )  # fmt: skip

    def recall(self, ds: RetrievalDataset) -> dict[str, dict[str, float]]:
        """Recall@k of the model as it is now, measured as `clipdex eval` measures it."""
        self.prepared.model.eval()
        loaded = self.loaded
        encoder = Encoder(self.prepared.model, loaded.preprocess, loaded.tokenizer, loaded.device, loaded.spec)
        workers, options = self.config.workers, self.data.options
        return dataset_recall(encoder, ds, batch_size=self.batch_size, workers=workers, options=options).recalls

    def begin(self) -> _History:
        before = self.recall(self.data.val)
        keep_before = self.recall(self.data.keep) if self.data.keep is not None else None
        history = _History([{"epoch": 0, "val": before}], 0, self.prepared.snapshot(), 1, keep_before)
        self.log = TrainLog(self.config.out, keep_epochs_below=None)
        self.log.write(history.epochs[0])
        return history

    def resume(self) -> _History:
        state = torch.load(self.state_path, weights_only=True)
        self.prepared.restore(state["current"])
        self.trainer.optimizer.load_state_dict(state["optimizer"])
        self.trainer.scheduler.load_state_dict(state["scheduler"])
        self.trainer.step_count = int(state["step"])
        first = int(state["epoch"]) + 1
        history = _History(state["history"], int(state["best_epoch"]), state["best"], first, state.get("keep_before"))
        self.log = TrainLog(self.config.out, keep_epochs_below=first)
        self.progress.note(f"resuming after epoch {first - 1} of {self.config.total_epochs}")
        return history

    def train(self, history: _History) -> float:
        """Epochs from `history.first` on, each validated and saved for resuming; the seconds it took."""
        config, started = self.config, time.perf_counter()
        for epoch in range(history.first, config.total_epochs + 1):
            self.progress.start(epoch, config.total_epochs, self.steps_per_epoch)
            self.prepared.train_mode()
            batches = epoch_pairs(config, self.data, self.loaded, self.batch_size, epoch)
            self.trainer.epoch(epoch, batches, self._on_step)
            scores = self.recall(self.data.val)
            history.epochs.append({"epoch": epoch, "val": scores})
            assert self.log is not None
            self.log.write(history.epochs[-1])
            history.first = epoch + 1
            if _score(scores) > _score(history.epochs[history.best_epoch]["val"]):
                history.best_epoch, history.best = epoch, self.prepared.snapshot()
            self._save_state(history, epoch)
            if config.patience is not None and epoch - history.best_epoch >= config.patience:
                self.progress.note(
                    f"no better validation recall for {config.patience} epochs: stopping after epoch {epoch}"
                )
                break
        return time.perf_counter() - started

    def _on_step(self, step: Step) -> None:
        self.speeds.append(step.pairs_per_s)
        assert self.log is not None
        self.log.write({"epoch": step.epoch, "step": step.step, "loss": step.loss, "lr": step.lr})
        self.progress.step(step)

    def _save_state(self, history: _History, epoch: int) -> None:
        """Resume state, written atomically at the end of each epoch (loaded with weights_only=True)."""
        state = {
            "current": self.prepared.snapshot(),
            "optimizer": self.trainer.optimizer.state_dict(),
            "scheduler": self.trainer.scheduler.state_dict(),
            "step": self.trainer.step_count,
            "epoch": epoch,
            "history": history.epochs,
            "best_epoch": history.best_epoch,
            "best": history.best,
            "keep_before": history.keep_before,
        }
        save_resume_state(self.state_path, state)

    def finish(self, history: _History, seconds: float) -> FinetuneResult:
        """The best epoch's weights (interpolated with the start for WiSE-FT) saved, measured and reported."""
        config, out, prepared, data = self.config, self.config.out, self.prepared, self.data
        prepared.restore(history.best)
        adapter = None
        if prepared.save_adapter is not None:
            adapter = out / ADAPTER
            prepared.save_adapter(adapter)
        weights = prepared.export()
        if config.wise is not None:
            weights = _wise(self.start_weights, weights, config.wise)
        self.loaded.model.load_state_dict(weights)
        after = self.recall(data.val)
        keep_after = self.recall(data.keep) if data.keep is not None else None
        checkpoint = out / CHECKPOINT
        tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
        replace_with(checkpoint, lambda tmp: save_file(tensors, str(tmp)))
        history.epochs.append({"epoch": "kept", "val": after})
        details = self._details(history, seconds, checkpoint, adapter, keep_after)
        trained = history.first - 1
        result = FinetuneResult(
            checkpoint, config.method, trained, data.train.n_texts, data.val.n_texts, history.before, after,
            history.best_epoch, details,
        )  # fmt: skip
        assert self.log is not None
        details["report"] = str(write_report(out, result.to_json()))
        details["plot"] = str(plot(out, self.log.records(), title=f"clipdex finetune: {config.method.value}"))
        write_report(out, result.to_json())
        shutil.rmtree(out / STATE, ignore_errors=True)
        return result

    def _details(
        self, history: _History, seconds: float, checkpoint: Path, adapter: Path | None, keep_after: Any
    ) -> dict[str, Any]:
        config, loaded, data = self.config, self.loaded, self.data
        return {
            "best_epoch_by": "mean of R@1/5/10 in both directions on the validation set",
            "wise": config.wise,
            "adapter": str(adapter) if adapter else None,
            "trainable_params": self.trainable_params,
            "total_params": sum(p.numel() for p in loaded.model.parameters()),
            "pairs_per_s": float(np.median(self.speeds)) if self.speeds else None,
            "train_seconds": seconds,
            "peak_memory_mib": _peak_memory_mib(loaded.device),
            "checkpoint_bytes": checkpoint.stat().st_size,
            "adapter_bytes": sum(p.stat().st_size for p in adapter.rglob("*") if p.is_file()) if adapter else None,
            "skipped": [{"what": w, "why": y} for w, y in data.skipped.items],
            "history": history.epochs,
            "model": config.encoder.model,
            "pretrained": config.encoder.pretrained,
            "keep": {"before": history.keep_before, "after": keep_after} if data.keep is not None else None,
        }


def _score(recalls: dict[str, dict[str, float]]) -> float:
    values = [v for direction in recalls.values() for v in direction.values()]
    return float(sum(values) / len(values))


def _wise(start: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """WiSE-FT: (1 - alpha) * start + alpha * tuned, weight by weight."""
    return {
        k: ((1 - alpha) * start[k].to(v.dtype) + alpha * v.detach().cpu()) if v.is_floating_point() else v
        for k, v in tuned.items()
    }


def _peak_memory_mib(device: torch.device) -> dict[str, float]:
    peak = {"cpu_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        peak["cuda_allocated"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak

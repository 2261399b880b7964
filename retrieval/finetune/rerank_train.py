"""`finetune --method rerank`: a cross-attention re-ranking head trained over frozen towers.

The towers do not change, so each image's and caption's features are computed once (no augmentation: the index sees
its images as they are). Each epoch deals the training pairs into batches as contrastive fine-tuning does (one
caption per image), mines hard negative images and captions for every pair from the whole training set by
contrastive similarity, and takes the ITM loss (finetune/rerank.py). Validation recall is measured before (the
contrastive space alone) and after every epoch (its top-K re-scored by the head), by the same recall code as
`clipdex eval`; the best epoch is kept (early stopping with `patience`); each epoch ends with what `--resume` needs,
saved atomically. The head is saved as `rerank-<sha256>.safetensors`, with the encoder it was trained over named in
its metadata so that it can be refused for another.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from clipdex.retrieval.errors import InputError
from clipdex.retrieval.evaluation.datasets import RetrievalDataset
from clipdex.retrieval.finetune.config import DEFAULT_LR, STATE, FinetuneConfig, FinetuneResult, Method
from clipdex.retrieval.finetune.data import read_data
from clipdex.retrieval.finetune.loop import make_optimizer, make_schedule, save_resume_state
from clipdex.retrieval.finetune.pairs import epoch_batches
from clipdex.retrieval.finetune.report import REPORT, TrainLog, plot, write_report
from clipdex.retrieval.finetune.rerank import NEGATIVES, itm_loss
from clipdex.retrieval.model.encoder import LoadedModel, load_model
from clipdex.retrieval.search.request import DEFAULT_RERANK_K
from clipdex.retrieval.search.rerank import (
    Features,
    RerankHead,
    dataset_features,
    head_config_for,
    reranked_recall,
)
from clipdex.retrieval.store.atomic import replace_with
from clipdex.retrieval.store.heads import HEAD_FORMAT

log = logging.getLogger(__name__)


def train_rerank(config: FinetuneConfig, note: Callable[[str], None]) -> FinetuneResult:
    """Train, validate and save a re-ranking head over the frozen encoder `config.encoder`."""
    started = time.perf_counter()
    loaded = load_model(config.encoder)
    loaded.model.eval()
    loaded.model.requires_grad_(False)
    data = read_data(config, loaded, note)
    options = data.options
    train = dataset_features(loaded, data.train, batch_size=config.batch_size, workers=config.workers, options=options)
    val = dataset_features(loaded, data.val, batch_size=config.batch_size, workers=config.workers, options=options)
    k = DEFAULT_RERANK_K
    torch.manual_seed(config.seed)
    head = RerankHead(head_config_for(loaded.model))
    batch_size = min(config.batch_size, len(data.train.images))
    steps = len(epoch_batches(data.train, batch_size, np.random.default_rng(0)))
    total = max(1, steps * config.total_epochs)
    optimizer = make_optimizer(list(head.named_parameters()), lr=config.lr or DEFAULT_LR[Method.RERANK],
                               weight_decay=config.weight_decay)  # fmt: skip
    schedule = make_schedule(optimizer, warmup=max(1, int(config.warmup * total)), total=total)
    scale = float(loaded.model.logit_scale.exp())  # type: ignore[operator]
    text_index = _text_index(data.train)
    negatives = min(NEGATIVES, len(data.train.images) - 1)
    if negatives < 1:
        raise InputError("a re-ranking head learns from mismatched pairs: the training pairs need at least two images")
    generator = torch.Generator().manual_seed(config.seed)
    state_path = config.out / STATE / "resume.pt"
    if config.resume:
        state = torch.load(state_path, weights_only=True)
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history, best_epoch, best = state["history"], int(state["best_epoch"]), state["best"]
        best_score = _mean(history[best_epoch]["val"]) if best_epoch else -1.0
        note(f"resuming after epoch {history[-1]['epoch']} of {config.total_epochs}")
    else:
        history = [{"epoch": 0, "val": reranked_recall(None, val, k)}]
        best_epoch, best_score, best = 0, -1.0, {n: v.clone() for n, v in head.state_dict().items()}
    before = history[0]["val"]
    for epoch in range(int(history[-1]["epoch"]) + 1, config.total_epochs + 1):
        head.train()
        losses = []
        rng = np.random.default_rng(config.seed * 100_003 + epoch)
        for batch in epoch_batches(data.train, batch_size, rng):
            text = torch.tensor([text_index[(i, caption)] for i, caption in batch])
            loss = itm_loss(head, train, text, scale, n=negatives, generator=generator)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        scores = reranked_recall(head, val, k)
        history.append({"epoch": epoch, "val": scores, "loss": float(np.mean(losses)) if losses else None})
        score = _mean(scores)
        if score > best_score:
            best_epoch, best_score = epoch, score
            best = {n: v.clone() for n, v in head.state_dict().items()}
        save_resume_state(state_path, {
            "head": head.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
            "generator": generator.get_state(), "torch_rng": torch.get_rng_state(), "history": history,
            "best_epoch": best_epoch, "best": best,
        })  # fmt: skip
        if config.patience is not None and epoch - best_epoch >= config.patience:
            note(f"no better validation recall for {config.patience} epochs: stopping after epoch {epoch}")
            break
    head.load_state_dict(best)
    head.contrastive_weight = choose_contrastive_weight(head, val, k, scale)
    after = reranked_recall(head, val, k)
    path = save_head(head, config.out, loaded)
    train_log = TrainLog(config.out)
    for record in history:
        if record.get("loss") is not None:
            train_log.write({"epoch": record["epoch"], "step": record["epoch"], "loss": record["loss"]})
        train_log.write({"epoch": record["epoch"], "val": record["val"]})
    details = {
        "head": str(path),
        "rerank_k": k,
        "score": f"ITM logit + {head.contrastive_weight:.4g} x cosine, over the contrastive top-K",
        "contrastive_weight": head.contrastive_weight,
        "head_params": sum(p.numel() for p in head.parameters()),
        "head_bytes": path.stat().st_size,
        "train_seconds": time.perf_counter() - started,
        "history": history,
        "model": config.encoder.model,
        "pretrained": config.encoder.pretrained,
        "skipped": [{"what": w, "why": y} for w, y in data.skipped.items],
    }
    trained = history[-1]["epoch"]
    result = FinetuneResult(path, Method.RERANK, trained, data.train.n_texts, data.val.n_texts, before, after,
                            best_epoch, details)  # fmt: skip
    details["plot"] = str(plot(config.out, train_log.records(), title="clipdex finetune: rerank", loss="ITM loss"))
    details["report"] = str(config.out / REPORT)
    write_report(config.out, result.to_json())
    shutil.rmtree(config.out / STATE, ignore_errors=True)
    return result


CONTRASTIVE_WEIGHTS = (0.0, 0.5, 1.0, 2.0, 4.0)  # times the model's logit scale: tried on validation recall


def choose_contrastive_weight(head: RerankHead, val: Features, k: int, scale: float) -> float:
    """How much of the contrastive score the re-ranking score keeps (logit + weight × cosine): the weight, among
    CONTRASTIVE_WEIGHTS times the model's logit scale, with the best mean validation recall (the smaller on a tie).
    The head's logit alone is best where it binds what the space cannot; a share of the cosine keeps what the space
    already knew where the head is unsure (measured: benchmarks/RESULTS.md)."""
    best_weight, best_score = 0.0, -1.0
    for w in CONTRASTIVE_WEIGHTS:
        head.contrastive_weight = w * scale
        score = _mean(reranked_recall(head, val, k))
        if score > best_score + 1e-12:
            best_weight, best_score = w * scale, score
    return best_weight


def save_head(head: RerankHead, out: Path, loaded: LoadedModel) -> Path:
    """Write the head as `rerank-<sha256 of its bytes>.safetensors` in `out`, naming the encoder it reads."""
    spec = loaded.spec
    metadata = {
        "format": HEAD_FORMAT,
        "config": json.dumps(head.config.to_json()),
        "model": spec.name,
        "pretrained": spec.pretrained or "",
        "checkpoint_sha256": spec.checkpoint_sha256 or "",
        "contrastive_weight": repr(float(head.contrastive_weight)),
    }
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    staging = out / "rerank-head.safetensors"
    replace_with(staging, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    digest = hashlib.sha256(staging.read_bytes()).hexdigest()
    final = out / f"rerank-{digest[:16]}.safetensors"
    staging.replace(final)
    return final.resolve()


def _text_index(ds: RetrievalDataset) -> dict[tuple[int, str], int]:
    """(image, caption) -> the caption's position among the dataset's flattened texts."""
    index: dict[tuple[int, str], int] = {}
    t = 0
    for i, captions in enumerate(ds.captions):
        for caption in captions:
            index.setdefault((i, caption), t)
            t += 1
    return index


def _mean(recalls: dict[str, dict[str, float]]) -> float:
    values = [v for direction in recalls.values() for v in direction.values()]
    return float(sum(values) / len(values))

"""The training loop: one epoch of contrastive steps, with feature-cached accumulation as open_clip does it.

With `accum_freq` A, a step sees A micro-batches: their features are first computed without gradients, then
each micro-batch is run again with gradients and its loss taken against the cached features of the others,
so the contrastive batch is A times what fits in memory and the gradient equals the full batch's (the test
suite checks it, parameter by parameter).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch

from clipdex.retrieval.store.atomic import atomic_file

_NO_DECAY = ("bias", "logit_scale", "logit_bias", "ln_", ".ln", "norm", "bn")


def save_resume_state(path: Path, state: dict[str, Any]) -> None:
    """What `--resume` needs, written atomically at the end of an epoch (loaded with weights_only=True)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:  # a file object: a full disk surfaces as ENOSPC, not torch's "unexpected pos"
        torch.save(state, f)


def make_loss(model: torch.nn.Module) -> torch.nn.Module:
    """Symmetric InfoNCE with the model's temperature; SigLIP's sigmoid loss for models with a logit bias."""
    if getattr(model, "logit_bias", None) is not None:
        return open_clip.SigLipLoss()
    return open_clip.ClipLoss()


def make_optimizer(
    named: list[tuple[str, torch.nn.Parameter]], *, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """AdamW; gains, biases and the temperature take no weight decay (CLIP's recipe)."""

    def no_decay(name: str, p: torch.nn.Parameter) -> bool:
        return p.ndim < 2 or any(key in name for key in _NO_DECAY)

    groups = [
        {"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": weight_decay},
        {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.98), eps=1e-6)


def make_schedule(optimizer: torch.optim.Optimizer, *, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup` steps, then a cosine decay to zero at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class Step:
    epoch: int
    step: int  # global optimizer step
    loss: float
    lr: float
    pairs_per_s: float


Batch = tuple[torch.Tensor, torch.Tensor]  # (pixels, tokens)


class Trainer:
    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LambdaLR,
        *,
        device: torch.device,
        accum_freq: int = 1,
    ):
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.device = device
        self.accum_freq = accum_freq
        self.loss = make_loss(model)
        self.step_count = 0
        cuda = device.type == "cuda"
        self.dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if cuda and self.dtype == torch.float16 else None

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.dtype)

    def _features(self, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.model.encode_image(pixels.to(self.device, non_blocking=True), normalize=True)  # type: ignore[operator]
        text = self.model.encode_text(tokens.to(self.device, non_blocking=True), normalize=True)  # type: ignore[operator]
        return image, text

    def _loss(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        scale = self.model.logit_scale.exp()  # type: ignore[union-attr, operator]
        bias = getattr(self.model, "logit_bias", None)
        return self.loss(image, text, scale, bias) if bias is not None else self.loss(image, text, scale)

    def epoch(self, epoch: int, batches: Iterable[Batch], on_step: Callable[[Step], None]) -> None:
        """Train on `batches`; a step takes `accum_freq` of them."""
        group: list[Batch] = []
        start = time.perf_counter()
        for batch in batches:
            group.append(batch)
            if len(group) == self.accum_freq:
                lr = float(self.optimizer.param_groups[0]["lr"])  # the rate this step uses
                loss = self._step(group)
                pairs = sum(len(p) for p, _ in group)
                elapsed = time.perf_counter() - start
                on_step(Step(epoch, self.step_count, loss, lr, pairs / max(elapsed, 1e-9)))
                group = []
                start = time.perf_counter()
        if group:  # a short last group still trains (its batch is smaller)
            self._step(group)

    def _step(self, group: list[Batch]) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        if len(group) == 1:
            with self._autocast():
                total = self._loss(*self._features(*group[0]))
            self._backward(total)
            value = float(total.detach())
        else:
            with torch.no_grad(), self._autocast():
                cached = [self._features(p, t) for p, t in group]
            value = 0.0
            for j, (pixels, tokens) in enumerate(group):
                with self._autocast():
                    image, text = self._features(pixels, tokens)
                    images = torch.cat([c[0] for c in cached[:j]] + [image] + [c[0] for c in cached[j + 1 :]])
                    texts = torch.cat([c[1] for c in cached[:j]] + [text] + [c[1] for c in cached[j + 1 :]])
                    total = self._loss(images, texts)
                self._backward(total)
                value = float(total.detach())  # the same full-batch loss at every micro-step
            # Each micro-step's loss depends on the temperature (and bias) in full, so their gradients were added
            # len(group) times; the features' gradients were each added once. Divide, and the step's gradient is
            # the full batch's exactly (open_clip's loop leaves the temperature's scaled up).
            for name in ("logit_scale", "logit_bias"):
                p = getattr(self.model, name, None)
                if isinstance(p, torch.nn.Parameter) and p.grad is not None:
                    p.grad /= len(group)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.step_count += 1
        with torch.no_grad():  # CLIP clamps the temperature at 100
            self.model.logit_scale.clamp_(0, math.log(100))  # type: ignore[union-attr, operator]
        return value

    def _backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

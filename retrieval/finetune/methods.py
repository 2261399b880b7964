"""Fine-tuning methods: each decides which weights train and how the result is saved, nothing else.

- full: every weight trains.
- last-n: the last N transformer blocks of each tower, with the projections, final norms and temperature
  (open_clip's own tower locks, unlocking N blocks plus the projection group).
- lora: low-rank adapters (PEFT) on the attention and MLP projections of both towers; only they train. The
  adapter is saved on its own and merged into a full checkpoint.
- lit: locked-image tuning: the image tower is frozen bit for bit (and kept in eval mode), the text side trains.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from clipdex.retrieval.errors import InputError
from clipdex.retrieval.finetune.config import Method

LORA_TARGETS = r".*\.(attn|c_fc|c_proj)$"  # attention (in and out projections) and MLP layers of every block


@dataclass
class Prepared:
    """A model made ready to train by one method."""

    model: torch.nn.Module  # call encode_image / encode_text on this one
    frozen: list[torch.nn.Module] = field(default_factory=list)  # kept in eval mode while training
    export: Callable[[], dict[str, torch.Tensor]] = dict  # the whole model as a plain open_clip state dict
    save_adapter: Callable[[Path], None] | None = None

    def trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def snapshot(self) -> dict[str, torch.Tensor]:
        """Copies of the trainable weights: enough to come back to this point (best epoch, resume)."""
        return {n: p.detach().cpu().clone() for n, p in self.trainable()}

    def restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in snapshot.items():
                params[name].copy_(value)

    def train_mode(self) -> None:
        self.model.train()
        for module in self.frozen:
            module.eval()


def prepare(method: Method, model: torch.nn.Module, *, layers: int | None = None, rank: int = 8) -> Prepared:
    return _METHODS[method](model, layers=layers, rank=rank)


def _full(model: torch.nn.Module, **_: Any) -> Prepared:
    for p in model.parameters():
        p.requires_grad = True
    return Prepared(model, export=model.state_dict)


def _last_n(model: torch.nn.Module, *, layers: int | None, **_: Any) -> Prepared:
    depth = tower_depths(model)
    if layers is None or layers < 1:
        raise InputError("--method last-n needs --layers N (N >= 1): how many blocks of each tower to train")
    if layers > min(depth.values()):
        shown = ", ".join(f"{k} {v}" for k, v in depth.items())
        raise InputError(
            f"--layers {layers} is more than the model has ({shown} blocks); use at most {min(depth.values())}"
        )
    # open_clip counts the projection as the last group of each tower: N blocks are N + 1 groups
    model.lock_image_tower(unlocked_groups=layers + 1)  # type: ignore[operator]
    model.lock_text_tower(unlocked_layers=layers + 1)  # type: ignore[operator]
    _unlock_temperature(model)
    return Prepared(model, export=model.state_dict)


def _lit(model: torch.nn.Module, **_: Any) -> Prepared:
    for p in model.parameters():
        p.requires_grad = True
    model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=True)  # type: ignore[operator]
    visual = model.visual  # type: ignore[union-attr]
    return Prepared(model, frozen=[visual], export=model.state_dict)  # type: ignore[list-item]


def _lora(model: torch.nn.Module, *, rank: int, **_: Any) -> Prepared:
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise InputError(f"--rank must be at least 1 (got {rank})")
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS, lora_dropout=0.0)
    try:
        wrapped = get_peft_model(model, config)
    except ValueError as e:
        raise InputError(f"LoRA cannot adapt this model: {e}") from e

    def export() -> dict[str, torch.Tensor]:
        return wrapped.merge_and_unload().state_dict()

    def save_adapter(folder: Path) -> None:
        wrapped.save_pretrained(str(folder))

    return Prepared(model, export=export, save_adapter=save_adapter)


def _unlock_temperature(model: torch.nn.Module) -> None:
    for name in ("logit_scale", "logit_bias"):
        p = getattr(model, name, None)
        if isinstance(p, torch.nn.Parameter):
            p.requires_grad = True


def tower_depths(model: torch.nn.Module) -> dict[str, int]:
    """Transformer blocks per tower; last-n needs transformer towers."""
    image = getattr(getattr(getattr(model, "visual", None), "transformer", None), "resblocks", None)
    text = getattr(getattr(model, "transformer", None), "resblocks", None)
    if image is None or text is None:
        raise InputError("--method last-n needs transformer towers (a ViT image tower and a CLIP text tower)")
    return {"image": len(image), "text": len(text)}


_METHODS: dict[Method, Callable[..., Prepared]] = {
    Method.FULL: _full,
    Method.LAST_N: _last_n,
    Method.LORA: _lora,
    Method.LIT: _lit,
}

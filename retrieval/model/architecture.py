"""Which open_clip architecture a checkpoint was trained with, read from its tensor shapes.

A checkpoint is a bare state dict: it does not say its architecture. For the common CLIP layout (a ViT image tower
and a text transformer, as OpenAI and OpenCLIP train them), the shapes fix everything that makes weights fit:
widths, depths, patch and image size, context length, vocabulary and embedding size. What shapes cannot tell apart
(QuickGELU or GELU, the number of heads) gives several candidates, all named.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["Shapes", "describe", "matching_architectures", "shapes_of", "shapes_of_config"]

_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.")


@dataclass(frozen=True)
class Shapes:
    """What a CLIP checkpoint's tensor shapes say about its architecture."""

    embed_dim: int
    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    context_length: int
    vocab_size: int
    text_width: int
    text_layers: int


def shapes_of(state_dict: Mapping[str, Any]) -> Shapes | None:
    """The architecture a state dict's shapes describe; None when it is not the standard ViT + text-transformer
    layout (a ResNet, timm or Hugging Face tower, SigLIP or CoCa are not read)."""
    try:
        conv = state_dict["visual.conv1.weight"].shape  # [width, 3, patch, patch]
        grid = state_dict["visual.positional_embedding"].shape[0] - 1  # patches + the class token
        tokens = state_dict["token_embedding.weight"].shape  # [vocab, width]
        context = state_dict["positional_embedding"].shape[0]
        projection = state_dict["text_projection"].shape  # [text width, embed]
    except (KeyError, AttributeError, IndexError):
        return None
    side = round(grid**0.5)
    if side * side != grid:
        return None
    depth = {"visual.": 0, "": 0}
    for key in state_dict:
        if (m := _BLOCK.match(key)) is not None:
            tower = m[1] or ""
            depth[tower] = max(depth[tower], int(m[2]) + 1)
    return Shapes(
        embed_dim=int(projection[1]),
        image_size=side * int(conv[2]),
        patch_size=int(conv[2]),
        vision_width=int(conv[0]),
        vision_layers=depth["visual."],
        context_length=int(context),
        vocab_size=int(tokens[0]),
        text_width=int(tokens[1]),
        text_layers=depth[""],
    )


def shapes_of_config(config: Mapping[str, Any]) -> Shapes | None:
    """The shapes an open_clip model config gives its weights; None for configs not in the standard layout."""
    vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
    if any(k in vision for k in ("timm_model_name", "hf_model_name")) or "hf_model_name" in text:
        return None
    if not isinstance(vision.get("layers", 12), int) or config.get("custom_text") or vision.get("no_ln_pre"):
        return None
    size = vision.get("image_size", 224)
    if isinstance(size, list | tuple):
        if len(set(size)) != 1:
            return None
        size = size[0]
    return Shapes(
        embed_dim=int(config["embed_dim"]),
        image_size=int(size),
        patch_size=int(vision.get("patch_size", 16)),
        vision_width=int(vision.get("width", 768)),
        vision_layers=int(vision.get("layers", 12)),
        context_length=int(text.get("context_length", 77)),
        vocab_size=int(text.get("vocab_size", 49408)),
        text_width=int(text.get("width", 512)),
        text_layers=int(text.get("layers", 12)),
    )


def matching_architectures(shapes: Shapes) -> list[str]:
    """open_clip's built-in architectures whose weights have these shapes, shortest name first. Read from the
    configs open_clip ships, not its registry, which also holds configs this process registered from files."""
    import open_clip

    found = []
    for path in (Path(open_clip.__file__).parent / "model_configs").glob("*.json"):
        if shapes_of_config(json.loads(path.read_text())) == shapes:
            found.append(path.stem)
    return sorted(found, key=lambda n: (len(n), n))


def describe(shapes: Shapes) -> str:
    """The shapes in a few words: what a model-config JSON for this checkpoint must say."""
    s = asdict(shapes)
    return (
        f"embed_dim {s['embed_dim']}; vision: image_size {s['image_size']}, patch_size {s['patch_size']}, "
        f"width {s['vision_width']}, layers {s['vision_layers']}; text: context_length {s['context_length']}, "
        f"vocab_size {s['vocab_size']}, width {s['text_width']}, layers {s['text_layers']}"
    )

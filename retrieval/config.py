"""Typed settings shared by the encoder, the store and the CLI; importing this loads no model code."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Best Flickr30k/COCO recall per GFLOP in open_clip's published retrieval table (see README).
DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"


@dataclass(frozen=True)
class EncoderConfig:
    """Which model to load. `pretrained` is a tag, `hf-hub:org/repo`, or a checkpoint path."""

    model: str = DEFAULT_MODEL
    pretrained: str | None = DEFAULT_PRETRAINED
    device: str = "auto"


@dataclass(frozen=True)
class ModelSpec:
    """What an index records about its model, enough to load the same one again.

    For a local checkpoint, `pretrained` is where it was last seen and `checkpoint_sha256` what it is; size and
    mtime let a load skip re-hashing an unchanged file."""

    name: str
    pretrained: str | None
    checkpoint_sha256: str | None = None
    config: dict[str, Any] | None = field(default=None, compare=False)
    checkpoint_size: int | None = field(default=None, compare=False)
    checkpoint_mtime: float | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(
            name=data["name"],
            pretrained=data.get("pretrained"),
            checkpoint_sha256=data.get("checkpoint_sha256"),
            config=data.get("config"),
            checkpoint_size=data.get("checkpoint_size"),
            checkpoint_mtime=data.get("checkpoint_mtime"),
        )

    def same_model(self, other: ModelSpec) -> bool:
        """Same architecture and the same weights: by content for a local checkpoint, by name otherwise."""
        if self.name != other.name:
            return False
        if self.checkpoint_sha256 or other.checkpoint_sha256:
            return self.checkpoint_sha256 == other.checkpoint_sha256
        return self.pretrained == other.pretrained


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()

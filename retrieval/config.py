"""Typed settings shared by the encoder, the store and the CLI; importing this loads no model code."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

# Best Flickr30k/COCO recall per GFLOP in open_clip's published retrieval table (see README).
DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"


class Kind(str, Enum):
    """The two kinds of item, and so the two things a search can target. The catalog stores the singular; a search's
    target reads as the plural (`--target images`, `"target": "texts"`), which `Kind("images")` also accepts."""

    IMAGE = "image"
    TEXT = "text"
    IMAGES = "image"  # the same members under their plural names: `Kind.IMAGES is Kind.IMAGE`
    TEXTS = "text"

    @property
    def plural(self) -> str:
        return self.value + "s"

    @classmethod
    def _missing_(cls, value: object) -> Kind | None:
        if value in ("images", "texts"):
            return cls(str(value)[:-1])
        return None


@dataclass(frozen=True)
class EncoderConfig:
    """Which model to load. `pretrained` is a tag, `hf-hub:org/repo`, or a checkpoint path."""

    model: str = DEFAULT_MODEL
    pretrained: str | None = DEFAULT_PRETRAINED
    device: str = "auto"

    @property
    def model_name(self) -> str:
        """The architecture's name: a config JSON registers under its file name."""
        return Path(self.model).stem if self.model.endswith(".json") else self.model


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

    def model_arg(self, folder: Path) -> str:
        """The --model value that rebuilds this architecture elsewhere: its name, or for a custom architecture its
        config JSON, written into `folder` under its name (so it registers under the same name)."""
        if self.config is None:
            return self.name
        path = folder / f"{self.name}.json"
        path.write_text(json.dumps(self.config))
        return str(path)

    def may_be(self, asked: EncoderConfig) -> bool:
        """Whether options naming a model may name this one, before it loads: the same architecture, and the same
        weights tag, or a local checkpoint (compared by content when it loads, `load_model(expect=)`)."""
        given = Path(asked.pretrained).expanduser() if asked.pretrained else None
        checkpoint = self.checkpoint_sha256 is not None and given is not None and given.is_file()
        return asked.model_name == self.name and (checkpoint or asked.pretrained == self.pretrained)

    def same_model(self, other: ModelSpec) -> bool:
        """Same architecture and the same weights: by content for a local checkpoint, by name otherwise."""
        if self.name != other.name:
            return False
        if self.checkpoint_sha256 or other.checkpoint_sha256:
            return self.checkpoint_sha256 == other.checkpoint_sha256
        return self.pretrained == other.pretrained


def parse_memory(text: str) -> int:
    """'4G', '512M', '1.5GB', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise ValueError(f"cannot read memory size {text!r}: use e.g. 512M, 4G")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{n} B"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


OPTIONAL_MODEL_IMPORTS = (
    "transformers",
    "timm",
)  # open_clip imports them when present, whether a model needs them or not


def optional_imports_needed(spec: ModelSpec) -> set[str]:
    """Which of open_clip's optional dependencies a model needs (Hugging Face text towers and tokenizers, timm
    image towers), read from its config without importing open_clip; all of them when the config is unknown."""
    if spec.name.startswith(("hf-hub:", "local-dir:")):
        return set(OPTIONAL_MODEL_IMPORTS)  # the config comes with the weights
    config = spec.config or _bundled_model_config(spec.name)
    if config is None:
        return set(OPTIONAL_MODEL_IMPORTS)
    text, vision = config.get("text_cfg") or {}, config.get("vision_cfg") or {}
    needed = set()
    if text.get("hf_model_name") or text.get("hf_tokenizer_name"):
        needed.add("transformers")
    if vision.get("timm_model_name"):
        needed.add("timm")
    return needed


def _bundled_model_config(name: str) -> dict[str, Any] | None:
    import importlib.util
    import json

    found = importlib.util.find_spec("open_clip")  # locates the package without running it
    if found is None or not found.submodule_search_locations:
        return None
    for folder in found.submodule_search_locations:
        path = Path(folder) / "model_configs" / f"{name}.json"
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
            return data if isinstance(data, dict) else None
    return None

"""open_clip's evaluation preprocessing in Pillow and numpy: no torch, the same pixels (tested to 1e-6).

Resize the short side to the model's size (bicubic or bilinear, as its config says) and centre-crop ("shortest",
open_clip's default), or resize to the size outright ("squash"); RGB; scale to [0, 1]; normalise. Every runtime
uses it, torch included, so the ONNX and torch paths see identical inputs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
SUPPORTED_MODES = ("shortest", "squash")


@dataclass(frozen=True)
class Preprocess:
    size: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Preprocess | None:
        """From open_clip's `preprocess_cfg`; None for a transform this module does not reproduce."""
        size = cfg.get("size", 224)
        size = (size, size) if isinstance(size, int) else tuple(size)
        mode, interpolation = cfg.get("resize_mode", "shortest"), cfg.get("interpolation", "bicubic")
        if mode not in SUPPORTED_MODES or interpolation not in _RESAMPLE or cfg.get("mode", "RGB") != "RGB":
            return None
        if mode == "shortest" and size[0] != size[1]:  # open_clip's ResizeKeepRatio path: not reproduced
            return None
        return cls(
            size=(int(size[0]), int(size[1])),
            mean=tuple(float(m) for m in cfg["mean"]),  # type: ignore[arg-type]
            std=tuple(float(s) for s in cfg["std"]),  # type: ignore[arg-type]
            interpolation=interpolation,
            resize_mode=mode,
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Preprocess:
        return cls(
            size=tuple(data["size"]),  # type: ignore[arg-type]
            mean=tuple(data["mean"]),  # type: ignore[arg-type]
            std=tuple(data["std"]),  # type: ignore[arg-type]
            interpolation=data["interpolation"],
            resize_mode=data["resize_mode"],
        )

    @property
    def crops_center(self) -> bool:
        return self.resize_mode == "shortest"

    @property
    def draft(self) -> tuple[int, int]:
        """The size a JPEG may be DCT-scaled down to while still covering the input on both sides: Pillow's `draft`
        keeps each side at or above it, and the resize to the input then starts from fewer pixels."""
        side = max(self.size)
        return (side, side)

    def resized(self, image: Image.Image) -> Image.Image:
        """The image at the model's size, before scaling and normalising."""
        height, width = self.size
        resample = _RESAMPLE[self.interpolation]
        if self.resize_mode == "squash":
            return image.resize((width, height), resample=resample)
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = height, int(height * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), resample=resample)
        if new_w < width or new_h < height:  # cannot happen for a square size; kept for safety
            raise ValueError(f"image {new_w}x{new_h} is smaller than the crop {width}x{height}")
        top, left = round((new_h - height) / 2.0), round((new_w - width) / 2.0)
        return image.crop((left, top, left + width, top + height))

    def __call__(self, image: Image.Image) -> np.ndarray:
        """(3, H, W) float32, normalised."""
        rgb = self.resized(image).convert("RGB")
        x = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / np.float32(255)
        mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None, None]
        return np.ascontiguousarray((x - mean) / std)

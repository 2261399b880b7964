"""Export an open_clip model's towers to ONNX once, check them against torch, keep them in the cache.

The image tower takes (N, 3, H, W) pixels; the text tower takes (N, L) token ids. For a causal text tower that
pools at the end-of-text token, L is dynamic, so batches cut to their longest caption (the trimming that makes
short captions 13x cheaper) run exported too; otherwise L is the context length. Both are checked on probe inputs
against the torch model they came from: every vector's cosine at least 0.99999 and no component further than 1e-4;
an export that misses is refused (recorded, so it is not retried) and torch keeps answering.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch

from clipdex.retrieval.model.encoder import Encoder, _can_trim_text, _encode_text_at_length
from clipdex.retrieval.model.fusion import MAX_ABS, MIN_COSINE  # the bar an export meets against torch
from clipdex.retrieval.model.preprocess import Preprocess
from clipdex.retrieval.model.runtime import (
    EXPORT_VERSION,
    META,
    OPSET,
    PROBE_TEXTS,
    OnnxEncoder,
    export_dir,
    find_export,
    probe_pixels,
)
from clipdex.retrieval.model.tokenizer import ClipTokenizer
from clipdex.retrieval.store.atomic import atomic_write_bytes

log = logging.getLogger(__name__)


class _ImageTower(torch.nn.Module):
    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)


class _TextTower(torch.nn.Module):
    def __init__(self, model: Any, trimmed: bool):
        super().__init__()
        self.model = model
        self.trimmed = trimmed

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return _encode_text_at_length(self.model, tokens) if self.trimmed else self.model.encode_text(tokens)


def export_encoder(encoder: Encoder) -> tuple[Path | None, str | None]:
    """(the export's folder, None), exported now if need be; or (None, why) when this model has none."""
    found = find_export(encoder.spec)
    if found is not None:
        return found, None
    folder = export_dir(encoder.spec)
    if (folder / META).is_file():  # refused before: the same model, the same code, the same answer
        return None, json.loads((folder / META).read_text()).get("reason", "refused")
    reason = _unsupported(encoder)
    if reason is not None:
        return None, reason
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        meta = _export(encoder, work)
        atomic_write_bytes(work / META, (json.dumps(meta, indent=2) + "\n").encode())
        try:
            work.rename(folder)
        except OSError:  # another process exported it meanwhile
            shutil.rmtree(work, ignore_errors=True)
    except Exception as e:  # an exporter failure: torch keeps answering
        shutil.rmtree(work, ignore_errors=True)
        log.warning("could not export %s to ONNX (%s: %s); using torch", encoder.spec.name, type(e).__name__, e)
        return None, f"{type(e).__name__}: {e}"
    if not meta["ok"]:
        log.warning("the ONNX export of %s was refused (%s); using torch", encoder.spec.name, meta["reason"])
        return None, meta["reason"]
    return folder, None


def _unsupported(encoder: Encoder) -> str | None:
    cfg = getattr(getattr(encoder.model, "visual", None), "preprocess_cfg", None) or {}
    if Preprocess.from_config(cfg) is None:
        return f"its preprocessing ({cfg.get('resize_mode')}, {cfg.get('interpolation')}) is not reproduced"
    if not isinstance(encoder.tokenizer, open_clip.SimpleTokenizer) or getattr(encoder.tokenizer, "reduction_fn", None):
        return f"its tokenizer ({type(encoder.tokenizer).__name__}) is not CLIP's"
    return None


def _export(encoder: Encoder, work: Path) -> dict[str, Any]:
    model = encoder.model.eval() if encoder.device.type == "cpu" else copy.deepcopy(encoder.model).float().cpu().eval()
    cfg: dict[str, Any] = getattr(model.visual, "preprocess_cfg", None) or {}
    preprocess = Preprocess.from_config(cfg)
    assert preprocess is not None
    trimmed = _can_trim_text(model, encoder.tokenizer)
    context = int(encoder.tokenizer.context_length)
    height, width = preprocess.size
    pixels = torch.randn(2, 3, height, width)
    tokens = torch.from_numpy(ClipTokenizer(context)(PROBE_TEXTS[:2])[:, : 12 if trimmed else context].copy())
    batch = torch.export.Dim("batch", min=1)
    length = torch.export.Dim("length", min=2, max=context) if trimmed else None
    with torch.inference_mode(False), torch.no_grad(), _quiet():
        _onnx(_ImageTower(model), pixels, "pixels", {0: batch}, work / "image.onnx")
        _onnx(
            _TextTower(model, trimmed),
            tokens,
            "tokens",
            {0: batch, 1: length} if trimmed else {0: batch},
            work / "text.onnx",
        )
    meta: dict[str, Any] = {
        "export": EXPORT_VERSION,
        "opset": OPSET,
        "name": encoder.spec.name,
        "dim": encoder.dim,
        "preprocess": preprocess.to_json(),
        "context_length": context,
        "trim_text": trimmed,
        "onnxruntime": None,
    }
    (work / META).write_text(json.dumps(meta))  # for the check's session
    agreement = _agreement(encoder, OnnxEncoder(work, encoder.spec, device="cpu"), preprocess)
    import onnxruntime

    ok = agreement["min_cosine"] >= MIN_COSINE and agreement["max_abs"] <= MAX_ABS
    meta.update(onnxruntime=onnxruntime.__version__, agreement=agreement, ok=ok)
    if not ok:
        meta["reason"] = (
            f"it disagrees with torch (cosine {agreement['min_cosine']:.7f} < {MIN_COSINE} or max |diff| "
            f"{agreement['max_abs']:.2e} > {MAX_ABS})"
        )
        for f in work.glob("*.onnx"):
            f.unlink()
    return meta


def _onnx(module: torch.nn.Module, example: torch.Tensor, name: str, dims: dict[int, Any], path: Path) -> None:
    torch.onnx.export(
        module,
        (example,),
        str(path),
        input_names=[name],
        output_names=["features"],
        dynamic_shapes=({k: v for k, v in dims.items() if v is not None},),
        opset_version=OPSET,
        dynamo=True,
        external_data=False,
        verbose=False,
    )


@contextlib.contextmanager
def _quiet():
    """The exporter reports its steps on stdout and warns on stderr: none of it is the user's business."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for name in ("torch.onnx", "torch.export", "onnxscript", "torch._dynamo"):
            logging.getLogger(name).setLevel(logging.ERROR)
        yield


def _agreement(torch_encoder: Encoder, onnx: OnnxEncoder, preprocess: Preprocess) -> dict[str, float]:
    """Both runtimes on the same probes: images (random pixels, batch of 3) and texts (short, empty, unicode,
    over-long), through the same preprocessing and tokenizer."""
    pixels = probe_pixels(preprocess.size)
    pairs = [
        (torch_encoder.encode_images(torch.from_numpy(pixels)), onnx.encode_images(pixels)),
        (torch_encoder.encode_texts(PROBE_TEXTS), onnx.encode_texts(PROBE_TEXTS)),
    ]
    cosine = min(float(np.min(np.sum(a * b, axis=1))) for a, b in pairs)
    diff = max(float(np.max(np.abs(a - b))) for a, b in pairs)
    return {"min_cosine": cosine, "max_abs": diff}

"""Lower precision as a measured option, never a silent default: an export's towers with their weights quantised to
int8 (ONNX Runtime's dynamic quantiser: int8 weights, activations quantised per batch), made once beside the fp32
graphs and checked against them on the export's probes. An index records the precision its vectors were made at
(`manifest.json`), and its queries are encoded at the same one. Imports no torch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from clipdex.retrieval.config import ModelSpec
from clipdex.retrieval.errors import ModelError
from clipdex.retrieval.model.runtime import META, PROBE_TEXTS, OnnxEncoder, graph_name, probe_pixels
from clipdex.retrieval.store.atomic import atomic_write_bytes

MIN_COSINE = {"int8": 0.99}  # every probe vector against fp32; measured agreement of rankings: benchmarks/RESULTS.md


def make_precision(folder: Path, spec: ModelSpec, precision: str) -> None:
    """Make (once) and check the export's graphs at `precision`. A precision whose vectors stray from fp32's beyond
    the bar is refused (recorded, so not retried): a ModelError that says so."""
    if precision == "fp32":
        return
    done = (json.loads((folder / META).read_text()).get("precisions") or {}).get(precision)
    if done is None:
        try:
            done = _quantise(folder, spec, precision)
            meta = json.loads((folder / META).read_text())  # as it is now: another process may have added to it
            meta.setdefault("precisions", {})[precision] = done
            atomic_write_bytes(folder / META, (json.dumps(meta, indent=2) + "\n").encode())
        except OSError as e:
            raise ModelError(f"cannot write the {precision} graphs into {folder} ({e.strerror or e})") from e
    if not done["ok"]:
        raise ModelError(f"--precision {precision} is refused for {spec.name}: {done['reason']}; use --precision fp32")


def _quantise(folder: Path, spec: ModelSpec, precision: str) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for tower in ("image", "text"):
        tmp = folder / f".{graph_name(tower, precision)}.{os.getpid()}.tmp"
        with _quiet():
            quantize_dynamic(folder / graph_name(tower, "fp32"), tmp, weight_type=QuantType.QInt8, per_channel=True)
        os.replace(tmp, folder / graph_name(tower, precision))
    agreement = _agreement(
        OnnxEncoder(folder, spec, device="cpu"), OnnxEncoder(folder, spec, device="cpu", precision=precision)
    )
    ok = agreement["min_cosine"] >= MIN_COSINE[precision]
    result: dict[str, Any] = {"ok": ok, **agreement}
    if not ok:
        result["reason"] = (
            f"its vectors stray from fp32's (cosine {agreement['min_cosine']:.4f} < {MIN_COSINE[precision]})"
        )
        for tower in ("image", "text"):
            (folder / graph_name(tower, precision)).unlink(missing_ok=True)
    return result


def _agreement(full: OnnxEncoder, low: OnnxEncoder) -> dict[str, float]:
    pixels = probe_pixels(full.preprocess.size)
    pairs = [
        (full.encode_images(pixels), low.encode_images(pixels)),
        (full.encode_texts(PROBE_TEXTS), low.encode_texts(PROBE_TEXTS)),
    ]
    return {"min_cosine": min(float(np.min(np.sum(a * b, axis=1))) for a, b in pairs)}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The quantiser advises on the root logger ("consider pre-processing"): not the user's business."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)

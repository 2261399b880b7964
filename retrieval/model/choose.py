"""Which runtime encodes: an index's queries and an indexing run get the model's ONNX export on ONNX Runtime when
it exists or can be made and agrees with torch, else open_clip on torch (`--runtime`, `$CLIPDEX_RUNTIME`).

Imports torch only when torch is what answers, or to export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipdex.retrieval.errors import ModelError
from clipdex.retrieval.model.runtime import OnnxEncoder, asked_runtime, find_export


def open_index_encoder(index_dir: Path, *, device: str = "auto", runtime: str | None = None) -> Any:
    """The encoder that answers queries for an index: its ONNX export when there is one (no torch imported), else
    open_clip on torch; with runtime auto or onnx, a model without an export is exported first (once)."""
    from clipdex.retrieval.store.manifest import read_manifest

    chosen = asked_runtime(runtime)
    spec = read_manifest(index_dir).model
    on_gpu = device.startswith("cuda")
    if chosen != "torch" and not on_gpu:
        folder = find_export(spec)
        if folder is not None:
            return OnnxEncoder(folder, spec, device=device)
    from clipdex.retrieval.model.encoder import load_encoder
    from clipdex.retrieval.model.weights import index_encoder_config

    config, spec = index_encoder_config(index_dir, device=device)
    encoder = load_encoder(config, expect=spec)
    if chosen == "torch" or on_gpu:
        return encoder
    return onnx_or_torch(encoder, required=chosen == "onnx")


def onnx_or_torch(encoder: Any, *, required: bool = False) -> Any:
    """`encoder`'s ONNX twin (exported now if it never was), or `encoder` itself when the export was refused."""
    from clipdex.retrieval.model.export import export_encoder

    folder, reason = export_encoder(encoder)
    if folder is None:
        if required:
            raise ModelError(f"--runtime onnx: {encoder.spec.name} has no usable ONNX export ({reason})")
        return encoder
    return OnnxEncoder(folder, encoder.spec, device=str(encoder.device))

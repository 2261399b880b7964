"""Which runtime encodes: an index's queries and an indexing run get the model's ONNX export on ONNX Runtime when
it exists or can be made and agrees with torch, else open_clip on torch (`--runtime`, `$CLIPDEX_RUNTIME`).

Imports torch only when torch is what answers, or to export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipdex.retrieval.config import EncoderConfig, ModelSpec
from clipdex.retrieval.errors import ModelError
from clipdex.retrieval.model.runtime import OnnxEncoder, asked_runtime, find_export

if TYPE_CHECKING:
    from clipdex.retrieval.store.manifest import Manifest


def open_index_encoder(index_dir: Path, *, device: str = "auto", runtime: str | None = None) -> Any:
    """The encoder that answers queries for an index: its ONNX export when there is one (no torch imported), else
    open_clip on torch; with runtime auto or onnx, a model without an export is exported first (once). An index
    built at a lower precision is queried at that precision, on ONNX Runtime."""
    from clipdex.retrieval.store.manifest import read_manifest

    chosen = asked_runtime(runtime)
    manifest = read_manifest(index_dir)
    precision = manifest.precision
    lowered = precision != "fp32"
    if lowered and chosen == "torch":
        raise ModelError(f"{index_dir} holds {precision} vectors, which ONNX Runtime makes: leave out --runtime torch")
    exported = _exported(manifest, device, chosen)
    if exported is not None:
        return exported
    on_gpu = device.startswith("cuda") and not lowered
    from clipdex.retrieval.model.encoder import load_encoder
    from clipdex.retrieval.model.weights import index_encoder_config

    config, spec = index_encoder_config(index_dir, device="cpu" if lowered else device)
    encoder = load_encoder(config, expect=spec)
    if chosen == "torch" or on_gpu:
        return encoder
    return onnx_or_torch(encoder, required=chosen == "onnx", precision=precision)


def exported_index_encoder(index_dir: Path, *, device: str = "auto", runtime: str | None = None) -> OnnxEncoder | None:
    """The index's model on ONNX Runtime when its export exists (and neither torch nor a GPU is asked for); None
    otherwise. Never exports, never imports torch."""
    from clipdex.retrieval.store.manifest import read_manifest

    return _exported(read_manifest(index_dir), device, asked_runtime(runtime))


def _exported(manifest: Manifest, device: str, chosen: str) -> OnnxEncoder | None:
    """The manifest's model on ONNX Runtime, if exported, unless torch (`chosen`) or a GPU (which fp32 runs on
    torch) answers."""
    spec, precision = manifest.model, manifest.precision
    if chosen == "torch" or (device.startswith("cuda") and precision == "fp32"):
        return None
    folder = find_export(spec, precision)
    return None if folder is None else OnnxEncoder(folder, spec, device=device, precision=precision)


def exported_encoder(
    config: EncoderConfig, *, expect: ModelSpec | None, runtime: str | None, precision: str = "fp32"
) -> OnnxEncoder | None:
    """The model `config` names on ONNX Runtime when its export was made before, found without importing torch: what
    an indexing run uses. None (load it with torch, which also explains a bad name or file) when torch is asked
    for, when the model would run on a GPU, or when what the model is cannot be told without loading it."""
    if asked_runtime(runtime) == "torch" or config.pretrained is None or device_name(config.device) != "cpu":
        return None
    spec = _spec_without_torch(config, expect)
    folder = find_export(spec, precision) if spec is not None else None
    if folder is None or spec is None:
        return None
    return OnnxEncoder(folder, spec, device="cpu", precision=precision)


def _spec_without_torch(config: EncoderConfig, expect: ModelSpec | None) -> ModelSpec | None:
    """The ModelSpec `load_model` would record for `config` when it can be told from the files alone: an architecture
    name or config JSON, and a weights tag or local checkpoint (by content)."""
    from clipdex.retrieval.model.weights import checkpoint_format_error, checkpoint_sha

    if config.model.startswith(("hf-hub:", "local-dir:")) or (config.pretrained or "").startswith("hf-hub:"):
        return None
    name, model_cfg = config.model, None
    as_file = Path(config.model).expanduser()
    if config.model.endswith(".json") or as_file.is_file():
        try:
            model_cfg = json.loads(as_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return None
        name = as_file.stem
    checkpoint = Path(config.pretrained or "").expanduser()
    if not checkpoint.is_file():
        return ModelSpec(name, config.pretrained, config=model_cfg)  # a tag: an export exists only if it was valid
    checkpoint = checkpoint.resolve()
    if (why := checkpoint_format_error(checkpoint)) is not None:
        raise ModelError(why)  # said before torch is imported
    sha = checkpoint_sha(checkpoint, expect)
    if expect is not None and expect.checkpoint_sha256 and sha != expect.checkpoint_sha256:
        return None  # not the index's checkpoint: loading it says so
    st = checkpoint.stat()
    return ModelSpec(name, str(checkpoint), sha, model_cfg, st.st_size, st.st_mtime)


def onnx_or_torch(encoder: Any, *, required: bool = False, precision: str = "fp32") -> Any:
    """`encoder`'s ONNX twin (exported now if it never was) at `precision`, or `encoder` itself when the export was
    refused (an error when ONNX was required, or a lower precision, which only ONNX Runtime runs)."""
    from clipdex.retrieval.model.export import export_encoder
    from clipdex.retrieval.model.precision import make_precision

    folder, reason = export_encoder(encoder)
    if folder is None:
        if required or precision != "fp32":
            asked = "--runtime onnx" if required else f"--precision {precision}"
            raise ModelError(f"{asked}: {encoder.spec.name} has no usable ONNX export ({reason})")
        return encoder
    make_precision(folder, encoder.spec, precision)
    return OnnxEncoder(folder, encoder.spec, device=str(encoder.device), precision=precision)


def device_name(device: str) -> str:
    """ "cpu" or torch's name for the device asked for; without an NVIDIA driver "auto" is the CPU, known without
    importing torch (seconds)."""
    if device == "cpu" or (device == "auto" and not _nvidia_present()):
        return "cpu"
    from clipdex.retrieval.model.encoder import resolve_device

    return str(resolve_device(device))


def _nvidia_present() -> bool:
    """Whether an NVIDIA driver is loaded here: without one CUDA cannot be, whatever torch would say."""
    return Path("/proc/driver/nvidia").exists() or Path("/dev/nvidiactl").exists()

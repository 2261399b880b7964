"""Load an open_clip model from a name, config JSON, tag, hf-hub id or local checkpoint; encode.

This is the one encode path: indexing, querying and evaluation all go through `Encoder`.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import re
import socket
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from clipdex.retrieval.config import EncoderConfig, ModelSpec, optional_imports_needed
from clipdex.retrieval.errors import ModelError
from clipdex.retrieval.imaging.decode import DEFAULT_MAX_PIXELS, MAX_ASPECT, DecodeOptions
from clipdex.retrieval.model.architecture import describe, matching_architectures, shapes_of, shapes_of_config
from clipdex.retrieval.model.preprocess import Preprocess
from clipdex.retrieval.model.runtime import encode_distinct
from clipdex.retrieval.model.weights import checkpoint_format_error, checkpoint_sha, missing_checkpoint

log = logging.getLogger(__name__)

_HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ModelError(f"unknown device {device!r}: use auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    return torch.device(device)


def register_model_config(path: Path) -> tuple[str, dict[str, Any]]:
    """Register an open_clip model-config JSON under its file stem; return (name, config)."""
    if not path.is_file():
        raise ModelError(f"model config file not found: {path}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"model config {path} is not valid JSON: {e}") from e
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if not isinstance(config, dict) or k not in config]
    if missing:
        raise ModelError(f"{path} is not an open_clip model config: missing {', '.join(missing)}")
    open_clip.add_model_config(path)
    return path.stem, config


def _resolve_model_name(model: str) -> tuple[str, dict[str, Any] | None]:
    if model.startswith("hf-hub:") or model.startswith("local-dir:"):
        return model, None
    as_path = Path(model).expanduser()
    if model.endswith(".json") or as_path.is_file():
        return register_model_config(as_path.resolve())
    known = open_clip.list_models()
    if model not in known:
        close = difflib.get_close_matches(model, known, n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ModelError(
            f"unknown model {model!r}.{hint} Give an open_clip architecture "
            "(python -c 'import open_clip; print(open_clip.list_models())'), an hf-hub:org/repo id, "
            "or a path to an open_clip model-config JSON file"
        )
    return model, None


def _resolve_pretrained(name: str, pretrained: str | None) -> tuple[str | None, Path | None]:
    """Return (value to record, local checkpoint path to load, if any)."""
    if name.startswith(("hf-hub:", "local-dir:")) or not pretrained:
        return None, None
    as_path = Path(pretrained).expanduser()
    if as_path.is_file():
        return str(as_path.resolve()), as_path.resolve()
    if pretrained.startswith("hf-hub:"):
        return pretrained, _download_hf_weights(pretrained[len("hf-hub:") :])
    if (why := missing_checkpoint(pretrained)) is not None:
        raise ModelError(why)
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise ModelError(
            f"unknown pretrained tag {pretrained!r} for {name}. "
            f"Available: {', '.join(tags) if tags else 'none'}; or pass a local checkpoint file"
        )
    return pretrained, None


def _hub_unreachable() -> bool:
    """Whether the Hugging Face Hub cannot be reached: HF_HUB_OFFLINE is set, or one connection fails (3 s at most).
    Without a network, huggingface_hub retries each download for about a minute before failing."""
    import huggingface_hub.constants as hub

    if hub.HF_HUB_OFFLINE:
        return True
    try:
        socket.create_connection((urllib.parse.urlparse(hub.ENDPOINT).hostname or "huggingface.co", 443), 3).close()
    except OSError:
        return True
    return False


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """huggingface_hub in offline mode while a model loads: cached weights load, missing ones fail at once."""
    import huggingface_hub.constants as hub

    before = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = before or offline
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = before


def _download_hf_weights(repo: str) -> Path:
    from open_clip.pretrained import download_pretrained_from_hf

    errors = []
    offline = _hub_unreachable()
    for filename in _HF_WEIGHT_FILES:
        try:
            with _hub_offline(offline):
                return Path(download_pretrained_from_hf(repo, filename=filename))
        except Exception as e:  # hub errors come in many types; offline is the usual one
            errors.append(f"{filename}: {type(e).__name__}")
    raise ModelError(
        f"could not download weights from hf-hub:{repo} ({'; '.join(errors)}). "
        "Without network, download the checkpoint elsewhere and pass --pretrained /path/to/checkpoint"
    )


class Encoder:
    """An open_clip model with its preprocessing and tokenizer, producing L2-normalised float32."""

    def __init__(self, model: torch.nn.Module, preprocess: Any, tokenizer: Any, device: torch.device, spec: ModelSpec):
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.spec = spec
        self.dim = int(_embed_dim(model))
        self.trim_text = _can_trim_text(model, tokenizer) and self._trim_is_exact()

    @property
    def crops_center(self) -> bool:
        """Whether preprocessing resizes the short side and centre-crops (open_clip's default mode)."""
        cfg = getattr(getattr(self.model, "visual", None), "preprocess_cfg", None) or {}
        return cfg.get("resize_mode", "shortest") == "shortest"

    def decode_options(self, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodeOptions:
        """How indexed files and query images are decoded for this model: one rule for both."""
        cfg = getattr(getattr(self.model, "visual", None), "preprocess_cfg", None) or {}
        same = Preprocess.from_config(cfg) if cfg else None
        return DecodeOptions(
            max_pixels=max_pixels,
            max_aspect=MAX_ASPECT if self.crops_center else None,
            draft=same.draft if same is not None else None,
        )

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        """Encode a preprocessed batch (N, 3, H, W)."""
        with torch.inference_mode(), self._autocast():
            x = pixels.to(self.device, non_blocking=True)
            feats = self.model.encode_image(x)  # type: ignore[operator]
            return F.normalize(feats.float(), dim=-1).cpu().numpy()

    def encode_pixels(self, pixels: Sequence[torch.Tensor]) -> np.ndarray:
        """Encode preprocessed images (each 3, H, W) as one batch: stacked, and pinned for a CUDA copy."""
        batch = torch.stack(list(pixels))
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        return self.encode_images(batch)

    def encode_pil(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.encode_images(torch.stack([self.preprocess(im) for im in images]))

    def encode_texts(self, texts: Sequence[str], *, batch_size: int = 256) -> np.ndarray:
        return encode_distinct(texts, self.dim, batch_size, self._encode_text_batch)

    def _encode_text_batch(self, texts: list[str], *, trim: bool | None = None) -> np.ndarray:
        tokens = self.tokenizer(texts).to(self.device)
        trim = self.trim_text if trim is None else trim
        with torch.inference_mode(), self._autocast():
            feats = _encode_text_trimmed(self.model, tokens) if trim else self.model.encode_text(tokens)  # type: ignore[operator]
            return F.normalize(feats.float(), dim=-1).cpu().numpy()

    def _trim_is_exact(self) -> bool:
        probe = ["a photo of a dog", "two red squares and a blue circle on a green background"]
        full = self._encode_text_batch(probe, trim=False)
        cut = self._encode_text_batch(probe, trim=True)
        exact = bool(np.min(np.sum(full * cut, axis=1)) >= 0.99999)
        if not exact:
            log.warning("text trimming is not exact for %s; encoding at full context length", self.spec.name)
        return exact


def _embed_dim(model: torch.nn.Module) -> int:
    proj = getattr(model, "text_projection", None)
    if isinstance(proj, torch.nn.Linear):
        return proj.out_features
    if isinstance(proj, torch.Tensor):
        return proj.shape[1]
    visual_dim = getattr(getattr(model, "visual", None), "output_dim", None)
    if visual_dim:
        return int(visual_dim)
    with torch.inference_mode():
        size = model.visual.image_size  # type: ignore[union-attr]
        size = size if isinstance(size, tuple) else (size, size)
        return int(model.encode_image(torch.zeros(1, 3, *size)).shape[-1])  # type: ignore[operator]


def _can_trim_text(model: torch.nn.Module, tokenizer: Any) -> bool:
    # Exact only for a causal text tower that pools at the end-of-text token and pads with 0.
    return (
        isinstance(model, open_clip.CLIP)
        and getattr(model, "attn_mask", None) is not None
        and getattr(model, "text_pool_type", None) in ("argmax", "eos")
        and isinstance(tokenizer, open_clip.SimpleTokenizer)
    )


def _encode_text_trimmed(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's CLIP.encode_text on tokens cut to the batch's longest caption.

    Under the causal mask no position attends to later ones, so dropping the trailing padding
    leaves the end-of-text features unchanged; attention cost falls from 77^2 to L^2.
    """
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    length = int(((tokens != 0) * (positions + 1)).max())
    return _encode_text_at_length(model, tokens[:, :length])


def _encode_text_at_length(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """CLIP.encode_text at the tokens' own length (L <= the context length): what the ONNX text tower runs."""
    length = tokens.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = open_clip.transformer.text_global_pool(x, tokens, model.text_pool_type, eos_token_id=model.text_eos_id)
    if isinstance(model.text_projection, torch.nn.Linear):
        return model.text_projection(x)
    if model.text_projection is not None:
        return x @ model.text_projection
    return x


@dataclass
class LoadedModel:
    """An open_clip model as loaded, with both of its preprocessings: what fine-tuning starts from."""

    model: torch.nn.Module
    preprocess_train: Any
    preprocess: Any
    tokenizer: Any
    device: torch.device
    spec: ModelSpec

    def encoder(self) -> Encoder:
        return Encoder(self.model, self.preprocess, self.tokenizer, self.device, self.spec)


def load_encoder(config: EncoderConfig, *, expect: ModelSpec | None = None) -> Encoder:
    """Load the model `config` names, for encoding. With `expect`, refuse a checkpoint whose hash differs."""
    loaded = load_model(config, expect=expect)
    loaded.model.eval()
    return loaded.encoder()


def load_model(config: EncoderConfig, *, expect: ModelSpec | None = None) -> LoadedModel:
    """Load the model `config` names (an architecture or config JSON, with a tag, hf-hub id or checkpoint)."""
    if config.pretrained is None and not config.model.startswith(("hf-hub:", "local-dir:")):
        log.warning("no --pretrained weights: %s has random weights and its results mean nothing", config.model)
    device = resolve_device(config.device)
    name, model_cfg = _resolve_model_name(config.model)
    recorded, checkpoint = _resolve_pretrained(name, config.pretrained)
    if checkpoint is not None and (why := checkpoint_format_error(checkpoint)) is not None:
        raise ModelError(why)
    sha = checkpoint_sha(checkpoint, expect) if checkpoint is not None else None
    if expect is not None and expect.checkpoint_sha256 and sha != expect.checkpoint_sha256:
        raise ModelError(
            f"checkpoint {recorded} is not the one the index was built with (sha256 {sha[:16] if sha else None}… "
            f"!= {expect.checkpoint_sha256[:16]}…); give the original file, or build a new index"
        )
    # A local checkpoint is loaded strictly over the whole model: drawing random initial values first is wasted
    # time (about a second for ViT-B-32 on a laptop CPU). Towers from Hugging Face or timm may load their own
    # weights non-strictly, so they keep their initialisation.
    overwritten = checkpoint is not None and not optional_imports_needed(ModelSpec(name, recorded, config=model_cfg))
    offline = checkpoint is None and (recorded is not None or name.startswith("hf-hub:")) and _hub_unreachable()
    try:
        with _no_random_init(overwritten), _hub_offline(offline):
            model, preprocess_train, preprocess = open_clip.create_model_and_transforms(
                name,
                pretrained=str(checkpoint) if checkpoint is not None else recorded,
                device=device,
                weights_only=True,
            )
        tokenizer = open_clip.get_tokenizer(name)
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(_explain_load_failure(name, recorded, checkpoint, e, offline=offline)) from e
    if not all(callable(getattr(model, f, None)) for f in ("encode_image", "encode_text")):
        raise ModelError(f"{name} is not a CLIP model (it cannot encode both images and texts)")
    st = checkpoint.stat() if checkpoint is not None else None
    spec = ModelSpec(
        name=name,
        pretrained=recorded,
        checkpoint_sha256=sha,
        config=model_cfg,
        checkpoint_size=st.st_size if st else None,
        checkpoint_mtime=st.st_mtime if st else None,
    )
    return LoadedModel(model, preprocess_train, preprocess, tokenizer, device, spec)


_RANDOM_INITS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "xavier_uniform_",
    "xavier_normal_",
    "orthogonal_",
)


@contextlib.contextmanager
def _no_random_init(enabled: bool) -> Iterator[None]:
    """While building a model whose every parameter a strict load then replaces, torch.nn.init's random fills
    leave tensors as they are (what Hugging Face's `no_init_weights` does); restored after."""
    if not enabled:
        yield
        return
    saved = {name: getattr(torch.nn.init, name) for name in _RANDOM_INITS}
    try:
        for name in _RANDOM_INITS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


_MISMATCH = re.compile(
    r"size mismatch for ([\w.]+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from checkpoint, "
    r"the shape in current model is torch\.Size\((\[[^\]]*\])\)"
)
_KEYS = re.compile(r"(Missing|Unexpected) key\(s\) in state_dict: \"([^\"]+)\"")


def _explain_load_failure(
    name: str, recorded: str | None, checkpoint: Path | None, e: Exception, *, offline: bool = False
) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if checkpoint is not None:
        return _explain_checkpoint(name, checkpoint, e, first)
    if recorded is not None or name.startswith("hf-hub:"):
        what = f"{name} / {recorded}" if recorded else name
        if offline:
            return (
                f"the weights of {what} are not on this machine and huggingface.co cannot be reached: download the "
                "checkpoint where there is a network, then pass it here with --pretrained /path/to/checkpoint"
            )
        return (
            f"could not obtain weights for {what} ({type(e).__name__}: {first[:200]}); download the checkpoint "
            "yourself and pass --pretrained /path/to/checkpoint"
        )
    return f"cannot build model {name}: {first[:300]}"


_GENERAL_FIX = "give the architecture it was trained with: --model NAME, or --model CONFIG.json for a custom one"


def _architecture_hint(name: str, checkpoint: Path) -> str | None:
    """Which --model to pass for `checkpoint`, read from its tensor shapes; None when they do not say, or say that
    `name` (the model asked for) fits."""
    try:
        shapes = shapes_of(open_clip.factory.load_state_dict(str(checkpoint), weights_only=True))
    except Exception:  # unreadable as tensors: there is no shape to read
        return None
    if shapes is None:
        return None
    asked = open_clip.get_model_config(name)
    if asked is not None and shapes_of_config(asked) == shapes:
        return None
    names = matching_architectures(shapes)
    if not names:
        return (
            f"its shapes match no open_clip architecture ({describe(shapes)}): give --model CONFIG.json, an "
            "open_clip model config that says so"
        )
    others = f" (or {', '.join(names[1:])})" if len(names) > 1 else ""
    return f"its shapes are those of {names[0]}{others}: give --model {names[0]}"


def _explain_checkpoint(name: str, checkpoint: Path, e: Exception, first: str) -> str:
    """What to do about a checkpoint that did not load: never "weights_only=False" (that runs the file's code)."""
    text = str(e)
    hint = _architecture_hint(name, checkpoint)
    fix = hint or _GENERAL_FIX
    if (m := _MISMATCH.search(text)) is not None:
        return f"{checkpoint} does not fit {name}: {m[1]} is {m[2]} in the checkpoint but {m[3]} in {name}; {fix}"
    if (m := _KEYS.search(text)) is not None:
        key = m[2].split('", "')[0]
        return f"{checkpoint} does not fit {name}: {m[1].lower()} tensor {key}; {fix}"
    if hint is not None or "width changed" in text or "Error(s) in loading state_dict" in text:
        # the shapes say another architecture, whatever open_clip met first (a resize it could not do, say)
        return f"{checkpoint} does not fit {name}; {fix}"
    if "weights_only" in text or "Unpickl" in type(e).__name__:
        return (
            f"{checkpoint} holds Python objects, not only tensors, and clipdex does not run code from a checkpoint; "
            "save its weights alone (torch.save(model.state_dict(), path)) and give that file"
        )
    return f"cannot load checkpoint {checkpoint} into {name}: {first[:300]}"

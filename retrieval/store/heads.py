"""Re-ranking heads kept with an index: attached by `clipdex finetune --method rerank --index`, used by `--rerank`.

A head (search/rerank.py) is trained over one encoder, so an index takes only a head trained over its own model: the
head's metadata names the model and the checkpoint's SHA-256, as the manifest does. The attached copy lives in the
index's `model/` folder under its content-addressed name, and the manifest names it; attaching takes the write lock,
so it never races an index run. Reading the metadata needs no torch.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from clipdex.retrieval.config import ModelSpec
from clipdex.retrieval.errors import IndexFormatError, InputError, ModelError
from clipdex.retrieval.store.atomic import replace_with
from clipdex.retrieval.store.lock import acquire_lock
from clipdex.retrieval.store.manifest import MODEL_DIR, Manifest, index_model, read_manifest, write_manifest

HEAD_FORMAT = "clipdex-rerank-head/1"


def head_metadata(path: Path) -> dict[str, str]:
    """The metadata a head was saved with; a clear error for a missing file or one that is not a head."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "np") as f:
            meta = dict(f.metadata() or {})
    except FileNotFoundError:
        raise InputError(f"re-ranking head not found: {path}") from None
    except Exception as e:
        raise InputError(f"{path} is not a re-ranking head ({type(e).__name__}: {str(e)[:120]})") from None
    if meta.get("format") != HEAD_FORMAT:
        raise InputError(f"{path} is not a clipdex re-ranking head (made by `clipdex finetune --method rerank`)")
    return meta


def check_head_encoder(path: Path, meta: dict[str, str], spec: ModelSpec) -> None:
    """Refuse a head trained over another encoder than `spec` (architecture and weights)."""
    trained = (meta.get("model"), meta.get("checkpoint_sha256") or None)
    if trained != (spec.name, spec.checkpoint_sha256):
        raise ModelError(
            f"{path.name} was trained over {meta.get('model')} / {meta.get('pretrained') or 'no weights'}, not this "
            f"model ({spec.name} / {spec.pretrained}): train a head for it with `clipdex finetune --method rerank`"
        )


def attach_head(index_dir: Path, head: Path) -> Path:
    """Keep a copy of `head` in the index and name it in the manifest (replacing a head attached before); the copy's
    path. Refused, with nothing changed, when the head was trained over another model than the index's."""
    meta = head_metadata(head)
    check_head_encoder(head, meta, read_manifest(index_dir).model)  # before the lock: a mistake is said at once
    lock = acquire_lock(index_dir, holder="clipdex finetune --index")
    try:
        manifest = read_manifest(index_dir)  # as it is now that no run can change it
        check_head_encoder(head, meta, manifest.model)
        folder = index_dir / MODEL_DIR
        folder.mkdir(exist_ok=True)
        kept = folder / head.name
        if not kept.is_file() or kept.read_bytes() != head.read_bytes():
            replace_with(kept, lambda tmp: shutil.copyfile(head, tmp))
        previous = manifest.rerank
        manifest.rerank = kept.name
        write_manifest(index_dir, manifest)
        if previous and previous != kept.name:
            (folder / previous).unlink(missing_ok=True)
        return kept
    finally:
        lock.close()


def index_head(index_dir: Path, manifest: Manifest) -> Path:
    """The head attached to an index; a clear error when it has none (or its file is gone)."""
    if not manifest.rerank:
        raise InputError(
            f"{index_dir} has no re-ranking head: train one with `clipdex finetune PAIRS --method rerank --model "
            f"{index_model(index_dir, manifest.model)} --pretrained {manifest.model.pretrained or '...'} --index "
            f"{index_dir}`"
        )
    path = index_dir / MODEL_DIR / manifest.rerank
    if not path.is_file():
        raise IndexFormatError(f"{index_dir}: the re-ranking head the manifest names is missing ({path})")
    return path

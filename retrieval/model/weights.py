"""Checkpoints kept by content, so an index keeps answering queries after its checkpoint file moves.

When an index is built from a local checkpoint, a copy is kept once per SHA-256 in the user's cache
(`$CLIPDEX_CACHE`, else `$XDG_CACHE_HOME/clipdex`, else `~/.cache/clipdex`), under `weights/<sha256><suffix>`,
shared by every index. Loading an index's model takes the recorded file while its content is unchanged, else
the cached copy; any file with the same SHA-256 can be given in its place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from clipdex.retrieval.config import EncoderConfig, ModelSpec, sha256_file
from clipdex.retrieval.errors import ModelError
from clipdex.retrieval.store.atomic import atomic_write_bytes, replace_with
from clipdex.retrieval.store.manifest import index_model, read_manifest

log = logging.getLogger(__name__)


def cache_root() -> Path:
    if os.environ.get("CLIPDEX_CACHE"):
        return Path(os.environ["CLIPDEX_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "clipdex"


def index_digest(index_dir: Path) -> str:
    """A short name for an index in the cache (what `clipdex serve` keeps per index): its canonical path, hashed."""
    return hashlib.blake2b(str(index_dir.resolve()).encode(), digest_size=8).hexdigest()


def stored_copy(sha256: str, suffix: str) -> Path:
    return cache_root() / "weights" / f"{sha256}{suffix}"


def keep_copy(path: Path, sha256: str) -> Path | None:
    """Copy checkpoint `path` (whose hash is `sha256`) into the cache once; return the copy, or None if the cache
    cannot be written (the index then depends on `path` staying where it is, and says so in a warning).

    A copy, not a hard link: a checkpoint overwritten in place must not change the stored one."""
    dest = stored_copy(sha256, path.suffix)
    try:
        if dest.is_file() and dest.stat().st_size == path.stat().st_size:
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        replace_with(dest, lambda tmp: shutil.copyfile(path, tmp), unique=True)  # indexes may copy it at once
        return dest
    except OSError as e:
        log.warning(
            "could not keep a copy of %s in %s (%s): the index needs the file to stay where it is",
            path,
            dest.parent,
            e.strerror or e,
        )
        return None


_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")


def missing_checkpoint(pretrained: str | None) -> str | None:
    """Why --pretrained names a checkpoint file that is not there (it looks like a path, not a tag or hub id);
    None otherwise. Torch-free: commands check it before loading anything."""
    if not pretrained or pretrained.startswith("hf-hub:") or Path(pretrained).expanduser().is_file():
        return None
    if "/" in pretrained or "\\" in pretrained or pretrained.lower().endswith(_CHECKPOINT_SUFFIXES):
        return f"checkpoint file not found: {pretrained} (--pretrained takes a file, a tag or hf-hub:org/repo)"
    return None


def checkpoint_format_error(path: Path) -> str | None:
    """Why `path` is not a checkpoint open_clip can read (PyTorch zip or pickle, safetensors, numpy .npz), read
    from its first bytes; None when it may be one."""
    try:
        with path.open("rb") as f:
            head = f.read(16)
    except OSError as e:
        return f"cannot read {path}: {e.strerror or e}"
    if head.startswith((b"PK\x03\x04", b"\x80")):  # a zip (torch.save, .npz) or a pickle
        return None
    if len(head) >= 9 and head[8:9] == b"{":  # safetensors: an 8-byte header length, then JSON
        return None
    return (
        f"{path} is not a PyTorch or safetensors checkpoint (give the model's weights file, e.g. a .pt or .safetensors)"
    )


def checkpoint_sha(path: Path, expect: ModelSpec | None = None) -> str:
    """The SHA-256 of a checkpoint file, without reading it when `expect` already vouches for it: the recorded
    file at its recorded size and mtime, or the cached copy (named by its content, written once)."""
    if expect is not None and expect.checkpoint_sha256:
        st = path.stat()
        if expect.checkpoint_size is None or st.st_size == expect.checkpoint_size:
            if str(path) == expect.pretrained and st.st_mtime == expect.checkpoint_mtime:
                return expect.checkpoint_sha256
            if path == stored_copy(expect.checkpoint_sha256, path.suffix):
                return expect.checkpoint_sha256
    return _remembered_sha(path)


_RACY_NS = 2_000_000_000


def _remembered_sha(path: Path) -> str:
    """sha256_file, remembered in the cache per file while its inode, size, mtime and ctime stay the same (ctime
    changes with any write, whatever mtime is set to): a new index of a 600 MB checkpoint no longer reads it whole
    to learn what it is (a second on a laptop)."""
    st = path.stat()
    stamp = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    memo = cache_root() / "hashes" / f"{hashlib.blake2b(str(path.resolve()).encode(), digest_size=16).hexdigest()}.json"
    try:
        known = json.loads(memo.read_text())
        if known.get("stamp") == stamp and isinstance(known.get("sha256"), str):
            return str(known["sha256"])
    except (OSError, ValueError, AttributeError):
        pass
    sha = sha256_file(path)
    if time.time_ns() - st.st_ctime_ns < _RACY_NS:
        return sha  # changed just now: a write within the clock's tick could leave the stamp as it is (racy git)
    with contextlib.suppress(OSError):  # a read-only cache: hashed again next time
        memo.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(memo, json.dumps({"path": str(path), "stamp": stamp, "sha256": sha}).encode())
    return sha


def same_file(path: Path, spec: ModelSpec) -> bool:
    """Whether `path` holds the checkpoint `spec` records."""
    try:
        return checkpoint_sha(path, spec) == spec.checkpoint_sha256
    except OSError:
        return False


def locate(spec: ModelSpec) -> Path | None:
    """The file to load for an index's local checkpoint (None when its weights are a tag or hub id)."""
    if not spec.checkpoint_sha256 or not spec.pretrained:
        return None
    recorded = Path(spec.pretrained)
    if recorded.is_file() and same_file(recorded, spec):
        return recorded
    copy = stored_copy(spec.checkpoint_sha256, recorded.suffix)
    if copy.is_file():
        return copy
    state = "has changed" if recorded.is_file() else "is gone"
    raise ModelError(
        f"the checkpoint this index was built with {state}: {recorded} (sha256 {spec.checkpoint_sha256[:16]}…), "
        f"and no copy is in {copy.parent}. Put the file back, or give a file with the same content: "
        f"`clipdex index PATHS --index DIR --pretrained FILE` records where it is now"
    )


def index_encoder_config(index_dir: Path, *, device: str = "auto") -> tuple[EncoderConfig, ModelSpec]:
    """The encoder config that reloads the model an index was built with: its checkpoint where it was recorded,
    or the content-addressed copy when the file has moved (retrieval.weights)."""
    spec = read_manifest(index_dir).model
    model = index_model(index_dir, spec)
    checkpoint = locate(spec)
    pretrained = str(checkpoint) if checkpoint is not None else spec.pretrained
    return EncoderConfig(model=model, pretrained=pretrained, device=device), spec

"""One spelling per file and one digest per content: canonical paths, what lies at or under a path, content hashes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def canonical(path: Path | str) -> Path:
    """User folder expanded, absolute, `..` folded, symlinks resolved.

    Works for paths that no longer exist (the existing prefix is resolved), so a deleted folder can be named."""
    return Path(path).expanduser().resolve(strict=False)


def is_at_or_under(path: str, root: str) -> bool:
    return path == root or path.startswith(under_prefix(root))


def under_prefix(root: str) -> str:
    """The prefix every path strictly under `root` starts with."""
    return root.rstrip(os.sep) + os.sep


def content_hash(data: bytes) -> str:
    """What the catalog's `hash` column holds: a file's (or a text's UTF-8) BLAKE2b-128, in hex."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()

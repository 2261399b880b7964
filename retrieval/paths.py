"""One spelling per file: canonical paths, and what lies at or under a path."""

from __future__ import annotations

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

"""`clipdex remove`: take every item at or under some paths out of an index, whether the files exist or not."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipdex.retrieval.ann.build import index_writer
from clipdex.retrieval.paths import canonical, is_at_or_under
from clipdex.retrieval.store.manifest import read_manifest


@dataclass
class RemoveSummary:
    removed: int = 0
    unlinked_texts: int = 0  # captions kept, without the image they named
    not_indexed: list[str] = field(default_factory=list)  # paths with nothing indexed at or under them

    def to_json(self) -> dict[str, Any]:
        return {"removed": self.removed, "unlinked_texts": self.unlinked_texts, "not_indexed": self.not_indexed}


def remove_paths(index_dir: Path, paths: list[Path]) -> RemoveSummary:
    """Remove images at or under each path, and the texts of caption files there; captions elsewhere that named a
    removed image keep their text without it. No model is loaded."""
    manifest = read_manifest(index_dir)
    roots = [str(canonical(p)) for p in paths]
    summary = RemoveSummary()
    writer = index_writer(index_dir, manifest.model, manifest.dim)
    try:
        unlinked_before = writer.catalog.unlinked_count()
        ids: set[int] = set()
        for root in roots:
            found = writer.catalog.ids_at_or_under([root])
            if not found:
                summary.not_indexed.append(root)
            ids.update(found)
        kept_roots = [r for r in writer.manifest.roots if not any(is_at_or_under(r, root) for root in roots)]
        if ids or kept_roots != writer.manifest.roots:
            writer.set_roots(kept_roots)
            writer.commit([], delete_ids=sorted(ids))
            published = writer.publish()
            summary.unlinked_texts = published.counts.get("unlinked_texts", 0) - unlinked_before
        summary.removed = len(ids)
    finally:
        writer.close()
    return summary

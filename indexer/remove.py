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
    come_back: list[str] = field(default_factory=list)  # removed paths a later `index` of a folder above brings back
    forgotten: list[str] = field(default_factory=list)  # removed paths that later runs leave out (--forget)

    def to_json(self) -> dict[str, Any]:
        return {
            "removed": self.removed,
            "unlinked_texts": self.unlinked_texts,
            "not_indexed": self.not_indexed,
            "come_back": self.come_back,
            "forgotten": self.forgotten,
        }


def remove_paths(index_dir: Path, paths: list[Path], *, forget: bool = False) -> RemoveSummary:
    """Remove images at or under each path, and the texts of caption files there; captions elsewhere that named a
    removed image keep their text without it. No model is loaded. With `forget`, a later `index` of a folder above
    them leaves them out; without, the summary names the paths such a run would bring back."""
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
        under_a_root = [p for p in roots if any(is_at_or_under(p, r) and p != r for r in kept_roots)]
        forgotten = writer.manifest.forgotten
        if forget:
            summary.forgotten = under_a_root
            forgotten = sorted(set(forgotten) | set(under_a_root))
        else:
            summary.come_back = under_a_root
        offline = [p for p in writer.manifest.offline if not any(is_at_or_under(p, root) for root in roots)]
        if ids or kept_roots != writer.manifest.roots or forgotten != writer.manifest.forgotten:
            writer.set_roots(kept_roots)
            writer.set_forgotten(forgotten)
            writer.set_offline(offline)  # what was offline there is removed: offline no more
            writer.commit([], delete_ids=sorted(ids))
            published = writer.publish()
            summary.unlinked_texts = published.counts.get("unlinked_texts", 0) - unlinked_before
        summary.removed = len(ids)
    finally:
        writer.close()
    return summary

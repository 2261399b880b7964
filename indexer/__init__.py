"""clipdex indexer: walk folders and caption files, decode in workers, encode, commit incrementally."""

from indexer.pipeline import IndexConfig, Summary, run_index

__all__ = ["IndexConfig", "Summary", "run_index"]

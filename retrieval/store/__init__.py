"""Storage: the index directory's files and how they change without ever being half-written.

`atomic` (temp file, fsync, rename), `lock` (one writer), `items` (what an index holds), `manifest` (the typed
entry point), `catalog` (DuckDB), `shards` (vector files), `snapshot` (publishing generations), `reader` (opening
the published snapshot: item rows and vectors), `writer` (commits and publishes).

Layer: above `imaging/`; below `model/`, `ann/` and the rest. Storage knows files, not index policy: publishing is
handed an `IndexBuilder` (`ann.build`).
"""

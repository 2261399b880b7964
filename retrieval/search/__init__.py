"""Answering queries: `Searcher` (the one query path), the typed search request (`request`), query arithmetic
(`query`), filters (`filters`), request batching (`batching`), near-duplicates (`duplicates`), zero-shot labels
(`classify`) and the cross-attention re-ranker (`rerank`).

Layer: above `ann/`, `model/` and `evaluation/`; below `maintain/`, `finetune/` and `serve/`.
"""

"""Answering queries: `Searcher` (the one query path), the typed search request (`request`), query arithmetic
(`query`), filters (`filters`), request batching (`batching`), near-duplicates (`duplicates`) and zero-shot labels
(`classify`).

Layer: above `ann/`, `model/` and `evaluation/`; below `maintain/`, `finetune/` and `serve/`.
"""

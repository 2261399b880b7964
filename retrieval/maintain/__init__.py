"""Looking after an index: `check` (manifest, catalog, vectors and FAISS indexes agree), `repair` (restore a
consistent index from what is intact) and `info` (what an index holds).

Layer: above `search/`; below `finetune/` and `serve/`.
"""

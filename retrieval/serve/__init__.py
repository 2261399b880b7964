"""`clipdex serve`: the FastAPI app (`app`) with routers by area (`routes_*`), its schemas (`schemas`), thumbnails,
the registry that lets `clipdex search` ask a running server (`remote`), and the web page (`web/`).

Layer: the top of `retrieval/`; it holds no search logic of its own and calls `Searcher`.
"""

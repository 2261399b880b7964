"""The model: loading open_clip models from names, tags, `hf-hub:` ids, config JSON and checkpoints (`encoder`),
encoding images and texts, and checkpoints kept by content so an index finds its weights again (`weights`); the
towers exported to ONNX (`export`) and run on ONNX Runtime (`runtime`) with torch-free preprocessing and tokenizer
(`preprocess`, `tokenizer`); the choice between the runtimes (`choose`).

Layer: above `imaging/` and `store/` (it reads which model an index was built with); below `ann/` and the rest.
Importing `encoder` or `export` loads torch and open_clip; `weights`, `runtime`, `preprocess`, `tokenizer` and
`choose` do not.
"""

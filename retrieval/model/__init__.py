"""The model: loading open_clip models from names, tags, `hf-hub:` ids, config JSON and checkpoints (`encoder`),
encoding images and texts, and checkpoints kept by content so an index finds its weights again (`weights`).

Layer: above `imaging/` and `store/` (it reads which model an index was built with); below `ann/` and the rest.
Importing `encoder` loads torch and open_clip; `weights` does not.
"""

"""Measuring alignment: datasets (Flickr30k, MS-COCO, caption files), recall@k computed exactly as CLIP_benchmark
computes it (`metrics`), and evaluation of a model through the one encode path (`evaluate`).

Layer: above `model/`; below `search/`, `finetune/` and `serve/`.
"""

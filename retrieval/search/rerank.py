"""The cross-attention re-ranker applied: what binds a colour to its object, over frozen CLIP towers.

A contrastive space scores an image against a caption with one dot product of two pooled vectors, so "a red circle
and a blue square" and "a blue circle and a red square" land close together. The head here lets the caption's token
features attend to the image's patch features (ALBEF's and BLIP's image-text matching, ITM) and ends in one match
logit. It re-scores the contrastive top-K; the towers stay frozen, so the index's vectors never change. It is
trained by `clipdex finetune --method rerank` (finetune/rerank.py, finetune/rerank_train.py).

- `token_features`: the towers' per-token features (image patches as they enter the image tower's last block;
  text tokens after `ln_final`, with the mask of real tokens), computed without gradient.
- `RerankHead`: input projections to a small width, then blocks of self-attention on the text, cross-attention to
  the image and an MLP (pre-norm, residuals), a learned match token read out to one logit.
- `dataset_features`, `rescorer`, `reranked_recall`: a dataset's features once, and recall with the head
  re-scoring each query's contrastive top-K (by evaluation's recall code); `load_head` refuses a head trained over
  another encoder.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clipdex.retrieval.config import ModelSpec
from clipdex.retrieval.evaluation.datasets import RetrievalDataset
from clipdex.retrieval.evaluation.evaluate import EvalConfig, evaluate
from clipdex.retrieval.evaluation.metrics import Rescore, reranked_recall_at_k
from clipdex.retrieval.imaging.decode import MAX_FILE_BYTES, DecodeOptions
from clipdex.retrieval.imaging.files import read_regular
from clipdex.retrieval.model.encoder import LoadedModel
from clipdex.retrieval.store.heads import check_head_encoder, head_metadata


@dataclass(frozen=True)
class TokenFeatures:
    """Per-token outputs of both towers for a batch: what the head reads."""

    image: torch.Tensor  # [images, patches, vision width]
    text: torch.Tensor  # [texts, context, text width]
    text_mask: torch.Tensor  # [texts, context], True where a token is real (start ... end of text)


@torch.no_grad()
def image_features(model: Any, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the image embedding as `encode_image` gives it, unnormalised; the patch tokens the head reads).

    The patch tokens are the input of the image tower's last block. That block's own patch outputs are trained by
    nothing, since contrastive training reads only the class token. Measured on the compositional domain: the head
    over last-block tokens fell below the contrastive space (R@1 0.08 against 0.15), and over these it rose above
    (benchmarks/RESULTS.md)."""
    visual = model.visual
    blocks = visual.transformer.resblocks
    seen: list[torch.Tensor] = []
    hook = blocks[-1].register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    try:
        pooled = visual(images)
    finally:
        hook.remove()
    tokens = seen[0] if visual.transformer.batch_first else seen[0].transpose(0, 1)
    return pooled, tokens[:, 1:]  # without the class token


def image_tokens(model: Any, images: torch.Tensor) -> torch.Tensor:
    """The patch tokens the head reads: [B, patches, width] (see image_features)."""
    return image_features(model, images)[1]


@torch.no_grad()
def text_features(model: Any, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the text embedding as `encode_text` gives it, unnormalised; the token outputs after `ln_final`
    [B, context, width], read from the same pass; the mask of real tokens, up to and including the end-of-text
    token, which CLIP's tokenizer gives the highest id)."""
    seen: list[torch.Tensor] = []
    hook = model.ln_final.register_forward_hook(lambda _module, _args, out: seen.append(out))
    try:
        pooled = model.encode_text(ids)
    finally:
        hook.remove()
    end = ids.argmax(dim=-1, keepdim=True)
    mask = torch.arange(ids.shape[1], device=ids.device)[None, :] <= end
    return pooled, seen[0], mask


def text_tokens(model: Any, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The text tower's token outputs after `ln_final` and the mask of real tokens (see text_features)."""
    _, tokens, mask = text_features(model, ids)
    return tokens, mask


def token_features(model: Any, images: torch.Tensor, ids: torch.Tensor) -> TokenFeatures:
    tokens, mask = text_tokens(model, ids)
    return TokenFeatures(image_tokens(model, images), tokens, mask)


@dataclass(frozen=True)
class HeadConfig:
    """The head's shape; saved with its weights."""

    vision_width: int
    text_width: int
    width: int = 256
    layers: int = 3
    heads: int = 4
    mlp_ratio: float = 4.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _Block(nn.Module):
    """Self-attention on the text, cross-attention from the text to the image, an MLP; pre-norm, residuals."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_cross = nn.LayerNorm(width)
        self.norm_image = nn.LayerNorm(width)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, text: torch.Tensor, padding: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        q = self.norm_self(text)
        text = text + self.self_attn(q, q, q, key_padding_mask=padding, need_weights=False)[0]
        kv = self.norm_image(image)
        text = text + self.cross_attn(self.norm_cross(text), kv, kv, need_weights=False)[0]
        return text + self.mlp(self.norm_mlp(text))


class RerankHead(nn.Module):
    """Image-text matching over frozen token features: one logit per (image, text) pair, higher for a match."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width
        self.image_in = nn.Sequential(nn.LayerNorm(config.vision_width), nn.Linear(config.vision_width, w))
        self.text_in = nn.Sequential(nn.LayerNorm(config.text_width), nn.Linear(config.text_width, w))
        self.match_token = nn.Parameter(torch.zeros(1, 1, w))
        self.blocks = nn.ModuleList(_Block(w, config.heads, config.mlp_ratio) for _ in range(config.layers))
        self.norm_out = nn.LayerNorm(w)
        self.out = nn.Linear(w, 1)
        nn.init.normal_(self.match_token, std=0.02)
        # how the head's logit and the contrastive cosine combine: logit + contrastive_weight × cosine, the weight
        # chosen on validation recall when the head is trained (0: the logit alone)
        self.contrastive_weight = 0.0

    def combine(self, logits: torch.Tensor | np.ndarray, cosines: torch.Tensor | np.ndarray) -> Any:
        """The re-ranking score of candidates: the head's logit plus its measured weight times their cosine."""
        return logits + self.contrastive_weight * cosines

    def project_image(self, image: torch.Tensor) -> torch.Tensor:
        """The image tokens in the head's width: what an index may keep per image (the head's own input)."""
        return self.image_in(image)

    def forward(
        self, image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, *, projected: bool = False
    ) -> torch.Tensor:
        """Logits [B] for B (image, text) pairs: image [B, N, vision width] (or [B, N, width] when `projected`),
        text [B, L, text width] with text_mask [B, L] (True for real tokens)."""
        image = image if projected else self.project_image(image)
        longest = int(text_mask.sum(dim=1).max())  # what follows every text's end is padding: not computed at all
        text, text_mask = text[:, :longest], text_mask[:, :longest]
        x = torch.cat([self.match_token.expand(text.shape[0], -1, -1), self.text_in(text)], dim=1)
        real = torch.cat([torch.ones_like(text_mask[:, :1]), text_mask], dim=1)
        for block in self.blocks:
            x = block(x, ~real, image)
        return self.out(self.norm_out(x[:, 0])).squeeze(-1)


@dataclass
class Features:
    """A dataset's frozen features: patch tokens and pooled vectors of its images, token features and pooled
    vectors of its captions (flattened in dataset order, `owner[t]` the image of caption t)."""

    image_tokens: torch.Tensor  # [images, patches, vision width], fp16 (the head computes in fp32)
    image_emb: torch.Tensor  # [images, dim], normalised
    text_tokens: torch.Tensor  # [texts, longest, text width], fp16
    text_mask: torch.Tensor  # [texts, longest]
    text_emb: torch.Tensor  # [texts, dim], normalised
    owner: np.ndarray

    def pairs(self, image: torch.Tensor, text: torch.Tensor) -> TokenFeatures:
        return TokenFeatures(self.image_tokens[image].float(), self.text_tokens[text].float(), self.text_mask[text])


@torch.no_grad()
def dataset_features(
    loaded: LoadedModel, ds: RetrievalDataset, *, batch_size: int, workers: int, options: DecodeOptions
) -> Features:
    """Decode and encode a dataset once, keeping what the head and the contrastive scores need."""
    from clipdex.retrieval.imaging.loader import ImageFiles, iter_decoded

    model: Any = loaded.model  # an open_clip CLIP: its towers' attributes are not typed
    device = loaded.device
    tokens: list[torch.Tensor | None] = [None] * len(ds.images)
    pooled: list[torch.Tensor | None] = [None] * len(ds.images)
    files = ImageFiles(ds.images, loaded.preprocess, options=options)
    for batch in iter_decoded(files, batch_size=batch_size, workers=min(workers, len(ds.images))):
        for d in batch:
            if d.error is not None:
                raise ValueError(f"cannot use {ds.images[d.index]}: {d.error}")
        pixels = torch.stack([d.pixels for d in batch]).to(device)  # type: ignore[misc]
        emb, tok = image_features(model, pixels)
        for d, e, t in zip(batch, emb, tok, strict=True):
            pooled[d.index], tokens[d.index] = e, t.half()
    texts, owner = ds.texts()
    ids = loaded.tokenizer(texts).to(device)
    t_tokens, t_mask, t_emb = [], [], []
    for start in range(0, len(texts), 256):
        chunk = ids[start : start + 256]
        emb, tok, mask = text_features(model, chunk)  # one pass of the text tower for both
        t_tokens.append(tok.half())
        t_mask.append(mask)
        t_emb.append(emb)
    mask = torch.cat(t_mask)
    longest = int(mask.sum(dim=1).max())
    return Features(
        torch.stack(tokens).cpu(),  # type: ignore[arg-type]
        F.normalize(torch.stack(pooled).float(), dim=-1).cpu(),  # type: ignore[arg-type]
        torch.cat(t_tokens)[:, :longest].cpu(),
        mask[:, :longest].cpu(),
        F.normalize(torch.cat(t_emb).float(), dim=-1).cpu(),
        np.asarray(owner),
    )


def rescorer(head: RerankHead, f: Features, *, chunk: int = 256) -> Rescore:
    """The head as a `reranked_recall_at_k` re-scorer over a dataset's features (its logit combined with the cosine
    by the head's `contrastive_weight`)."""

    @torch.no_grad()
    def rescore(direction: str, queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        rows, k = candidates.shape
        if direction == "text_to_image":
            images, texts = candidates.reshape(-1), np.repeat(queries, k)
        else:
            images, texts = np.repeat(queries, k), candidates.reshape(-1)
        head.eval()
        out = []
        for start in range(0, len(images), chunk):
            pick_i = torch.from_numpy(images[start : start + chunk])
            pick_t = torch.from_numpy(texts[start : start + chunk])
            p = f.pairs(pick_i, pick_t)
            out.append(head(p.image, p.text, p.text_mask))
        logits = torch.cat(out).numpy().reshape(rows, k)
        cosines = (f.image_emb[images] * f.text_emb[texts]).sum(-1).numpy().reshape(rows, k)
        return head.combine(logits, cosines)

    return rescore


def reranked_recall(head: RerankHead | None, f: Features, k: int) -> dict[str, dict[str, float]]:
    """Recall@1/5/10 of the contrastive space (head None) or of its top-`k` re-scored by `head`."""
    rerank = None if head is None else (k, rescorer(head, f))
    return reranked_recall_at_k(f.text_emb.numpy(), f.image_emb.numpy(), f.owner, rerank)


def head_config_for(model: Any) -> HeadConfig:
    vision, text = int(model.visual.transformer.width), int(model.transformer.width)
    return HeadConfig(vision_width=vision, text_width=text, width=min(256, max(vision, text)))


def load_head(path: Path, spec: ModelSpec) -> RerankHead:
    """A saved head, refused unless it was trained over the encoder `spec` names (architecture and weights)."""
    from safetensors.torch import load_file

    meta = head_metadata(path)
    check_head_encoder(path, meta, spec)
    head = RerankHead(HeadConfig(**json.loads(meta["config"])))
    head.load_state_dict(load_file(str(path)))
    head.contrastive_weight = float(meta.get("contrastive_weight") or 0.0)
    return head.eval()


class Reranker:
    """An index's head at query time: re-scores one query's contrastive candidates.

    The head reads token features the index does not keep: the candidates' patch tokens are recomputed from their
    files (decoded as indexing decodes them, then the image tower), and the query's text tokens by the text tower.
    Measured against keeping every image's tokens at index time (benchmarks/RESULTS.md): recomputing costs about
    10 ms more for 16 candidates with the test model, keeps indexing free of torch, and needs no bytes per image
    nor any change when a head is attached later. Images re-scored once stay cached (projected to the head's
    width), so a server pays for each image once."""

    def __init__(self, loaded: LoadedModel, head: RerankHead, options: DecodeOptions, *, cache_size: int = 1024):
        self.loaded, self.head, self.options = loaded, head, options
        self._size = cache_size
        self._images: OrderedDict[int, torch.Tensor] = OrderedDict()  # item id -> projected patch tokens
        self._lock = threading.Lock()  # one forward at a time: torch's threads are shared anyway

    def forget(self) -> None:
        """Drop the cached image tokens (a new snapshot may hold other files under the same ids)."""
        with self._lock:
            self._images.clear()

    def _cached(self, item: int) -> torch.Tensor | None:
        found = self._images.get(item)
        if found is not None:
            self._images.move_to_end(item)
        return found

    def _keep(self, item: int, tokens: torch.Tensor) -> None:
        self._images[item] = tokens
        while len(self._images) > self._size:
            self._images.popitem(last=False)

    @torch.no_grad()
    def _text(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.loaded.tokenizer([text]).to(self.loaded.device)
        return text_tokens(self.loaded.model, ids)

    @torch.no_grad()
    def _pixels_tokens(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        tokens = image_tokens(self.loaded.model, torch.stack(pixels).to(self.loaded.device))
        return self.head.project_image(tokens.float())

    def _decoded(self, data: bytes) -> torch.Tensor:
        return self.loaded.preprocess(self.options.decode(data).image)

    @torch.no_grad()
    def score_images(self, text: str, candidates: list[tuple[int, str]], cosines: np.ndarray) -> np.ndarray:
        """Re-ranking scores of images `candidates` ((id, path) pairs) for a text query; NaN for an image that can
        no longer be read (moved, deleted, damaged since it was indexed)."""
        with self._lock:
            tokens, mask = self._text(text)
            projected: list[torch.Tensor | None] = [self._cached(i) for i, _ in candidates]
            todo, pixels = [], []
            for n, (_, path) in enumerate(candidates):
                if projected[n] is not None:
                    continue
                try:
                    pixels.append(self._decoded(read_regular(path, MAX_FILE_BYTES)[0]))
                    todo.append(n)
                except Exception:  # an unreadable candidate is not re-scored; the others are
                    continue
            if pixels:
                for n, t in zip(todo, self._pixels_tokens(pixels), strict=True):
                    projected[n] = t
                    self._keep(candidates[n][0], t)
            scores = np.full(len(candidates), np.nan, dtype=np.float64)
            ready = [n for n, t in enumerate(projected) if t is not None]
            if ready:
                image = torch.stack([projected[n] for n in ready])  # type: ignore[misc]
                logits = self.head(image, tokens.expand(len(ready), -1, -1), mask.expand(len(ready), -1),
                                   projected=True)  # fmt: skip
                scores[ready] = self.head.combine(logits.double().cpu().numpy(), cosines[ready])
            return scores

    @torch.no_grad()
    def score_texts(self, image: bytes, texts: list[str], cosines: np.ndarray) -> np.ndarray:
        """Re-ranking scores of texts for an image query (the image file's bytes)."""
        with self._lock:
            image_t = self._pixels_tokens([self._decoded(image)])
            ids = self.loaded.tokenizer(texts).to(self.loaded.device)
            tokens, mask = text_tokens(self.loaded.model, ids)
            logits = self.head(image_t.expand(len(texts), -1, -1), tokens, mask, projected=True)
            return np.asarray(self.head.combine(logits.double().cpu().numpy(), cosines))


def open_reranker(index_dir: Path, head_path: Path, *, device: str = "auto") -> Reranker:
    """The torch model an index was built with, and the head attached to it."""
    from clipdex.retrieval.model.encoder import load_model
    from clipdex.retrieval.model.weights import index_encoder_config

    config, spec = index_encoder_config(index_dir, device=device)
    loaded = load_model(config, expect=spec)
    loaded.model.eval()
    head = load_head(head_path, loaded.spec).to(loaded.device)
    return Reranker(loaded, head, loaded.encoder().decode_options())


def evaluate_reranked(config: EvalConfig, head_path: Path, k: int) -> dict[str, Any]:
    """`clipdex eval --rerank`: evaluation's object for the model `config` names, plus "reranked": its recall with
    `head_path` re-scoring each query's contrastive top-`k`, on the same dataset."""
    from clipdex.retrieval.model.encoder import load_model

    loaded = load_model(config.encoder)  # the head reads the torch model's token features
    loaded.model.eval()
    head = load_head(head_path, loaded.spec)

    def measure(ds: RetrievalDataset, options: DecodeOptions) -> dict[str, Any]:
        f = dataset_features(loaded, ds, batch_size=config.batch_size, workers=config.workers, options=options)
        return {"reranked": {**reranked_recall(head, f, k), "k": k}}

    return evaluate(config, encoder=loaded.encoder(), measure=measure)

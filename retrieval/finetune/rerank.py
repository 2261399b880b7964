"""A cross-attention re-ranker over frozen CLIP towers: what binds a colour to its object.

A contrastive space scores an image against a caption with one dot product of two pooled vectors, so "a red circle
and a blue square" and "a blue circle and a red square" land close together. The head here lets the caption's token
features attend to the image's patch features (ALBEF's and BLIP's image-text matching, ITM) and ends in one match
logit. It re-scores the contrastive top-K; the towers stay frozen, so the index's vectors never change.

- `token_features`: the towers' per-token features (image patches as they enter the image tower's last block;
  text tokens after `ln_final`, with the mask of real tokens), computed without gradient.
- `RerankHead`: input projections to a small width, then blocks of self-attention on the text, cross-attention to
  the image and an MLP (pre-norm, residuals), a learned match token read out to one logit.
- `mine_negatives`: for each pair, a non-matching caption and a non-matching image drawn in proportion to their
  contrastive similarity (ALBEF's hard negatives), never one of the same image.
- `itm_loss`: binary cross-entropy over the positives and both sets of mined negatives.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "HeadConfig",
    "RerankHead",
    "TokenFeatures",
    "image_features",
    "image_tokens",
    "itm_loss",
    "mine_negatives",
    "token_features",
]


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
def text_tokens(model: Any, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The text tower's token outputs after `ln_final` ([B, context, width]) and the mask of real tokens (up to and
    including the end-of-text token, which CLIP's tokenizer gives the highest id)."""
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(ids).to(cast) + model.positional_embedding.to(cast)
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    end = ids.argmax(dim=-1, keepdim=True)
    mask = torch.arange(ids.shape[1], device=ids.device)[None, :] <= end
    return x, mask


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


def mine_negatives(
    similarity: torch.Tensor, image_ids: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For a batch of B pairs (image i with text i), their contrastive `similarity` [B, B] (row i: image i against
    every text) and `image_ids` [B] (pairs of one image share an id): for each pair, the index of a caption of
    another image (drawn by softmax of image i's similarities) and of another image (by softmax of text i's).
    Pairs of the same image are never drawn, so a negative is never a positive."""
    same = image_ids[:, None] == image_ids[None, :]
    if bool(same.all()):
        raise ValueError("hard negatives need at least two images in a batch")
    weights = similarity.detach().float().masked_fill(same, float("-inf"))
    texts = torch.multinomial(weights.softmax(dim=1), 1, generator=generator).squeeze(1)
    images = torch.multinomial(weights.t().softmax(dim=1), 1, generator=generator).squeeze(1)
    return texts, images


def itm_loss(
    head: RerankHead, features: TokenFeatures, similarity: torch.Tensor, image_ids: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:  # fmt: skip
    """Image-text matching loss on a batch of B matching pairs (image i with text i): each positive, each image with
    a mined non-matching caption, each caption with a mined non-matching image; binary cross-entropy over the 3B."""
    neg_text, neg_image = mine_negatives(similarity, image_ids, generator)
    image = torch.cat([features.image, features.image, features.image[neg_image]])
    text = torch.cat([features.text, features.text[neg_text], features.text])
    mask = torch.cat([features.text_mask, features.text_mask[neg_text], features.text_mask])
    b = features.image.shape[0]
    target = torch.cat([torch.ones(b), torch.zeros(2 * b)]).to(image.device)
    logits = head(image, text, mask)
    # positives weigh as much as both negatives together, as the 1:2 batch would otherwise teach "no match"
    weight = torch.cat([torch.full((b,), 2.0), torch.ones(2 * b)]).to(image.device)
    return F.binary_cross_entropy_with_logits(logits, target, weight=weight) * 3 / 4

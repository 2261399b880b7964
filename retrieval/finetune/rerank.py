"""Training the re-ranking head (search/rerank.py): hard negatives mined by contrastive similarity, the ITM loss.

- `mine_negatives`: for each pair, a non-matching caption and a non-matching image drawn in proportion to their
  contrastive similarity (ALBEF's hard negatives), never one of the same image.
- `itm_loss`: binary cross-entropy over the positives and both sets of mined negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipdex.retrieval.search.rerank import RerankHead, TokenFeatures

__all__ = ["itm_loss", "mine_negatives"]


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

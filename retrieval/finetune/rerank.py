"""Training the re-ranking head (search/rerank.py): hard negatives mined by contrastive similarity, the ITM loss.

- `mine_negatives`: for each pair, non-matching candidates drawn in proportion to their contrastive similarity
  (ALBEF's hard negatives), from the whole training set rather than the batch, never a match.
- `itm_loss`: each caption scored against its image and mined images, each image against its caption and mined
  captions; cross-entropy of the match among them (the head learns to rank a candidate list, which is its job at
  query time).

Measured on the compositional domain (benchmarks/RESULTS.md): with one in-batch negative and a binary loss the head
stayed below the contrastive space it re-ranks; mined from the whole set, seven per pair, ranked, it went well past it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipdex.retrieval.search.rerank import Features, RerankHead

__all__ = ["NEGATIVES", "itm_loss", "mine_negatives"]

NEGATIVES = 7  # mined per pair and direction


def mine_negatives(
    similarity: torch.Tensor, matches: torch.Tensor, n: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """`n` candidates for each row [B, n], drawn without replacement by softmax of the row's contrastive
    `similarity` [B, M] (logits), never one `matches` [B, M] marks: a negative is never a positive."""
    free = (~matches).sum(dim=1)
    if int(free.min()) < n:
        raise ValueError(
            f"hard negatives need at least {n} non-matching candidates per pair (fewest: {int(free.min())})"
        )
    weights = similarity.detach().float().masked_fill(matches, float("-inf"))
    return torch.multinomial(weights.softmax(dim=1), n, replacement=False, generator=generator)


def itm_loss(
    head: RerankHead, train: Features, texts: torch.Tensor, scale: float, *, n: int = NEGATIVES,
    generator: torch.Generator | None = None,
) -> torch.Tensor:  # fmt: skip
    """The ITM loss for a batch of captions `texts` [B] (positions in `train`'s texts, each with its image): caption
    t against its image and `n` images mined by t's similarity to every training image; image i against t and `n`
    captions of other images mined by i's similarity to every training caption. Cross-entropy of the match in
    each list of 1 + n, averaged over both directions."""
    owner = torch.as_tensor(train.owner)
    images = owner[texts]
    n_images = train.image_emb.shape[0]
    to_images = train.text_emb[texts] @ train.image_emb.T * scale  # [B, images]
    neg_images = mine_negatives(to_images, torch.arange(n_images)[None, :] == images[:, None], n, generator)
    to_texts = train.image_emb[images] @ train.text_emb.T * scale  # [B, texts]
    neg_texts = mine_negatives(to_texts, owner[None, :] == images[:, None], n, generator)

    b = len(texts)
    candidate_images = torch.cat([images[:, None], neg_images], dim=1).reshape(-1)  # [B (1 + n)]
    repeated = texts.repeat_interleave(1 + n)
    by_text = head(train.image_tokens[candidate_images].float(), train.text_tokens[repeated].float(),
                   train.text_mask[repeated]).reshape(b, 1 + n)  # fmt: skip
    candidate_texts = torch.cat([texts[:, None], neg_texts], dim=1).reshape(-1)
    by_image = head(train.image_tokens[images.repeat_interleave(1 + n)].float(),
                    train.text_tokens[candidate_texts].float(), train.text_mask[candidate_texts]).reshape(b, 1 + n)  # fmt: skip
    first = torch.zeros(b, dtype=torch.long)  # the match is first in every list
    return (F.cross_entropy(by_text, first) + F.cross_entropy(by_image, first)) / 2

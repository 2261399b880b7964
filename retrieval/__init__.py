"""clipdex retrieval: encode with open_clip, store and search embeddings, measure recall@k."""

from retrieval.encoder import DEFAULT_MODEL, DEFAULT_PRETRAINED, Encoder, EncoderConfig, ModelSpec, load_encoder
from retrieval.errors import ClipdexError
from retrieval.search import Hit, Searcher, Target

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_PRETRAINED",
    "ClipdexError",
    "Encoder",
    "EncoderConfig",
    "Hit",
    "ModelSpec",
    "Searcher",
    "Target",
    "load_encoder",
]

"""The evaluation protocols, kept importable from here (they live in :mod:`assy.evaluation`)."""

from assy.evaluation import (
    Model,
    choice_logliks,
    encode_pair,
    evaluate_pool_model,
    evaluate_target,
    mc_metrics,
    multiple_choice,
    perplexity,
    scored_bytes,
)
from blockpool import peak_rss_bytes

__all__ = [
    "Model",
    "choice_logliks",
    "encode_pair",
    "evaluate_pool_model",
    "evaluate_target",
    "mc_metrics",
    "multiple_choice",
    "peak_rss_bytes",
    "perplexity",
    "scored_bytes",
]

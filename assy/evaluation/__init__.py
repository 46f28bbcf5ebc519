"""Evaluation: lm-evaluation-harness's protocols on pool models, at a fraction of the memory.

- :mod:`~assy.evaluation.scoring`: the engine — log-likelihoods of (context, continuation)
  token pairs, logits only at the scored positions, shared contexts through the KV cache;
- :mod:`~assy.evaluation.choice`: zero-shot multiple choice (``acc``, ``acc_norm``,
  ``acc_bytes``) with lm-eval's prompts and tokenization;
- :mod:`~assy.evaluation.perplexity`: perplexity and bits per byte of held-out text;
- :mod:`~assy.evaluation.run`: a pool model or chain on a task (``assy eval``);
- :mod:`~assy.evaluation.harness`: ``AssyLM``, lm-eval's model interface on the pool
  (``assy lm-eval``; needs ``pip install assy[lm-eval]``).

A *model* is a :class:`~blockpool.chain.ChainRunner` or any callable
``model(input_ids [B, T], attention_mask [B, T]) -> logits [B, T, V]`` (a Hugging Face model
fits as ``lambda ids, m: hf(input_ids=ids, attention_mask=m).logits``); only a runner gets
the positions-only head and the shared contexts.
"""

from collections.abc import Callable

import torch

from assy.evaluation.choice import (
    choice_logliks,
    choice_requests,
    choice_scores,
    choice_text,
    encode_pair,
    mc_metrics,
    multiple_choice,
    sample_records,
)
from assy.evaluation.perplexity import (
    PerplexityInputs,
    perplexity,
    perplexity_inputs,
    perplexity_metrics,
    perplexity_result,
    score_windows,
    scored_bytes,
)
from assy.evaluation.run import evaluate_pool_model, evaluate_target, write_jsonl
from assy.evaluation.scoring import Request, Score, model_max_length, score

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(input_ids [B, T] int64, attention_mask [B, T] int64) -> logits [B, T, V]``."""

__all__ = [
    "Model",
    "PerplexityInputs",
    "Request",
    "Score",
    "choice_logliks",
    "choice_requests",
    "choice_scores",
    "choice_text",
    "encode_pair",
    "evaluate_pool_model",
    "evaluate_target",
    "mc_metrics",
    "model_max_length",
    "multiple_choice",
    "perplexity",
    "perplexity_inputs",
    "perplexity_metrics",
    "perplexity_result",
    "sample_records",
    "score",
    "score_windows",
    "scored_bytes",
    "write_jsonl",
]

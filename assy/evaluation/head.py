"""Log-probabilities of target tokens with bounded logits.

A small model with a large vocabulary spends most of an evaluation's memory on logits
(Gemma-3-270M: 262,144 entries, 1 MiB per position in float32; a batch of 8 PIQA inputs
of 60 tokens: 480 MiB, twice that with its ``log_softmax``). Here only the scored
positions reach the head, in groups whose logits stay within a byte bound, and each
group's ``log_softmax`` runs over the whole vocabulary in float32: the same numbers
lm-evaluation-harness computes for those positions. (A vocabulary-chunked online
log-sum-exp would stream the head matrix once per batch instead of once per group, but
its float32 sums round differently: on SmolLM2 it sits 1.8e-5 nats per token away from
a full-row ``log_softmax`` — closer to a float64 reference, yet not what lm-eval reports.)
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["head_logprobs", "logits_logprobs"]


def logits_logprobs(
    logits: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target log-probabilities (float32 ``log_softmax``, as lm-eval) and argmax of logits.

    Args:
        logits: ``[N, V]`` (any float dtype; computed in float32).
        targets: ``[N, K]`` token ids, ``-1`` where there is none.

    Returns:
        ``([N, K]`` float32 log-probabilities (0 where no target), ``[N]`` argmax ids).
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    targets = targets.to(logprobs.device)
    picked = logprobs.gather(-1, targets.clamp(min=0)).masked_fill(targets < 0, 0.0)
    return picked, logprobs.argmax(-1)


def head_logprobs(
    head: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab: int,
    head_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target log-probabilities and argmax of ``head`` applied to the rows of ``hidden``.

    Rows go through the head in groups whose float32 logits take at most ``head_bytes``
    (at least one row), each group's full-vocabulary ``log_softmax`` in float32: exactly
    what lm-eval computes for a position, never more than a group's logits in memory.

    Args:
        head: the chain's head module (``[n, d] -> [n, V]`` logits).
        hidden: ``[N, d]`` last hidden states at the scored positions.
        targets: ``[N, K]`` token ids, ``-1`` where there is none.
        vocab: the head's vocabulary size.
        head_bytes: bytes of float32 logits per group.

    Returns:
        ``([N, K]`` float32 log-probabilities (0 where no target), ``[N]`` argmax ids).
    """
    rows = max(1, head_bytes // (4 * vocab))
    parts = [
        logits_logprobs(head(hidden[i : i + rows]), targets[i : i + rows])
        for i in range(0, hidden.shape[0], rows)
    ]
    if not parts:
        return torch.zeros(targets.shape), torch.zeros(0, dtype=torch.long)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

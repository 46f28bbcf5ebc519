"""Log-probabilities of target tokens without a ``[N, V]`` logits tensor.

A small model with a large vocabulary spends most of an evaluation's memory on logits
(Gemma-3-270M: 262,144 entries, 1 MiB per position in float32) and, on a CPU, most of its
head time streaming the ``[V, d]`` head matrix through the cache once per call. So the
scored positions of a whole batch go through the head in one call, and the vocabulary in
chunks: each chunk's logits update a running log-sum-exp, the running argmax and the
targets' logits, then are dropped. Numerically this equals ``log_softmax`` in float32
within rounding (the log-sum-exp is exact up to the order of additions).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["head_logprobs", "logits_logprobs"]

_MIN_CHUNK = 1024


def logits_logprobs(
    logits: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target log-probabilities and argmax from full logits.

    Args:
        logits: ``[N, V]`` (any float dtype; computed in float32).
        targets: ``[N, K]`` token ids, ``-1`` where there is none.

    Returns:
        ``([N, K]`` float32 log-probabilities (0 where no target), ``[N]`` argmax ids).
    """
    logits = logits.float()
    targets = targets.to(logits.device)
    picked = logits.gather(-1, targets.clamp(min=0))
    lp = (picked - logits.logsumexp(-1, keepdim=True)).masked_fill(targets < 0, 0.0)
    return lp, logits.argmax(-1)


def head_logprobs(
    head: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab: int,
    head_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target log-probabilities and argmax of a head applied to ``hidden``.

    An LM head of :mod:`blockpool.families` (``features``, ``lm_head``, ``cap``) is run
    over vocabulary chunks of at most ``head_bytes`` of float32 logits for all rows at
    once; any other head (a budgeted head served in pieces) over row chunks of that size.

    Args:
        head: the chain's head module.
        hidden: ``[N, d]`` last hidden states at the scored positions.
        targets: ``[N, K]`` token ids, ``-1`` where there is none.
        vocab: the head's vocabulary size.
        head_bytes: bytes of float32 logits computed at a time.

    Returns:
        ``([N, K]`` float32 log-probabilities (0 where no target), ``[N]`` argmax ids).
    """
    n = hidden.shape[0]
    targets = targets.to(hidden.device)
    linear = getattr(head, "lm_head", None)
    if not (hasattr(head, "features") and hasattr(head, "cap") and isinstance(linear, nn.Linear)):
        rows = max(1, head_bytes // (4 * vocab))
        parts = [
            logits_logprobs(head(hidden[i : i + rows]), targets[i : i + rows])
            for i in range(0, n, rows)
        ]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    features = head.features(hidden)
    weight, bias = linear.weight, linear.bias
    chunk = max(_MIN_CHUNK, head_bytes // (4 * max(n, 1)))
    top = torch.full((n,), -torch.inf, device=hidden.device)
    total = torch.zeros(n, device=hidden.device)
    best = torch.full((n,), -torch.inf, device=hidden.device)
    arg = torch.zeros(n, dtype=torch.long, device=hidden.device)
    picked = torch.zeros(targets.shape, device=hidden.device)
    for start in range(0, vocab, chunk):
        stop = min(vocab, start + chunk)
        z = F.linear(features, weight[start:stop], None if bias is None else bias[start:stop])
        z = head.cap(z).float()
        value, index = z.max(-1)
        better = value > best
        best, arg = torch.where(better, value, best), torch.where(better, index + start, arg)
        new_top = torch.maximum(top, value)
        total = total * torch.exp(top - new_top) + torch.exp(z - new_top[:, None]).sum(-1)
        top = new_top
        inside = (targets >= start) & (targets < stop)
        if inside.any():
            r, k = inside.nonzero(as_tuple=True)
            picked[r, k] = z[r, targets[r, k] - start]
    lp = (picked - (top + total.log())[:, None]).masked_fill(targets < 0, 0.0)
    return lp, arg

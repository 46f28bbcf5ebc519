"""Perplexity and bits per byte of held-out text.

Protocol: ``tokenizer(text).input_ids`` (default special tokens, e.g. BOS), keep the first
``max_tokens``, cut into consecutive windows of ``window`` tokens (the last may be
shorter) and score every token of a window but its first, conditioned only on the earlier
tokens of the same window. With a chain runner the window is fed in pieces through its KV
cache and the head computes logits only for the tokens of a piece (never ``[T, V]`` for a
whole window); results equal one full pass within float32 rounding.

Bits per byte divide the summed NLL (in bits) by the UTF-8 bytes of the text the scored
tokens cover, so models with different tokenizers compare in it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from assy.errors import UsageError, arg
from assy.evaluation.scoring import Request, Score, score

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "PerplexityInputs",
    "perplexity",
    "perplexity_inputs",
    "perplexity_metrics",
    "perplexity_result",
    "score_windows",
    "scored_bytes",
    "window_requests",
]


def window_requests(ids: list[int], window: int) -> list[Request]:
    """One request per window of ``window`` tokens: its first token, then the rest."""
    chunks = [ids[i : i + window] for i in range(0, len(ids), window)]
    return [Request((c[0],), tuple(c[1:])) for c in chunks if len(c) >= 2]


def scored_bytes(
    tokenizer: PreTrainedTokenizerBase, text: str, *, max_tokens: int = 2048, window: int = 512
) -> int:
    """UTF-8 bytes of the text :func:`perplexity` scores: in each window, from the end of its
    first token to the end of its last (offsets from a fast tokenizer; a slow one: the
    bytes of the scored tokens decoded)."""
    try:
        offsets = tokenizer(text, return_offsets_mapping=True).offset_mapping[:max_tokens]
    except NotImplementedError:
        ids = list(tokenizer(text).input_ids)[:max_tokens]
        return sum(
            len(tokenizer.decode(r.continuation).encode("utf-8"))
            for r in window_requests(ids, window)
        )
    total = 0
    for i in range(0, len(offsets), window):
        chunk = offsets[i : i + window]
        if len(chunk) >= 2:
            total += len(text[chunk[0][1] : chunk[-1][1]].encode("utf-8"))
    return total


def perplexity_metrics(scores: list[Score], tokens: int, nbytes: int) -> dict[str, float]:
    """Perplexity, NLL and bits per byte with standard errors from per-request scores.

    Standard errors treat the scored tokens as independent draws of their NLL (the delta
    method for perplexity: ``ppl * se(nll)``); neighbouring tokens are correlated, so they
    are lower bounds.

    Args:
        scores: one :class:`Score` per window (``loglik`` and ``sum_sq`` over its tokens).
        tokens: tokens scored in all.
        nbytes: UTF-8 bytes those tokens cover.
    """
    total = -sum(s.loglik for s in scores)
    nll = total / tokens
    mean_sq = sum(s.sum_sq for s in scores) / tokens
    var = max(mean_sq - nll * nll, 0.0) * tokens / (tokens - 1) if tokens > 1 else math.nan
    se = math.sqrt(var / tokens)
    bits = 1 / math.log(2) / max(nbytes, 1)
    return {
        "perplexity": math.exp(nll),
        "perplexity_stderr": math.exp(nll) * se,
        "nll": nll,
        "nll_stderr": se,
        "bits_per_byte": total * bits,
        "bits_per_byte_stderr": se * tokens * bits,
    }


def perplexity(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    *,
    max_tokens: int = 2048,
    window: int = 512,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict[str, float | int]:
    """Perplexity over consecutive non-overlapping windows (see the module docstring).

    Args:
        model: a :class:`~blockpool.chain.ChainRunner`, or ``(ids [1, T], mask [1, T]) ->
            logits [1, T, V]`` (then each window runs whole).
        tokenizer: Hugging Face tokenizer.
        text: The evaluation text.
        max_tokens: Number of leading tokens kept (>= 2).
        window: Window length in tokens (>= 2).
        device: Where a plain callable's inputs are created.
        progress: Show a tqdm bar on stderr.

    Returns:
        ``{"perplexity": exp(nll), "nll": mean NLL per scored token (nats),
        "bits_per_byte", their ``*_stderr``, "tokens": scored tokens, "bytes": the UTF-8
        bytes they cover, "windows": windows including length-1 ones}``.

    Raises:
        UsageError: Bad ``max_tokens``/``window``, or a text too short to score anything.
    """
    inputs = perplexity_inputs(tokenizer, text, max_tokens=max_tokens, window=window)
    scores = score_windows(model, inputs, window=window, device=device, progress=progress)
    return perplexity_result(inputs, scores)[0]


def score_windows(
    model: Any,
    inputs: PerplexityInputs,
    *,
    window: int,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> list[Score]:
    """Score the windows of ``inputs`` (one at a time; a runner feeds each in pieces)."""
    return score(
        model,
        inputs.requests,
        batch_size=1,
        max_length=window,
        device=device,
        progress=progress,
        desc="perplexity",
    )


@dataclass(frozen=True)
class PerplexityInputs:
    """What :func:`perplexity` scores, tokenized (the tokenizer is no longer needed).

    Attributes:
        requests: one per window of at least two tokens (:func:`window_requests`).
        windows: windows cut, length-1 ones included.
        nbytes: UTF-8 bytes the scored tokens cover (:func:`scored_bytes`).
    """

    requests: list[Request]
    windows: int
    nbytes: int

    @property
    def tokens(self) -> int:
        """Tokens scored."""
        return sum(len(r.continuation) for r in self.requests)


def perplexity_inputs(
    tokenizer: PreTrainedTokenizerBase, text: str, *, max_tokens: int = 2048, window: int = 512
) -> PerplexityInputs:
    """Tokenize ``text`` into :func:`perplexity`'s windows.

    Raises:
        UsageError: Bad ``max_tokens``/``window``, or a text too short to score anything.
    """
    if max_tokens < 2 or window < 2:
        raise UsageError(
            f"{arg('max_tokens')} and {arg('window')} must be >= 2, got {max_tokens} and {window}"
        )
    ids = list(tokenizer(text).input_ids)[:max_tokens]
    requests = window_requests(ids, window)
    if not requests:
        raise UsageError(f"text too short: {len(ids)} token(s), need at least 2 to score one")
    nbytes = scored_bytes(tokenizer, text, max_tokens=max_tokens, window=window)
    return PerplexityInputs(requests, -(-len(ids) // window), nbytes)


def perplexity_result(
    inputs: PerplexityInputs, scores: list[Score]
) -> tuple[dict[str, float | int], list[dict[str, Any]]]:
    """:func:`perplexity`'s metrics and one record per window (``doc_id``, ``tokens``,
    ``loglik``) from the windows' scores."""
    metrics = {
        **perplexity_metrics(scores, inputs.tokens, inputs.nbytes),
        "tokens": inputs.tokens,
        "bytes": inputs.nbytes,
        "windows": inputs.windows,
    }
    records = [
        {"doc_id": k, "tokens": len(r.continuation), "loglik": s.loglik}
        for k, (r, s) in enumerate(zip(inputs.requests, scores, strict=True))
    ]
    return metrics, records

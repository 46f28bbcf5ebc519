"""Zero-shot multiple choice, computed as lm-evaluation-harness (0.4) computes it.

Each choice is scored by the summed log-likelihood of its tokens given the context
(:func:`encode_pair` tokenizes, :mod:`assy.evaluation.scoring` scores). From those:

* ``acc``: the choice with the largest log-likelihood (the first on ties) is the label;
* ``acc_norm``: the same after dividing each log-likelihood by the character length of
  the choice *without* its target delimiter (the one leading space every formatter puts
  before a choice; lm-eval's ``len(choice)``: " no"/" yes" count 2/3);
* ``acc_bytes``: the same per UTF-8 byte of the choice without its delimiter;

each with its standard error ``sqrt(p (1 - p) / (n - 1))`` (lm-eval's ``mean_stderr``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from assy.data import MCExample
from assy.errors import UsageError
from assy.evaluation.scoring import BATCH_TOKENS, Request, Score, score

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "choice_logliks",
    "choice_requests",
    "choice_scores",
    "choice_text",
    "encode_pair",
    "mc_metrics",
    "multiple_choice",
    "pad_token",
    "sample_records",
    "score_rows",
]

_METRICS = ("acc", "acc_norm", "acc_bytes")


def _prefix_token(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """lm-eval's ``prefix_token_id``: BOS, else EOS."""
    if tokenizer.bos_token_id is not None:
        return int(tokenizer.bos_token_id)
    return None if tokenizer.eos_token_id is None else int(tokenizer.eos_token_id)


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """lm-eval's HF ``tok_encode``: default special tokens, none if the text starts with the
    prefix token's own text (it is there already)."""
    prefix = _prefix_token(tokenizer)
    if prefix is not None and text.startswith(tokenizer.decode(prefix)):
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(text))


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, context: str, continuation: str
) -> tuple[list[int], list[int]]:
    """Tokenize a (context, continuation) pair the lm-evaluation-harness (0.4) way.

    Trailing whitespace of the context moves to the front of the continuation; the pair is
    encoded together (the tokenizer's default special tokens) and split after the tokens of
    the context encoded alone, which avoids the spurious word-start token SentencePiece
    tokenizers (Gemma) give a continuation encoded on its own. An empty context becomes the
    prefix token (BOS, else EOS) before the continuation encoded without special tokens,
    unless the continuation starts with that token (then it is the context). A non-empty
    context that encodes to nothing (lm-eval fails on it) also becomes the prefix token.

    Args:
        tokenizer: Hugging Face tokenizer.
        context: Prompt text.
        continuation: Choice text (normally starting with a space).

    Returns:
        ``(context_ids, continuation_ids)``, both non-empty.

    Raises:
        UsageError: the continuation encodes to no token, or a context is needed and the
            tokenizer has neither BOS nor EOS.
    """
    prefix = _prefix_token(tokenizer)
    if context == "":
        cont = list(tokenizer.encode(continuation, add_special_tokens=False))
        if cont and cont[0] == prefix:
            context_ids, cont = cont[:1], cont[1:]
        else:
            context_ids = [] if prefix is None else [prefix]
    else:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        context_ids = _encode(tokenizer, context)
        cont = _encode(tokenizer, context + continuation)[len(context_ids) :]
        if not context_ids and prefix is not None:
            context_ids = [prefix]
    if not cont:
        raise UsageError(f"choice {continuation!r} encodes to no tokens")
    if not context_ids:
        raise UsageError("empty context and the tokenizer has no BOS/EOS token to stand for it")
    return context_ids, cont


def choice_requests(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[MCExample]
) -> list[list[Request]]:
    """The scoring requests of every choice of every example (see :func:`encode_pair`)."""
    out = []
    for ex in examples:
        row = []
        for choice in ex.choices:
            context, cont = encode_pair(tokenizer, ex.context, choice)
            row.append(Request(tuple(context), tuple(cont)))
        out.append(row)
    return out


def choice_scores(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[MCExample],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    head_bytes: int | None = None,
    batch_tokens: int = BATCH_TOKENS,
) -> list[list[Score]]:
    """The :class:`Score` (log-likelihood, greedy) of every choice of every example.

    Args:
        model: a :class:`~blockpool.chain.ChainRunner` (contexts shared, logits only where
            scored) or ``(ids [B, T], mask [B, T]) -> logits [B, T, V]``.
        tokenizer: Hugging Face tokenizer.
        examples: the questions.
        batch_size: sequences per forward call; does not change results.
        max_length: most tokens the model sees per choice (left truncation); ``None``: the
            model's own limit (2048 for a plain callable).
        device: where a plain callable's inputs are created.
        progress: show a tqdm bar on stderr.
        head_bytes, batch_tokens: a runner's memory bounds (:func:`score`).

    Returns:
        ``scores[i][j]`` for choice ``j`` of example ``i``.
    """
    return score_rows(
        model,
        choice_requests(tokenizer, examples),
        pad_id=pad_token(tokenizer),
        batch_size=batch_size,
        max_length=max_length,
        device=device,
        progress=progress,
        head_bytes=head_bytes,
        batch_tokens=batch_tokens,
    )


def pad_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """A token id to pad with (masked: its value never matters): PAD, else EOS, else 0."""
    return next(
        (int(t) for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0
    )


def score_rows(model: Any, rows: Sequence[Sequence[Request]], **kwargs: Any) -> list[list[Score]]:
    """:func:`~assy.evaluation.scoring.score` of every request of ``rows``, by row."""
    flat = score(model, [r for row in rows for r in row], desc="choices", **kwargs)
    out, start = [], 0
    for row in rows:
        out.append(flat[start : start + len(row)])
        start += len(row)
    return out


def choice_logliks(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[MCExample],
    **kwargs: Any,
) -> list[list[float]]:
    """``logliks[i][j]``: log p(choice j | context i) in nats (:func:`choice_scores`)."""
    return [[s.loglik for s in row] for row in choice_scores(model, tokenizer, examples, **kwargs)]


def choice_text(choice: str) -> str:
    """A choice without its target delimiter (one leading space), as lm-eval measures it."""
    return choice[1:] if choice.startswith(" ") else choice


def _argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties (numpy's argmax)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _predictions(logliks: Sequence[float], example: MCExample) -> dict[str, int]:
    chars = [len(choice_text(c)) or 1 for c in example.choices]
    nbytes = [len(choice_text(c).encode("utf-8")) or 1 for c in example.choices]
    return {
        "acc": _argmax(logliks),
        "acc_norm": _argmax([v / n for v, n in zip(logliks, chars, strict=True)]),
        "acc_bytes": _argmax([v / n for v, n in zip(logliks, nbytes, strict=True)]),
    }


def mc_metrics(
    logliks: Sequence[Sequence[float]], examples: Sequence[MCExample]
) -> dict[str, float | int]:
    """Accuracy metrics from per-choice log-likelihoods (see the module docstring).

    Args:
        logliks: ``[n][choices]`` summed log-likelihoods (nats).
        examples: the matching examples (labels and choice strings).

    Returns:
        ``{"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "acc_bytes",
        "acc_bytes_stderr", "n"}`` (standard errors NaN when ``n == 1``).
    """
    n = len(examples)
    hits = dict.fromkeys(_METRICS, 0)
    for ll, ex in zip(logliks, examples, strict=True):
        for metric, pred in _predictions(ll, ex).items():
            hits[metric] += pred == ex.label
    out: dict[str, float | int] = {}
    for metric in _METRICS:
        p = hits[metric] / n
        out[metric] = p
        out[f"{metric}_stderr"] = math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else math.nan
    out["n"] = n
    return out


def sample_records(
    examples: Sequence[MCExample], scores: Sequence[Sequence[Score]]
) -> list[dict[str, Any]]:
    """One record per example, with lm-eval's ``samples`` fields where they apply.

    Fields: ``doc_id``, ``target`` (the label), ``arguments`` (``[context, choice]`` per
    choice), ``resps`` (``[loglik, is_greedy]`` per choice), ``acc``, ``acc_norm``,
    ``acc_bytes`` (0 or 1), and assy's ``pred``, ``pred_norm``, ``pred_bytes``.
    """
    records = []
    for i, (ex, row) in enumerate(zip(examples, scores, strict=True)):
        preds = _predictions([s.loglik for s in row], ex)
        records.append(
            {
                "doc_id": i,
                "target": ex.label,
                "arguments": [[ex.context, c] for c in ex.choices],
                "resps": [[s.loglik, s.greedy] for s in row],
                **{m: float(preds[m] == ex.label) for m in _METRICS},
                "pred": preds["acc"],
                "pred_norm": preds["acc_norm"],
                "pred_bytes": preds["acc_bytes"],
            }
        )
    return records


def multiple_choice(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[MCExample],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict[str, float | int]:
    """Zero-shot multiple-choice metrics of ``model`` on ``examples``.

    Args:
        model, tokenizer, batch_size, max_length, device, progress: as for
            :func:`choice_scores`.
        examples: the questions (at least one).

    Returns:
        :func:`mc_metrics` of the choices' log-likelihoods.

    Raises:
        UsageError: no examples, bad sizes, or an unencodable choice.
    """
    if not examples:
        raise UsageError("no examples to evaluate")
    scores = choice_scores(
        model,
        tokenizer,
        examples,
        batch_size=batch_size,
        max_length=max_length,
        device=device,
        progress=progress,
    )
    return mc_metrics([[s.loglik for s in row] for row in scores], examples)

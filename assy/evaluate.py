"""Evaluation protocols for causal language models, independent of how the model is built.

A *model* here is any callable ``model(input_ids, attention_mask) -> logits`` with
``input_ids`` and ``attention_mask`` of shape ``[B, T]`` (int64) and logits of shape
``[B, T, V]`` (any float dtype); ``logits[b, t]`` predicts token ``t + 1``. A Hugging Face
``AutoModelForCausalLM`` fits as ``lambda ids, m: hf(input_ids=ids, attention_mask=m).logits``.
The tokenizer is a Hugging Face tokenizer. Log-probabilities are always computed in float32.

Two protocols:

* :func:`perplexity`: non-overlapping windows over the first ``max_tokens`` tokens.
* :func:`multiple_choice`: zero-shot log-likelihood ranking, lm-evaluation-harness style.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from assy.data import MCExample, load_task, read_text
from assy.errors import UsageError, arg
from blockpool import RunOptions, open_runner, peak_rss_bytes

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "Model",
    "choice_logliks",
    "encode_pair",
    "evaluate_pool_model",
    "peak_rss_bytes",
    "mc_metrics",
    "multiple_choice",
    "perplexity",
]

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(input_ids [B, T] int64, attention_mask [B, T] int64) -> logits [B, T, V]``."""


def _forward(model: Model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Run ``model`` and check that it returned ``[B, T, V]`` logits."""
    logits = model(input_ids, attention_mask)
    if (
        not isinstance(logits, torch.Tensor)
        or logits.ndim != 3
        or logits.shape[:2] != input_ids.shape
    ):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise TypeError(
            f"model must return logits [B, T, V] for input {tuple(input_ids.shape)}, got {got}"
        )
    return logits


def _target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-probability of each target under float32 log-softmax.

    Args:
        logits: ``[N, V]`` predictions.
        targets: ``[N]`` token ids.

    Returns:
        ``[N]`` float32 log-probabilities (nats).
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return logprobs.gather(-1, targets.to(logprobs.device).unsqueeze(-1)).squeeze(-1)


# --------------------------------------------------------------------------- perplexity


def _window_nll(model: Model, window: Sequence[int], device: torch.device | str) -> float:
    """Summed NLL (nats) of tokens ``1..L-1`` of one window given the earlier ones."""
    ids = torch.tensor([list(window)], dtype=torch.long, device=device)
    logits = _forward(model, ids, torch.ones_like(ids))
    return -_target_logprobs(logits[0, :-1], ids[0, 1:]).double().sum().item()


def perplexity(
    model: Model,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    *,
    max_tokens: int = 2048,
    window: int = 512,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict[str, float | int]:
    """Perplexity over consecutive non-overlapping windows.

    Protocol: ``tokenizer(text).input_ids`` (default special tokens, e.g. BOS), keep the
    first ``max_tokens``, cut into windows of ``window`` tokens (the last may be shorter),
    and score every token of a window except its first, conditioned only on the earlier
    tokens of the same window. One forward call per window, attention mask all ones.

    Args:
        model: ``(ids [1, T], mask [1, T]) -> logits [1, T, V]``.
        tokenizer: Hugging Face tokenizer.
        text: The evaluation text.
        max_tokens: Number of leading tokens kept (>= 2).
        window: Window length in tokens (>= 2).
        device: Where the input tensors are created.
        progress: Show a tqdm bar on stderr.

    Returns:
        ``{"perplexity": exp(nll), "nll": mean NLL per scored token (nats),
        "tokens": scored tokens, "windows": windows including length-1 ones}``.

    Raises:
        UsageError: Bad ``max_tokens``/``window``, or a text too short to score anything.
    """
    if max_tokens < 2 or window < 2:
        raise UsageError(
            f"{arg('max_tokens')} and {arg('window')} must be >= 2, got {max_tokens} and {window}"
        )
    ids = list(tokenizer(text).input_ids)[:max_tokens]
    windows = [ids[i : i + window] for i in range(0, len(ids), window)]
    total, scored = 0.0, 0
    with torch.inference_mode():
        for chunk in tqdm(
            windows, desc="perplexity", unit="window", file=sys.stderr, disable=not progress
        ):
            if len(chunk) < 2:
                continue
            total += _window_nll(model, chunk, device)
            scored += len(chunk) - 1
    if scored == 0:
        raise UsageError(f"text too short: {len(ids)} token(s), need at least 2 to score one")
    nll = total / scored
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": scored, "windows": len(windows)}


# --------------------------------------------------------------------------- multiple choice


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, context: str, continuation: str
) -> tuple[list[int], list[int]]:
    """Tokenize a (context, continuation) pair the lm-evaluation-harness (v0.4) way.

    Trailing whitespace of the context moves to the front of the continuation; the pair is
    encoded together (with the tokenizer's default special tokens) and split after the
    tokens of the context encoded alone. Encoding together avoids the spurious word-start
    token SentencePiece tokenizers (Gemma) emit for a continuation encoded on its own. A
    context that encodes to nothing is replaced by ``[bos]`` (or ``[eos]``).

    Args:
        tokenizer: Hugging Face tokenizer.
        context: Prompt text.
        continuation: Choice text (normally starting with a space).

    Returns:
        ``(context_ids, continuation_ids)``, both non-empty.

    Raises:
        UsageError: If the continuation encodes to no token, or the context is empty and
            the tokenizer has neither BOS nor EOS.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    context_ids = list(tokenizer(context).input_ids)
    whole = list(tokenizer(context + continuation).input_ids)
    continuation_ids = whole[len(context_ids) :]
    if not context:
        context_ids = []
        continuation_ids = list(tokenizer(continuation, add_special_tokens=False).input_ids)
    if not continuation_ids:
        raise UsageError(f"choice {continuation!r} encodes to no tokens")
    if not context_ids:
        start = (
            tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        )
        if start is None:
            raise UsageError("empty context and the tokenizer has no BOS/EOS token to stand for it")
        context_ids = [start]
    return context_ids, continuation_ids


@dataclass(frozen=True)
class _Request:
    """One (example, choice) scoring request: model input and the continuation tokens."""

    example: int
    choice: int
    input_ids: tuple[int, ...]
    continuation: tuple[int, ...]


def _make_request(
    tokenizer: PreTrainedTokenizerBase, example: MCExample, index: int, choice: int, max_length: int
) -> _Request:
    """Build the request; truncates from the left to ``max_length`` input tokens."""
    context_ids, cont_ids = encode_pair(tokenizer, example.context, example.choices[choice])
    if len(cont_ids) > max_length:
        raise UsageError(
            f"example {index} choice {choice}: {len(cont_ids)} continuation tokens"
            f" exceed max_length {max_length}"
        )
    tokens = (context_ids + cont_ids)[-(max_length + 1) :]
    return _Request(index, choice, tuple(tokens[:-1]), tuple(cont_ids))


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Token used for right padding; its value is irrelevant because it is masked."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _score_batch(
    model: Model, batch: Sequence[_Request], pad_id: int, device: torch.device | str
) -> list[float]:
    """Summed continuation log-likelihood (nats) of each request, right-padded batch."""
    width = max(len(r.input_ids) for r in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, request in enumerate(batch):
        ids[row, : len(request.input_ids)] = torch.tensor(request.input_ids)
        mask[row, : len(request.input_ids)] = 1
    logits = _forward(model, ids.to(device), mask.to(device))
    scores = []
    for row, request in enumerate(batch):
        end, n = len(request.input_ids), len(request.continuation)
        targets = torch.tensor(request.continuation, dtype=torch.long)
        scores.append(_target_logprobs(logits[row, end - n : end], targets).double().sum().item())
    return scores


def choice_logliks(
    model: Model,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[MCExample],
    *,
    batch_size: int = 8,
    max_length: int = 1024,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> list[list[float]]:
    """Summed log-likelihood of every choice given its context.

    Requests are sorted by length (longest first) and batched with right padding and an
    attention mask, so padding never reaches a scored position. Inputs longer than
    ``max_length`` tokens are truncated from the left, keeping the continuation.

    Args:
        model: ``(ids [B, T], mask [B, T]) -> logits [B, T, V]``.
        tokenizer: Hugging Face tokenizer.
        examples: The questions.
        batch_size: Requests (context, choice pairs) per forward call.
        max_length: Most tokens fed to the model per request.
        device: Where the input tensors are created.
        progress: Show a tqdm bar on stderr.

    Returns:
        ``logliks[i][j]``: log p(choice j | context i) in nats, summed over its tokens.
    """
    if batch_size < 1 or max_length < 1:
        raise UsageError(
            f"batch_size and max_length must be >= 1, got {batch_size} and {max_length}"
        )
    requests = [
        _make_request(tokenizer, ex, i, j, max_length)
        for i, ex in enumerate(examples)
        for j in range(len(ex.choices))
    ]
    requests.sort(key=lambda r: -len(r.input_ids))
    logliks = [[math.nan] * len(ex.choices) for ex in examples]
    pad_id = _pad_id(tokenizer)
    starts = range(0, len(requests), batch_size)
    with torch.inference_mode():
        for start in tqdm(
            starts, desc="choices", unit="batch", file=sys.stderr, disable=not progress
        ):
            batch = requests[start : start + batch_size]
            for request, score in zip(
                batch, _score_batch(model, batch, pad_id, device), strict=True
            ):
                logliks[request.example][request.choice] = score
    return logliks


def _argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def mc_metrics(
    logliks: Sequence[Sequence[float]], examples: Sequence[MCExample]
) -> dict[str, float | int]:
    """Accuracy metrics from per-choice log-likelihoods.

    ``acc_norm`` divides each log-likelihood by the character length of the choice string
    as stored (including its leading space; lm-eval uses the choice without the target
    delimiter, i.e. one character fewer). Standard errors are
    ``sqrt(p * (1 - p) / (n - 1))`` (NaN when ``n == 1``).

    Args:
        logliks: ``[n][choices]`` summed log-likelihoods (nats).
        examples: The matching examples (labels and choice strings).

    Returns:
        ``{"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}``.
    """
    n = len(examples)
    hits = sum(_argmax(ll) == ex.label for ll, ex in zip(logliks, examples, strict=True))
    hits_norm = sum(
        _argmax([v / len(c) for v, c in zip(ll, ex.choices, strict=True)]) == ex.label
        for ll, ex in zip(logliks, examples, strict=True)
    )

    def stderr(p: float) -> float:
        return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else math.nan

    acc, acc_norm = hits / n, hits_norm / n
    return {
        "acc": acc,
        "acc_stderr": stderr(acc),
        "acc_norm": acc_norm,
        "acc_norm_stderr": stderr(acc_norm),
        "n": n,
    }


def multiple_choice(
    model: Model,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[MCExample],
    *,
    batch_size: int = 8,
    max_length: int = 1024,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict[str, float | int]:
    """Zero-shot multiple-choice accuracy (lm-evaluation-harness conventions).

    Each choice is scored by the summed log-likelihood of its tokens given the context
    (see :func:`encode_pair` for tokenization and :func:`choice_logliks` for batching);
    the prediction is the argmax (first on ties).

    Args:
        model: ``(ids [B, T], mask [B, T]) -> logits [B, T, V]``.
        tokenizer: Hugging Face tokenizer.
        examples: The questions (at least one).
        batch_size: Context/choice pairs per forward call; does not change results.
        max_length: Most tokens fed to the model per pair (left truncation).
        device: Where the input tensors are created.
        progress: Show a tqdm bar on stderr.

    Returns:
        ``{"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}``, see :func:`mc_metrics`.

    Raises:
        UsageError: No examples, bad sizes, or an unencodable choice.
    """
    if not examples:
        raise UsageError("no examples to evaluate")
    logliks = choice_logliks(
        model,
        tokenizer,
        examples,
        batch_size=batch_size,
        max_length=max_length,
        device=device,
        progress=progress,
    )
    return mc_metrics(logliks, examples)


def evaluate_pool_model(
    root: Path,
    model: str,
    task: str,
    *,
    data: Path | None = None,
    limit: int | None = None,
    max_tokens: int = 2048,
    window: int = 512,
    options: RunOptions = RunOptions(),
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate one model of a pool, run from its blocks, on a task.

    Args:
        root: the pool directory.
        model: the model's name in the pool.
        task: ``perplexity`` (needs ``data``, a text file) or a multiple-choice task of
            :data:`TASKS`.
        data: the text file scored for perplexity; for a multiple-choice task, a JSONL
            file that replaces the shipped validation split.
        limit, max_tokens, window: as for :func:`perplexity` and :func:`multiple_choice`.
        options: how to run (budget, swap policy, device, dtype, batch size, threads).

    Returns:
        The metrics, plus ``model``, ``task``, ``seconds`` and the run's report
        (:class:`blockpool.session.RunSession`: device, threads, ``peak_rss_bytes`` and,
        under a budget, the swapper's counters ``weights_resident_peak_bytes``,
        ``bytes_read``, ``stall_seconds``, ``hits``, ``misses``, ``io_hidden_fraction``, ...).
    """
    from blockpool import Pool

    pool = Pool(root)
    if not pool.family(model).causal:
        raise UsageError(
            f"model {model!r} is an encoder ({pool.model(model)['family']}); {task} needs a causal LM"
        )
    positions = pool.max_positions(model)  # learned positions: inputs must not exceed them
    if task == "perplexity":
        if data is None:
            raise UsageError(f"{arg('task')} perplexity needs {arg('data')} (a text file)")
        if positions is not None and window > positions:
            raise UsageError(
                f"{arg('window')} {window} is longer than the {positions} positions model "
                f"{model!r} has learned; use {arg('window')} {positions} or less"
            )
        body = read_text(data)
    else:
        examples = load_task(task, data_file=data, limit=limit)
    tokenizer = pool.tokenizer(model)
    start = time.perf_counter()
    with open_runner(pool, model, options) as run:
        device = run.runner.device
        if task == "perplexity":
            result = perplexity(
                run.runner,
                tokenizer,
                body,
                max_tokens=max_tokens,
                window=window,
                device=device,
                progress=progress,
            )
        else:
            result = multiple_choice(
                run.runner,
                tokenizer,
                examples,
                batch_size=options.batch_size,
                max_length=min(1024, positions or 1024),  # longer inputs: cut from the left
                device=device,
                progress=progress,
            )
    result = {"model": model, "task": task, **result, "seconds": time.perf_counter() - start}
    return result | run.report

"""Token-by-token generation from a pool model, with a KV cache, optionally under a budget."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from assy.errors import UsageError, arg
from blockpool import RunOptions, open_runner

__all__ = ["generate", "generate_from_pool"]


def _next_logits(runner: Any, ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
    """The next token's float32 logits ``[V]`` (on the CPU) and the extended cache; the head
    runs at the last position only."""
    last = torch.zeros_like(ids, dtype=torch.bool)
    last[:, -1] = True
    out = runner.forward(ids, past_key_values=cache, use_cache=True, logits_at=last)
    return out.logits[-1].float().cpu(), out.past_key_values


@torch.inference_mode()
def generate(
    runner: Any,
    tokenizer: Any,
    prompt: str,
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Continue ``prompt``: prefill once, then decode one token per forward with a KV cache.

    Args:
        runner: a :class:`~blockpool.runner.BlockRunner` of a causal model.
        tokenizer: its tokenizer.
        prompt: the text to continue.
        max_new_tokens: stop after this many tokens (or at the end-of-sequence token).
        temperature: 0 for greedy decoding, else sampling at this temperature.
        seed: the sampling seed.

    Returns:
        ``text`` (the continuation), ``new_tokens``, ``prompt_tokens``, ``prefill_seconds``,
        ``decode_seconds`` and ``decode_tokens_per_second``.
    """
    if max_new_tokens < 1:
        raise UsageError(f"{arg('max_new_tokens')} must be at least 1")
    if temperature < 0:
        raise UsageError(f"{arg('temperature')} must be 0 (greedy) or more, got {temperature}")
    generator = torch.Generator().manual_seed(seed)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise UsageError(f"{arg('prompt')} is empty (and the tokenizer adds no BOS token)")
    start = time.perf_counter()
    logits, cache = _next_logits(runner, ids, None)
    prefill = time.perf_counter() - start
    new: list[int] = []
    start = time.perf_counter()
    while True:
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator))
        else:
            token = int(logits.argmax())
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
        if len(new) >= max_new_tokens:
            break
        logits, cache = _next_logits(runner, torch.tensor([[token]]), cache)
    decode = time.perf_counter() - start
    return {
        "text": tokenizer.decode(new, skip_special_tokens=True),
        "prompt_tokens": int(ids.shape[1]),
        "new_tokens": len(new),
        "prefill_seconds": prefill,
        "decode_seconds": decode,
        "decode_tokens_per_second": len(new) / decode if decode > 0 else 0.0,
    }


def generate_from_pool(
    root: Path,
    model: str,
    prompt: str,
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    options: RunOptions = RunOptions(),
) -> dict[str, Any]:
    """Open a pool and :func:`generate` with one of its models, as ``options`` say (budget,
    device, threads); the result carries the run's report (see :func:`open_runner`)."""
    from blockpool import Pool

    pool = Pool(root)
    if not pool.family(model).causal:
        raise UsageError(f"model {model!r} is an encoder and cannot generate text")
    tokenizer = pool.tokenizer(model)
    limit = pool.max_positions(model)  # learned positions: the whole sequence must fit
    if limit is not None:
        length = len(tokenizer(prompt).input_ids) + max_new_tokens
        if length > limit:
            raise UsageError(
                f"the prompt plus {arg('max_new_tokens')} {max_new_tokens} make {length} tokens, "
                f"more than the {limit} positions model {model!r} has learned; shorten "
                f"{arg('prompt')} or lower {arg('max_new_tokens')}"
            )
    with open_runner(pool, model, options) as run:
        result = generate(
            run.runner,
            tokenizer,
            prompt,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
        )
    return {"model": model, **result} | run.report

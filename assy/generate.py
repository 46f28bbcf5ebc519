"""Token-by-token generation from a pool model, with a KV cache, optionally under a budget."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from assy.errors import UsageError

__all__ = ["generate", "generate_from_pool"]


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
        raise UsageError("--max-new-tokens must be at least 1")
    generator = torch.Generator().manual_seed(seed)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    start = time.perf_counter()
    out = runner.forward(ids, use_cache=True)
    prefill = time.perf_counter() - start
    new: list[int] = []
    start = time.perf_counter()
    while True:
        logits = out.logits[0, -1].float()
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
        step = torch.tensor([[token]])
        out = runner.forward(step, past_key_values=out.past_key_values, use_cache=True)
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
    budget: int | None = None,
    policy: str = "prefetch+preswap",
) -> dict[str, Any]:
    """Open a pool and :func:`generate` with one of its models, optionally under a budget."""
    from assy.evaluate import peak_rss_bytes
    from blockpool import Pool
    from blockpool.offload import budgeted_runner

    pool = Pool(root)
    if not pool.family(model).causal:
        raise UsageError(f"model {model!r} is an encoder and cannot generate text")
    runner, swapper = budgeted_runner(pool, model, budget=budget, policy=policy)
    try:
        result = generate(
            runner,
            pool.tokenizer(model),
            prompt,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
        )
    finally:
        if swapper is not None:
            swapper.close()
    result = {"model": model, **result}
    if swapper is not None:
        result |= {"budget_bytes": budget, "swap_policy": policy, **swapper.stats.as_dict()}
    return result | {"peak_rss_bytes": peak_rss_bytes()}

"""Forward-only activation capture: what enters and leaves every layer block, per example.

Each pool model runs (forward only, through :class:`blockpool.BlockRunner`) on the same
calibration texts, tokenized by its own tokenizer. The hidden states entering and leaving
every layer block are pooled over tokens per example (mask-aware mean, or the last real
token), so that models with different tokenizers are paired by example, not by token.

Capture observes the runner through its public hook (:meth:`blockpool.chain.ChainRunner.observe`),
so a runner served by a memory-budgeted swapper works the same. The head block (final
norm + LM head, or pooler) is not needed and is never run.

Results are cached as one safetensors file per model, keyed by the model's block sums,
the texts, the sample count, the token cap and the pooling (mode and skipped leading
tokens); a rerun reuses them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from assy.data import load_task, read_text
from assy.errors import UsageError, arg
from assy.progress import bar
from blockpool import BlockCall, BlockRunner, ChainRunner, Pool, atomic_write_bytes

__all__ = [
    "POOLINGS",
    "Activations",
    "calibration_texts",
    "capture_model",
    "cached_capture",
    "pool_tokens",
]

POOLINGS = ("mean", "last")
_FORMAT = "assy-activations/1"


@dataclass(frozen=True)
class Activations:
    """Pooled hidden states of one model's layer blocks on ``n`` calibration examples.

    Attributes:
        model: the model's name in the pool.
        block_ids: ``L`` layer block ids, in execution order.
        inputs: ``[L, n, d]`` float32, what entered each layer block.
        outputs: ``[L, n, d]`` float32, what left it.
    """

    model: str
    block_ids: list[str]
    inputs: torch.Tensor
    outputs: torch.Tensor


def pool_tokens(
    hidden: torch.Tensor, mask: torch.Tensor, mode: str = "mean", skip_first: int = 0
) -> torch.Tensor:
    """Pool ``[B, T, d]`` hidden states over real tokens: ``mask [B, T]`` (1 = real) -> ``[B, d]``.

    Args:
        hidden: ``[B, T, d]`` hidden states, right-padded.
        mask: ``[B, T]`` 1 for real tokens, 0 for padding.
        mode: ``mean`` (average over the real tokens) or ``last`` (the last real token).
        skip_first: leading positions left out of the mean. Position 0 holds an
            attention-sink state (about 170x the median norm in SmolLM2 from layer 10 on,
            Gemma3's BOS likewise) that would turn the mean into a ``1 / length`` signal.

    Raises:
        UsageError: an example has no real token left after ``skip_first``.
    """
    if mode not in POOLINGS:
        raise UsageError(f"unknown pooling {mode!r}; use one of {', '.join(POOLINGS)}")
    if mode == "last":
        last = mask.sum(1).long().clamp_min(1) - 1
        return hidden[torch.arange(hidden.shape[0]), last]
    mask = mask.to(hidden.dtype).clone()
    mask[:, :skip_first] = 0
    count = mask.sum(1, keepdim=True)
    if (count == 0).any():
        raise UsageError(
            f"an example has no token left after skipping the first {skip_first}; "
            f"drop very short texts or lower {arg('skip_first')}"
        )
    return (hidden * mask.unsqueeze(-1)).sum(1) / count


def calibration_texts(
    *, task: str | None = None, data: Path | None = None, samples: int = 256
) -> list[str]:
    """The first ``samples`` calibration texts.

    Args:
        task: a multiple-choice task of :data:`assy.data.TASKS`: its prompts (contexts).
        data: a ``.jsonl`` file (each line ``{"text": ...}`` or ``{"context": ...}``) or a
            text file (one example per non-blank line).
        samples: how many texts to keep (the first ones).

    Raises:
        UsageError: neither or both sources, too few samples, or a bad file.
    """
    if (task is None) == (data is None):
        raise UsageError(f"give exactly one source of texts: {arg('task')} or {arg('data')}")
    if samples < 4:
        raise UsageError(f"{arg('samples')} must be at least 4 (unbiased CKA), got {samples}")
    if task is not None:
        return [ex.context for ex in load_task(task, limit=samples)]
    path = Path(data)
    lines = [line for line in read_text(path).splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        lines = [_jsonl_text(path, number, line) for number, line in enumerate(lines, 1)]
    return lines[:samples]


def _jsonl_text(path: Path, number: int, line: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}:{number}: not valid JSON ({e.msg})") from None
    text = row.get("text", row.get("context")) if isinstance(row, dict) else None
    if not isinstance(text, str):
        raise UsageError(f'{path}:{number}: expected an object with a "text" or "context" string')
    return text


def _batches(tokenizer: Any, texts: Sequence[str], max_tokens: int, batch_size: int):
    """Yield ``(indices, input_ids, attention_mask)``, right-padded, grouped by length."""
    limit = min(max_tokens, getattr(tokenizer, "model_max_length", max_tokens) or max_tokens)
    ids = [tokenizer(t, truncation=True, max_length=limit).input_ids for t in texts]
    if any(len(i) == 0 for i in ids):
        raise UsageError("a calibration text encodes to no tokens; remove empty texts")
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    pad = next((p for p in (tokenizer.pad_token_id, tokenizer.eos_token_id) if p is not None), 0)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(ids[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
            mask[row, : len(ids[i])] = 1
        yield chunk, input_ids, mask


def _check_lengths(model: str, batches: Sequence[tuple], skip_first: int) -> None:
    """Every text must keep at least one token after the ``skip_first`` left out."""
    for chunk, _, mask in batches:
        for i, length in zip(chunk, mask.sum(1).tolist(), strict=True):
            if length <= skip_first:
                raise UsageError(
                    f"{model}: text {i} has {length} token(s), none left after {arg('skip_first')} "
                    f"{skip_first}; drop very short texts or lower {arg('skip_first')}"
                )


def capture_model(
    pool: Pool,
    model: str,
    texts: Sequence[str],
    *,
    max_tokens: int = 128,
    batch_size: int = 8,
    pooling: str = "mean",
    skip_first: int = 1,
    runner: ChainRunner | None = None,
    progress: bool = True,
) -> Activations:
    """Run ``model`` forward on ``texts`` and pool every layer block's input and output.

    Args:
        pool: the open pool.
        model: a model name of the pool (decoder or encoder).
        texts: ``n`` calibration texts; each is truncated to ``max_tokens`` tokens.
        max_tokens: token cap per text (also capped by the tokenizer's maximum length).
        batch_size: texts per forward pass (grouped by length, right-padded).
        pooling: ``"mean"`` (mask-aware mean over tokens) or ``"last"`` (last real token).
        skip_first: leading tokens left out of the mean (see :func:`pool_tokens`).
        runner: the runner of ``model`` to use (e.g. one served by a swapper, see
            :func:`blockpool.session.open_runner`); default: a resident one.
        progress: show a tqdm bar on stderr.

    Returns:
        :class:`Activations` with rows in the order of ``texts``.
    """
    if pooling not in POOLINGS:
        raise UsageError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLINGS)}")
    if max_tokens < 1 or batch_size < 1 or skip_first < 0:
        raise UsageError(
            f"{arg('max_tokens')} and {arg('batch_size')} must be >= 1 and "
            f"{arg('skip_first')} >= 0, "
            f"got {max_tokens}, {batch_size}, {skip_first}"
        )
    runner = runner if runner is not None else BlockRunner(pool, model)
    skip = skip_first if pooling == "mean" else 0
    inputs: dict[int, list[torch.Tensor]] = {}
    outputs: dict[int, list[torch.Tensor]] = {}

    def record(call: BlockCall) -> None:
        if call.kind == "layer":
            mask = call.attention_mask
            inputs.setdefault(call.position, []).append(_pooled(call.inputs, mask, pooling, skip))
            outputs.setdefault(call.position, []).append(_pooled(call.output, mask, pooling, skip))

    tokenizer = pool.tokenizer(model)
    order: list[int] = []
    batches = list(_batches(tokenizer, texts, max_tokens, batch_size))
    if pooling == "mean":
        _check_lengths(model, batches, skip_first)
    with runner.observe(record):
        for chunk, input_ids, mask in bar(
            batches, desc=f"capture {model}", unit="batch", disable=not progress
        ):
            runner.forward(input_ids, mask, head=False)
            order.extend(chunk)
    positions = sorted(inputs)
    inverse = torch.argsort(torch.tensor(order))
    stacked_in = torch.stack([torch.cat(inputs[p])[inverse] for p in positions])
    stacked_out = torch.stack([torch.cat(outputs[p])[inverse] for p in positions])
    layers = [runner.items[p] for p in positions]
    return Activations(model, layers, stacked_in, stacked_out)


def _pooled(hidden: torch.Tensor, mask: torch.Tensor, pooling: str, skip: int) -> torch.Tensor:
    return pool_tokens(hidden.float(), mask.to(hidden.device), pooling, skip).cpu()


def _cache_key(pool: Pool, model: str, texts: Sequence[str], settings: dict[str, Any]) -> str:
    sums = [pool.blocks[b].sha256 for b in pool.model(model).blocks]
    data = hashlib.sha256("\x00".join(texts).encode()).hexdigest()
    blob = json.dumps([_FORMAT, model, sums, data, len(texts), settings], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cached_capture(
    pool: Pool,
    model: str,
    texts: Sequence[str],
    cache_dir: Path,
    *,
    max_tokens: int = 128,
    batch_size: int = 8,
    pooling: str = "mean",
    skip_first: int = 1,
    runner: ChainRunner | None = None,
    progress: bool = True,
) -> tuple[Activations, Path, bool]:
    """:func:`capture_model`, reusing ``cache_dir/<model>-<key>.safetensors`` when present.

    The key hashes the model's block sums, the texts and their count, ``max_tokens`` and
    ``pooling``, ``skip_first`` (not ``batch_size``: results do not depend on it). The file is written
    atomically (temp file + rename).

    Returns:
        ``(activations, cache file, reused)``.
    """
    settings = {"max_tokens": max_tokens, "pooling": pooling, "skip_first": skip_first}
    path = Path(cache_dir) / f"{model}-{_cache_key(pool, model, texts, settings)}.safetensors"
    if path.is_file():
        return _load(path), path, True
    acts = capture_model(
        pool,
        model,
        texts,
        max_tokens=max_tokens,
        batch_size=batch_size,
        pooling=pooling,
        skip_first=skip_first,
        runner=runner,
        progress=progress,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": _FORMAT, "model": model, "blocks": json.dumps(acts.block_ids)}
    meta |= {"samples": str(len(texts)), **{k: str(v) for k, v in settings.items()}}
    tensors = {"inputs": acts.inputs, "outputs": acts.outputs}
    atomic_write_bytes(path, save(tensors, metadata=meta))
    return acts, path, False


def _load(path: Path) -> Activations:
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != _FORMAT:
            raise UsageError(f"{path}: not an activation cache of this version; delete it")
        return Activations(
            meta["model"],
            json.loads(meta["blocks"]),
            f.get_tensor("inputs"),
            f.get_tensor("outputs"),
        )

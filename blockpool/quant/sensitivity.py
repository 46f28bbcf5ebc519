"""Activation sensitivity of blocks to quantization, on calibration text, forward only.

For every block and precision: the relative change of the block's output on the inputs
it receives in the full-precision model, when that block alone is quantized (every other
block at full precision). Measured per token, ``||y_q - y|| / ||y||`` over the last
dimension, then averaged over tokens, so that the attention-sink tokens (whose hidden
states are orders of magnitude larger, e.g. position 0 of SmolLM2) do not dominate.

Calibration: ``N`` windows of ``T`` consecutive tokens of a text, all of equal length so
no padding or masks are involved (``assy.calibration.calibration_windows`` cuts them). Pass 1 runs the model once over all windows
and stores each block's input activations (bfloat16) in a safetensors file under a cache
directory, keyed by the model's block sums, the data key and the window count and
length. Pass 2 replays each block alone on those inputs (recomputing its full-precision
output in float32) and on each quantized variant. The per-block results (loss and exact
variant bytes) are cached beside the activations as JSON.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn

from blockpool.chain import BlockCall
from blockpool.manifest import atomic_write_bytes
from blockpool.pool import Pool
from blockpool.quant.formats import dequantize_block, fake_quantize_block, normalize_precision
from blockpool.quant.write import quantized_block, variant_bytes
from blockpool.runner import BlockRunner

__all__ = ["capture_inputs", "measure_blocks", "relative_change"]

MAX_OUT_ELEMENTS = 1 << 26  # per block and variant: output elements compared (LM heads)
_CHUNK_ELEMENTS = 1 << 25  # output elements per forward call
Progress = Callable[[str, int, int], None]


def relative_change(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, int]:
    """Summed per-row relative change and the number of rows.

    Args:
        ref: ``[..., d]`` reference output.
        out: ``[..., d]`` output of the quantized block.

    Returns:
        ``(sum over rows of ||out - ref|| / ||ref||, rows)``; rows whose reference is all
        zeros are skipped.
    """
    ref, out = ref.float().flatten(0, -2), out.float().flatten(0, -2)
    norm = ref.norm(dim=-1)
    keep = norm > 0
    return ((out - ref).norm(dim=-1)[keep] / norm[keep]).sum().item(), int(keep.sum())


def _cache_key(pool: Pool, model: str, data_key: str, ids: torch.Tensor) -> str:
    sums = [pool.blocks[b].sha256 for b in pool.model(model).blocks]
    token = json.dumps([sums, data_key, list(ids.shape)])
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def capture_inputs(
    pool: Pool,
    model: str,
    ids: torch.Tensor,
    *,
    data_key: str,
    cache_dir: Path | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> dict[str, torch.Tensor]:
    """Each block's input on the calibration windows (pass 1), from the cache if there.

    The model runs on ``device``; the inputs are kept on the CPU.

    Returns:
        Block id -> ``[N, T]`` token ids (embedding) or ``[N, T, d]`` bfloat16 hidden states.
    """
    path = (
        cache_dir / f"{model}-{_cache_key(pool, model, data_key, ids)}.safetensors"
        if cache_dir
        else None
    )
    if path is not None and path.is_file():
        return load_file(path)
    parts: dict[str, list[torch.Tensor]] = {}

    def keep(bid: str, x: torch.Tensor) -> None:
        x = x.to(torch.bfloat16) if x.is_floating_point() else x
        parts.setdefault(bid, []).append(x.cpu())

    def record(call: BlockCall) -> None:
        if call.kind in ("embed", "layer"):
            keep(call.block_id, call.inputs)

    runner = BlockRunner(pool, model, device=device)
    head = runner.block_ids[-1] if pool.blocks[runner.block_ids[-1]]["kind"] == "head" else None
    with runner.observe(record):
        for step, start in enumerate(range(0, len(ids), batch_size)):
            out = runner.forward(ids[start : start + batch_size], head=False)
            if head is not None:
                keep(head, out.hidden)  # the head's input; its output is not needed
            if progress:
                progress(f"{model} activations", step + 1, -(-len(ids) // batch_size))
    inputs = {bid: torch.cat(p) for bid, p in parts.items()}
    if path is not None:
        atomic_write_bytes(path, save(inputs, metadata={"model": model, "data": data_key}))
    return inputs


class _Replay:
    """Runs one block alone on slices of its recorded inputs, as the model would run it."""

    def __init__(self, runner: BlockRunner, batch_size: int) -> None:
        self.runner, self.batch_size = runner, batch_size

    def chunks(self, bid: str, x: torch.Tensor, module: nn.Module) -> list[slice]:
        """Slices of the windows to run: as many as fit the output-element caps."""
        per_window = self.run(bid, module, x[:1]).numel()
        size = max(1, min(self.batch_size, _CHUNK_ELEMENTS // per_window))
        total = min(len(x), max(1, MAX_OUT_ELEMENTS // per_window))
        return [slice(s, min(s + size, total)) for s in range(0, total, size)]

    def run(self, bid: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.runner.run_block(bid, _input(x).to(self.runner.device), module=module)

    def build(self, pool: Pool, bid: str, state: dict, config: Any) -> nn.Module:
        """A float32 module of ``bid`` from ``state``, on the runner's device."""
        module = pool.empty_module(bid, config)
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        module.load_state_dict(state, strict=True, assign=True)
        return module.to(self.runner.device).eval()


def _input(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.is_floating_point() else x


def _measure_block(
    pool: Pool, bid: str, replay: _Replay, x: torch.Tensor, precisions: Sequence[str]
) -> dict[str, dict[str, float | int]]:
    """Loss (mean relative output change) and exact variant bytes of one block."""
    from blockpool.families import get_family

    entry = pool.blocks[bid]
    conv1d = get_family(entry.family).conv1d
    config = pool.config(entry.model)
    own, full = pool.load_tensors(bid, tied=False), pool.load_tensors(bid)
    result: dict[str, dict[str, float | int]] = {}
    variants: dict[str, nn.Module] = {}
    tied = {k: v for k, v in full.items() if k not in own}  # a tied head's LM head
    for p in precisions:
        stored, updates = quantized_block(pool, bid, own, p)
        result[p] = {"bytes": variant_bytes(pool, bid, stored, updates), "loss": 0.0}
        if p != entry.precision or entry.quant:
            state = dequantize_block(stored, updates["entry"]["quant"], torch.float32)
            state.update(fake_quantize_block(tied, p, conv1d=conv1d))
            variants[p] = replay.build(pool, bid, state, config)
    if not variants:
        return result
    ref_module = replay.build(pool, bid, full, config)
    sums = dict.fromkeys(variants, 0.0)
    rows = 0
    with torch.inference_mode():
        for part in replay.chunks(bid, x, ref_module):
            ref = replay.run(bid, ref_module, x[part])
            for p, module in variants.items():
                total, n = relative_change(ref, replay.run(bid, module, x[part]))
                sums[p] += total
            rows += n
    for p in variants:
        result[p]["loss"] = sums[p] / max(rows, 1)
    return result


def measure_blocks(
    pool: Pool,
    model: str,
    ids: torch.Tensor,
    precisions: Sequence[str],
    *,
    data_key: str,
    blocks: Sequence[str] | None = None,
    cache_dir: Path | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> dict[str, dict[str, dict[str, float | int]]]:
    """Sensitivity of each block of ``model`` at each precision (pass 2).

    Args:
        pool: the source pool.
        model: the model's name.
        ids: ``[N, T]`` calibration windows (all of one length, so no padding is involved).
        precisions: the candidate precisions.
        data_key: identifies the calibration data (task name or file sum) in cache keys.
        blocks: the blocks to measure (default: all of the model's).
        cache_dir: where activations and results are cached (``None``: no cache).
        batch_size: windows per forward call.
        device: where the blocks run (results do not depend on it beyond float noise).
        progress: called as ``progress(label, done, total)``.

    Returns:
        Block id -> precision -> ``{"loss": mean relative output change, "bytes": exact
        size of the variant file}``. A precision equal to an unquantized block's own
        costs nothing to measure: its loss is 0.
    """
    precisions = [normalize_precision(p) for p in precisions]
    blocks = list(blocks) if blocks is not None else pool.model(model).blocks
    key = _cache_key(pool, model, data_key, ids)
    path = cache_dir / f"{model}-{key}-sensitivity.json" if cache_dir else None
    done: dict[str, dict] = json.loads(path.read_text()) if path and path.is_file() else {}
    todo = [b for b in blocks if not set(precisions) <= set(done.get(b, {}))]
    if todo:
        inputs = capture_inputs(
            pool,
            model,
            ids,
            data_key=data_key,
            cache_dir=cache_dir,
            batch_size=batch_size,
            device=device,
            progress=progress,
        )
        replay = _Replay(BlockRunner(pool, model, device=device), batch_size)
        for step, bid in enumerate(todo):
            done[bid] = {
                **done.get(bid, {}),
                **_measure_block(pool, bid, replay, inputs[bid], precisions),
            }
            if path is not None:
                atomic_write_bytes(path, json.dumps(done, indent=1, sort_keys=True).encode())
            if progress:
                progress(f"{model} sensitivity", step + 1, len(todo))
    return {b: {p: done[b][p] for p in precisions} for b in blocks}

"""Run a pool model within a memory budget: block sizes, pieces, and the runner factory.

Blocks are sized as they sit in memory at the compute dtype (read from the safetensors
headers, nothing loaded). An embedding or LM head that would take more than half the
budget is served in pieces straight from its memory-mapped file: the embedding gathers only
the rows of the tokens present, the LM head multiplies vocabulary chunks sized to the room
left. Everything else goes through the :class:`~blockpool.swapper.BlockSwapper`.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from blockpool.errors import UsageError
from blockpool.pool import Pool
from blockpool.runner import BlockRunner
from blockpool.sizes import format_size
from blockpool.swapper import BlockSwapper

__all__ = ["ChunkedHead", "GatheredEmbed", "block_nbytes", "budgeted_runner", "min_budget"]

_TOKEN_TABLE = "tokens.weight"
_MIN_CHUNK_ROWS = 256
_FLOAT = {"F32", "F16", "BF16", "F64"}
_DENSE = {"fp32", "fp16", "bf16"}


def _header(pool: Pool, bid: str) -> dict[str, tuple[list[int], str]]:
    with safe_open(pool.path(bid), "pt") as f:
        return {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}


def block_nbytes(pool: Pool, bid: str, dtype: torch.dtype, skip: tuple[str, ...] = ()) -> int:
    """In-memory bytes of a block's weights at ``dtype`` (tied aliases included)."""
    entry = pool.blocks[bid]
    if entry.get("quant") or any(
        pool.blocks[ref.partition(":")[0]].get("quant")
        for ref in (entry.get("tied") or {}).values()
    ):
        # Quantized blocks are dequantized at load: count every weight at the compute dtype
        # (a tied alias at the size of the whole block it lives in: an upper bound).
        refs = {ref.partition(":")[0] for ref in (entry.get("tied") or {}).values()}
        return sum(pool.params(b) for b in {bid} | refs) * dtype.itemsize
    shapes = {k: v for k, v in _header(pool, bid).items() if k not in skip}
    for local, ref in (entry.get("tied") or {}).items():
        if local not in skip:
            src, _, name = ref.partition(":")
            shapes[local] = _header(pool, src)[name]
    size = dtype.itemsize
    total = 0
    for shape, st_dtype in shapes.values():
        numel = int(torch.Size(shape).numel())
        total += numel * (size if st_dtype in _FLOAT else _ST_ITEMSIZE.get(st_dtype, 1))
    return total


_ST_ITEMSIZE = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _table_ref(pool: Pool, bid: str) -> tuple[str, str]:
    """Where a head's LM-head weight (or an embed's token table) is stored."""
    entry = pool.blocks[bid]
    if entry["kind"] == "embed":
        return bid, _TOKEN_TABLE
    tied = (entry.get("tied") or {}).get("lm_head.weight")
    if tied:
        src, _, name = tied.partition(":")
        return src, name
    return bid, "lm_head.weight"


def _load_small(pool: Pool, bid: str, module: nn.Module, skip: str, dtype: torch.dtype) -> None:
    """Load every tensor of the block but the big one into ``module``."""
    pool._ensure_verified(bid)
    with safe_open(pool.path(bid), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if k != skip}
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    module.load_state_dict(state, strict=False, assign=True)


class _Piecewise(nn.Module):
    def __init__(self, pool: Pool, bid: str, config: Any, dtype: torch.dtype, swapper) -> None:
        super().__init__()
        entry = pool.blocks[bid]
        if entry["precision"] not in _DENSE:
            raise UsageError(
                f"block {bid} ({entry['precision']}) is too large for the budget and quantized "
                "blocks cannot be served in pieces yet; raise --budget"
            )
        self.inner = pool.empty_module(bid, config)
        self.src, self.table = _table_ref(pool, bid)
        pool._ensure_verified(self.src)
        self.path, self.dtype, self.swapper = pool.path(self.src), dtype, swapper
        _load_small(pool, bid, self.inner, self.table if self.src == bid else "", dtype)
        self.pinned = block_nbytes(pool, bid, dtype, skip=(self.table, "lm_head.weight"))


class GatheredEmbed(_Piecewise):
    """An embedding block that reads only the rows of the tokens present."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.inner.tokens.padding_idx = None  # ids are re-numbered; padding_idx only shapes grads

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_length=0):
        uniq, local = torch.unique(input_ids, return_inverse=True)
        with safe_open(self.path, "pt") as f:
            table = f.get_slice(self.table)
            width = table.get_shape()[1]
            with self.swapper.reserve(len(uniq) * width * self.dtype.itemsize):
                rows = torch.cat([table[i : i + 1] for i in uniq.tolist()]).to(self.dtype)
                self.inner.tokens.weight = nn.Parameter(rows, requires_grad=False)
                try:
                    return self.inner(local, attention_mask, position_ids, past_length)
                finally:
                    del self.inner.tokens.weight, rows


class ChunkedHead(_Piecewise):
    """An LM head that multiplies vocabulary chunks sized to the room left in the budget."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        features = self.inner.features(hidden)
        with safe_open(self.path, "pt") as f:
            weight = f.get_slice(self.table)
            vocab, width = weight.get_shape()
            row_bytes = width * self.dtype.itemsize
            chunk = max(_MIN_CHUNK_ROWS, min(vocab, self.swapper.available() // row_bytes))
            logits = features.new_empty(*features.shape[:-1], vocab)
            for start in range(0, vocab, chunk):
                stop = min(vocab, start + chunk)
                with self.swapper.reserve((stop - start) * row_bytes):
                    rows = weight[start:stop].to(self.dtype)
                    logits[..., start:stop] = features @ rows.T
                    del rows
        return self.inner.cap(logits)


def _limit_malloc_caching() -> None:
    """Make glibc return freed weight buffers to the OS at once.

    glibc raises its mmap threshold after large frees, so evicted blocks would stay in the
    heap and RSS would not drop. A fixed threshold keeps big buffers in their own maps.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
        except OSError:
            return
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: 1 MiB
        libc.mallopt(-1, 1 << 20)  # M_TRIM_THRESHOLD


def min_budget(pool: Pool, model: str, dtype: torch.dtype = torch.float32) -> int:
    """The smallest budget that runs ``model``: its largest layer plus its pinned parts."""
    ids = pool.model(model)["blocks"]
    layers = [block_nbytes(pool, b, dtype) for b in ids if pool.blocks[b]["kind"] == "layer"]
    ends = [b for b in ids if pool.blocks[b]["kind"] != "layer"]
    pinned = sum(block_nbytes(pool, b, dtype, skip=(_TOKEN_TABLE, "lm_head.weight")) for b in ends)
    width = pool.blocks[ids[0]]["interface"]["hidden_size"]
    piece = _MIN_CHUNK_ROWS * width * dtype.itemsize  # room for a gathered or chunked piece
    return max(layers) + pinned + piece


def budgeted_runner(
    pool: Pool,
    model: str,
    *,
    budget: int | None,
    policy: str = "prefetch+preswap",
    dtype: torch.dtype = torch.float32,
    depth: int = 2,
    piece_fraction: float = 0.5,
) -> tuple[BlockRunner, BlockSwapper | None]:
    """A runner for ``model`` whose resident weights stay within ``budget`` bytes.

    ``budget=None`` keeps every block resident (no swapper). An embedding or LM head
    larger than ``piece_fraction * budget`` is served in pieces.

    Raises:
        UsageError: the budget is below :func:`min_budget` (the message names it).
    """
    if budget is None:
        return BlockRunner(pool, model, dtype=dtype), None
    floor = min_budget(pool, model, dtype)
    if budget < floor:
        raise UsageError(
            f"--budget {format_size(budget)} is below the smallest working set of {model} "
            f"({format_size(floor)}: its largest layer at {str(dtype).removeprefix('torch.')} "
            f"plus embedding and head parts); use --budget {format_size(floor)} or more"
        )
    _limit_malloc_caching()
    runner = BlockRunner(pool, model, dtype=dtype)
    ids = runner.block_ids
    sizes = {b: block_nbytes(pool, b, dtype) for b in ids}
    pieces: dict[str, nn.Module] = {}
    cached = [b for b in ids if not _piecewise(pool, b, sizes[b] > piece_fraction * budget)]
    swapper = BlockSwapper(
        lambda b: pool.build_module(b, dtype=dtype, config=runner.config, fresh=True),
        sizes,
        {b: pool.blocks[b]["bytes"] for b in ids},
        cached,
        budget=budget,
        policy=policy,
        depth=depth,
    )
    for b in ids:
        if b not in cached:
            cls = GatheredEmbed if pool.blocks[b]["kind"] == "embed" else ChunkedHead
            pieces[b] = cls(pool, b, runner.config, dtype, swapper)
            swapper.pin(pieces[b].pinned)
    runner.fetch = lambda b: pieces[b] if b in pieces else swapper.fetch(b)
    return runner, swapper


def _piecewise(pool: Pool, bid: str, large: bool) -> bool:
    entry = pool.blocks[bid]
    causal = pool.family(entry["model"]).causal
    return large and causal and entry["kind"] in ("embed", "head")

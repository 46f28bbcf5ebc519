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
from collections.abc import Sequence
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from blockpool.chain import ChainRunner
from blockpool.errors import UsageError, arg
from blockpool.pool import Pool
from blockpool.runner import BlockRunner
from blockpool.sizes import format_size
from blockpool.swapper import DEFAULT_POLICY, BlockSwapper

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
    if entry.quant or any(
        pool.blocks[ref.partition(":")[0]].get("quant") for ref in entry.tied.values()
    ):
        # Quantized blocks are dequantized at load: count every weight at the compute dtype
        # (a tied alias at the size of the whole block it lives in: an upper bound).
        refs = {ref.partition(":")[0] for ref in entry.tied.values()}
        return sum(pool.params(b) for b in {bid} | refs) * dtype.itemsize
    shapes = {k: v for k, v in _header(pool, bid).items() if k not in skip}
    for local, ref in entry.tied.items():
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
    if entry.kind == "embed":
        return bid, _TOKEN_TABLE
    tied = entry.tied.get("lm_head.weight")
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


def _move_real_tensors(module: nn.Module, device: torch.device) -> None:
    """Move parameters and buffers to ``device``, leaving the meta ones (the big table,
    read piece by piece) where they are."""
    for owner in module.modules():
        for name, p in list(owner.named_parameters(recurse=False)):
            if not p.is_meta and p.device != device:
                setattr(owner, name, nn.Parameter(p.to(device), requires_grad=p.requires_grad))
        for name, b in list(owner.named_buffers(recurse=False)):
            if not b.is_meta and b.device != device:
                owner.register_buffer(
                    name, b.to(device), persistent=name not in owner._non_persistent_buffers_set
                )


class _Piecewise(nn.Module):
    def __init__(
        self,
        pool: Pool,
        bid: str,
        config: Any,
        dtype: torch.dtype,
        swapper,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        entry = pool.blocks[bid]
        if entry.precision not in _DENSE:
            raise UsageError(
                f"block {bid} ({entry['precision']}) is too large for the budget and quantized "
                f"blocks cannot be served in pieces yet; raise {arg('budget')}"
            )
        self.inner = pool.empty_module(bid, config)
        self.src, self.table = _table_ref(pool, bid)
        pool._ensure_verified(self.src)
        self.path, self.dtype, self.swapper = pool.path(self.src), dtype, swapper
        _load_small(pool, bid, self.inner, self.table if self.src == bid else "", dtype)
        self.device = torch.device(device)
        _move_real_tensors(self.inner, self.device)
        self.pinned = block_nbytes(pool, bid, dtype, skip=(self.table, "lm_head.weight"))


class GatheredEmbed(_Piecewise):
    """An embedding block that reads only the rows of the tokens present."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.inner.tokens.padding_idx = None  # ids are re-numbered; padding_idx only shapes grads

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_length=0):
        uniq, local = torch.unique(input_ids.cpu(), return_inverse=True)
        local = local.to(input_ids.device)
        with safe_open(self.path, "pt") as f:
            table = f.get_slice(self.table)
            width = table.get_shape()[1]
            with self.swapper.reserve(len(uniq) * width * self.dtype.itemsize):
                rows = torch.cat([table[i : i + 1] for i in uniq.tolist()])
                rows = rows.to(self.device, self.dtype)
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
                    rows = weight[start:stop].to(self.device, self.dtype)
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


def _chain_blocks(pool: Pool, target: str | Sequence[str | nn.Module]) -> list[str]:
    if isinstance(target, str):
        return list(pool.model(target).blocks)
    return [b for b in target if isinstance(b, str)]


def min_budget(
    pool: Pool, target: str | Sequence[str | nn.Module], dtype: torch.dtype = torch.float32
) -> int:
    """The smallest budget that runs a model (by name) or a chain: its largest layer plus
    its pinned parts (the small tensors of an embedding and head served in pieces)."""
    ids = _chain_blocks(pool, target)
    layers = [block_nbytes(pool, b, dtype) for b in ids if pool.blocks[b].kind == "layer"]
    ends = [b for b in ids if pool.blocks[b].kind != "layer"]
    pinned = sum(block_nbytes(pool, b, dtype, skip=(_TOKEN_TABLE, "lm_head.weight")) for b in ends)
    width = max(pool.blocks[b].hidden_size for b in ends or ids)
    piece = _MIN_CHUNK_ROWS * width * dtype.itemsize  # room for a gathered or chunked piece
    return max(layers, default=0) + pinned + piece


def _seam_bytes(target: str | Sequence[str | nn.Module]) -> int:
    if isinstance(target, str):
        return 0
    modules = [m for m in target if isinstance(m, nn.Module)]
    return sum(t.numel() * t.element_size() for m in modules for t in m.state_dict().values())


def budgeted_runner(
    pool: Pool,
    target: str | Sequence[str | nn.Module],
    *,
    budget: int | None,
    policy: str = DEFAULT_POLICY,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    depth: int = 2,
    piece_fraction: float = 0.5,
) -> tuple[ChainRunner, BlockSwapper | None]:
    """A runner for a model (its name) or a chain whose resident weights stay within ``budget``.

    ``budget=None`` keeps every block resident (no swapper). An embedding or LM head
    larger than ``piece_fraction * budget`` is served in pieces. Seams of a chain stay
    resident and count against the budget.

    Raises:
        UsageError: the budget is below :func:`min_budget` (the message names it).
    """

    def make(fetch=None) -> ChainRunner:
        if isinstance(target, str):
            return BlockRunner(pool, target, dtype=dtype, device=device, fetch=fetch)
        return ChainRunner(pool, target, dtype=dtype, device=device, fetch=fetch)

    if budget is None:
        return make(), None
    seams = _seam_bytes(target)
    floor = min_budget(pool, target, dtype) + seams
    name = target if isinstance(target, str) else "the chain"
    if budget < floor:
        raise UsageError(
            f"{arg('budget')} {format_size(budget)} is below the smallest working set of {name} "
            f"({format_size(floor)}: its largest layer at {str(dtype).removeprefix('torch.')} "
            f"plus embedding, head and seam parts); use {arg('budget')} {format_size(floor)} or more"
        )
    _limit_malloc_caching()
    runner = make()
    ids = list(dict.fromkeys(runner.block_ids))
    sizes = {b: block_nbytes(pool, b, dtype) for b in ids}
    pieces: dict[str, nn.Module] = {}
    cached = [b for b in ids if not _piecewise(pool, b, sizes[b] > piece_fraction * budget)]

    def load(bid: str) -> nn.Module:
        module = pool.build_module(bid, dtype=dtype, config=runner.config_of(bid), fresh=True)
        return module.to(runner.device)

    swapper = BlockSwapper(
        load,
        sizes,
        {b: pool.blocks[b].bytes for b in ids},
        [b for b in runner.block_ids if b in cached],
        budget=budget,
        policy=policy,
        depth=depth,
        pinned_bytes=seams,
    )
    for b in ids:
        if b not in cached:
            cls = GatheredEmbed if pool.blocks[b].kind == "embed" else ChunkedHead
            pieces[b] = cls(pool, b, runner.config_of(b), dtype, swapper, runner.device)
            swapper.pin(pieces[b].pinned)
    runner.fetch = lambda b: pieces[b] if b in pieces else swapper.fetch(b)
    return runner, swapper


def _piecewise(pool: Pool, bid: str, large: bool) -> bool:
    entry = pool.blocks[bid]
    causal = pool.family(entry.model).causal
    return large and causal and entry.kind in ("embed", "head")

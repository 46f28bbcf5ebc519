"""Run a pool model within a memory budget: block sizes, pieces, and the runner factory.

Blocks are sized as they sit in memory (read from the safetensors headers, nothing
loaded): floating tensors at the compute dtype, quantized matrices packed (int8 and its row
scales, 4-bit codes and their absmax; :mod:`blockpool.quant.packed`). A dense embedding or
LM head that would take more than half the budget is served in pieces straight from its
file: the embedding gathers only the rows of the tokens present, the LM head multiplies
vocabulary chunks sized to the room left, its first rows a block of the swapper's cycle
(a packed one is held whole: it already dequantizes only the rows it needs, and large
matrices in chunks). Everything else goes through the
:class:`~blockpool.swapper.BlockSwapper`.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from blockpool.chain import ChainRunner, build_block
from blockpool.errors import UsageError, arg
from blockpool.pool import Pool
from blockpool.quant.formats import companions
from blockpool.quant.packed import packed_nbytes
from blockpool.reads import TensorInfo, cast, empty, read_header, read_rows, read_tensors
from blockpool.runner import BlockRunner
from blockpool.sizes import format_size
from blockpool.swapper import DEFAULT_POLICY, BlockSwapper

__all__ = [
    "ChunkedHead",
    "GatheredEmbed",
    "block_nbytes",
    "budgeted_runner",
    "chain_nbytes",
    "min_budget",
]

_TOKEN_TABLE = "tokens.weight"
_MIN_CHUNK_ROWS = 256


def _header(pool: Pool, bid: str) -> dict[str, TensorInfo]:
    return read_header(pool.path(bid))[1]


def block_nbytes(pool: Pool, bid: str, dtype: torch.dtype, skip: tuple[str, ...] = ()) -> int:
    """In-memory bytes of a block's weights as the runners hold them at ``dtype`` (tied
    aliases included, those named in ``skip`` not): floating tensors at ``dtype``,
    quantized matrices packed (:func:`blockpool.quant.packed.packed_nbytes`)."""
    total = packed_nbytes(_header(pool, bid), dtype, skip)
    for local, ref in pool.blocks[bid].tied.items():
        if local not in skip:
            src, _, name = ref.partition(":")
            infos = _header(pool, src)
            total += packed_nbytes({n: infos[n] for n in companions(name, infos)}, dtype)
    return total


def chain_nbytes(pool: Pool, ids: Sequence[str], dtype: torch.dtype) -> int:
    """In-memory bytes of all the weights of blocks ``ids`` held at once (as
    :func:`block_nbytes`; a weight tied to one of the blocks counted once)."""
    inside = set(ids)
    total = 0
    for b in dict.fromkeys(ids):
        tied = tuple(n for n, r in pool.blocks[b].tied.items() if r.split(":")[0] in inside)
        total += block_nbytes(pool, b, dtype, skip=tied)
    return total


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
    path = pool.ensure_verified(bid)
    names = [n for n in read_header(path)[1] if n != skip]
    state = read_tensors(path, names)
    state = {k: cast(v, dtype) for k, v in state.items()}
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


def _row_cost(info: TensorInfo, dtype: torch.dtype) -> int:
    """Bytes one row of a table read in pieces takes: the read buffer plus its cast."""
    width = info.shape[1] if len(info.shape) > 1 else 1
    return info.row_bytes + (0 if info.dtype == dtype else width * dtype.itemsize)


class _Piecewise(nn.Module):
    """A block too large for the budget, its big table read in pieces by positioned reads
    into buffers counted against the budget (nothing of the file stays mapped)."""

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
        self.inner = pool.empty_module(bid, config)
        self.bid = bid
        self.src, self.table = _table_ref(pool, bid)
        self.pool, self.dtype, self.swapper = pool, dtype, swapper
        self.info = _header(pool, self.src)[self.table]
        _load_small(pool, bid, self.inner, self.table if self.src == bid else "", dtype)
        self.device = torch.device(device)
        _move_real_tensors(self.inner, self.device)
        self.pinned = block_nbytes(pool, bid, dtype, skip=(self.table, "lm_head.weight"))

    def row_cost(self) -> int:
        """Bytes one row of the table takes while in use: the read buffer plus its cast."""
        return _row_cost(self.info, self.dtype)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the table at the compute dtype, on the device."""
        path = self.pool.ensure_verified(self.src)
        return cast(read_rows(path, self.info, start, stop), self.dtype).to(self.device)


class GatheredEmbed(_Piecewise):
    """An embedding block that reads only the rows of the tokens present."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.inner.tokens.padding_idx = None  # ids are re-numbered; padding_idx only shapes grads

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_length=0):
        uniq, local = torch.unique(input_ids.cpu(), return_inverse=True)
        local = local.to(input_ids.device)
        with self.swapper.reserve(len(uniq) * self.row_cost()):
            rows = torch.cat([self.rows(i, i + 1) for i in uniq.tolist()])
            self.inner.tokens.weight = nn.Parameter(rows, requires_grad=False)
            try:
                return self.inner(local, attention_mask, position_ids, past_length)
            finally:
                del self.inner.tokens.weight, rows


class _Rows(nn.Module):
    """The first rows of a head served in pieces, as a block of the swapper's cache."""

    def __init__(self, rows: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("rows", rows, persistent=False)


class ChunkedHead(_Piecewise):
    """An LM head that multiplies vocabulary chunks sized to the room free in the budget.

    With ``prefix``, its first rows are blocks of the swapper's cycle (:func:`prefix_id`,
    after the last layer, each no larger than the largest layer): kept when the budget has
    room, otherwise pre-loaded on the loader threads while the last layers compute -- those
    rows are then not read on the compute thread at every pass.
    """

    def __init__(self, *args: Any, prefix: Sequence[tuple[int, int]] = ()) -> None:
        super().__init__(*args)
        self.prefix = list(prefix)  # (start, stop) rows of each block, in order from 0

    @property
    def prefix_rows(self) -> int:
        return self.prefix[-1][1] if self.prefix else 0

    def load_prefix(self, part: int) -> nn.Module:
        """Block ``part`` of the first rows at the compute dtype (what the swapper's loader
        calls for ``prefix_id(head, part)``)."""
        return _Rows(self.rows(*self.prefix[part]))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        features = self.inner.features(hidden)
        vocab = self.info.shape[0]
        logits = features.new_empty(*features.shape[:-1], vocab)
        for part, (start, stop) in enumerate(self.prefix):
            rows = self.swapper.fetch(prefix_id(self.bid, part)).rows
            logits[..., start:stop] = features @ rows.T
            del rows
        first = self.prefix_rows
        cost = self.row_cost()
        # chunks sized to the room that is free now: evicting cached layers for a larger
        # chunk would have them re-read in the next pass
        chunk = max(_MIN_CHUNK_ROWS, min(vocab - first, self.swapper.free() // cost))
        path = self.pool.ensure_verified(self.src)
        width = self.info.shape[1:]
        # one read buffer (and one cast buffer) for every chunk of the pass, reserved once:
        # fresh buffers per chunk were faulted in anew each time, and a pre-load taking the
        # room between two chunks made the next one evict
        with self.swapper.reserve(chunk * cost):
            raw = empty((chunk, *width), self.info.dtype)
            same = self.info.dtype == self.dtype
            weights = raw if same else empty((chunk, *width), self.dtype)
            for start in range(first, vocab, chunk):
                n = min(vocab, start + chunk) - start
                read_rows(path, self.info, start, start + n, out=raw[:n])
                rows = raw[:n] if same else weights[:n].copy_(raw[:n])
                logits[..., start : start + n] = features @ rows.to(self.device).T
            del raw, weights
        return self.inner.cap(logits)


def prefix_id(head: str, part: int) -> str:
    """The swapper's id of block ``part`` of a chunked head's first rows."""
    return f"{head}#rows{part}"


def _limit_malloc_caching() -> None:
    """Keep glibc's heap from growing past what a budgeted run uses.

    Weights never sit in the heap (:func:`blockpool.reads.empty` gives each large buffer a
    map of its own, returned at once). glibc raises its mmap threshold after large frees,
    which lets the heap keep ever larger freed buffers; a fixed threshold at glibc's
    largest (32 MiB) stops that while activations still reuse heap memory instead of being
    faulted in afresh at every call: at 128 KiB a SmolLM2 prefill of 2,048 tokens at 25% of
    its bytes took 17.2-18.2 s, at 32 MiB 14.7-15.0 s (resident: 13.4-13.6 s), peak RSS
    within the budget either way. Freed memory at the top of the heap is returned above
    128 KiB.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
        except OSError:
            return
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 << 10)  # M_TRIM_THRESHOLD


def _chain_blocks(pool: Pool, target: str | Sequence[str | nn.Module]) -> list[str]:
    if isinstance(target, str):
        return list(pool.model(target).blocks)
    return [b for b in target if isinstance(b, str)]


def min_budget(
    pool: Pool,
    target: str | Sequence[str | nn.Module],
    dtype: torch.dtype = torch.float32,
    *,
    batch: int = 1,
    tokens: int = 1,
    cache: bool = False,
) -> int:
    """The smallest budget that runs a model (by name) or a chain on ``batch`` x ``tokens``:
    its largest layer, its pinned parts (the small tensors of an embedding and head served
    in pieces, a piece), its seams, and the working memory of that call (with ``cache``,
    the KV cache of ``tokens`` tokens too)."""
    ids = _chain_blocks(pool, target)
    layers = [block_nbytes(pool, b, dtype) for b in ids if pool.blocks[b].kind == "layer"]
    ends = [b for b in ids if pool.blocks[b].kind != "layer"]
    pinned = 0
    for b in ends:  # a packed end is held whole (its tied table once); others in pieces
        tied = tuple(n for n, r in pool.blocks[b].tied.items() if r.split(":")[0] in ends)
        skip = tied if _packed(pool, b) else (_TOKEN_TABLE, "lm_head.weight")
        pinned += block_nbytes(pool, b, dtype, skip=skip)
    width = max(pool.blocks[b].hidden_size for b in ends or ids)
    # room for a gathered or chunked piece: the read buffer (<= 4 B a weight) and its cast
    piece = _MIN_CHUNK_ROWS * width * (4 + dtype.itemsize)
    runner = _make_runner(pool, target, dtype, "cpu")
    work = runner.working_bytes(batch, tokens, 0, batch * tokens)
    kv = runner.cache_bytes(batch, tokens) if cache else 0
    return max(layers, default=0) + pinned + piece + _seam_bytes(target) + work + kv


def _make_runner(pool, target, dtype, device, fetch=None) -> ChainRunner:
    if isinstance(target, str):
        return BlockRunner(pool, target, dtype=dtype, device=device, fetch=fetch)
    return ChainRunner(pool, target, dtype=dtype, device=device, fetch=fetch)


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
    larger than ``piece_fraction`` of the budget above :func:`min_budget` is served in
    pieces; such a head's first rows, half that share, join the swapper's cycle as blocks
    (:class:`ChunkedHead`). Seams of a chain stay resident and count against the budget.

    Raises:
        UsageError: the budget is below :func:`min_budget` (the message names it).
    """

    def make() -> ChainRunner:
        return _make_runner(pool, target, dtype, device)

    if budget is None:
        return make(), None
    seams = _seam_bytes(target)
    floor = min_budget(pool, target, dtype)
    name = target if isinstance(target, str) else "the chain"
    if budget < floor:
        raise UsageError(
            f"{arg('budget')} {format_size(budget)} is below the smallest working set of {name} "
            f"({format_size(floor)}: its largest layer at {str(dtype).removeprefix('torch.')} "
            f"plus embedding, head and seam parts and one token's working memory); use "
            f"{arg('budget')} {format_size(floor)} or more"
        )
    _limit_malloc_caching()
    runner = make()
    ids = list(dict.fromkeys(runner.block_ids))
    sizes = {b: block_nbytes(pool, b, dtype) for b in ids}
    # an embedding or head is cached whole only if it takes at most ``piece_fraction`` of
    # the budget above the smallest working set (else it is served in pieces)
    slack = piece_fraction * (budget - floor)
    cached = [b for b in ids if not _piecewise(pool, b, sizes[b] > slack)]
    # A tied pair (embedding = LM head) both cached lives once: the source stays resident
    # (it runs at both ends of every pass) and the head shares its tensor.
    fixed = {
        src: None
        for b in cached
        for src in (ref.partition(":")[0] for ref in pool.blocks[b].tied.values())
        if src in cached
    }
    for b in cached:
        tied_names = tuple(
            n for n, ref in pool.blocks[b].tied.items() if ref.split(":")[0] in fixed
        )
        if tied_names:
            sizes[b] = block_nbytes(pool, b, dtype, skip=tied_names)

    # A head served in pieces gives its first rows (a quarter of the room above the
    # smallest working set) to the swapper's cycle, as blocks no larger than its largest
    # layer (so the room left for working memory beside the largest block is unchanged)
    file_bytes = {b: pool.blocks[b].bytes for b in ids}
    largest = max((sizes[b] for b in cached if b not in fixed), default=0)
    prefixes: dict[str, list[tuple[int, int]]] = {}
    for b in ids:
        if b not in cached and pool.blocks[b].kind == "head":
            src, table = _table_ref(pool, b)
            info = _header(pool, src)[table]
            cost = _row_cost(info, dtype)
            rows, step = int(slack / 2) // cost, largest // cost
            if rows < _MIN_CHUNK_ROWS or step < 1:
                continue
            prefixes[b] = [(a, min(rows, a + step)) for a in range(0, rows, step)]
            for part, (a, z) in enumerate(prefixes[b]):
                sizes[prefix_id(b, part)] = (z - a) * cost
                file_bytes[prefix_id(b, part)] = (z - a) * info.row_bytes
    order = []
    for b in runner.block_ids:
        if b in cached and b not in fixed:
            order.append(b)
        order += [prefix_id(b, part) for part in range(len(prefixes.get(b, ())))]
    parts = {prefix_id(b, i): (b, i) for b, spans in prefixes.items() for i in range(len(spans))}

    def load(bid: str) -> nn.Module:
        if bid in parts:
            head, part = parts[bid]
            return pieces[head].load_prefix(part)
        return build_block(pool, bid, runner, fixed_modules, one_buffer=True)

    swapper = BlockSwapper(
        load,
        sizes,
        file_bytes,
        order,
        budget=budget,
        policy=policy,
        depth=depth,
        pinned_bytes=seams + sum(sizes[b] for b in fixed),
    )
    fixed_modules = {b: build_block(pool, b, runner, {}) for b in fixed}
    pieces: dict[str, nn.Module] = dict(fixed_modules)
    for b in ids:
        if b not in cached:
            args = (pool, b, runner.config_of(b), dtype, swapper, runner.device)
            if pool.blocks[b].kind == "embed":
                pieces[b] = GatheredEmbed(*args)
            else:
                pieces[b] = ChunkedHead(*args, prefix=prefixes.get(b, ()))
            swapper.pin(pieces[b].pinned)
    runner.fetch = lambda b: pieces[b] if b in pieces else swapper.fetch(b)
    runner.memory = swapper  # the runner reserves its working memory out of the budget
    return runner, swapper


def _packed(pool: Pool, bid: str) -> bool:
    """Whether the block (or the table it is tied to) is quantized: the runner holds it
    packed, whole, and never reads it in pieces."""
    refs = [r.partition(":")[0] for r in pool.blocks[bid].tied.values()]
    return any(pool.blocks[b].quant for b in (bid, *refs))


def _piecewise(pool: Pool, bid: str, large: bool) -> bool:
    entry = pool.blocks[bid]
    causal = pool.family(entry.model).causal
    return large and causal and entry.kind in ("embed", "head") and not _packed(pool, bid)

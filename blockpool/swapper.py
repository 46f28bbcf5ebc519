"""A memory-budgeted block cache, so that a model larger than the budget can run.

The swapper serves runnable blocks to a :class:`~blockpool.runner.BlockRunner` (as its
``fetch``) while the bytes of resident weights (as they sit in memory: floating tensors at
the compute dtype, quantized matrices packed) never exceed the budget. Policies, each a
refinement of the one before:

- ``on-demand``: load a block when it is needed, keep nothing else.
- ``lru``: keep blocks while they fit; evict the least recently used.
- ``prefetch``: in a known (cyclic) execution order evict the block whose next use is
  farthest (Belady; blocks that run together stay together), and pre-load the next blocks
  on background threads into free room while the current block computes.
- ``prefetch+preswap``: also make room ahead of the pre-load, evicting only blocks needed
  later than the one being pre-loaded, instead of at the moment of need.

Every byte counted is reserved before it is allocated (loads in flight included), so the
budget holds under any race. Blocks are re-read and their sums re-checked at every load.
Embeddings and LM heads larger than the budget are served in pieces by
:mod:`blockpool.pieces`.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from blockpool.errors import UsageError, arg
from blockpool.sizes import format_size

if TYPE_CHECKING:
    from torch import nn

__all__ = ["DEFAULT_POLICY", "POLICIES", "BlockSwapper", "SwapStats"]

POLICIES = ("on-demand", "lru", "prefetch", "prefetch+preswap")
DEFAULT_POLICY = "prefetch+preswap"
"""The policy every command and library function uses unless told otherwise."""


@dataclass
class SwapStats:
    """Counters of one swapper; bytes are in-memory weight bytes unless said otherwise."""

    hits: int = 0
    misses: int = 0
    prefetched: int = 0
    evictions: int = 0
    bytes_read: int = 0  # file bytes read from disk
    load_seconds: float = 0.0  # wall time while at least one block was being read and built
    stall_seconds: float = 0.0  # time the compute thread waited for weights
    weights_resident_peak_bytes: int = 0  # weights only (blocks, pinned parts, pieces)
    budget_used_peak_bytes: int = 0  # weights + the run's working memory (activations, cache)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        hidden = 1.0 - self.stall_seconds / self.load_seconds if self.load_seconds else 1.0
        d["io_hidden_fraction"] = max(0.0, min(1.0, hidden))
        return d


class _Pending:
    """A load in flight: waited on by the compute thread, carries the loader's error."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None


class BlockSwapper:
    """Serve blocks within a budget.

    Args:
        load: ``block_id -> module`` (reads, verifies, builds).
        sizes: in-memory bytes of each block's weights once loaded.
        file_bytes: bytes read from disk to load each block.
        order: the execution order of one forward pass (repeated cyclically).
        budget: the most resident weight bytes.
        policy: one of :data:`POLICIES`.
        depth: how many blocks ahead the pre-loader looks.
        loaders: pre-loader threads. Two measured faster than one (SmolLM2 decoding at 25%
            of its bytes with the page cache dropped at each token: 9.5-11.0 s against
            12.9-14.1 s): while one waits for the disk, the other copies and builds.
        pinned_bytes: bytes held outside the cache for the whole run (small parts of
            blocks served in pieces); counted against the budget.

    Raises:
        UsageError: unknown policy, or a budget below the largest block plus pinned bytes.
    """

    def __init__(
        self,
        load: Callable[[str], nn.Module],
        sizes: dict[str, int],
        file_bytes: dict[str, int],
        order: Sequence[str],
        *,
        budget: int,
        policy: str = DEFAULT_POLICY,
        depth: int = 2,
        loaders: int = 2,
        pinned_bytes: int = 0,
    ) -> None:
        if policy not in POLICIES:
            raise UsageError(f"unknown swap policy {policy!r}; choose one of {', '.join(POLICIES)}")
        need = max(sizes[b] for b in order) + pinned_bytes
        if budget < need:
            raise UsageError(f"budget {budget} B is below the smallest working set ({need} B)")
        self._load, self.sizes, self.file_bytes = load, sizes, file_bytes
        self.order, self.budget, self.policy, self.depth = list(order), budget, policy, depth
        self._pos = {b: i for i, b in enumerate(self.order)}
        self._cond = threading.Condition()
        self._resident: OrderedDict[str, nn.Module] = OrderedDict()
        self._pending: dict[str, _Pending] = {}
        self._used = pinned_bytes
        self._working = 0  # of _used: activations, logits, KV caches (not weights)
        self._holds: dict[object, int] = {}
        self._current: str | None = None
        self._loading, self._busy_since = 0, 0.0  # loads in flight, since when
        self._closed = False
        self.stats = SwapStats(
            weights_resident_peak_bytes=pinned_bytes, budget_used_peak_bytes=pinned_bytes
        )
        self._worker = (
            ThreadPoolExecutor(loaders, "assy-preload") if policy.startswith("prefetch") else None
        )

    # --- the compute thread -----------------------------------------------------------
    def fetch(self, bid: str) -> nn.Module:
        """The module of ``bid``, loading it (or waiting for its pre-load) if needed."""
        start = time.perf_counter()
        with self._cond:
            self._current = bid
            module = self._resident.get(bid)
            pending = self._pending.get(bid)
            if module is not None:
                self._resident.move_to_end(bid)
                self.stats.hits += 1
            elif pending is None:
                self.stats.misses += 1
        if module is None:
            module = self._wait(bid, pending) if pending else self._load_now(bid)
            self.stats.stall_seconds += time.perf_counter() - start
        self._schedule_preloads(bid)
        return module

    def _wait(self, bid: str, pending: _Pending) -> nn.Module:
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        with self._cond:
            if bid in self._resident:
                self.stats.hits += 1
                return self._resident[bid]
        return self._load_now(bid)  # evicted between its pre-load and now

    def _load_now(self, bid: str) -> nn.Module:
        with self._cond:
            if self.policy == "on-demand":
                self._evict_all_but(bid)
            self._reserve(bid, self.sizes[bid], demand=True)
            self._pending[bid] = pending = _Pending()
        return self._finish_load(bid, pending)

    # --- loading, shared by both threads ----------------------------------------------
    def _finish_load(self, bid: str, pending: _Pending) -> nn.Module:
        with self._cond:
            if not self._loading:
                self._busy_since = time.perf_counter()
            self._loading += 1
        try:
            module = self._load(bid)
        except BaseException as e:
            with self._cond:
                self._loaded()
                self._used -= self.sizes[bid]
                del self._pending[bid]
                pending.error = e
                pending.done.set()
                self._cond.notify_all()
            raise
        with self._cond:
            self._loaded()
            self.stats.bytes_read += self.file_bytes[bid]
            self._resident[bid] = module
            del self._pending[bid]
            pending.done.set()
            self._cond.notify_all()
        return module

    def _loaded(self) -> None:
        """A load ended (lock held): count the time loads were in flight, once however
        many ran at the same time."""
        self._loading -= 1
        if not self._loading:
            self.stats.load_seconds += time.perf_counter() - self._busy_since

    def _reserve(
        self, bid: str | None, nbytes: int, *, demand: bool, working: bool = False
    ) -> bool:
        """Make room for ``nbytes`` and count them (lock held), as working memory with
        ``working``. A pre-load gives up (returns False) rather than evict a block needed
        sooner than ``bid``."""
        while self._used + nbytes > self.budget:
            victim = self._victim(bid, demand)
            if victim is not None:
                self._used -= self.sizes[victim]
                del self._resident[victim]
                self.stats.evictions += 1
            elif demand and self._pending:
                self._cond.wait()  # room held by a pre-load in flight: it lands, then goes
            elif demand:
                what = "working memory (activations of this call)" if working else "weights"
                raise UsageError(
                    f"{format_size(nbytes)} of {what} do not fit beside the "
                    f"{format_size(self._used)} held (of which {format_size(self._working)} "
                    f"working memory and KV cache) within the budget of "
                    f"{format_size(self.budget)}; raise {arg('budget')} or use shorter batches"
                )
            else:
                return False
        self._used += nbytes
        if working:
            self._working += nbytes
        self._note_peaks()
        return True

    def _note_peaks(self) -> None:
        self.stats.weights_resident_peak_bytes = max(
            self.stats.weights_resident_peak_bytes, self._used - self._working
        )
        self.stats.budget_used_peak_bytes = max(self.stats.budget_used_peak_bytes, self._used)

    def _victim(self, target: str | None, demand: bool) -> str | None:
        candidates = [b for b in self._resident if b != self._current]
        if not candidates:
            return None
        if self.policy in ("on-demand", "lru"):
            return candidates[0]  # least recently used
        cursor = self._pos.get(self._current, 0)
        n = len(self.order)

        def distance(b: str) -> int:
            return (self._pos[b] - cursor) % n or n

        victim = max(candidates, key=distance)
        if not demand and target is not None and distance(victim) <= distance(target):
            return None  # every resident block is needed before the target
        return victim

    def _evict_all_but(self, bid: str) -> None:
        for other in [b for b in self._resident if b != bid]:
            self._used -= self.sizes[other]
            del self._resident[other]
            self.stats.evictions += 1

    # --- the pre-loader ---------------------------------------------------------------
    def _schedule_preloads(self, bid: str) -> None:
        if self._worker is None or self._closed:
            return
        base = self._pos[bid]
        for k in range(1, self.depth + 1):
            target = self.order[(base + k) % len(self.order)]
            if target != bid and target not in self._resident and target not in self._pending:
                self._worker.submit(self._preload, target)

    def _preload(self, bid: str) -> None:
        with self._cond:
            if self._closed or bid in self._resident or bid in self._pending:
                return
            free = self._used + self.sizes[bid] <= self.budget
            if not free and self.policy != "prefetch+preswap":
                return  # plain pre-loading fills free room only
            if not self._reserve(bid, self.sizes[bid], demand=False):
                return
            self._pending[bid] = pending = _Pending()
            self.stats.prefetched += 1
        # A failed pre-load keeps its error on `pending`; the compute thread raises it.
        with suppress(BaseException):
            self._finish_load(bid, pending)

    # --- transient pieces and lifetime ------------------------------------------------
    @contextmanager
    def reserve(self, nbytes: int, *, working: bool = False):
        """Count ``nbytes`` for the duration of the block: transient weights (a chunk of a
        block served in pieces) or, with ``working``, the run's working memory (activations,
        attention scores, logits), evicting cached blocks to make room."""
        with self._cond:
            self._reserve(None, nbytes, demand=True, working=working)
        try:
            yield
        finally:
            with self._cond:
                self._used -= nbytes
                if working:
                    self._working -= nbytes
                self._cond.notify_all()

    def hold(self, key: object, nbytes: int) -> None:
        """Keep ``nbytes`` of working memory counted under ``key`` until :meth:`release`
        (a KV cache, set again as it grows).

        Raises:
            UsageError: it cannot fit beside the largest block (nothing is changed).
        """
        with self._cond:
            old = self._holds.get(key, 0)
            if nbytes > old:
                self._reserve(None, nbytes - old, demand=True, working=True)
            else:
                self._used -= old - nbytes
                self._working -= old - nbytes
            self._holds[key] = nbytes
            self._note_peaks()
            self._cond.notify_all()

    def release(self, key: object) -> None:
        """Stop counting what :meth:`hold` counted under ``key``."""
        with self._cond:
            nbytes = self._holds.pop(key, 0)
            self._used -= nbytes
            self._working -= nbytes
            self._cond.notify_all()

    def room(self) -> int:
        """Bytes of working memory that fit beside the largest cached block and what is
        pinned or held now (a block being pre-loaded is cached: it can be made to go)."""
        with self._cond:
            cached = [*self._resident, *self._pending]
            held = self._used - sum(self.sizes[b] for b in cached)
            return self.budget - held - max(self.sizes[b] for b in self.order)

    def reset_stats(self) -> None:
        """Zero the counters (the resident peak restarts from what is resident now)."""
        with self._cond:
            self.stats = SwapStats(
                weights_resident_peak_bytes=self._used - self._working,
                budget_used_peak_bytes=self._used,
            )

    def pin(self, nbytes: int) -> None:
        """Count ``nbytes`` held for the whole run (small parts of blocks served in pieces).

        Raises:
            UsageError: the pinned bytes leave no room for the largest cached block.
        """
        with self._cond:
            if self._used + nbytes + max(self.sizes[b] for b in self.order) > self.budget:
                raise UsageError(f"budget {self.budget} B leaves no room beside {nbytes} B pinned")
            self._used += nbytes
            self._note_peaks()

    def free(self) -> int:
        """Bytes of the budget unused now (nothing would be evicted to use them)."""
        with self._cond:
            return self.budget - self._used

    def available(self) -> int:
        """Bytes that could be made free now (budget less pinned and current weights)."""
        with self._cond:
            current = self.sizes.get(self._current, 0) if self._current in self._resident else 0
            held = self._used - sum(self.sizes[b] for b in self._resident)
            return self.budget - held - current

    def close(self) -> None:
        """Stop the pre-loader (waiting for a load in flight) and drop every block."""
        with self._cond:
            self._closed = True
        if self._worker is not None:
            self._worker.shutdown(wait=True, cancel_futures=True)
        with self._cond:
            self._resident.clear()

    def __enter__(self) -> BlockSwapper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

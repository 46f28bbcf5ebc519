"""Log-likelihood scoring of token sequences: the engine under every evaluation protocol.

A :class:`Request` is a pair of token-id sequences (context, continuation); its
:class:`Score` is the summed log-probability (nats, float32 log-softmax, float64 sum) of
the continuation given the context and whether greedy decoding would produce it — what
lm-evaluation-harness's ``loglikelihood`` returns. The model sees
``(context + continuation)[:-1]``, left-truncated to ``max_length`` tokens, as there.

Two kinds of model:

* a :class:`~blockpool.chain.ChainRunner` (a pool model or a chain, resident or through
  the swapper): the layers see at most ``batch_tokens`` tokens per call (longer inputs
  go in pieces through the KV cache) and run without their head; the head then scores
  only the hidden states of the scored positions, in groups of at most ``head_bytes`` of
  logits (:mod:`assy.evaluation.head`): never ``[B, T, V]``. Requests that share a
  context run it once:
  the contexts of a batch are prefilled into a KV cache (left-padded when every segment
  uses rotary positions, which see relative positions only; else batched by equal
  length), the first continuation token of every request is scored from its context's
  last position, and the rest of each continuation runs from a copy of its context's
  cache rows. A one-token continuation therefore costs no pass of its own.
* any callable ``model(input_ids [B, T], attention_mask [B, T]) -> logits [B, T, V]``:
  every request runs whole, right-padded, in batches sorted by length (lm-eval's HF way).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from assy.errors import UsageError, arg
from assy.evaluation.head import head_logprobs, logits_logprobs
from assy.progress import bar
from blockpool.chain import ChainCache, ChainRunner, Seam

__all__ = [
    "BATCH_TOKENS",
    "HEAD_BYTES",
    "Request",
    "Score",
    "head_group_bytes",
    "model_max_length",
    "score",
]

HEAD_BYTES = 32 * 2**20
"""Most bytes of float32 logits computed at a time (positions x vocabulary x 4); a chain
runner's default is :func:`head_group_bytes`, at most this."""

BATCH_TOKENS = 1024
"""Default most tokens through the layers per forward call (activations, KV cache). The
pass shapes decide the float32 rounding of every log-likelihood (at 512 they moved by up to
6e-5 nats): kept at 1,024, scores stay those of earlier versions, and memory is held down
instead by continuations that keep no cache (:func:`_fork`) and mapped large buffers
(:func:`_large_buffers_mapped`)."""

MIN_HEAD_BYTES = 8 * 2**20

_PAD_SLACK = 32  # padding tokens a pass may carry beyond a quarter of its real tokens
_DEFAULT_MAX_LENGTH = 2048  # lm-eval's, for models that do not say
_LENGTH_KEYS = ("n_positions", "max_position_embeddings", "n_ctx")


@dataclass(frozen=True)
class Request:
    """Score ``continuation`` given ``context`` (token ids, both non-empty)."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]


@dataclass(frozen=True)
class Score:
    """What scoring one request gives.

    Attributes:
        loglik: summed log-probability of the continuation tokens (nats).
        greedy: every continuation token is the argmax of its position's logits.
        sum_sq: sum of the squared per-token log-probabilities (for standard errors).
    """

    loglik: float
    greedy: bool
    sum_sq: float = 0.0


def model_max_length(runner: ChainRunner) -> int:
    """The most tokens a chain can attend over: the smallest limit of its models' configs
    (``n_positions``, ``max_position_embeddings`` or ``n_ctx``, as lm-eval reads them)."""
    limits = []
    for seg in runner.segments:
        config = runner.config_of(seg.block_ids[0])
        config = getattr(config, "text_config", None) or config
        value = next((getattr(config, k) for k in _LENGTH_KEYS if getattr(config, k, None)), None)
        if value:
            limits.append(int(value))
    return min(limits, default=_DEFAULT_MAX_LENGTH)


def head_group_bytes(runner: ChainRunner) -> int:
    """A chain's default bytes of logits per head call: an eighth of its head's weight
    bytes, within 8-32 MiB. The logits and their ``log_softmax`` are an evaluation's
    largest transient buffers; sized to the head they multiply with, they stay a small
    share of the model (SmolLM2-135M: 14 MiB, 71 positions; Gemma-3-270M's 262k-entry
    head: 32 MiB, 32 positions — halving those costs a pass over its 671 MB head
    per 16 positions instead of 32)."""
    from blockpool import block_nbytes

    head = block_nbytes(runner.pool, runner.block_ids[-1], runner.dtype)
    return max(MIN_HEAD_BYTES, min(HEAD_BYTES, head // 8))


def score(
    model: ChainRunner | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    requests: Sequence[Request],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    pad_id: int = 0,
    head_bytes: int | None = None,
    batch_tokens: int = BATCH_TOKENS,
    device: torch.device | str = "cpu",
    progress: bool = True,
    desc: str = "scoring",
) -> list[Score]:
    """Score every request (see the module docstring for how).

    Args:
        model: a chain runner, or ``(ids [B, T], mask [B, T]) -> logits [B, T, V]``.
        requests: the (context, continuation) pairs.
        batch_size: sequences per forward call (contexts, continuations or whole inputs).
        max_length: most tokens the model sees per request (left truncation); ``None``:
            the runner's :func:`model_max_length` (2048 for a plain callable).
        pad_id: token id of padding (masked; its value does not matter).
        head_bytes: float32 logits per head call of a runner, in bytes (``None``:
            :func:`head_group_bytes`).
        batch_tokens: tokens per forward call of a runner's layers.
        device: where a plain callable's inputs are created (a runner uses its own).
        progress: show a tqdm bar on stderr.

    Returns:
        One :class:`Score` per request, in order.

    Raises:
        UsageError: bad sizes, an empty context or continuation, or a continuation longer
            than ``max_length``.
    """
    runner = model if isinstance(model, ChainRunner) else None
    if head_bytes is None:
        head_bytes = head_group_bytes(runner) if runner is not None else HEAD_BYTES
    for name, value in (("batch_size", batch_size), ("head_bytes", head_bytes)):
        if value < 1:
            raise UsageError(f"{arg(name)} must be at least 1, got {value}")
    if batch_tokens < 1:
        raise UsageError(f"batch_tokens must be at least 1, got {batch_tokens}")
    if max_length is None:
        max_length = model_max_length(runner) if runner is not None else _DEFAULT_MAX_LENGTH
    if max_length < 1:
        raise UsageError(f"{arg('max_length')} must be at least 1, got {max_length}")
    for r in requests:
        if not r.context or not r.continuation:
            raise UsageError("every request needs a non-empty context and continuation")
        if len(r.continuation) > max_length:
            raise UsageError(
                f"a continuation of {len(r.continuation)} tokens exceeds "
                f"{arg('max_length')} {max_length}"
            )
    scores: list[Score | None] = [None] * len(requests)
    progress_bar = bar(total=len(requests), desc=desc, unit="req", disable=not progress)
    if runner is None:
        engine: _Engine = _PlainEngine(model, device, pad_id)
    else:
        engine = _RunnerEngine(runner, pad_id, batch_size, head_bytes, batch_tokens)
    with torch.inference_mode(), progress_bar, _large_buffers_mapped():
        shared, alone = engine.split(requests, max_length)
        for group in shared:
            for i, s in zip(group, engine.shared(group, requests), strict=True):
                scores[i] = s
            progress_bar.update(len(group))
        for batch in _batches(alone, requests, batch_size, batch_tokens, max_length):
            for i, s in zip(batch, engine.whole(batch, requests, max_length), strict=True):
                scores[i] = s
            progress_bar.update(len(batch))
    return [s for s in scores if s is not None]


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


_LIBC = _glibc()
_M_MMAP_THRESHOLD = -3


@contextlib.contextmanager
def _large_buffers_mapped():
    """While scoring, buffers of 1 MiB and more get a map of their own (glibc's
    ``M_MMAP_THRESHOLD``); afterwards the threshold stays fixed at 32 MiB and free heap
    pages go back to the OS (``malloc_trim``).

    A pass's activations (MiBs) are freed while the KV cache entries made beside them
    (hundreds of KiB) live on; in the heap, where glibc's rising default threshold puts
    them, each layer's activations then leave a hole the next layer's cannot reuse. An
    unbudgeted SmolLM2-135M PIQA run (n = 200) peaked 656-817 MB above the warm floor
    with the default, 620-631 MB with this (its weights: 538 MB; the target 699.5). 32 MiB
    afterwards is where glibc's own threshold ends up after large frees, and what a
    budgeted runner fixes (:mod:`blockpool.offload`); a process that is not glibc's is
    left alone.
    """
    if _LIBC is None:
        yield
        return
    _LIBC.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    try:
        yield
    finally:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        _LIBC.malloc_trim(0)


def _inputs(r: Request, max_length: int) -> list[int]:
    """lm-eval's model input of a request: ``(context + continuation)[-(L + 1):][:-1]``."""
    return list(r.context + r.continuation)[-(max_length + 1) :][:-1]


def _batches(
    indices: list[int],
    requests: Sequence[Request],
    batch_size: int,
    batch_tokens: int,
    max_length: int,
) -> list[list[int]]:
    """Whole-input batches, longest first, within ``batch_size`` rows and ``batch_tokens``."""
    order = sorted(indices, key=lambda i: -len(_inputs(requests[i], max_length)))
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size:
            widest = len(_inputs(requests[batches[-1][0]], max_length))  # sorted: the first
            if widest * (len(batches[-1]) + 1) <= batch_tokens:
                batches[-1].append(i)
                continue
        batches.append([i])
    return batches


class _Accumulator:
    """Per-row sums of target log-probabilities, their squares, and greedy misses."""

    def __init__(self, rows: int) -> None:
        self.loglik = torch.zeros(rows, dtype=torch.float64)
        self.sum_sq = torch.zeros(rows, dtype=torch.float64)
        self.missed = torch.zeros(rows, dtype=torch.bool)

    def add(self, rows: torch.Tensor, lp: torch.Tensor, hit: torch.Tensor) -> None:
        """Add the scored positions of ``rows`` (``lp``: log-probabilities, ``hit``: greedy)."""
        lp = lp.double().cpu()
        self.loglik.index_add_(0, rows, lp)
        self.sum_sq.index_add_(0, rows, lp * lp)
        self.missed[rows[~hit.cpu()]] = True

    def scores(self) -> list[Score]:
        return [
            Score(float(a), not bool(m), float(q))
            for a, m, q in zip(self.loglik, self.missed, self.sum_sq, strict=True)
        ]


def _pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[b, : len(r)] = 1
    return ids, mask


def _pad_left(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[b, width - len(r) :] = 1
    return ids, mask


def _whole_targets(batch, requests, max_length, width) -> torch.Tensor:
    """``[B, width]`` targets of whole inputs: the continuation at its last positions."""
    targets = torch.full((len(batch), width), -1, dtype=torch.long)
    for b, i in enumerate(batch):
        r = requests[i]
        end, n = len(_inputs(r, max_length)), len(r.continuation)
        targets[b, end - n : end] = torch.tensor(r.continuation)
    return targets


class _Engine:
    def split(self, requests, max_length) -> tuple[list[list[int]], list[int]]:
        """Groups of requests scored with a shared context, and requests scored whole."""
        return [], list(range(len(requests)))

    def shared(self, group: list[int], requests: Sequence[Request]) -> list[Score]:
        raise NotImplementedError

    def whole(self, batch, requests, max_length) -> list[Score]:
        raise NotImplementedError


class _PlainEngine(_Engine):
    """A plain ``(ids, mask) -> logits [B, T, V]`` callable: every request whole."""

    def __init__(self, model, device, pad_id: int) -> None:
        self.model, self.device, self.pad_id = model, device, pad_id

    def whole(self, batch, requests, max_length) -> list[Score]:
        ids, mask = _pad_right([_inputs(requests[i], max_length) for i in batch], self.pad_id)
        targets = _whole_targets(batch, requests, max_length, ids.shape[1])
        logits = self.model(ids.to(self.device), mask.to(self.device))
        if (
            not isinstance(logits, torch.Tensor)
            or logits.ndim != 3
            or logits.shape[:2] != ids.shape
        ):
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
            raise TypeError(f"model must return logits [B, T, V] for {tuple(ids.shape)}, got {got}")
        rows, cols = (targets >= 0).nonzero(as_tuple=True)
        wanted = targets[rows, cols]
        lp, top = logits_logprobs(
            logits[rows.to(logits.device), cols.to(logits.device)], wanted[:, None]
        )
        acc = _Accumulator(len(batch))
        acc.add(rows, lp[:, 0], top.cpu() == wanted)
        return acc.scores()


class _RunnerEngine(_Engine):
    """A chain runner: logits only at scored positions, bounded passes, shared contexts."""

    def __init__(self, runner: ChainRunner, pad_id, batch_size, head_bytes, batch_tokens) -> None:
        self.runner, self.pad_id, self.batch_size = runner, pad_id, batch_size
        self.head_bytes = head_bytes
        if runner.pool.blocks[runner.block_ids[-1]].kind != "head":
            raise UsageError("the chain ends without a head block: it gives no logits to score")
        self.vocab = runner.config_of(runner.block_ids[-1]).vocab_size
        self.batch_tokens = max(batch_tokens, batch_size)
        try:
            runner.new_cache()
            self.cache = True
        except UsageError:  # an encoder segment: no KV cache, inputs run whole
            self.cache = False
        self.fork = self.cache and not any(isinstance(s, Seam) for s in runner.seams)
        specs = [runner.spec_of(seg.block_ids[0]) for seg in runner.segments]
        self.left_pad = all(spec.position == "rotary" for spec in specs)

    # --- feeding tokens ----------------------------------------------------------------
    def scan(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        at: torch.Tensor,
        targets: torch.Tensor,
        cache: ChainCache | None = None,
        keep_cache: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, ChainCache | None]:
        """Feed ``ids [B, T]`` after what ``cache`` holds and score the positions ``at``.

        The layers see at most ``batch_tokens`` tokens per call (longer inputs go in
        pieces through the KV cache); the head then scores every position of ``at`` at
        once (:func:`head_logprobs`). ``mask [B, past + T]`` marks the real tokens of the
        cache and of ``ids``; ``targets [B, T, K]`` the tokens scored at each position.

        Returns:
            ``rows [N]`` (of ``at``, row-major), ``lp [N, K]``, ``argmax [N]`` and the cache.
        """
        past = mask.shape[1] - ids.shape[1]
        pieces = self._pieces(ids.shape)
        use_cache = self.cache and (keep_cache or cache is not None or len(pieces) > 1)
        hidden, rows, cols = [], [], []
        for start, end in pieces:
            out = self.runner.forward(
                ids[:, start:end],
                mask[:, : past + end],
                past_key_values=cache,
                use_cache=use_cache,
                head=False,
            )
            cache = out.past_key_values
            piece = at[:, start:end]
            r, c = piece.nonzero(as_tuple=True)
            hidden.append(out.hidden[piece.to(out.hidden.device)])
            rows.append(r)
            cols.append(c + start)
        row, col = torch.cat(rows), torch.cat(cols)
        head = self.runner.fetch(self.runner.block_ids[-1])
        memory = self.runner.memory
        if memory is None:
            lp, top = head_logprobs(
                head,
                torch.cat(hidden),
                targets[row, col],
                vocab=self.vocab,
                head_bytes=self.head_bytes,
            )
            return row, lp, top.cpu(), cache
        # within a budget a group's float32 logits and their log_softmax count against it
        # (a third of the room at most: a head served in pieces needs its chunk beside)
        group = min(self.head_bytes, max(4 * self.vocab, memory.room() // 3))
        rows_per = max(1, group // (4 * self.vocab))
        with memory.reserve(2 * rows_per * 4 * self.vocab, working=True):
            lp, top = head_logprobs(
                head, torch.cat(hidden), targets[row, col], vocab=self.vocab, head_bytes=group
            )
        return row, lp, top.cpu(), cache

    def _pieces(self, shape: torch.Size) -> list[tuple[int, int]]:
        """Column ranges of at most ``batch_tokens`` tokens (one column at the least)."""
        rows, width = shape
        if not self.cache:
            return [(0, width)]
        step = max(1, self.batch_tokens // rows)
        return [(s, min(width, s + step)) for s in range(0, width, step)]

    # --- whole inputs ------------------------------------------------------------------
    def whole(self, batch, requests, max_length) -> list[Score]:
        ids, mask = _pad_right([_inputs(requests[i], max_length) for i in batch], self.pad_id)
        targets = _whole_targets(batch, requests, max_length, ids.shape[1])
        at = targets >= 0
        rows, lp, top, _ = self.scan(ids, mask, at, targets[..., None])
        acc = _Accumulator(len(batch))
        acc.add(rows, lp[:, 0], top == targets[at])
        return acc.scores()

    # --- shared contexts ---------------------------------------------------------------
    def split(self, requests, max_length) -> tuple[list[list[int]], list[int]]:
        """Requests grouped by context, contexts batched (longest first); the requests
        whose input is truncated (their context is their own) are scored whole."""
        if not self.fork:
            return [], list(range(len(requests)))
        groups: dict[tuple[int, ...], list[int]] = {}
        alone = []
        for i, r in enumerate(requests):
            if len(r.context) + len(r.continuation) <= max_length + 1:
                groups.setdefault(r.context, []).append(i)
            else:
                alone.append(i)

        def longest(c: tuple[int, ...]) -> int:  # its longest input: lm-eval's sort key
            return len(c) + max(len(requests[i].continuation) for i in groups[c])

        batches: list[list[tuple[int, ...]]] = []
        for c in sorted(groups, key=lambda c: (-len(c) if not self.left_pad else -longest(c), c)):
            last = batches[-1] if batches else None
            if (
                last is not None
                and len(last) < self.batch_size
                and max(map(len, last)) * (len(last) + 1) <= self.batch_tokens
                and (self.left_pad or len(last[0]) == len(c))
            ):
                last.append(c)
            else:
                batches.append([c])
        return [[i for c in batch for i in groups[c]] for batch in batches], alone

    def shared(self, group: list[int], requests: Sequence[Request]) -> list[Score]:
        """Score a batch of context groups: prefill the contexts once, then continue.

        Contexts are left-padded when every segment uses rotary positions (the
        continuation's position offsets to its context stay right); otherwise the batch
        holds contexts of one length only (see :meth:`split`).
        """
        contexts = list(dict.fromkeys(requests[i].context for i in group))
        row_of = {c: b for b, c in enumerate(contexts)}
        ids, mask = _pad_left(contexts, self.pad_id)
        # every context's last position scores the first token of each of its requests
        firsts = [
            [requests[i].continuation[0] for i in group if requests[i].context == c]
            for c in contexts
        ]
        targets = torch.full((len(contexts), ids.shape[1], max(map(len, firsts))), -1)
        for b, heads in enumerate(firsts):
            targets[b, -1, : len(heads)] = torch.tensor(heads)
        at = torch.zeros_like(ids, dtype=torch.bool)
        at[:, -1] = True
        _, lp0, top0, cache = self.scan(ids, mask, at, targets, keep_cache=True)
        acc = _Accumulator(len(group))
        slot = [0] * len(contexts)
        rows = []
        for k, i in enumerate(group):
            b = row_of[requests[i].context]
            rows.append(b)
            hit = top0[b] == requests[i].continuation[0]
            acc.add(torch.tensor([k]), lp0[b, slot[b] : slot[b] + 1], hit.reshape(1))
            slot[b] += 1
        self._continue(group, requests, torch.tensor(rows), mask, cache, acc)
        return acc.scores()

    def _continue(self, group, requests, rows, ctx_mask, cache, acc: _Accumulator) -> None:
        """Score continuation tokens 2.. of every request from its context's cache rows.

        Rows go longest first, as many per call as keep (context + continuation) tokens
        within ``batch_tokens`` (the copied cache rows and the attention they take).
        """
        longer = [k for k, i in enumerate(group) if len(requests[i].continuation) > 1]
        longer.sort(key=lambda k: -len(requests[group[k]].continuation))
        past = ctx_mask.shape[1]
        packs: list[list[int]] = []
        real = 0
        for k in longer:
            n = len(requests[group[k]].continuation) - 1
            if packs:
                width = len(requests[group[packs[-1][0]]].continuation) - 1
                count = len(packs[-1]) + 1
                padding = count * width - real - n
                if (
                    count * (past + width) <= self.batch_tokens
                    and padding <= _PAD_SLACK + real // 4
                ):
                    packs[-1].append(k)
                    real += n
                    continue
            packs.append([k])
            real = n
        for pack in packs:
            conts = [requests[group[k]].continuation for k in pack]
            ids, cont_mask = _pad_right([c[:-1] for c in conts], self.pad_id)
            targets = torch.full_like(ids, -1)
            for b, c in enumerate(conts):
                targets[b, : len(c) - 1] = torch.tensor(c[1:])
            pick = rows[pack]
            mask = torch.cat([ctx_mask[pick], cont_mask], 1)
            at = targets >= 0
            fork = _fork(cache, pick, keep=len(self._pieces(ids.shape)) > 1)
            r, lp, top, _ = self.scan(ids, mask, at, targets[..., None], cache=fork)
            acc.add(torch.tensor(pack)[r], lp[:, 0], top == targets[at])


def _fork(cache: ChainCache, rows: torch.Tensor, keep: bool = True) -> ChainCache:
    """A new chain cache holding ``rows`` of ``cache`` (the original stays as it was).

    ``keep=False``, for a single pass whose cache is thrown away after it: each layer
    copies its rows only when its attention asks, and keeps neither them nor what the pass
    appends — the same keys and values, computed the same way, but one layer's at a time
    rather than every layer's context copy and continuation at once (for a pack of
    1,024 tokens through SmolLM2-135M's 30 layers, ~47 MB each).
    """
    caches = []
    for c in cache.caches:
        if c is None:
            caches.append(None)
            continue
        at = rows.to(_cache_device(c))
        new = copy.copy(c)
        if keep:
            new.layers = [copy.copy(layer) for layer in c.layers]
            new.batch_select_indices(at)
        else:
            new.layers = [_passing(layer, at) for layer in c.layers]
        caches.append(new)
    forked = ChainCache(caches, [{} for _ in cache.seam_states])
    forked.length = cache.length
    return forked


def _passing(layer, rows: torch.Tensor):
    """A view of a cache layer whose ``update`` returns ``rows`` of its keys and values
    with the new ones appended (what a forked layer's update returns) and stores nothing."""
    view = copy.copy(layer)
    view.update = functools.partial(_update_rows, layer, rows)
    return view


def _update_rows(layer, rows: torch.Tensor, key_states, value_states, *args, **kwargs):
    own = copy.copy(layer)
    own.batch_select_indices(rows)
    return own.update(key_states, value_states, *args, **kwargs)


def _cache_device(cache) -> torch.device:
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if isinstance(keys, torch.Tensor):
            return keys.device
    return torch.device("cpu")

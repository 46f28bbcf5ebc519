"""Run a chain of blocks: one model's, or segments of several models joined by seams.

A *chain* is an ordered list whose items are block ids of a pool or seam modules::

    [embed, layer, layer, seam, layer, layer, head]

It starts with an embedding block and may end with a head block. Consecutive blocks of one
model with increasing layer indices form a *segment*; a segment keeps its own family,
config, positions (rotary or absolute), attention masks and KV cache, so layers of
SmolLM2 and Gemma3 run in one chain, token by token included. A seam (any ``nn.Module``
mapping ``[B, T, d_src] -> [B, T, d_dst]``; a :class:`Seam` also receives the
:class:`SeamContext`) sits where the hidden stream passes from one model to another.

The runner owns what transformers' top-level model classes do between layers: position
ids, the rotary embeddings, the masks (causal, sliding-window or bidirectional) and the
cache. When any segment is causal, every segment runs causally (an encoder's layers in a
causal chain get a causal mask). Blocks come from ``fetch(block_id) -> nn.Module``, so a
swapper can serve them within a budget; by default each block is built once and kept.

Public ways in, besides :meth:`ChainRunner.forward`:

- :meth:`ChainRunner.observe`: a hook that sees what enters and leaves every block
  (capture, calibration, sensitivity);
- :meth:`ChainRunner.layer_kwargs` and :meth:`ChainRunner.run_block`: run one block on its
  own with the context the chain would give it (sequential pruning, replays);
- ``logits_at``: the head computes logits only at the positions asked for;
- :class:`ChainModule`: a trainable ``nn.Module`` view of the chain (LoRA, adapters).
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from blockpool.errors import UsageError, arg
from blockpool.families import FamilySpec, import_object
from blockpool.pool import Pool
from blockpool.quant.packed import (
    PackedWeight,
    packed_matrices,
    packed_weight_of,
    transient_bytes,
)
from blockpool.sizes import format_size as format_bytes

__all__ = [
    "BlockCall",
    "ChainCache",
    "ChainModule",
    "ChainRunner",
    "RunOutput",
    "Seam",
    "SeamContext",
    "Segment",
    "layer_output",
]


def layer_output(out: Any) -> torch.Tensor:
    """The hidden states of a layer's return value (some transformers layers return tuples)."""
    return out[0] if isinstance(out, tuple) else out


@dataclass
class RunOutput:
    """What one forward pass returns.

    Attributes:
        logits: ``[B, T, V]`` for decoders (``[N, V]`` with ``logits_at``), ``None`` for
            encoders or without a head.
        hidden: ``[B, T, d]`` hidden states after the last layer (before the final norm).
        pooled: ``[B, d]`` encoder pooler output, when the chain ends in a pooler.
        past_key_values: the :class:`ChainCache`, when ``use_cache``.
    """

    logits: torch.Tensor | None
    hidden: torch.Tensor
    pooled: torch.Tensor | None = None
    past_key_values: Any = None


@dataclass(frozen=True)
class BlockCall:
    """One block's call, as an observer sees it.

    Attributes:
        block_id: the block's id (``seam:<k>`` for the seam before segment ``k``).
        kind: ``embed``, ``layer``, ``head`` or ``seam``.
        position: the item's index in the chain.
        segment: the index of the segment it belongs to (a seam: the segment it leads into).
        inputs: what entered: token ids ``[B, T]`` (embed) or hidden states ``[B, T, d]``.
        output: what left: hidden states, or the head's logits / pooled output.
        attention_mask: the ``[B, past + T]`` padding mask of the pass (``None``: all real).
        kwargs: the keyword arguments a layer received (masks, positions, cache).
    """

    block_id: str
    kind: str
    position: int
    segment: int
    inputs: torch.Tensor
    output: torch.Tensor
    attention_mask: torch.Tensor | None
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SeamContext:
    """What a :class:`Seam` may need besides the hidden states.

    Attributes:
        attention_mask: ``[B, past + T]`` padding mask, ``None`` for all real tokens.
        position_ids: ``[1, T]`` positions of the tokens of this call.
        past_length: tokens seen in earlier calls (KV-cached generation).
        state: a dict the seam may keep across the calls of one generation (its own cache);
            empty and fresh for a call without a cache.
    """

    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor
    past_length: int
    state: dict[str, Any]


class Seam(nn.Module):
    """Base of seam modules that take the :class:`SeamContext`: ``forward(hidden, context)``.

    A plain ``nn.Module`` (``nn.Identity``, ``nn.Linear``) also serves as a seam; it is
    called with the hidden states only.
    """

    def forward(self, hidden: torch.Tensor, context: SeamContext) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class Segment:
    """A run of blocks of one model inside a chain.

    Attributes:
        model: the model's name in the pool.
        positions: indices of its blocks in the chain's item list.
        block_ids: its block ids, in order.
        layer_indices: the model's layer index of each layer block (``[]`` if none).
        seam: the chain position of the seam leading into it, ``None`` if none.
    """

    model: str
    positions: tuple[int, ...]
    block_ids: tuple[str, ...]
    layer_indices: tuple[int, ...]
    seam: int | None


class ChainCache:
    """The KV cache of a chain: one transformers cache per causal segment, plus seam state."""

    def __init__(self, caches: list[Any], seam_states: list[dict[str, Any]]) -> None:
        self.caches = caches
        self.seam_states = seam_states
        self.length = 0
        self.held = 0  # bytes counted against a budget for it

    def get_seq_length(self) -> int:
        """Tokens seen so far."""
        return self.length


_CACHE_KEYWORDS: dict[type, str] = {}


def _cache_keyword(spec: FamilySpec, layer_class: type) -> str:
    """The keyword under which this transformers version's layer takes the KV cache."""
    if spec.cache_kwarg:
        return spec.cache_kwarg
    if layer_class not in _CACHE_KEYWORDS:
        params = inspect.signature(layer_class.forward).parameters
        _CACHE_KEYWORDS[layer_class] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KEYWORDS[layer_class]


class ChainRunner:
    """Run a chain of pool blocks (and seams) as one model.

    Args:
        pool: the open pool.
        chain: block ids and seam modules, embedding first (see the module docstring).
        dtype: compute dtype (weights are cast to it at load).
        device: where blocks, positions, masks and caches live (``cpu``, ``cuda:0``, ``mps``).
        attn_implementation: ``"sdpa"`` (default) or ``"eager"``.
        fetch: ``block_id -> module``; default: build each block once and keep it.

    Raises:
        UsageError: a chain that does not start with an embedding, a head that is not
            last, unknown block ids, or hidden sizes that differ where no seam stands.
    """

    def __init__(
        self,
        pool: Pool,
        chain: Sequence[str | nn.Module],
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        attn_implementation: str = "sdpa",
        fetch: Callable[[str], nn.Module] | None = None,
    ) -> None:
        self.pool = pool
        self.dtype = dtype
        self.device = torch.device(device)
        self.items: list[str | nn.Module] = list(chain)
        self.block_ids: list[str] = [b for b in self.items if isinstance(b, str)]
        self._check_items()
        self.segments: list[Segment] = _segments(pool, self.items)
        self._configs = {s.model: pool.config(s.model, attn_implementation) for s in self.segments}
        self._specs = {s.model: pool.family(s.model) for s in self.segments}
        self._segment_of = {p: k for k, s in enumerate(self.segments) for p in s.positions}
        self.seams = nn.ModuleList(
            [m.to(self.device) for m in self.items if isinstance(m, nn.Module)]
        )
        self.is_causal = any(spec.causal for spec in self._specs.values())
        self.rotary = nn.ModuleDict()  # per model, built once; ChainModule registers it
        self._rotary_key: dict[str, str] = {}
        for model, spec in self._specs.items():
            if spec.rotary_class:
                key = str(len(self._rotary_key))
                self._rotary_key[model] = key
                self.rotary[key] = import_object(spec.rotary_class)(config=self._configs[model])
        self.rotary.to(self.device)
        self._check_widths()
        self._built: dict[str, nn.Module] = {}
        self.fetch: Callable[[str], nn.Module] = fetch or self.build
        self._observers: dict[int, Callable[[BlockCall], None]] = {}
        self._standalone: dict[tuple, dict[str, dict[str, Any]]] = {}
        self.memory: Any = None  # a swapper: working memory is reserved out of its budget
        self._matrices: list[tuple[tuple[int, int], str, bool]] | None = None

    # --- description ------------------------------------------------------------------
    def _check_items(self) -> None:
        blocks = self.pool.blocks
        for i, item in enumerate(self.items):
            if isinstance(item, nn.Module):
                continue
            if not isinstance(item, str) or item not in blocks:
                raise UsageError(f"chain[{i}]: no block {item!r} in pool {self.pool.root}")
            kind = blocks[item].kind
            if kind == "embed" and i != 0:
                raise UsageError(f"chain[{i}]: embedding block {item} must come first")
            if kind == "head" and i != len(self.items) - 1:
                raise UsageError(f"chain[{i}]: head block {item} must come last")
        if not self.items or not isinstance(self.items[0], str):
            raise UsageError("a chain starts with an embedding block")
        if blocks[self.items[0]].kind != "embed":
            raise UsageError(f"chain[0]: {self.items[0]} is not an embedding block")

    def _check_widths(self) -> None:
        previous = None
        for seg in self.segments:
            width = self._configs[seg.model].hidden_size
            if previous is not None and seg.seam is None and width != previous[1]:
                raise UsageError(
                    f"chain[{seg.positions[0]}]: {seg.model} (hidden {width}) follows "
                    f"{previous[0]} (hidden {previous[1]}) with no seam between them; "
                    "put a seam module (an adapter) there"
                )
            previous = (seg.model, width)

    def config_of(self, bid: str) -> Any:
        """The transformers config that block ``bid`` is built and run with."""
        return self._configs[self.pool.blocks[bid].model]

    def spec_of(self, bid: str) -> FamilySpec:
        return self._specs[self.pool.blocks[bid].model]

    def build(self, bid: str) -> nn.Module:
        """The block's module, built once at the runner's dtype on its device, then kept; a
        tied LM head shares its embedding's tensor (tied weights are held once)."""
        if bid not in self._built:
            self._built[bid] = build_block(self.pool, bid, self, self._built)
        return self._built[bid]

    # --- observers --------------------------------------------------------------------
    def observe(self, fn: Callable[[BlockCall], None]) -> _Handle:
        """Call ``fn(BlockCall)`` after every block (and seam) of every pass.

        Returns:
            A handle; ``handle.remove()`` (or leaving ``with handle:``) stops the calls.
        """
        key = max(self._observers, default=-1) + 1
        self._observers[key] = fn
        return _Handle(self._observers, key)

    def _notify(self, bid, kind, position, inputs, output, mask, kwargs=None) -> None:
        if self._observers:
            segment = self._segment_of.get(position)
            if segment is None:  # a seam leads into the next block's segment
                segment = self._segment_of[position + 1]
            call = BlockCall(bid, kind, position, segment, inputs, output, mask, kwargs or {})
            for fn in list(self._observers.values()):
                fn(call)

    # --- per-segment context ----------------------------------------------------------
    def _segment_kwargs(
        self,
        k: int,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        cache: Any,
        use_cache: bool,
    ) -> dict[str, dict[str, Any]]:
        """Per attention type, the keyword arguments every layer of segment ``k`` receives."""
        from transformers.masking_utils import (
            create_bidirectional_mask,
            create_causal_mask,
            create_sliding_window_causal_mask,
        )

        seg = self.segments[k]
        config, spec = self._configs[seg.model], self._specs[seg.model]
        types = {spec.layer_type(config, i) for i in seg.layer_indices}
        if not self.is_causal:
            mask = create_bidirectional_mask(
                config=config, inputs_embeds=hidden, attention_mask=attention_mask
            )
            return {t: {"attention_mask": mask} for t in types}
        makers = {
            "full_attention": create_causal_mask,
            "sliding_attention": create_sliding_window_causal_mask,
        }
        result: dict[str, dict[str, Any]] = {}
        for t in types:
            first = next(i for i in seg.layer_indices if spec.layer_type(config, i) == t)
            mask = makers[t](
                config=config,
                inputs_embeds=hidden,
                attention_mask=attention_mask,
                cache=cache,
                position_ids=position_ids,
                layer_idx=first if cache is not None else None,
                # an encoder's layer attends bidirectionally unless given a real mask
                allow_is_causal_skip=spec.causal,
            )
            if not spec.causal:
                result[t] = {"attention_mask": mask}
                continue
            layer_class = import_object(spec.layer_class)
            kw: dict[str, Any] = {
                "attention_mask": mask,
                "position_ids": position_ids,
                _cache_keyword(spec, layer_class): cache,
                "use_cache": use_cache,
            }
            if seg.model in self._rotary_key:
                rotary = self.rotary[self._rotary_key[seg.model]]
                args = (
                    (hidden, position_ids, t)
                    if spec.rotary_per_layer_type
                    else (hidden, position_ids)
                )
                kw["position_embeddings"] = rotary(*args)
            result[t] = kw
        return result

    def _layer_type(self, k: int, index: int) -> str:
        model = self.segments[k].model
        return self._specs[model].layer_type(self._configs[model], index)

    def _segment_index(self, bid: str) -> int:
        for k, seg in enumerate(self.segments):
            if bid in seg.block_ids:
                return k
        raise UsageError(f"block {bid} is not in this chain")

    def layer_kwargs(
        self,
        bid: str,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """The keyword arguments layer block ``bid`` takes for ``hidden [B, T, d]`` run alone.

        Positions start at 0 and no cache is involved (a full-sequence pass); masks follow
        ``attention_mask`` (``None``: every token real). Results are memoized per shape
        when ``attention_mask`` is ``None``.
        """
        k = self._segment_index(bid)
        index = self.pool.blocks[bid].index
        layer_type = self._layer_type(k, index)
        key = (k, tuple(hidden.shape[:2]), hidden.dtype, hidden.device)
        if attention_mask is None and key in self._standalone:
            return self._standalone[key][layer_type]
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        by_type = self._segment_kwargs(k, hidden, attention_mask, positions, None, False)
        if attention_mask is None:
            if len(self._standalone) > 64:
                self._standalone.clear()
            self._standalone[key] = by_type
        return by_type[layer_type]

    def run_block(
        self,
        bid: str,
        x: torch.Tensor,
        *,
        module: nn.Module | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run one block alone, with the context the chain gives it in a full pass.

        Args:
            bid: a block id of the chain.
            x: token ids ``[B, T]`` (embedding) or hidden states ``[B, T, d]``.
            module: run this module instead of the block's own (a quantized or pruned
                variant of it, a module being pruned); default: ``fetch(bid)``.
            attention_mask: ``[B, T]`` padding mask, ``None`` for all real tokens.

        Returns:
            The block's output as a tensor.
        """
        module = module if module is not None else self.fetch(bid)
        kind = self.pool.blocks[bid].kind
        if kind == "embed":
            positions = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
            return module(x, attention_mask, positions, 0)
        if kind == "head":
            return module(x)
        return layer_output(module(x, **self.layer_kwargs(bid, x, attention_mask)))

    # --- working memory -----------------------------------------------------------------
    def _dims(self, model: str) -> tuple[int, int, int, int, int]:
        """(hidden, intermediate, heads, kv heads, head dim) of a segment's model."""
        c = self._configs[model]
        d = c.hidden_size
        ffn = getattr(c, "intermediate_size", None) or getattr(c, "ffn_dim", None) or 4 * d
        heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head", 1)
        kv = getattr(c, "num_key_value_heads", None) or heads
        head_dim = getattr(c, "head_dim", None) or d // heads
        return d, ffn, heads, kv, head_dim

    def working_bytes(self, batch: int, length: int, past: int = 0, logit_rows: int = 0) -> int:
        """An upper bound of the memory one forward call needs besides weights and cache.

        The largest layer call dominates: hidden states and their norm (4 x d), q/k/v and
        their rotated and grouped-query copies, the MLP's intermediates (4 x ffn), keys and
        values repeated over ``past + length``, the mask; with eager attention also the
        scores and their softmax (sdpa computes them blockwise). All at the compute dtype,
        at least 4 bytes (masks and softmax run in float32); plus the logits of
        ``logit_rows`` positions twice (the head's output and its log-softmax). Measured
        on SmolLM2 and Gemma-3 at 512 and 2,048 tokens on the CPU, the real peak is about
        half of this bound.
        """
        size = max(self.dtype.itemsize, 4)
        keys = past + length
        largest = 0
        for seg in self.segments:
            d, ffn, heads, kv, hd = self._dims(seg.model)
            tokens = batch * length
            per_layer = (
                tokens * (4 * d + 4 * ffn + (2 * heads + 2 * kv) * hd)
                + batch * keys * 2 * heads * hd  # keys/values repeated for grouped queries
                + batch * length * keys  # the mask
            )
            if getattr(self._configs[seg.model], "_attn_implementation", "sdpa") == "eager":
                per_layer += batch * heads * length * keys * 2  # scores and their softmax
            largest = max(largest, per_layer)
        # logits come from the head's model only (an assembly may run layers of a model
        # with a far larger vocabulary: Gemma3's 262,144 in a SmolLM2 chain of 49,152)
        last = self.items[-1]
        if isinstance(last, str) and self.pool.blocks[last].kind == "head":
            vocab = getattr(self._configs[self.pool.blocks[last].model], "vocab_size", 0) or 0
        else:
            vocab = max(getattr(c, "vocab_size", 0) or 0 for c in self._configs.values())
        return (largest + 2 * logit_rows * vocab) * size + self.dequant_bytes(batch * length)

    def dequant_bytes(self, tokens: int) -> int:
        """Memory the dequantization of packed weights takes during a call of ``tokens``
        tokens: the largest matrix (or chunk of one) dequantized at once, or the rows of the
        tokens present gathered from a packed embedding."""
        if self._matrices is None:
            self._matrices = packed_matrices(self.pool, self.block_ids)
        return max(
            (
                max(
                    transient_bytes(shape, precision, self.dtype),
                    transient_bytes(shape, precision, self.dtype, rows=tokens) if embed else 0,
                )
                for shape, precision, embed in self._matrices
            ),
            default=0,
        )

    def cache_bytes(self, batch: int, tokens: int) -> int:
        """Bytes of the KV cache of ``tokens`` tokens (sliding layers capped at their window)."""
        total = 0
        for seg in self.segments:
            config, spec = self._configs[seg.model], self._specs[seg.model]
            _, _, _, kv, hd = self._dims(seg.model)
            window = getattr(config, "sliding_window", None) or tokens
            for index in seg.layer_indices:
                sliding = spec.layer_type(config, index) == "sliding_attention"
                kept = min(tokens, window) if sliding else tokens
                total += 2 * batch * kv * kept * hd * self.dtype.itemsize
        return total

    def _check_fits(self, work: int, batch: int, length: int, past: int, rows: int) -> None:
        room = self.memory.room()
        if work <= room:
            return
        fits = max(
            (t for t in range(1, length + 1) if self.working_bytes(batch, t, past, rows) <= room),
            default=0,
        )
        raise UsageError(
            f"a forward call of {batch} x {length} tokens needs about {format_bytes(work)} of "
            f"working memory (activations, attention, logits), but the {arg('budget')} leaves "
            f"{format_bytes(max(room, 0))} beside the largest block; "
            + (f"at most {batch} x {fits} tokens fit: " if fits else "")
            + f"use a smaller {arg('batch_size')}, shorter inputs, or a larger {arg('budget')}"
        )

    def _hold_cache(self, cache: ChainCache, batch: int, tokens: int) -> None:
        need = self.cache_bytes(batch, tokens)
        held = cache.held
        if need - held > self.memory.room():
            per_token = max(self.cache_bytes(batch, 1), 1)
            raise UsageError(
                f"generation stopped: a KV cache of {tokens} tokens needs "
                f"{format_bytes(need)}, beyond what the {arg('budget')} leaves "
                f"(about {(held + self.memory.room()) // per_token} tokens fit); "
                f"raise {arg('budget')} or generate fewer tokens"
            )
        key = id(cache)
        self.memory.hold(key, need)
        if not held:
            weakref.finalize(cache, self.memory.release, key)
        cache.held = need

    # --- the pass ---------------------------------------------------------------------
    def new_cache(self) -> ChainCache:
        """An empty cache for token-by-token generation through this chain."""
        from transformers import DynamicCache

        caches = []
        for seg in self.segments:
            spec = self._specs[seg.model]
            if seg.layer_indices and not spec.causal:
                raise UsageError(
                    f"segment {seg.model} is an encoder ({spec.name}); its layers cannot run "
                    "with a KV cache: score whole sequences instead"
                )
            caches.append(
                DynamicCache(config=self._configs[seg.model]) if seg.layer_indices else None
            )
        return ChainCache(caches, [{} for _ in self.segments])

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Logits ``[B, T, V]`` (decoders) or last hidden states ``[B, T, d]`` (encoders)."""
        out = self.forward(input_ids, attention_mask)
        return out.logits if out.logits is not None else out.hidden

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        past_key_values: ChainCache | None = None,
        use_cache: bool = False,
        head: bool = True,
        logits_at: torch.Tensor | None = None,
    ) -> RunOutput:
        """Run the chain: embedding, layers (and seams), head.

        Args:
            input_ids: ``[B, T]`` token ids (moved to the runner's device).
            attention_mask: ``[B, past + T]`` 1 for real tokens, 0 for padding; ``None`` for all.
            past_key_values: the :class:`ChainCache` of an earlier call.
            use_cache: create (or extend) a cache for token-by-token generation.
            head: run the head; ``False`` returns the last hidden states only.
            logits_at: ``[B, T]`` bool: compute logits only where True, returned as
                ``[N, V]`` in row-major order (the head is the largest matrix of a small
                model with a large vocabulary: score only what is needed).
        """
        run = dict(past_key_values=past_key_values, use_cache=use_cache, head=head)
        if self.memory is None:
            return self.walk(self.fetch, input_ids, attention_mask, logits_at=logits_at, **run)
        batch, length = input_ids.shape
        past = past_key_values.length if past_key_values is not None else 0
        rows = int(logits_at.sum()) if logits_at is not None else batch * length if head else 0
        work = self.working_bytes(batch, length, past, rows)
        self._check_fits(work, batch, length, past, rows)
        if use_cache:
            run["past_key_values"] = past_key_values or self.new_cache()
            self._hold_cache(run["past_key_values"], batch, past + length)
        with self.memory.reserve(work, working=True):
            return self.walk(self.fetch, input_ids, attention_mask, logits_at=logits_at, **run)

    def walk(
        self,
        get: Callable[[str], nn.Module],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        past_key_values: ChainCache | None = None,
        use_cache: bool = False,
        head: bool = True,
        logits_at: torch.Tensor | None = None,
        device: torch.device | None = None,
    ) -> RunOutput:
        """:meth:`forward` with blocks from ``get`` and gradients left as the caller has them
        (what :class:`ChainModule` runs); ``device``: where inputs go (default: the runner's)."""
        device = device if device is not None else self.device
        input_ids = input_ids.to(device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(device)
        cache = past_key_values
        if use_cache and cache is None:
            cache = self.new_cache()
        past = cache.length if cache is not None else 0
        length = input_ids.shape[1]
        positions = torch.arange(past, past + length, device=device).unsqueeze(0)
        hidden: torch.Tensor = input_ids
        head_out = None
        seams = iter(self.seams)
        for k, seg in enumerate(self.segments):
            if seg.seam is not None:
                hidden = self._run_seam(
                    next(seams), seg.seam, hidden, attention_mask, positions, past, cache, k
                )
            seg_cache = cache.caches[k] if cache is not None else None
            by_type: dict[str, dict[str, Any]] | None = None
            layer = iter(seg.layer_indices)
            for position, bid in zip(seg.positions, seg.block_ids, strict=True):
                kind = self.pool.blocks[bid].kind
                if kind == "head" and not head:
                    break
                module = get(bid)
                if kind == "embed":
                    out = module(hidden, attention_mask, positions, past)
                    self._notify(bid, kind, position, hidden, out, attention_mask)
                elif kind == "layer":
                    if by_type is None:
                        by_type = self._segment_kwargs(
                            k, hidden, attention_mask, positions, seg_cache, use_cache
                        )
                    kwargs = by_type[self._layer_type(k, next(layer))]
                    out = layer_output(module(hidden, **kwargs))
                    self._notify(bid, kind, position, hidden, out, attention_mask, kwargs)
                else:
                    source = hidden if logits_at is None else hidden[logits_at.to(device)]
                    head_out = module(source)
                    self._notify(bid, kind, position, source, head_out, attention_mask)
                    break
                # drop the reference before the next fetch: a swapper may evict this block
                # to make room, and its memory must go then, not after the next one loads
                hidden, out, module = out, None, None
        if cache is not None:
            cache.length = past + length
        if head_out is None or self.is_causal:
            return RunOutput(head_out, hidden, past_key_values=cache)
        return RunOutput(None, hidden, pooled=head_out)

    def _run_seam(self, seam, position, hidden, mask, positions, past, cache, k) -> torch.Tensor:
        if isinstance(seam, Seam):
            state = cache.seam_states[k] if cache is not None else {}
            out = seam(hidden, SeamContext(mask, positions, past, state))
        else:
            out = seam(hidden)
        self._notify(f"seam:{k}", "seam", position, hidden, out, mask)
        return out


class _Handle:
    def __init__(self, registry: dict[int, Any], key: int) -> None:
        self.registry, self.key = registry, key

    def remove(self) -> None:
        self.registry.pop(self.key, None)

    def __enter__(self) -> _Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def tied_sources(
    pool: Pool, bid: str, built: Mapping[str, nn.Module]
) -> dict[str, torch.Tensor | PackedWeight]:
    """``"<block>:<name>"`` -> the tensor (or packed weight), for the weights ``bid`` is
    tied to that live in one of the ``built`` modules."""
    shared = {}
    for ref in pool.blocks[bid].tied.values():
        src, _, name = ref.partition(":")
        if src in built:
            owner = built[src].get_submodule(name.rpartition(".")[0])
            packed = packed_weight_of(owner)
            shared[ref] = packed if packed is not None else built[src].get_parameter(name)
    return shared


def build_block(
    pool: Pool,
    bid: str,
    runner: ChainRunner,
    built: Mapping[str, nn.Module],
    *,
    packed: bool = True,
    one_buffer: bool = False,
) -> nn.Module:
    """Block ``bid``'s module at the runner's dtype on its device, sharing tied weights with
    the ``built`` modules; quantized matrices stay packed unless ``packed`` is false (code
    that trains or rewrites the weights themselves); ``one_buffer``: see
    :meth:`~blockpool.pool.Pool.build_module` (blocks loaded again and again)."""
    module = pool.build_module(
        bid,
        dtype=runner.dtype,
        config=runner.config_of(bid),
        shared=tied_sources(pool, bid, built),
        packed=packed,
        one_buffer=one_buffer,
    )
    return module.to(runner.device)


def _segments(pool: Pool, items: Sequence[str | nn.Module]) -> list[Segment]:
    """Split a chain into segments: a new one at a seam, a model change or a repeated layer."""
    groups: list[dict[str, Any]] = []
    seam: int | None = None
    for position, item in enumerate(items):
        if isinstance(item, nn.Module):
            seam = position
            continue
        entry = pool.blocks[item]
        current = groups[-1] if groups else None
        index = entry.index if entry.kind == "layer" else None
        new = (
            current is None
            or seam is not None
            or current["model"] != entry.model
            or (index is not None and current["layers"] and current["layers"][-1] >= index)
        )
        if new:
            current = {
                "model": entry.model,
                "positions": [],
                "ids": [],
                "layers": [],
                "seam": seam,
            }
            groups.append(current)
            seam = None
        current["positions"].append(position)
        current["ids"].append(item)
        if index is not None:
            current["layers"].append(index)
    if seam is not None:
        raise UsageError(f"chain[{seam}]: a seam must be followed by a block")
    return [
        Segment(g["model"], tuple(g["positions"]), tuple(g["ids"]), tuple(g["layers"]), g["seam"])
        for g in groups
    ]


class ChainModule(nn.Module):
    """A chain as one trainable ``nn.Module``: its blocks built and held, gradients kept.

    Layer ``i`` of the chain (counting layer blocks only) is ``layers.<i>``; seams are
    ``seams.<k>``; ``embed`` and ``head`` hold the ends. Wrap it with peft, or train the
    seams with the blocks frozen.

    ``forward(input_ids [B, T], attention_mask [B, T] | None, logits_at [B, T] | None)``
    returns the head's output (logits ``[B, T, V]`` for decoders -- ``[N, V]`` at the
    positions ``logits_at`` marks, as :meth:`ChainRunner.forward` --, pooled ``[B, d]`` for
    encoders), or the last hidden states when the chain has no head.
    """

    def __init__(self, runner: ChainRunner) -> None:
        super().__init__()
        pool = runner.pool
        self._runner = runner
        self.block_ids = list(runner.block_ids)
        kinds = [pool.blocks[b].kind for b in self.block_ids]

        built: dict[str, nn.Module] = {}  # a block repeated in the chain is one module
        for bid in self.block_ids:
            if bid not in built:  # dense: peft wraps and merges into the weights themselves
                built[bid] = build_block(pool, bid, runner, built, packed=False)
        self._by_id = built
        self.embed = built[self.block_ids[0]]
        self.layer_ids = [b for b, k in zip(self.block_ids, kinds, strict=True) if k == "layer"]
        self.layers = nn.ModuleList(built[b] for b in self.layer_ids)
        self.seams = runner.seams
        self.head = built[self.block_ids[-1]] if kinds[-1] == "head" else None
        self.rotary = runner.rotary  # registered so that .to(device) moves its buffers

    @property
    def runner(self) -> ChainRunner:
        return self._runner

    def inference_runner(self) -> ChainRunner:
        """The chain's runner over this module's own blocks, with their current weights
        (after training, a merge or an update written in): scored as any runner (positions-only
        head, shared contexts, :mod:`assy.evaluation`) with no second copy of the weights."""
        self._runner.fetch = self._by_id.__getitem__
        return self._runner

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        device = next(self.embed.parameters()).device
        out = self._runner.walk(
            self._by_id.__getitem__, input_ids, attention_mask, device=device, logits_at=logits_at
        )
        if out.pooled is not None:
            return out.pooled
        return out.logits if out.logits is not None else out.hidden

    def block_state(self, bid: str) -> dict[str, torch.Tensor]:
        """The current tensors of block ``bid`` by their names inside the block."""
        return self._by_id[bid].state_dict()

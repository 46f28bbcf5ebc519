"""The assembled chain: its items, running parts of it, and its stream at any position.

A chain is what :class:`blockpool.ChainRunner` runs: pool block ids with an
:class:`~assy.assembly.adapter.ElasticAdapter` at every seam. *Depth* ``k`` of a model is
the state entering its layer ``k`` (its number of layers: the last layer's output).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from assy.assembly.adapter import ElasticAdapter
from assy.assembly.calibration import Windows
from assy.assembly.recipe import Recipe, SeamSpec, chain_layout, n_layers, width
from assy.assembly.states import (
    FORWARDS,
    StateCache,
    block_digest,
    module_digest,
    prefix_keys,
)
from assy.progress import bar
from blockpool import Pool, RunOptions, SeamContext

__all__ = [
    "ChainStream",
    "build_items",
    "destination",
    "new_adapters",
    "origin_width",
    "run_items",
    "run_tail",
]


def destination(recipe: Recipe, pool: Pool, before: int) -> tuple[str, int]:
    """The model whose own state a seam leading into ``before`` targets, and its depth."""
    if before < len(recipe.slices):
        s = recipe.slices[before]
        return s.source, s.layers[0]
    return recipe.anchor, n_layers(pool, recipe.anchor)


def origin_width(recipe: Recipe, pool: Pool, before: int) -> int:
    return width(pool, recipe.anchor if before == 0 else recipe.slices[before - 1].source)


def build_items(recipe: Recipe, pool: Pool, adapters: dict[int, ElasticAdapter]) -> list:
    """The runnable chain: block ids, with each seam's adapter in its place."""
    return [
        adapters[i.before] if isinstance(i, SeamSpec) else i for i in chain_layout(recipe, pool)
    ]


def new_adapters(recipe: Recipe, pool: Pool, seed: int) -> dict[int, ElasticAdapter]:
    """Unfitted adapters for every seam of ``recipe`` (seeded initialization)."""
    torch.manual_seed(seed)
    out = {}
    for seam in recipe.seams:
        d_in = origin_width(recipe, pool, seam.before)
        d_out = width(pool, destination(recipe, pool, seam.before)[0])
        out[seam.before] = ElasticAdapter(d_in, d_out, seam.kind, seam.cross_attention)
    return out


def run_tail(runner, items: Sequence, h: torch.Tensor) -> torch.Tensor:
    """Run chain items over one batch ``h`` (ids or states, on the runner's device), as the
    chain would in a full pass (positions from 0, no padding), keeping gradients."""
    positions = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
    for item in items:
        if isinstance(item, str):
            FORWARDS.add(1, h.shape[0])
            h = runner.run_block(item, h)
        else:
            h = item(h, SeamContext(None, positions, 0, {}))
    return h


def run_items(
    runner, items: Sequence, x: torch.Tensor, *, batch_size: int, desc: str | None = None
) -> torch.Tensor:
    """Run chain items (block ids and seams) over ``x`` in batches; float32 on the CPU.

    ``x`` is token ids ``[n, T]`` when ``items`` starts with the embedding, else states
    ``[n, T, d]``. Full sequences, all tokens real, positions from 0.
    """
    if not items:
        return x
    outs = []
    starts = range(0, x.shape[0], batch_size)
    with torch.no_grad():  # not inference mode: blocks built here may train later
        for s in bar(starts, desc=desc, leave=False, disable=desc is None):
            outs.append(
                run_tail(runner, items, x[s : s + batch_size].to(runner.device)).float().cpu()
            )
    return torch.cat(outs)


class ChainStream:
    """The stream at any position of a chain, over the calibration windows, computed from
    the nearest valid earlier state and cached by the digests of what produced it."""

    def __init__(
        self,
        runner,
        pool: Pool,
        items: list,
        windows: Windows,
        cache: StateCache,
        options: RunOptions,
    ) -> None:
        self.runner, self.pool, self.items = runner, pool, items
        self.windows, self.cache, self.options = windows, cache, options
        self._inputs = windows.digest()

    def _digest(self, item) -> str:
        return block_digest(self.pool, item) if isinstance(item, str) else module_digest(item)

    def keys(self, position: int) -> list[str]:
        """The cache keys of the stream entering ``items[0..position]`` (adapters read as
        they are now), one pass over the digests."""
        digests = [self._digest(i) for i in self.items[:position]]
        return prefix_keys(
            self._inputs, digests, causal=self.runner.is_causal, dtype=self.options.dtype
        )

    def key(self, position: int) -> str:
        return self.keys(position)[position]

    def at(self, position: int) -> torch.Tensor:
        """The stream entering ``items[position]``, ``[n, T, d]``, computed from the deepest
        state already cached before it: this chain's own, or one another chain sharing
        this prefix left (same blocks, same adapters: same key)."""
        keys = self.keys(position)
        found = self.cache.get(keys[position])
        if found is not None:
            return found
        start, base = 0, self.windows.ids
        for p in range(position - 1, 0, -1):
            found = self.cache.get(keys[p])
            if found is not None:
                start, base = p, found
                break
        state = run_items(
            self.runner,
            self.items[start:position],
            base,
            batch_size=self.options.batch_size,
            desc=f"chain {start}->{position}",
        )
        self.cache.put(keys[position], state)
        return state

"""The assembled chain: its items, running parts of it, and its stream at any position.

A chain is what :class:`blockpool.ChainRunner` runs: pool block ids with an
:class:`~assy.assembly.adapter.ElasticAdapter` at every seam. *Depth* ``k`` of a model is
the state entering its layer ``k`` (its number of layers: the last layer's output).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from tqdm import tqdm

from assy.assembly.adapter import ElasticAdapter
from assy.assembly.calibration import Windows
from assy.assembly.recipe import Recipe, SeamSpec, chain_layout, n_layers, width
from assy.assembly.states import StateCache, block_digest, module_digest, state_key
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
        for s in tqdm(starts, desc=desc, file=sys.stderr, leave=False, disable=desc is None):
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
        self._known: dict[int, str] = {}  # position -> key of the state held for it

    def _digest(self, item) -> str:
        return block_digest(self.pool, item) if isinstance(item, str) else module_digest(item)

    def key(self, position: int) -> str:
        digests = [self._digest(i) for i in self.items[:position]]
        return state_key(
            self._inputs, digests, causal=self.runner.is_causal, dtype=self.options.dtype
        )

    def at(self, position: int) -> torch.Tensor:
        """The stream entering ``items[position]``, ``[n, T, d]``."""
        key = self.key(position)
        found = self.cache.get(key)
        if found is not None:
            self._known[position] = key
            return found
        start, base = 0, self.windows.ids
        for p in sorted(self._known, reverse=True):
            if (
                p < position
                and self.cache.get(self._known[p]) is not None
                and self.key(p) == self._known[p]
            ):
                start, base = p, self.cache.get(self._known[p])
                break
        state = run_items(
            self.runner,
            self.items[start:position],
            base,
            batch_size=self.options.batch_size,
            desc=f"chain {start}->{position}",
        )
        self.cache.put(key, state)
        self._known[position] = key
        return state

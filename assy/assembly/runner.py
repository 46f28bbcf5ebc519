"""Load an assembly directory and run it: the recipe checked against the pool, the
adapters checked against the recipe, the chain opened like any model (budget included)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from assy.assembly.adapter import ElasticAdapter, load_adapter
from assy.assembly.recipe import Recipe, chain_layout, load_recipe, validate_recipe, width
from assy.errors import UsageError
from blockpool import Pool, RunOptions, RunSession, open_runner

__all__ = ["Assembly", "describe_assembly", "load_assembly", "open_assembly"]


@dataclass
class Assembly:
    """A loaded assembly.

    Attributes:
        root: its directory.
        recipe: the recipe (validated against the pool, sums checked).
        adapters: boundary -> adapter.
        chain: the runnable chain (block ids and adapters) for
            :func:`blockpool.session.open_runner`.
        fit: ``fit.json`` (empty if absent).
    """

    root: Path
    recipe: Recipe
    adapters: dict[int, ElasticAdapter]
    chain: list[Any]
    fit: dict[str, Any]

    @property
    def anchor(self) -> str:
        return self.recipe.anchor


def load_assembly(pool: Pool, root: str | Path) -> Assembly:
    """Read ``root/recipe.yaml``, check it against ``pool`` and load its adapters.

    Raises:
        UsageError: not an assembly directory, a recipe naming what the pool lacks, blocks
            whose sums changed, a missing, corrupted or resized adapter, or an adapter
            fitted for another recipe.
    """
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"{root}: no such assembly directory (make one with assy stitch)")
    recipe = load_recipe(root / "recipe.yaml")
    validate_recipe(recipe, pool)
    fingerprint = recipe.fingerprint()
    adapters: dict[int, ElasticAdapter] = {}
    for i, seam in enumerate(recipe.seams):
        if seam.adapter is None:
            raise UsageError(f"seams[{i}]: no adapter file; re-stitch the assembly")
        d_in = width(
            pool, recipe.anchor if seam.before == 0 else recipe.slices[seam.before - 1].source
        )
        dst = (
            recipe.anchor
            if seam.before == len(recipe.slices)
            else recipe.slices[seam.before].source
        )
        path = (root / seam.adapter).resolve()
        if Path(seam.adapter).is_absolute() or not path.is_relative_to(root.resolve()):
            raise UsageError(f"seams[{i}]: adapter path {seam.adapter!r} leaves {root}")
        adapters[seam.before] = load_adapter(
            path,
            sha256=seam.sha256,
            kind=seam.kind,
            d_in=d_in,
            d_out=width(pool, dst),
            cross_attention=seam.cross_attention,
            fingerprint=fingerprint,
            before=seam.before,
            name=f"{root.name}/{seam.adapter}",
        )
    chain = [
        adapters[i.before] if not isinstance(i, str) else i for i in chain_layout(recipe, pool)
    ]
    fit_path = root / "fit.json"
    fit = json.loads(fit_path.read_text()) if fit_path.is_file() else {}
    return Assembly(root, recipe, adapters, chain, fit)


@contextmanager
def open_assembly(
    pool: Pool | str | Path, root: str | Path, options: RunOptions = RunOptions()
) -> Iterator[tuple[Assembly, RunSession]]:
    """Load an assembly and open its chain as :func:`blockpool.session.open_runner` does
    (``options.budget``: through the swapper, adapters counted as pinned bytes)."""
    opened = pool if isinstance(pool, Pool) else Pool(pool)
    assembly = load_assembly(opened, root)
    with open_runner(opened, assembly.chain, options) as run:
        yield assembly, run


def describe_assembly(pool: Pool, root: str | Path) -> dict[str, Any]:
    """Slices, seams (kind, parameters, bytes, fit results), bytes and training of an assembly."""
    assembly = load_assembly(pool, root)
    recipe = assembly.recipe
    fit_seams = {s["before"]: s for s in assembly.fit.get("seams", [])}
    slices = []
    for i, s in enumerate(recipe.slices):
        from assy.assembly.recipe import slice_block_ids

        ids = slice_block_ids(pool, s)
        slices.append(
            {
                "index": i,
                "model": s.model,
                "variant": s.variant,
                "layers": list(s.layers),
                "blocks": len(ids),
                "bytes": sum(pool.blocks[b].bytes for b in ids),
            }
        )
    seams = []
    for seam in recipe.seams:
        adapter = assembly.adapters[seam.before]
        fitted = fit_seams.get(seam.before, {})
        seams.append(
            {
                "before": seam.before,
                "kind": seam.kind,
                "cross_attention": list(seam.cross_attention) if seam.cross_attention else None,
                "d_in": adapter.d_in,
                "d_out": adapter.d_out,
                "parameters": adapter.trainable_parameters(),
                "bytes": (assembly.root / seam.adapter).stat().st_size,
                "validation_r2": fitted.get("validation_r2"),
                "ridge": fitted.get("ridge"),
                "held_dims": fitted.get("held_dims"),
                "rms_gain": fitted.get("rms_gain"),
            }
        )
    ends = [b for b in pool.model(recipe.anchor).blocks if pool.blocks[b].kind != "layer"]
    block_bytes = sum(x["bytes"] for x in slices) + sum(pool.blocks[b].bytes for b in ends)
    return {
        "assembly": str(assembly.root),
        "anchor": recipe.anchor,
        "slices": slices,
        "seams": seams,
        "layers": sum(x["blocks"] for x in slices),
        "block_bytes": block_bytes,
        "adapter_bytes": sum(s["bytes"] for s in seams),
        "data": assembly.fit.get("data"),
        "windows": assembly.fit.get("windows"),
        "training": [
            {
                k: t.get(k)
                for k in (
                    "objective",
                    "steps",
                    "first_loss",
                    "last_loss",
                    "trainable_parameters",
                    "held_out_loss_before",
                    "held_out_loss_after",
                )
            }
            for t in assembly.fit.get("training", [])
        ],
    }

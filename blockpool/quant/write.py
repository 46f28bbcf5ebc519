"""Write a quantized pool: every block of every model a variant of its source block.

The precision of each block comes from a mapping (one precision for all, or a plan of
:mod:`blockpool.quant.plan`); blocks are written through
:func:`blockpool.variants.write_variant_model`, so each records its parent block and sum.
A head whose LM head is tied to the embedding stores only its norm: its tied weight is
quantized with the embedding block (whose precision the head therefore takes).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from blockpool.entries import Manifest, block_header
from blockpool.errors import UsageError, arg
from blockpool.families import get_family
from blockpool.lock import pool_lock
from blockpool.pool import Pool
from blockpool.quant.formats import (
    FLOAT_PRECISIONS,
    QUANT_PRECISIONS,
    encode_quant,
    logical_params,
    normalize_precision,
    quantize_block,
)
from blockpool.variants import check_variant_target, write_variant_model

__all__ = [
    "add_quantized_variant",
    "missing_quantized_variants",
    "quantize_pool",
    "quantized_block",
    "tied_sources",
    "variant_bytes",
]


def quantized_block(
    pool: Pool, bid: str, state: Mapping[str, torch.Tensor], precision: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One block's stored tensors at ``precision`` and its variant updates.

    Args:
        pool: the source pool.
        bid: the source block id.
        state: the block's own plain tensors (``pool.load_tensors(bid, tied=False)``).
        precision: the target precision.

    Returns:
        ``(stored, updates)`` in the form :data:`blockpool.variants.Transform` returns.
    """
    precision = normalize_precision(precision)
    spec = get_family(pool.blocks[bid].family)
    stored, quant = quantize_block(state, precision, conv1d=spec.conv1d)
    meta = {"quant": encode_quant(quant)} if quant else {}
    entry = {"quant": quant, "params": logical_params(stored, quant)}
    return stored, {"precision": precision, "metadata": meta, "entry": entry}


def variant_bytes(
    pool: Pool, bid: str, stored: Mapping[str, torch.Tensor], updates: Mapping[str, Any]
) -> int:
    """Exact file size of the variant :func:`quantize_pool` writes for ``bid``.

    The header carries the same metadata :func:`write_variant_model` writes (the variant
    keeps the block's id, as :func:`quantize_pool` keeps model names).
    """
    e = pool.blocks[bid]
    meta = block_header(
        bid, e.family, e.kind, e.index, updates["precision"], parent=bid, **updates["metadata"]
    )
    return len(save({k: v.contiguous() for k, v in stored.items()}, metadata=meta))


def tied_sources(pool: Pool) -> dict[str, str]:
    """Block id -> the block holding a weight it is tied to (a tied head -> its embed)."""
    out = {}
    for bid, entry in pool.blocks.items():
        for ref in entry.tied.values():
            out[bid] = ref.partition(":")[0]
    return out


def quantize_pool(
    pool: Pool,
    out: Path,
    precisions: str | Mapping[str, str],
    *,
    models: list[str] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    wait: bool = False,
) -> Manifest:
    """Write ``out``: a pool whose blocks are variants of ``pool``'s at the given precisions.

    Args:
        pool: the source pool (left unchanged).
        out: the destination pool directory (must not be the source).
        precisions: one precision for every block, or block id -> precision (a tied head
            takes its source block's precision whatever the mapping says).
        models: the models to write (default: all).
        progress: called as ``progress(model, blocks_done, blocks_total)``.
        wait: wait for another writer of ``out`` to finish instead of failing at once.

    Returns:
        The destination manifest (written once per model: a failure part-way leaves the
        models already written, and every model ``out`` held before, intact).

    Raises:
        UsageError: ``out`` is the source pool, a model is unknown, ``out`` holds a
            different model of the same name, or the mapping misses a block.
        PoolBusy: another process writes ``out``.
    """
    out = Path(out)
    if out.exists() and out.resolve() == pool.root.resolve():
        raise UsageError(
            f"{arg('out')} {out} is the source pool; write the quantized pool elsewhere"
        )
    models = models or list(pool.models)
    if not models:
        raise UsageError(f"pool {pool.root} holds no model to quantize")
    for name in models:
        check_variant_target(pool, name, out)
    assign = _resolve(pool, precisions, models)
    manifest = None
    with pool_lock(out, wait=wait):
        for name in models:

            def transform(bid, state):
                return quantized_block(pool, bid, state, assign[bid])

            manifest = write_variant_model(pool, name, transform, out=out, progress=progress)
    return manifest


def add_quantized_variant(
    pool: Pool,
    model: str,
    precision: str,
    name: str,
    *,
    progress: Callable[[str, int, int], None] | None = None,
    wait: bool = False,
) -> Manifest:
    """Add ``model`` quantized at ``precision`` to its own pool as model ``name``.

    Written as ``assy prune --as`` writes (:func:`~blockpool.variants.write_variant_model`):
    under the pool's write lock, new content-addressed block files beside the others, the
    manifest switched once at the end; every block records its parent.

    Raises:
        UsageError: an unknown model or precision, a source that is already quantized, a
            bad ``name`` or one the pool already holds. PoolBusy: another writer.
    """
    precision = normalize_precision(precision)
    entry = pool.model(model)
    check_variant_target(pool, model, None, name)
    quantized = sorted({pool.blocks[b].precision for b in entry.blocks} - set(FLOAT_PRECISIONS))
    if quantized:
        raise UsageError(
            f"model {model!r} has {'/'.join(quantized)} blocks; quantize a full-precision "
            f"model (fp32/bf16/fp16){f' such as {entry.parent_model!r}' if entry.parent_model else ''}"
        )

    def transform(bid, state):
        return quantized_block(pool, bid, state, precision)

    return write_variant_model(pool, model, transform, name=name, progress=progress, wait=wait)


def missing_quantized_variants(pool: Pool, precisions: list[str]) -> list[tuple[str, str, str]]:
    """The quantized variants the pool lacks: ``(model, precision, name)`` for each model
    built from a source (not itself a variant) and each of ``precisions`` for which no
    variant of that model holds all its blocks at that precision; ``name`` is
    ``<model>-<precision>`` (``int4`` is ``nf4``).

    Raises:
        UsageError: an unknown or floating-point precision; a missing variant's name taken
            by another model of the pool.
    """
    wanted = []
    for p in precisions:
        p = normalize_precision(p)
        if p not in QUANT_PRECISIONS:
            raise UsageError(
                f"{p} is not a quantized precision; choose {', '.join(QUANT_PRECISIONS)}"
            )
        wanted.append(p)
    have = set()  # (parent, precision) of the variants quantized at one precision
    for entry in pool.models.values():
        precs = {pool.blocks[b].precision for b in entry.blocks} - set(FLOAT_PRECISIONS)
        if entry.parent_model is not None and len(precs) == 1:
            have.add((entry.parent_model, precs.pop()))
    out = []
    for model, entry in pool.models.items():
        if entry.parent_model is not None:
            continue
        if any(pool.blocks[b].precision not in FLOAT_PRECISIONS for b in entry.blocks):
            continue  # built from an already quantized checkpoint
        for p in dict.fromkeys(wanted):
            if (model, p) in have:
                continue
            name = f"{model}-{p}"
            if name in pool.models:
                raise UsageError(
                    f"pool model {name!r} is not {model} at {p}; rename it, or add that "
                    f"variant under another name with assy quantize --as"
                )
            out.append((model, p, name))
    return out


def _resolve(pool: Pool, precisions: str | Mapping[str, str], models: list[str]) -> dict[str, str]:
    bids = [b for m in models for b in pool.model(m).blocks]
    if isinstance(precisions, str):
        return dict.fromkeys(bids, normalize_precision(precisions))
    missing = [b for b in bids if b not in precisions and b not in tied_sources(pool)]
    if missing:
        raise UsageError(f"no precision given for blocks {missing[:3]}")
    tied = tied_sources(pool)
    return {b: normalize_precision(precisions[tied.get(b, b)]) for b in bids}

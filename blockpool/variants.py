"""Write a variant of a pool model: every block transformed (quantized, pruned, ...).

A variant block records its parent (the source block's id and sum, and the pool it came
from when written into another pool). Quantization (a new pool of variants) and pruning
(a new model in the same pool) both go through :func:`write_variant_model`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from blockpool.entries import Manifest, Parent, block_header
from blockpool.errors import UsageError
from blockpool.manifest import (
    MANIFEST,
    atomic_write_bytes,
    block_file,
    block_id,
    empty_manifest,
    read_manifest,
    write_manifest,
)
from blockpool.pool import Pool

__all__ = ["Transform", "write_variant_model"]

Transform = Callable[[str, dict[str, torch.Tensor]], tuple[dict[str, torch.Tensor], dict[str, Any]]]
"""``(block_id, tensors) -> (new_tensors, updates)``.

``tensors`` are the block's own stored tensors (tied aliases not included). ``updates`` may
hold ``precision`` (str), ``sparsity`` (float), ``metadata`` (str -> str, written into the
safetensors header) and ``entry`` (fields of the new :class:`~blockpool.entries.BlockEntry`:
``quant``, ``params``, ``pruning``).
"""


def _retarget(ref: str, name: str) -> str:
    """``"model/kind/i:tensor"`` -> the same block and tensor in model ``name``."""
    bid, _, local = ref.partition(":")
    return f"{name}/{bid.split('/', 1)[1]}:{local}"


def _write(out: Path, rel: str, state: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    data = save({k: v.contiguous() for k, v in state.items()}, metadata=meta)
    atomic_write_bytes(out / rel, data)
    return hashlib.sha256(data).hexdigest()


def _copy_tokenizer(pool: Pool, model: str, out: Path, name: str) -> dict[str, str]:
    copied = {}
    for rel, digest in pool.model(model).tokenizer.items():
        new_rel = f"tokenizers/{name}/{Path(rel).name}"
        if (out / new_rel).resolve() != (pool.root / rel).resolve():
            atomic_write_bytes(out / new_rel, (pool.root / rel).read_bytes())
        copied[new_rel] = digest
    return copied


def write_variant_model(
    pool: Pool,
    model: str,
    transform: Transform,
    *,
    out: Path | None = None,
    name: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> Manifest:
    """Transform every block of ``model`` and register the result as a pool model.

    Args:
        pool: the source pool.
        model: the source model's name.
        transform: applied to each block's own tensors, in execution order.
        out: the destination pool directory (default: the source pool itself).
        name: the variant's model name (default: ``model``; must differ when ``out`` is the
            source pool).
        progress: called as ``progress(name, blocks_done, blocks_total)``.

    Returns:
        The destination manifest, written (atomically, last).
    """
    out = Path(out) if out is not None else pool.root
    name = name or model
    same_pool = out.resolve() == pool.root.resolve()
    if same_pool and name == model:
        raise UsageError(f"the variant of {model!r} needs a new name in the same pool")
    manifest = read_manifest(out) if (out / MANIFEST).is_file() else empty_manifest()
    source = pool.model(model)
    ids: list[str] = []
    for step, bid in enumerate(source.blocks):
        entry = pool.blocks[bid]
        new_state, updates = transform(bid, pool.load_tensors(bid, tied=False))
        new_bid = block_id(name, entry.kind, entry.index)
        precision = updates.get("precision", entry.precision)
        meta = block_header(
            new_bid,
            entry.family,
            entry.kind,
            entry.index,
            precision,
            parent=bid,
            **updates.get("metadata", {}),
        )
        rel = block_file(name, entry.kind, entry.index)
        digest = _write(out, rel, new_state, meta)
        fields = {"quant": None, "params": None, **updates.get("entry", {})}
        manifest.blocks[new_bid] = entry.but(
            id=new_bid,
            file=rel,
            model=name,
            precision=precision,
            sparsity=float(updates.get("sparsity", entry.sparsity)),
            bytes=(out / rel).stat().st_size,
            sha256=digest,
            tied={local: _retarget(ref, name) for local, ref in entry.tied.items()},
            tensors=tuple(new_state),
            parent=Parent(
                block=bid,
                sha256=entry.sha256,
                pool="." if same_pool else str(pool.root.resolve()),
            ),
            **fields,
        )
        ids.append(new_bid)
        if progress:
            progress(name, step + 1, len(source.blocks))
    manifest.models[name] = source.but(
        name=name,
        blocks=tuple(ids),
        parent_model=model,
        tokenizer=_copy_tokenizer(pool, model, out, name),
    )
    write_manifest(out, manifest)
    return manifest

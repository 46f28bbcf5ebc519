"""Write a variant of a pool model: every block transformed (quantized, pruned, ...).

A variant block records its parent (the source block's id and sum, and the pool it came
from when written into another pool). Quantization (a new pool of variants), pruning (a
new model in the same pool), merged and fine-tuned models all go through
:func:`write_variant_model`, which holds the destination pool's write lock, validates the
name, refuses to replace a different model of that name, writes the new block files
beside whatever is there (content-addressed) and switches the manifest once, at the end.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from blockpool.entries import Manifest, Parent, block_header
from blockpool.errors import IntegrityError, UsageError, arg
from blockpool.lock import pool_lock
from blockpool.manifest import (
    MANIFEST,
    block_id,
    empty_manifest,
    read_manifest,
    referenced_files,
    resolve_inside,
    write_manifest,
)
from blockpool.names import check_model_name
from blockpool.pool import Pool
from blockpool.storage import (
    block_stem,
    remove_stray,
    sweep,
    write_tensors,
    write_tokenizer,
)

__all__ = ["Transform", "check_variant_target", "write_variant_model"]

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


def _tokenizer_files(pool: Pool, model: str) -> dict[str, bytes]:
    """The source model's tokenizer files, checked against their sums as they are read."""
    files = {}
    for rel, digest in pool.model(model).tokenizer.items():
        try:
            data = resolve_inside(pool.root, rel).read_bytes()
        except OSError as e:
            raise IntegrityError(
                f"{rel}: tokenizer file of {model!r} cannot be read ({e.strerror}); "
                f"run assy verify-pool {pool.root}"
            ) from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise IntegrityError(
                f"{rel}: tokenizer file of {model!r} does not match its sum in pool.json; "
                f"run assy verify-pool {pool.root}"
            )
        files[Path(rel).name] = data
    return files


def _lineage(pool: Pool, model: str, same_pool: bool) -> list[Parent]:
    pool_ref = "." if same_pool else str(pool.root.resolve())
    return [Parent(b, pool.blocks[b].sha256, pool_ref) for b in pool.model(model).blocks]


def check_variant_target(
    pool: Pool, model: str, out: Path | None = None, name: str | None = None
) -> tuple[Path, str]:
    """Validate where :func:`write_variant_model` would write, before any work starts.

    Returns:
        ``(out, name)`` resolved (defaults: the source pool, the source model's name).

    Raises:
        UsageError: a bad name, ``out`` is a file, the variant would replace its own source,
            or ``out`` already holds a different model named ``name`` (one that is not a
            variant of the same source blocks).
    """
    out = Path(out) if out is not None else pool.root
    named = name is not None
    name = check_model_name(name or model, argument="name")
    pool.model(model)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{arg('out')} {out}: exists and is not a directory")
    same_pool = out.resolve() == pool.root.resolve()
    if same_pool and name == model:
        raise UsageError(f"the variant of {model!r} needs a new {arg('name')} in the same pool")
    if not (out / MANIFEST).is_file():
        return out, name
    manifest = read_manifest(out)
    check_model_name(name, argument="name", taken=manifest.models)
    old = manifest.models.get(name)
    if old is None:
        return out, name
    what = (
        f"a variant of {old.parent_model!r}"
        if old.parent_model
        else f"built from {old.origin or 'a checkpoint'}"
    )
    if same_pool:
        raise UsageError(
            f"pool {out} already has a model named {name!r} ({what}); choose another {arg('name')}"
        )
    parents = [manifest.blocks[b].parent for b in old.blocks]
    if old.parent_model != model or parents != _lineage(pool, model, same_pool):
        other = [f"another {arg('name')}"] if named else []
        raise UsageError(
            f"{arg('out')} {out} already holds a different model named {name!r} ({what}); "
            f"choose " + " or ".join([*other, f"another {arg('out')}"])
        )
    return out, name


def _write_blocks(
    pool: Pool,
    model: str,
    transform: Transform,
    out: Path,
    name: str,
    manifest: Manifest,
    progress: Callable[[str, int, int], None] | None,
) -> list[str]:
    same_pool = out.resolve() == pool.root.resolve()
    ids: list[str] = []
    source = pool.model(model)
    for step, (bid, parent) in enumerate(
        zip(source.blocks, _lineage(pool, model, same_pool), strict=True)
    ):
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
        state = {k: v.contiguous() for k, v in new_state.items()}
        path, digest = write_tensors(
            out / "blocks" / name, block_stem(entry.kind, entry.index), state, meta
        )
        fields = {"quant": None, "params": None, "pruning": None, **updates.get("entry", {})}
        manifest.blocks[new_bid] = entry.but(
            id=new_bid,
            file=path.relative_to(out).as_posix(),
            model=name,
            precision=precision,
            sparsity=float(updates.get("sparsity", entry.sparsity)),
            bytes=path.stat().st_size,
            sha256=digest,
            tied={local: _retarget(ref, name) for local, ref in entry.tied.items()},
            tensors=tuple(new_state),
            parent=parent,
            source_sha256=None,
            **fields,
        )
        ids.append(new_bid)
        if progress:
            progress(name, step + 1, len(source.blocks))
    return ids


def _unchanged(manifest: Manifest, pool: Pool, model: str) -> bool:
    """Whether ``manifest`` (read under the lock) still lists ``model`` as ``pool`` does."""
    now, then = manifest.models.get(model), pool.model(model)
    if now is None or now.blocks != then.blocks or now.config != then.config:
        return False
    return all(manifest.blocks[b].sha256 == pool.blocks[b].sha256 for b in now.blocks)


def write_variant_model(
    pool: Pool,
    model: str,
    transform: Transform,
    *,
    out: Path | None = None,
    name: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    wait: bool = False,
) -> Manifest:
    """Transform every block of ``model`` and register the result as a pool model.

    The destination pool is locked (:func:`blockpool.lock.pool_lock`) while the variant is
    written; its manifest is read under the lock and written once, at the end, so a failure
    or a kill at any point leaves every model it listed as it was.

    Args:
        pool: the source pool.
        model: the source model's name.
        transform: applied to each block's own tensors, in execution order.
        out: the destination pool directory (default: the source pool itself).
        name: the variant's model name (default: ``model``; must differ when ``out`` is the
            source pool, and must not be taken there). A model of that name in another
            ``out`` is replaced only if it is a variant of the same source blocks (written
            again, e.g. at another precision).
        progress: called as ``progress(name, blocks_done, blocks_total)``.
        wait: wait for another writer of ``out`` to finish instead of failing at once.

    Returns:
        The destination manifest, written (atomically, last).

    Raises:
        UsageError: see :func:`check_variant_target`; PoolBusy: another process writes
            ``out``; PoolWriteError: a file cannot be written.
    """
    out, name = check_variant_target(pool, model, out, name)
    with pool_lock(out, wait=wait):
        out, name = check_variant_target(pool, model, out, name)  # again, under the lock
        manifest = read_manifest(out) if (out / MANIFEST).is_file() else empty_manifest()
        if out.resolve() == pool.root.resolve() and not _unchanged(manifest, pool, model):
            raise UsageError(
                f"model {model!r} of pool {pool.root} changed while this command ran (another "
                "writer rebuilt it); run the command again"
            )
        remove_stray(out)
        ids = _write_blocks(pool, model, transform, out, name, manifest, progress)
        manifest.models[name] = pool.model(model).but(
            name=name,
            blocks=tuple(ids),
            parent_model=model,
            tokenizer=write_tokenizer(out, name, _tokenizer_files(pool, model)),
        )
        write_manifest(out, manifest)
        sweep(out, referenced_files(out, manifest))
    return manifest

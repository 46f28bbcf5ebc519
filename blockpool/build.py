"""Split checkpoints into a pool of per-block safetensors files.

The build streams: it reads the tensors of one block, casts them, writes that block's
file atomically and lets them go, so its peak memory tracks the largest block rather than
the model (GGUF sources are converted once, whole, into a cached directory first). Block
files are written before the manifest; a killed build, rerun, keeps every block file that
is already complete and current and writes the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from blockpool.entries import BlockEntry, Interface, Manifest, ModelEntry, block_header
from blockpool.errors import SourceError, UsageError, arg
from blockpool.families import FamilySpec, family_for_config
from blockpool.manifest import (
    MANIFEST,
    atomic_write_bytes,
    block_file,
    block_id,
    empty_manifest,
    read_manifest,
    sha256_file,
    write_manifest,
)
from blockpool.quant.formats import (
    QUANT_PRECISIONS,
    encode_quant,
    logical_params,
    normalize_precision,
    quantize_block,
)
from blockpool.sources import Source, iter_sources, open_source

__all__ = ["DTYPES", "build_pool", "plan_blocks"]

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
Progress = Callable[[str, int, int], None]


def plan_blocks(spec: FamilySpec, config: Any, names: Sequence[str]) -> dict[str, Any]:
    """Assign a checkpoint's tensors to blocks.

    Args:
        spec: the family of the checkpoint.
        config: its transformers config.
        names: its tensor names as stored.

    Returns:
        ``{"blocks": {(kind, index): [(source_name, local_name), ...]}, "tied": {local: (kind,
        index, local)}, "ignored": [...], "unassigned": [...]}``, blocks in execution order.

    Raises:
        SourceError: a layer is missing, or an untied head weight is absent.
    """
    blocks: dict[tuple[str, int], list[tuple[str, str]]] = defaultdict(list)
    ignored, unassigned = [], []
    tie = bool(getattr(config, "tie_word_embeddings", False))
    canonical = {spec.canonical_name(n): n for n in names}
    for name, stored in canonical.items():
        if spec.is_ignored(name) or (tie and name in spec.tied):
            ignored.append(stored)
        elif (where := spec.locate(name)) is None:
            unassigned.append(stored)
        else:
            blocks[where[0], where[1]].append((stored, where[2]))
    tied = {}
    for target, src in spec.tied.items() if tie else ():
        src_where = spec.locate(src)
        tgt_where = spec.locate(target)
        if src_where and tgt_where and src in canonical:
            tied[tgt_where[2]] = src_where
    n_layers = config.num_hidden_layers
    missing = [i for i in range(n_layers) if ("layer", i) not in blocks]
    if missing:
        raise SourceError(f"checkpoint lacks the tensors of layers {missing[:5]} of {n_layers}")
    order = [("embed", 0)] + [("layer", i) for i in range(n_layers)]
    if ("head", 0) in blocks or tied:
        order.append(("head", 0))
    return {
        "blocks": {k: blocks.get(k, []) for k in order},
        "tied": tied,
        "ignored": ignored,
        "unassigned": unassigned,
    }


def _interface(spec: FamilySpec, config: Any) -> Interface:
    return Interface(
        hidden_size=int(config.hidden_size),
        position=spec.position,
        attention="causal" if spec.causal else "bidirectional",
        norm=spec.norm,
    )


def _existing_ok(path: Path, meta: dict[str, str]) -> bool:
    """A block file left by an earlier run that is complete and was made the same way."""
    if not path.is_file():
        return False
    try:
        with safe_open(path, "pt") as f:
            found = f.metadata() or {}
    except (SafetensorError, OSError):
        return False
    return all(found.get(k) == v for k, v in meta.items())


def _write_block(
    path: Path,
    source: Source,
    tensors: list[tuple[str, str]],
    dtype: torch.dtype,
    meta: dict[str, str],
    quantize: tuple[str, tuple[str, ...]] | None = None,
) -> tuple[str, dict[str, Any]]:
    """Write one block file atomically; return its sha256 and extra manifest fields.

    The file is written with ``save_file`` to a temporary name and hashed from disk: about
    one block in memory (the cast copy), where serializing to ``bytes`` would hold two more.
    ``quantize`` is ``(precision, conv1d suffixes)`` for a quantized block.
    """
    read = source.read([stored for stored, _ in tensors])
    state = {}
    for stored, local in tensors:
        t = read.pop(stored)
        state[local] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
        del t
    extra: dict[str, Any] = {}
    if quantize:
        state, quant = quantize_block(state, quantize[0], conv1d=quantize[1])
        if quant:
            extra = {"quant": quant, "params": logical_params(dict(state), quant)}
            meta = {**meta, "quant": encode_quant(quant), "params": str(extra["params"])}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(state, tmp, metadata=meta)
        del state
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        digest = sha256_file(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest, extra


def _existing_extra(path: Path) -> dict[str, Any]:
    """The quantized-block manifest fields recorded in an existing block file's metadata."""
    with safe_open(path, "pt") as f:
        found = f.metadata() or {}
    if not found.get("quant"):
        return {}
    return {"quant": json.loads(found["quant"]), "params": int(found["params"])}


def _add_model(
    root: Path,
    manifest: Manifest,
    name: str,
    source: Source,
    dtype: str,
    progress: Progress | None,
    precision: str | None = None,
) -> None:
    spec = family_for_config(source.config)
    quantize = (precision, spec.conv1d) if precision else None
    plan = plan_blocks(spec, source.config, source.names())
    if plan["unassigned"]:
        warnings.warn(
            f"{name}: tensors in no block, not stored: {plan['unassigned'][:5]}", stacklevel=2
        )
    ids = []
    for step, ((kind, index), tensors) in enumerate(plan["blocks"].items()):
        bid = block_id(name, kind, index)
        rel = block_file(name, kind, index)
        meta = block_header(
            bid, spec.name, kind, index, precision or dtype, source=source.fingerprint
        )
        path = root / rel
        if _existing_ok(path, meta):
            digest, extra = sha256_file(path), _existing_extra(path)
        else:
            digest, extra = _write_block(path, source, tensors, DTYPES[dtype], meta, quantize)
        tied = {
            local: block_id(name, k, i) + ":" + src_local
            for local, (k, i, src_local) in plan["tied"].items()
            if kind == "head"
        }
        manifest.blocks[bid] = BlockEntry(
            id=bid,
            file=rel,
            model=name,
            kind=kind,
            index=index,
            family=spec.name,
            precision=precision or dtype,
            sha256=digest,
            bytes=path.stat().st_size,
            interface=_interface(spec, source.config),
            tied=tied,
            tensors=tuple(local for _, local in tensors),
            **extra,
        )
        ids.append(bid)
        if progress:
            progress(name, step + 1, len(plan["blocks"]))
    manifest.models[name] = ModelEntry(
        name=name,
        family=spec.name,
        config=source.config.to_dict(),
        blocks=tuple(ids),
        source={"origin": source.origin, "fingerprint": source.fingerprint},
        tokenizer=_copy_tokenizer(root, name, source),
        ignored=tuple(plan["ignored"]),
    )


def _copy_tokenizer(root: Path, name: str, source: Source) -> dict[str, str]:
    sums = {}
    for f in source.tokenizer_files():
        rel = f"tokenizers/{name}/{f.name}"
        data = f.read_bytes()
        atomic_write_bytes(root / rel, data)
        sums[rel] = hashlib.sha256(data).hexdigest()
    return sums


def build_pool(
    sources: Sequence[str],
    out: Path,
    *,
    dtype: str = "fp16",
    precision: str | None = None,
    allow_pickle: bool = False,
    progress: Progress | None = None,
) -> Manifest:
    """Split each source into blocks under ``out`` and write ``out/pool.json``.

    Args:
        sources: ``name=SOURCE`` or ``SOURCE`` strings (HF directory, ``.gguf``, builtin name).
        out: the pool directory; an existing pool is extended (a model of the same name and
            the same source is rebuilt in place, reusing its complete block files).
        dtype: storage precision of floating tensors: ``fp32``, ``bf16`` or ``fp16``.
        precision: quantize the large matrices (``int8``, ``nf4``/``int4``, ``fp4``: see
            :mod:`blockpool.quant.formats`); norms, biases and small tensors stay at ``dtype``.
        allow_pickle: accept directories holding only ``pytorch_model.bin`` (loaded with
            ``torch.load(weights_only=True)``).
        progress: called as ``progress(model, blocks_done, blocks_total)``.

    Returns:
        The manifest written.

    Raises:
        UsageError, SourceError, UnsupportedArchitecture: bad input; nothing is half-written
            (block files are atomic and the manifest is written last).
    """
    if dtype not in DTYPES:
        raise UsageError(f"{arg('dtype')} {dtype!r}: choose one of {', '.join(DTYPES)}")
    if precision is not None:
        precision = normalize_precision(precision)
        if precision not in QUANT_PRECISIONS:
            raise UsageError(
                f"{arg('precision')} {precision!r}: choose one of {', '.join(QUANT_PRECISIONS)} "
                f"(float storage is {arg('dtype')})"
            )
    if not sources:
        raise UsageError(
            "give at least one SOURCE (an HF directory, a .gguf file or a builtin name)"
        )
    if out.exists() and not out.is_dir():
        raise UsageError(f"{arg('out')} {out}: exists and is not a directory")
    manifest = read_manifest(out) if (out / MANIFEST).is_file() else empty_manifest()
    named = list(iter_sources(list(sources)))
    opened = [(name, open_source(src, allow_pickle=allow_pickle)) for name, src in named]
    try:
        for name, source in opened:
            family_for_config(source.config)  # every source is checked before anything is written
            _check_replaceable(manifest, name, source)
        out.mkdir(parents=True, exist_ok=True)
        remove_stray(out)
        for name, source in opened:
            _add_model(out, manifest, name, source, dtype, progress, precision)
        write_manifest(out, manifest)
    finally:
        for _, source in opened:
            source.close()
    return manifest


def _check_replaceable(manifest: Manifest, name: str, source: Source) -> None:
    old = manifest.models.get(name)
    if old and old.source.get("fingerprint") != source.fingerprint:
        raise UsageError(
            f"the pool already holds a model named {name!r} from another source "
            f"({old.origin}); give this one another name as NAME=SOURCE"
        )
    for bid in old.blocks if old else ():
        manifest.blocks.pop(bid, None)


def remove_stray(out: Path) -> None:
    """Delete temporary files a killed build left behind."""
    for tmp in out.rglob(".*.tmp"):
        tmp.unlink(missing_ok=True)

"""Split checkpoints into a pool of per-block safetensors files.

The build streams: it reads the tensors of one block, casts them, writes that block's
file atomically and lets them go, so its peak memory tracks the largest block rather than
the model (GGUF sources are converted once, whole, into a cached directory first). Block
files are written before the manifest, under the pool's write lock.

Resuming and rebuilding depend on the weights themselves, never on file names, sizes or
headers: every block file records ``source_sha256``, the sum of the source tensors it was
made from, as read. A block file left by an earlier run (a killed build, or the model's
current version) is reused only when it was made the same way (family, precision) from
the very tensors just read and its bytes still match the sum in its name. A model name
already in the pool is rebuilt only from the same weights and config (a first pass hashes
them), else refused. New block files go beside the old ones (names are content-addressed)
and the manifest switches to them at once, so an interrupted rebuild leaves the old model
valid; files no model uses any more are deleted after the switch.
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from blockpool.entries import (
    BlockEntry,
    Interface,
    Manifest,
    ModelEntry,
    block_header,
    config_digest,
)
from blockpool.errors import IntegrityError, SourceError, UsageError, arg
from blockpool.families import FamilySpec, family_for_config, get_family
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
from blockpool.quant.formats import (
    QUANT_PRECISIONS,
    dequantize_block,
    encode_quant,
    logical_params,
    normalize_precision,
    quantize_block,
)
from blockpool.sources import Source, iter_sources, open_source, tensor_digest
from blockpool.storage import (
    block_stem,
    remove_stray,
    sha256_file,
    sweep,
    write_tensors,
    write_tokenizer,
)

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


Tensors = list[tuple[str, str]]  # (name in the source, name inside the block)


def _read_block(source: Source, tensors: Tensors) -> tuple[dict[str, torch.Tensor], str]:
    """A block's source tensors by their names inside the block, and their sum as read."""
    read = source.read([stored for stored, _ in tensors])
    state = {local: read.pop(stored) for stored, local in tensors}
    return state, tensor_digest(state.items())


def _stored_state(
    state: dict[str, torch.Tensor], dtype: torch.dtype, quantize: tuple[str, tuple] | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, str]]:
    """What a block file stores: tensors cast to ``dtype`` and, with ``quantize``
    (``(precision, conv1d suffixes)``), quantized; plus its manifest and header fields."""
    for k in list(state):
        t = state.pop(k)
        state[k] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
    if not quantize:
        return state, {}, {}
    state, quant = quantize_block(state, quantize[0], conv1d=quantize[1])
    if not quant:
        return state, {}, {}
    extra = {"quant": quant, "params": logical_params(dict(state), quant)}
    return state, extra, {"quant": encode_quant(quant), "params": str(extra["params"])}


def _header(path: Path) -> dict[str, str] | None:
    try:
        with safe_open(path, "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError):
        return None


def _reusable(directory: Path, stem: str, meta: dict[str, str]) -> tuple[Path, str] | None:
    """A complete block file an earlier run left that was made as ``meta`` says (same
    block, precision and source tensors) and whose bytes match the sum in its name."""
    for path in sorted(directory.glob(f"{stem}-*.safetensors")):
        header = _header(path)
        if header is None or any(header.get(k) != v for k, v in meta.items()):
            continue
        digest = sha256_file(path)
        if digest.startswith(path.stem.rpartition("-")[2]):
            return path, digest
    return None


def _existing_extra(path: Path) -> dict[str, Any]:
    """The quantized-block manifest fields recorded in an existing block file's metadata."""
    found = _header(path) or {}
    if not found.get("quant"):
        return {}
    return {"quant": json.loads(found["quant"]), "params": int(found["params"])}


def _model_digest(config: dict[str, Any], block_sums: list[str]) -> str:
    """One sum over a model's config (but where it was loaded from) and its blocks' source
    sums, in order: equal for the same weights and config read from anywhere."""
    config = {k: v for k, v in config.items() if k not in _NOT_THE_MODEL}
    return config_digest({"config": config_digest(config), "blocks": block_sums})


def _add_model(
    root: Path,
    manifest: Manifest,
    name: str,
    source: Source,
    dtype: str,
    progress: Progress | None,
    precision: str | None = None,
    known: dict[tuple[str, int], str] | None = None,
) -> None:
    """Write (or reuse) every block of one model and enter it in ``manifest``.

    ``known``: the source sum of each block, from the first pass that compared the source
    with the model of the same name already in the pool.
    """
    spec = family_for_config(source.config)
    quantize = (precision, spec.conv1d) if precision else None
    plan = plan_blocks(spec, source.config, source.names())
    if plan["unassigned"]:
        warnings.warn(
            f"{name}: tensors in no block, not stored: {plan['unassigned'][:5]}", stacklevel=2
        )
    directory = root / "blocks" / name
    ids, sums = [], []
    for step, ((kind, index), tensors) in enumerate(plan["blocks"].items()):
        bid = block_id(name, kind, index)
        state, src_sum = None, (known or {}).get((kind, index))
        if src_sum is None:
            state, src_sum = _read_block(source, tensors)
        meta = block_header(bid, spec.name, kind, index, precision or dtype, source_sha256=src_sum)
        found = _reusable(directory, block_stem(kind, index), meta)
        if found:
            path, digest = found
            extra = _existing_extra(path)
        else:
            if state is None:
                state, again = _read_block(source, tensors)
                if again != src_sum:
                    raise SourceError(
                        f"{source.origin}: its weights changed while the pool was being built "
                        f"(block {bid}); run the build again"
                    )
            stored, extra, quant_meta = _stored_state(state, DTYPES[dtype], quantize)
            del state
            path, digest = write_tensors(
                directory, block_stem(kind, index), stored, {**meta, **quant_meta}
            )
            del stored
        manifest.blocks[bid] = BlockEntry(
            id=bid,
            file=path.relative_to(root).as_posix(),
            model=name,
            kind=kind,
            index=index,
            family=spec.name,
            precision=precision or dtype,
            sha256=digest,
            bytes=path.stat().st_size,
            interface=_interface(spec, source.config),
            tied={
                local: block_id(name, k, i) + ":" + src_local
                for local, (k, i, src_local) in plan["tied"].items()
                if kind == "head"
            },
            tensors=tuple(local for _, local in tensors),
            source_sha256=src_sum,
            **extra,
        )
        ids.append(bid)
        sums.append(src_sum)
        if progress:
            progress(name, step + 1, len(plan["blocks"]))
    config = source.config.to_dict()
    tokenizer = {f.name: f.read_bytes() for f in source.tokenizer_files()}
    manifest.models[name] = ModelEntry(
        name=name,
        family=spec.name,
        config=config,
        blocks=tuple(ids),
        source={
            "origin": source.origin,
            "fingerprint": source.fingerprint,
            "sha256": _model_digest(config, sums),
        },
        tokenizer=write_tokenizer(root, name, tokenizer),
        ignored=tuple(plan["ignored"]),
        config_sha256=config_digest(config),
    )


_NOT_THE_MODEL = ("_name_or_path", "transformers_version")  # where and by what it was saved


def _normalized(config: dict[str, Any]) -> dict[str, Any]:
    """A config as this transformers writes it (versions add defaults and their own key),
    without the keys that say where it was loaded from rather than what the model is."""
    from transformers import AutoConfig

    entry = {k: v for k, v in config.items() if k not in _NOT_THE_MODEL}
    try:
        out = AutoConfig.for_model(**entry).to_dict()
    except (ValueError, TypeError, KeyError):
        out = entry
    return {k: v for k, v in out.items() if k not in _NOT_THE_MODEL}


def _config_change(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    a, b = _normalized(old), _normalized(new)
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if not keys:
        return None
    return ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:3])


def _same_weights_as_v1(root: Path, entry: BlockEntry, state: dict[str, torch.Tensor]) -> bool:
    """Whether a block written by a format-1 build (no source sum) holds exactly what
    ``state`` (the source tensors) gives at that block's precision: the full check."""
    path = resolve_inside(root, entry.file)
    if not path.is_file() or sha256_file(path) != entry.sha256:
        raise IntegrityError(
            f"block {entry.id} ({entry.file}): missing or corrupted; run assy verify-pool {root}"
        )
    with safe_open(path, "pt") as f:
        old = dequantize_block({n: f.get_tensor(n) for n in f.keys()}, entry.quant)
    if set(old) != set(state):
        return False
    new = {k: v.to(old[k].dtype) if v.is_floating_point() else v for k, v in state.items()}
    if entry.quant:
        spec = get_family(entry.family)
        stored, quant = quantize_block(new, entry.precision, conv1d=spec.conv1d)
        new = dequantize_block(stored, quant)
    return all(torch.equal(old[k], new[k]) for k in old)


def _compare_with_pool(
    root: Path, manifest: Manifest, name: str, source: Source
) -> dict[tuple[str, int], str] | None:
    """Refuse to rebuild ``name`` from other weights or another config than the pool's
    model of that name; return the source sum of each block when they are the same.

    The decision reads and hashes every source tensor (the weights themselves; a cheap
    fingerprint of file headers cannot tell two checkpoints of one architecture apart).
    """
    old = manifest.models.get(name)
    if old is None:
        return None
    rename = "give this one another name as NAME=SOURCE"
    if old.parent_model is not None:
        raise UsageError(
            f"the pool already holds a model named {name!r} (a variant of "
            f"{old.parent_model!r}); {rename}"
        )
    change = _config_change(dict(old.config), source.config.to_dict())
    if change:
        raise UsageError(
            f"the pool already holds a model named {name!r} with another config ({change}; "
            f"built from {old.origin}); {rename}"
        )
    spec = family_for_config(source.config)
    plan = plan_blocks(spec, source.config, source.names())["blocks"]
    if [block_id(name, k, i) for k, i in plan] != list(old.blocks):
        raise UsageError(
            f"the pool already holds a model named {name!r} with other blocks (built from "
            f"{old.origin}); {rename}"
        )
    known = {}
    for (kind, index), tensors in plan.items():
        entry = manifest.blocks[block_id(name, kind, index)]
        state, digest = _read_block(source, tensors)
        same = (
            digest == entry.source_sha256
            if entry.source_sha256
            else _same_weights_as_v1(root, entry, state)
        )
        if not same:
            raise UsageError(
                f"the pool already holds a model named {name!r} built from other weights "
                f"(block {entry.id} differs; built from {old.origin}); {rename}"
            )
        known[(kind, index)] = digest
    return known


def build_pool(
    sources: Sequence[str],
    out: Path,
    *,
    dtype: str = "fp16",
    precision: str | None = None,
    allow_pickle: bool = False,
    progress: Progress | None = None,
    wait: bool = False,
) -> Manifest:
    """Split each source into blocks under ``out`` and write ``out/pool.json``.

    Args:
        sources: ``name=SOURCE`` or ``SOURCE`` strings (HF directory, ``.gguf``, builtin name).
        out: the pool directory; an existing pool is extended. A model name already in it
            is rebuilt only from the same weights and config (for instance at another
            ``dtype``; complete block files of a killed build are reused), else refused.
        dtype: storage precision of floating tensors: ``fp32``, ``bf16`` or ``fp16``.
        precision: quantize the large matrices (``int8``, ``nf4``/``int4``, ``fp4``: see
            :mod:`blockpool.quant.formats`); norms, biases and small tensors stay at ``dtype``.
        allow_pickle: accept directories holding only ``pytorch_model.bin`` (loaded with
            ``torch.load(weights_only=True)``).
        progress: called as ``progress(model, blocks_done, blocks_total)``.
        wait: wait for another writer of ``out`` to finish instead of failing at once.

    Returns:
        The manifest written.

    Raises:
        UsageError, SourceError, UnsupportedArchitecture: bad input; PoolBusy: another
            process is writing ``out``; PoolWriteError: a file cannot be written. In every
            case the pool's manifest, and every model it lists, is left as it was.
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
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{arg('out')} {out}: exists and is not a directory")
    named = list(iter_sources(list(sources)))
    opened: list[tuple[str, Source]] = []
    try:
        for name, src in named:
            opened.append((name, open_source(src, allow_pickle=allow_pickle)))
        for _, source in opened:  # every source is checked before anything is written
            family_for_config(source.config)
            source.check_tokenizer()
        with pool_lock(out, wait=wait):
            manifest = read_manifest(out) if (out / MANIFEST).is_file() else empty_manifest()
            for name, _ in opened:
                check_model_name(name, argument=None, taken=manifest.models)
            known = {name: _compare_with_pool(out, manifest, name, src) for name, src in opened}
            remove_stray(out)
            for name, source in opened:
                _add_model(out, manifest, name, source, dtype, progress, precision, known[name])
            write_manifest(out, manifest)
            sweep(out, referenced_files(out, manifest))
    finally:
        for _, source in opened:
            source.close()
    return manifest

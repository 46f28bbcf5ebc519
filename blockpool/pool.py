"""An open pool: verify it, load a block's tensors (memory-mapped), build its module."""

from __future__ import annotations

import hashlib
import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from blockpool.entries import BlockEntry, ModelEntry
from blockpool.errors import IntegrityError, UsageError
from blockpool.families import FamilySpec, get_family, import_object
from blockpool.manifest import read_manifest, resolve_inside, sha256_file
from blockpool.quant.formats import companions, dequantize_block, logical_params

__all__ = ["BadBlock", "Pool", "empty_weights", "summarize"]


_EMPTY = threading.local()
_PATCH_LOCK = threading.Lock()
_original_register_parameter = nn.Module.register_parameter


def _register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
    _original_register_parameter(module, name, param)
    if param is not None and getattr(_EMPTY, "active", False):
        p = module._parameters[name]
        module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)


@contextmanager
def empty_weights():
    """Build modules with their parameters on the meta device (buffers stay real).

    Like accelerate's ``init_empty_weights(include_buffers=False)``, but thread-local: the
    swapper builds blocks on a background thread while the compute thread runs, and
    accelerate's version patches ``nn.Module`` for every thread at once.
    """
    with _PATCH_LOCK:
        if nn.Module.register_parameter is not _register_parameter:
            nn.Module.register_parameter = _register_parameter
    previous = getattr(_EMPTY, "active", False)
    _EMPTY.active = True
    try:
        yield
    finally:
        _EMPTY.active = previous


@dataclass(frozen=True)
class BadBlock:
    """A block whose file is missing or does not match its recorded sum."""

    block_id: str
    file: str
    reason: str


class Pool:
    """A pool directory opened for reading.

    Args:
        root: the pool directory (holding ``pool.json``).

    Raises:
        ManifestError: the manifest is missing, truncated, malformed or unsafe.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.models: dict[str, ModelEntry] = self.manifest.models
        self.blocks: dict[str, BlockEntry] = self.manifest.blocks
        self._verified: set[str] = set()
        self._stat_checked: dict[str, tuple[int, int]] = {}  # bid -> (size, mtime) when hashed

    # --- models -------------------------------------------------------------------------
    def model(self, name: str) -> ModelEntry:
        """The manifest entry of model ``name``."""
        if name not in self.models:
            known = ", ".join(sorted(self.models)) or "none"
            raise UsageError(f"no model {name!r} in pool {self.root} (models: {known})")
        return self.models[name]

    def family(self, name: str) -> FamilySpec:
        return get_family(self.model(name).family)

    def config(self, name: str, attn_implementation: str = "sdpa") -> Any:
        """The transformers config of model ``name``, ready to build layers from."""
        from transformers import AutoConfig

        entry = dict(self.model(name).config)
        entry.pop("assy_converted_from", None)
        config = AutoConfig.for_model(**entry)
        config._attn_implementation = attn_implementation
        return config

    def tokenizer(self, name: str) -> Any:
        """The model's tokenizer, from the files copied into the pool."""
        from transformers import AutoTokenizer

        files = self.model(name).tokenizer
        if not files:
            raise UsageError(f"model {name!r} has no tokenizer in the pool (its source had none)")
        for rel, digest in files.items():
            if sha256_file(resolve_inside(self.root, rel)) != digest:
                raise IntegrityError(f"{rel}: tokenizer file does not match its sum in pool.json")
        return AutoTokenizer.from_pretrained(self.root / "tokenizers" / name, local_files_only=True)

    # --- blocks -------------------------------------------------------------------------
    def path(self, bid: str) -> Path:
        return resolve_inside(self.root, self.blocks[bid].file)

    def params(self, bid: str) -> int:
        """Weights stored in block ``bid``: elements of its plain tensors, quantized ones
        counted at their dequantized size, tied aliases not counted (stored elsewhere)."""
        entry = self.blocks[bid]
        if entry.params is not None:
            return entry.params
        with safe_open(self.path(bid), "pt") as f:
            if entry.quant:
                return logical_params({n: f.get_tensor(n) for n in f.keys()}, entry.quant)
            return sum(math.prod(f.get_slice(n).get_shape()) for n in f.keys())

    def check_block(self, bid: str) -> BadBlock | None:
        """Compare one block file with its recorded sum; ``None`` when it matches."""
        entry = self.blocks[bid]
        path = self.path(bid)
        if not path.is_file():
            return BadBlock(bid, entry.file, "file missing")
        if sha256_file(path) != entry.sha256:
            return BadBlock(bid, entry.file, "sha256 mismatch (file corrupted or modified)")
        return None

    def verify(self) -> list[BadBlock]:
        """Every block that is missing or does not match its sum."""
        return [bad for bid in self.blocks if (bad := self.check_block(bid)) is not None]

    def _ensure_verified(self, bid: str) -> None:
        if bid in self._verified:
            return
        bad = self.check_block(bid)
        if bad is not None:
            raise IntegrityError(
                f"block {bid} ({bad.file}): {bad.reason}; run assy verify-pool {self.root} "
                "and rebuild the pool"
            )
        self._verified.add(bid)

    def load_tensors(
        self, bid: str, *, verify: bool = True, tied: bool = True, fresh: bool = False
    ) -> dict[str, torch.Tensor]:
        """A block's tensors by their names inside the block module.

        The file's sum is checked once per open pool before its first use; with ``fresh``
        the file is read whole and checked at every call (a swapper re-reads blocks, and a
        file changed during a run must not be used). With ``tied``, weights stored once in
        another block (a tied LM head) are resolved and included. Quantized tensors (int8,
        nf4, fp4 in bitsandbytes' layout) are dequantized to the dtype they were quantized
        from, so a caller always gets plain tensors (see :mod:`blockpool.quant.formats`).

        Raises:
            IntegrityError: the block (or the block it shares a tied weight with) is corrupted.
        """
        if bid not in self.blocks:
            raise UsageError(f"no block {bid!r} in pool {self.root}")
        entry = self.blocks[bid]
        state = dequantize_block(self._read(bid, verify, fresh=fresh), entry.quant)
        for local, ref in entry.tied.items() if tied else ():
            src_bid, _, src_local = ref.partition(":")
            src = self._read(src_bid, verify, only=src_local, fresh=fresh)
            state[local] = dequantize_block(src, self.blocks[src_bid].quant)[src_local]
        return state

    def _read(
        self, bid: str, verify: bool, only: str | None = None, fresh: bool = False
    ) -> dict[str, torch.Tensor]:
        if fresh:
            return self._read_checked(bid, only)
        if verify:
            self._ensure_verified(bid)
        try:
            with safe_open(self.path(bid), "pt") as f:
                names = companions(only, f.keys()) if only else list(f.keys())
                return {n: f.get_tensor(n) for n in names}
        except (SafetensorError, OSError) as e:
            raise IntegrityError(
                f"block {bid}: cannot read {self.blocks[bid].file} ({e})"
            ) from None

    def _read_checked(self, bid: str, only: str | None) -> dict[str, torch.Tensor]:
        """Read a block for a reload, re-checking its sum whenever the file may have changed.

        The first read hashes the whole file; later reads of a file whose size and
        modification time are unchanged skip the hash and read through the memory map.
        """
        from safetensors.torch import load

        entry = self.blocks[bid]
        path = self.path(bid)
        try:
            stat = path.stat()
            key = (stat.st_size, stat.st_mtime_ns)
            if self._stat_checked.get(bid) == key:
                with safe_open(path, "pt") as f:
                    state = {n: f.get_tensor(n) for n in f.keys()}
                return {n: state[n] for n in companions(only, state)} if only else state
            data = path.read_bytes()
        except (OSError, SafetensorError) as e:
            raise IntegrityError(f"block {bid}: cannot read {entry.file} ({e})") from None
        self._stat_checked.pop(bid, None)
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise IntegrityError(
                f"block {bid} ({entry.file}): sha256 mismatch (file corrupted or modified); "
                f"run assy verify-pool {self.root} and rebuild the pool"
            )
        self._stat_checked[bid] = key
        state = load(data)
        return {n: state[n] for n in companions(only, state)} if only else state

    def empty_module(self, bid: str, config: Any = None) -> nn.Module:
        """The block's module with its parameters on the meta device (no memory)."""
        entry = self.blocks[bid]
        spec = get_family(entry.family)
        config = config if config is not None else self.config(entry.model)
        with empty_weights():
            if entry.kind == "layer":
                return import_object(spec.layer_class)(config, entry.index)
            if entry.kind == "embed":
                return spec.build_embed(config)
            return spec.build_head(config)

    def build_module(
        self,
        bid: str,
        *,
        dtype: torch.dtype = torch.float32,
        config: Any = None,
        fresh: bool = False,
        shared: dict[str, torch.Tensor] | None = None,
    ) -> nn.Module:
        """The runnable module of one block, weights loaded at ``dtype``, in eval mode.

        Layers are transformers' own layer classes (``LlamaDecoderLayer``, ``BertLayer``, …);
        embeddings and heads are the family's small wrappers. ``fresh``: see
        :meth:`load_tensors`. ``shared``: the block's tied aliases (name inside the block ->
        tensor), already in memory at ``dtype`` in the block they live in; the module then
        holds those very tensors (a tied LM head and its embedding: one table in memory).
        """
        module = self.empty_module(bid, config)
        state = self.load_tensors(bid, fresh=fresh, tied=shared is None)
        state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
        state |= shared or {}
        missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise IntegrityError(
                f"block {bid}: tensors do not fit its {type(module).__name__} "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        return module.eval()


def _bits(n_bytes: int, params: int) -> float:
    return round(8 * n_bytes / params, 3) if params else 0.0


def summarize(pool: Pool) -> dict[str, Any]:
    """Models, their blocks, bytes per model and in total, and the precisions in use.

    ``bits`` (per block, per model, for the pool) is the average storage bits per weight:
    ``8 * file bytes / weights stored`` (quantization state and file headers included).
    """
    models = {}
    params = {b: pool.params(b) for b in pool.blocks}
    for name, entry in pool.models.items():
        blocks = [pool.blocks[b] for b in entry.blocks]
        n_bytes = sum(b.bytes for b in blocks)
        n_params = sum(params[b.id] for b in blocks)
        models[name] = {
            "family": entry.family,
            "source": entry.origin,
            "parent_model": entry.parent_model,
            "layers": sum(b.kind == "layer" for b in blocks),
            "hidden_size": blocks[0].hidden_size,
            "bytes": n_bytes,
            "params": n_params,
            "bits": _bits(n_bytes, n_params),
            "precisions": sorted({b.precision for b in blocks}),
            "blocks": [
                {
                    "id": b.id,
                    "kind": b.kind,
                    "precision": b.precision,
                    "sparsity": b.sparsity,
                    "bytes": b.bytes,
                    "bits": _bits(b.bytes, params[b.id]),
                }
                for b in blocks
            ],
        }
    total = sum(b.bytes for b in pool.blocks.values())
    return {
        "pool": str(pool.root),
        "format_version": pool.manifest.format_version,
        "models": models,
        "blocks": len(pool.blocks),
        "bytes": total,
        "params": sum(params.values()),
        "bits": _bits(total, sum(params.values())),
    }

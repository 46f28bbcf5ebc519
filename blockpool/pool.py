"""An open pool: verify it, load a block's tensors (memory-mapped), build its module.

What a run depends on is checked against the sums in ``pool.json`` before it is used: a
block file before its first load (and at every reload by the swapper), a model's config
(format 2: ``config_sha256``) whenever it is read, its tokenizer files whenever they are
loaded; and a block's tensors must have the shapes its family and config imply before
any of them is loaded into a module. :meth:`Pool.verify` checks all of it at once.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from blockpool.entries import BlockEntry, ModelEntry, config_digest
from blockpool.errors import IntegrityError, UsageError
from blockpool.families import FamilySpec, get_family, import_object
from blockpool.manifest import read_manifest, resolve_inside, sha256_file, write_manifest
from blockpool.quant.formats import (
    FLOAT_PRECISIONS,
    companions,
    dequantize_block,
    logical_params,
)
from blockpool.quant.packed import PackedWeight, pack_module
from blockpool.reads import cast, read_header, read_tensors

__all__ = ["BadBlock", "Pool", "empty_weights", "rehash_pool", "summarize"]


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
    """Something a run depends on that is missing or does not match its recorded sum: a
    block (``block_id`` is its id), a tokenizer file (``<model>/tokenizer``) or a model's
    config (``<model>/config``, ``file`` is ``pool.json``)."""

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
        self._checked: dict[str, tuple[int, int]] = {}  # bid -> (size, mtime) when it matched

    # --- models -------------------------------------------------------------------------
    def model(self, name: str) -> ModelEntry:
        """The manifest entry of model ``name``."""
        if name not in self.models:
            known = ", ".join(sorted(self.models)) or "none"
            raise UsageError(f"no model {name!r} in pool {self.root} (models: {known})")
        return self.models[name]

    def family(self, name: str) -> FamilySpec:
        return get_family(self.model(name).family)

    def check_config(self, name: str) -> BadBlock | None:
        """Compare model ``name``'s config with its recorded sum; ``None`` when it matches
        (or when a format-1 pool recorded none)."""
        model = self.model(name)
        if model.config_sha256 is None or config_digest(model.config) == model.config_sha256:
            return None
        return BadBlock(
            f"{name}/config", "pool.json", "config does not match its sum (edited by hand?)"
        )

    def check_tokenizer(self, name: str) -> list[BadBlock]:
        """Model ``name``'s tokenizer files that are missing or do not match their sums."""
        bad = []
        for rel, digest in self.model(name).tokenizer.items():
            path = resolve_inside(self.root, rel)
            if not path.is_file():
                bad.append(BadBlock(f"{name}/tokenizer", rel, "file missing"))
            elif sha256_file(path) != digest:
                bad.append(
                    BadBlock(
                        f"{name}/tokenizer", rel, "sha256 mismatch (file corrupted or modified)"
                    )
                )
        return bad

    def unsummed(self) -> list[str]:
        """Models whose config has no recorded sum (pools written by format 1)."""
        return sorted(n for n, m in self.models.items() if m.config_sha256 is None)

    def max_positions(self, name: str) -> int | None:
        """The most tokens one sequence of model ``name`` may have (families with learned
        positions); ``None`` when its positions are rotary."""
        return self.family(name).max_positions(self.config(name))

    def config(self, name: str, attn_implementation: str = "sdpa") -> Any:
        """The transformers config of model ``name``, ready to build layers from.

        Raises:
            IntegrityError: the config in ``pool.json`` does not match its sum.
        """
        from transformers import AutoConfig

        bad = self.check_config(name)
        if bad is not None:
            raise IntegrityError(
                f"model {name!r}: its config in {self.root / 'pool.json'} does not match its "
                f"sum (edited by hand?); run assy verify-pool {self.root} and rebuild the model"
            )
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
        for bad in self.check_tokenizer(name):
            raise IntegrityError(
                f"{bad.file}: tokenizer file of {name!r}: {bad.reason}; run assy verify-pool "
                f"{self.root} and rebuild the model"
            )
        directory = resolve_inside(self.root, next(iter(files))).parent
        try:
            return AutoTokenizer.from_pretrained(directory, local_files_only=True)
        # the Rust tokenizers library raises plain Exception for a malformed tokenizer.json
        except Exception as e:  # noqa: BLE001
            raise IntegrityError(
                f"model {name!r}: its tokenizer files in {directory} cannot be loaded "
                f"({type(e).__name__}: {str(e)[:200]}); rebuild the model from its source"
            ) from None

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
        """Everything a run depends on that is missing or does not match its sum: block
        files, tokenizer files and (format 2) model configs."""
        bad = [bad for bid in self.blocks if (bad := self.check_block(bid)) is not None]
        for name in self.models:
            bad += self.check_tokenizer(name)
            if (config := self.check_config(name)) is not None:
                bad.append(config)
        return bad

    def ensure_verified(self, bid: str) -> Path:
        """Check block ``bid``'s file against its sum unless it was checked and has not
        changed since (same size and modification time); return its path.

        Raises:
            IntegrityError: the file is missing or does not match its sum.
        """
        path = self.path(bid)
        key = self._stat_key(bid, path)
        if self._checked.get(bid) != key:
            bad = self.check_block(bid)
            if bad is not None:
                raise IntegrityError(
                    f"block {bid} ({bad.file}): {bad.reason}; run assy verify-pool {self.root} "
                    "and rebuild the pool"
                )
            self._checked[bid] = key
        return path

    def _stat_key(self, bid: str, path: Path) -> tuple[int, int]:
        try:
            stat = path.stat()
        except OSError as e:
            raise IntegrityError(
                f"block {bid}: cannot read {self.blocks[bid].file} ({e})"
            ) from None
        return stat.st_size, stat.st_mtime_ns

    def load_tensors(
        self,
        bid: str,
        *,
        verify: bool = True,
        tied: bool = True,
        fresh: bool = False,
        one_buffer: bool = False,
    ) -> dict[str, torch.Tensor]:
        """A block's tensors by their names inside the block module, in buffers of their own.

        Files are read with positioned reads into freshly allocated tensors (nothing stays
        mapped). A file's sum is checked on its first read, while reading (no extra pass),
        and again whenever its size or modification time changed since (a swapper re-reads
        blocks, and a file changed during a run must not be used); ``fresh`` is accepted for
        compatibility and changes nothing. With ``tied``, weights stored once in another
        block (a tied LM head) are resolved and included. Quantized tensors (int8, nf4, fp4
        in bitsandbytes' layout) are dequantized to the dtype they were quantized from, so a
        caller always gets plain tensors (see :mod:`blockpool.quant.formats`).
        ``one_buffer``: the block file's tensors are views of one buffer read at once
        (:func:`~blockpool.reads.read_tensors`; for modules that only run).

        Raises:
            IntegrityError: the block (or the block it shares a tied weight with) is corrupted.
        """
        if bid not in self.blocks:
            raise UsageError(f"no block {bid!r} in pool {self.root}")
        entry = self.blocks[bid]
        state = dequantize_block(self._read(bid, verify, one_buffer=one_buffer), entry.quant)
        for local, ref in entry.tied.items() if tied else ():
            src_bid, _, src_local = ref.partition(":")
            src = self._read(src_bid, verify, only=src_local)
            state[local] = dequantize_block(src, self.blocks[src_bid].quant)[src_local]
        return state

    def _read(
        self, bid: str, verify: bool, only: str | None = None, *, one_buffer: bool = False
    ) -> dict[str, torch.Tensor]:
        """A block file's tensors (those of logical tensor ``only``), hashed while read
        unless the file was checked and is unchanged."""
        entry = self.blocks[bid]
        path = self.path(bid)
        key = self._stat_key(bid, path)
        try:
            if not verify or self._checked.get(bid) == key:
                names = None
                if only:
                    names = companions(only, read_header(path)[1])
                return read_tensors(path, names, one_buffer=one_buffer)
            hasher = hashlib.sha256()
            state = read_tensors(path, hasher=hasher, one_buffer=one_buffer and not only)
        except (OSError, IntegrityError) as e:
            raise IntegrityError(f"block {bid}: cannot read {entry.file} ({e})") from None
        if hasher.hexdigest() != entry.sha256:
            self._checked.pop(bid, None)
            raise IntegrityError(
                f"block {bid} ({entry.file}): sha256 mismatch (file corrupted or modified); "
                f"run assy verify-pool {self.root} and rebuild the pool"
            )
        self._checked[bid] = key
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
        shared: Mapping[str, torch.Tensor | PackedWeight] | None = None,
        packed: bool = False,
        one_buffer: bool = False,
    ) -> nn.Module:
        """The runnable module of one block, weights loaded at ``dtype``, in eval mode.

        Layers are transformers' own layer classes (``LlamaDecoderLayer``, ``BertLayer``, …);
        embeddings and heads are the family's small wrappers. ``fresh``: see
        :meth:`load_tensors`. ``shared``: tensors (or packed weights) already in memory by
        ``"<block>:<name>"`` (a tied LM head then uses its embedding's tensor instead of a
        second copy). ``packed``: quantized matrices stay packed and are dequantized at each
        use (:mod:`blockpool.quant.packed`; what the runners do); otherwise they are
        dequantized here, once (what code that reads or changes weights needs).
        ``one_buffer``: a plain block stored at ``dtype`` is read into one buffer whose
        views are its weights (faster to load; such weights cannot be saved as they are:
        for modules that only run, like a swapper's).
        """
        module = self.empty_module(bid, config)
        entry = self.blocks[bid]
        if packed and (
            entry.quant or any(self.blocks[r.split(":")[0]].quant for r in entry.tied.values())
        ):
            return self._build_packed(bid, module, dtype, shared or {})
        tied = {local: shared[ref] for local, ref in entry.tied.items() if shared and ref in shared}
        whole = one_buffer and not entry.tied and FLOAT_PRECISIONS.get(entry.precision) == dtype
        loaded = self.load_tensors(bid, fresh=fresh, tied=not tied, one_buffer=whole)
        for local, ref in entry.tied.items() if tied else ():
            if local not in tied:  # a tie the caller could not serve: read it
                src_bid, _, src_local = ref.partition(":")
                loaded[local] = self.load_tensors(src_bid)[src_local]
        state = {k: cast(v, dtype) for k, v in loaded.items()}
        state |= tied
        self._check_shapes(bid, module, state)
        missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise IntegrityError(
                f"block {bid}: tensors do not fit its {type(module).__name__} "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        return module.eval()

    def _build_packed(
        self,
        bid: str,
        module: nn.Module,
        dtype: torch.dtype,
        shared: Mapping[str, torch.Tensor | PackedWeight],
    ) -> nn.Module:
        """:meth:`build_module` with the block's quantized matrices (and those of the
        weights it is tied to) kept packed."""
        entry = self.blocks[bid]
        stored = self._read(bid, verify=True)
        state: dict[str, torch.Tensor | PackedWeight] = {}
        for name in (entry.quant or {}).get("tensors", ()):
            if name in stored:
                state[name] = _pack(name, stored, entry.quant, dtype)
        for local, ref in entry.tied.items():
            if ref in shared:
                state[local] = shared[ref]
                continue
            src_bid, _, src_local = ref.partition(":")
            src = self._read(src_bid, True, only=src_local)
            quant = self.blocks[src_bid].quant
            if quant and src_local in quant["tensors"]:
                state[local] = _pack(src_local, src, quant, dtype)
            else:
                state[local] = src[src_local]
        for name, t in stored.items():
            state[name] = cast(t, dtype)
        self._check_shapes(bid, module, state)
        plain = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        missing, unexpected = module.load_state_dict(plain, strict=False, assign=True)
        missing = [k for k in missing if k not in state]
        if missing or unexpected:
            raise IntegrityError(
                f"block {bid}: tensors do not fit its {type(module).__name__} "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        for name, weight in state.items():
            if isinstance(weight, PackedWeight):
                pack_module(module.get_submodule(name.rpartition(".")[0]), weight)
        return module.eval()

    def _check_shapes(self, bid: str, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Refuse, before anything is loaded into ``module``, a tensor whose shape is not the
        one the block's family and its model's config give it."""
        expected = module.state_dict()
        for name, tensor in state.items():
            want = expected.get(name)
            shape = tensor.shape if isinstance(tensor, torch.Tensor) else tensor.layout_shape
            if want is not None and tuple(want.shape) != tuple(shape):
                entry = self.blocks[bid]
                raise IntegrityError(
                    f"block {bid}: tensor {name} has shape {tuple(shape)}, but the "
                    f"{entry.family} config of model {entry.model!r} implies "
                    f"{tuple(want.shape)}; the block file or the model's config in pool.json "
                    f"was changed: run assy verify-pool {self.root} and rebuild the model"
                )


def _pack(
    name: str, stored: dict[str, torch.Tensor], quant: Mapping[str, Any], dtype: torch.dtype
) -> PackedWeight:
    """Take logical tensor ``name``'s stored tensors out of ``stored``, as a packed weight."""
    prefix = name[: -len("weight")]
    own = {k[len(prefix) :]: stored.pop(k) for k in companions(name, list(stored))}
    if len(own) < 2:
        raise IntegrityError(
            f"tensor {name} is listed as {quant['precision']} but its quantization state "
            "is missing; the block was written inconsistently, rebuild it"
        )
    return PackedWeight(own, dtype, transposed=name in quant.get("transposed", ()))


def rehash_pool(root: str | Path, *, wait: bool = False) -> list[BadBlock]:
    """Give a pool of an older format the sums the current format records, after checking
    everything it can: what is bad is returned and nothing is written.

    The sums added are those computable from the pool itself (each model's config, as it
    is now). Holds the pool's write lock.

    Returns:
        The bad items (empty when the pool was rewritten at the current format).
    """
    from blockpool.lock import pool_lock

    root = Path(root)
    Pool(root)  # a missing or malformed pool is refused before the lock creates anything
    with pool_lock(root, wait=wait):
        pool = Pool(root)
        bad = pool.verify()
        if not bad:
            write_manifest(root, pool.manifest)
    return bad


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

"""Typed, frozen entries of the pool manifest: written in one place, read everywhere.

``pool.json`` (see :mod:`blockpool.manifest`) holds a :class:`ModelEntry` per model and a
:class:`BlockEntry` per block. Code reads their attributes (``entry.kind``,
``model.blocks``) rather than raw dict keys; :meth:`to_json` / :meth:`from_json` are the
only places that know the JSON layout. Keys this version does not know are kept in
``extra`` and written back unchanged, so a newer writer's fields survive.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

__all__ = [
    "FORMAT_VERSION",
    "READABLE_VERSIONS",
    "BlockEntry",
    "Interface",
    "Manifest",
    "ModelEntry",
    "Parent",
    "block_header",
    "config_digest",
]


FORMAT_VERSION = 2
"""The version of ``pool.json`` and block headers this code writes.

2: model configs are summed (``config_sha256``), built blocks record the sum of the source
tensors they were made from (``source_sha256``), block files and tokenizer directories are
content-addressed. A pool of version 1 still opens; it gains the new sums on its next
write or with ``assy verify-pool --rehash``.
"""

READABLE_VERSIONS = (1, 2)
"""The versions of ``pool.json`` this code opens."""


def config_digest(config: Mapping[str, Any]) -> str:
    """The sha256 of a model config as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Interface:
    """What a block expects and produces: width, positions, attention, normalization."""

    hidden_size: int
    position: str  # "rotary" or "absolute"
    attention: str  # "causal" or "bidirectional"
    norm: str  # "pre" or "post"

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Parent:
    """The block a variant was made from: its id, its sum, and its pool (``.``: this one)."""

    block: str
    sha256: str
    pool: str

    def to_json(self) -> dict[str, Any]:
        return {"block": self.block, "sha256": self.sha256, "pool": self.pool}


class _Readable:
    """Transitional ``entry["key"]`` read access for code written against the raw JSON
    dicts; new code reads attributes."""

    def __getitem__(self, key: str) -> Any:
        value = self.to_json().get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_json().get(key, default)

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError


_MISSING = object()


@dataclass(frozen=True)
class BlockEntry(_Readable):
    """One block of the pool.

    Attributes:
        id: ``<model>/<kind>/<index>``.
        file: the pool-relative safetensors file.
        model, kind, index, family: where it belongs (``kind``: embed, layer or head).
        precision: ``fp32``, ``bf16``, ``fp16``, ``int8``, ``nf4``, ``fp4``.
        sha256: the file's sum; bytes: its size.
        sparsity: fraction of zeros of its pruned matrices (0 if none).
        interface: width, positions, attention and norm (see :class:`Interface`).
        parent: the block it is a variant of, ``None`` for a block built from a source.
        tied: local tensor name -> ``<block id>:<tensor>`` of a weight stored elsewhere.
        tensors: the tensor names the file holds (inside the block module).
        quant: quantization state description of a quantized block.
        params: weights stored (quantized tensors counted at their dequantized size).
        pruning: how it was pruned (method, target).
        source_sha256: sum of the source tensors it was built from (names, dtypes, shapes,
            bytes), for a block built from a checkpoint (format 2).
        extra: manifest keys this version does not know (kept, written back).
    """

    id: str
    file: str
    model: str
    kind: str
    index: int
    family: str
    precision: str
    sha256: str
    bytes: int
    sparsity: float = 0.0
    interface: Interface | None = None
    parent: Parent | None = None
    tied: Mapping[str, str] = field(default_factory=dict)
    tensors: tuple[str, ...] = ()
    quant: Mapping[str, Any] | None = None
    params: int | None = None
    pruning: Mapping[str, Any] | None = None
    source_sha256: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def hidden_size(self) -> int:
        return self.interface.hidden_size if self.interface else 0

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "file": self.file,
            "model": self.model,
            "kind": self.kind,
            "index": self.index,
            "family": self.family,
            "precision": self.precision,
            "sparsity": self.sparsity,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "interface": self.interface.to_json() if self.interface else None,
            "parent": self.parent.to_json() if self.parent else None,
            "tied": dict(self.tied),
            "tensors": list(self.tensors),
        }
        for key in ("quant", "params", "pruning", "source_sha256"):
            if getattr(self, key) is not None:
                doc[key] = getattr(self, key)
        return {**doc, **self.extra}

    @classmethod
    def from_json(cls, bid: str, doc: Mapping[str, Any]) -> BlockEntry:
        known = {f.name for f in fields(cls)} - {"id", "extra"}
        interface = doc.get("interface")
        parent = doc.get("parent")
        return cls(
            id=bid,
            file=doc["file"],
            model=doc["model"],
            kind=doc["kind"],
            index=int(doc["index"]),
            family=doc["family"],
            precision=doc["precision"],
            sha256=doc["sha256"],
            bytes=int(doc["bytes"]),
            sparsity=float(doc.get("sparsity", 0.0)),
            interface=Interface(**interface) if interface else None,
            parent=Parent(**parent) if parent else None,
            tied=dict(doc.get("tied") or {}),
            tensors=tuple(doc.get("tensors") or ()),
            quant=doc.get("quant"),
            params=int(doc["params"]) if doc.get("params") is not None else None,
            pruning=doc.get("pruning"),
            source_sha256=doc.get("source_sha256"),
            extra={k: v for k, v in doc.items() if k not in known},
        )

    def but(self, **changes: Any) -> BlockEntry:
        """A copy with ``changes`` (entries are frozen)."""
        return replace(self, **changes)


@dataclass(frozen=True)
class ModelEntry(_Readable):
    """One model of the pool.

    Attributes:
        name: its name in the pool.
        family: its family spec's name.
        config: its transformers config, as a dict.
        blocks: its block ids in execution order.
        source: ``{"origin", "fingerprint", "sha256"}`` of the checkpoint it was built from
            (``sha256``: one sum over its config and its blocks' ``source_sha256``).
        tokenizer: pool-relative tokenizer file -> sha256.
        config_sha256: the sum of ``config`` (:func:`config_digest`), format 2.
        ignored: source tensors that are not weights (stale buffers), not stored.
        parent_model: the model it is a variant of, ``None`` if built from a source.
        extra: manifest keys this version does not know (kept, written back).
    """

    name: str
    family: str
    config: Mapping[str, Any]
    blocks: tuple[str, ...]
    source: Mapping[str, Any] = field(default_factory=dict)
    tokenizer: Mapping[str, str] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()
    parent_model: str | None = None
    config_sha256: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def origin(self) -> str:
        return str(self.source.get("origin", ""))

    def to_json(self) -> dict[str, Any]:
        doc = {
            "family": self.family,
            "config": dict(self.config),
            "blocks": list(self.blocks),
            "source": dict(self.source),
            "tokenizer": dict(self.tokenizer),
            "ignored": list(self.ignored),
        }
        if self.parent_model is not None:
            doc["parent_model"] = self.parent_model
        if self.config_sha256 is not None:
            doc["config_sha256"] = self.config_sha256
        return {**doc, **self.extra}

    @classmethod
    def from_json(cls, name: str, doc: Mapping[str, Any]) -> ModelEntry:
        known = {f.name for f in fields(cls)} - {"name", "extra"}
        return cls(
            name=name,
            family=doc["family"],
            config=dict(doc["config"]),
            blocks=tuple(doc.get("blocks") or ()),
            source=dict(doc.get("source") or {}),
            tokenizer=dict(doc.get("tokenizer") or {}),
            ignored=tuple(doc.get("ignored") or ()),
            parent_model=doc.get("parent_model"),
            config_sha256=doc.get("config_sha256"),
            extra={k: v for k, v in doc.items() if k not in known},
        )

    def but(self, **changes: Any) -> ModelEntry:
        """A copy with ``changes`` (entries are frozen)."""
        return replace(self, **changes)


@dataclass
class Manifest:
    """The whole of ``pool.json``: its format version, models and blocks (mutable while a
    writer builds it; entries themselves are frozen)."""

    format_version: int
    models: dict[str, ModelEntry]
    blocks: dict[str, BlockEntry]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "models": {n: m.to_json() for n, m in self.models.items()},
            "blocks": {b: e.to_json() for b, e in self.blocks.items()},
            **self.extra,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Manifest:
        return cls(
            format_version=doc["format_version"],
            models={n: ModelEntry.from_json(n, m) for n, m in doc["models"].items()},
            blocks={b: BlockEntry.from_json(b, e) for b, e in doc["blocks"].items()},
            extra={k: v for k, v in doc.items() if k not in ("format_version", "models", "blocks")},
        )


def block_header(
    bid: str, family: str, kind: str, index: int, precision: str, **extra: str
) -> dict[str, str]:
    """The metadata a block file carries in its safetensors header (str -> str).

    ``extra``: ``source_sha256`` (the sum of the source tensors, for a built block),
    ``parent`` (the parent block's id, for a variant), ``quant``, ``params``, pruning
    details.
    """
    return {
        "block_id": bid,
        "family": family,
        "kind": kind,
        "index": str(index),
        "precision": precision,
        "format_version": str(FORMAT_VERSION),
        **extra,
    }

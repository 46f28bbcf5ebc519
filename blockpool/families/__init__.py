"""Architecture families: which tensors form which block, and how a block becomes a module.

A family is data (:class:`FamilySpec`) plus, where data cannot say it, a small builder of
the embedding and head modules. Layer modules are transformers' own layer classes.
Adding a family means adding one module here that defines ``SPEC`` and listing it in
``_MODULES``; nothing outside this package branches on a family's name.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from blockpool.errors import UnsupportedArchitecture

__all__ = ["REGISTRY", "FamilySpec", "family_for_config", "get_family", "import_object"]

BlockKind = Literal["embed", "layer", "head"]


@dataclass(frozen=True)
class FamilySpec:
    """What a family's checkpoint looks like, block by block.

    Tensor names are the canonical transformers names of the family's ``*ForCausalLM``
    (decoders) or base ``*Model`` (encoders) class. ``embed`` and ``head`` map a source name
    prefix to the prefix the tensor takes inside the block's module; ``layer`` is the prefix
    of layer ``i`` (``{i}`` is substituted), stripped inside the layer module.

    Attributes:
        name: registry name, also written into every block's metadata.
        model_types: ``config.model_type`` values this family serves.
        layer_class: dotted path of the transformers layer class, built as ``cls(config, i)``.
        embed: source prefix -> module prefix of the embedding block.
        layer: source prefix of layer ``i``.
        head: source prefix -> module prefix of the head block.
        build_embed: ``config -> nn.Module`` whose ``forward(input_ids, attention_mask,
            position_ids, past_length)`` returns hidden states ``[B, T, d]``.
        build_head: ``config -> nn.Module`` mapping hidden states to logits (decoders) or to
            the pooled output (encoders).
        tied: target name -> source name of weights shared when ``config.tie_word_embeddings``.
        rotary_class: dotted path of the rotary embedding class, ``None`` for absolute positions.
        rotary_per_layer_type: the rotary module takes the layer type (Gemma3 local/global).
        causal: decoder (causal mask, logits) or encoder (bidirectional, hidden states).
        norm: ``"pre"`` or ``"post"`` layer normalization (interface information).
        rename: ``(regex, replacement)`` pairs that map other checkpoint layouts onto the
            canonical names (``bert.`` prefixes, GPT-2 base-model keys).
        ignore: regexes of source tensors that are not weights (stale buffers).
        conv1d: name suffixes of ``Conv1D`` weights stored ``[in, out]`` (GPT-2).
        cache_kwarg: the keyword under which a layer takes the KV cache; ``None``: read it
            off the installed layer class (``cache`` in transformers >= 5.24, else
            ``past_key_values``).
        learned_positions: the config key giving the size of a learned position table
            (``None``: rotary positions, no limit from the weights).
        position_offset: a config key whose value + 1 is the first position used (RoBERTa
            numbers positions after its padding index).
    """

    name: str
    model_types: tuple[str, ...]
    layer_class: str
    embed: Mapping[str, str]
    layer: str
    head: Mapping[str, str]
    build_embed: Callable[[Any], Any]
    build_head: Callable[[Any], Any]
    tied: Mapping[str, str] = field(default_factory=dict)
    rotary_class: str | None = None
    rotary_per_layer_type: bool = False
    causal: bool = True
    norm: Literal["pre", "post"] = "pre"
    rename: tuple[tuple[str, str], ...] = ()
    ignore: tuple[str, ...] = ()
    conv1d: tuple[str, ...] = ()
    cache_kwarg: str | None = None
    learned_positions: str | None = None
    position_offset: str | None = None

    def max_positions(self, config: Any) -> int | None:
        """The most tokens (context included) one sequence may have, where the family has
        learned positions; ``None`` for rotary families."""
        if self.learned_positions is None:
            return None
        limit = int(getattr(config, self.learned_positions))
        if self.position_offset is not None:
            limit -= int(getattr(config, self.position_offset) or 0) + 1
        return limit

    @property
    def position(self) -> str:
        """``"rotary"`` or ``"absolute"``: how the family encodes positions."""
        return "rotary" if self.rotary_class else "absolute"

    def canonical_name(self, name: str) -> str:
        """A source tensor name mapped onto the canonical layout."""
        for pattern, replacement in self.rename:
            name = re.sub(pattern, replacement, name)
        return name

    def is_ignored(self, name: str) -> bool:
        """Whether a source tensor is a buffer rather than a weight."""
        return any(re.search(pattern, name) for pattern in self.ignore)

    def locate(self, name: str) -> tuple[BlockKind, int, str] | None:
        """The block a canonical tensor belongs to: ``(kind, index, name inside the module)``.

        Returns ``None`` for a tensor that belongs to no block.
        """
        for prefix, local in self.embed.items():
            if name.startswith(prefix):
                return "embed", 0, local + name[len(prefix) :]
        match = self._layer_re.match(name)
        if match:
            return "layer", int(match.group(1)), name[match.end() :]
        for prefix, local in self.head.items():
            if name.startswith(prefix):
                return "head", 0, local + name[len(prefix) :]
        return None

    @property
    def _layer_re(self) -> re.Pattern[str]:
        return re.compile(re.escape(self.layer).replace(r"\{i\}", r"(\d+)"))

    def layer_type(self, config: Any, index: int) -> str:
        """The attention type of layer ``index`` (``full_attention`` or ``sliding_attention``)."""
        types = getattr(config, "layer_types", None)
        return types[index] if types else "full_attention"


def import_object(path: str) -> Any:
    """Import ``package.module.Name`` lazily, so that listing families stays cheap."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


_MODULES = ("llama", "gemma3", "qwen2", "gpt2", "opt", "gpt_neox", "bert", "roberta")


def _load_registry() -> dict[str, FamilySpec]:
    specs = [importlib.import_module(f"{__name__}.{m}").SPEC for m in _MODULES]
    return {spec.name: spec for spec in specs}


REGISTRY: dict[str, FamilySpec] = _load_registry()


def get_family(name: str) -> FamilySpec:
    """The spec registered as ``name``."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnsupportedArchitecture(
            f"unknown family {name!r}; supported families: {', '.join(sorted(REGISTRY))}"
        ) from None


def family_for_config(config: Any) -> FamilySpec:
    """The spec that serves a transformers config, by its ``model_type``.

    Raises:
        UnsupportedArchitecture: no family covers the config; the message lists the
            supported families.
    """
    model_type = getattr(config, "model_type", None)
    for spec in REGISTRY.values():
        if model_type in spec.model_types:
            return spec
    archs = ", ".join(getattr(config, "architectures", None) or []) or "?"
    raise UnsupportedArchitecture(
        f"unsupported architecture: model_type {model_type!r} ({archs}); supported families: "
        + ", ".join(f"{s.name} ({'/'.join(s.model_types)})" for s in REGISTRY.values())
    )

"""The assembly recipe: an anchor, an ordered list of slices, and the adapters at seams.

In the spirit of mergekit's ``slices``: a recipe says *what* to assemble, validated once
against a pool, and pins the sums of every pool block it uses::

    format_version: 1
    anchor: smollm2-135m              # tokenizer, embedding and head
    slices:
    - {model: smollm2-135m, layers: [0, 17]}
    - {model: gemma3-270m, layers: [11, 13]}
    - {model: smollm2-135m, layers: [24, 29]}
    seams:                             # before: the slice it leads into (len(slices): the head)
    - {before: 1, kind: affine, adapter: adapters/seam-1.safetensors, sha256: ...}
    - {before: 2, kind: affine, adapter: adapters/seam-2.safetensors, sha256: ...}
    blocks: {smollm2-135m/embed/0: <sha256>, ...}

A slice's ``variant`` names a pool model derived from ``model`` (a pruned, fine-tuned or
shuffled copy: its ``parent_model`` chain leads to ``model``); its blocks are used instead.
Seam kinds: ``affine`` (a projection d_src -> d_dst with bias), ``diagonal`` (a scale and
shift per dimension, equal widths) and ``identity``; ``cross_attention`` adds a gated
cross-attention sublayer (:mod:`assy.assembly.adapter`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from assy.errors import UsageError

__all__ = [
    "FORMAT_VERSION",
    "SEAM_KINDS",
    "Recipe",
    "SeamSpec",
    "Slice",
    "chain_layout",
    "describe_recipe",
    "lineage",
    "load_recipe",
    "n_layers",
    "pin_blocks",
    "plan_replacements",
    "recipe_to_dict",
    "slice_block_ids",
    "validate_recipe",
    "width",
]

FORMAT_VERSION = 1
SEAM_KINDS = ("affine", "diagonal", "identity")


@dataclass(frozen=True)
class Slice:
    """Layers ``first..last`` (inclusive) of a pool model.

    Attributes:
        model: the model the layers belong to.
        layers: ``(first, last)`` layer indices, inclusive.
        variant: a pool model derived from ``model`` whose blocks are used instead.
    """

    model: str
    layers: tuple[int, int]
    variant: str | None = None

    @property
    def source(self) -> str:
        """The pool model whose blocks the slice uses."""
        return self.variant or self.model

    def __str__(self) -> str:
        name = self.model if self.variant is None else f"{self.model}[{self.variant}]"
        return f"{name} {self.layers[0]}-{self.layers[1]}"


@dataclass(frozen=True)
class SeamSpec:
    """The adapter at one seam.

    Attributes:
        before: index of the slice the seam leads into; ``len(slices)``: the head.
        kind: ``affine``, ``diagonal`` or ``identity``.
        cross_attention: ``(heads, dim)`` of the gated cross-attention sublayer, or ``None``.
        adapter: the adapter file, relative to the assembly directory.
        sha256: the adapter file's sum.
    """

    before: int
    kind: str = "affine"
    cross_attention: tuple[int, int] | None = None
    adapter: str | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class Recipe:
    """What to assemble (see the module docstring).

    Attributes:
        anchor: the model giving tokenizer, embedding and head.
        slices: the layer slices, in execution order.
        seams: the adapters, ordered by ``before``.
        blocks: pinned sums, block id -> sha256 (empty until :func:`pin_blocks`).
    """

    anchor: str
    slices: tuple[Slice, ...]
    seams: tuple[SeamSpec, ...] = ()
    blocks: Mapping[str, str] = field(default_factory=dict)

    def seam_at(self, before: int) -> SeamSpec | None:
        return next((s for s in self.seams if s.before == before), None)

    def fingerprint(self) -> str:
        """A sum of everything but the adapter files: what an adapter was fitted for."""
        data = recipe_to_dict(self)
        for seam in data["seams"]:
            seam.pop("adapter", None)
            seam.pop("sha256", None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def describe_recipe(recipe: Recipe) -> str:
    """A recipe on one line, as the commands print it (a plan's: ``plan.recipe``):
    ``smollm2-135m: smollm2-135m 0-19 + gemma3-270m 12-14, 2 seams`` (each slice by the
    pool model whose blocks it uses; ``single model`` when it has no seam)."""
    slices = " + ".join(f"{s.source} {s.layers[0]}-{s.layers[1]}" for s in recipe.slices)
    n = len(recipe.seams)
    seams = "single model" if n == 0 else f"{n} seam{'s' if n != 1 else ''}"
    return f"{recipe.anchor}: {slices}, {seams}"


# --------------------------------------------------------------------------- (de)serialize


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain data (what ``recipe.yaml`` holds)."""
    slices = []
    for s in recipe.slices:
        entry: dict[str, Any] = {"model": s.model, "layers": list(s.layers)}
        if s.variant is not None:
            entry["variant"] = s.variant
        slices.append(entry)
    seams = []
    for s in recipe.seams:
        entry = {"before": s.before, "kind": s.kind}
        if s.cross_attention is not None:
            entry["cross_attention"] = {"heads": s.cross_attention[0], "dim": s.cross_attention[1]}
        if s.adapter is not None:
            entry["adapter"], entry["sha256"] = s.adapter, s.sha256
        seams.append(entry)
    return {
        "format_version": FORMAT_VERSION,
        "anchor": recipe.anchor,
        "slices": slices,
        "seams": seams,
        "blocks": dict(sorted(recipe.blocks.items())),
    }


def _int_pair(value: Any, where: str) -> tuple[int, int]:
    ok = (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    )
    if not ok:
        raise UsageError(f"{where}: layers must be [first, last] (two integers), got {value!r}")
    return int(value[0]), int(value[1])


def _slice_from(data: Any, where: str) -> Slice:
    if not isinstance(data, Mapping) or "model" not in data or "layers" not in data:
        raise UsageError(f"{where}: a slice is {{model: NAME, layers: [first, last]}}")
    unknown = set(data) - {"model", "layers", "variant"}
    if unknown:
        raise UsageError(f"{where}: unknown keys {sorted(unknown)}")
    variant = data.get("variant")
    if variant is not None and not isinstance(variant, str):
        raise UsageError(f"{where}: variant must be a model name")
    return Slice(str(data["model"]), _int_pair(data["layers"], where), variant)


def _seam_from(data: Any, where: str) -> SeamSpec:
    if not isinstance(data, Mapping) or not isinstance(data.get("before"), int):
        raise UsageError(f"{where}: a seam is {{before: SLICE_INDEX, kind: ..., adapter: FILE}}")
    unknown = set(data) - {"before", "kind", "cross_attention", "adapter", "sha256"}
    if unknown:
        raise UsageError(f"{where}: unknown keys {sorted(unknown)}")
    kind = data.get("kind", "affine")
    if kind not in SEAM_KINDS:
        raise UsageError(f"{where}: kind {kind!r} is not one of {', '.join(SEAM_KINDS)}")
    xattn = data.get("cross_attention")
    if xattn is not None:
        if not isinstance(xattn, Mapping) or not {"heads", "dim"} <= set(xattn):
            raise UsageError(f"{where}: cross_attention is {{heads: H, dim: D}}")
        heads, dim = int(xattn["heads"]), int(xattn["dim"])
        if heads < 1 or dim < heads or dim % heads:
            raise UsageError(f"{where}: cross_attention dim {dim} must be a multiple of {heads}")
        xattn = (heads, dim)
    adapter, digest = data.get("adapter"), data.get("sha256")
    if (adapter is None) != (digest is None):
        raise UsageError(f"{where}: an adapter file needs its sha256 (and a sha256 its file)")
    return SeamSpec(int(data["before"]), kind, xattn, adapter, digest)


def recipe_from_dict(data: Any, where: str = "recipe") -> Recipe:
    """Parse plain data into a :class:`Recipe` (shape only; see :func:`validate_recipe`).

    Raises:
        UsageError: a missing or malformed field; the message names the slot.
    """
    if not isinstance(data, Mapping):
        raise UsageError(f"{where}: not a recipe (expected a mapping with anchor and slices)")
    if data.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise UsageError(
            f"{where}: format_version {data.get('format_version')!r}; this assy reads "
            f"{FORMAT_VERSION}"
        )
    if not isinstance(data.get("anchor"), str):
        raise UsageError(f"{where}: anchor must name a model")
    raw_slices = data.get("slices")
    if not isinstance(raw_slices, list) or not raw_slices:
        raise UsageError(f"{where}: slices must be a non-empty list")
    slices = tuple(_slice_from(s, f"slices[{i}]") for i, s in enumerate(raw_slices))
    raw_seams = data.get("seams") or []
    if not isinstance(raw_seams, list):
        raise UsageError(f"{where}: seams must be a list")
    seams = tuple(_seam_from(s, f"seams[{i}]") for i, s in enumerate(raw_seams))
    blocks = data.get("blocks") or {}
    if not isinstance(blocks, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in blocks.items()
    ):
        raise UsageError(f"{where}: blocks must map block ids to sha256 sums")
    return Recipe(data["anchor"], slices, seams, dict(blocks))


def load_recipe(path: Path) -> Recipe:
    """Read ``recipe.yaml``.

    Raises:
        UsageError: missing, unreadable or malformed file (the message names the slot).
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such recipe file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return recipe_from_dict(data, str(path))


def dump_recipe(recipe: Recipe) -> str:
    """``recipe.yaml`` text: slices and seams one per line, block sums last."""
    import yaml

    data = recipe_to_dict(recipe)
    head = {k: data[k] for k in ("format_version", "anchor")}
    lines = [yaml.safe_dump(head, sort_keys=False).rstrip()]
    for key in ("slices", "seams"):
        lines.append(f"{key}:" + ("" if data[key] else " []"))
        for item in data[key]:
            flow = yaml.safe_dump(item, default_flow_style=True, sort_keys=False, width=1000)
            lines.append(f"- {flow.strip()}")
    lines.append(yaml.safe_dump({"blocks": data["blocks"]}, sort_keys=False).rstrip())
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- pool checks


def lineage(pool, name: str) -> list[str]:
    """``name``, its parent model, the parent's parent, ... (the last: the original model)."""
    chain = [name]
    while (entry := pool.models.get(chain[-1])) is not None:
        parent = entry.parent_model
        if not parent or parent in chain:
            break
        chain.append(parent)
    return chain


def n_layers(pool, model: str) -> int:
    """Layer blocks of a pool model."""
    return sum(pool.blocks[b].kind == "layer" for b in pool.model(model).blocks)


def width(pool, model: str) -> int:
    """Hidden size of a pool model."""
    return int(pool.blocks[pool.model(model).blocks[0]].interface.hidden_size)


def slice_block_ids(pool, s: Slice) -> list[str]:
    """The layer block ids of a slice, in order."""
    by_index = {
        pool.blocks[b].index: b
        for b in pool.model(s.source).blocks
        if pool.blocks[b].kind == "layer"
    }
    return [by_index[i] for i in range(s.layers[0], s.layers[1] + 1)]


def _models(pool) -> str:
    return ", ".join(sorted(pool.models)) or "none"


def _check_slice(pool, s: Slice, where: str) -> None:
    if s.model not in pool.models:
        raise UsageError(
            f"{where}: no model {s.model!r} in pool {pool.root} (models: {_models(pool)})"
        )
    if s.variant is not None:
        if s.variant not in pool.models:
            raise UsageError(
                f"{where}: no variant {s.variant!r} of {s.model} in pool {pool.root} "
                f"(models: {_models(pool)})"
            )
        if s.model not in lineage(pool, s.variant)[1:]:
            raise UsageError(f"{where}: {s.variant} is not a variant of {s.model}")
    n = n_layers(pool, s.source)
    first, last = s.layers
    if not 0 <= first <= last < n:
        raise UsageError(
            f"{where}: {s.source} has {n} layers, asked for {first}-{last} "
            f"(layers are 0-{n - 1}, first <= last)"
        )


def _boundary_widths(pool, recipe: Recipe) -> list[tuple[str, int, str, int]]:
    """For every boundary ``k`` (0: after the embedding, len(slices): before the head):
    ``(from name, from width, to name, to width)``."""
    names = [recipe.anchor + " embedding"] + [f"slices[{i}]" for i in range(len(recipe.slices))]
    widths = [width(pool, recipe.anchor)] + [width(pool, s.source) for s in recipe.slices]
    names.append(recipe.anchor + " head")
    widths.append(width(pool, recipe.anchor))
    return [(names[k], widths[k], names[k + 1], widths[k + 1]) for k in range(len(widths) - 1)]


def validate_recipe(recipe: Recipe, pool, *, pinned: bool = True) -> None:
    """Check a recipe against a pool; the first problem is raised, naming its slot.

    Checks the anchor (a causal model of the pool), every slice (model, variant, layer
    range), every seam (position, kind against the widths; a seam wherever widths differ)
    and, with ``pinned``, that every block it uses still has the sum the recipe pins.

    Raises:
        UsageError: the first problem found.
    """
    if recipe.anchor not in pool.models:
        raise UsageError(
            f"anchor: no model {recipe.anchor!r} in pool {pool.root} (models: {_models(pool)})"
        )
    if not pool.family(recipe.anchor).causal:
        raise UsageError(f"anchor: {recipe.anchor} is an encoder; the anchor must be a causal LM")
    for i, s in enumerate(recipe.slices):
        _check_slice(pool, s, f"slices[{i}]")
    boundaries = _boundary_widths(pool, recipe)
    previous = -1
    for i, seam in enumerate(recipe.seams):
        if not 0 <= seam.before <= len(recipe.slices) or seam.before <= previous:
            raise UsageError(
                f"seams[{i}]: before {seam.before} must be a slice index 0-{len(recipe.slices)} "
                "(the last: the head), increasing, one seam per boundary"
            )
        previous = seam.before
        src, d_in, dst, d_out = boundaries[seam.before]
        if seam.kind != "affine" and d_in != d_out:
            raise UsageError(
                f"seams[{i}]: a {seam.kind} seam needs equal widths, {src} is {d_in} wide and "
                f"{dst} {d_out}; use kind: affine"
            )
    for k, (src, d_in, dst, d_out) in enumerate(boundaries):
        if d_in != d_out and recipe.seam_at(k) is None:
            raise UsageError(
                f"{src} (hidden {d_in}) -> {dst} (hidden {d_out}): widths differ and no adapter "
                f"stands between them; add a seam {{before: {k}, kind: affine}}"
            )
    if pinned:
        _check_pins(recipe, pool)


def _check_pins(recipe: Recipe, pool) -> None:
    used = set(chain_block_ids(recipe, pool))
    if not recipe.blocks:
        raise UsageError("recipe: blocks (the pinned sums of the pool blocks it uses) are missing")
    for bid in sorted(used - set(recipe.blocks)):
        raise UsageError(f"recipe: block {bid} is used but its sum is not pinned; re-stitch")
    for bid, digest in sorted(recipe.blocks.items()):
        entry = pool.blocks.get(bid)
        if entry is None:
            raise UsageError(
                f"block {bid}: the recipe pins it but pool {pool.root} has no such block; "
                "run the assembly against the pool it was stitched from"
            )
        if entry.sha256 != digest:
            raise UsageError(
                f"block {bid}: changed since the assembly was stitched (pool sum "
                f"{entry.sha256[:12]}, recipe pins {digest[:12]}); re-stitch it against "
                "this pool"
            )


def chain_block_ids(recipe: Recipe, pool) -> list[str]:
    """Every pool block the assembly runs: anchor embedding, the slices' layers, anchor head."""
    anchor = pool.model(recipe.anchor).blocks
    layers = [b for s in recipe.slices for b in slice_block_ids(pool, s)]
    head = [b for b in anchor if pool.blocks[b].kind == "head"]
    return [anchor[0], *layers, *head]


def pin_blocks(recipe: Recipe, pool) -> Recipe:
    """The recipe with the sums of every block it uses pinned (tied blocks included)."""
    ids = chain_block_ids(recipe, pool)
    tied = {ref.partition(":")[0] for b in ids for ref in pool.blocks[b].tied.values()}
    return replace(recipe, blocks={b: pool.blocks[b].sha256 for b in sorted({*ids, *tied})})


def chain_layout(recipe: Recipe, pool) -> list[str | SeamSpec]:
    """The chain as block ids with a :class:`SeamSpec` at every seam, embedding to head."""
    anchor = pool.model(recipe.anchor).blocks
    items: list[str | SeamSpec] = [anchor[0]]
    for k, s in enumerate(recipe.slices):
        if (seam := recipe.seam_at(k)) is not None:
            items.append(seam)
        items.extend(slice_block_ids(pool, s))
    if (seam := recipe.seam_at(len(recipe.slices))) is not None:
        items.append(seam)
    items.extend(b for b in anchor if pool.blocks[b].kind == "head")
    return items


# --------------------------------------------------------------------------- from the CLI


def plan_replacements(
    pool,
    anchor: str,
    replacements: Sequence[tuple[tuple[int, int], str]],
    *,
    cross_attention: tuple[int, int] | None = None,
) -> Recipe:
    """A recipe from ``--replace C-D --insert WHAT`` pairs on the anchor's layers.

    ``WHAT`` is ``MODEL:A-B`` (layers A-B of MODEL take the place of C-D; MODEL may be a
    variant of another model), ``linear`` (one affine map fitted in closed form replaces
    them) or ``""`` (they are dropped; the exit is refitted per dimension). A slice of
    another model gets an affine adapter at each end (with ``cross_attention``, a gated
    cross-attention sublayer too); a variant of the anchor (a fine-tuned or pruned copy)
    shares its residual space and needs none.

    Raises:
        UsageError: overlapping or out-of-range replacements, a malformed insert.
    """
    if anchor not in pool.models:
        raise UsageError(
            f"--anchor: no model {anchor!r} in pool {pool.root} (models: {_models(pool)})"
        )
    n = n_layers(pool, anchor)
    order = sorted(replacements, key=lambda r: r[0])
    end = -1
    for (c, d), _ in order:
        if not 0 <= c <= d < n:
            raise UsageError(f"--replace {c}-{d}: {anchor} has {n} layers (0-{n - 1})")
        if c <= end:
            raise UsageError(f"--replace {c}-{d} overlaps an earlier --replace")
        end = d
    home = lineage(pool, anchor)[-1]  # a fine-tuned anchor's slices name its original
    mine = anchor if anchor != home else None
    slices: list[Slice] = []
    explicit: dict[int, str] = {}  # boundary -> seam kind of a dropped or linear span
    position = 0
    for (c, d), what in order:
        if position <= c - 1:
            slices.append(Slice(home, (position, c - 1), mine))
        position = d + 1
        if what in ("", "linear"):
            explicit[len(slices)] = "affine" if what == "linear" else "diagonal"
            continue
        model, layers = _parse_insert(what)
        root = lineage(pool, model)[-1]
        slices.append(Slice(root, layers, model if root != model else None))
    if position <= n - 1:
        slices.append(Slice(home, (position, n - 1), mine))
    if not slices:
        raise UsageError("nothing left: the replacements remove every layer and insert none")
    # a seam where the model family line changes (a variant of the anchor shares its space)
    roots = [home] + [s.model for s in slices] + [home]
    seams = []
    for k in range(len(slices) + 1):
        if roots[k] != roots[k + 1]:
            seams.append(SeamSpec(k, "affine", cross_attention))
        elif k in explicit:
            seams.append(SeamSpec(k, explicit[k]))
    return Recipe(anchor, tuple(slices), tuple(seams))


def _parse_insert(what: str) -> tuple[str, tuple[int, int]]:
    model, sep, span = what.rpartition(":")
    first, dash, last = span.partition("-")
    if not sep or not model or not dash or not first.isdigit() or not last.isdigit():
        raise UsageError(
            f"--insert {what!r}: expected MODEL:A-B (layers A to B of MODEL), 'linear' or '' "
            "(drop the layers)"
        )
    return model, (int(first), int(last))

"""The assembly planner: the best chain of pool blocks that fits a memory budget.

Pure: no forward pass runs here. Its inputs are

* **candidates** (:class:`Candidate`): every pool model and variant (precision, sparsity),
  with the resident bytes of each of its blocks *as the runtime holds them* (read from the
  pool's manifest and safetensors headers by :func:`pool_candidates`), its width and the
  working memory of its largest layer call (:meth:`blockpool.ChainRunner.working_bytes`);
* **compatibility** (:class:`CompatTable`): the comparator's ``w·CKA + (1 − w)·exp(−KL)``
  of ``out(a) → in(b)`` from a cached ``assy compare`` run, or nothing;
* a **budget** in bytes, the most seams allowed and a seed;

and its output is a :class:`Plan`: a :class:`~assy.assembly.recipe.Recipe` (issue 14's
format, sums not yet pinned) with its bytes, seams and scores.

**The chain.** An anchor (a causal model or a variant of one) gives the tokenizer,
embedding and head; between them runs an ordered chain of layer blocks of any candidate.
Layer ``i`` of a model of ``n`` layers covers the relative depths ``[i/n, (i+1)/n)``, and
each layer of the chain starts at or after the depth where the one before it ends (so it
never runs a model's layers backwards or twice, and the depths it covers sum to at most 1). Consecutive
layers of one model line (a model and its variants: same residual space) need no adapter;
a skipped span inside a line or a change of line gets an ``affine`` seam (a skipped span's
is ReplaceMe's linear map: on SmolLM2 at 35% of its bytes, layers 0-1 and 26-29 scored
2.21 bits per byte bridged by an affine map and 2.61 by a diagonal one).
``max_seams`` caps those seams; 0 leaves the single models and variants, whole.

**The objective** sums the compatibility of every transition into a layer, weighted by the
share of its model's depth that layer carries (``1 / n``, so chains of models with 18 and
30 layers are scored on one scale: a whole model scores 1), times the layer's quality
prior ``q`` (below); the transition into the head subtracts ``(1 − compat) / n_anchor``;
the whole is scaled by the anchor's ends' ``q``. Compatibility of a transition is, in
order: 1 for the next layer of the same model line; the comparator's score of the two
blocks, or of their parents' blocks when a variant was not captured; else the
**fallback** ``γ · max(0, 1 − 2·|depth out − depth in|)`` with ``γ = 1`` inside a model
line and ``γ = ½`` across lines (an unmeasured foreign seam is trusted half as much),
``depth out = (i + 1) / n`` of the block left, ``depth in = j / n'`` of the block entered
(the embedding leaves at 0, the head enters at 1). Every score says which source it came
from.

**Quality priors** ``q`` of a variant block: 1 at fp32/bf16/fp16; int8 0.964 and 4-bit
0.888 (the seed's Table 1, 73.1/75.8 and 67.3/75.8); a pruned block ``1 − s/2`` at
sparsity ``s``. They only rank variants against their parents; a measured proxy on local
data is what should replace them.

**Bytes** (the budget contract of DESIGN.md): the anchor's embedding and head (a tied
pair once), every layer, every adapter (its fp32 parameters and buffers), and the
runtime's working memory of one forward call of ``batch × tokens`` (the largest layer call
among the models used, plus the anchor's logits: a whole call's where the plan trains;
where it is scored -- ``assy assemble``'s plans, :class:`Candidate`'s ``scored`` -- or runs
through the swapper, one token's logits and the KV caches of the chain's layers, as the
scoring engine holds them: see :func:`plan_assembly`). Blocks are
counted as the runtime holds them (:func:`blockpool.block_nbytes`): int8 and 4-bit blocks
packed, floating ones at the compute dtype, pruned ones dense (a pruned variant saves
nothing in memory yet, and the planner says so rather than pretend otherwise).

**Search**: exact dynamic programming over the depth-ordered DAG of layers, with Pareto
labels ``(bytes, seams, score)`` per layer (a label is dropped only when another reaches
the same layer with no more bytes, no more seams and no lower score), run once per anchor
and per working-memory level. Exact, so a larger budget never gives a lower objective.
Ties go to the larger assembly (more parameters), then to a seeded random rank of the
blocks: the same seed gives the same plan.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from assy.assembly.recipe import Recipe, SeamSpec, Slice
from assy.errors import UsageError, arg
from blockpool.sizes import format_size

__all__ = [
    "CROSS_TRUST",
    "Candidate",
    "CompatTable",
    "Plan",
    "FALLBACK",
    "adapter_nbytes",
    "compat_source",
    "load_compat",
    "plan_assembly",
    "plan_candidates",
    "plan_chain",
    "plan_lines",
    "plan_shortlist",
    "pool_candidates",
    "quality_prior",
    "swap_ends_bytes",
    "uncovered_models",
]

CROSS_TRUST = 0.5  # γ of an unmeasured seam between model lines
FALLBACK = "fallback (no --compat)"  # the compatibility source recorded without --compat
_QUALITY = {"fp32": 1.0, "bf16": 1.0, "fp16": 1.0, "int8": 0.964, "nf4": 0.888, "fp4": 0.888}
_EPS = 1e-12


def quality_prior(precision: str, sparsity: float) -> float:
    """The quality prior ``q`` of a block (see the module docstring)."""
    return _QUALITY.get(precision, 0.888) * (1.0 - 0.5 * min(max(sparsity, 0.0), 1.0))


@dataclass(frozen=True)
class Candidate:
    """A pool model (or variant) as the planner sees it.

    Attributes:
        name: its pool name; root: the original model of its line (itself if none).
        causal: whether it can be an anchor (a causal LM).
        width: hidden size.
        layer_ids, layer_bytes, layer_quality: per layer block, in order.
        ends_bytes: resident bytes of its embedding and head (a tied pair once).
        ends_quality: ``q`` of its embedding and head (the lower).
        layer_work: working bytes of its largest layer call (activations, attention).
        logit_work: working bytes of its logits (as an anchor's head).
        logit_row: working bytes of one token's logits (``logit_work`` of one row).
        layer_cache: per layer, the bytes of its KV cache over the planned tokens (what a
            run through the swapper holds beside the weights it streams).
        ends_key: the sums of its embedding and head blocks ("": unknown): anchors with
            the same key and root give the same ends, and are planned once.
        scored: planned for the scoring engine (:mod:`assy.evaluation.scoring`: every
            evaluation, the measured run of ``assy assemble``): its logits count one
            token's worth (``logit_row``; the engine computes them in groups of the rows
            that fit the room left, one at the least) and its layers' KV caches count (a
            window fed in pieces, a shared context); ``False``: one whole call's logits
            and no cache, what a training step holds (the federation's adapter rounds).
        precision, sparsity: a summary for the plan (the most common / the mean).
    """

    name: str
    root: str
    causal: bool
    width: int
    layer_ids: tuple[str, ...]
    layer_bytes: tuple[int, ...]
    layer_quality: tuple[float, ...]
    ends_bytes: int
    ends_quality: float = 1.0
    layer_work: int = 0
    logit_work: int = 0
    logit_row: int = 0
    layer_cache: tuple[int, ...] = ()
    ends_key: str = ""
    scored: bool = False
    precision: str = "fp32"
    sparsity: float = 0.0

    @property
    def n(self) -> int:
        return len(self.layer_ids)

    def cache(self, i: int) -> int:
        """KV cache bytes of layer ``i`` (0 where not given)."""
        return self.layer_cache[i] if self.layer_cache else 0

    @property
    def bytes(self) -> int:
        return self.ends_bytes + sum(self.layer_bytes)


class CompatTable:
    """The comparator's compatibility ``out(a) → in(b)`` by block ids (NaN: unknown)."""

    def __init__(self, blocks: Sequence[str], matrix: Any) -> None:
        self.index = {b: i for i, b in enumerate(blocks)}
        self.rows = [list(map(float, row)) for row in matrix]

    def get(self, a: str, b: str) -> float | None:
        i, j = self.index.get(a), self.index.get(b)
        if i is None or j is None:
            return None
        value = self.rows[i][j]
        return None if math.isnan(value) else value

    def __contains__(self, bid: str) -> bool:
        return bid in self.index


def load_compat(path: str | Path) -> CompatTable:
    """The compatibility matrix of an ``assy compare`` output (its directory or its
    ``matrices.safetensors``).

    Raises:
        UsageError: no such file, or not a comparator output.
    """
    import json

    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.is_dir():
        path = path / "matrices.safetensors"
    if not path.is_file():
        raise UsageError(f"{path}: no comparator output (run assy compare first)")
    try:
        with safe_open(str(path), "pt") as f:
            blocks = json.loads((f.metadata() or {})["blocks"])
            matrix = f.get_tensor("compatibility")
    except (SafetensorError, KeyError, ValueError, OSError) as e:
        raise UsageError(f"{path}: not a comparator output ({e})") from None
    return CompatTable(blocks, matrix.double().tolist())


def compat_source(path: str | Path | None) -> str:
    """Which compatibility a plan used, as the outputs record it: the compare output's
    path, or :data:`FALLBACK`."""
    return str(path) if path else FALLBACK


def uncovered_models(table: CompatTable, candidates: Sequence[Candidate]) -> list[str]:
    """The candidates with a layer block the comparator did not score (a variant's block
    counts as scored when its parent's is, as the planner looks it up)."""
    by_name = {c.name: c for c in candidates}
    missing = []
    for c in candidates:
        root = by_name.get(c.root)
        parents = root.layer_ids if root is not None and root.n == c.n else (None,) * c.n
        if any(
            b not in table and p not in table for b, p in zip(c.layer_ids, parents, strict=True)
        ):
            missing.append(c.name)
    return missing


@lru_cache(maxsize=64)
def adapter_nbytes(d_in: int, d_out: int, kind: str) -> int:
    """Bytes of an elastic adapter's parameters and buffers (fp32, no cross-attention)."""
    from assy.assembly.adapter import ElasticAdapter

    adapter = ElasticAdapter(d_in, d_out, kind)
    return sum(t.numel() * t.element_size() for t in adapter.state_dict().values())


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Step:
    """One transition of the chain: into a layer (or the head), its score and its source."""

    into: str
    compatibility: float
    source: str  # "own" (next layer of the line), "comparator", "parent" or "fallback"
    seam: str | None  # None, "affine" or "diagonal"


@dataclass(frozen=True)
class Plan:
    """A planned assembly.

    Attributes:
        recipe: what to assemble (sums not pinned: :func:`~assy.assembly.recipe.pin_blocks`).
        objective: the summed, depth-weighted compatibility (see the module docstring).
        bytes: ``weights``, ``adapters``, ``work`` and ``total`` resident bytes.
        seams: adapters in the chain.
        steps: every transition, embedding to head.
        budget: the budget planned for.
        chain: ``(candidate, layer index)`` of every layer, in order.
    """

    recipe: Recipe
    objective: float
    bytes: Mapping[str, int]
    seams: int
    steps: tuple[Step, ...]
    budget: int
    chain: tuple[tuple[str, int], ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        from assy.assembly.recipe import recipe_to_dict

        recipe = recipe_to_dict(self.recipe)
        recipe.pop("blocks")
        return {
            "recipe": recipe,
            "objective": round(self.objective, 6),
            "bytes": dict(self.bytes),
            "budget": self.budget,
            "seams": self.seams,
            "steps": [
                {
                    "into": s.into,
                    "compatibility": round(s.compatibility, 6),
                    "source": s.source,
                    "seam": s.seam,
                }
                for s in self.steps
            ],
        }


# --------------------------------------------------------------------------- the search


@dataclass
class _Label:
    bytes: int
    seams: int
    score: float
    tie: float
    node: int
    prev: _Label | None


class _Search:
    """The DAG of one anchor's search: nodes are (candidate, layer), ordered by depth."""

    def __init__(
        self,
        cands: Sequence[Candidate],
        anchor: Candidate,
        compat: CompatTable | None,
        seed: int,
    ) -> None:
        self.anchor = anchor
        self.compat = compat
        self.by_name = {c.name: c for c in cands}
        nodes = [(c, i) for c in cands for i in range(c.n)]
        nodes.sort(key=lambda n: (n[1] / n[0].n, n[0].name, n[1]))
        self.nodes = nodes
        rng = random.Random(seed)
        self.rank = [rng.random() for _ in nodes]
        self._memo: dict[tuple[int, int], tuple[float, str, str | None]] = {}

    # compatibility of a transition --------------------------------------------------------
    def _lookup(self, a: tuple[Candidate, int] | None, b: tuple[Candidate, int] | None):
        """Score of ``out(a) → in(b)`` (``None``: the embedding / the head)."""
        anchor = self.anchor
        ca, ia = a if a is not None else (anchor, -1)
        cb, ib = b if b is not None else (anchor, anchor.n)
        same = ca.root == cb.root
        if same and ib == ia + 1:
            return 1.0, "own", None
        seam = "affine"  # inside a line too: a diagonal map lost 0.4 bits/byte at 35%
        if a is not None and b is not None and self.compat is not None:
            value = self.compat.get(ca.layer_ids[ia], cb.layer_ids[ib])
            if value is not None:
                return value, "comparator", seam
            parents = (self._parent_id(ca, ia), self._parent_id(cb, ib))
            if None not in parents:
                value = self.compat.get(*parents)
                if value is not None:
                    return value, "parent", seam
        out_depth = (ia + 1) / ca.n if a is not None else 0.0
        in_depth = ib / cb.n if b is not None else 1.0
        gamma = 1.0 if same else CROSS_TRUST
        return gamma * max(0.0, 1.0 - 2.0 * abs(out_depth - in_depth)), "fallback", seam

    def _parent_id(self, c: Candidate, i: int) -> str | None:
        root = self.by_name.get(c.root)
        return root.layer_ids[i] if root is not None and root.n == c.n else None

    def step(self, a: int, b: int) -> tuple[float, str, str | None]:
        """Transition from node ``a`` to node ``b`` (-1: the embedding / the head)."""
        key = (a, b)
        if key not in self._memo:
            self._memo[key] = self._lookup(
                self.nodes[a] if a >= 0 else None, self.nodes[b] if b >= 0 else None
            )
        return self._memo[key]

    def seam_bytes(self, a: int, b: int, kind: str | None) -> int:
        if kind is None:
            return 0
        wa = self.nodes[a][0].width if a >= 0 else self.anchor.width
        wb = self.nodes[b][0].width if b >= 0 else self.anchor.width
        return adapter_nbytes(wa, wb, kind)

    def follows(self, a: int, b: int) -> bool:
        """Whether node ``b`` may run after node ``a``: its depth interval starts where
        ``a``'s ends or later (so the layers' depth shares sum to at most 1)."""
        (ca, ia), (cb, ib) = self.nodes[a], self.nodes[b]
        return ib / cb.n >= (ia + 1) / ca.n - _EPS

    def gain(self, b: int, compat: float) -> float:
        c, i = self.nodes[b]
        return compat * c.layer_quality[i] / c.n

    # the DP -------------------------------------------------------------------------------
    def run(self, allowed: set[str], room: int, max_seams: int, top: int = 1) -> list[_Label]:
        """The ``top`` best complete chains using candidates in ``allowed`` within ``room``
        bytes (beside the anchor's ends and the working memory), best first. Beyond the
        first they are the best the Pareto sets hold (a chain dominated at some layer by
        another of no more bytes and seams is not among them)."""
        fronts: list[list[_Label]] = [[] for _ in self.nodes]
        best: list[_Label] = []
        for b, (cb, ib) in enumerate(self.nodes):
            if cb.name not in allowed:
                continue
            size = cb.layer_bytes[ib]
            compat, _, seam = self.step(-1, b)
            labels = [
                _Label(
                    size + self.seam_bytes(-1, b, seam),
                    int(seam is not None),
                    self.gain(b, compat),
                    self.rank[b],
                    b,
                    None,
                )
            ]
            for a in range(b):
                if not fronts[a] or not self.follows(a, b):
                    continue
                compat, _, seam = self.step(a, b)
                extra = size + self.seam_bytes(a, b, seam)
                g = self.gain(b, compat)
                k = int(seam is not None)
                for lab in fronts[a]:
                    labels.append(
                        _Label(
                            lab.bytes + extra,
                            lab.seams + k,
                            lab.score + g,
                            lab.tie + self.rank[b],
                            b,
                            lab,
                        )
                    )
            fronts[b] = _pareto([x for x in labels if x.bytes <= room and x.seams <= max_seams])
            # close the chain at the head
            compat, _, seam = self.step(b, -1)
            extra = self.seam_bytes(b, -1, seam)
            k = int(seam is not None)
            penalty = (1.0 - compat) / self.anchor.n
            for lab in fronts[b]:
                if lab.bytes + extra > room or lab.seams + k > max_seams:
                    continue
                done = _Label(
                    lab.bytes + extra, lab.seams + k, lab.score - penalty, lab.tie, -1, lab
                )
                _keep(best, done, top)
        return best


def _keep(best: list[_Label], label: _Label, k: int) -> None:
    """Insert ``label`` into ``best`` (best first), keeping at most ``k``."""
    at = len(best)
    while at and _better(label, best[at - 1]):
        at -= 1
    if at < k:
        best.insert(at, label)
        del best[k:]


def _better(x: _Label, y: _Label) -> bool:
    if abs(x.score - y.score) > _EPS:
        return x.score > y.score
    if x.bytes != y.bytes:
        return x.bytes > y.bytes  # a tie: the larger assembly (more parameters)
    return x.tie > y.tie


def _pareto(labels: list[_Label]) -> list[_Label]:
    """Labels no other label dominates: one with no more bytes, no more seams and a higher
    score (or the same score, bytes and seams and a higher tie rank). Equal scores at
    different bytes both stay: a tie goes to the larger assembly.

    In order of bytes, a label is dominated exactly when a label kept before it with no
    more seams scores higher, or one with its bytes and seams scores the same: the best
    score kept per seam count and the scores kept per (bytes, seams) decide it."""
    labels.sort(key=lambda x: (x.bytes, x.seams, -x.score, -x.tie))
    kept: list[_Label] = []
    best: dict[int, float] = {}  # seams -> the highest score kept with that many
    same: dict[tuple[int, int], list[float]] = {}
    for x in labels:
        top = max((v for k, v in best.items() if k <= x.seams), default=-math.inf)
        if top > x.score + _EPS:
            continue
        if any(abs(v - x.score) <= _EPS for v in same.get((x.bytes, x.seams), ())):
            continue
        kept.append(x)
        best[x.seams] = max(best.get(x.seams, -math.inf), x.score)
        same.setdefault((x.bytes, x.seams), []).append(x.score)
    return kept


def _minimum(search: _Search, allowed: set[str], max_seams: int) -> int | None:
    """Fewest layer + adapter bytes of any complete chain with at most ``max_seams`` seams."""
    inf = math.inf
    cost = [[inf] * (max_seams + 1) for _ in search.nodes]
    best = inf
    for b, (cb, ib) in enumerate(search.nodes):
        if cb.name not in allowed:
            continue
        size = cb.layer_bytes[ib]
        _, _, seam = search.step(-1, b)
        k = int(seam is not None)
        if k <= max_seams:
            cost[b][k] = size + search.seam_bytes(-1, b, seam)
        for a in range(b):
            if min(cost[a]) == inf or not search.follows(a, b):
                continue
            _, _, seam = search.step(a, b)
            k = int(seam is not None)
            extra = size + search.seam_bytes(a, b, seam)
            for s in range(max_seams + 1 - k):
                if cost[a][s] + extra < cost[b][s + k]:
                    cost[b][s + k] = cost[a][s] + extra
        _, _, seam = search.step(b, -1)
        k = int(seam is not None)
        extra = search.seam_bytes(b, -1, seam)
        for s in range(max_seams + 1 - k):
            best = min(best, cost[b][s] + extra)
    return None if best == inf else int(best)


def _work_levels(cands: Sequence[Candidate]) -> list[int]:
    return sorted({c.layer_work for c in cands})


def plan_assembly(
    candidates: Sequence[Candidate],
    budget: int,
    *,
    compat: CompatTable | None = None,
    max_seams: int = 4,
    seed: int = 0,
    anchors: Sequence[str] | None = None,
    swap_ends: Mapping[str, int] | None = None,
    max_read: int | None = None,
) -> Plan:
    """The best assembly of ``candidates`` whose resident bytes fit ``budget``.

    Args:
        candidates: pool models and variants (:func:`pool_candidates`).
        budget: bytes: weights + adapters + working memory must fit.
        compat: the comparator's scores; ``None``: the fallback everywhere.
        max_seams: most adapters in the chain; 0: the best whole single model or variant.
        seed: breaks ties between equally scored chains (same seed, same plan).
        anchors: the models that may give embedding and head (default: every causal one).
        swap_ends: plan for the swapper (``--allow-swap``): per anchor, the bytes its
            embedding and head pin when served in pieces (:func:`swap_ends_bytes`). Then
            the *working set* must fit -- the chain's largest layer, those pinned parts,
            the adapters, the KV caches of its layers and the working memory -- not every
            weight; the plan's bytes add ``cache``, ``working_set`` and
            ``read_per_token`` (an estimate: what does not fit beside the working set is
            read again on every pass). The anchor's logits count one token's worth: a
            budgeted run computes them in groups that fit the room left.
        max_read: with ``swap_ends``, the most bytes a plan may read again per pass
            (``read_per_token``; ``None``: no limit). Since ``read_per_token`` is what
            the weights, adapters, KV caches and working memory hold beyond ``budget``,
            this bounds them by ``budget + max_read``, searched exactly as a resident
            plan is; the working set must still fit ``budget``.

    Raises:
        UsageError: no causal candidate, a negative ``max_seams``, or a budget below the
            smallest runnable assembly (the message names it).
    """
    return plan_candidates(
        candidates,
        budget,
        1,
        compat=compat,
        max_seams=max_seams,
        seed=seed,
        anchors=anchors,
        swap_ends=swap_ends,
        max_read=max_read,
    )[0]


def plan_candidates(
    candidates: Sequence[Candidate],
    budget: int,
    k: int,
    *,
    compat: CompatTable | None = None,
    max_seams: int = 4,
    seed: int = 0,
    anchors: Sequence[str] | None = None,
    swap_ends: Mapping[str, int] | None = None,
    max_read: int | None = None,
) -> list[Plan]:
    """The ``k`` best plans (best first, distinct recipes) for the measured proxy to rank;
    see :func:`plan_assembly` for the arguments. The first is :func:`plan_assembly`'s."""
    if max_seams < 0:
        raise UsageError(f"{arg('max_seams')} must be 0 or more, got {max_seams}")
    if k < 1:
        raise UsageError(f"{arg('candidates')} must be at least 1, got {k}")
    pool_anchors = [c for c in candidates if c.causal and c.n]
    if anchors is not None:
        pool_anchors = [c for c in pool_anchors if c.name in set(anchors)]
    if not pool_anchors:
        raise UsageError(
            "no decoder to anchor an assembly: the pool needs a causal language model "
            "(its tokenizer, embedding and head)"
        )
    pool_anchors = _distinct_ends(pool_anchors)
    layers = [c for c in candidates if c.n]
    real = {c.name: c for c in candidates}
    found: list[tuple[_Label, _Search, int]] = []
    floor: int | None = None
    swap = swap_ends is not None
    if max_read is not None and (not swap or max_read < 0):
        raise UsageError(f"{arg('max_read')} needs the swapper and 0 bytes or more")
    capped = swap and max_read is not None
    for anchor in sorted(pool_anchors, key=lambda c: c.name):
        pool_for = layers if max_seams else [anchor]
        if swap:  # layers pass through; adapters and KV caches are held (see _swap_bytes)
            pool_for = [_swap_bytes(c, capped) for c in pool_for]
        else:  # resident: every layer held, with its KV cache where scored
            pool_for = [_cached(c) for c in pool_for]
        anchor = next(c for c in pool_for if c.name == anchor.name)
        search = _Search(pool_for, anchor, compat, seed)
        for level, largest in _levels(pool_for, real, swap):
            allowed = {
                c.name
                for c in pool_for
                if c.layer_work <= level and (not swap or max(real[c.name].layer_bytes) <= largest)
            }
            work = level + _logit_bytes(anchor, swap)
            need = _minimum(search, allowed, max_seams)
            if need is None:
                continue
            if capped:  # the working set fits, and all beyond it is read at most max_read
                pinned = swap_ends[anchor.name] + work + largest
                room = budget + max_read - work - anchor.ends_bytes
                least = max(pinned, anchor.ends_bytes + work + need - max_read)
            else:
                fixed = (swap_ends[anchor.name] + largest if swap else anchor.ends_bytes) + work
                room, least = budget - fixed, fixed + need
            floor = least if floor is None else min(floor, least)
            if least > budget:
                continue
            for label in search.run(allowed, room, max_seams, 4 * k if capped else k):
                label.score *= anchor.ends_quality
                found.append((label, search, level))
    if not found:
        if floor is None:
            raise UsageError(
                f"no assembly can be made with {arg('max_seams')} {max_seams} from this pool"
            )
        what = "working set" if swap else "runnable assembly"
        read = f" reading at most {format_size(max_read)} a pass" if capped else ""
        raise UsageError(
            f"{arg('budget')} {format_size(budget)} is below the smallest {what}{read} "
            f"of this pool ({format_size(floor)}: weights, adapters and one forward call's "
            f"working memory); use {arg('budget')} {format_size(floor)} or more"
        )
    order = sorted(
        range(len(found)),
        key=lambda i: _SortKey(found[i][0]),
    )
    plans: list[Plan] = []
    seen: set[tuple] = set()
    for i in order:
        label, search, level = found[i]
        plan = _to_plan(label, search, level, budget, real, swap_ends)
        if capped and plan.bytes["working_set"] > budget:  # its adapters did not fit
            continue
        key = (plan.recipe.anchor, plan.recipe.slices, plan.recipe.seams)
        if key not in seen:
            seen.add(key)
            plans.append(plan)
        if len(plans) == k:
            break
    if not plans:  # every chain that fits the reads held adapters the working set cannot
        raise UsageError(
            f"{arg('budget')} {format_size(budget)}: no plan reading at most "
            f"{format_size(max_read or 0)} a pass leaves room for its adapters in the "
            f"working set; raise {arg('budget')} or {arg('max_read')}"
        )
    return plans


def plan_lines(
    candidates: Sequence[Candidate],
    budget: int,
    *,
    compat: CompatTable | None = None,
    max_seams: int = 4,
    seed: int = 0,
    swap_ends: Mapping[str, int] | None = None,
    max_read: int | None = None,
) -> list[Plan]:
    """Per model line that holds a decoder (a model and its variants), the best plan made
    of that line's blocks alone, under one of its anchors; lines where nothing fits are
    left out. Such a chain has seams only where it skips layers, and the objective ranks
    it below chains of a small foreign model that cover more of the depth (a 6-layer
    encoder's layers carry 1/6 of the depth each), though on text it usually predicts far
    better: the measured proxy needs to see it (see :func:`plan_shortlist`)."""
    plans = []
    for root in sorted({c.root for c in candidates if c.causal and c.n}):
        line = [c for c in candidates if c.root == root]
        try:
            plans.append(
                plan_assembly(
                    line,
                    budget,
                    compat=compat,
                    max_seams=max_seams,
                    seed=seed,
                    swap_ends=swap_ends,
                    max_read=max_read,
                )
            )
        except UsageError:
            continue
    return plans


def plan_shortlist(
    candidates: Sequence[Candidate],
    budget: int,
    k: int,
    *,
    compat: CompatTable | None = None,
    max_seams: int = 4,
    seed: int = 0,
    swap_ends: Mapping[str, int] | None = None,
    max_read: int | None = None,
) -> tuple[list[Plan], Plan | None]:
    """What the measured proxy ranks: the planner's ``k`` best plans, then the best plan
    of each model line (:func:`plan_lines`), then the best whole single model or variant,
    without repeats; and that single model (``None`` when none fits).

    The planner's objective sees compatibility, not what a chain predicts; the three kinds
    are the shapes an assembly takes (a mix of models, one model thinned, one model
    whole), so the proxy chooses among them on the user's data.

    Raises:
        UsageError: as :func:`plan_candidates`.
    """
    kwargs = {"compat": compat, "seed": seed, "swap_ends": swap_ends, "max_read": max_read}
    plans = plan_candidates(candidates, budget, k, max_seams=max_seams, **kwargs)
    lines = plan_lines(candidates, budget, max_seams=max_seams, **kwargs) if max_seams else []
    try:
        single = plan_assembly(candidates, budget, max_seams=0, **kwargs)
    except UsageError:
        single = None
    out: list[Plan] = []
    for plan in [*plans, *lines, *([single] if single else [])]:
        if all(plan.recipe != p.recipe for p in out):
            out.append(plan)
    return out, single


def plan_chain(
    candidates: Sequence[Candidate],
    anchor: str,
    chain: Sequence[tuple[str, int]],
    budget: int,
    *,
    compat: CompatTable | None = None,
    swap_ends: Mapping[str, int] | None = None,
) -> Plan:
    """The :class:`Plan` of a given chain (``(candidate, layer)`` in order, under
    ``anchor``'s ends), scored and sized as the search scores and sizes its own -- for
    baselines and random recipes to be compared with the planner's (the budget is not
    enforced: compare ``plan.bytes`` with it)."""
    real = {c.name: c for c in candidates}
    pool_for = [c for c in candidates if c.n]
    if swap_ends is not None:
        pool_for = [_swap_bytes(c, False) for c in pool_for]
    else:
        pool_for = [_cached(c) for c in pool_for]
    head = next(c for c in pool_for if c.name == anchor)
    search = _Search(pool_for, head, compat, 0)
    index = {(c.name, i): k for k, (c, i) in enumerate(search.nodes)}
    label: _Label | None = None
    previous = -1
    for name, i in chain:
        b = index[(name, i)]
        value, _, seam = search.step(previous, b)
        extra = search.nodes[b][0].layer_bytes[i] + search.seam_bytes(previous, b, seam)
        label = _Label(
            (label.bytes if label else 0) + extra,
            (label.seams if label else 0) + int(seam is not None),
            (label.score if label else 0.0) + search.gain(b, value),
            0.0,
            b,
            label,
        )
        previous = b
    value, _, seam = search.step(previous, -1)
    done = _Label(
        (label.bytes if label else 0) + search.seam_bytes(previous, -1, seam),
        (label.seams if label else 0) + int(seam is not None),
        ((label.score if label else 0.0) - (1.0 - value) / head.n) * head.ends_quality,
        0.0,
        -1,
        label,
    )
    level = max((real[name].layer_work for name, _ in chain), default=head.layer_work)
    return _to_plan(done, search, level, budget, real, swap_ends)


class _SortKey:
    """Orders labels best first (by :func:`_better`)."""

    def __init__(self, label: _Label) -> None:
        self.label = label

    def __lt__(self, other: _SortKey) -> bool:
        return _better(self.label, other.label)


def _distinct_ends(anchors: Sequence[Candidate]) -> list[Candidate]:
    """One anchor per distinct ends (a pruned variant keeps its model's embedding and head:
    planning under both gives the same chains twice): the model itself where it is among
    them, else the first by name."""
    keep: dict[tuple[str, str], Candidate] = {}
    for c in sorted(anchors, key=lambda c: (c.name != c.root, c.name)):
        key = (c.root, c.ends_key or c.name)
        keep.setdefault(key, c)
    chosen = {c.name for c in keep.values()}
    return [c for c in anchors if c.name in chosen]


def _swap_bytes(c: Candidate, capped: bool) -> Candidate:
    """``c`` as the swapper's search counts its layers: by their KV caches alone (the
    working set holds those; the weights pass through), or with ``capped`` (a read limit)
    by weights and caches both (see :func:`plan_assembly`)."""
    caches = tuple(c.cache(i) for i in range(c.n))
    if capped:
        return replace(c, layer_bytes=tuple(map(sum, zip(c.layer_bytes, caches, strict=True))))
    return replace(c, layer_bytes=caches)


def _cached(c: Candidate) -> Candidate:
    """``c`` as a resident search counts its layers: their weights, and with
    ``c.scored`` their KV caches beside."""
    if not c.scored or not c.layer_cache:
        return c
    return replace(c, layer_bytes=tuple(b + c.cache(i) for i, b in enumerate(c.layer_bytes)))


def _scored(anchor: Candidate, swap: bool) -> bool:
    """Whether a plan counts one token's logits and its layers' KV caches: planned for the
    scoring engine (``anchor.scored``) or for the swapper (whose runs are scored)."""
    return swap or anchor.scored


def _logit_bytes(anchor: Candidate, swap: bool) -> int:
    """Working bytes of the anchor's logits in a plan: one forward call's where it trains;
    one token's where it is scored (:func:`_scored`: a budgeted run computes them in groups
    of the rows that fit the room left, one at the least: :mod:`assy.evaluation.scoring`)."""
    if _scored(anchor, swap) and anchor.logit_row:
        return min(anchor.logit_work, anchor.logit_row)
    return anchor.logit_work


def _levels(
    cands: Sequence[Candidate], real: Mapping[str, Candidate], swap: bool
) -> list[tuple[int, int]]:
    """(working memory, largest layer held in flight) levels the search runs at: the
    largest layer is 0 for resident plans (every layer is counted by the search)."""
    works = _work_levels(cands)
    if not swap:
        return [(w, 0) for w in works]
    largest = sorted({max(real[c.name].layer_bytes) for c in cands})
    return [(w, m) for w in works for m in largest]


def _to_plan(
    label: _Label,
    search: _Search,
    level: int,
    budget: int,
    real: Mapping[str, Candidate],
    swap_ends: Mapping[str, int] | None = None,
) -> Plan:
    path: list[int] = []
    node: _Label | None = label.prev
    while node is not None:
        path.append(node.node)
        node = node.prev
    path.reverse()
    anchor = real[search.anchor.name]
    steps: list[Step] = []
    adapters = 0
    seams: list[SeamSpec] = []
    slices: list[Slice] = []
    previous = -1
    for b in [*path, -1]:
        compat, source, seam = search.step(previous, b)
        into = search.nodes[b][0].layer_ids[search.nodes[b][1]] if b >= 0 else "head"
        steps.append(Step(into, compat, source, seam))
        adapters += search.seam_bytes(previous, b, seam)
        if b >= 0:
            c, i = search.nodes[b]
            last = slices[-1] if slices else None
            joins = (
                last is not None
                and seam is None
                and last.source == c.name
                and last.layers[1] == i - 1
            )
            if joins:
                slices[-1] = Slice(last.model, (last.layers[0], i), last.variant)
            else:
                if seam is not None:
                    seams.append(SeamSpec(len(slices), seam))
                slices.append(Slice(c.root, (i, i), c.name if c.name != c.root else None))
        elif seam is not None:
            seams.append(SeamSpec(len(slices), seam))
        previous = b
    chain = [(search.nodes[b][0].name, search.nodes[b][1]) for b in path]
    layer_bytes = [real[name].layer_bytes[i] for name, i in chain]
    weights = anchor.ends_bytes + sum(layer_bytes)
    work = level + _logit_bytes(anchor, swap_ends is not None)
    recipe = Recipe(anchor.name, tuple(slices), tuple(seams))
    sizes = {
        "weights": weights,
        "adapters": adapters,
        "work": work,
        "total": weights + adapters + work,
    }
    if _scored(anchor, swap_ends is not None):
        sizes["cache"] = sum(real[name].cache(i) for name, i in chain)
        sizes["total"] += sizes["cache"]
    if swap_ends is not None:
        pinned = swap_ends[anchor.name] + adapters + work + sizes["cache"]
        sizes["working_set"] = pinned + max(layer_bytes, default=0)
        # what does not fit beside the pinned parts is read again on every pass
        swappable = weights - swap_ends[anchor.name]
        sizes["read_per_token"] = max(0, swappable - (budget - pinned))
    return Plan(
        recipe=recipe,
        objective=label.score,
        bytes=sizes,
        seams=len(seams),
        steps=tuple(steps),
        budget=budget,
        chain=tuple(chain),
    )


# --------------------------------------------------------------------------- from a pool


def pool_candidates(
    pool, *, dtype: str = "fp32", batch: int = 1, tokens: int = 512, scored: bool = False
) -> list[Candidate]:
    """Every model of ``pool`` as a :class:`Candidate`: block bytes as the runtime holds
    them at ``dtype`` (headers read, nothing loaded) and the working memory of a
    ``batch × tokens`` forward call; ``scored``: plans run by the scoring engine (one
    token's logits and the KV caches of ``batch × tokens``: see :class:`Candidate`)."""
    from assy.assembly.recipe import lineage
    from blockpool import BlockRunner, block_nbytes

    torch_dtype = _torch_dtype(dtype)
    out = []
    for name in sorted(pool.models):
        model = pool.model(name)
        ids = list(model.blocks)
        kinds = {b: pool.blocks[b].kind for b in ids}
        layer_ids = tuple(b for b in ids if kinds[b] == "layer")
        ends = [b for b in ids if kinds[b] != "layer"]
        ends_bytes = 0
        for b in ends:
            tied = tuple(
                n for n, ref in pool.blocks[b].tied.items() if ref.partition(":")[0] in ends
            )
            ends_bytes += block_nbytes(pool, b, torch_dtype, skip=tied)
        entries = [pool.blocks[b] for b in ids]
        runner = BlockRunner(pool, name, dtype=torch_dtype)
        layer_work = runner.working_bytes(batch, tokens, 0, 0)
        cache = runner.cache_bytes(batch, tokens) // max(len(layer_ids), 1)
        causal = bool(pool.family(name).causal) and any(k == "head" for k in kinds.values())
        logit_work = runner.working_bytes(batch, tokens, 0, batch * tokens) - layer_work
        precisions = [e.precision for e in entries if e.kind == "layer"] or ["fp32"]
        out.append(
            Candidate(
                name=name,
                root=lineage(pool, name)[-1],
                causal=causal,
                width=int(entries[0].hidden_size),
                layer_ids=layer_ids,
                layer_bytes=tuple(block_nbytes(pool, b, torch_dtype) for b in layer_ids),
                layer_quality=tuple(
                    quality_prior(pool.blocks[b].precision, pool.blocks[b].sparsity)
                    for b in layer_ids
                ),
                ends_bytes=ends_bytes,
                ends_quality=min(
                    (
                        quality_prior(pool.blocks[b].precision, pool.blocks[b].sparsity)
                        for b in ends
                    ),
                    default=1.0,
                ),
                layer_work=layer_work,
                logit_work=logit_work if causal else 0,
                logit_row=logit_work // (batch * tokens) if causal else 0,
                layer_cache=(cache,) * len(layer_ids),
                ends_key=",".join(_content_sum(pool, b) for b in ends),
                scored=scored,
                precision=max(set(precisions), key=precisions.count),
                sparsity=sum(pool.blocks[b].sparsity for b in layer_ids) / max(len(layer_ids), 1),
            )
        )
    return out


def _content_sum(pool, bid: str) -> str:
    """The sum of block ``bid``, or of its parent's where it is the parent's tensors
    unchanged (a pruned variant's embedding and head: same precision, nothing pruned or
    quantized), so that both have one key."""
    entry = pool.blocks[bid]
    parent = entry.parent
    source = pool.blocks.get(parent.block) if parent is not None and parent.pool == "." else None
    unchanged = (
        source is not None
        and parent.sha256 == source.sha256
        and entry.precision == source.precision
        and not entry.sparsity
        and entry.quant is None
        and entry.pruning is None
    )
    return source.sha256 if unchanged else entry.sha256


def _torch_dtype(name: str):
    from blockpool import RunOptions

    options = RunOptions(dtype=name)
    options.validate()
    return options.torch_dtype


def swap_ends_bytes(pool, name: str, *, dtype: str = "fp32") -> int:
    """What a model's embedding and head pin when the swapper serves them in pieces (their
    small tensors and one piece; :func:`blockpool.offload.min_budget` of the two alone)."""
    from blockpool import min_budget

    ends = [b for b in pool.model(name).blocks if pool.blocks[b].kind != "layer"]
    return min_budget(pool, ends, _torch_dtype(dtype))

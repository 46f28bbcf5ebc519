"""Mixed-precision planner: which precision each block gets under a byte or bit budget.

Three stages (AssyLLM's block quantizer):

1. Filter by weight statistics (:func:`weight_stats`): a block whose matrices are mostly
   zeros (a pruned variant, ``sparsity >= max_sparsity``) is not a candidate for more bits
   (its remaining weights are few); of the rest, the ``screen`` fraction with the
   largest outlier share (weights beyond 6 standard deviations of their matrix) are
   kept as candidates. Non-candidates get the cheapest precision without measurement.
2. Activation sensitivity of each candidate at each precision
   (:func:`blockpool.quant.sensitivity.measure_blocks`): the relative change of its output on
   calibration activations when it alone is quantized.
3. Allocation (:func:`allocate`): minimize the summed sensitivity subject to the total
   bytes, a multiple-choice knapsack solved by dynamic programming over the bytes above
   the cheapest plan, on a grid of 1/32768 of that slack with costs rounded up, then the
   rounding left over filled greedily with exact sizes, so a plan never exceeds its
   budget (and is optimal up to that grid).

A tied LM head and the embedding it shares its weight with are one unit: they take the
same precision, their bytes and sensitivities add.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blockpool.errors import UsageError, arg
from blockpool.pool import Pool
from blockpool.quant.formats import MIN_DIM, normalize_precision
from blockpool.quant.sensitivity import measure_blocks
from blockpool.quant.write import quantized_block, tied_sources, variant_bytes

__all__ = [
    "NOMINAL_BITS",
    "Option",
    "Plan",
    "allocate",
    "candidates",
    "check_precision_choices",
    "plan_precisions",
    "weight_stats",
]

OUTLIER_SIGMA = 6.0
NOMINAL_BITS = {"nf4": 4, "fp4": 4, "int8": 8, "bf16": 16, "fp16": 16, "fp32": 32}
_GRID = 1 << 15  # byte-cost grid of the dynamic programme


@dataclass(frozen=True)
class Option:
    """One precision of one unit: its exact bytes and its loss (summed sensitivity)."""

    precision: str
    bytes: int
    loss: float


def weight_stats(state: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Sparsity and outlier share of a block's large matrices.

    Args:
        state: the block's plain tensors.

    Returns:
        ``{"sparsity": fraction of exact zeros, "outliers": fraction of weights farther
        than 6 standard deviations from their matrix's mean, "weights": count}`` over the
        2-D matrices of at least 16 x 16 (what the quantizer quantizes).
    """
    zeros = outliers = total = 0
    for t in state.values():
        if t.ndim != 2 or min(t.shape) < MIN_DIM or not t.is_floating_point():
            continue
        w = t.float()
        zeros += int((w == 0).sum())
        outliers += int(((w - w.mean()).abs() > OUTLIER_SIGMA * w.std()).sum())
        total += w.numel()
    if total == 0:
        return {"sparsity": 0.0, "outliers": 0.0, "weights": 0}
    return {"sparsity": zeros / total, "outliers": outliers / total, "weights": total}


def candidates(
    stats: Mapping[str, Mapping[str, float]], *, max_sparsity: float = 0.5, screen: float = 1.0
) -> list[str]:
    """Units worth measuring (stage 1 of the planner).

    Args:
        stats: unit -> :func:`weight_stats` (units without large matrices are skipped).
        max_sparsity: units at least this sparse are not candidates.
        screen: fraction (0, 1] of the remaining units kept, largest outlier share first.

    Returns:
        The candidate units, in the order of ``stats``.
    """
    if not 0 < screen <= 1:
        raise UsageError(f"screen must be in (0, 1], got {screen}")
    dense = [u for u, s in stats.items() if s["weights"] and s["sparsity"] < max_sparsity]
    keep = math.ceil(screen * len(dense))
    chosen = set(sorted(dense, key=lambda u: -stats[u]["outliers"])[:keep])
    return [u for u in stats if u in chosen]


def allocate(options: Mapping[str, Sequence[Option]], budget: int) -> dict[str, Option]:
    """Pick one option per unit minimizing the summed loss with total bytes <= ``budget``.

    Args:
        options: unit -> its options (at least one each).
        budget: bytes.

    Returns:
        Unit -> chosen option; ``sum(bytes) <= budget`` always.

    Raises:
        UsageError: even the cheapest option of every unit exceeds the budget (the message
            gives that minimum).
    """
    units = list(options)
    floor = sum(min(o.bytes for o in options[u]) for u in units)
    if floor > budget:
        raise UsageError(
            f"budget {budget:,} bytes is below the smallest plan, {floor:,} bytes (every block "
            "at its cheapest precision); raise the budget"
        )
    # Costs above each unit's cheapest option, on a grid of the slack rounded up: any
    # plan the grid admits fits the budget; the rounding left over is filled exactly.
    base = {u: min(o.bytes for o in options[u]) for u in units}
    slack = budget - floor
    grid = max(1, math.ceil(slack / _GRID))
    capacity = slack // grid
    best = np.zeros(capacity + 1)  # best[c]: least loss of the units so far within c cells
    picks = []
    for u in units:
        new = np.full(capacity + 1, np.inf)
        pick = np.full(capacity + 1, -1, dtype=np.int16)
        for j, o in enumerate(options[u]):
            cells = math.ceil((o.bytes - base[u]) / grid)
            if cells > capacity:
                continue
            cand = np.full(capacity + 1, np.inf)
            cand[cells:] = best[: capacity + 1 - cells] + o.loss + 1e-12 * o.bytes / budget
            better = cand < new
            new[better], pick[better] = cand[better], j
        best = new
        picks.append(pick)
    chosen: dict[str, Option] = {}
    c = capacity
    for u, pick in zip(reversed(units), reversed(picks), strict=True):
        chosen[u] = options[u][int(pick[c])]
        c -= math.ceil((chosen[u].bytes - base[u]) / grid)
    return _fill({u: chosen[u] for u in units}, options, budget)


def _fill(
    plan: dict[str, Option], options: Mapping[str, Sequence[Option]], budget: int
) -> dict[str, Option]:
    """Spend the slack left by rounding: best loss saved per byte first, exact sizes."""
    while True:
        left = budget - sum(o.bytes for o in plan.values())
        moves = [
            ((plan[u].loss - o.loss) / max(o.bytes - plan[u].bytes, 1), u, o)
            for u in plan
            for o in options[u]
            if o.loss < plan[u].loss and o.bytes - plan[u].bytes <= left
        ]
        if not moves:
            return plan
        _, u, o = max(moves, key=lambda m: m[0])
        plan[u] = o


@dataclass
class Plan:
    """A precision per block, with how it was chosen.

    Attributes:
        precisions: block id -> precision.
        budget: bytes allowed (pool-wide, or the sum of the per-model budgets).
        bytes: bytes of the planned blocks (exact file sizes).
        units: per unit (an embedding and its tied head are one): blocks, weight stats,
            whether it was measured, its options and the chosen precision.
    """

    precisions: dict[str, str]
    budget: int
    bytes: int
    units: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "bytes": self.bytes,
            "precisions": self.precisions,
            "units": self.units,
        }


def _units(pool: Pool, model: str) -> dict[str, list[str]]:
    """Unit id -> its blocks: every block alone, except a tied head joins its source."""
    tied = tied_sources(pool)
    units: dict[str, list[str]] = {}
    for bid in pool.model(model).blocks:
        units.setdefault(tied.get(bid, bid), []).append(bid)
    return units


def _unit_stats(pool: Pool, blocks: list[str]) -> dict[str, float]:
    state = {f"{b}:{k}": v for b in blocks for k, v in pool.load_tensors(b, tied=False).items()}
    return weight_stats(state)


def _cheapest(pool: Pool, blocks: list[str], precision: str) -> Option:
    total = 0
    for bid in blocks:
        stored, updates = quantized_block(pool, bid, pool.load_tensors(bid, tied=False), precision)
        total += variant_bytes(pool, bid, stored, updates)
    return Option(precision, total, 0.0)


def plan_precisions(
    pool: Pool,
    calibration: Mapping[str, torch.Tensor],
    *,
    data_key: str,
    choices: Sequence[str] = ("nf4", "int8", "fp16"),
    target_bits: float | None = None,
    budget: int | None = None,
    max_sparsity: float = 0.5,
    screen: float = 1.0,
    cache_dir: Path | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    progress: Callable[[str, int, int], None] | None = None,
) -> Plan:
    """Choose a precision for every block of every model in ``calibration``.

    Args:
        pool: the source pool.
        calibration: model -> ``[N, T]`` calibration windows
            (``assy.calibration.calibration_windows``).
        data_key: identifies the calibration data in cache keys.
        choices: the precisions to choose from.
        target_bits: average storage bits per weight, met by every model (``8 * bytes /
            weights``), or
        budget: total bytes of all the models' blocks (one allocation over the pool).
        max_sparsity, screen: the weight-statistics filter (:func:`candidates`).
        cache_dir: calibration cache (activations and sensitivities).
        batch_size: calibration windows per forward call.
        device: where the calibration forward passes run.
        progress: called as ``progress(label, done, total)``.

    Raises:
        UsageError: neither or both of ``target_bits`` and ``budget``, or a budget below
            the smallest plan.
    """
    if (target_bits is None) == (budget is None):
        raise UsageError(f"give exactly one of {arg('target_bits')} and {arg('pool_budget')}")
    choices = check_precision_choices(choices)
    low = min(choices, key=lambda p: NOMINAL_BITS[p])
    units = {model: _units(pool, model) for model in calibration}
    stats = {m: {u: _unit_stats(pool, b) for u, b in units[m].items()} for m in calibration}
    chosen = {
        m: candidates(stats[m], max_sparsity=max_sparsity, screen=screen) for m in calibration
    }
    # exact sizes of every option, to refuse a budget below the smallest plan before
    # calibrating (on small blocks nf4's state can make it larger than int8)
    sizes = {
        m: {
            u: [_cheapest(pool, blocks, p) for p in (choices if u in chosen[m] else [low])]
            for u, blocks in units[m].items()
        }
        for m in calibration
    }
    _allocate_all(pool, sizes, target_bits, budget)
    options: dict[str, dict[str, list[Option]]] = {}
    report: list[dict[str, Any]] = []
    for model, ids in calibration.items():
        measured = measure_blocks(
            pool,
            model,
            ids,
            choices,
            data_key=data_key,
            cache_dir=cache_dir,
            blocks=[b for u in chosen[model] for b in units[model][u]],
            batch_size=batch_size,
            device=device,
            progress=progress,
        )
        options[model] = _unit_options(units[model], chosen[model], measured, choices, sizes[model])
        report += [
            {
                "unit": u,
                "blocks": blocks,
                "stats": stats[model][u],
                "measured": u in chosen[model],
                "options": [o.__dict__ for o in options[model][u]],
            }
            for u, blocks in units[model].items()
        ]
    picked, total_budget = _allocate_all(pool, options, target_bits, budget)
    for row in report:
        row["precision"] = picked[row["unit"]].precision
    precisions = {b: picked[r["unit"]].precision for r in report for b in r["blocks"]}
    return Plan(precisions, total_budget, sum(o.bytes for o in picked.values()), report)


def check_precision_choices(choices: Sequence[str]) -> list[str]:
    """The planner's precisions, normalized and deduplicated.

    Raises:
        UsageError: no precision, or one the quantizer does not know.
    """
    out = []
    for p in choices:
        try:
            out.append(normalize_precision(p))
        except UsageError:
            raise UsageError(
                f"{arg('choices')}: unknown precision {p!r}; choose from "
                f"{', '.join(NOMINAL_BITS)} (int4 means nf4)"
            ) from None
    if not out:
        raise UsageError(f"{arg('choices')} is empty; give precisions such as nf4,int8,fp16")
    return list(dict.fromkeys(out))


def _unit_options(
    units: Mapping[str, list[str]],
    chosen: list[str],
    measured: Mapping[str, Mapping[str, Mapping[str, float]]],
    choices: list[str],
    sizes: Mapping[str, list[Option]],
) -> dict[str, list[Option]]:
    """Each unit's options: measured ones for candidates, the cheapest alone otherwise
    (``sizes``: the unmeasured options of each unit, as sized before calibrating)."""
    options = {}
    for u in units:
        if u not in chosen:
            options[u] = list(sizes[u])
            continue
        blocks = units[u]
        options[u] = [
            Option(
                p,
                sum(measured[b][p]["bytes"] for b in blocks),
                sum(measured[b][p]["loss"] for b in blocks),
            )
            for p in choices
        ]
    return options


def _allocate_all(
    pool: Pool,
    options: Mapping[str, Mapping[str, list[Option]]],
    target_bits: float | None,
    budget: int | None,
) -> tuple[dict[str, Option], int]:
    if budget is not None:
        merged = {u: o for per_model in options.values() for u, o in per_model.items()}
        return allocate(merged, budget), budget
    picked: dict[str, Option] = {}
    total = 0
    for model, per_model in options.items():
        weights = sum(pool.params(b) for b in pool.model(model).blocks)
        model_budget = math.floor(target_bits * weights / 8)
        try:
            picked.update(allocate(per_model, model_budget))
        except UsageError as e:
            raise UsageError(f"{model}: {arg('target_bits')} {target_bits}: {e}") from None
        total += model_budget
    return picked, total

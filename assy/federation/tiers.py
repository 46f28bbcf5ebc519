"""Device tiers: the seed's memory wall, scaled to the pool.

AssyLLM (seed 003, Figure 1) simulates 10% of clients with 64 GB, 15% with 32 GB, 15% with
16 GB, 30% with 8 GB and 30% with 4 GB against 7B models. Our pools hold far smaller
models, so each budget is scaled by the ratio of the pool's largest model's stored bytes
to a 7B model's fp16 bytes (14 GB): the wall then cuts the same share of clients off.
A tier's budget is the most memory a client of that tier may use; a method whose measured
need exceeds it cannot take part there (DESIGN.md's budget contract).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from assy.errors import UsageError
from blockpool import format_size, parse_size

__all__ = [
    "LEGO_TIERS",
    "REFERENCE_BYTES",
    "SEED_TIERS",
    "Population",
    "Tier",
    "assign_tiers",
    "load_tiers",
    "pool_scale",
    "scaled_seed_tiers",
]

REFERENCE_BYTES = 14 * 10**9
"""A 7B model at fp16, the models the seed's memory wall was drawn for."""


@dataclass(frozen=True)
class Tier:
    """A device class.

    Attributes:
        name: what the seed calls it (``"64GB"``) or the name a tiers file gives.
        share: the fraction of clients in it.
        budget: memory bytes a client of the tier may use; ``None``: unlimited.
    """

    name: str
    share: float
    budget: int | None

    def describe(self) -> str:
        budget = "unlimited" if self.budget is None else format_size(self.budget)
        return f"{self.name} ({self.share:.0%}, {budget})"


SEED_TIERS: tuple[Tier, ...] = (
    Tier("64GB", 0.10, 64 * 10**9),
    Tier("32GB", 0.15, 32 * 10**9),
    Tier("16GB", 0.15, 16 * 10**9),
    Tier("8GB", 0.30, 8 * 10**9),
    Tier("4GB", 0.30, 4 * 10**9),
)


LEGO_TIERS: tuple[Tier, ...] = tuple(
    Tier(n, 0.25, None) for n in ("large", "medium", "small", "tiny")
)
"""LEGO's four device classes (seed 001, Table 2), a quarter of the clients each, from the
largest: with ``--method lego`` they hold the 0/25/50/75% sparse variants."""


def pool_scale(model_bytes: Sequence[int]) -> float:
    """The largest model's stored bytes over a 7B model's fp16 bytes (14 GB)."""
    if not model_bytes:
        raise UsageError("the pool holds no model")
    return max(model_bytes) / REFERENCE_BYTES


def scaled_seed_tiers(scale: float) -> list[Tier]:
    """The seed's five tiers with every budget multiplied by ``scale``."""
    return [Tier(t.name, t.share, max(1, round(t.budget * scale))) for t in SEED_TIERS]


def _from_file(path: Path) -> list[Tier]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--tiers {path}: cannot read it ({e})") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"--tiers {path}: not valid JSON ({e.msg})") from None
    rows = raw.get("tiers") if isinstance(raw, dict) else raw
    if not isinstance(rows, list) or not rows:
        raise UsageError(f'--tiers {path}: expected [{{"name", "share", "budget"}}, ...]')
    tiers = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "share" not in row:
            raise UsageError(f"--tiers {path}: tier {i} needs a share and a budget")
        budget = row.get("budget")
        share = row["share"]
        if not isinstance(share, int | float) or share <= 0:
            raise UsageError(f"--tiers {path}: tier {i}: share must be a positive number")
        tiers.append(
            Tier(
                str(row.get("name", f"tier{i}")),
                float(share),
                None if budget in (None, "none", "unlimited") else parse_size(budget),
            )
        )
    return tiers


def load_tiers(spec: str, model_bytes: Sequence[int]) -> list[Tier]:
    """Tiers from ``--tiers``: ``seed`` (scaled to the pool), ``none``, or a JSON file.

    Args:
        spec: ``"seed"``, ``"lego"`` (:data:`LEGO_TIERS`), ``"none"`` (one unlimited
            tier) or a JSON file path holding
            ``[{"name": "big", "share": 0.5, "budget": "2GB"}, ...]`` (budgets as given,
            not scaled; ``null`` for unlimited).
        model_bytes: stored bytes of each model in the pool (for ``seed``).

    Returns:
        The tiers, shares summing to 1.
    """
    if spec == "seed":
        tiers = scaled_seed_tiers(pool_scale(model_bytes))
    elif spec == "lego":
        tiers = list(LEGO_TIERS)
    elif spec == "none":
        tiers = [Tier("all", 1.0, None)]
    else:
        path = Path(spec)
        if not path.is_file():
            raise UsageError(f"--tiers {spec}: not 'seed', 'lego', 'none' or an existing JSON file")
        tiers = _from_file(path)
    total = sum(t.share for t in tiers)
    if abs(total - 1.0) > 1e-6:
        raise UsageError(f"--tiers {spec}: shares sum to {total:g}, not 1")
    return tiers


def assign_tiers(num_clients: int, tiers: Sequence[Tier], seed: int) -> list[int]:
    """Each client's tier index: exact shares (largest remainder), shuffled by ``seed``.

    Returns:
        ``tier_of[partition_id]`` for ``partition_id`` in ``0..num_clients-1``.
    """
    exact = np.asarray([t.share for t in tiers]) * num_clients
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: num_clients - counts.sum()]:
        counts[i] += 1
    order = np.repeat(np.arange(len(tiers)), counts)
    return np.random.default_rng([seed, 0x71E5]).permutation(order).tolist()


@dataclass
class Population:
    """Who takes part: partitions, their nodes, tiers and data sizes.

    Attributes:
        node_of: partition id -> Flower node id (found at start, never stored).
        tiers: the device tiers.
        tier_of: partition id -> index into ``tiers``.
        sizes: partition id -> its number of examples.
        eligible: partitions whose tier can hold the method's measured memory need.
    """

    node_of: dict[int, int]
    tiers: list[Tier]
    tier_of: list[int]
    sizes: list[int]
    eligible: list[int]

    def by_tier(self, partitions) -> dict[str, int]:
        counts = {t.name: 0 for t in self.tiers}
        for p in partitions:
            counts[self.tiers[self.tier_of[p]].name] += 1
        return counts

"""Server-side aggregation as pure functions: screening, FedAvg/HeteAgg, votes, sampling.

Nothing here imports Flower: the server loop hands in what clients sent (tensors, counts,
byte sizes) and gets back what to keep, why the rest was rejected, and the aggregate.
Every function is deterministic: updates are ordered by client (partition id) before any
floating-point sum, so a rerun with the same seed aggregates bit for bit alike.

References: McMahan et al. 2017 (FedAvg); Zhang et al. 2023, "Towards Building the
Federated GPT" (FedIT: FedAvg of LoRA adapters); LEGO (seed 001), Algorithm 2 (HeteAgg);
AssyLLM (seed 003): clients upload block selections, the server aggregates them.
"""

from __future__ import annotations

import hashlib
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from assy.lego import fedavg, heteagg

__all__ = [
    "Rejection",
    "TierChoice",
    "Update",
    "Vote",
    "aggregate_adapters",
    "aggregate_votes",
    "sample_clients",
    "screen_updates",
    "screen_votes",
    "state_digest",
    "update_norm",
]

NORM_FACTOR = 10.0
"""An update whose distance to the global exceeds this many times the median of the
other clients' distances is an outlier."""


@dataclass(frozen=True)
class Update:
    """What one client uploaded after an adapter round.

    Attributes:
        client: its partition id.
        state: parameter name -> tensor (the client's adapter after local training).
        num_examples: the examples it trained on (its FedAvg weight).
        nbytes: the payload's size as received, in bytes.
        model: the pool model it trained on; different models mean different masks.
    """

    client: int
    state: Mapping[str, torch.Tensor]
    num_examples: int
    nbytes: int
    model: str = ""


@dataclass(frozen=True)
class Rejection:
    """An update or vote left out of the aggregate, and why (one line)."""

    client: int
    reason: str


def _shape_problem(global_state: Mapping[str, torch.Tensor], state: Mapping) -> str | None:
    missing = sorted(set(global_state) - set(state))
    extra = sorted(set(state) - set(global_state))
    if missing or extra:
        first = (missing or extra)[0]
        return f"mis-shaped: {'missing' if missing else 'unexpected'} parameter {first!r}"
    for name, g in global_state.items():
        t = state[name]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return f"mis-shaped: {name} is not a floating-point tensor"
        if t.shape != g.shape:
            return f"mis-shaped: {name} is {tuple(t.shape)}, the global {tuple(g.shape)}"
    return None


def _non_finite(state: Mapping[str, torch.Tensor]) -> str | None:
    for name, t in state.items():
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            return f"non-finite: {bad} NaN/inf value(s) in {name}"
    return None


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a state's names, dtypes, shapes and bytes (to compare runs bit for bit)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def update_norm(global_state: Mapping[str, torch.Tensor], state: Mapping) -> float:
    """``‖state − global‖₂`` over all parameters (float64)."""
    total = 0.0
    for name, g in global_state.items():
        total += float((state[name].double() - g.double()).pow(2).sum())
    return total**0.5


def _first_problem(
    u: Update,
    global_state: Mapping[str, torch.Tensor],
    max_bytes: int | None,
    max_examples: Mapping[int, int] | None,
) -> str | None:
    if max_bytes is not None and u.nbytes > max_bytes:
        return f"oversized: {u.nbytes} bytes, at most {max_bytes} expected"
    claimed, known = u.num_examples, (max_examples or {}).get(u.client)
    if not isinstance(claimed, int) or claimed < 1 or (known is not None and claimed > known):
        return f"implausible example count {claimed!r} (the partition holds {known})"
    return _shape_problem(global_state, u.state) or _non_finite(u.state)


def screen_updates(
    global_state: Mapping[str, torch.Tensor],
    updates: Sequence[Update],
    *,
    max_bytes: int | None = None,
    max_examples: Mapping[int, int] | None = None,
    norm_factor: float = NORM_FACTOR,
) -> tuple[list[Update], list[Rejection]]:
    """Keep the plausible updates; reject the rest with the reason.

    In order: oversized payloads (``nbytes > max_bytes``), example counts outside
    ``1..max_examples[client]``, missing/extra/mis-shaped/non-float parameters, NaN or
    inf values; then, among the survivors, norm outliers: ``‖u − g‖ > norm_factor ×
    median of the other survivors' ‖u' − g‖`` (needs one other survivor with a non-zero
    distance; a lone update cannot be judged by its peers and is kept).

    Returns:
        ``(accepted, rejections)``, both ordered by client.
    """
    accepted: list[Update] = []
    rejected: list[Rejection] = []
    for u in sorted(updates, key=lambda u: u.client):
        problem = _first_problem(u, global_state, max_bytes, max_examples)
        if problem:
            rejected.append(Rejection(u.client, problem))
        else:
            accepted.append(u)
    norms = [update_norm(global_state, u.state) for u in accepted]
    kept = []
    for i, u in enumerate(accepted):
        others = [n for j, n in enumerate(norms) if j != i]
        median = statistics.median(others) if others else 0.0
        if median > 0 and norms[i] > norm_factor * median:
            reason = f"norm outlier: ‖Δ‖ = {norms[i]:.4g} > {norm_factor:g} × median {median:.4g}"
            rejected.append(Rejection(u.client, reason))
        else:
            kept.append(u)
    return kept, sorted(rejected, key=lambda r: r.client)


def aggregate_adapters(
    global_state: Mapping[str, torch.Tensor], updates: Sequence[Update]
) -> tuple[dict[str, torch.Tensor], str]:
    """The new global adapter from screened updates.

    FedAvg weighted by example counts where every client trained the same model (same
    shapes and masks, FedIT); HeteAgg (LEGO Algorithm 2, unweighted, zeros are "absent")
    where clients trained different (pruned) models, whose masks differ.

    Returns:
        ``(new_global, "fedavg" | "heteagg")``; the global unchanged (``"none"``) when
        there is no update.
    """
    if not updates:
        return dict(global_state), "none"
    ordered = sorted(updates, key=lambda u: u.client)
    if len({u.model for u in ordered}) > 1:
        new_global, _ = heteagg(global_state, [u.state for u in ordered], write_back=False)
        return new_global, "heteagg"
    averaged = fedavg([u.state for u in ordered], [u.num_examples for u in ordered])
    return {k: averaged[k].to(g.dtype) for k, g in global_state.items()}, "fedavg"


# --------------------------------------------------------------------------- selections


@dataclass(frozen=True)
class Vote:
    """A client's block selection (AssyLLM step 3): its choice and its scores.

    Attributes:
        client: partition id.
        tier: the client's device tier.
        choice: the candidate (assembly) it chose.
        scores: candidate -> its local score (e.g. accuracy on local data).
        num_examples: the examples it scored on (the vote's weight).
    """

    client: int
    tier: str
    choice: str
    scores: Mapping[str, float]
    num_examples: int


@dataclass(frozen=True)
class TierChoice:
    """The aggregated recipe choice of one tier."""

    choice: str
    tally: dict[str, float] = field(default_factory=dict)
    mean_scores: dict[str, float] = field(default_factory=dict)
    voters: int = 0


def screen_votes(
    votes: Sequence[Vote],
    candidates: Mapping[str, Sequence[str]],
    max_examples: Mapping[int, int] | None = None,
) -> tuple[list[Vote], list[Rejection]]:
    """Reject votes for candidates not proposed to the tier, non-finite or unknown scores,
    and example counts outside ``1..max_examples[client]``."""
    accepted, rejected = [], []
    for v in sorted(votes, key=lambda v: v.client):
        proposed = set(candidates.get(v.tier, ()))
        known = (max_examples or {}).get(v.client)
        if v.choice not in proposed:
            problem = f"vote for {v.choice!r}, not a candidate of tier {v.tier}"
        elif set(v.scores) - proposed:
            problem = f"scores for unknown candidates {sorted(set(v.scores) - proposed)}"
        elif not all(np.isfinite(s) for s in v.scores.values()):
            problem = "non-finite score"
        elif v.num_examples < 1 or (known is not None and v.num_examples > known):
            problem = f"implausible example count {v.num_examples} (the partition holds {known})"
        else:
            accepted.append(v)
            continue
        rejected.append(Rejection(v.client, problem))
    return accepted, rejected


def aggregate_votes(votes: Sequence[Vote]) -> dict[str, TierChoice]:
    """Sample-weighted vote aggregation of selections into one choice per tier.

    Each vote counts its ``num_examples``; the candidate with the largest tally wins; ties
    go to the larger sample-weighted mean score, then to the smaller name.

    Returns:
        tier -> :class:`TierChoice` (tiers without votes are absent).
    """
    by_tier: dict[str, list[Vote]] = {}
    for v in sorted(votes, key=lambda v: v.client):
        by_tier.setdefault(v.tier, []).append(v)
    result = {}
    for tier, group in sorted(by_tier.items()):
        tally: dict[str, float] = {}
        score_sum: dict[str, float] = {}
        weight_sum: dict[str, float] = {}
        for v in group:
            tally[v.choice] = tally.get(v.choice, 0.0) + v.num_examples
            for cand, s in v.scores.items():
                score_sum[cand] = score_sum.get(cand, 0.0) + s * v.num_examples
                weight_sum[cand] = weight_sum.get(cand, 0.0) + v.num_examples
        means = {c: score_sum[c] / weight_sum[c] for c in score_sum}
        best = min(tally, key=lambda c: (-tally[c], -means.get(c, -np.inf), c))
        result[tier] = TierChoice(best, tally, means, len(group))
    return result


def sample_clients(eligible: Sequence[int], k: int, seed: int, round_: int) -> list[int]:
    """``min(k, len(eligible))`` clients drawn without replacement, by (seed, round)."""
    pool = sorted(eligible)
    rng = np.random.default_rng([seed, round_, 0x5A])
    picked = rng.choice(len(pool), size=min(k, len(pool)), replace=False)
    return sorted(pool[i] for i in picked.tolist())

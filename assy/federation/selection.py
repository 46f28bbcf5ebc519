"""AssyLLM's federated method without Flower: candidates per tier, forward-only selection,
adapter rounds.

The server proposes, for every device tier, the planner's best assemblies within the
tier's budget (:func:`propose`: the best whole model or variant, and the best chain with
one, two, ... seams, top ``cfg.candidates`` by the planner's score) and fits each one's
adapters in closed form on public text (:func:`fit_candidates`: never on client data).
In a selection round a client scores its tier's candidates on its local examples, forward
only and within its tier's budget (through the block swapper), and uploads one score per
candidate and its choice (:func:`select_round`); the server aggregates the votes into one
recipe per tier. In adapter rounds a client trains the adapters of its tier's recipe on
its local examples, the blocks frozen (:func:`adapt_round`), and the server averages them
(FedAvg, per recipe).

Adapters travel as one flat state: ``"{key}/{before}/{parameter}"`` (``key``: the
recipe's fingerprint, :func:`candidate_key`).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from assy.assembly.adapter import ElasticAdapter
from assy.assembly.chain import build_items, new_adapters
from assy.assembly.recipe import Recipe, recipe_from_dict, recipe_to_dict, validate_recipe
from assy.data import MCExample
from assy.errors import UsageError
from assy.federation.config import FederationConfig
from assy.federation.held import HeldMemory

__all__ = [
    "Candidate",
    "adapt_round",
    "assy_round",
    "adapters_of",
    "candidate_key",
    "client_tier",
    "federation_compat",
    "fit_candidates",
    "flat_state",
    "propose",
    "score_candidate",
    "select_round",
]

KEY_CHARS = 12


@dataclass(frozen=True)
class Candidate:
    """An assembly the server proposes: its recipe (blocks pinned) and planner facts."""

    key: str
    recipe: Recipe
    score: float
    seams: int
    total_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "recipe": recipe_to_dict(self.recipe),
            "score": self.score,
            "seams": self.seams,
            "total_bytes": self.total_bytes,
        }


def candidate_key(recipe: Recipe) -> str:
    """A short name of a recipe: the start of its fingerprint (blocks, not adapters)."""
    return recipe.fingerprint()[:KEY_CHARS]


def client_tier(cfg: FederationConfig, pool, partition: int):
    """The :class:`~.tiers.Tier` of ``partition`` as the server assigns it (both derive
    it from ``cfg``)."""
    from assy.federation.task import model_bytes
    from assy.federation.tiers import assign_tiers, load_tiers

    tiers = load_tiers(cfg.tiers, list(model_bytes(pool).values()))
    return tiers[assign_tiers(cfg.clients, tiers, cfg.seed)[partition]]


# --------------------------------------------------------------------------- the server


def federation_compat(cfg: FederationConfig, cands):
    """``cfg.compat`` loaded, checked to score every layer block of the pool's ``cands``
    (:func:`~assy.assembly.planner.pool_candidates`); ``None`` without it (the depth
    fallback).

    Raises:
        UsageError: no such compare output, not one, or one of other models.
    """
    from assy.assembly.planner import load_compat, uncovered_models

    if not cfg.compat:
        return None
    try:
        table = load_compat(cfg.compat)
    except UsageError as e:
        raise UsageError(f"--compat {e}") from None
    missing = uncovered_models(table, cands)
    if missing:
        raise UsageError(
            f"--compat {cfg.compat}: no comparator scores for the layer blocks of "
            f"{', '.join(missing)}; compare every model of this pool (assy compare {cfg.pool})"
        )
    return table


def propose(
    pool, budgets: Mapping[str, int | None], cfg: FederationConfig
) -> dict[str, list[Candidate]]:
    """Per tier, the planner's best distinct assemblies that fit its budget.

    For every causal anchor and ``seams`` = 0, 1, ..., ``cfg.max_seams``, the planner's best
    chain with at most that many seams, deduplicated, ranked by the planner's score; the
    top ``cfg.candidates``. The planner scores seams with ``cfg.compat``'s compatibility
    matrix when given (:func:`federation_compat`), else with its depth fallback.
    A tier whose budget holds no assembly gets none (its clients sit out).
    """
    from assy.assembly.planner import plan_assembly, pool_candidates
    from assy.assembly.recipe import pin_blocks

    # the working memory of a client's largest call: a batch of max_length tokens
    cands = pool_candidates(pool, batch=cfg.batch_size, tokens=cfg.max_length)
    compat = federation_compat(cfg, cands)
    unlimited = 2 * sum(c.bytes + c.layer_work + c.logit_work for c in cands)
    out: dict[str, list[Candidate]] = {}
    for tier, budget in budgets.items():
        found: dict[str, Candidate] = {}
        anchors = sorted(c.name for c in cands if c.causal and c.n)
        for seams, anchor in itertools.product(range(cfg.max_seams + 1), anchors):
            try:
                plan = plan_assembly(
                    cands, budget or unlimited, compat=compat, max_seams=seams, seed=cfg.seed,
                    anchors=[anchor],
                )  # fmt: skip
            except UsageError:
                continue
            recipe = pin_blocks(plan.recipe, pool)
            key = candidate_key(recipe)
            if key not in found:
                found[key] = Candidate(
                    key, recipe, float(plan.objective), plan.seams, int(plan.bytes["total"])
                )
        ranked = sorted(found.values(), key=lambda c: (-c.score, c.key))
        out[tier] = ranked[: cfg.candidates]
    return out


def fit_candidates(
    pool, recipes: Mapping[str, Recipe], cfg: FederationConfig, text: str
) -> dict[str, torch.Tensor]:
    """Closed-form adapters of every candidate (key -> recipe), fitted on public ``text``
    (no client data).

    Returns:
        The flat state of all candidates' adapters (:func:`flat_state`).
    """
    from assy.assembly.assemble import FitOptions, fit_assembly
    from assy.assembly.calibration import FitData

    state: dict[str, torch.Tensor] = {}
    seq_len = max(8, min(cfg.max_length, 256))
    options = FitOptions(samples=cfg.fit_samples, seq_len=seq_len, seed=cfg.seed)
    data = FitData(text=text, source={"public": "heldout text", "chars": len(text)})
    for key, recipe in recipes.items():
        if recipe.seams:
            state |= flat_state(key, fit_assembly(pool, recipe, data, options).adapters)
    return state


def flat_state(
    key: str, adapters: Mapping[int, ElasticAdapter], *, trainable: bool = False
) -> dict[str, torch.Tensor]:
    """``{"{key}/{before}/{name}": tensor}`` of a recipe's adapters: every tensor (what the
    server sends), or with ``trainable`` only the parameters (what a client uploads: the
    fitted constants, such as held dimensions, never change on a client)."""
    return {
        f"{key}/{before}/{name}": t.detach().clone()
        for before, adapter in adapters.items()
        for name, t in (adapter.named_parameters() if trainable else adapter.state_dict().items())
    }


def adapters_of(
    pool, recipe: Recipe, key: str, state: Mapping[str, torch.Tensor]
) -> dict[int, ElasticAdapter]:
    """The adapters of ``recipe`` loaded from a flat state (strict: every tensor present).

    Raises:
        ValueError: a missing, unexpected or mis-shaped tensor.
    """
    adapters = new_adapters(recipe, pool, seed=0)
    for before, adapter in adapters.items():
        prefix = f"{key}/{before}/"
        own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        adapter.load_state_dict(own, strict=True)
        adapter.eval()
    return adapters


# --------------------------------------------------------------------------- the clients


def _share(pool, items, budget: int | None, held: HeldMemory | None) -> int | None:
    """The swapper's part of ``budget``: what the round does not hold already (its data, a
    tokenizer), so that the whole round keeps the budget. Never less than the chain's
    smallest working set (:func:`blockpool.min_budget`): where what the round holds leaves
    less -- only a budget within a few MB of that minimum -- the round runs at the minimum
    and overruns by the difference, which ``--measure-memory`` shows, rather than failing
    on a few MB of allocator noise."""
    from blockpool import min_budget

    if budget is None or held is None:
        return budget
    return max(budget - held.held(), min_budget(pool, items))


def score_candidate(
    pool,
    recipe: Recipe,
    adapters: Mapping[int, ElasticAdapter],
    examples: Sequence[MCExample],
    budget: int | None,
    held: HeldMemory | None = None,
) -> dict[str, float]:
    """Forward-only score of one assembly on ``examples`` within ``budget`` bytes (less
    what ``held`` says the round holds besides the runner, once the tokenizer is loaded).

    Returns:
        ``score`` (mean log-probability of the correct choice among the choices, the
        continuous number votes compare), ``acc``, ``acc_norm``, ``n`` and the peak
        resident weight bytes the swapper held (0 without a budget).
    """
    from assy.evaluation.choice import choice_scores, mc_metrics
    from blockpool import RunOptions, open_runner

    items = build_items(recipe, pool, dict(adapters))
    tokenizer = pool.tokenizer(recipe.anchor)
    options = RunOptions(budget=_share(pool, items, budget, held), threads=torch.get_num_threads())
    with open_runner(pool, items, options) as run:
        rows = choice_scores(run.runner, tokenizer, examples, progress=False)
    lls = [[s.loglik for s in row] for row in rows]
    gold = [
        ll[ex.label] - torch.logsumexp(torch.tensor(ll, dtype=torch.float64), 0).item()
        for ll, ex in zip(lls, examples, strict=True)
    ]
    metrics = mc_metrics(lls, examples)
    resident = run.swapper.stats.weights_resident_peak_bytes if run.swapper else 0
    return {
        "score": sum(gold) / len(gold),
        "acc": float(metrics["acc"]),
        "acc_norm": float(metrics["acc_norm"]),
        "n": float(metrics["n"]),
        "peak_resident_bytes": float(resident),
    }


def select_round(
    cfg: FederationConfig,
    pool,
    partition: int,
    examples: Sequence[MCExample],
    proposals: Mapping[str, Sequence[str]],
    recipes: Mapping[str, Recipe],
    state: Mapping[str, torch.Tensor],
    budget: int | None,
    held: HeldMemory | None = None,
) -> dict[str, float]:
    """A client's selection round: score its tier's candidates, choose the best.

    Each candidate runs through the swapper within ``budget`` less what the round holds
    besides (``held``: its data, a tokenizer), so that the whole round keeps the budget.

    Returns:
        Metrics: ``score:{key}`` per candidate, ``choice`` (the index of the chosen one in
        the tier's list), ``num-examples`` and the largest peak resident weight bytes.
    """
    if not examples:
        raise UsageError("no local examples to score candidates on")
    tier = client_tier(cfg, pool, partition).name
    keys = list(proposals.get(tier, ()))
    if not keys:
        raise UsageError(f"tier {tier} has no candidate assembly within its budget")
    metrics: dict[str, float] = {"num-examples": float(len(examples))}
    scores = []
    peak = 0.0
    for key in keys:
        recipe = recipes[key]
        validate_recipe(recipe, pool)  # the blocks' sums: this pool holds what was planned
        adapters = adapters_of(pool, recipe, key, state)
        result = score_candidate(pool, recipe, adapters, examples, budget, held)
        metrics[f"score:{key}"] = result["score"]
        scores.append(result["score"])
        peak = max(peak, result["peak_resident_bytes"])
    metrics["choice"] = float(max(range(len(keys)), key=lambda i: (scores[i], -i)))
    metrics["peak-resident-bytes"] = peak
    return metrics


def adapt_round(
    cfg: FederationConfig,
    pool,
    recipe: Recipe,
    key: str,
    state: Mapping[str, torch.Tensor],
    examples: Sequence[MCExample],
    seed: int,
    budget: int | None = None,
    held: HeldMemory | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """A client's adapter round: train its tier's adapters on local examples, blocks frozen.

    The loss is the cross-entropy of the correct choice among the choices (the ``task``
    objective of ``assy stitch``); gradients pass back from the head to the first seam.
    With a ``budget`` the blocks run through the swapper within it (less what ``held``
    says the round holds besides), and the backward pass fetches them again rather than
    keeping them (:func:`~assy.assembly.train.refetching`).

    Returns:
        ``(flat adapter state, metrics)`` with ``num-examples``, ``loss_first``,
        ``loss_last`` and ``backprop-layers`` (the frozen blocks gradients pass through).
    """
    import numpy as np

    from assy.assembly.train import choice_loss, freeze_blocks, refetching, step_bytes, train_loop
    from blockpool import RunOptions, open_runner

    if not examples:
        raise UsageError("no local examples to train on")
    validate_recipe(recipe, pool)
    adapters = adapters_of(pool, recipe, key, state)
    if not adapters:
        return {}, {"num-examples": float(len(examples)), "backprop-layers": 0.0}
    items = build_items(recipe, pool, adapters)
    tokenizer = pool.tokenizer(recipe.anchor)
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    options = RunOptions(budget=_share(pool, items, budget, held), threads=torch.get_num_threads())
    with open_runner(pool, items, options) as run:
        runner = run.runner
        if run.swapper is not None:  # blocks may be evicted: the backward pass re-fetches
            get = refetching(runner.fetch)
        else:
            freeze_blocks(runner)
            get = runner.fetch
        params = [p for a in adapters.values() for p in a.parameters()]
        for p in params:
            p.requires_grad_(True)
        for a in adapters.values():
            a.train()
        order = [int(i) for _ in range(-(-cfg.local_steps * cfg.batch_size // len(examples)))
                 for i in rng.permutation(len(examples))]  # fmt: skip

        need = [0]

        def model(ids, mask, at):
            if run.swapper is not None:  # a step's working memory comes out of the budget
                need[0] = max(need[0], step_bytes(runner, *ids.shape, int(at.sum())))
                run.swapper.hold(model, need[0])
            return runner.walk(get, ids, mask, logits_at=at).logits

        def loss_at(step: int):
            batch = [
                examples[i] for i in order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            ]
            if run.swapper is None:
                return choice_loss(model, batch, tokenizer, pad, runner.device)
            # within a budget one example at a time, each backward before the next forward:
            # the batch's gradient at a fraction of its working memory
            return (
                choice_loss(model, [ex], tokenizer, pad, runner.device) / len(batch) for ex in batch
            )

        with torch.enable_grad():
            report = train_loop(params, loss_at, steps=cfg.local_steps, lr=cfg.lr, desc="adapters")
        if run.swapper is not None:
            run.swapper.release(model)
        first = next(i for i, it in enumerate(items) if isinstance(it, ElasticAdapter))
        through = sum(isinstance(it, str) for it in items[first:])
    resident = run.swapper.stats.weights_resident_peak_bytes if run.swapper else 0
    for a in adapters.values():
        a.eval()
    metrics = {
        "num-examples": float(len(examples)),
        "loss_first": float(report["first_loss"]),
        "loss_last": float(report["last_loss"]),
        "backprop-layers": float(through),
        "trainable-params": float(sum(p.numel() for p in params)),
        "peak-resident-bytes": float(resident),
    }
    return flat_state(key, adapters, trainable=True), metrics


def recipes_json(recipes: Mapping[str, Recipe]) -> str:
    """Recipes (key -> recipe) as one JSON string (a ConfigRecord value)."""
    return json.dumps({k: recipe_to_dict(r) for k, r in sorted(recipes.items())}, sort_keys=True)


def recipes_from_json(text: str) -> dict[str, Recipe]:
    """Inverse of :func:`recipes_json` (raises :class:`UsageError` on a bad recipe)."""
    return {k: recipe_from_dict(v, f"candidate {k}") for k, v in json.loads(text).items()}


def assy_round(
    cfg: FederationConfig,
    partition: int,
    round_: int,
    phase: str,
    proposals: str,
    recipes: str,
    state: Mapping[str, torch.Tensor],
    *,
    pool_dir: str | None = None,
    data_file: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One ``assy`` client round from what a message carries (Flower-free).

    Args:
        phase: ``select`` (score the tier's candidates) or ``adapt`` (train its recipe's
            adapters).
        proposals: JSON ``{tier: [key, ...]}``; recipes: JSON ``{key: recipe}``.
        state: the flat adapters of the recipes sent.

    Returns:
        ``(flat adapter state to upload (empty when selecting), metrics)``.
    """
    import datasets  # noqa: F401 - code: the process's floor, not the round's need

    from assy.federation.task import client_seed, federated_data
    from blockpool import Pool

    held = HeldMemory()
    pool = Pool(pool_dir or cfg.pool)
    examples = federated_data(cfg, data_file).clients[partition]
    tier = client_tier(cfg, pool, partition)
    by_tier = json.loads(proposals)
    sent = recipes_from_json(recipes)
    if phase == "select":
        metrics = select_round(
            cfg, pool, partition, examples, by_tier, sent, state, tier.budget, held
        )
        return {}, metrics
    keys = by_tier.get(tier.name) or []
    if len(keys) != 1:
        raise UsageError(f"tier {tier.name} has no recipe to train this round")
    seed = client_seed(cfg, round_, partition)
    recipe = sent[keys[0]]
    return adapt_round(cfg, pool, recipe, keys[0], state, examples, seed, tier.budget, held)

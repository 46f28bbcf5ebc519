"""Assembly benchmark: does ``assy assemble`` pick assemblies that beat what else fits?

The seed's Figures 13-16 in miniature, on a real pool (the three builtin models and any
variants it holds). The run reported in the README (the issue's full size: all budgets,
``--limit 200``, 30 random recipes), on the 2-core CPU machine, up to four processes side
by side: the cost part in 15 seconds, the quality part in 40-60 minutes, the rows 20-36
minutes per budget::

    assy build-pool smollm2-135m gemma3-270m minilm-l6 --out work/pool
    assy assemble work/pool --budget 300MB --make-variants int8,int4 --max-seams 0 --dry-run
    assy prune work/pool --model smollm2-135m --method sparsegpt --sparsity 0.5 \\
        --as smollm2-135m-sparsegpt-s50
    assy finetune work/pool --model smollm2-135m --steps 40 --as smollm2-dolly \\
        --data ../shared/data/dolly-fed10/local_training_0.json
    assy compare work/pool --task piqa --samples 128 --out work/compare
    B="--pool work/pool --compat work/compare --samples 16 --seq-len 128 --threads 1"
    .venv/bin/python benchmarks/assemble.py $B --parts cost --out results/assemble-cost2.json
    .venv/bin/python benchmarks/assemble.py $B --parts quality --random 30 \\
        --quality-limit 200 --limit 200 --out results/assemble-quality4.json
    R="$B --parts rows --limit 200"
    .venv/bin/python benchmarks/assemble.py $R --budgets 1,4GB --out results/assemble-rows-K.json
    .venv/bin/python benchmarks/assemble.py $R --budgets 0.35,1 --out results/assemble-rows-H.json
    .venv/bin/python benchmarks/assemble.py $R --budgets 0.5,0.25 --out results/assemble-rows-I.json
    .venv/bin/python benchmarks/assemble.py $R --budgets 0.25:swap --out results/assemble-rows-J.json

(Two or three processes ran side by side; rows-H's 100% row is superseded by rows-K's. The
rows at 50%, 35% and 25% ran before the fine-tuned relative joined the pool: it is fp16
with SmolLM2's quality prior, so it can enter a plan only where SmolLM2's fp32 layers can,
at 100% and 4 GB; below, the planner's shortlists with and without it hold none of its
layers.)

The whole benchmark within about an hour (every part and budget, smaller samples:
``--limit 20 --random 12 --quality-limit 50 --heldout-tokens 1024``,
results/assemble-quick5): 61 minutes in one process beside two other benchmark processes
for most of it, 46 minutes of CPU time.

Parts (``--parts``):

- ``rows``: for each budget (a fraction of SmolLM2's fp16 bytes, or a size), four
  assemblies, each fitted in closed form on Wikipedia passages that come after the
  held-out text, then evaluated *within the budget* in a fresh process (the swapper,
  ``--budget``): bits per byte on held-out text (``assy.data.heldout_text``) and
  accuracy on ARC-Easy, PIQA and OBQA validation (``--limit`` examples, standard errors):
  ``planned`` (``assy assemble``'s choice: its shortlist -- the planner's best
  ``--candidates``, the best chain of each model line, the best single model -- and every
  single model that fits, ranked by the measured proxy); ``single`` (the best whole model or
  variant whose plan fits, chosen by measuring every one that fits); ``random`` (a random
  feasible recipe whose weights are within 15% of the planned one's); ``linear`` (the
  planned anchor with the span it would need to drop replaced by one affine map fitted in
  closed form, ReplaceMe-style). Where no resident plan fits the budget, the row plans for
  the swapper (``--allow-swap``), reading at most the budget again per pass
  (``--max-read``), and says so; a budget written ``0.25:swap`` plans for the swapper
  even where a resident plan fits. Plans count what the scoring engine holds on the
  evaluation's 256-token windows (one token's logits, the windows' KV caches). As
  ``assy assemble`` does, where the planned row's measured peak RSS breaks the budget
  contract it is planned again within less by the excess
  (:func:`assy.assembly.measure.contract_budget`, up to three runs, each in the row's
  ``contract_attempts``); the other recipes are then made within what the planned one
  was, so that every row has the same room. Peak resident weights (the swapper's count)
  and peak RSS over the warm floor are reported for every row.
- ``quality``: at one budget (``--quality-budget``), the planner's choice (made as the
  rows make it: planned on the evaluation's windows, measured in full within its budget,
  planned again within less where it breaks the contract) against ``--random`` random
  recipes feasible within the same room, all fitted in closed form: held-out bits per byte
  (per window) and the mean log-likelihood of the gold answer on ARC-Easy validation
  (``--quality-limit`` examples); the planned recipe's rank with a bootstrap 90% interval
  (resampling windows / examples); compatibility (the planner's objective) against bits
  per byte as a scatter PNG with Spearman's rho and its bootstrap interval.
- ``cost``: planning time for pools of 1, 2, 3 models with 1-3 variants each (planner
  inputs: each variant a copy of its model's candidate with int8 / 4-bit bytes and
  priors), and block passes of the proxy with and without the shared-prefix cache.

Results go to ``--out`` (JSON), a markdown table beside it, and PNGs.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from assy.assembly import FitData, FitOptions, fit_assembly, write_assembly  # noqa: E402
from assy.assembly.calibration import passages_text, token_windows  # noqa: E402
from assy.assembly.measure import (  # noqa: E402
    CONTRACT_TRIES,
    contract_budget,
    measure_runs,
    within_contract,
)
from assy.assembly.planner import (  # noqa: E402
    load_compat,
    plan_chain,
    plan_shortlist,
    pool_candidates,
    swap_ends_bytes,
)
from assy.assembly.proxy import measured_choice, score_plans, window_losses  # noqa: E402
from assy.assembly.recipe import plan_replacements  # noqa: E402
from assy.assembly.states import FORWARDS, StateCache  # noqa: E402
from assy.errors import UsageError  # noqa: E402
from blockpool import Pool, RunOptions, format_size, parse_size  # noqa: E402

TASKS = ("arc_easy", "piqa", "obqa")
ANCHOR = "smollm2-135m"
EVAL_WINDOW = 256  # the perplexity window of the measured runs (measure_runs' default)


# --------------------------------------------------------------------------- recipes


def random_chain(cands, rng: random.Random, max_seams: int) -> tuple[str, list[tuple[str, int]]]:
    """A random chain: an anchor, then runs of consecutive layers of random models, each
    starting at or after the depth where the run before it ended."""
    anchors = [c for c in cands if c.causal and c.n]
    layered = [c for c in cands if c.n]
    anchor = rng.choice(anchors)
    chain: list[tuple[str, int]] = []
    depth = 0.0
    while True:
        c = rng.choice(layered)
        first = math.ceil(depth * c.n - 1e-9)
        if first >= c.n:
            break
        start = min(c.n - 1, first + int(rng.expovariate(1.0)))
        length = rng.randint(1, c.n - start)
        chain += [(c.name, i) for i in range(start, start + length)]
        depth = (start + length) / c.n
        if rng.random() < 0.35 or depth >= 1 - 1e-9:
            break
    return anchor.name, chain


def sample_plans(
    cands,
    budget,
    compat,
    swap,
    rng,
    n,
    *,
    near=None,
    max_seams=4,
    tries=20000,
    exclude=(),
    max_read=None,
):
    """``n`` distinct random feasible plans (weights within 15% of ``near``, if given;
    reading at most ``max_read`` a pass, planning for the swapper), none of them one of the
    plans in ``exclude``."""
    out = []
    seen = {(p.recipe.anchor, tuple(p.chain)) for p in exclude}
    for _ in range(tries):
        anchor, chain = random_chain(cands, rng, max_seams)
        if not chain:
            continue
        plan = plan_chain(cands, anchor, chain, budget, compat=compat, swap_ends=swap)
        size = plan.bytes["working_set"] if swap else plan.bytes["total"]
        if plan.seams > max_seams or size > budget:
            continue
        if max_read is not None and plan.bytes["read_per_token"] > max_read:
            continue
        if near is not None and abs(plan.bytes["weights"] - near) > 0.15 * near:
            continue
        key = (anchor, tuple(chain))
        if key in seen:
            continue
        seen.add(key)
        out.append(plan)
        if len(out) == n:
            break
    return out


def _linear_anchor(cands, planned_anchor: str) -> str:
    """The linear baseline's anchor: the planned one when it is SmolLM2 or a variant of
    it (an int8 SmolLM2 fits where the fp16 one does not: the baseline's best
    configuration), else SmolLM2."""
    c = next((x for x in cands if x.name == planned_anchor), None)
    return planned_anchor if c is not None and c.root == ANCHOR else ANCHOR


def linear_recipe(pool, cands, anchor, budget, compat, swap, target_weights):
    """The anchor with the shortest span ending before its last layer replaced by one
    linear map such that its bytes fit (or, planning for the swapper, its weights come
    closest to ``target_weights``)."""
    c = next(x for x in cands if x.name == anchor)
    best = None
    for k in range(1, c.n - 1):
        a, b = c.n - 1 - k, c.n - 2
        chain = [(anchor, i) for i in range(c.n) if not a <= i <= b]
        plan = plan_chain(cands, anchor, chain, budget, compat=compat, swap_ends=swap)
        if swap:
            gap = abs(plan.bytes["weights"] - target_weights)
            if best is None or gap < best[0]:
                best = (gap, (a, b), plan)
        elif plan.bytes["total"] <= budget:
            best = (0, (a, b), plan)
            break
    if best is None:
        return None, None
    _, span, plan = best
    return plan_replacements(pool, anchor, [(span, "linear")]), plan


# --------------------------------------------------------------------------- evaluation


def evaluate_dir(pool_root, directory, budget, heldout, args, tasks=None) -> dict[str, Any]:
    tasks = args.tasks if tasks is None else tasks
    runs = [{"task": "perplexity", "data": str(heldout), "max_tokens": args.heldout_tokens}]
    runs += [{"task": t, "limit": args.limit} for t in tasks]
    doc = measure_runs(pool_root, directory, budget, runs, threads=args.threads)
    results = doc["results"]
    row = {
        "peak_rss_over_floor_bytes": doc["peak_rss_over_floor_bytes"],
        "floor_rss_bytes": doc["floor_rss_bytes"],
        "weights_resident_peak_bytes": max(
            r.get("weights_resident_peak_bytes") or 0 for r in results
        ),
        "bits_per_byte": results[0]["bits_per_byte"],
        "bits_per_byte_stderr": results[0]["bits_per_byte_stderr"],
        "seconds": sum(r["seconds"] for r in results),
    }
    for t, r in zip(tasks, results[1:], strict=True):
        row[t] = r["acc"]
        row[t + "_stderr"] = r["acc_stderr"]
    return row


def fit_and_write(pool, recipe, data, fit, directory, cache) -> Path:
    fitted = fit_assembly(pool, recipe, data, fit, cache=cache)
    write_assembly(directory, fitted, overwrite=True)
    return directory


def describe(plan) -> str:
    parts = [f"{s.source} {s.layers[0]}-{s.layers[1]}" for s in plan.recipe.slices]
    return f"{plan.recipe.anchor}: " + ", ".join(parts)


def single_plans(cands, budget, compat, swap, max_read=None) -> list:
    """Every whole causal model or variant of the pool whose plan fits ``budget`` (and
    reads at most ``max_read`` a pass, planning for the swapper)."""
    singles = []
    for c in cands:
        if not (c.causal and c.n):
            continue
        chain = [(c.name, i) for i in range(c.n)]
        p = plan_chain(cands, c.name, chain, budget, compat=compat, swap_ends=swap)
        if (p.bytes["working_set"] if swap else p.bytes["total"]) > budget:
            continue
        if max_read is None or p.bytes["read_per_token"] <= max_read:
            singles.append(p)
    return singles


def shortlist(cands, budget, compat, args, swap=None, max_read=None) -> list:
    """``assy assemble``'s shortlist: the planner's ``--candidates`` best, the best plan
    of each model line, the best single model."""
    plans, _ = plan_shortlist(
        cands,
        budget,
        args.candidates,
        compat=compat,
        seed=args.seed,
        swap_ends=swap,
        max_read=max_read,
    )
    return plans


def proxy_choice(pool, cands, plans, budget, compat, swap, data, fit, args, cache, max_read=None):
    """``assy assemble``'s choice, widened: its shortlist (``plans``: :func:`shortlist`)
    and *every* single model that fits, scored by the measured proxy (closed-form fit,
    held-back windows); the lowest bits per byte wins. Returns ``(best, scored,
    singles)``."""
    singles = single_plans(cands, budget, compat, swap, max_read)
    todo = plans + [s for s in singles if all(s.recipe != p.recipe for p in plans)]
    best, scored = measured_choice(
        pool,
        todo,
        data,
        fit,
        score_windows=args.score_windows,
        cache=cache,
        say=lambda line: print(line, flush=True),
    )
    return best, scored, singles


def contract_choice(
    pool, shaped, budget, plans, compat, swap, max_read, data, fit, args, cache, directory, heldout
):
    """``assy assemble``'s choice at ``budget``, measured in full (:func:`evaluate_dir`)
    within the budget it was planned for; where its peak RSS breaks the budget contract it
    is planned again within less by the excess (:func:`contract_budget`), as the command
    does, up to ``CONTRACT_TRIES`` runs. ``plans`` is the first attempt's shortlist (or
    None). Returns ``(planned, scored, singles, measured, planned_within, attempts)``:
    every other recipe is then made within ``planned_within``, so that all have the same
    room."""
    planning, attempts = budget, []
    for attempt in range(CONTRACT_TRIES):
        try:
            if attempt or plans is None:
                plans = shortlist(shaped, planning, compat, args, swap, max_read)
        except UsageError as e:  # nothing fits within less: the last run stands
            print(f"  no plan within {format_size(planning)}: {e}", flush=True)
            attempts.append({"planned_within": planning, "error": str(e)})
            planning = attempts[-2]["planned_within"]
            break
        planned, scored, singles = proxy_choice(
            pool, shaped, plans, planning, compat, swap, data, fit, args, cache, max_read
        )
        d = fit_and_write(pool, planned.plan.recipe, data, fit, directory, cache)
        r = evaluate_dir(pool.root, d, planning, heldout, args)
        following = contract_budget(r, budget, planning)
        attempts.append(
            {
                "planned_within": planning,
                "recipe": describe(planned.plan),
                "bits_per_byte": r["bits_per_byte"],
                "peak_rss_over_floor_bytes": r["peak_rss_over_floor_bytes"],
            }
        )
        print(
            f"  planned within {format_size(planning)}: {describe(planned.plan)}: "
            f"{r['bits_per_byte']:.4f} bits/byte, peak RSS over floor "
            f"{format_size(r['peak_rss_over_floor_bytes'])}",
            flush=True,
        )
        if following is None or attempt == CONTRACT_TRIES - 1:
            break
        planning = following
    return planned, scored, singles, r, planning, attempts


def part_rows(
    pool, shaped, anchor_bytes, compat, data, heldout, args, work: Path
) -> list[dict[str, Any]]:
    fit = FitOptions(samples=args.samples, seq_len=args.seq_len, seed=args.seed)
    cache = StateCache(work / "states")
    rows = []
    for given in args.budgets:
        spec, _, mode = given.partition(":")
        budget = _budget(spec, anchor_bytes)
        label = f"{float(spec):.0%}" if _is_fraction(spec) else spec
        swap, note, max_read, plans = None, "", None, None
        try:
            if mode == "swap":
                raise UsageError("asked for the swapper (:swap)")
            plans = shortlist(shaped, budget, compat, args)  # the first attempt's
        except UsageError as e:
            note = f"no resident plan ({e}); planned for the swapper, reading at most the budget"
            swap = {c.name: swap_ends_bytes(pool, c.name) for c in shaped if c.causal}
            # the swapper's plans read at most their budget again per pass: streaming whole
            # models (the best objective) would take hours to evaluate here
            max_read = budget
        print(f"[{label} = {format_size(budget)}] {note or 'resident plans'}", flush=True)
        directory = work / f"b{label}"
        planned, scored, singles, r, planning, attempts = contract_choice(
            pool,
            shaped,
            budget,
            plans,
            compat,
            swap,
            max_read,
            data,
            fit,
            args,
            cache,
            directory / "planned",
            heldout,
        )
        rows.append(
            _row(label, budget, swap, "planned", planned.plan, r)
            | {"proxy_candidates": [s.to_json() for s in scored], "contract_attempts": attempts}
        )
        rng = random.Random(args.seed)
        cases: list[tuple[str, Any, Any]] = []
        randoms = sample_plans(
            shaped,
            planning,
            compat,
            swap,
            rng,
            1,
            near=planned.plan.bytes["weights"],
            exclude=[planned.plan],
            max_read=max_read,
        )
        if randoms:
            cases.append(("random", randoms[0], randoms[0].recipe))
        recipe, lplan = linear_recipe(
            pool,
            shaped,
            _linear_anchor(shaped, planned.plan.recipe.anchor),
            planning,
            compat,
            swap,
            planned.plan.bytes["weights"],
        )
        if recipe is not None:
            cases.append(("linear", lplan, recipe))
        # every single model or variant that fits is measured on the held-out text (within
        # the budget, fresh process); the best of them then on the tasks too
        measured_singles = []
        for s in singles:
            d = fit_and_write(
                pool, s.recipe, data, fit, directory / f"single-{s.recipe.anchor}", cache
            )
            r = evaluate_dir(pool.root, d, planning, heldout, args, tasks=[])
            measured_singles.append((r["bits_per_byte"], s, r, d))
            print(f"  single {describe(s)}: {r['bits_per_byte']:.4f} bits/byte", flush=True)
        for name, plan, rec in cases:
            d = fit_and_write(pool, rec, data, fit, directory / name, cache)
            r = evaluate_dir(pool.root, d, planning, heldout, args)
            rows.append(_row(label, budget, swap, name, plan, r))
            print(f"  {name} {describe(plan)}: {r['bits_per_byte']:.4f} bits/byte", flush=True)
        if measured_singles:
            _, s, _, d = min(measured_singles, key=lambda x: x[0])
            r = evaluate_dir(pool.root, d, planning, heldout, args)
            rows.append(
                _row(label, budget, swap, "single", s, r)
                | {"singles_measured": len(measured_singles)}
            )
        else:
            rows.append(
                {
                    "budget": label,
                    "budget_bytes": budget,
                    "method": "single",
                    "note": "no whole model or variant fits",
                }
            )
    return rows


def _row(label, budget, swap, name, plan, r):
    return {
        "budget": label,
        "budget_bytes": budget,
        "allow_swap": swap is not None,
        "method": name,
        "recipe": describe(plan),
        "seams": plan.seams,
        "planned_within": plan.budget,
        "planned_bytes": dict(plan.bytes),
        "objective": plan.objective,
        **r,
        "within_budget": r["weights_resident_peak_bytes"] <= budget,
        # DESIGN.md's budget contract for the whole process over its warm floor
        "rss_within_budget": within_contract(r, budget),
    }


def _budget(spec: str, anchor_bytes: int) -> int:
    """A budget given as a fraction of SmolLM2's fp16 bytes (``0.35``) or a size."""
    return int(float(spec) * anchor_bytes) if _is_fraction(spec) else parse_size(spec)


def _is_fraction(spec: str) -> bool:
    try:
        return float(spec) <= 1.0
    except ValueError:
        return False


# --------------------------------------------------------------------------- quality


def _ranks(values, better_low=True):
    order = sorted(range(len(values)), key=lambda i: values[i] if better_low else -values[i])
    rank = [0] * len(values)
    for r, i in enumerate(order):
        rank[i] = r + 1
    return rank


def spearman(x, y) -> float:
    """Spearman's rho (scipy's: ties get their mean rank); nan when either is constant."""
    import warnings

    from scipy.stats import spearmanr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant input: nan, said by the value itself
        return float(spearmanr(x, y).statistic)


def part_quality(
    pool, shaped, anchor_bytes, compat, data, heldout, args, work: Path
) -> dict[str, Any]:
    from assy.assembly.chain import build_items
    from assy.evaluation import evaluate_target

    budget = _budget(args.quality_budget, anchor_bytes)
    fit = FitOptions(samples=args.samples, seq_len=args.seq_len, seed=args.seed)
    cache = StateCache(work / "states")
    heldout_text = heldout.read_text()
    # the planned recipe is the rows' (and assy assemble's): planned on the evaluation's
    # windows, measured within its budget, planned again within less where it breaks the
    # budget contract; its proxy's forwards are counted too
    before = FORWARDS.value
    print(f"[quality at {format_size(budget)}] the planned recipe", flush=True)
    choice, _, _, measured, planning, attempts = contract_choice(
        pool,
        shaped,
        budget,
        None,
        compat,
        None,
        None,
        data,
        fit,
        args,
        cache,
        work / "quality-planned",
        heldout,
    )
    planned = choice.plan
    randoms = sample_plans(
        shaped,
        planning,
        compat,
        None,
        random.Random(args.seed + 1),
        args.random,
        exclude=[planned],
    )
    plans = [planned] + randoms
    print(
        f"[quality within {format_size(planning)}] planned + {len(randoms)} random recipes",
        flush=True,
    )
    scored = score_plans(pool, plans, data, fit, score_windows=args.score_windows, cache=cache)
    forwards = FORWARDS.value - before
    results = []
    for i, s in enumerate(scored):
        tok = pool.tokenizer(s.plan.recipe.anchor)
        windows = token_windows(
            tok, heldout_text, args.quality_windows, args.seq_len, seed=args.seed
        )
        nats, tokens, nbytes = window_losses(pool, s.fitted, windows, RunOptions(), cache)
        with tempfile.TemporaryDirectory() as tmp:
            log = Path(tmp) / "s.jsonl"
            items = build_items(s.fitted.recipe, pool, s.fitted.adapters)
            evaluate_target(
                pool,
                items,
                tok,
                "arc_easy",
                limit=args.quality_limit,
                log_samples=log,
                progress=False,
            )
            gold = [json.loads(x) for x in log.read_text().splitlines()]
        gold_ll = [g["resps"][g["target"]][0] for g in gold]
        results.append(
            {
                "recipe": describe(s.plan),
                "objective": s.plan.objective,
                "planned": i == 0,
                "bytes": s.plan.bytes["total"],
                "proxy_bits_per_byte": s.bits_per_byte,
                "window_nats": nats,
                "window_bytes": nbytes,
                "gold_loglik": gold_ll,
                "bits_per_byte": sum(nats) / math.log(2) / sum(nbytes),
                "mean_gold_loglik": statistics.fmean(gold_ll),
            }
        )
        print(
            f"  {'planned' if i == 0 else 'random'} {describe(s.plan)}: objective {s.plan.objective:.3f}, held-out {results[-1]['bits_per_byte']:.4f} bits/byte, gold ll {results[-1]['mean_gold_loglik']:.3f}",
            flush=True,
        )
    rng = random.Random(args.seed)
    nwin, nex = len(results[0]["window_nats"]), len(results[0]["gold_loglik"])
    bpb_ranks, ll_ranks, rhos = [], [], []
    for _ in range(args.bootstrap):
        w = [rng.randrange(nwin) for _ in range(nwin)]
        e = [rng.randrange(nex) for _ in range(nex)]
        bpb = [
            sum(r["window_nats"][j] for j in w) / math.log(2) / sum(r["window_bytes"][j] for j in w)
            for r in results
        ]
        ll = [statistics.fmean(r["gold_loglik"][j] for j in e) for r in results]
        bpb_ranks.append(_ranks(bpb)[0])
        ll_ranks.append(_ranks(ll, better_low=False)[0])
        k = [rng.randrange(len(results)) for _ in results]
        rhos.append(spearman([results[j]["objective"] for j in k], [-bpb[j] for j in k]))
    n = len(results)
    bpb_all = [r["bits_per_byte"] for r in results]
    ll_all = [r["mean_gold_loglik"] for r in results]
    rho = spearman([r["objective"] for r in results], [-x for x in bpb_all])
    summary = {
        "budget": format_size(budget),
        "planned_within": format_size(planning),
        "contract_attempts": attempts,
        "planned_measured": measured,
        "planned_rss_within_contract": within_contract(measured, budget),
        "recipes": n,
        "planned_rank_bits_per_byte": _ranks(bpb_all)[0],
        "planned_rank_bits_per_byte_90ci": _interval(bpb_ranks),
        "planned_rank_gold_loglik": _ranks(ll_all, better_low=False)[0],
        "planned_rank_gold_loglik_90ci": _interval(ll_ranks),
        "top_10_percent": _ranks(bpb_all)[0] <= max(1, math.ceil(0.1 * n)),
        "spearman_compat_vs_neg_bpb": rho,
        "spearman_90ci": _interval([r for r in rhos if not math.isnan(r)]),
        "proxy_forwards": forwards,
        "results": [
            {k: v for k, v in r.items() if k not in ("window_nats", "window_bytes", "gold_loglik")}
            for r in results
        ],
    }
    _scatter(results, rho, summary["spearman_90ci"], work / "compat_vs_bpb.png")
    summary["scatter_png"] = str(work / "compat_vs_bpb.png")
    # the same last candidate with a fresh cache: what sharing saved
    fresh_before = FORWARDS.value
    score_plans(pool, [plans[-1]], data, fit, score_windows=args.score_windows, cache=StateCache())
    summary["last_candidate_forwards_shared_vs_fresh"] = [
        scored[-1].forwards,
        FORWARDS.value - fresh_before,
    ]
    return summary


def _interval(values, level=0.9):
    values = sorted(values)
    if not values:
        return [None, None]
    lo = values[int((1 - level) / 2 * (len(values) - 1))]
    hi = values[int((1 + level) / 2 * (len(values) - 1))]
    return [lo, hi]


def _scatter(results, rho, ci, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    xs = [r["objective"] for r in results]
    ys = [r["bits_per_byte"] for r in results]
    ax.scatter(xs[1:], ys[1:], s=18, color="gray", label="random feasible recipes")
    ax.scatter(xs[:1], ys[:1], s=60, color="red", marker="*", label="planned")
    ax.set_xlabel("planner objective (compatibility along the chain)")
    ax.set_ylabel("held-out bits per byte (lower is better)")
    ax.set_title(
        f"Spearman rho(compat, -bpb) = {rho:.2f}, 90% CI [{ci[0]:.2f}, {ci[1]:.2f}]", fontsize=9
    )
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# --------------------------------------------------------------------------- cost


def part_cost(cands, compat, args) -> list[dict[str, Any]]:
    # the pool's own models (a pool with variants holds them too: they are not models)
    models = sorted(
        [c for c in cands if c.n and c.name == c.root], key=lambda c: (not c.causal, c.name)
    )
    rows = []
    for m in (1, 2, 3):
        base = models[:m]
        if not any(c.causal for c in base):
            continue
        for v in (1, 2, 3):
            pool_cands = []
            for c in base:
                pool_cands.append(c)
                for precision, share, q in (("int8", 0.5, 0.964), ("nf4", 0.25, 0.888))[: v - 1]:
                    pool_cands.append(
                        replace(
                            c,
                            name=f"{c.name}-{precision}",
                            root=c.root,
                            precision=precision,
                            layer_ids=tuple(f"{b}-{precision}" for b in c.layer_ids),
                            layer_bytes=tuple(int(b * share) for b in c.layer_bytes),
                            layer_quality=tuple(q for _ in c.layer_bytes),
                        )
                    )
            budget = int(0.6 * max(c.bytes for c in base)) + max(
                c.layer_work + c.logit_work for c in base
            )
            tic = time.perf_counter()
            try:  # what assy assemble plans: its shortlist for the proxy
                plan_shortlist(pool_cands, budget, 3, compat=compat, seed=0)
                ok = True
            except UsageError:
                ok = False
            rows.append(
                {
                    "models": m,
                    "variants_each": v,
                    "candidates": len(pool_cands),
                    "layers": sum(c.n for c in pool_cands),
                    "budget": budget,
                    "seconds": time.perf_counter() - tic,
                    "feasible": ok,
                }
            )
            print(
                f"  planning: {m} models x {v} variants ({rows[-1]['layers']} layers): {rows[-1]['seconds']:.2f} s",
                flush=True,
            )
    return rows


# --------------------------------------------------------------------------- main


def markdown(doc) -> str:
    lines = [
        "| budget | method | recipe | bits/byte | "
        + " | ".join(doc["args"]["tasks"])
        + " | weights resident peak | weights within | peak RSS over floor"
        + " | RSS within budget + max(10%, 32 MB) |",
        "|" + "---|" * (8 + len(doc["args"]["tasks"])),
    ]
    for r in doc.get("rows", []):
        if "note" in r:
            lines.append(f"| {r['budget']} | {r['method']} | {r['note']} |")
            continue
        accs = " | ".join(f"{r[t]:.3f} ± {r[t + '_stderr']:.3f}" for t in doc["args"]["tasks"])
        lines.append(
            f"| {r['budget']}{' (swap)' if r['allow_swap'] else ''} | {r['method']} | {r['recipe']} | "
            f"{r['bits_per_byte']:.4f} ± {r['bits_per_byte_stderr']:.4f} | {accs} | "
            f"{format_size(r['weights_resident_peak_bytes'])} of {format_size(r['budget_bytes'])} | "
            f"{'yes' if r['within_budget'] else 'NO'} | {format_size(r['peak_rss_over_floor_bytes'])} | "
            f"{'yes' if r['rss_within_budget'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", required=True, type=Path)
    ap.add_argument("--compat", type=Path)
    ap.add_argument("--out", type=Path, default=Path("results/assemble.json"))
    ap.add_argument("--parts", default="rows,quality,cost")
    ap.add_argument("--budgets", default="1,0.5,0.35,0.25,4GB")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--heldout-tokens", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--candidates", type=int, default=3)
    ap.add_argument("--score-windows", type=int, default=8)
    ap.add_argument("--random", type=int, default=30)
    ap.add_argument("--quality-budget", default="1")
    ap.add_argument("--quality-limit", type=int, default=200)
    ap.add_argument("--quality-windows", type=int, default=16)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.budgets = args.budgets.split(",")
    args.tasks = [t for t in args.tasks.split(",") if t]
    parts = set(args.parts.split(","))
    from assy.data import heldout_text

    work = args.out.with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    pool = Pool(args.pool)
    compat = load_compat(args.compat) if args.compat else None
    cands = pool_candidates(pool, tokens=args.seq_len, scored=True)
    # the rows' and the quality part's plans are run by the scoring engine on the
    # evaluation's windows (256 tokens): one token's logits at a time, a window's KV caches
    shaped = pool_candidates(pool, tokens=EVAL_WINDOW, scored=True)
    anchor_bytes = next(
        c.bytes
        for c in pool_candidates(pool, dtype="fp16", tokens=args.seq_len)
        if c.name == ANCHOR
    )
    held = heldout_text(20_000)
    heldout = work / "heldout.txt"
    heldout.write_text(held)
    data = FitData(
        passages_text(20_000, 400_000),
        source={"format": "text", "what": "BoolQ passages after the held-out text"},
    )
    doc: dict[str, Any] = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    }
    tic = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every part: a long run interrupted keeps what it measured
        doc["seconds"] = time.perf_counter() - tic
        args.out.write_text(json.dumps(doc, indent=1, default=str))

    if "cost" in parts:
        doc["cost"] = part_cost(cands, compat, args)
        save()
    if "quality" in parts:
        doc["quality"] = part_quality(pool, shaped, anchor_bytes, compat, data, heldout, args, work)
        save()
    if "rows" in parts:
        doc["rows"] = part_rows(pool, shaped, anchor_bytes, compat, data, heldout, args, work)
        save()
    args.out.with_suffix(".md").write_text(markdown(doc))
    print(markdown(doc))
    if "quality" in doc:
        q = doc["quality"]
        print(
            f"quality: planned rank {q['planned_rank_bits_per_byte']}/{q['recipes']} by bits/byte (90% CI {q['planned_rank_bits_per_byte_90ci']}), {q['planned_rank_gold_loglik']}/{q['recipes']} by gold log-likelihood (90% CI {q['planned_rank_gold_loglik_90ci']}); Spearman {q['spearman_compat_vs_neg_bpb']:.2f} (90% CI {q['spearman_90ci']})"
        )
    print(f"done in {doc['seconds']:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()

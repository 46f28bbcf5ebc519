"""The assembly planner: candidates, bytes, budget -> recipe (pure, no forward pass).

Synthetic candidates (bytes chosen by hand) for the search itself; a tiny random pool for
candidates read from a real manifest and a plan that validates as a recipe against it.
"""

import json
import re
import shutil

import pytest
import torch
from tiny_models import char_tokenizer

from assy.assembly.planner import (
    Candidate,
    CompatTable,
    adapter_nbytes,
    plan_assembly,
    plan_candidates,
    plan_shortlist,
    pool_candidates,
    quality_prior,
)
from assy.assembly.recipe import Recipe, SeamSpec, Slice, describe_recipe, validate_recipe
from assy.errors import UsageError
from blockpool import Pool, build_pool


def cand(name, n, size=100, *, root=None, ends=50, width=8, causal=True, q=1.0, work=10):
    return Candidate(
        name=name,
        root=root or name,
        causal=causal,
        width=width,
        layer_ids=tuple(f"{name}/layer/{i}" for i in range(n)),
        layer_bytes=(size,) * n,
        layer_quality=(q,) * n,
        ends_bytes=ends,
        layer_work=work,
        logit_work=5,
    )


def _pool_of_two():
    big = cand("big", 6, 100)
    small = cand("small", 4, 40, width=6)
    half = cand("big-int4", 6, 30, root="big", q=quality_prior("nf4", 0.0))
    return [big, small, half]


def _table(cands, seed=0):
    """A random compatibility table over every layer block (own seams at 1)."""
    ids = [b for c in cands for b in c.layer_ids]
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(len(ids), len(ids), generator=g, dtype=torch.float64)
    return CompatTable(ids, m.tolist())


def test_plan_fits_the_budget_and_is_a_recipe():
    cands = _pool_of_two()
    for budget in (300, 400, 500, 700, 1000):
        plan = plan_assembly(cands, budget, compat=_table(cands), max_seams=3)
        assert plan.bytes["total"] <= budget
        assert plan.bytes["total"] == sum(plan.bytes[k] for k in ("weights", "adapters", "work"))
        assert plan.seams <= 3 and plan.seams == len(plan.recipe.seams)
        # slices cover exactly the chain, in order
        layers = [
            (s.source, i) for s in plan.recipe.slices for i in range(s.layers[0], s.layers[1] + 1)
        ]
        assert layers == list(plan.chain)


def test_whole_anchor_when_it_fits():
    cands = _pool_of_two()
    plan = plan_assembly(cands, 10_000, compat=_table(cands))
    assert plan.recipe.anchor == "big"
    assert [(s.model, s.layers, s.variant) for s in plan.recipe.slices] == [("big", (0, 5), None)]
    assert plan.seams == 0
    assert plan.objective == pytest.approx(1.0)
    assert all(s.source == "own" for s in plan.steps)


def test_more_budget_never_lowers_the_objective():
    cands = _pool_of_two()
    table = _table(cands, seed=3)
    previous = -float("inf")
    for budget in range(150, 1000, 25):
        try:
            plan = plan_assembly(cands, budget, compat=table, max_seams=4)
        except UsageError:
            assert previous == -float("inf")  # only below the minimum
            continue
        assert plan.objective >= previous - 1e-12
        previous = plan.objective


def test_max_seams_zero_is_the_best_single_model_that_fits():
    cands = _pool_of_two()
    # big (6 x 100 + 50 + 15) does not fit 400; its int4 variant (6 x 30 + 65) does and its
    # prior beats... nothing: small (4 x 40 + 65) fits too, q = 1 > 0.888
    plan = plan_assembly(cands, 400, compat=_table(cands), max_seams=0)
    assert plan.seams == 0 and len(plan.recipe.slices) == 1
    assert plan.recipe.anchor == "small"
    assert plan.recipe.slices[0].layers == (0, 3)
    plan = plan_assembly(cands, 10_000, max_seams=0)
    assert plan.recipe.anchor == "big"
    # only the variant fits: it is chosen, as a variant of its line
    plan = plan_assembly([cands[0], cands[2]], 300, max_seams=0)
    assert plan.recipe.anchor == "big-int4"
    assert plan.recipe.slices[0].variant == "big-int4" and plan.recipe.slices[0].model == "big"


def test_shortlist_holds_the_best_chain_of_each_line_and_the_single_model():
    """A small encoder covers the depth in few bytes, so the objective ranks its chains
    first; the measured proxy must still see the anchor's own line, thinned to fit, and
    the best whole model (here none fits)."""
    big = cand("big", 6, 100, width=4)
    half = cand("big-int4", 6, 60, root="big", q=quality_prior("nf4", 0.0), width=4)
    enc = cand("enc", 3, 5, causal=False, width=4)
    cands = [big, half, enc]
    ids = [b for c in cands for b in c.layer_ids]
    table = CompatTable(ids, [[0.0] * len(ids) for _ in ids])
    top = plan_candidates(cands, 400, 2, compat=table)
    assert all({s.model for s in p.recipe.slices} == {"enc"} for p in top)
    plans, single = plan_shortlist(cands, 400, 2, compat=table)
    assert plans[:2] == top and single is None
    line = plans[2]
    assert {s.model for s in line.recipe.slices} == {"big"} and line.seams >= 1
    assert line.bytes["total"] <= 400
    assert line == plan_assembly([big, half], 400, compat=table)
    # distinct recipes, the single model among them; max_seams 0: whole models only
    plans, single = plan_shortlist(cands, 10_000, 3, compat=table)
    assert len({(p.recipe.anchor, p.recipe.slices) for p in plans}) == len(plans)
    assert single == plan_assembly(cands, 10_000, compat=table, max_seams=0)
    assert single in plans
    plans, alone = plan_shortlist(cands, 10_000, 3, max_seams=0)
    assert alone == plans[0] and all(p.seams == 0 for p in plans)


def test_an_anchor_whose_ends_equal_its_models_is_planned_once():
    from dataclasses import replace

    big = replace(cand("big", 6, 100), ends_key="e")
    pruned = replace(cand("big-s50", 6, 100, root="big", q=0.75), ends_key="e")
    plans = plan_candidates([pruned, big], 10_000, 4)
    assert {p.recipe.anchor for p in plans} == {"big"}  # the model, not its variant
    other = replace(pruned, ends_key="f")  # ends of its own: an anchor of its own
    assert {p.recipe.anchor for p in plan_candidates([other, big], 10_000, 4)} == {
        "big",
        "big-s50",
    }


def test_too_small_budget_names_the_minimum():
    cands = _pool_of_two()
    # smallest: the anchor small's ends + work and either its first layer with an affine
    # seam to its head or its 4 layers whole
    seam = adapter_nbytes(6, 6, "affine")
    floor = 50 + 10 + 5 + min(40 + seam, 4 * 40)
    plan = plan_assembly(cands, floor, max_seams=1)
    assert plan.bytes["total"] == floor
    with pytest.raises(UsageError, match=rf"below the smallest runnable assembly .*\({floor}B"):
        plan_assembly(cands, floor - 1, max_seams=1)
    with pytest.raises(UsageError, match="smallest runnable assembly"):
        plan_assembly(cands, 200, max_seams=0)  # small whole needs 225


def test_same_seed_same_plan_and_seams_where_lines_change():
    cands = _pool_of_two()
    table = _table(cands, seed=1)
    plans = [plan_assembly(cands, 600, compat=table, max_seams=4, seed=7) for _ in range(2)]
    assert plans[0] == plans[1]
    recipe = plans[0].recipe
    roots = [recipe.anchor.split("-")[0]] + [s.model for s in recipe.slices] + ["big"]
    for seam in recipe.seams:
        assert seam.kind in ("affine", "diagonal")
        if seam.kind == "affine":
            assert roots[seam.before] != roots[seam.before + 1]


def test_no_decoder_and_bad_max_seams():
    enc = cand("enc", 4, causal=False)
    with pytest.raises(UsageError, match="no decoder"):
        plan_assembly([enc], 10_000)
    with pytest.raises(UsageError, match="max.seams"):
        plan_assembly(_pool_of_two(), 10_000, max_seams=-1)


def test_comparator_scores_steer_the_seam():
    a, b = cand("a", 4, 1000), cand("b", 4, 500, causal=False)
    ids = [*a.layer_ids, *b.layer_ids]
    m = torch.zeros(8, 8, dtype=torch.float64)
    m[1, 6] = 0.9  # a/layer/1 -> b/layer/2 fits well
    m[6, 7] = 1.0
    m[7, 7] = 0.0
    plan = plan_assembly([a, b], 10_000, compat=CompatTable(ids, m.tolist()), max_seams=2)
    assert plan.recipe.anchor == "a"  # b cannot anchor
    # with every layer resident nothing beats the whole anchor
    assert plan.recipe.slices[0].layers == (0, 3)
    # under a budget below a whole (4 x 1000 + 65): a 0-1 then b 2-3 (0.9 into b/2, b's own seam,
    # an unmeasured seam back into a's head: 0.5) scores 0.5 + 0.225 + 0.25 - 0.125 = 0.85;
    # a 0-2 with its last layer dropped scores 0.75 - 0.125 (fallback 0.5 to the head)
    budget = 2 * 1000 + 2 * 500 + 65 + 2 * adapter_nbytes(8, 8, "affine")
    assert budget < a.bytes + 15
    plan = plan_assembly([a, b], budget, compat=CompatTable(ids, m.tolist()), max_seams=2)
    assert plan.bytes["total"] <= budget
    assert [(s.model, s.layers) for s in plan.recipe.slices] == [("a", (0, 1)), ("b", (2, 3))]
    assert [(s.before, s.kind) for s in plan.recipe.seams] == [(1, "affine"), (2, "affine")]
    assert plan.objective == pytest.approx(0.85)
    assert [s.source for s in plan.steps] == ["own", "own", "comparator", "own", "fallback"]
    # one seam allowed: the cross-model chain is out of reach
    plan = plan_assembly([a, b], budget, compat=CompatTable(ids, m.tolist()), max_seams=1)
    assert {s.model for s in plan.recipe.slices} == {"a"}


# --------------------------------------------------------------------------- a real manifest


@pytest.fixture(scope="module")
def plan_pool(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    sources = []
    for family in ("llama", "gemma3", "bert"):
        src = root / family
        shutil.copytree(tiny_dirs[family], src)
        char_tokenizer().save_pretrained(src)
        sources.append(f"{family}={src}")
    build_pool(sources, root / "pool", dtype="fp32")
    return Pool(root / "pool")


def test_pool_candidates_and_a_valid_recipe(plan_pool):
    cands = {c.name: c for c in pool_candidates(plan_pool, tokens=64)}
    assert set(cands) == {"llama", "gemma3", "bert"}
    assert not cands["bert"].causal and cands["llama"].causal
    assert cands["llama"].layer_work > 0 and cands["llama"].logit_work > 0
    whole = plan_assembly(list(cands.values()), 10**9, max_seams=0)
    validate_recipe(whole.recipe, plan_pool, pinned=False)
    total = sum(c.bytes for c in cands.values())
    for budget in (total // 4, total // 2, total):
        try:
            plan = plan_assembly(list(cands.values()), budget, max_seams=3)
        except UsageError as e:
            assert "smallest runnable assembly" in str(e)
            continue
        validate_recipe(plan.recipe, plan_pool, pinned=False)
        assert plan.bytes["total"] <= budget


# --------------------------------------------------------------------------- the command


def test_assemble_dry_run_prints_the_plan_and_writes_nothing(plan_pool, tmp_path):
    from click.testing import CliRunner

    from assy.cli import cli

    out = tmp_path / "asm"
    args = ["assemble", str(plan_pool.root), "--budget", "1GB", "--seq-len", "32", "--dry-run"]
    result = CliRunner().invoke(cli, [*args, "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["plan"]["bytes"]["total"] <= 10**9
    assert doc["plan"]["recipe"]["anchor"] in ("llama", "gemma3")
    assert not out.exists()
    again = json.loads(CliRunner().invoke(cli, [*args, "--json"]).output)
    assert doc.pop("planning_seconds") >= 0 and again.pop("planning_seconds") >= 0
    assert again == doc  # same seed, same plan
    text = CliRunner().invoke(cli, args)
    assert text.exit_code == 0 and "plan for 1.0GB" in text.output


def test_assemble_writes_an_assembly_that_loads(plan_pool, tmp_path):
    from click.testing import CliRunner

    from assy.assembly import load_assembly
    from assy.cli import cli

    # as the command counts them: scored (one token's logits and the KV caches)
    cands = pool_candidates(plan_pool, tokens=32, scored=True)
    whole = min(
        c.bytes + c.layer_work + c.logit_row + sum(c.layer_cache) for c in cands if c.causal
    )
    budget = str(whole - 1)  # no whole model fits: layers must go
    data = tmp_path / "fit.txt"
    data.write_text(" ".join(["the quick brown fox jumps over the lazy dog."] * 80))
    out = tmp_path / "asm"
    result = CliRunner().invoke(
        cli,
        ["assemble", str(plan_pool.root), "--budget", budget, "--seq-len", "32"]
        + ["--samples", "8", "--data", str(data), "--out", str(out), "--max-seams", "2"]
        + ["--candidates", "2", "--score-windows", "2", "--measure", "2", "--json"]
        + ["--fit", "train", "--steps", "2"],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert (out / "recipe.yaml").is_file() and (out / "plan.png").stat().st_size > 1000
    assembly = load_assembly(plan_pool, out)
    assert assembly.recipe.seams  # the plan dropped or replaced layers, with adapters
    # the measured proxy scored the candidates and chose the lowest bits per byte
    bpb = [c["bits_per_byte"] for c in doc["candidates"]]
    assert len(bpb) >= 2 and doc["chosen"] == bpb.index(min(bpb))
    assert f"chosen: [{doc['chosen'] + 1}] {describe_recipe(assembly.recipe)}" in result.stderr
    assert doc["forwards"] >= sum(c["forwards"] for c in doc["candidates"])  # + training
    # measured in a fresh process within the budget: resident weights within it
    measured = doc["measured"]
    assert measured == json.loads((out / "measured.json").read_text())
    assert 0 < measured["weights_resident_peak_bytes"] <= int(budget)
    assert measured["budget_used_peak_bytes"] <= int(budget)
    assert measured["peak_rss_bytes"] > measured["floor_rss_bytes"] > 0
    # and its peak RSS judged by the budget contract (budget + max(10%, 32 MiB))
    over = measured["peak_rss_over_floor_bytes"]
    assert measured["rss_within_contract"] == (over <= int(budget) + (32 << 20))
    assert doc["plan"]["bytes"]["total"] <= int(budget)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # --fit train: the chosen plan's adapters trained after the closed form
    training = json.loads((out / "fit.json").read_text())["training"]
    assert [(t["objective"], t["steps"]) for t in training] == [("hidden", 2)] * len(training)
    assert training


# --------------------------------------------------------------------------- the measured proxy


def _plan_of(recipe):
    from assy.assembly.planner import Plan

    return Plan(recipe, 0.0, {}, len(recipe.seams), (), 0)


def test_proxy_shares_the_forward_passes_of_a_common_prefix(plan_pool):
    from assy.assembly import FitData, FitOptions
    from assy.assembly.proxy import score_plans
    from assy.assembly.recipe import Recipe, SeamSpec, Slice
    from assy.assembly.states import StateCache

    def recipe(first):
        slices = (Slice("llama", (0, 0)), Slice("gemma3", (first, 2)))
        return Recipe("llama", slices, (SeamSpec(1, "affine"), SeamSpec(2, "affine")))

    data = FitData(" ".join(["the quick brown fox jumps over the lazy dog."] * 120))
    fit = FitOptions(samples=6, seq_len=24)
    a, b = _plan_of(recipe(1)), _plan_of(recipe(2))

    def forwards(plans, cache=None):
        scored = score_plans(plan_pool, plans, data, fit, score_windows=3, cache=cache)
        return [s.forwards for s in scored], scored

    alone_b, _ = forwards([b], StateCache())
    (first, after_a, again), scored = forwards([a, b, a], StateCache())
    # b after a: the embedding and llama's layer 0 over every fitting and scoring window
    # (and the anchor's own states) come from a's cache
    assert after_a < alone_b[0]
    assert alone_b[0] - after_a >= 2 * (6 + 3)
    # a again: every state is cached; only the head runs, once per scored window
    assert again == 3
    assert scored[0].bits_per_byte == pytest.approx(scored[2].bits_per_byte)
    assert all(0 < s.bits_per_byte < 20 and s.tokens == 3 * 23 for s in scored)


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--budget", "12XB", "--dry-run"], r"cannot read size '12XB'"),
        (["--budget", "1KB", "--dry-run"], r"below the smallest runnable assembly .*use --budget"),
        (["--budget", "1GB", "--max-seams", "-1", "--dry-run"], r"--max-seams must be 0 or more"),
        (["--budget", "1GB", "--data", "EMPTY"], r"empty"),
        (["--budget", "1GB", "--data", "SHORT", "--samples", "64"], r"data too short to fit"),
        (["--budget", "1GB"], r"give --data or --task"),
        (["--budget", "1GB", "--candidates", "-1", "--dry-run"], r"--candidates must be"),
        (["--budget", "1GB", "--make-variants", "fp16", "--dry-run"], r"not a quantized"),
        (["--budget", "1GB", "--make-variants", "int8,int3", "--dry-run"], r"unknown precision"),
        (["--budget", "1GB", "--make-variants", "int8,", "--dry-run"], r"give precisions"),
        (["--budget", "1GB", "--max-read", "10MB", "--dry-run"], r"--max-read .* add --allow-swap"),
        (
            ["--budget", "1GB", "--allow-swap", "--max-read", "lots", "--dry-run"],
            r"cannot read size",
        ),
    ],
)
def test_assemble_bad_input_is_one_line_and_writes_nothing(plan_pool, tmp_path, args, pattern):
    from click.testing import CliRunner

    from assy.cli import cli

    (tmp_path / "EMPTY").write_text("")
    (tmp_path / "SHORT").write_text("the quick brown fox. " * 20)
    args = [str(tmp_path / a) if a in ("EMPTY", "SHORT") else a for a in args]
    out = tmp_path / "asm"
    result = CliRunner().invoke(
        cli, ["assemble", str(plan_pool.root), "--seq-len", "32", "--out", str(out), *args]
    )
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["EMPTY", "SHORT"]


def test_assemble_refuses_a_pool_without_a_decoder_and_max_seams_0_is_one_model(
    plan_pool, tmp_path
):
    from click.testing import CliRunner

    from assy.cli import cli

    build_pool([f"bert={plan_pool.root.parent / 'bert'}"], tmp_path / "enc", dtype="fp32")
    result = CliRunner().invoke(
        cli, ["assemble", str(tmp_path / "enc"), "--budget", "1GB", "--dry-run"]
    )
    assert result.exit_code == 2 and "no decoder" in result.stderr
    result = CliRunner().invoke(
        cli,
        ["assemble", str(plan_pool.root), "--budget", "1GB", "--max-seams", "0", "--dry-run"]
        + ["--json", "--allow-swap"],
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)["plan"]
    assert plan["seams"] == 0 and len(plan["recipe"]["slices"]) == 1
    assert plan["bytes"]["working_set"] <= 10**9 and plan["bytes"]["cache"] > 0
    assert plan["bytes"]["read_per_token"] == 0  # everything fits 1 GB
    capped = CliRunner().invoke(
        cli,
        ["assemble", str(plan_pool.root), "--budget", "1GB", "--max-seams", "0", "--dry-run"]
        + ["--json", "--allow-swap", "--max-read", "0"],
    )
    assert capped.exit_code == 0, capped.output
    doc = json.loads(capped.stdout)
    assert doc["max_read"] == 0 and doc["plan"]["bytes"]["read_per_token"] == 0


def test_contract_budget_plans_again_within_less_by_the_excess():
    from assy.assembly.measure import contract_budget
    from blockpool import budget_allowance

    budget = 100 * 10**6
    allowed = budget_allowance(budget)
    assert contract_budget({"peak_rss_over_floor_bytes": allowed}, budget, budget) is None
    assert contract_budget({"peak_rss_over_floor_bytes": None}, budget, budget) is None
    over = {"peak_rss_over_floor_bytes": allowed + 5 * 10**6}
    slack = budget // 100 + (2 << 20)
    assert contract_budget(over, budget, budget) == budget - 5 * 10**6 - slack
    assert contract_budget(over, budget, 90 * 10**6) == 90 * 10**6 - 5 * 10**6 - slack


def _measured(over: int, weights: int) -> dict:
    """What :func:`assy.assembly.measure.measure_assembly` returns, with ``over`` bytes of
    RSS over the floor (the command's control flow is under test, not the process)."""
    return {
        "task": "perplexity",
        "budget": 0,
        "weights_resident_peak_bytes": weights,
        "budget_used_peak_bytes": weights,
        "bytes_read": weights,
        "floor_rss_bytes": 10**8,
        "peak_rss_over_floor_bytes": over,
        "peak_rss_bytes": 10**8 + over,
        "seconds": 0.1,
        "n": 10,
        "score": {"bits_per_byte": 2.0, "bits_per_byte_stderr": 0.1},
    }


@pytest.mark.parametrize("second_fits", [True, False])
def test_assemble_plans_again_where_the_run_broke_the_contract(
    plan_pool, tmp_path, monkeypatch, second_fits
):
    from click.testing import CliRunner

    import assy.assembly.measure as measure
    from assy.cli import cli
    from blockpool import budget_allowance

    cands = pool_candidates(plan_pool, tokens=32, scored=True)
    whole = min(
        c.bytes + c.layer_work + c.logit_row + sum(c.layer_cache) for c in cands if c.causal
    )
    size = whole + (3 << 20)  # a whole model fits
    slack = size // 100 + (2 << 20)
    target = whole - 1 if second_fits else 1000  # where the second plan is to be made
    runs = []

    def fake(pool, assembly, budget, **kwargs):
        runs.append(budget)
        excess = size - slack - target  # the first run: over by this much
        over = budget_allowance(size) + excess if len(runs) == 1 else budget_allowance(size)
        return _measured(over, budget // 2)

    monkeypatch.setattr(measure, "measure_assembly", fake)
    data = tmp_path / "fit.txt"
    data.write_text(" ".join(["the quick brown fox jumps over the lazy dog."] * 80))
    out = tmp_path / "asm"
    result = CliRunner().invoke(
        cli,
        ["assemble", str(plan_pool.root), "--budget", str(size), "--seq-len", "32"]
        + ["--samples", "4", "--data", str(data), "--out", str(out), "--max-seams", "2"]
        + ["--candidates", "1", "--score-windows", "2", "--measure", "2", "--json"],
    )
    if not second_fits:  # nothing fits within less: one line, nothing written
        assert result.exit_code == 2 and runs == [size]
        assert "no smaller plan fits" in result.output and "Traceback" not in result.output
        assert not out.exists() and list(tmp_path.iterdir()) == [data]
        return
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert runs == [size, target]  # measured within the budget it was planned within
    attempts = doc["contract"]["attempts"]
    assert [a["within_contract"] for a in attempts] == [False, True]
    assert [a["planned_within"] for a in attempts] == [size, target]
    assert doc["plan"]["bytes"]["total"] <= target < doc["contract"]["budget"] == size
    assert doc["measured"]["rss_within_contract"] is True
    assert json.loads((out / "measured.json").read_text()) == doc["measured"]
    from assy.assembly import load_assembly

    assert load_assembly(plan_pool, out).recipe.seams  # within less than a whole model


def test_swap_plans_fit_the_working_set_and_max_read_bounds_the_reads():
    from dataclasses import replace

    # logits of a whole call (40 B) against one token's (2 B): the swapper's plan counts one
    big = cand("big", 6, 100)
    small = cand("small", 4, 40, width=6, q=0.9)  # fewer bytes, lower quality
    cands = [replace(c, logit_work=40, logit_row=2) for c in (big, small)]
    swap = {c.name: 20 for c in cands}
    budget = 200
    free = plan_assembly(cands, budget, max_seams=0, swap_ends=swap)
    assert free.recipe.anchor == "big"  # streamed whole: the best objective
    assert free.bytes["working_set"] <= budget
    assert free.bytes["work"] == 10 + 2  # the largest layer call and one token's logits
    assert free.bytes["read_per_token"] == 650 - 20 - (budget - 20 - 12)
    chosen = []
    for cap in (30, 100, 500):
        plans = plan_candidates(cands, budget, 3, max_seams=0, swap_ends=swap, max_read=cap)
        for plan in plans:
            assert plan.bytes["working_set"] <= budget
            assert plan.bytes["read_per_token"] <= cap
        chosen.append((plans[0].recipe.anchor, plans[0].objective))
    assert [a for a, _ in chosen] == ["small", "small", "big"]
    assert chosen[-1][1] == pytest.approx(free.objective) and chosen[0][1] < free.objective
    with pytest.raises(UsageError, match="max_read"):
        plan_assembly(cands, budget, max_read=100)  # no swapper
    with pytest.raises(UsageError, match="reading at most 0B"):
        plan_assembly(cands, budget, swap_ends=swap, max_read=0)


def test_plan_chain_scores_and_sizes_a_chain_as_the_search_does():
    from dataclasses import replace

    from assy.assembly.planner import plan_chain

    for scored in (False, True):
        cands = [
            replace(c, scored=scored, logit_row=1, layer_cache=(2,) * c.n) for c in _pool_of_two()
        ]
        table = _table(cands, seed=2)
        for budget in (300, 500, 700):
            plan = plan_assembly(cands, budget, compat=table, max_seams=3)
            assert plan.bytes["total"] <= budget and ("cache" in plan.bytes) == scored
            again = plan_chain(cands, plan.recipe.anchor, plan.chain, budget, compat=table)
            assert again.objective == pytest.approx(plan.objective)
            assert again.bytes == plan.bytes and again.recipe == plan.recipe


def test_scored_plans_count_one_tokens_logits_and_the_kv_caches():
    from dataclasses import replace

    # logits of a whole call (40 B) against one token's (2 B); KV caches of 3 B a layer
    big = replace(cand("big", 6, 100), logit_work=40, logit_row=2, layer_cache=(3,) * 6)
    trained = plan_assembly([big], 10**6, max_seams=0)  # a training step's: whole logits
    assert trained.bytes["work"] == 10 + 40 and "cache" not in trained.bytes
    scored = plan_assembly([replace(big, scored=True)], 10**6, max_seams=0)
    assert scored.bytes["work"] == 10 + 2 and scored.bytes["cache"] == 6 * 3
    assert scored.bytes["total"] == 650 + 12 + 18 == scored.bytes["weights"] + 30
    budget = scored.bytes["total"]  # the whole model fits, scored; not with whole logits
    assert plan_assembly([replace(big, scored=True)], budget, max_seams=0).recipe.anchor == "big"
    with pytest.raises(UsageError, match="below the smallest runnable"):
        plan_assembly([big], budget, max_seams=0)
    with pytest.raises(UsageError, match=r"\(680B"):  # the caches count in the minimum too
        plan_assembly([replace(big, scored=True)], budget - 1, max_seams=0)


def test_describe_recipe_puts_a_recipe_on_one_line():
    whole = Recipe("a-int8", (Slice("a", (0, 29), "a-int8"),))
    assert describe_recipe(whole) == "a-int8: a-int8 0-29, single model"
    chain = Recipe(
        "a", (Slice("a", (0, 19)), Slice("b", (12, 14))), (SeamSpec(1), SeamSpec(2, "diagonal"))
    )
    assert describe_recipe(chain) == "a: a 0-19 + b 12-14, 2 seams"
    one = Recipe("a", (Slice("a", (0, 3)), Slice("a", (6, 7))), (SeamSpec(1, "diagonal"),))
    assert describe_recipe(one) == "a: a 0-3 + a 6-7, 1 seam"


def test_make_variants_adds_what_is_missing_once_and_the_plan_can_use_it(plan_pool, tmp_path):
    from click.testing import CliRunner

    from assy.cli import cli
    from blockpool import add_quantized_variant

    def whole(pool, names):  # bytes of the smallest of these models run whole, as scored
        cands = pool_candidates(pool, tokens=32, scored=True)
        return min(
            plan_assembly(cands, 10**12, max_seams=0, anchors=[n]).bytes["total"] for n in names
        )

    scratch = tmp_path / "scratch"
    shutil.copytree(plan_pool.root, scratch)
    for model in ("llama", "gemma3"):
        add_quantized_variant(Pool(scratch), model, "int8", f"{model}-int8")
    budget = whole(Pool(scratch), ["llama-int8", "gemma3-int8"])
    assert budget < whole(plan_pool, ["llama", "gemma3"])  # only a variant fits
    root = tmp_path / "pool"
    shutil.copytree(plan_pool.root, root)
    args = ["assemble", str(root), "--budget", str(budget), "--seq-len", "32"]
    args += ["--max-seams", "0", "--dry-run", "--json"]
    refused = CliRunner().invoke(cli, args)
    assert refused.exit_code == 2 and "smallest runnable" in refused.stderr

    made = CliRunner().invoke(cli, [*args, "--make-variants", "int8"])
    assert made.exit_code == 0, made.output
    doc = json.loads(made.stdout)
    assert {v["name"] for v in doc["made_variants"]} == {"llama-int8", "gemma3-int8", "bert-int8"}
    assert doc["plan"]["recipe"]["anchor"] in ("llama-int8", "gemma3-int8")
    assert "made variant llama-int8: llama at int8" in made.stderr
    pool = Pool(root)
    assert pool.model("llama-int8").parent_model == "llama"
    assert {pool.blocks[b].precision for b in pool.model("llama-int8").blocks} == {"int8"}

    more = CliRunner().invoke(cli, [*args, "--make-variants", "int8,int4"])
    assert more.exit_code == 0, more.output
    assert {v["name"] for v in json.loads(more.stdout)["made_variants"]} == {
        "llama-nf4",
        "gemma3-nf4",
        "bert-nf4",
    }
    again = CliRunner().invoke(cli, [*args, "--make-variants", "int4,int8"])
    assert json.loads(again.stdout)["made_variants"] == []
    assert "already has" in again.stderr

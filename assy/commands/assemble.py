"""``assy assemble``: plan the best assembly that fits a memory budget, fit it, measure it."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import click

from assy.commands.common import user_errors
from assy.data import TASKS

__all__ = ["assemble_cmd"]


@click.command("assemble")
@click.argument("pool", type=click.Path(path_type=Path))
@click.option(
    "--budget",
    required=True,
    help="Memory the run may use over its warm floor (weights, adapters, working memory, "
    "KV caches; peak RSS within it + max(10%, 32 MiB)): 4GB, 512MB.",
)
@click.option("--data", type=click.Path(path_type=Path), help="Your data: text, .jsonl or .json.")
@click.option("--task", type=click.Choice(sorted(TASKS)), help="Or a task's validation split.")
@click.option(
    "--compat",
    type=click.Path(path_type=Path),
    help="An assy compare output (its compatibility matrix); default: the depth fallback.",
)
@click.option(
    "--max-seams",
    default=4,
    show_default=True,
    type=int,
    help="Most adapters in the chain; 0: the best whole single model or variant.",
)
@click.option(
    "--candidates",
    default=3,
    show_default=True,
    type=int,
    help="The planner's best plans the measured proxy scores on your data; it also scores "
    "the best plan of each model line alone and the best single model. 0: take the "
    "planner's best unmeasured.",
)
@click.option(
    "--samples", default=32, show_default=True, help="Calibration windows per candidate fit."
)
@click.option(
    "--score-windows",
    default=8,
    show_default=True,
    help="Held-back windows each candidate's bits per byte is measured on.",
)
@click.option(
    "--seq-len", default=256, show_default=True, help="Tokens per window (and per planned call)."
)
@click.option(
    "--fit",
    "fit_mode",
    type=click.Choice(["closed-form", "train"]),
    default="closed-form",
    show_default=True,
    help="train: after the closed form, train the chosen plan's adapters (objective hidden).",
)
@click.option("--steps", default=20, show_default=True, help="Training steps with --fit train.")
@click.option(
    "--make-variants",
    metavar="P[,P...]",
    help="First add to POOL the quantized variants (int8, int4 = nf4, fp4) that its own "
    "models lack, as <model>-<precision> (kept for later runs; said in the output), so "
    "that the planner can choose them.",
)
@click.option(
    "--allow-swap",
    is_flag=True,
    help="Plan for the swapper: the working set (largest layer, pinned parts, adapters, "
    "KV caches, working memory) must fit, not every weight; the plan shows the bytes read "
    "per token.",
)
@click.option(
    "--max-read",
    metavar="SIZE",
    help="With --allow-swap: read at most SIZE of weights again per token (e.g. 100MB; "
    "0: only what stays resident). Without it a plan may stream whole models, best in "
    "quality and slowest.",
)
@click.option(
    "--measure",
    default=20,
    show_default=True,
    help="Examples (--task) or windows (--data) of the real run within --budget that "
    "measures the result; 0: skip it.",
)
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "bf16", "fp16"]),
    default="fp32",
    show_default=True,
    help="Compute dtype the bytes are counted at and the assembly runs at.",
)
@click.option("--threads", type=int, help="Intra-op threads (default: torch's).")
@click.option("--seed", default=0, show_default=True, help="Breaks ties between equal plans.")
@click.option("--dry-run", is_flag=True, help="Print the plan and stop.")
@click.option("--out", type=click.Path(path_type=Path), help="Assembly directory to write.")
@click.option(
    "--png", type=click.Path(path_type=Path), help="The plan's picture (default OUT/plan.png)."
)
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option(
    "--json", "as_json", is_flag=True, help="Print the plan, fit and measurement as JSON."
)
@user_errors
def assemble_cmd(
    pool,
    budget,
    data,
    task,
    compat,
    max_seams,
    candidates,
    samples,
    score_windows,
    seq_len,
    fit_mode,
    steps,
    make_variants,
    allow_swap,
    max_read,
    measure,
    dtype,
    threads,
    seed,
    dry_run,
    out,
    png,
    overwrite,
    as_json,
) -> None:
    """Plan the assembly of POOL's blocks that fits --budget best; fit, write and measure it.

    The planner maximizes the compatibility along the chain (the comparator's scores with
    --compat, a depth fallback otherwise) under resident bytes of weights + adapters + one
    forward call's working memory <= --budget (with --allow-swap: the swapper's working
    set). Its best --candidates plans, the best plan of each model line alone (one model
    and its variants, thinned where it must be) and the best single model that fits are
    fitted in closed form on the first 80% of --data or --task and scored in bits per byte
    on the rest; states shared by candidates are computed once. The best is written, then
    evaluated in a fresh process within --budget: peak resident weights and peak RSS are
    printed beside the plan's prediction. Plans count what the scoring engine holds (one
    token's logits at a time, the windows' KV caches); what the process holds beyond that
    (a tokenizer's remnants, heap kept between calls) is measured: where the run's peak
    RSS over its warm floor passes the budget contract (--budget + max(10%, 32 MiB)), the
    plan is made again within less, by the excess, up to three runs. --dry-run prints
    the plan only.
    """
    from assy.assembly import FitOptions, load_fit_data
    from assy.assembly.measure import CONTRACT_TRIES, contract_budget
    from assy.assembly.planner import compat_source, load_compat, pool_candidates, swap_ends_bytes
    from assy.errors import UsageError
    from blockpool import Pool, budget_allowance, format_size, parse_size

    size = parse_size(budget)
    if max_read is not None and not allow_swap:
        raise UsageError("--max-read limits what the swapper reads: add --allow-swap")
    read_cap = None if max_read is None else 0 if max_read.strip() == "0" else parse_size(max_read)
    if max_seams < 0:
        raise UsageError(f"--max-seams must be 0 or more, got {max_seams}")
    if seq_len < 1:
        raise UsageError(f"--seq-len must be at least 1, got {seq_len}")
    for flag, value in (("--candidates", candidates), ("--measure", measure)):
        if value < 0:
            raise UsageError(f"{flag} must be 0 or more, got {value}")
    if score_windows < 1 or steps < 1:
        raise UsageError("--score-windows and --steps must be at least 1")
    if not dry_run:
        if out is None:
            raise UsageError("--out is needed to write the assembly (or pass --dry-run)")
        if out.exists() and not overwrite:
            raise UsageError(f"{out} exists; choose another --out or pass --overwrite")
        if data is None and task is None:
            raise UsageError("give --data or --task to fit the adapters (or pass --dry-run)")
    fit = FitOptions(samples=samples, seq_len=seq_len, seed=seed)
    fit.validate()
    fit_data = load_fit_data(data, task) if (data or task) and not dry_run else None
    say = _Say(as_json)
    made = _make_variants(Pool(pool), make_variants, say) if make_variants is not None else []
    opened = Pool(pool)
    table = load_compat(compat) if compat is not None else None
    cands = pool_candidates(opened, dtype=dtype, tokens=seq_len, scored=True)
    swap = (
        {c.name: swap_ends_bytes(opened, c.name, dtype=dtype) for c in cands if c.causal}
        if allow_swap
        else None
    )
    doc: dict = {"allow_swap": allow_swap, "max_read": read_cap, "made_variants": made}
    by_name = {c.name: c for c in cands}
    planning = size  # what plans are made within: less, after a run broke the contract
    attempts: list[dict] = []
    for attempt in range(CONTRACT_TRIES):
        plans, alone, planning_seconds = _plan(
            cands, planning, size, candidates, table, max_seams, seed, swap, read_cap, attempts
        )
        plan = plans[0]
        doc |= {
            "plan": plan.to_json(),
            "single_model": alone.to_json() if alone else None,
            "compatibility": compat_source(compat),
            "planning_seconds": round(planning_seconds, 3),
        }
        say.plan(plan, alone, doc["compatibility"], planning_seconds)
        if dry_run:
            if png is not None:
                from assy.assembly.plot import plot_plan

                plot_plan(plan, by_name, png)
                say.line(f"plan picture: {png}")
            if as_json:
                click.echo(json.dumps(doc))
            return
        plan, fitted = _choose_and_fit(
            opened, plans, doc, fit_data, fit, candidates, score_windows, fit_mode, steps,
            dtype, threads, say,
        )  # fmt: skip
        stage, measured = _write_and_measure(
            opened, plan, fitted, by_name, out, png, size, task, fit_data, measure, seq_len,
            dtype, threads, say,
        )  # fmt: skip
        try:
            following = contract_budget(measured, size, planning) if measured else None
            if measured:
                attempts.append(
                    {
                        "planned_within": planning,
                        "peak_rss_over_floor_bytes": measured["peak_rss_over_floor_bytes"],
                        "within_contract": following is None,
                    }
                )
            if following is None or attempt == CONTRACT_TRIES - 1:
                if following is not None:
                    say.line(
                        f"  kept over the budget contract after {CONTRACT_TRIES} runs: use a "
                        "larger --budget to keep it"
                    )
                _commit(stage, out, png, overwrite, say)
                break
            say.line(
                f"  the run held {format_size(measured['peak_rss_over_floor_bytes'])} over its "
                f"floor, beyond the {format_size(budget_allowance(size))} the budget allows: "
                "the process holds memory the plan does not count (a tokenizer's remnants, "
                f"heap kept between calls); planning again within {format_size(following)}"
            )
            planning = following
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    doc["plan"] = plan.to_json()
    doc["measured"] = measured
    doc["contract"] = {
        "budget": size,
        "allowance": budget_allowance(size),
        "planned_within": planning,
        "attempts": attempts,
    }
    doc["out"] = str(out)
    if as_json:
        click.echo(json.dumps(doc, default=str))
        return
    say.line(
        f"wrote {out} ({plan.seams} adapters; {doc['forwards']:,} block passes over "
        f"windows in {doc['fit_seconds']:.0f} s)"
    )


def _plan(cands, planning, size, candidates, table, max_seams, seed, swap, read_cap, attempts):
    """The shortlist within ``planning`` bytes (best first), the best single model and the
    seconds it took. After a run broke the contract (``attempts``), a budget
    below what any plan needs is said in terms of ``size``, the user's."""
    from assy.assembly.planner import plan_shortlist
    from assy.errors import UsageError
    from blockpool import format_size

    tic = time.perf_counter()
    try:
        plans, alone = plan_shortlist(
            cands,
            planning,
            max(candidates, 1),
            compat=table,
            max_seams=max_seams,
            seed=seed,
            swap_ends=swap,
            max_read=read_cap,
        )
    except UsageError as e:
        if not attempts:
            raise
        held = attempts[-1]["peak_rss_over_floor_bytes"] - attempts[-1]["planned_within"]
        raise UsageError(
            f"--budget {format_size(size)}: the measured run held "
            f"{format_size(attempts[-1]['peak_rss_over_floor_bytes'])} over its floor, "
            f"{format_size(max(held, 0))} beyond its plan, and no smaller plan fits ({e}); "
            "use a larger --budget"
        ) from None
    return plans, alone, time.perf_counter() - tic


def _choose_and_fit(
    opened, plans, doc, fit_data, fit, candidates, score_windows, fit_mode, steps, dtype,
    threads, say,
):  # fmt: skip
    """The measured proxy's choice among the shortlist ``plans`` (or the planner's best,
    ``plans[0]``), its adapters fitted (and trained with ``--fit train``); ``doc`` gains
    what was scored."""
    from assy.assembly.states import FORWARDS, StateCache, default_cache_dir

    cache = StateCache(default_cache_dir())
    options = _run_options(dtype, threads)
    start = time.perf_counter()
    forwards0 = FORWARDS.value
    if candidates:
        from assy.assembly.proxy import measured_choice

        chosen, scored = measured_choice(
            opened,
            plans,
            fit_data,
            fit,
            score_windows=score_windows,
            options=options,
            cache=cache,
            say=say.line,
        )
        doc["candidates"] = [s.to_json() for s in scored]
        fitted, plan = chosen.fitted, chosen.plan
        doc["chosen"] = scored.index(chosen)
    else:
        from assy.assembly import fit_assembly

        plan = plans[0]
        fitted = fit_assembly(opened, plan.recipe, fit_data, fit, options=options, cache=cache)
    if fit_mode == "train":
        from dataclasses import replace

        from assy.assembly import fit_assembly

        say.line(f"training the adapters: objective hidden, {steps} steps")
        trained = replace(fit, objective="hidden", steps=steps)
        fitted = fit_assembly(
            opened,
            plan.recipe,
            _fit_part(fit_data) if candidates else fit_data,
            trained,
            options=options,
            cache=cache,
            log=say.line,
        )
    doc["forwards"] = FORWARDS.value - forwards0
    doc["fit_seconds"] = round(time.perf_counter() - start, 2)
    fitted.report["plan"] = plan.to_json()
    if candidates:
        fitted.report["candidates"] = doc["candidates"]
    return plan, fitted


def _make_variants(pool, spec: str, say) -> list[dict]:
    """Add the quantized variants ``spec`` names that ``pool``'s own models lack."""
    import torch

    from assy.commands.common import progress_bars
    from assy.errors import UsageError
    from blockpool import Pool, add_quantized_variant, chain_nbytes, missing_quantized_variants

    precisions = [p.strip() for p in spec.split(",")]
    if not all(precisions):
        raise UsageError(f"--make-variants {spec!r}: give precisions such as int8,int4")
    todo = missing_quantized_variants(pool, precisions)  # checks them all before any write
    made = []
    for model, precision, name in todo:
        tic = time.perf_counter()
        add_quantized_variant(pool, model, precision, name, progress=progress_bars())
        pool = Pool(pool.root)  # the manifest as written, for the next variant too
        bytes_ = chain_nbytes(pool, pool.model(name).blocks, torch.float32)
        made.append({"model": model, "precision": precision, "name": name, "bytes": bytes_})
        say.line(
            f"made variant {name}: {model} at {precision}, {bytes_ / 1e6:,.1f} MB of weights "
            f"at fp32 compute ({time.perf_counter() - tic:.0f} s; kept in the pool)"
        )
    if not todo:
        say.line(f"variants: the pool already has {', '.join(precisions)} of its models")
    return made


class _Say:
    """Lines for the user: stdout, or stderr (through rich, plain in pipes) with --json."""

    def __init__(self, as_json: bool) -> None:
        from rich.console import Console

        self.as_json = as_json
        self.console = Console(file=sys.stderr, highlight=False) if as_json else None

    def line(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, markup=False, soft_wrap=True)
        else:
            click.echo(text)

    def plan(self, plan, alone, source: str, seconds: float) -> None:
        if self.as_json:
            return
        _print_plan(plan, alone, source, seconds, self.line)


def _run_options(dtype: str, threads):
    from blockpool import RunOptions

    options = RunOptions(dtype=dtype, threads=threads, batch_size=4)
    options.validate()
    return options


def _fit_part(data):
    from dataclasses import replace

    from assy.assembly.proxy import SCORE_SHARE, split_text

    text, _ = split_text(data.text)
    return replace(data, text=text, source={**data.source, "held_back": SCORE_SHARE})


def _write_and_measure(
    pool, plan, fitted, by_name, out, png, size, task, data, measure, seq_len, dtype, threads, say
):  # fmt: skip
    """Write the assembly (and its picture) into a stage beside ``out`` and measure it
    there, the swapper given the budget ``plan`` was made within; its peak RSS is judged
    by the contract of ``size``, the user's budget. Returns ``(stage, measured)``
    (``None`` with ``--measure 0``): :func:`_commit` renames it into place."""
    from assy.assembly import write_assembly
    from assy.assembly.measure import measure_assembly, within_contract
    from assy.assembly.plot import plot_plan
    from blockpool import format_size

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.assemble.", dir=out.parent))
    try:
        staged = stage / out.name
        write_assembly(staged, fitted)
        plot_plan(plan, by_name, staged / "plan.png")
        if not measure:
            return stage, None
        say.line(
            f"measuring the assembly within {format_size(plan.budget)} in a fresh process "
            f"({task or 'perplexity'}, {measure} {'examples' if task else 'windows'})"
        )
        how = {"dtype": dtype, "threads": threads or 1}
        if task:
            measured = measure_assembly(
                pool.root, staged, plan.budget, task=task, limit=measure, **how
            )
        else:
            from assy.assembly.proxy import split_text

            text = stage / "heldback.txt"
            text.write_text(split_text(data.text)[1])
            measured = measure_assembly(
                pool.root, staged, plan.budget, task="perplexity", data=text,
                tokens=measure * seq_len, window=seq_len, **how,
            )  # fmt: skip
        measured["rss_within_contract"] = within_contract(measured, size)
        (staged / "measured.json").write_text(json.dumps(measured, indent=1))
        _print_measured(plan, measured, size, say.line)
        return stage, measured
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _commit(stage: Path, out, png, overwrite: bool, say) -> None:
    """Rename the staged assembly into ``out`` (and copy its picture to ``--png``)."""
    out = Path(out)
    staged = stage / out.name
    if png is not None:
        shutil.copyfile(staged / "plan.png", Path(png))
    if out.exists():
        if not overwrite:
            from assy.errors import UsageError

            raise UsageError(f"{out} exists; choose another --out or pass --overwrite")
        os.replace(out, stage / "old")
    os.replace(staged, out)
    say.line(f"plan picture: {png or out / 'plan.png'}")


def _print_measured(plan, m, size: int, line) -> None:
    from blockpool import budget_allowance, format_size

    def fmt(v):
        return format_size(v) if v is not None else "n/a"

    b = plan.bytes
    cache = f" + KV cache {fmt(b['cache'])}" if "cache" in b else ""
    line(
        f"  predicted: weights {fmt(b['weights'])} + adapters {fmt(b['adapters'])} + "
        f"working memory {fmt(b['work'])}{cache} = {fmt(b['total'])} of {fmt(plan.budget)}"
    )
    line(
        f"  measured:  weights resident peak {fmt(m['weights_resident_peak_bytes'])}, budget "
        f"used peak {fmt(m['budget_used_peak_bytes'])}, peak RSS {fmt(m['peak_rss_bytes'])} "
        f"({fmt(m['peak_rss_over_floor_bytes'])} over a warm floor of "
        f"{fmt(m['floor_rss_bytes'])}), read {fmt(m['bytes_read'])} in {m['seconds']:.0f} s"
    )
    if m.get("rss_within_contract") is False:
        line(
            f"  over the budget contract: {fmt(m['peak_rss_over_floor_bytes'])} of RSS over "
            f"the floor against {fmt(budget_allowance(size))} (the budget and "
            "max(10%, 32 MiB))"
        )
    score = ", ".join(
        f"{k} {v:.4f} ± {m['score'][k + '_stderr']:.4f}"
        for k, v in m["score"].items()
        if not k.endswith("_stderr") and v is not None and m["score"].get(k + "_stderr") is not None
    )
    if score:
        line(
            f"  score on {m['n']} {'examples' if m['task'] != 'perplexity' else 'tokens'}: {score}"
        )


def _print_plan(plan, alone, source: str, seconds: float, line) -> None:
    from blockpool import format_size

    b = plan.bytes
    line(
        f"plan for {format_size(plan.budget)}: anchor {plan.recipe.anchor}, "
        f"{len(plan.chain)} layers, {plan.seams} seams, objective {plan.objective:.3f} "
        f"(compatibility: {source}; planned in {seconds:.2f} s)"
    )
    cache = f" + KV cache {format_size(b['cache'])}" if "cache" in b else ""
    line(
        f"  resident {format_size(b['total'])} = weights {format_size(b['weights'])} + "
        f"adapters {format_size(b['adapters'])} + working memory {format_size(b['work'])}" + cache
    )
    if "working_set" in b:
        line(
            f"  --allow-swap: working set {format_size(b['working_set'])} of "
            f"{format_size(plan.budget)}; expected read per token "
            f"{format_size(b['read_per_token'])}"
        )
    for k, s in enumerate(plan.recipe.slices):
        seam = plan.recipe.seam_at(k)
        if seam is not None:
            line(f"  seam {k}: {seam.kind}")
        line(f"  slice {k}: {s}")
    seam = plan.recipe.seam_at(len(plan.recipe.slices))
    if seam is not None:
        line(f"  seam {len(plan.recipe.slices)}: {seam.kind} (into the head)")
    sources: dict[str, int] = {}
    for step in plan.steps:
        sources[step.source] = sources.get(step.source, 0) + 1
    line("  transitions: " + ", ".join(f"{n} {k}" for k, n in sorted(sources.items())))
    if alone is None:
        line("  no whole single model or variant fits this budget")
    elif alone is not plan:
        line(
            f"  best single model that fits: {alone.recipe.anchor} "
            f"({format_size(alone.bytes['total'])}, objective {alone.objective:.3f})"
        )

"""``assy assemble``: plan the best assembly that fits a memory budget, then stitch it."""

from __future__ import annotations

import json
from pathlib import Path

import click

from assy.commands.common import user_errors
from assy.data import TASKS

__all__ = ["assemble_cmd"]


@click.command("assemble")
@click.argument("pool", type=click.Path(path_type=Path))
@click.option(
    "--budget", required=True, help="Memory for weights, adapters and working memory: 4GB, 512MB."
)
@click.option(
    "--data", type=click.Path(path_type=Path), help="Fitting data: text, .jsonl or .json."
)
@click.option("--task", type=click.Choice(sorted(TASKS)), help="Fit on a task's validation split.")
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
@click.option("--samples", default=64, show_default=True, help="Calibration windows.")
@click.option(
    "--seq-len", default=256, show_default=True, help="Tokens per window (and per planned call)."
)
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "bf16", "fp16"]),
    default="fp32",
    show_default=True,
    help="Compute dtype the bytes are counted at.",
)
@click.option("--seed", default=0, show_default=True, help="Breaks ties between equal plans.")
@click.option("--dry-run", is_flag=True, help="Print the plan and stop.")
@click.option("--out", type=click.Path(path_type=Path), help="Assembly directory to write.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan (and fit) as JSON.")
@user_errors
def assemble_cmd(
    pool,
    budget,
    data,
    task,
    compat,
    max_seams,
    samples,
    seq_len,
    dtype,
    seed,
    dry_run,
    out,
    overwrite,
    as_json,
) -> None:
    """Plan the assembly of POOL's blocks that fits --budget best; fit and write it to --out.

    The plan maximizes the compatibility along the chain (the comparator's scores with
    --compat, a depth fallback otherwise) under resident bytes of weights + adapters +
    one forward call's working memory <= --budget. The adapters are then fitted in
    closed form on --data or --task. --dry-run prints the plan only.
    """
    from assy.assembly import FitOptions, load_fit_data, stitch
    from assy.assembly.planner import load_compat, plan_assembly, pool_candidates
    from assy.assembly.states import default_cache_dir
    from assy.errors import UsageError
    from blockpool import Pool, parse_size

    size = parse_size(budget)
    if max_seams < 0:
        raise UsageError(f"--max-seams must be 0 or more, got {max_seams}")
    if seq_len < 1:
        raise UsageError(f"--seq-len must be at least 1, got {seq_len}")
    if not dry_run:
        if out is None:
            raise UsageError("--out is needed to write the assembly (or pass --dry-run)")
        if out.exists() and not overwrite:
            raise UsageError(f"{out} exists; choose another --out or pass --overwrite")
        if data is None and task is None:
            raise UsageError("give --data or --task to fit the adapters (or pass --dry-run)")
    fit = FitOptions(samples=samples, seq_len=seq_len, seed=seed)
    fit.validate()
    opened = Pool(pool)
    table = load_compat(compat) if compat is not None else None
    cands = pool_candidates(opened, dtype=dtype, tokens=seq_len)
    plan = plan_assembly(cands, size, compat=table, max_seams=max_seams, seed=seed)
    alone = plan if plan.seams == 0 else _single(cands, size, seed)
    doc = {
        "plan": plan.to_json(),
        "single_model": alone.to_json() if alone else None,
        "compatibility": str(compat) if compat else "fallback (no --compat)",
    }
    if not as_json:
        _print_plan(plan, alone, doc["compatibility"])
    if dry_run:
        if as_json:
            click.echo(json.dumps(doc))
        return
    fit_data = load_fit_data(data, task)
    report = stitch(
        opened,
        plan.recipe,
        fit_data,
        out,
        fit,
        overwrite=overwrite,
        cache_dir=default_cache_dir(),
        log=(lambda _m: None) if as_json else click.echo,
    )
    if as_json:
        click.echo(json.dumps({**doc, "fit": report}, default=str))
        return
    click.echo(f"wrote {out} (adapters fitted in closed form in {report['seconds']:.0f} s)")


def _single(cands, size, seed):
    from assy.assembly.planner import plan_assembly
    from assy.errors import UsageError

    try:
        return plan_assembly(cands, size, max_seams=0, seed=seed)
    except UsageError:
        return None


def _print_plan(plan, alone, source: str) -> None:
    from blockpool import format_size

    b = plan.bytes
    click.echo(
        f"plan for {format_size(plan.budget)}: anchor {plan.recipe.anchor}, "
        f"{len(plan.chain)} layers, {plan.seams} seams, objective {plan.objective:.3f} "
        f"(compatibility: {source})"
    )
    click.echo(
        f"  resident {format_size(b['total'])} = weights {format_size(b['weights'])} + "
        f"adapters {format_size(b['adapters'])} + working memory {format_size(b['work'])}"
    )
    for k, s in enumerate(plan.recipe.slices):
        seam = plan.recipe.seam_at(k)
        if seam is not None:
            click.echo(f"  seam {k}: {seam.kind}")
        click.echo(f"  slice {k}: {s}")
    seam = plan.recipe.seam_at(len(plan.recipe.slices))
    if seam is not None:
        click.echo(f"  seam {len(plan.recipe.slices)}: {seam.kind} (into the head)")
    sources: dict[str, int] = {}
    for step in plan.steps:
        sources[step.source] = sources.get(step.source, 0) + 1
    click.echo("  transitions: " + ", ".join(f"{n} {k}" for k, n in sorted(sources.items())))
    if alone is None:
        click.echo("  no whole single model or variant fits this budget")
    elif alone is not plan:
        click.echo(
            f"  best single model that fits: {alone.recipe.anchor} "
            f"({format_size(alone.bytes['total'])}, objective {alone.objective:.3f})"
        )

"""``assy stitch``: replace spans of an anchor's layers with other blocks, fit the adapters."""

from __future__ import annotations

import json
from pathlib import Path

import click

from assy.commands.common import run_options, user_errors
from assy.data import TASKS

__all__ = ["stitch_cmd"]


def _span(text: str) -> tuple[int, int]:
    from assy.errors import UsageError

    first, dash, last = text.partition("-")
    if not dash or not first.isdigit() or not last.isdigit():
        raise UsageError(f"--replace {text!r}: expected C-D (layer indices of the anchor)")
    return int(first), int(last)


@click.command("stitch")
@click.argument("pool", type=click.Path(path_type=Path))
@click.option("--anchor", required=True, help="Model giving tokenizer, embedding and head.")
@click.option("--replace", "replace", multiple=True, help="Anchor layers C-D to replace.")
@click.option(
    "--insert",
    multiple=True,
    help="What takes the place of the --replace before it: MODEL:A-B (its layers A to B), "
    "'linear' (one affine map) or '' (drop them).",
)
@click.option(
    "--fit",
    "fit_mode",
    type=click.Choice(["closed-form", "train"]),
    help="Default: closed-form; train (after the closed form) needs --objective.",
)
@click.option(
    "--objective", type=click.Choice(["hidden", "kl", "task"]), help="Training objective."
)
@click.option(
    "--data", type=click.Path(path_type=Path), help="Fitting data: text, .jsonl or .json."
)
@click.option("--task", type=click.Choice(sorted(TASKS)), help="Fit on a task's validation split.")
@click.option("--samples", default=64, show_default=True, help="Calibration windows.")
@click.option("--seq-len", default=256, show_default=True, help="Tokens per window.")
@click.option("--steps", default=100, show_default=True, help="Training steps (with --objective).")
@click.option("--lr", default=1e-3, show_default=True, help="Adapter learning rate.")
@click.option("--train-batch", default=4, show_default=True, help="Windows/examples per step.")
@click.option(
    "--cross-attention",
    "xattn",
    is_flag=True,
    help="Add gated cross-attention "
    "sublayers (4 heads, dim 128) to the adapters at foreign slices.",
)
@click.option(
    "--rms-match",
    is_flag=True,
    help="Scale each mapped stream to the destination's "
    "per-token RMS (off: measured to help one seam and hurt another).",
)
@click.option("--seed", default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Assembly directory.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    help="Where hidden states are cached between runs (default: $ASSY_CACHE_DIR/states).",
)
@run_options()
@click.option("--json", "as_json", is_flag=True, help="Print fit.json.")
@user_errors
def stitch_cmd(
    pool,
    anchor,
    replace,
    insert,
    fit_mode,
    objective,
    data,
    task,
    samples,
    seq_len,
    steps,
    lr,
    train_batch,
    xattn,
    rms_match,
    seed,
    out,
    overwrite,
    cache_dir,
    run,
    as_json,
) -> None:
    """Assemble --anchor with spans of its layers replaced; fit the adapters; write --out.

    Each --replace C-D pairs with the --insert that follows it. Adapters are fitted in
    closed form along the assembled chain, in order, on --data or --task (never the data
    you evaluate on); --objective then trains them (the blocks stay frozen).
    """
    from assy.assembly import FitOptions, load_fit_data, plan_replacements, stitch
    from assy.assembly.states import default_cache_dir
    from assy.errors import UsageError
    from blockpool import Pool

    if len(replace) != len(insert) or not replace:
        raise UsageError(
            f"give one --insert after each --replace ({len(replace)} --replace, "
            f"{len(insert)} --insert)"
        )
    if fit_mode == "train" and objective is None:
        raise UsageError("--fit train needs --objective hidden, kl or task")
    if fit_mode == "closed-form" and objective is not None:
        raise UsageError("--objective trains the adapters: use it without --fit closed-form")
    fit = FitOptions(
        samples=samples,
        seq_len=seq_len,
        seed=seed,
        objective=objective,
        steps=steps,
        lr=lr,
        train_batch=train_batch,
        rms_match=rms_match,
    )
    fit.validate()
    opened = Pool(pool)
    recipe = plan_replacements(
        opened,
        anchor,
        [(_span(r), i) for r, i in zip(replace, insert, strict=True)],
        cross_attention=(4, 128) if xattn else None,
    )
    fit_data = load_fit_data(data, task)
    if task is not None:
        click.echo(
            f"note: fitting on the {task} validation split; evaluate this assembly on other data",
            err=True,
        )
    log = (lambda _m: None) if as_json else click.echo
    report = stitch(
        opened,
        recipe,
        fit_data,
        out,
        fit,
        options=run,
        overwrite=overwrite,
        cache_dir=cache_dir or default_cache_dir(),
        log=log,
    )
    if as_json:
        click.echo(json.dumps(report, default=str))
        return
    params = sum(s["parameters"] for s in report["seams"])
    slices = ", ".join(str(s) for s in recipe.slices)
    click.echo(
        f"{len(recipe.slices)} slices ({slices}), {len(recipe.seams)} adapters, "
        f"{params:,} parameters, fitted on {report['windows']['tokens']:,} tokens in "
        f"{report['seconds']:.0f} s -> {out}"
    )


def show_assembly(pool, root: Path, as_json: bool) -> None:
    """Print an assembly's slices, seams (adapter sizes, fit results), bytes and training."""
    from assy.assembly import describe_assembly
    from blockpool import format_size

    info = describe_assembly(pool, root)
    if as_json:
        click.echo(json.dumps(info, indent=1, default=str))
        return
    click.echo(
        f"assembly {info['assembly']} (anchor {info['anchor']}, {info['layers']} layers, blocks "
        f"{format_size(info['block_bytes'])} + adapters {format_size(info['adapter_bytes'])})"
    )
    click.echo(f"{'slice':<7}{'model':<28}{'layers':>8}{'bytes':>12}")
    for s in info["slices"]:
        name = s["model"] if not s["variant"] else f"{s['model']} [{s['variant']}]"
        span = f"{s['layers'][0]}-{s['layers'][1]}"
        click.echo(f"{s['index']:<7}{name:<28}{span:>8}{format_size(s['bytes']):>12}")
    click.echo(f"{'seam':<7}{'kind':<16}{'width':>12}{'params':>11}{'bytes':>11}  fit")
    for s in info["seams"]:
        kind = s["kind"] + ("+xattn" if s["cross_attention"] else "")
        width = f"{s['d_in']}->{s['d_out']}"
        fit = "identity"
        if s["ridge"] is not None:
            r2 = s["validation_r2"]
            fit = (f"held-out R2 {r2:.3f}, " if r2 is not None else "") + (
                f"ridge {s['ridge']:g}, held dims {s['held_dims']}, RMS gain {s['rms_gain']:.2f}"
            )
        click.echo(
            f"{s['before']:<7}{kind:<16}{width:>12}{s['parameters']:>11,}"
            f"{format_size(s['bytes']):>11}  {fit}"
        )
    data, windows = info["data"] or {}, info["windows"] or {}
    where = data.get("path") or f"task {data.get('task')} ({data.get('split')})"
    click.echo(
        f"fitted on {windows.get('tokens', 0):,} tokens ({windows.get('samples')} windows "
        f"x {windows.get('seq_len')}) of {where}"
    )
    for t in info["training"]:
        click.echo(
            f"trained: {t['objective']}, {t['steps']} steps, {t['trainable_parameters']:,} "
            f"parameters, loss {t['first_loss']:.4f} -> {t['last_loss']:.4f}"
        )

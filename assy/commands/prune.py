"""``assy prune``: magnitude / Wanda / SparseGPT pruning of a pool model into a new one."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click

from assy.commands.common import (
    calibration_options,
    compute_options,
    note_unused,
    progress_bars,
    user_errors,
    wait_option,
)

__all__ = ["prune_cmd"]


@click.command("prune")
@click.argument("pool", type=click.Path(path_type=Path))
@click.option("--model", required=True, help="Source model name in the pool.")
@click.option(
    "--method",
    type=click.Choice(["magnitude", "wanda", "sparsegpt"]),
    required=True,
    help="magnitude needs no calibration; wanda and sparsegpt calibrate.",
)
@click.option("--sparsity", required=True, help="Fraction of zeros (0.5) or n:m kept (2:4).")
@calibration_options
@click.option(
    "--samples",
    default=32,
    show_default=True,
    type=click.IntRange(min=1),
    help="Calibration windows.",
)
@click.option(
    "--seq-len",
    default=128,
    show_default=True,
    type=click.IntRange(min=2),
    help="Tokens per calibration window.",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the window offsets.")
@click.option(
    "--batch-size",
    default=8,
    show_default=True,
    type=click.IntRange(min=1),
    help="Windows per forward call.",
)
@click.option("--as", "new_name", required=True, help="Name of the pruned model in the pool.")
@compute_options
@wait_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@user_errors
def prune_cmd(
    pool: Path,
    model: str,
    method: str,
    sparsity: str,
    calib_task: str | None,
    calib_data: Path | None,
    samples: int,
    seq_len: int,
    seed: int,
    batch_size: int,
    new_name: str,
    device: str,
    threads: int | None,
    wait: bool,
    as_json: bool,
) -> None:
    """Prune the linear weights of every layer of --model and add it to POOL as --as.

    Layers are pruned in order, each on calibration inputs that went through the already
    pruned layers (Wanda, SparseGPT); embeddings, norms and the LM head stay dense.
    Calibration: --calib-task or --calib-data, default the sciq task's text.
    """

    from assy.calibration import calibration_text, calibration_windows
    from assy.lego import parse_sparsity, prune_pool_model
    from assy.lego.sequential import check_prune
    from blockpool import Pool, use_threads

    target = parse_sparsity(sparsity)
    opened = Pool(pool)
    check_prune(opened, model, new_name)
    threads = use_threads(threads)
    ids, source = None, None
    if method == "magnitude":
        names = ["calib_task", "calib_data", "samples", "seq_len", "seed", "batch_size"]
        note_unused(names, "magnitude pruning uses no calibration")
    else:
        source = calibration_text(calib_task, calib_data)
        ids = calibration_windows(opened.tokenizer(model), source.text, samples, seq_len, seed=seed)
    report = prune_pool_model(
        opened,
        model,
        method,
        target,
        new_name,
        calib_ids=ids,
        batch_size=batch_size,
        device=device,
        progress=progress_bars(),
        wait=wait,
    )
    report.calibration = source.label if source else ""
    if as_json:
        click.echo(json.dumps(asdict(report) | {"device": device, "threads": threads}))
    else:
        click.echo(f"{report.summary()} -> {pool}")

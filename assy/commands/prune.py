"""``assy prune``: magnitude / Wanda / SparseGPT pruning of a pool model into a new one."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import click

from assy.commands.common import compute_options, user_errors
from assy.data import TASKS

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
@click.option("--calib-task", type=click.Choice(sorted(TASKS)), help="Calibrate on a task's text.")
@click.option("--calib-file", type=click.Path(path_type=Path), help="Calibrate on a text file.")
@click.option("--samples", default=32, show_default=True, help="Calibration windows.")
@click.option("--seq-len", default=128, show_default=True, help="Tokens per calibration window.")
@click.option("--seed", default=0, show_default=True, help="Seed of the window offsets.")
@click.option("--batch-size", default=8, show_default=True, help="Windows per forward call.")
@click.option("--as", "new_name", required=True, help="Name of the pruned model in the pool.")
@compute_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@user_errors
def prune_cmd(
    pool: Path,
    model: str,
    method: str,
    sparsity: str,
    calib_task: str | None,
    calib_file: Path | None,
    samples: int,
    seq_len: int,
    seed: int,
    batch_size: int,
    new_name: str,
    device: str,
    threads: int | None,
    as_json: bool,
) -> None:
    """Prune the linear weights of every layer of --model and add it to POOL as --as.

    Layers are pruned in order, each on calibration inputs that went through the already
    pruned layers (Wanda, SparseGPT); embeddings, norms and the LM head stay dense.
    """
    from tqdm import tqdm

    from assy.lego import calibration_ids, calibration_text, parse_sparsity, prune_pool_model
    from blockpool import Pool
    from blockpool.session import use_threads

    threads = use_threads(threads)
    opened = Pool(pool)
    ids = None
    if method != "magnitude" or calib_task or calib_file:
        text = calibration_text(task=calib_task, file=calib_file)
        ids = calibration_ids(opened.tokenizer(model), text, samples, seq_len, seed=seed)
    blocks = len(opened.model(model)["blocks"])
    with tqdm(total=blocks, desc=new_name, unit="block", file=sys.stderr) as bar:
        report = prune_pool_model(
            opened,
            model,
            method,
            parse_sparsity(sparsity),
            new_name,
            calib_ids=ids,
            batch_size=batch_size,
            device=device,
            progress=lambda _n, done, _t: bar.update(done - bar.n),
        )
    if as_json:
        click.echo(json.dumps(asdict(report) | {"device": device, "threads": threads}))
    else:
        click.echo(f"{report.summary()} -> {pool}")

"""``assy finetune``: LoRA-fine-tune a pool model into a relative registered in the pool."""

from __future__ import annotations

import json
from pathlib import Path

import click

from assy.commands.common import compute_options, user_errors, wait_option

__all__ = ["finetune_cmd"]


@click.command("finetune")
@click.argument("pool", type=click.Path(path_type=Path))
@click.option("--model", required=True, help="The pool model to fine-tune.")
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    required=True,
    help="Instruction data (.json of instruction/context/response, dolly), "
    "multiple-choice examples or text.",
)
@click.option("--as", "name", required=True, help="Name of the fine-tuned model in the pool.")
@click.option("--steps", default=200, show_default=True)
@click.option("--seq-len", default=256, show_default=True, help="Tokens per sequence (cut).")
@click.option("--batch-size", default=4, show_default=True)
@click.option("--lr", default=2e-4, show_default=True)
@click.option("--rank", default=16, show_default=True, help="LoRA rank.")
@click.option("--targets", default="q_proj,v_proj", show_default=True, help="Modules LoRA wraps.")
@click.option("--seed", default=0, show_default=True)
@click.option("--restart", is_flag=True, help="Discard a checkpoint of an interrupted run.")
@wait_option
@compute_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@user_errors
def finetune_cmd(
    pool,
    model,
    data,
    name,
    steps,
    seq_len,
    batch_size,
    lr,
    rank,
    targets,
    seed,
    restart,
    wait,
    device,
    threads,
    as_json,
) -> None:
    """Train a LoRA on --model with --data, merge it, and add it to POOL as --as.

    The loss is on the response tokens; every block of the new model records its parent.
    An interrupted run resumes from its last checkpoint when rerun with the same settings.
    """
    from assy.assembly import load_fit_data
    from assy.assembly.finetune import FinetuneOptions, finetune_pool_model
    from blockpool import Pool, RunOptions

    options = FinetuneOptions(
        rank=rank,
        alpha=2 * rank,
        targets=tuple(targets.split(",")),
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        seq_len=seq_len,
        seed=seed,
    )
    report = finetune_pool_model(
        Pool(pool),
        model,
        load_fit_data(data),
        name,
        options,
        run=RunOptions(device=device, threads=threads),
        restart=restart,
        wait=wait,
        log=lambda m: click.echo(m, err=True),
    )
    if as_json:
        click.echo(json.dumps(report, default=str))
        return
    click.echo(
        f"{name}: LoRA r={rank} on {targets} ({report['trainable_parameters']:,} "
        f"parameters), {report['steps']} steps on {report['pairs']:,} pairs, loss "
        f"{report['first_loss']:.3f} -> {report['last_loss']:.3f}, "
        f"{report['seconds']:.0f} s -> {pool}"
    )

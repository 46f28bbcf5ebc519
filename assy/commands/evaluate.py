"""``assy eval``: perplexity and zero-shot multiple choice of a pool model."""

from __future__ import annotations

import json
from pathlib import Path

import click

from assy.commands.common import deprecated_alias, note_unused, run_options, user_errors
from blockpool.sizes import format_size

__all__ = ["eval_cmd"]

TASK_CHOICES = [
    "perplexity",
    "boolq",
    "piqa",
    "obqa",
    "arc_easy",
    "arc_challenge",
    "sciq",
    "hellaswag",
]


@click.command("eval")
@click.argument("pool", type=click.Path(path_type=Path))
@click.option("--model", required=True, help="Model name in the pool (see assy inspect).")
@click.option("--task", type=click.Choice(TASK_CHOICES), required=True)
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    help="Your data: a UTF-8 text file for perplexity; for a multiple-choice task, a JSONL "
    'file ({"context", "choices", "label"} per line) instead of the shipped validation split.',
)
@deprecated_alias("--text", "--data", type=click.Path(path_type=Path))
@click.option("--max-tokens", default=2048, show_default=True, help="Tokens of --data scored.")
@click.option("--window", default=512, show_default=True, help="Perplexity window, in tokens.")
@click.option("--limit", type=int, help="Evaluate the first N examples only.")
@run_options()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@user_errors
def eval_cmd(
    pool: Path,
    model: str,
    task: str,
    data: Path | None,
    max_tokens: int,
    window: int,
    limit: int | None,
    as_json: bool,
    run,
) -> None:
    """Evaluate a model of POOL, run block by block from the pool.

    Perplexity: the first --max-tokens tokens of --data in non-overlapping windows of
    --window tokens, every token but a window's first scored. Multiple choice: zero-shot,
    summed log-likelihood of each choice (acc) and per character (acc_norm).
    """
    from assy.evaluate import evaluate_pool_model

    if task == "perplexity":
        note_unused(["limit"], "it limits multiple-choice tasks")
    else:
        note_unused(["max_tokens", "window"], "they set up perplexity")
    result = evaluate_pool_model(
        pool,
        model,
        task,
        data=data,
        limit=limit,
        max_tokens=max_tokens,
        window=window,
        options=run,
    )
    if as_json:
        click.echo(json.dumps(result))
    elif task == "perplexity":
        click.echo(
            f"{model} perplexity {result['perplexity']:.3f} over {result['tokens']} tokens "
            f"(peak RSS {format_size(result['peak_rss_bytes'])})"
        )
    else:
        click.echo(
            f"{model} {task}: acc {result['acc']:.4f} acc_norm {result['acc_norm']:.4f} "
            f"n {result['n']}"
        )

"""``assy eval``: perplexity and zero-shot multiple choice of a pool model."""

from __future__ import annotations

import json
from pathlib import Path

import click

from assy.commands.common import deprecated_alias, note_unused, run_options, user_errors
from blockpool.sizes import format_size

__all__ = ["eval_cmd"]


@click.command("eval")
@click.argument("pool", type=click.Path(path_type=Path))
@click.option("--model", help="Model name in the pool (see assy inspect).")
@click.option(
    "--assembly",
    type=click.Path(path_type=Path),
    help="Or an assembly directory (assy stitch); it names its anchor.",
)
@click.option(
    "--task",
    required=True,
    metavar="TASK",
    help="perplexity, boolq, piqa, obqa, arc_easy, arc_challenge, sciq, hellaswag, mmlu or "
    "mmlu_<subject>.",
)
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    help="Your data: a UTF-8 text file for perplexity; for a multiple-choice task, a JSONL "
    'file ({"context", "choices", "label"} per line) instead of the shipped split.',
)
@deprecated_alias("--text", "--data", type=click.Path(path_type=Path))
@click.option(
    "--split",
    default="validation",
    show_default=True,
    help="Shipped split scored (MMLU also has dev and test).",
)
@click.option("--limit", type=int, help="Evaluate the first N examples only (per MMLU subject).")
@click.option(
    "--max-length",
    type=click.IntRange(min=1),
    help="Most tokens the model sees per choice (left truncation). Default: the model's own "
    "limit (max_position_embeddings).",
)
@click.option("--max-tokens", default=2048, show_default=True, help="Tokens of --data scored.")
@click.option("--window", default=512, show_default=True, help="Perplexity window, in tokens.")
@click.option(
    "--log-samples",
    type=click.Path(path_type=Path),
    help="Write one JSON line per example (per-choice log-likelihoods, greedy flags, "
    "prediction, label) to this file.",
)
@run_options()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@user_errors
def eval_cmd(
    pool: Path, model: str | None, assembly: Path | None, task: str, as_json: bool, run, **options
) -> None:
    """Evaluate a model of POOL, run block by block from the pool.

    Perplexity: the first --max-tokens tokens of --data in non-overlapping windows of
    --window tokens, every token but a window's first scored (also in bits per byte).
    Multiple choice: zero-shot, lm-evaluation-harness prompts and tokenization; acc by
    summed log-likelihood, acc_norm per character and acc_bytes per byte of each choice.
    """
    from assy.commands.common import model_or_assembly
    from assy.evaluation import evaluate_pool_model

    name = model_or_assembly(model, assembly)
    if task == "perplexity":
        note_unused(["limit", "split", "max_length"], "they set up multiple-choice tasks")
    else:
        note_unused(["max_tokens", "window"], "they set up perplexity")
    result = evaluate_pool_model(pool, model, task, assembly=assembly, options=run, **options)
    if (result.get("fit_data") or {}).get("task") == task:
        click.echo(
            f"warning: this assembly was fitted on {task}'s validation split; this "
            "score is not held out",
            err=True,
        )
    if as_json:
        click.echo(json.dumps(result))
    elif task == "perplexity":
        click.echo(
            f"{name} perplexity {result['perplexity']:.3f} ± {result['perplexity_stderr']:.3f}, "
            f"{result['bits_per_byte']:.4f} bits/byte over {result['tokens']} tokens "
            f"(peak RSS {format_size(result['peak_rss_bytes'])})"
        )
    else:
        click.echo(
            f"{name} {task} ({result.get('split') or result['data']}): "
            + ", ".join(f"{m} {result[m]:.4f} ± {result[m + '_stderr']:.4f}" for m in _METRICS)
            + f", n {result['n']} (peak RSS {format_size(result['peak_rss_bytes'])})"
        )


_METRICS = ("acc", "acc_norm", "acc_bytes")

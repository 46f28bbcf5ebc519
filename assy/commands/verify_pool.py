"""``assy verify-pool``: check every block file of a pool against its sum."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from assy.commands.common import user_errors

__all__ = ["verify_pool_cmd"]


@click.command("verify-pool")
@click.argument("pool", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@user_errors
def verify_pool_cmd(pool: Path, as_json: bool) -> None:
    """Check every block file of POOL against its sha256; exit 1 naming each bad block."""
    from blockpool import Pool

    opened = Pool(pool)
    bad = opened.verify()
    if as_json:
        rows = [{"block": b.block_id, "file": b.file, "reason": b.reason} for b in bad]
        click.echo(json.dumps({"pool": str(pool), "blocks": len(opened.blocks), "bad": rows}))
    else:
        for b in bad:
            click.echo(f"BAD {b.block_id} {b.file}: {b.reason}")
        if not bad:
            click.echo(f"ok: {len(opened.blocks)} blocks match their sums")
    if bad:
        sys.exit(1)

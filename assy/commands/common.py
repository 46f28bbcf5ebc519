"""Shared pieces of the CLI: user-error handling and human-readable sizes."""

from __future__ import annotations

import sys
from functools import wraps

import click

from assy.errors import AssyError

__all__ = ["budget_options", "human_bytes", "user_errors"]


def user_errors(fn):
    """Turn user errors into a one-line ``error: ...`` on stderr and exit code 2."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AssyError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def human_bytes(n: float) -> str:
    """``1234567`` -> ``"1.2 MB"`` (decimal units)."""
    if n < 1000:
        return f"{int(n)} B"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def _parse_budget(ctx, param, value):
    if value is None:
        return None
    from blockpool.sizes import parse_size

    try:
        return parse_size(value)
    except AssyError as e:
        raise click.BadParameter(str(e)) from None


def budget_options(fn):
    """``--budget SIZE`` and ``--swap-policy``: run through the swapper within a budget."""
    fn = click.option(
        "--swap-policy",
        type=click.Choice(["on-demand", "lru", "prefetch", "prefetch+preswap"]),
        default="prefetch+preswap",
        show_default=True,
        help="How the swapper evicts and pre-loads blocks (with --budget).",
    )(fn)
    return click.option(
        "--budget",
        callback=_parse_budget,
        help="Most resident weight bytes (4GB, 512MB, 1.5GiB); blocks are swapped to stay "
        "within it. Default: every block resident.",
    )(fn)

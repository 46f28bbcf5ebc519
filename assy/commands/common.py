"""Shared pieces of the CLI: user-error handling and human-readable sizes."""

from __future__ import annotations

import sys
from functools import wraps

import click

from assy.errors import AssyError

__all__ = ["compute_options", "human_bytes", "model_or_assembly", "run_options", "user_errors"]


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


def _check_device(ctx, param, value):
    from blockpool.session import parse_device

    try:
        parse_device(value)
    except AssyError as e:
        raise click.BadParameter(str(e)) from None
    return value


def compute_options(fn):
    """``--device`` and ``--threads``: where blocks run and how many CPU threads compute."""
    fn = click.option(
        "--threads",
        type=click.IntRange(min=1),
        help="Torch intra-op CPU threads. Default: the cores not already busy (cores minus "
        "the 1-minute load average, at least 1); recorded in --json output.",
    )(fn)
    return click.option(
        "--device",
        default="cpu",
        show_default=True,
        callback=_check_device,
        help="Where blocks run: cpu, cuda, cuda:N or mps.",
    )(fn)


def run_options(*, batch_size: bool = True):
    """``--budget``, ``--swap-policy``, ``--device``, ``--threads`` (and ``--batch-size``),
    handed to the command as one ``run: RunOptions``."""
    from blockpool.swapper import DEFAULT_POLICY, POLICIES

    def decorate(fn):
        @wraps(fn)
        def wrapper(*args, budget, swap_policy, device, threads, **kwargs):
            from blockpool.session import RunOptions

            size = kwargs.pop("batch_size") if batch_size else RunOptions.batch_size
            run = RunOptions(
                budget=budget, policy=swap_policy, device=device, threads=threads, batch_size=size
            )
            return fn(*args, run=run, **kwargs)

        wrapper = compute_options(wrapper)
        if batch_size:
            wrapper = click.option(
                "--batch-size",
                default=8,
                show_default=True,
                type=click.IntRange(min=1),
                help="Sequences per forward call.",
            )(wrapper)
        wrapper = click.option(
            "--swap-policy",
            type=click.Choice(POLICIES),
            default=DEFAULT_POLICY,
            show_default=True,
            help="How the swapper evicts and pre-loads blocks (with --budget).",
        )(wrapper)
        return click.option(
            "--budget",
            callback=_parse_budget,
            help="Most resident weight bytes (4GB, 512MB, 1.5GiB); blocks are swapped to stay "
            "within it. Default: every block resident.",
        )(wrapper)

    return decorate


def model_or_assembly(model: str | None, assembly) -> str:
    """Exactly one of ``--model`` / ``--assembly``; returns how output lines name it."""
    if (model is None) == (assembly is None):
        raise AssyError("give exactly one of --model NAME or --assembly DIR")
    return model if model is not None else str(assembly)

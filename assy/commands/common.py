"""Shared pieces of the CLI: user-error handling, shared options, notes on options that
do nothing."""

from __future__ import annotations

import errno
import sys
from collections.abc import Iterable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from assy.errors import AssyError

__all__ = [
    "calibration_options",
    "compute_options",
    "deprecated_alias",
    "given",
    "model_or_assembly",
    "note_unused",
    "progress_bars",
    "run_options",
    "user_errors",
    "wait_option",
]

_OS_FIXES = {
    errno.ENOSPC: "the disk is full; free some space and run the command again",
    errno.EROFS: "the file system is read-only; choose a writable location",
    errno.EACCES: "permission denied; choose a location you may write to",
    errno.EPERM: "permission denied; choose a location you may write to",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EEXIST: "a file is in the way; choose another location",
    errno.ENOENT: "no such file or directory",
}


def _flag(name: str) -> str:
    """The current command's flag for library argument ``name`` (``budget`` -> ``--budget``)."""
    ctx = click.get_current_context(silent=True)
    for param in ctx.command.params if ctx else ():
        if param.name == name and isinstance(param, click.Option):
            longs = [o for o in param.opts if o.startswith("--")]
            return (longs or param.opts)[0]
    return "--" + name.replace("_", "-")


def user_errors(fn):
    """Turn user errors into a one-line ``error: ...`` on stderr and exit code 2; library
    argument names in the message become this command's flags. An ``OSError`` the library
    did not name (reading or writing a file the user gave) is an environmental fault and
    is reported the same way; Ctrl-C exits with 130."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AssyError as e:
            _end_bars()
            click.echo(f"error: {e.render(_flag)}", err=True)
            sys.exit(2)
        except OSError as e:
            _end_bars()
            fix = _OS_FIXES.get(e.errno or 0, "check the path and run the command again")
            where = f"{e.filename}: " if e.filename else ""
            click.echo(f"error: {where}{e.strerror or e} ({fix})", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            _end_bars()
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def _end_bars() -> None:
    """Close the progress bars still open, so that the error line stands on its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def given(name: str) -> bool:
    """Whether the current command's parameter ``name`` was given on the command line."""
    ctx = click.get_current_context()
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def note_unused(names: Iterable[str], why: str) -> None:
    """Say on stderr that options the user gave do nothing here (``why``: when they do)."""
    ctx = click.get_current_context()
    flags = [_flag(n) for n in names if given(n) and ctx.params.get(n) not in (None, (), False)]
    if flags:
        verb = "does" if len(flags) == 1 else "do"
        click.echo(f"note: {', '.join(flags)} {verb} nothing here ({why}); ignored", err=True)


def progress_bars():
    """A ``progress(label, done, total)`` callback drawing one tqdm bar per label on stderr,
    each created at its first call (so an error raised before any work prints no bar)."""
    from assy.progress import bar

    bars: dict[str, Any] = {}

    def update(label: str, done: int, total: int) -> None:
        if label not in bars:
            bars[label] = bar(total=total, desc=label, unit="block")
        bars[label].update(done - bars[label].n)
        if done >= total:
            bars[label].close()

    return update


def wait_option(fn):
    """``--wait``: wait for another writer of the pool instead of failing at once."""
    return click.option(
        "--wait",
        is_flag=True,
        help="If another command is writing the pool, wait for it instead of failing.",
    )(fn)


def _parse_budget(ctx, param, value):
    if value is None:
        return None
    from blockpool import parse_size

    try:
        return parse_size(value)
    except AssyError as e:
        raise click.BadParameter(str(e)) from None


def _check_device(ctx, param, value):
    from blockpool import parse_device

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
    from blockpool import DEFAULT_POLICY, POLICIES

    def decorate(fn):
        @wraps(fn)
        def wrapper(*args, budget, swap_policy, device, threads, **kwargs):
            from blockpool import RunOptions

            if budget is None:
                note_unused(["swap_policy"], "the swapper runs only with --budget")
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
            help="Memory the run may use beyond its warm floor (4GB, 512MB, 1.5GiB): weights, "
            "activations and KV cache; blocks are swapped to stay within it. Default: every "
            "block resident.",
        )(wrapper)

    return decorate


def deprecated_alias(old: str, new: str, **option: object):
    """Accept the old spelling ``old`` of the flag ``new`` for one more release.

    Its value goes to ``new``'s parameter, with a one-line note on stderr; giving both is
    a usage error. ``option``: click's settings of the old flag (its ``type``).
    """
    new_param = new.lstrip("-").replace("-", "_")
    old_param = "deprecated_" + old.lstrip("-").replace("-", "_")

    def decorate(fn):
        @wraps(fn)
        def wrapper(*args, **kwargs):
            value = kwargs.pop(old_param)
            if value is not None:
                if kwargs.get(new_param) is not None:
                    raise click.UsageError(f"give {new} only ({old} is its old name)")
                click.echo(f"note: {old} is deprecated, use {new} (same meaning)", err=True)
                kwargs[new_param] = value
            return fn(*args, **kwargs)

        return click.option(old, old_param, hidden=True, **option)(wrapper)

    return decorate


def calibration_options(fn):
    """``--calib-task T | --calib-data FILE``: generic calibration text (``--calib-file``
    is the old spelling of ``--calib-data``)."""
    from assy.calibration import DEFAULT_TASK
    from assy.data import TASKS

    fn = deprecated_alias("--calib-file", "--calib-data", type=click.Path(path_type=Path))(fn)
    fn = click.option(
        "--calib-data",
        type=click.Path(path_type=Path),
        help="Calibrate on a UTF-8 text file.",
    )(fn)
    return click.option(
        "--calib-task",
        type=click.Choice(sorted(TASKS)),
        help=f"Calibrate on a task's examples (context + answer). Default: {DEFAULT_TASK}.",
    )(fn)


def model_or_assembly(model: str | None, assembly) -> str:
    """Exactly one of ``--model`` / ``--assembly``; returns how output lines name it."""
    if (model is None) == (assembly is None):
        raise AssyError("give exactly one of --model NAME or --assembly DIR")
    return model if model is not None else str(assembly)

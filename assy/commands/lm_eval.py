"""``assy lm-eval``: lm-evaluation-harness's own CLI with the pool model ``assy`` registered."""

from __future__ import annotations

import sys

import click

from assy.commands.common import user_errors

__all__ = ["lm_eval_cmd"]


@click.command(
    "lm-eval",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@user_errors
def lm_eval_cmd(args: tuple[str, ...]) -> None:
    """Run lm-eval's CLI (its arguments as they are) with --model assy available.

    Example: assy lm-eval --model assy --model_args pool=pool,model=smollm2-135m
    --tasks piqa --limit 100. model_args: pool=DIR and model=NAME or assembly=DIR;
    budget=SIZE, device=, dtype=, threads=, max_length=. Needs pip install 'assy[lm-eval]'.
    """
    try:
        from lm_eval.__main__ import cli_evaluate

        from assy.evaluation.harness import check_model_args  # registers --model assy
    except ImportError as e:
        click.echo(
            f"error: assy lm-eval needs lm-eval ({e}); pip install 'assy[lm-eval]'", err=True
        )
        sys.exit(2)
    if _value(args, "--model") == "assy":
        check_model_args(_value(args, "--model_args"))
    sys.argv = ["lm-eval", *args]
    cli_evaluate()


def _value(args: tuple[str, ...], flag: str) -> str | None:
    """The value of ``flag`` in lm-eval's arguments (``--flag V`` or ``--flag=V``), if given."""
    for k, a in enumerate(args):
        if a == flag and k + 1 < len(args):
            return args[k + 1]
        if a.startswith(flag + "="):
            return a[len(flag) + 1 :]
    return None

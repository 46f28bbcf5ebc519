"""The ``assy`` command line: the group; every verb lives in :mod:`assy.commands`.

User errors (bad paths, unsupported architectures, corrupted pools, bad options) and
environmental faults (a full disk, a read-only location) print a one-line ``error: ...``
on stderr and exit with code 2, never a traceback; Ctrl-C exits with 130.
"""

from __future__ import annotations

import sys

import click


class _Group(click.Group):
    """Click's group, with its usage errors on one line like every other user error."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **kw):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **kw)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **kw)
        except click.exceptions.NoArgsIsHelpError as e:
            e.show()
            sys.exit(e.exit_code)
        except click.UsageError as e:
            command = e.ctx.command_path if e.ctx else "assy"
            click.echo(f"error: {e.format_message()} (see {command} --help)", err=True)
            sys.exit(2)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="assy")
def cli() -> None:
    """assy: split pre-trained LLMs into blocks, verify and run them from a pool.

    Start with `assy build-pool smollm2-135m gemma3-270m minilm-l6 --out pool`.
    """


def _register() -> None:
    """Add the commands of ``assy.commands`` (one line each)."""
    from assy.commands import (
        assemble,
        build_pool,
        compare,
        demo,
        evaluate,
        federate,
        finetune,
        generate,
        inspect,
        lm_eval,
        prune,
        quantize,
        stitch,
        verify_pool,
    )

    for command in (
        build_pool.build_pool_cmd,
        inspect.inspect_cmd,
        verify_pool.verify_pool_cmd,
        evaluate.eval_cmd,
        lm_eval.lm_eval_cmd,
        generate.generate_cmd,
        compare.compare_cmd,
        quantize.quantize_cmd,
        prune.prune_cmd,
        stitch.stitch_cmd,
        assemble.assemble_cmd,
        finetune.finetune_cmd,
        demo.demo_cmd,
        federate.federate_cmd,
    ):
        cli.add_command(command)


_register()


def main() -> None:
    cli()


if __name__ == "__main__":
    main()

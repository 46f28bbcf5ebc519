"""Write the README's command reference from the commands themselves.

    .venv/bin/python scripts/command_reference.py          # rewrite the block in README.md
    .venv/bin/python scripts/command_reference.py --check  # exit 1 if README.md is stale

The block sits between ``<!-- command reference: begin -->`` and ``<!-- ... end -->``;
tests/test_layout.py checks that it matches ``assy --help`` of every verb.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import click

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(
    r"(<!-- command reference: begin -->\n)(.*?)(<!-- command reference: end -->)", re.S
)


def _option(ctx: click.Context, param: click.Parameter) -> str:
    names = ", ".join(f"`{o}`" for o in param.opts + param.secondary_opts)
    kind = "" if getattr(param, "is_flag", False) else f" {param.make_metavar(ctx)}"
    words = (getattr(param, "help", None) or "").strip()
    extras = []
    if param.required:
        extras.append("required")
    default = param.default
    if getattr(param, "show_default", False) and default not in (None, False, ()):
        extras.append(f"default: {default}")
    tail = f" [{'; '.join(extras)}]" if extras else ""
    return f"- {names}{kind}:{' ' + words if words else ''}{tail}"


def command_reference() -> str:
    """Markdown: for each verb, its usage line, its first help paragraph and its options."""
    from assy.cli import cli

    lines = []
    for name in sorted(cli.commands):
        command = cli.commands[name]
        ctx = click.Context(command, info_name=name, parent=click.Context(cli, info_name="assy"))
        usage = " ".join(command.collect_usage_pieces(ctx))
        summary = (command.help or "").strip().split("\n\n")[0].replace("\n", " ")
        lines += [f"#### `assy {name}`", "", f"`assy {name} {usage}` — {summary}", ""]
        for param in command.params:  # the help option (spelled per context) is left out
            if isinstance(param, click.Option) and not param.hidden:
                lines.append(_option(ctx, param))
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    text = README.read_text()
    match = _BLOCK.search(text)
    if not match:
        print("README.md has no command reference block", file=sys.stderr)
        return 1
    fresh = command_reference()
    if "--check" in sys.argv[1:]:
        return 0 if match.group(2) == fresh else 1
    README.write_text(text[: match.start(2)] + fresh + text[match.end(2) :])
    return 0


if __name__ == "__main__":
    sys.exit(main())

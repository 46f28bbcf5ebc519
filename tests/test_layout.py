"""The layout: packages import one way (assy -> blockpool), modules form no import cycle,
and the README's command reference is what ``assy --help`` says."""

import ast
import re
import sys
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("blockpool", "assy")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules ``name`` imports, at any depth of its code (lazy imports count)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def test_blockpool_never_imports_assy():
    offenders = {
        m: sorted(i for i in deps if i.split(".")[0] == "assy")
        for m, deps in _graph().items()
        if m.split(".")[0] == "blockpool"
    }
    assert {m: d for m, d in offenders.items() if d} == {}


def test_no_import_cycles():
    graph = _graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == []


def test_blockpool_all_lists_what_assy_uses():
    import blockpool

    used = set()
    for name, path in _modules().items():
        if name.split(".")[0] != "assy":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("blockpool"):
                used |= {a.name for a in node.names}
    assert used <= set(blockpool.__all__), used - set(blockpool.__all__)


def _reference() -> str:
    sys.path.insert(0, str(ROOT))
    from scripts.command_reference import command_reference

    return command_reference()


def test_readme_command_reference_matches_help():
    readme = (ROOT / "README.md").read_text()
    match = re.search(
        r"<!-- command reference: begin -->\n(.*?)<!-- command reference: end -->", readme, re.S
    )
    assert match, "README.md lacks the command reference block"
    assert match.group(1) == _reference(), "regenerate it: python scripts/command_reference.py"


def test_every_verb_is_in_its_own_commands_module():
    from assy.cli import cli

    for name, command in cli.commands.items():
        assert isinstance(command, click.Command)
        assert command.callback.__module__.startswith("assy.commands."), name
    cli_source = (ROOT / "assy" / "cli.py").read_text()
    assert "@cli.command" not in cli_source


if __name__ == "__main__":
    pytest.main([__file__])

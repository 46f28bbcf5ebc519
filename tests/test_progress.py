"""Progress bars degrade to whole lines off a terminal."""

from __future__ import annotations

import io

from assy.progress import bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_off_a_terminal():
    out = io.StringIO()
    for _ in bar(range(3), desc="fit", file=out, leave=False):
        pass
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines and all(line.startswith("fit:") for line in lines)
    assert "3/3" in lines[-1]  # the final state stays, even for a bar that would vanish
    assert len(lines) <= 3  # first state, (no interval passed), final state


def test_redrawn_bar_on_a_terminal():
    out = _Terminal()
    for _ in bar(range(3), desc="fit", file=out):
        pass
    assert "\r" in out.getvalue()


def test_disabled_bar_writes_nothing():
    out = io.StringIO()
    for _ in bar(range(3), desc="fit", file=out, disable=True):
        pass
    assert out.getvalue() == ""

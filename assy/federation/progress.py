"""Progress of a federated run: one line per event, and after each round where it stands.

Lines go through a rich console (colour on a terminal, plain text in pipes and CI logs);
there is no live bar, so nothing that the server or Flower prints meanwhile is redrawn.
"""

from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["RoundProgress"]


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"


class RoundProgress:
    """``with RoundProgress(rounds) as p: run(log=p.log, on_round=p.round_done)``.

    Thread-safe (rich's console locks): the simulation's server loop runs in a thread.
    """

    def __init__(self, rounds: int, *, stderr: bool = False) -> None:
        from rich.console import Console

        self.console = Console(file=sys.stderr if stderr else sys.stdout, highlight=False)
        self.rounds = rounds
        self._start = time.monotonic()
        self._first: tuple[int, float] | None = None  # the first round seen, and when

    def __enter__(self) -> RoundProgress:
        self._start = time.monotonic()
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def log(self, line: str) -> None:
        """Print a line as is (no markup, no highlighting, no wrapping)."""
        self.console.print(line, markup=False, soft_wrap=True)

    def round_done(self, record: dict[str, Any]) -> None:
        """After a round: rounds done, time elapsed and, from the pace so far, time left."""
        done, now = int(record["round"]), time.monotonic()
        self._first = self._first or (done, now)
        elapsed = now - self._start
        first, first_at = self._first
        # The pace between rounds: the start (Ray, discovery) is not a round's cost.
        per_round = (now - first_at) / (done - first) if done > first else elapsed
        left = (self.rounds - done) * per_round
        self.console.print(
            f"[dim]  {done}/{self.rounds} rounds, {_duration(elapsed)} elapsed"
            + (f", about {_duration(left)} left[/dim]" if done < self.rounds else "[/dim]"),
            soft_wrap=True,
        )

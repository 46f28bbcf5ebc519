"""Plots of federated runs: accuracy, participation per tier, bytes per round.

Figures are built with matplotlib's object API on the Agg canvas (no pyplot state: the
server loop may run in a thread) and written atomically.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from blockpool import atomic_write_bytes

__all__ = [
    "plot_accuracy",
    "plot_bytes",
    "plot_losses",
    "plot_participation",
    "plot_run",
    "plot_zero_shot",
]

History = Sequence[Mapping[str, Any]]


def _figure(width: float = 6.0, height: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _write(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())


def plot_accuracy(runs: Mapping[str, History], path: Path, title: str = "") -> None:
    """Held-out accuracy per round, one line per run (method); round 0 is before training."""
    fig = _figure()
    ax = fig.add_subplot()
    for label, history in runs.items():
        points = [(r["round"], r["accuracy"]) for r in history if r.get("accuracy") is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=label)
    ax.set(xlabel="round", ylabel="held-out accuracy", title=title or "accuracy per round")
    ax.grid(alpha=0.3)
    ax.legend()
    _write(fig, path)


def plot_losses(history: History, path: Path, title: str = "") -> None:
    """Held-out instruction loss per round (lego): the dense global model and each client
    variant with the global update written back (the paper's Figure 3)."""
    fig = _figure()
    ax = fig.add_subplot()
    rows = [r for r in history if r.get("heldout_loss") is not None]
    ax.plot([r["round"] for r in rows], [r["heldout_loss"] for r in rows], marker="o",
            color="black", label="global (dense)")  # fmt: skip
    for variant in sorted({v for r in rows for v in r.get("client_loss") or {}}):
        points = [(r["round"], r["client_loss"][variant]) for r in rows
                  if variant in (r.get("client_loss") or {})]  # fmt: skip
        ax.plot(*zip(*points, strict=True), marker=".", linestyle="--", label=variant)
    ax.set(xlabel="round", ylabel="held-out loss (nats/token)", title=title or "loss per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _write(fig, path)


def plot_zero_shot(history: History, path: Path, title: str = "") -> None:
    """lego's ``--zero-shot`` accuracy per round, one panel per task: the dense global
    model and each client variant with the global update written back."""
    from matplotlib.ticker import MaxNLocator

    rows = [r for r in history if r.get("zero_shot")]
    tasks = list(dict.fromkeys(t for r in rows for t in r["zero_shot"]))
    fig = _figure(4.2 * len(tasks), 3.6)
    for k, name in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), k + 1)
        points = [(r["round"], r["zero_shot"][name]["acc"]) for r in rows if name in r["zero_shot"]]
        ax.plot(*zip(*points, strict=True), marker="o", color="black", label="global (dense)")
        variants = sorted({v for r in rows for v in r.get("client_zero_shot") or {}})
        for variant in variants:
            points = [(r["round"], r["client_zero_shot"][variant][name]["acc"]) for r in rows
                      if name in (r.get("client_zero_shot") or {}).get(variant, {})]  # fmt: skip
            ax.plot(*zip(*points, strict=True), marker=".", linestyle="--", label=variant)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        n = rows[-1]["zero_shot"].get(name, {}).get("n")
        ax.set(xlabel="round", ylabel="zero-shot acc", title=title or f"{name} (n={n})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    _write(fig, path)


def plot_participation(history: History, tiers: Sequence[str], path: Path, title: str = "") -> None:
    """Clients that took part in each round, stacked by device tier."""
    fig = _figure()
    ax = fig.add_subplot()
    rounds = [r["round"] for r in history if r["round"] > 0]
    bottom = [0] * len(rounds)
    for tier in tiers:
        counts = [r["participants"].get(tier, 0) for r in history if r["round"] > 0]
        ax.bar(rounds, counts, bottom=bottom, label=tier)
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    ax.set(xlabel="round", ylabel="clients that took part", title=title or "participation")
    ax.legend(title="tier", fontsize="small")
    _write(fig, path)


def plot_bytes(runs: Mapping[str, History], path: Path, title: str = "") -> None:
    """Bytes sent down (server to clients) and up (clients to server) per round."""
    fig = _figure()
    ax = fig.add_subplot()
    for label, history in runs.items():
        rows = [r for r in history if r["round"] > 0]
        rounds = [r["round"] for r in rows]
        ax.plot(rounds, [max(1, r["bytes_down"]) for r in rows], marker="v", label=f"{label} down")
        ax.plot(rounds, [max(1, r["bytes_up"]) for r in rows], marker="^", label=f"{label} up")
    ax.set_yscale("log")
    ax.set(xlabel="round", ylabel="bytes", title=title or "communication per round")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    _write(fig, path)


def plot_run(out: Path, method: str, history: History, tiers: Sequence[str]) -> list[Path]:
    """The PNGs of one run under ``out``: accuracy (loss for lego), participation, bytes,
    and lego's ``zero_shot.png`` where rounds carry ``--zero-shot`` results."""
    if any(r.get("heldout_loss") is not None for r in history):
        paths = [out / "loss.png", out / "participation.png", out / "bytes.png"]
        plot_losses(history, paths[0])
    else:
        paths = [out / "accuracy.png", out / "participation.png", out / "bytes.png"]
        plot_accuracy({method: history}, paths[0])
    plot_participation(history, tiers, paths[1])
    plot_bytes({method: history}, paths[2])
    if any(r.get("zero_shot") for r in history):  # lego --zero-shot
        paths.append(out / "zero_shot.png")
        plot_zero_shot(history, paths[-1])
    return paths

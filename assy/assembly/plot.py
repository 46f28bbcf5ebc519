"""A picture of a plan: its chain of layers, coloured by source model and precision, and
the compatibility of each transition (seams marked)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from assy.assembly.planner import Candidate, Plan

__all__ = ["plot_plan"]

_PRECISION_ALPHA = {"fp32": 1.0, "bf16": 0.9, "fp16": 0.9, "int8": 0.65, "nf4": 0.45, "fp4": 0.45}


def plot_plan(plan: Plan, candidates: Mapping[str, Candidate], path: Path, title: str = "") -> Path:
    """Draw ``plan`` to ``path`` (PNG, written atomically).

    One box per layer of the chain, embedding to head: its colour is the source model's
    line, its shade the block precision (paler: fewer bits), hatched when pruned; below
    it, the compatibility of the transition into it, red at a seam (an adapter).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    roots = sorted({candidates[name].root for name, _ in plan.chain} | {plan.recipe.anchor})
    palette = plt.get_cmap("tab10")
    colour = {r: palette(i % 10) for i, r in enumerate(roots)}
    anchor = candidates[plan.recipe.anchor]
    boxes = (
        [("embed", anchor, None)]
        + [(f"{i}", candidates[name], i) for name, i in plan.chain]
        + [("head", anchor, None)]
    )
    width = max(8.0, 0.32 * len(boxes) + 2)
    fig, ax = plt.subplots(figsize=(width, 3.2))
    for x, (label, cand, _layer) in enumerate(boxes):
        alpha = _PRECISION_ALPHA.get(cand.precision, 0.45)
        ax.add_patch(
            Rectangle(
                (x, 0.4),
                0.92,
                1.0,
                facecolor=colour[cand.root],
                alpha=alpha,
                hatch="//" if cand.sparsity > 0 else None,
                edgecolor="black",
                linewidth=0.5,
            )
        )
        ax.text(x + 0.46, 0.9, label, ha="center", va="center", fontsize=7, rotation=90)
    # transitions: step k enters box k + 1 (the embedding is box 0)
    for k, step in enumerate(plan.steps):
        x = k + 1
        seam = step.seam is not None
        ax.text(
            x - 0.04,
            0.15,
            f"{step.compatibility:.2f}",
            ha="center",
            va="center",
            fontsize=6,
            rotation=90,
            color="red" if seam else "dimgray",
        )
        if seam:
            ax.plot([x - 0.04, x - 0.04], [0.3, 1.5], color="red", linewidth=1.5)
    handles = [Patch(facecolor=colour[r], label=r) for r in roots]
    precisions = sorted({c.precision for _, c, _ in boxes})
    handles += [
        Patch(facecolor="gray", alpha=_PRECISION_ALPHA.get(p, 0.45), label=p) for p in precisions
    ]
    if any(c.sparsity > 0 for _, c, _ in boxes):
        handles.append(Patch(facecolor="white", hatch="//", edgecolor="black", label="pruned"))
    handles.append(Patch(facecolor="white", edgecolor="red", label="seam (adapter)"))
    ax.legend(
        handles=handles,
        loc="upper center",
        ncol=min(6, len(handles)),
        fontsize=7,
        bbox_to_anchor=(0.5, -0.02),
        frameon=False,
    )
    ax.set_xlim(-0.2, len(boxes) + 0.2)
    ax.set_ylim(0, 1.9)
    ax.axis("off")
    b = plan.bytes
    ax.set_title(
        title
        or f"{plan.recipe.anchor}: {len(plan.chain)} layers, {plan.seams} seams, "
        f"{b['total'] / 1e6:.1f} MB of {plan.budget / 1e6:.1f} MB; compatibility under each box",
        fontsize=9,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return path

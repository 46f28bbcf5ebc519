"""Plots: block-comparison heatmaps (AssyLLM Figure 10).

Rendering uses matplotlib's non-interactive Agg backend, so it runs on headless machines.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from assy.comparator.compare import Comparison

__all__ = ["comparison_heatmaps", "heatmap_panel"]

_PANELS = (
    ("cka", "CKA(out(a), in(b))", "viridis", (0.0, 1.0)),
    ("kl", "KL(out(a) ‖ in(b)) [nats]", "magma_r", None),
    ("compatibility", "compatibility(a → b)", "viridis", (0.0, 1.0)),
)


def _ticks(count: int) -> list[int]:
    step = 1 if count <= 20 else 2 if count <= 40 else max(1, count // 20)
    return list(range(0, count, step))


def heatmap_panel(
    ax,
    matrix: torch.Tensor,
    *,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str,
    cmap: str = "viridis",
    limits: tuple[float, float] | None = None,
    xlabel: str = "",
    ylabel: str = "",
) -> None:
    """Draw ``matrix [R, C]`` on a matplotlib axes with labelled ticks and a colour bar.

    NaN cells are left blank; values outside ``limits`` saturate the colour map.
    """
    data = matrix.detach().double().cpu().numpy()
    vmin, vmax = limits if limits else (None, None)
    image = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", origin="upper")
    rows, cols = _ticks(len(row_labels)), _ticks(len(col_labels))
    ax.set_yticks(rows, [row_labels[i] for i in rows], fontsize=7)
    ax.set_xticks(cols, [col_labels[i] for i in cols], fontsize=7, rotation=90)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.03)


def _layer_labels(blocks: Sequence[str]) -> list[str]:
    return [b.rsplit("/", 1)[-1] for b in blocks]


def comparison_heatmaps(comparison: Comparison, out_dir: Path) -> list[Path]:
    """One PNG per model pair ``A → B`` (``A`` before ``B`` in the comparison, and ``A = B``).

    Each PNG has three panels over ``A``'s layers (rows, the block whose output is fed)
    and ``B``'s layers (columns, the block that receives it): CKA, KL and compatibility,
    each with a colour bar; the title records the sample count and the settings.

    Returns:
        The written files, ``heatmap_<A>__<B>.png``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = comparison
    names = list(dict.fromkeys(c.models))
    index = {m: [i for i, n in enumerate(c.models) if n == m] for m in names}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    o = c.options
    note = (
        f"n={c.samples} examples, {o.pooling}-pooled, {'unbiased' if o.unbiased else 'biased'} "
        f"linear CKA, preprocess={o.preprocess}, w={o.weight}"
    )
    written = []
    for i, a in enumerate(names):
        for b in names[i:]:
            rows, cols = index[a], index[b]
            fig, axes = plt.subplots(1, 3, figsize=(17, 5.6), layout="constrained")
            for ax, (key, title, cmap, limits) in zip(axes, _PANELS, strict=True):
                matrix = getattr(c, key)[rows][:, cols]
                heatmap_panel(
                    ax,
                    matrix,
                    row_labels=_layer_labels([c.blocks[r] for r in rows]),
                    col_labels=_layer_labels([c.blocks[k] for k in cols]),
                    title=title,
                    cmap=cmap,
                    limits=limits,
                    xlabel=f"{b} layer b (input)",
                    ylabel=f"{a} layer a (output)",
                )
            fig.suptitle(f"{a} → {b}   ({note})", fontsize=11)
            path = out_dir / f"heatmap_{a}__{b}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written

"""Closed-form fits of a seam map, from sufficient statistics of paired hidden states.

A seam is fitted on pairs ``(x, y)``: ``x`` a state of the stream entering the seam (as it
flows through the assembly built so far), ``y`` the state the next slice's own model has
at that point. Pairs are accumulated as float64 sums (:class:`PairStats`), so a fit never
holds the tokens, and the ridge solution, its validation error and the residual-stream
scale all come from the sums:

- ridge least squares on per-dimension standardized inputs (one dimension of a residual
  stream can carry half its variance; standardizing keeps it from owning the penalty),
  ``(C~xx + lambda I) B = C~xy``, with ``lambda`` chosen on held-out windows from a grid
  (ReplaceMe, arXiv 2505.02819, fits a linear map for a span the same way);
- destination dimensions with massive activations (root mean square above ``factor``
  times the median dimension's; Sun et al. 2024, arXiv 2402.17762) act as constant biases:
  they are held at their mean unless the map predicts them well on held-out windows;
- the per-token scale (RMS) of the mapped stream is measured against the destination's
  and, optionally, matched by a gain on the deviations from the mean (ridge shrinks
  predictions toward the mean).

Position 0 is never fitted (the attention sink; see :mod:`assy.assembly.adapter`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "LAMBDAS",
    "PairStats",
    "SeamFit",
    "fit_seam_map",
    "prediction_mse",
    "ridge_map",
]

LAMBDAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
_EPS = 1e-12


class PairStats:
    """Running float64 sums of paired rows ``x [N, d_in]``, ``y [N, d_out]``.

    Holds ``n``, ``sum x``, ``sum x x^T``, ``sum y``, ``sum y^2`` (per dimension) and
    ``sum x y^T``: everything an affine least-squares fit and its error need.
    """

    def __init__(self, d_in: int, d_out: int) -> None:
        self.n = 0
        self.sx = torch.zeros(d_in, dtype=torch.float64)
        self.sxx = torch.zeros(d_in, d_in, dtype=torch.float64)
        self.sy = torch.zeros(d_out, dtype=torch.float64)
        self.syy = torch.zeros(d_out, dtype=torch.float64)
        self.sxy = torch.zeros(d_in, d_out, dtype=torch.float64)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add paired rows ``x [N, d_in]`` and ``y [N, d_out]``."""
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{x.shape[0]} inputs but {y.shape[0]} targets")
        x, y = x.detach().to(torch.float64).cpu(), y.detach().to(torch.float64).cpu()
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.sxx += x.T @ x
        self.sy += y.sum(0)
        self.syy += (y * y).sum(0)
        self.sxy += x.T @ y

    def __add__(self, other: PairStats) -> PairStats:
        out = PairStats(self.sx.numel(), self.sy.numel())
        out.n = self.n + other.n
        for name in ("sx", "sxx", "sy", "syy", "sxy"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        return out

    @property
    def mean_x(self) -> torch.Tensor:
        return self.sx / max(self.n, 1)

    @property
    def mean_y(self) -> torch.Tensor:
        return self.sy / max(self.n, 1)

    def cov_xx(self) -> torch.Tensor:
        m = self.mean_x
        return self.sxx / max(self.n, 1) - torch.outer(m, m)

    def cov_xy(self) -> torch.Tensor:
        return self.sxy / max(self.n, 1) - torch.outer(self.mean_x, self.mean_y)

    def var_y(self) -> torch.Tensor:
        return (self.syy / max(self.n, 1) - self.mean_y**2).clamp_min(0)

    def rms_y(self) -> torch.Tensor:
        """Root mean square of each target dimension, ``[d_out]``."""
        return (self.syy / max(self.n, 1)).sqrt()


def ridge_map(
    stats: PairStats, lam: float, *, diagonal: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression ``y ~ W x + b`` on per-dimension standardized ``x``.

    Args:
        stats: the paired sums.
        lam: ridge penalty relative to the standardized covariance (whose trace is d_in).
        diagonal: fit each dimension from its own input dimension (``d_in == d_out``).

    Returns:
        ``W [d_out, d_in]`` and ``b [d_out]`` in float64, in the raw (unstandardized) units.
    """
    sigma = stats.cov_xx().diagonal().clamp_min(_EPS).sqrt()
    cxy = stats.cov_xy() / sigma[:, None]
    if diagonal:
        w = cxy.diagonal() / (1.0 + lam) / sigma
        weight = torch.diag(w)
    else:
        cxx = stats.cov_xx() / torch.outer(sigma, sigma)
        eye = torch.eye(cxx.shape[0], dtype=cxx.dtype)
        coef = torch.linalg.solve(cxx + lam * eye, cxy)  # [d_in, d_out], standardized x
        weight = (coef / sigma[:, None]).T
    bias = stats.mean_y - weight @ stats.mean_x
    return weight, bias


def prediction_mse(stats: PairStats, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Mean squared error of ``W x + b`` on the pairs summed in ``stats``, per dimension."""
    n = max(stats.n, 1)
    cross = (weight * (stats.sxy / n).T).sum(1)  # w_j . E[x y_j]
    second = ((weight @ (stats.sxx / n)) * weight).sum(1)  # w_j E[x x^T] w_j
    mean_pred = weight @ stats.mean_x
    return (
        stats.syy / n - 2 * (cross + bias * stats.mean_y) + second + 2 * bias * mean_pred + bias**2
    ).clamp_min(0)


def _mean_square(stats: PairStats, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``E[(W x + b)_j^2]`` per dimension."""
    second = ((weight @ (stats.sxx / max(stats.n, 1))) * weight).sum(1)
    return (second + 2 * bias * (weight @ stats.mean_x) + bias**2).clamp_min(0)


@dataclass(frozen=True)
class SeamFit:
    """A fitted seam map and how it was chosen.

    Attributes:
        weight: ``[d_out, d_in]`` float32 (a diagonal fit: a diagonal matrix), in raw units:
            the map is ``weight @ x + bias``.
        bias: ``[d_out]`` float32.
        in_scale: ``[d_in]`` float32, the standard deviation of each input dimension.
        held: ``[d_out]`` bool, dimensions held at ``held_value`` instead of mapped.
        held_value: ``[d_out]`` float32.
        report: ridge chosen, validation R^2, held and massive dimensions, RMS ratios.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    in_scale: torch.Tensor
    held: torch.Tensor
    held_value: torch.Tensor
    report: dict[str, Any] = field(default_factory=dict)


def _r2(mse: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    return 1 - mse / var.clamp_min(_EPS)


def fit_seam_map(
    train: PairStats,
    val: PairStats | None,
    *,
    diagonal: bool = False,
    lambdas: Sequence[float] = LAMBDAS,
    massive_factor: float = 20.0,
    hold_below_r2: float = 0.5,
    rms_match: bool = False,
) -> SeamFit:
    """Fit a seam map in closed form (see the module docstring).

    Args:
        train: pairs to fit on.
        val: held-out pairs that choose ``lambda`` and decide which massive dimensions are
            held (``None``: ``lambda = 1e-2``, every massive dimension held).
        diagonal: a per-dimension map (``d_in == d_out``).
        lambdas: the ridge grid.
        massive_factor: a destination dimension is massive when its RMS exceeds this
            times the median dimension's RMS.
        hold_below_r2: a massive dimension is held at its mean when the map's held-out
            R^2 on it is below this.
        rms_match: scale the mapped deviations so the mean-square RMS per token matches
            the destination's.

    Returns:
        The :class:`SeamFit`.
    """
    if train.n < 2:
        raise ValueError(f"need at least 2 pairs to fit a seam, got {train.n}")
    scores: dict[str, float] = {}
    if val is not None and val.n:
        var = val.var_y()
        for lam in lambdas:
            w, b = ridge_map(train, lam, diagonal=diagonal)
            scores[f"{lam:g}"] = float(_r2(prediction_mse(val, w, b), var).mean())
        lam = float(max(scores, key=scores.get))
    else:
        lam = 1e-2
    everything = train + val if val is not None else train
    weight, bias = ridge_map(everything, lam, diagonal=diagonal)
    rms = everything.rms_y()
    massive = rms > massive_factor * rms.median()
    if val is not None and val.n:
        w_t, b_t = ridge_map(train, lam, diagonal=diagonal)
        r2_dims = _r2(prediction_mse(val, w_t, b_t), val.var_y())
        held = massive & (r2_dims < hold_below_r2)
    else:
        r2_dims = None
        held = massive.clone()
    held_value = everything.mean_y
    free = ~held
    target_ms = float((everything.syy / everything.n).sum())

    def ms_ratio(w: torch.Tensor, b: torch.Tensor) -> float:
        pred = torch.where(held, held_value**2, _mean_square(everything, w, b))
        return math.sqrt(float(pred.sum()) / max(target_ms, _EPS))

    ratio_before = ms_ratio(weight, bias)
    gain = 1.0
    if rms_match and bool(free.any()):
        cov = everything.cov_xx()
        pred_var = ((weight[free] @ cov) * weight[free]).sum(1).sum()
        gain = math.sqrt(float(everything.var_y()[free].sum()) / max(float(pred_var), _EPS))
        weight = weight * gain
        bias = everything.mean_y - weight @ everything.mean_x
    report = {
        "pairs": everything.n,
        "validation_pairs": val.n if val is not None else 0,
        "ridge": lam,
        "validation_r2_by_ridge": scores,
        "validation_r2": scores.get(f"{lam:g}"),
        "massive_dims": massive.nonzero().flatten().tolist(),
        "held_dims": held.nonzero().flatten().tolist(),
        "massive_dims_r2": (
            {int(j): round(float(r2_dims[j]), 4) for j in massive.nonzero().flatten()}
            if r2_dims is not None
            else {}
        ),
        "rms_gain": gain,
        "rms_ratio_before": ratio_before,
        "rms_ratio_after": ms_ratio(weight, bias),
    }
    in_scale = everything.cov_xx().diagonal().clamp_min(_EPS).sqrt()
    return SeamFit(weight.float(), bias.float(), in_scale.float(), held, held_value.float(), report)

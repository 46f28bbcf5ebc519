"""Block comparison metrics: linear CKA, KL layer-correlation and block compatibility.

Pure tensor functions over per-example representations ``[n, d]`` (row ``i`` of every
representation comes from the same calibration example, so widths may differ).

* CKA (Kornblith et al. 2019, "Similarity of Neural Network Representations Revisited")
  with the unbiased HSIC estimator HSIC_1 (Song et al. 2012, "Feature Selection via
  Dependence Maximization", eq. 5; used for CKA by Nguyen et al. 2021, "Do Wide and Deep
  Networks Learn the Same Things?"). For linear kernels ``K = X Xᵀ``, ``L = Y Yᵀ`` every
  term of HSIC_1 is a sum over samples or a feature-space product, so :func:`linear_cka`
  accumulates ``[d, d]`` statistics over minibatches and never builds an ``n × n`` Gram
  matrix. With ``K̃``, ``L̃`` the Grams with zeroed diagonals, ``a_i = ‖x_i‖²``,
  ``b_i = ‖y_i‖²``, ``s_x = Σ x_i``, ``s_y = Σ y_i`` and ``C = Xᵀ Y``::

      tr(K̃ L̃)  = ‖C‖_F² − Σ a_i b_i
      1ᵀ K̃ 1   = ‖s_x‖² − Σ a_i                 (and likewise for L̃)
      1ᵀ K̃ L̃ 1 = s_xᵀ C s_y − (Σ a_i y_i)·s_y − (Σ b_i x_i)·s_x + Σ a_i b_i
      HSIC_1   = [tr(K̃ L̃) + 1ᵀK̃1 · 1ᵀL̃1 / ((n−1)(n−2)) − 2/(n−2) · 1ᵀK̃L̃1] / (n(n−3))

  The biased estimator is ``HSIC_0 = ‖X_cᵀ Y_c‖_F² / (n−1)²`` with ``X_cᵀ Y_c = C − s_x s_yᵀ / n``.
  Both are invariant to adding a constant vector to every row, so each stream is shifted
  by its first minibatch's mean before accumulating (exact, and avoids cancellation).
* COR (AssyLLM): KL divergence between the value distributions of two representations,
  from histograms over a shared range, additively smoothed so that it is always finite.
* compatibility(a → b) = w · CKA(out(a), in(b)) + (1 − w) · exp(−KL(out(a) ‖ in(b))).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "PREPROCESSORS",
    "CKAAccumulator",
    "cka_matrix",
    "clip_outlier_features",
    "compatibility",
    "histogram_kl",
    "kl_divergence",
    "kl_matrix",
    "linear_cka",
    "standardize_features",
    "value_histograms",
]


def _check_pair(x: torch.Tensor, y: torch.Tensor, min_n: int) -> None:
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(
            f"representations must be [n, d], got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"representations pair examples by row; got n={x.shape[0]} and {y.shape[0]}"
        )
    if x.shape[0] < min_n:
        raise ValueError(f"need at least {min_n} examples, got {x.shape[0]}")


def _hsic(n: int, cross, s_p, s_q, norms: tuple[float, float, float], np_q, nq_p, unbiased: bool):
    """HSIC of one pair from its feature-space sums (see the module docstring).

    ``cross = Σ p_i q_iᵀ``, ``s_p = Σ p_i``, ``norms = (Σ ‖p_i‖², Σ ‖q_i‖², Σ ‖p_i‖²‖q_i‖²)``,
    ``np_q = Σ ‖p_i‖² q_i``, ``nq_p = Σ ‖q_i‖² p_i``.
    """
    if not unbiased:
        centered = cross - torch.outer(s_p, s_q) / n
        return float((centered * centered).sum()) / (n - 1) ** 2
    sum_np, sum_nq, sum_npnq = norms
    trace = float((cross * cross).sum()) - sum_npnq
    ones_k, ones_l = float(s_p @ s_p) - sum_np, float(s_q @ s_q) - sum_nq
    ones_kl = float(s_p @ cross @ s_q - np_q @ s_q - nq_p @ s_p) + sum_npnq
    value = trace + ones_k * ones_l / ((n - 1) * (n - 2)) - 2.0 * ones_kl / (n - 2)
    return value / (n * (n - 3))


class CKAAccumulator:
    """Streaming linear CKA of two paired representations, minibatch by minibatch.

    Each minibatch is augmented with three columns ``[1, ‖x_i‖², ‖y_i‖²]`` so that one
    product per pair (``x̂ᵀx̂``, ``ŷᵀŷ``, ``x̂ᵀŷ``) yields every sum HSIC_1 needs: the
    ``[d, d]`` cross-products, the column sums and the norm-weighted sums. Memory is
    ``O((d1 + d2)²)`` plus one minibatch, whatever the number of examples.

    Args:
        compute_dtype: dtype of the per-minibatch products; default: float64 for float64
            inputs, float32 otherwise. Sums across minibatches are always float64, and every
            stream is first shifted by its first minibatch's mean (exact: HSIC is invariant
            to it), so float32 products lose no accuracy that matters (tested to 1e-5).
    """

    def __init__(self, compute_dtype: torch.dtype | None = None) -> None:
        self.compute_dtype = compute_dtype
        self.n = 0
        self._ref: tuple[torch.Tensor, torch.Tensor] | None = None

    def _start(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.compute_dtype is None:
            self.compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        self._ref = (x.mean(0).to(self.compute_dtype), y.mean(0).to(self.compute_dtype))
        d1, d2 = x.shape[1] + 3, y.shape[1] + 3
        self._xx = torch.zeros(d1, d1, dtype=torch.float64)
        self._yy = torch.zeros(d2, d2, dtype=torch.float64)
        self._xy = torch.zeros(d1, d2, dtype=torch.float64)

    def _augment(self, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape[0], x.shape[1] + 3, dtype=self.compute_dtype)
        torch.sub(x, ref, out=out[:, :-3])
        out[:, -3] = 1.0
        return out

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add a block of examples: ``x [b, d1]``, ``y [b, d2]``, row ``i`` paired."""
        _check_pair(x, y, 1)
        if self._ref is None:
            self._start(x, y)
        elif (x.shape[1] + 3, y.shape[1] + 3) != self._xy.shape:
            raise ValueError("widths changed between minibatches")
        xa, ya = self._augment(x, self._ref[0]), self._augment(y, self._ref[1])
        nx, ny = (torch.linalg.vector_norm(a[:, :-3], dim=1).square() for a in (xa, ya))
        xa[:, -2], ya[:, -2], xa[:, -1], ya[:, -1] = nx, nx, ny, ny
        self.n += x.shape[0]
        self._xx += xa.T @ xa
        self._yy += ya.T @ ya
        self._xy += xa.T @ ya

    def value(self, unbiased: bool = True) -> float:
        """CKA of everything seen so far; NaN when either side has no variance."""
        min_n = 4 if unbiased else 2
        if self.n < min_n:
            raise ValueError(f"need at least {min_n} examples, got {self.n}")
        xx, yy, n = self._xx, self._yy, self.n
        (sx, nxx, nyx), (sy, nxy, nyy) = xx[-3:, :-3], yy[-3:, :-3]
        ax, ay = float(xx[-3, -2]), float(xx[-3, -1])  # Σ‖x‖², Σ‖y‖²
        axx, ayy, axy = float(xx[-2, -2]), float(xx[-1, -1]), float(xx[-2, -1])
        hsic_xy = _hsic(n, self._xy[:-3, :-3], sx, sy, (ax, ay, axy), nxy, nyx, unbiased)
        hsic_xx = _hsic(n, xx[:-3, :-3], sx, sx, (ax, ax, axx), nxx, nxx, unbiased)
        hsic_yy = _hsic(n, yy[:-3, :-3], sy, sy, (ay, ay, ayy), nyy, nyy, unbiased)
        if hsic_xx <= 0 or hsic_yy <= 0:
            return math.nan
        return hsic_xy / math.sqrt(hsic_xx * hsic_yy)


def linear_cka(
    x: torch.Tensor,
    y: torch.Tensor,
    unbiased: bool = True,
    *,
    batch_size: int = 4096,
    compute_dtype: torch.dtype | None = None,
) -> float:
    """Linear CKA between two representations of the same examples.

    Kornblith et al. 2019; unbiased HSIC_1 of Song et al. 2012 as used by Nguyen et al.
    2021. Accumulated over row blocks of ``batch_size`` (see :class:`CKAAccumulator`);
    never forms an ``n × n`` matrix.

    Args:
        x: ``[n, d1]`` representation (row ``i`` = example ``i``).
        y: ``[n, d2]`` representation of the same examples; ``d2`` may differ from ``d1``.
        unbiased: HSIC_1 (needs ``n >= 4``); ``False`` gives the classic biased HSIC_0.
        batch_size: rows per minibatch.
        compute_dtype: dtype of the per-minibatch products (see :class:`CKAAccumulator`).

    Returns:
        CKA: 1 for identical representations, invariant to orthogonal transforms and
        isotropic scaling. The unbiased value can leave ``[0, 1]`` slightly at small ``n``.
        NaN if ``x`` or ``y`` has no variance.
    """
    _check_pair(x, y, 4 if unbiased else 2)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    acc = CKAAccumulator(compute_dtype)
    for start in range(0, x.shape[0], batch_size):
        acc.update(x[start : start + batch_size], y[start : start + batch_size])
    return acc.value(unbiased)


def cka_matrix(
    reps: Sequence[torch.Tensor],
    unbiased: bool = True,
    *,
    tile: int = 512,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Linear CKA between every pair of many representations of the same examples.

    Pairwise feature-space accumulation costs ``n · d_a · d_b`` per pair; with ``m``
    representations sharing the examples it is far cheaper to share Gram *tiles*: for each
    pair of row blocks ``(I, J)`` the ``[m, |I|, |J|]`` tiles of all Grams are formed once
    and ``tr(K̃_a K̃_b)`` accumulated for all pairs at once; the other HSIC_1 terms are
    per-sample vectors. Memory is ``O(m · tile²)``, independent of ``n`` beyond the inputs;
    the values equal :func:`linear_cka` on each pair.

    Args:
        reps: ``m`` tensors ``[n, d_k]`` (any widths, same ``n``).
        unbiased: HSIC_1 (default) or the biased HSIC_0.
        tile: rows per Gram tile.
        dtype: compute dtype.

    Returns:
        ``[m, m]`` symmetric CKA matrix (NaN rows for representations without variance).
    """
    if not reps:
        raise ValueError("no representations")
    n = reps[0].shape[0]
    for r in reps:
        _check_pair(reps[0], r, 4 if unbiased else 2)
    centered = [(r.to(dtype) - r.to(dtype).mean(0)) for r in reps]
    trace = torch.zeros(len(reps), len(reps), dtype=dtype)
    for i in range(0, n, tile):
        for j in range(i, n, tile):
            grams = torch.stack([c[i : i + tile] @ c[j : j + tile].T for c in centered])
            if i == j and unbiased:
                grams.diagonal(dim1=1, dim2=2).zero_()
            flat = grams.flatten(1)
            trace += (1.0 if i == j else 2.0) * (flat @ flat.T)
    if unbiased:
        norms = torch.stack([(c * c).sum(1) for c in centered])  # [m, n]
        sums = torch.stack([c.sum(0) @ c.sum(0) for c in centered]) - norms.sum(1)
        rows = torch.stack([c @ c.sum(0) for c in centered]) - norms  # K̃ 1, [m, n]
        hsic = trace + torch.outer(sums, sums) / ((n - 1) * (n - 2))
        hsic = (hsic - 2.0 / (n - 2) * (rows @ rows.T)) / (n * (n - 3))
    else:
        hsic = trace / (n - 1) ** 2
    self_hsic = hsic.diagonal().clone()
    self_hsic[self_hsic <= 0] = math.nan
    return hsic / torch.sqrt(torch.outer(self_hsic, self_hsic))


# ------------------------------------------------------------------ preprocessing before CKA


def standardize_features(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-feature z-score over examples: ``[n, d] -> [n, d]``, each column mean 0, std 1.

    Equalizes the weight of every dimension in linear CKA, so that a few massive-activation
    dimensions (SmolLM2 layers 3–9) no longer dominate it. Constant columns become 0.
    """
    x = x.float()
    return (x - x.mean(0)) / (x.std(0) + eps)


def clip_outlier_features(x: torch.Tensor, k: float = 6.0) -> torch.Tensor:
    """Shrink outlier dimensions: a column whose std exceeds ``k`` × the median column std
    is rescaled (around its mean) to exactly that bound; other columns are untouched.

    Args:
        x: ``[n, d]`` representation.
        k: allowed ratio of a column's std to the median column std.

    Returns:
        ``[n, d]`` with no column's std above ``k · median``.
    """
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    x = x.float()
    std = x.std(0)
    bound = k * std.median()
    scale = torch.where(std > bound, bound / std.clamp_min(1e-30), torch.ones_like(std))
    mean = x.mean(0)
    return (x - mean) * scale + mean


PREPROCESSORS = {
    "none": lambda x: x,
    "standardize": standardize_features,
    "clip": clip_outlier_features,
}
"""Name -> ``[n, d] -> [n, d]`` transform applied to every representation before CKA."""


# ------------------------------------------------------------------ KL layer-correlation


def value_histograms(
    reps: Sequence[torch.Tensor],
    *,
    bins: int = 100,
    standardize: bool = True,
    bound: float = 6.0,
    alpha: float = 0.5,
) -> torch.Tensor:
    """Smoothed histograms of the activation values of each representation, shared bins.

    Args:
        reps: tensors of any shape; all their values count.
        bins: number of equal-width bins.
        standardize: z-score each tensor by its own scalar mean and std first, so that the
            histograms compare the *shape* of the distributions over ``[−bound, bound]``
            (values beyond fall into the edge bins). ``False``: raw values over the shared
            ``[min, max]`` of all tensors, so shifts and scale differences count.
        bound: half-width of the range in standard deviations (``standardize`` only).
        alpha: additive (Krichevsky–Trofimov) pseudo-count per bin, so every bin is > 0.

    Returns:
        ``[len(reps), bins]`` float64 probabilities (rows sum to 1).
    """
    if bins < 2 or alpha <= 0:
        raise ValueError(f"need bins >= 2 and alpha > 0, got {bins} and {alpha}")
    flat = [r.detach().reshape(-1).double() for r in reps]
    if standardize:
        flat = [(v - v.mean()) / v.std().clamp_min(1e-30) for v in flat]
        lo, hi = -bound, bound
    else:
        lo, hi = min(float(v.min()) for v in flat), max(float(v.max()) for v in flat)
        hi = hi if hi > lo else lo + 1.0
    rows = []
    for v in flat:
        counts = torch.histc(v.clamp(lo, hi), bins=bins, min=lo, max=hi)
        rows.append((counts + alpha) / (counts.sum() + alpha * bins))
    return torch.stack(rows)


def histogram_kl(p: torch.Tensor, q: torch.Tensor, symmetric: bool = False) -> torch.Tensor:
    """KL divergence (nats) between every row of ``p [m, B]`` and every row of ``q [k, B]``.

    Returns:
        ``[m, k]`` with ``KL(p_i ‖ q_j) = Σ p_i log(p_i / q_j)``; ``symmetric`` gives
        ``(KL(p‖q) + KL(q‖p)) / 2``. Rows must be strictly positive probabilities.
    """
    if (p <= 0).any() or (q <= 0).any():
        raise ValueError("histograms must be smoothed (strictly positive) for a finite KL")
    forward = (p * p.log()).sum(1, keepdim=True) - p @ q.log().T
    if not symmetric:
        return forward
    backward = (q * q.log()).sum(1, keepdim=True) - q @ p.log().T
    return (forward + backward.T) / 2


def kl_divergence(
    x: torch.Tensor, y: torch.Tensor, *, symmetric: bool = False, **histogram_options
) -> float:
    """KL(value distribution of ``x`` ‖ that of ``y``) in nats, the COR of AssyLLM.

    Args:
        x, y: activations of any shapes (e.g. ``[n, d1]`` and ``[n, d2]``).
        symmetric: average of both directions.
        **histogram_options: ``bins``, ``standardize``, ``bound``, ``alpha`` of
            :func:`value_histograms` (shared range for both).

    Returns:
        0 for identical distributions, growing as they move apart; always finite.
    """
    hist = value_histograms([x, y], **histogram_options)
    return float(histogram_kl(hist[:1], hist[1:], symmetric)[0, 0])


def kl_matrix(
    rows: Sequence[torch.Tensor],
    cols: Sequence[torch.Tensor],
    *,
    symmetric: bool = False,
    **histogram_options,
) -> torch.Tensor:
    """``[len(rows), len(cols)]`` KL(rows[i] ‖ cols[j]) over one shared set of bins."""
    hist = value_histograms([*rows, *cols], **histogram_options)
    return histogram_kl(hist[: len(rows)], hist[len(rows) :], symmetric)


def compatibility(cka: torch.Tensor, kl: torch.Tensor, weight: float = 0.5) -> torch.Tensor:
    """AssyLLM block compatibility ``w · CKA + (1 − w) · exp(−KL)``, elementwise.

    Args:
        cka: CKA(out(a), in(b)) values.
        kl: KL(out(a) ‖ in(b)) values (nats), same shape.
        weight: ``w`` in ``[0, 1]``; 1 is CKA alone, 0 is COR alone.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    return weight * cka + (1.0 - weight) * torch.exp(-kl)

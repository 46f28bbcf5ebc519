"""Pruning one weight matrix: magnitude, Wanda and SparseGPT, unstructured or n:m.

Every function here is a pure tensor function on one matrix ``w`` of shape ``[out, in]``
(``nn.Linear`` layout; transpose a GPT-2 ``Conv1D`` weight first). Masks are *keep*
masks: ``True`` where the weight survives, ``False`` where it is set to zero.

Sparsity is either unstructured (a fraction of zeros) or n:m semi-structured, written
``(n, m)``: in every group of ``m`` consecutive input weights of a row, ``n`` survive
(``(2, 4)`` is NVIDIA's 2:4 pattern, sparsity ``1 - n / m``).

References:
    Sun, Liu, Bair, Kolter. A Simple and Effective Pruning Approach for Large Language
    Models (Wanda), 2023. https://arxiv.org/abs/2306.11695
    Frantar, Alistarh. SparseGPT: Massive Language Models Can Be Accurately Pruned in
    One-Shot, ICML 2023. https://arxiv.org/abs/2301.00774
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from assy.errors import UsageError, arg

__all__ = [
    "METHODS",
    "SparsityTarget",
    "magnitude_mask",
    "parse_sparsity",
    "sparsegpt_prune",
    "wanda_mask",
]

METHODS = ("magnitude", "wanda", "sparsegpt")
"""Pruning methods; ``wanda`` and ``sparsegpt`` need calibration activations."""


@dataclass(frozen=True)
class SparsityTarget:
    """How much to prune and in which pattern.

    Attributes:
        fraction: fraction of zeros in every pruned matrix, in ``[0, 1)``.
        nm: ``(n, m)`` for n:m sparsity (``n`` kept of every ``m``), ``None`` for
            unstructured.
    """

    fraction: float
    nm: tuple[int, int] | None = None

    def __str__(self) -> str:
        return f"{self.nm[0]}:{self.nm[1]}" if self.nm else f"{self.fraction:g}"


def parse_sparsity(text: str | float) -> SparsityTarget:
    """``"0.5"`` -> 50% unstructured, ``"2:4"`` -> 2 of every 4 weights kept.

    Raises:
        UsageError: not a fraction in [0, 1) nor ``n:m`` with ``0 < n < m``.
    """
    text = str(text).strip()
    match = re.fullmatch(r"(\d+):(\d+)", text)
    if match:
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise UsageError(f"{arg('sparsity')} {text}: n:m needs 0 < n < m (e.g. 2:4)")
        return SparsityTarget(1 - n / m, (n, m))
    try:
        fraction = float(text)
    except ValueError:
        raise UsageError(
            f"{arg('sparsity')} {text!r}: expected a fraction such as 0.5 or an n:m pattern "
            "such as 2:4"
        ) from None
    if not 0 <= fraction < 1:
        raise UsageError(f"{arg('sparsity')} {text}: the fraction of zeros must be in [0, 1)")
    return SparsityTarget(fraction)


def _keep_lowest_dropped(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep mask that drops exactly the ``k`` lowest scores of each row of ``scores [R, C]``.

    Ties at the threshold are dropped in column order (``kthvalue`` plus a tie count is
    several times faster on CPU than ``topk`` with a large ``k``).
    """
    if k <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = torch.kthvalue(scores, k, dim=1, keepdim=True).values
    drop = scores < threshold
    ties = scores == threshold
    missing = k - drop.sum(1, keepdim=True)
    drop |= ties & (ties.cumsum(1) <= missing)
    return ~drop


def _nm_keep(scores: torch.Tensor, nm: tuple[int, int]) -> torch.Tensor:
    """Keep mask with the ``n`` highest scores of every ``m`` consecutive columns."""
    n, m = nm
    rows, cols = scores.shape
    if cols % m:
        raise UsageError(f"n:m sparsity {n}:{m} needs input sizes divisible by {m}, got {cols}")
    groups = scores.reshape(rows, cols // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, torch.topk(groups, n, dim=2).indices, True)
    return keep.reshape(rows, cols)


def magnitude_mask(w: torch.Tensor, target: SparsityTarget) -> torch.Tensor:
    """Magnitude pruning: drop the smallest ``|w|`` of the whole matrix.

    Unstructured: exactly ``round(fraction * numel)`` zeros per matrix (layer-wise, as in
    Wanda's magnitude baseline). n:m: the ``n`` largest of every group of ``m``.

    Args:
        w: ``[out, in]`` weights.
        target: how much to prune.

    Returns:
        ``[out, in]`` bool keep mask.
    """
    scores = w.detach().abs().float()
    if target.nm:
        return _nm_keep(scores, target.nm)
    k = round(target.fraction * scores.numel())
    return _keep_lowest_dropped(scores.reshape(1, -1), k).reshape(scores.shape)


def wanda_mask(w: torch.Tensor, act_norm: torch.Tensor, target: SparsityTarget) -> torch.Tensor:
    """Wanda: score ``|W_ij| * ||X_j||_2``, compared within each output row (Sun et al. 2023).

    Args:
        w: ``[out, in]`` weights.
        act_norm: ``[in]`` l2 norm of each input feature over all calibration tokens.
        target: how much to prune; unstructured drops ``round(fraction * in)`` per row.

    Returns:
        ``[out, in]`` bool keep mask.
    """
    if act_norm.shape != (w.shape[1],):
        raise ValueError(f"act_norm must be [{w.shape[1]}], got {tuple(act_norm.shape)}")
    scores = w.detach().abs().float() * act_norm.float().unsqueeze(0)
    if target.nm:
        return _nm_keep(scores, target.nm)
    return _keep_lowest_dropped(scores, round(target.fraction * w.shape[1]))


def _inverse_hessian_chol(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` (SparseGPT, Alg. 1)."""
    h = hessian.double().clone()
    idx = torch.arange(h.shape[0], device=h.device)
    h[idx, idx] += damp * torch.diagonal(h).mean()
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True).float()


def _block_keep(
    w_seg: torch.Tensor,
    u_diag: torch.Tensor,
    target: SparsityTarget,
    row_groups: tuple[int, ...],
) -> torch.Tensor:
    """SparseGPT's adaptive mask: drop the lowest ``w^2 / [H^-1]_jj^2`` of the columns,
    separately within each group of rows (each stacked matrix keeps its own sparsity)."""
    scores = w_seg.pow(2) / u_diag.pow(2).unsqueeze(0)
    if target.nm:
        return _nm_keep(scores, target.nm)
    keeps = []
    for part in scores.split(list(row_groups)):
        k = round(target.fraction * part.numel())
        keeps.append(_keep_lowest_dropped(part.reshape(1, -1), k).reshape(part.shape))
    return torch.cat(keeps)


def _prune_block(
    w1: torch.Tensor, u1: torch.Tensor, target: SparsityTarget, row_groups: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OBS pass over one column block: ``(pruned block, keep mask, scaled errors)``.

    Unstructured masks are chosen once for the whole block; n:m masks per group of ``m``
    columns on the weights as updated by the block's earlier columns (as in the paper).
    """
    m = target.nm[1] if target.nm else None
    if m and w1.shape[1] % m:
        raise UsageError(f"n:m sparsity needs input sizes divisible by {m}")
    diag = torch.diagonal(u1)
    keep = (
        _block_keep(w1, diag, target, row_groups)
        if m is None
        else torch.ones_like(w1, dtype=torch.bool)
    )
    err1 = torch.zeros_like(w1)
    # A second level of the lazy batch update: columns in sub-blocks of 16, each
    # sub-block's errors applied to the rest of the block by one matmul.
    sub = 16 if m is None else max(m, 16 - 16 % m)
    for j1 in range(0, w1.shape[1], sub):
        j2 = min(j1 + sub, w1.shape[1])
        for i in range(j1, j2):
            if m and i % m == 0:
                keep[:, i : i + m] = _block_keep(w1[:, i : i + m], diag[i : i + m], target, ())
            # err_i = (w_i - q_i) / [H^-1]_ii with q_i = keep_i * w_i, then the optimal
            # update of the remaining columns (Eq. 3 of the paper).
            err = w1[:, i] * (~keep[:, i]) / diag[i]
            w1[:, i + 1 : j2].addr_(err, u1[i, i + 1 : j2], alpha=-1.0)
            err1[:, i] = err
        w1[:, j2:] -= err1[:, j1:j2] @ u1[j1:j2, j2:]
    return w1 * keep, keep, err1


def sparsegpt_prune(
    w: torch.Tensor,
    hessian: torch.Tensor,
    target: SparsityTarget,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    row_groups: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT: prune and reconstruct one layer by OBS updates (Frantar & Alistarh 2023).

    Solves ``min ||W X - W' X||^2`` over ``W'`` with the requested zeros, column block by
    column block: within a block of ``block_size`` columns the mask is chosen adaptively
    (lowest ``w^2 / [H^-1]_jj^2`` over the whole block; n:m per group of ``m`` columns),
    each pruned weight's error is compensated on the block's remaining columns, and the
    block's accumulated error is propagated to the later columns (the lazy batch update of
    the reference implementation).

    Args:
        w: ``[out, in]`` weights (not modified).
        hessian: ``[in, in]`` ``X X^T`` summed over calibration tokens (any positive scale).
        target: how much to prune; unstructured drops ``round(fraction * out * cols)`` per
            column block.
        block_size: columns per lazy-update block (128 in the paper).
        damp: dampening, as a fraction of the mean diagonal of ``H`` (1% in the paper).
        row_groups: sizes of matrices stacked along the rows of ``w`` that share the
            Hessian (q/k/v, gate/up); each keeps its own unstructured sparsity. Rows are
            independent given ``H``, so stacking only saves loop iterations.

    Returns:
        ``(w_pruned [out, in] float32, keep [out, in] bool)``; ``w_pruned`` is exactly zero
        where ``keep`` is ``False``.
    """
    cols = w.shape[1]
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian must be [{cols}, {cols}], got {tuple(hessian.shape)}")
    w = w.detach().float().clone()
    h = hessian.detach().float().clone()
    dead = torch.diagonal(h) == 0  # inputs that were always zero carry no information
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = _inverse_hessian_chol(h, damp)
    if target.nm:  # whole n:m groups per block
        block_size = max(target.nm[1], block_size - block_size % target.nm[1])
    groups = tuple(row_groups) if row_groups else (w.shape[0],)
    if sum(groups) != w.shape[0]:
        raise ValueError(f"row_groups {groups} do not add up to the {w.shape[0]} rows of w")
    keep = torch.ones_like(w, dtype=torch.bool)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        q1, keep1, err1 = _prune_block(w[:, i1:i2].clone(), hinv[i1:i2, i1:i2], target, groups)
        w[:, i1:i2] = q1
        keep[:, i1:i2] = keep1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    keep &= w != 0
    return w, keep

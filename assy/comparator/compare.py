"""Compare captured activations: CKA, KL and compatibility matrices, and the best seams.

For every ordered pair of layer blocks ``(a, b)`` across all models

* ``cka[a, b] = CKA(out(a), in(b))`` (unbiased linear CKA, after an optional per-feature
  preprocessing: ``none``, ``standardize`` or ``clip``),
* ``kl[a, b] = KL(values of out(a) ‖ values of in(b))`` (nats),
* ``compatibility[a, b] = w · cka + (1 − w) · exp(−kl)``,

so that ``a → b`` reads "``b`` runs next on what ``a`` produced". Within one model,
``a → a+1`` is the model's own seam (``out(a) = in(a+1)``: CKA 1, KL 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from assy.comparator.capture import POOLINGS, Activations
from assy.comparator.metrics import PREPROCESSORS, cka_matrix, compatibility, kl_matrix
from assy.errors import UsageError, arg

__all__ = ["CompareOptions", "Comparison", "compare_activations", "top_seams"]


@dataclass(frozen=True)
class CompareOptions:
    """How blocks are compared (recorded in every output).

    Attributes:
        weight: ``w`` of the compatibility, in ``[0, 1]`` (1 = CKA alone, 0 = KL alone).
        preprocess: per-feature transform before CKA: ``none``, ``standardize`` (z-score
            each dimension) or ``clip`` (shrink dimensions whose std exceeds 6 × the median).
        unbiased: unbiased HSIC_1 (default) or the biased HSIC_0 estimator.
        pooling: ``mean`` (mask-aware mean over tokens) or ``last`` (last real token).
        skip_first: leading tokens left out of the mean (position 0: the attention sink).
        bins: histogram bins of the KL.
        kl_standardize: z-score each representation's values (scalar) before its histogram,
            so the KL compares distribution shapes, not the models' activation scales.
        kl_symmetric: ``(KL(p‖q) + KL(q‖p)) / 2`` instead of ``KL(out(a) ‖ in(b))``.
    """

    weight: float = 0.5
    preprocess: str = "none"
    unbiased: bool = True
    pooling: str = "mean"
    skip_first: int = 1
    bins: int = 100
    kl_standardize: bool = True
    kl_symmetric: bool = False

    def validate(self) -> None:
        """Raise :class:`UsageError` naming every bad field."""
        bad = []
        if not 0.0 <= self.weight <= 1.0:
            bad.append(f"{arg('weight')} must be in [0, 1], got {self.weight}")
        if self.preprocess not in PREPROCESSORS:
            bad.append(f"{arg('preprocess')} must be one of {', '.join(PREPROCESSORS)}")
        if self.pooling not in POOLINGS:
            bad.append(f"{arg('pooling')} must be one of {', '.join(POOLINGS)}")
        if self.skip_first < 0:
            bad.append(f"{arg('skip_first')} must be >= 0, got {self.skip_first}")
        if self.bins < 2:
            bad.append(f"{arg('bins')} must be at least 2, got {self.bins}")
        if bad:
            raise UsageError("; ".join(bad))


@dataclass(frozen=True)
class Comparison:
    """Matrices over the ``N`` layer blocks of the compared models (rows: ``a``, cols: ``b``).

    Attributes:
        blocks: ``N`` block ids, model by model, in execution order.
        models: model name of each block.
        cka, kl, compatibility: ``[N, N]`` float64 (``a → b``).
        samples: number of calibration examples ``n``.
        options: how they were computed.
    """

    blocks: list[str]
    models: list[str]
    cka: torch.Tensor
    kl: torch.Tensor
    compatibility: torch.Tensor
    samples: int
    options: CompareOptions


def _unique_reps(acts: Sequence[Activations]) -> tuple[list[torch.Tensor], list[int], list[int]]:
    """Distinct representations and, per block, the index of its output and of its input.

    A layer's input is its predecessor's output (the runner hands hidden states on
    unchanged), so it is stored once when the two are equal.
    """
    reps: list[torch.Tensor] = []
    out_idx: list[int] = []
    in_idx: list[int] = []
    for a in acts:
        for i in range(len(a.block_ids)):
            if i > 0 and torch.equal(a.inputs[i], a.outputs[i - 1]):
                in_idx.append(out_idx[-1])
            else:
                reps.append(a.inputs[i])
                in_idx.append(len(reps) - 1)
            reps.append(a.outputs[i])
            out_idx.append(len(reps) - 1)
    return reps, out_idx, in_idx


def compare_activations(acts: Sequence[Activations], options: CompareOptions) -> Comparison:
    """CKA, KL and compatibility matrices of every ordered pair of captured layer blocks.

    Args:
        acts: captured activations of one or more models, on the same ``n`` examples.
        options: the metrics' settings.
    """
    options.validate()
    n = {a.inputs.shape[1] for a in acts}
    if len(n) != 1:
        raise UsageError(f"activations were captured on different sample counts {sorted(n)}")
    reps, out_idx, in_idx = _unique_reps(acts)
    prep = PREPROCESSORS[options.preprocess]
    cka_all = cka_matrix([prep(r) for r in reps], options.unbiased)
    cka = cka_all[out_idx][:, in_idx]
    outs = [a.outputs[i] for a in acts for i in range(len(a.block_ids))]
    ins = [a.inputs[i] for a in acts for i in range(len(a.block_ids))]
    kl = kl_matrix(
        outs,
        ins,
        symmetric=options.kl_symmetric,
        bins=options.bins,
        standardize=options.kl_standardize,
    )
    return Comparison(
        blocks=[b for a in acts for b in a.block_ids],
        models=[a.model for a in acts for _ in a.block_ids],
        cka=cka,
        kl=kl,
        compatibility=compatibility(cka, kl, options.weight),
        samples=n.pop(),
        options=options,
    )


def top_seams(comparison: Comparison, k: int = 10) -> list[dict[str, Any]]:
    """The ``k`` most compatible cross-model seams ``a → b`` (``a``, ``b`` from different models)."""
    c = comparison
    cross = torch.tensor([[ma != mb for mb in c.models] for ma in c.models])
    scores = torch.where(cross & ~c.compatibility.isnan(), c.compatibility, -math.inf)
    best = torch.argsort(scores.flatten(), descending=True)[:k]
    seams = []
    for flat in best.tolist():
        a, b = divmod(flat, len(c.blocks))
        if scores[a, b] == -math.inf:
            break
        seams.append(
            {
                "from": c.blocks[a],
                "to": c.blocks[b],
                "compatibility": float(c.compatibility[a, b]),
                "cka": float(c.cka[a, b]),
                "kl": float(c.kl[a, b]),
            }
        )
    return seams

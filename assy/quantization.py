"""Quantize a pool: one precision for every block, or a mixed-precision plan.

The formats, the planner and the writing live in ``blockpool.quant``; this module adds
what ``blockpool`` must not know: where the calibration text comes from
(:mod:`assy.calibration`: a task's text, a given file, or the default task).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from assy.calibration import calibration_text, calibration_windows
from assy.errors import UsageError, arg

__all__ = ["CalibrationOptions", "quantize"]


def _windows(
    pool, models: list[str], text: str, *, samples: int, seq_len: int
) -> dict[str, torch.Tensor]:
    """Model -> ``[samples, seq_len]`` token windows of ``text`` in that model's tokenizer."""
    return {m: calibration_windows(pool.tokenizer(m), text, samples, seq_len) for m in models}


@dataclass(frozen=True)
class CalibrationOptions:
    """How the planner calibrates: the text, how much of it, the filter and the choices."""

    task: str | None = None
    data: Path | None = None
    samples: int = 128
    seq_len: int = 64
    batch_size: int = 8
    choices: tuple[str, ...] = ("nf4", "int8", "fp16")
    max_sparsity: float = 0.5
    screen: float = 1.0
    cache_dir: Path | None = None
    device: str = "cpu"


def quantize(
    source: Path,
    out: Path,
    *,
    precision: str | None = None,
    target_bits: float | None = None,
    pool_budget: int | None = None,
    calibration: CalibrationOptions = CalibrationOptions(),
    models: list[str] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    wait: bool = False,
) -> dict[str, Any]:
    """Write ``out``, a pool whose blocks are quantized variants of ``source``'s.

    Exactly one of ``precision`` (every block), ``target_bits`` (each model's average
    storage bits per weight at most this) or ``pool_budget`` (total block bytes) is given;
    the last two plan mixed precisions (``blockpool.quant.plan``), calibrating on
    ``calibration`` (cached under ``calibration.cache_dir``, default ``out/calibration``)
    and write the plan to ``out/plan.json``. Every argument is checked, and ``out`` is
    locked (``wait``: wait for another writer), before calibration starts.

    Returns:
        ``{"plan": plan or None, "summary": blockpool.pool.summarize(out)}``.

    Raises:
        UsageError: not exactly one mode, bad values, a budget below the smallest plan, or
            ``out`` holding a different model of the same name.
    """
    from blockpool import (
        Pool,
        atomic_write_bytes,
        check_precision_choices,
        check_variant_target,
        plan_precisions,
        pool_lock,
        quantize_pool,
        summarize,
    )

    modes = [x is not None for x in (precision, target_bits, pool_budget)]
    if sum(modes) != 1:
        raise UsageError(
            f"give exactly one of {arg('precision')}, {arg('target_bits')} or {arg('pool_budget')}"
        )
    if target_bits is not None and not 2 < target_bits <= 32:
        raise UsageError(
            f"{arg('target_bits')} {target_bits}: give average bits per weight in (2, 32]"
        )
    if not 0 < calibration.screen <= 1:
        raise UsageError(f"{arg('screen')} must be in (0, 1], got {calibration.screen}")
    if pool_budget is not None and pool_budget <= 0:
        raise UsageError(f"{arg('pool_budget')} must be a positive size such as 300MB")
    out = Path(out)
    cache = calibration.cache_dir
    for path, name in ((out, "out"), (cache, "cache_dir")):
        if path is not None and path.exists() and not path.is_dir():
            raise UsageError(f"{arg(name)} {path}: exists and is not a directory")
    pool = Pool(source)
    models = models or list(pool.models)
    for m in models:
        pool.model(m)
    if out.resolve() == pool.root.resolve():
        raise UsageError(
            f"{arg('out')} {out} is the source pool; write the quantized pool elsewhere"
        )
    for m in models:
        check_variant_target(pool, m, out)
    windows = text = None
    if precision is None:
        check_precision_choices(calibration.choices)
        text = calibration_text(calibration.task, calibration.data)
        windows = _windows(
            pool, models, text.text, samples=calibration.samples, seq_len=calibration.seq_len
        )
    with pool_lock(out, wait=wait):
        plan = None
        if windows is not None:
            plan = plan_precisions(
                pool,
                windows,
                data_key=text.key,
                choices=calibration.choices,
                target_bits=target_bits,
                budget=pool_budget,
                max_sparsity=calibration.max_sparsity,
                screen=calibration.screen,
                cache_dir=cache or out / "calibration",
                batch_size=calibration.batch_size,
                device=calibration.device,
                progress=progress,
            )
        quantize_pool(pool, out, precision or plan.precisions, models=models, progress=progress)
        if plan is not None:
            atomic_write_bytes(out / "plan.json", json.dumps(plan.to_json(), indent=1).encode())
    return {
        "plan": plan.to_json() if plan else None,
        "calibration": text.label if plan else None,
        "summary": summarize(Pool(out)),
    }

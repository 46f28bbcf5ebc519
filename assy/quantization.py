"""Quantize a pool: one precision for every block, or a mixed-precision plan.

The formats, the planner and the writing live in ``blockpool`` (``quantizer``,
``planner``, ``quantize``); this module adds what ``blockpool`` must not know: where the
calibration text comes from (a task's text or a given file), named for the calibration
cache.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from assy.data import TASKS, load_task, read_text
from assy.errors import UsageError

__all__ = [
    "DEFAULT_TASK",
    "CalibrationOptions",
    "calibration_text",
    "calibration_windows",
    "quantize",
]

DEFAULT_TASK = "sciq"
"""Default calibration task: SciQ's support paragraphs and answers (science prose), a task
none of the quantization benchmarks evaluate."""


def calibration_text(
    task: str | None = None, file: Path | None = None, *, max_chars: int = 400_000
) -> tuple[str, str]:
    """The calibration text and a key naming it (for cache keys).

    Args:
        task: a multiple-choice task of :data:`assy.data.TASKS`: each example's context
            followed by its correct choice, examples separated by blank lines.
        file: a UTF-8 text file, used as is (takes precedence over ``task``).
        max_chars: the text is cut after this many characters.

    Returns:
        ``(text, key)``; ``key`` is ``"task:<name>:<chars>"`` or ``"file:<sha256>:<chars>"``.
    """
    if file is not None:
        text = read_text(file)[:max_chars]
        return text, f"file:{hashlib.sha256(text.encode()).hexdigest()[:16]}:{len(text)}"
    task = task or DEFAULT_TASK
    if task not in TASKS:
        raise UsageError(f"unknown calibration task {task!r}; known tasks: {', '.join(TASKS)}")
    parts, size = [], 0
    for example in load_task(task):
        parts.append(example.context + example.choices[example.label])
        size += len(parts[-1]) + 2
        if size >= max_chars:
            break
    text = "\n\n".join(parts)[:max_chars]
    return text, f"task:{task}:{len(text)}"


def calibration_windows(
    pool, models: list[str], text: str, *, samples: int, seq_len: int
) -> dict[str, torch.Tensor]:
    """Model -> ``[N, seq_len]`` token windows of ``text`` in that model's tokenizer."""
    from blockpool.sensitivity import calibration_ids

    return {
        m: calibration_ids(pool.tokenizer(m), text, samples=samples, seq_len=seq_len)
        for m in models
    }


@dataclass(frozen=True)
class CalibrationOptions:
    """How the planner calibrates: the text, how much of it, the filter and the choices."""

    task: str | None = None
    file: Path | None = None
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
) -> dict[str, Any]:
    """Write ``out``, a pool whose blocks are quantized variants of ``source``'s.

    Exactly one of ``precision`` (every block), ``target_bits`` (each model's average
    storage bits per weight at most this) or ``pool_budget`` (total block bytes) is given;
    the last two plan mixed precisions (``blockpool.planner``), calibrating on
    ``calibration`` (cached under ``calibration.cache_dir``, default ``out/calibration``)
    and write the plan to ``out/plan.json``.

    Returns:
        ``{"plan": plan or None, "summary": blockpool.pool.summarize(out)}``.

    Raises:
        UsageError: not exactly one mode, bad values, or a budget below the smallest plan.
    """
    from blockpool.manifest import atomic_write_bytes
    from blockpool.planner import plan_precisions
    from blockpool.pool import Pool, summarize
    from blockpool.quantize import quantize_pool

    modes = [x is not None for x in (precision, target_bits, pool_budget)]
    if sum(modes) != 1:
        raise UsageError(
            "give exactly one of --precision, --auto --target-bits B, --auto --pool-budget SIZE"
        )
    if target_bits is not None and not 2 < target_bits <= 32:
        raise UsageError(f"--target-bits {target_bits}: give average bits per weight in (2, 32]")
    pool = Pool(source)
    models = models or list(pool.models)
    for m in models:
        pool.model(m)
    if Path(out).resolve() == pool.root.resolve():
        raise UsageError(f"--out {out} is the source pool; write the quantized pool elsewhere")
    plan = None
    if precision is None:
        text, key = calibration_text(calibration.task, calibration.file)
        windows = calibration_windows(
            pool, models, text, samples=calibration.samples, seq_len=calibration.seq_len
        )
        plan = plan_precisions(
            pool,
            windows,
            data_key=key,
            choices=calibration.choices,
            target_bits=target_bits,
            budget=pool_budget,
            max_sparsity=calibration.max_sparsity,
            screen=calibration.screen,
            cache_dir=calibration.cache_dir or Path(out) / "calibration",
            batch_size=calibration.batch_size,
            device=calibration.device,
            progress=progress,
        )
    quantize_pool(pool, Path(out), precision or plan.precisions, models=models, progress=progress)
    if plan is not None:
        atomic_write_bytes(Path(out) / "plan.json", json.dumps(plan.to_json(), indent=1).encode())
    return {"plan": plan.to_json() if plan else None, "summary": summarize(Pool(out))}

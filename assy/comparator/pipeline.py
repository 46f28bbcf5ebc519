"""The pipeline behind ``assy compare``: capture, compare, write matrices and heatmaps.

Every model's pooled layer inputs and outputs are captured on the same calibration texts
(:mod:`assy.comparator.capture`, cached), compared (:mod:`assy.comparator.compare`), and
written as ``compare.json``, ``matrices.safetensors`` and heatmap PNGs.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from assy.comparator.capture import Activations, cached_capture
from assy.comparator.compare import CompareOptions, Comparison, compare_activations, top_seams
from assy.comparator.heatmaps import comparison_heatmaps
from assy.errors import UsageError, arg
from blockpool import Pool, RunOptions, atomic_write_bytes, open_runner

__all__ = ["compare_pool"]


def _matrix_json(m: torch.Tensor) -> list[list[float | None]]:
    return [[None if math.isnan(v) else round(v, 6) for v in row] for row in m.tolist()]


def _write(comparison: Comparison, out: Path, meta: dict[str, Any]) -> dict[str, str]:
    """``compare.json`` (everything, NaN as null) and ``matrices.safetensors``; atomic."""
    c = comparison
    doc = {
        **meta,
        "options": asdict(c.options),
        "samples": c.samples,
        "blocks": c.blocks,
        "models": c.models,
        "cka": _matrix_json(c.cka),
        "kl": _matrix_json(c.kl),
        "compatibility": _matrix_json(c.compatibility),
    }
    files = {"json": out / "compare.json", "safetensors": out / "matrices.safetensors"}
    atomic_write_bytes(files["json"], json.dumps(doc, indent=1).encode())
    tensors = {"cka": c.cka, "kl": c.kl, "compatibility": c.compatibility}
    header = {"blocks": json.dumps(c.blocks), "options": json.dumps(asdict(c.options))}
    matrices = save({k: v.contiguous() for k, v in tensors.items()}, metadata=header)
    atomic_write_bytes(files["safetensors"], matrices)
    return {k: str(v) for k, v in files.items()}


def _capture(
    pool: Pool,
    name: str,
    texts: Sequence[str],
    cache_dir: Path,
    options: CompareOptions,
    run_options: RunOptions,
    **capture: Any,
) -> tuple[Activations, dict[str, Any]]:
    """One model's activations (cached), run as ``run_options`` say (budget, device)."""
    with open_runner(pool, name, run_options) as run:
        acts, path, reused = cached_capture(
            pool,
            name,
            texts,
            cache_dir,
            pooling=options.pooling,
            skip_first=options.skip_first,
            runner=run.runner,
            **capture,
        )
    entry = {"model": name, "file": str(path), "reused": reused}
    if run.swapper is not None and not reused:
        entry["swap"] = {k: run.report[k] for k in run.swapper.stats.as_dict()}
    return acts, entry


def compare_pool(
    root: Path,
    out: Path,
    texts: Sequence[str],
    *,
    models: Sequence[str] | None = None,
    options: CompareOptions = CompareOptions(),
    data_label: str = "",
    max_tokens: int = 128,
    top: int = 10,
    run: RunOptions = RunOptions(),
    progress: bool = True,
) -> dict[str, Any]:
    """Capture, compare and report the layer blocks of ``models`` (default: all) of a pool.

    Writes ``compare.json``, ``matrices.safetensors``, ``heatmaps/*.png`` and the
    activation cache ``activations/`` under ``out``.

    Args:
        root: the pool directory.
        out: output directory (created).
        texts: the ``n`` calibration texts (same for every model).
        models: model names of the pool; default all.
        options: metric settings.
        data_label: where the texts came from (recorded).
        max_tokens: token cap per text (see :func:`assy.comparator.capture.capture_model`).
        top: how many cross-model seams to return.
        run: how to run the models (budget and swap policy, device, dtype, batch size,
            threads; see :func:`blockpool.session.open_runner`).
        progress: tqdm bars on stderr.

    Returns:
        A summary: settings, top seams, files written, cache use and timings.
    """
    options.validate()
    if len(texts) < 4:
        raise UsageError(
            f"only {len(texts)} text(s) to compare ({data_label or 'texts given'}); unbiased "
            "CKA needs at least 4"
        )
    if top < 0:
        raise UsageError(f"{arg('top')} must be 0 or more, got {top}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{arg('out')} {out}: exists and is not a directory")
    if models is not None and not list(models):
        raise UsageError(f"{arg('models')} is empty; name models of the pool, or leave it out")
    pool = Pool(root)
    names = list(models) if models is not None else list(pool.models)
    for name in names:
        pool.model(name)  # raises UsageError naming the known models
    if len(set(names)) != len(names):
        raise UsageError(f"{arg('models')} lists a model twice: {','.join(names)}")
    out.mkdir(parents=True, exist_ok=True)
    capture = {"batch_size": run.batch_size, "progress": progress}
    t0 = time.perf_counter()
    acts, cache = [], []
    for name in names:
        # a model with learned positions reads at most that many tokens of each text
        cap = min(max_tokens, pool.max_positions(name) or max_tokens)
        a, entry = _capture(
            pool, name, texts, out / "activations", options, run, max_tokens=cap, **capture
        )
        entry["max_tokens"] = cap
        acts.append(a)
        cache.append(entry)
    t1 = time.perf_counter()
    comparison = compare_activations(acts, options)
    seams = top_seams(comparison, top)
    meta = {"pool": str(root), "data": data_label, "max_tokens": max_tokens, "budget": run.budget}
    meta |= {"device": run.device, "threads": torch.get_num_threads()}
    meta["top_seams"] = seams
    files = _write(comparison, out, meta)
    files["heatmaps"] = [str(p) for p in comparison_heatmaps(comparison, out / "heatmaps")]
    t2 = time.perf_counter()
    return {
        **meta,
        "models": names,
        "samples": comparison.samples,
        "layer_blocks": len(comparison.blocks),
        "options": asdict(options),
        "files": files,
        "cache": cache,
        "seconds": {"capture": t1 - t0, "compare": t2 - t1},
    }

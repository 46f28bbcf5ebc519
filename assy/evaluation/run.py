"""Evaluate a pool model (or any chain of its blocks) on a task: what ``assy eval`` runs."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from assy.data import load_task, read_text
from assy.errors import UsageError, arg
from assy.evaluation.choice import (
    choice_requests,
    mc_metrics,
    pad_token,
    sample_records,
    score_rows,
)
from assy.evaluation.perplexity import perplexity_inputs, perplexity_result, score_windows
from assy.evaluation.scoring import model_max_length
from blockpool import Pool, RunOptions, open_runner

__all__ = ["evaluate_pool_model", "evaluate_target", "release_memory", "write_jsonl"]


def evaluate_pool_model(
    root: Path,
    model: str,
    task: str,
    *,
    data: Path | None = None,
    limit: int | None = None,
    split: str = "validation",
    max_length: int | None = None,
    max_tokens: int = 2048,
    window: int = 512,
    options: RunOptions = RunOptions(),
    log_samples: Path | None = None,
    progress: bool = True,
    assembly: Path | None = None,
) -> dict[str, Any]:
    """Evaluate one model of a pool, or an assembly of its blocks, on a task.

    Args:
        root: the pool directory.
        model: the model's name in the pool (ignored with ``assembly``).
        task, data, limit, split, max_length, max_tokens, window, options, log_samples,
            progress: see :func:`evaluate_target`.
        assembly: an assembly directory (:mod:`assy.assembly`); it names its anchor, whose
            tokenizer reads the inputs.

    Returns:
        :func:`evaluate_target`'s result (with ``assembly`` and ``fit_data``: what its
        adapters were fitted on).
    """
    pool = Pool(root)
    target: str | list = model
    extra: dict[str, Any] = {}
    if assembly is not None:
        from assy.assembly.runner import load_assembly

        loaded = load_assembly(pool, assembly)
        model, target = loaded.anchor, loaded.chain
        extra = {"assembly": str(assembly), "fit_data": loaded.fit.get("data")}
    if not pool.family(model).causal:
        raise UsageError(
            f"model {model!r} is an encoder ({pool.model(model).family}); {task} needs a causal LM"
        )
    return extra | evaluate_target(
        pool,
        target,
        # loaded here, not held here: evaluate_target releases it before the weights load
        None if assembly is None else pool.tokenizer(model),
        task,
        name=model,
        data=data,
        limit=limit,
        split=split,
        max_length=max_length,
        max_tokens=max_tokens,
        window=window,
        options=options,
        log_samples=log_samples,
        progress=progress,
    )


def evaluate_target(
    pool: Pool,
    target: str | Sequence[str | nn.Module],
    tokenizer: Any,
    task: str,
    *,
    name: str | None = None,
    data: Path | None = None,
    limit: int | None = None,
    split: str = "validation",
    max_length: int | None = None,
    max_tokens: int = 2048,
    window: int = 512,
    options: RunOptions = RunOptions(),
    log_samples: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a model name or a chain of pool blocks (an assembly) on a task.

    Args:
        pool: the open pool.
        target: a model name of the pool, or a chain (block ids and seams).
        tokenizer: the tokenizer of the chain's embedding; ``None``: the model's own (then
            released once the inputs are tokenized, before the weights load).
        task: ``perplexity`` (needs ``data``, a text file) or a multiple-choice task or
            group of :func:`assy.data.task_names`.
        name: what the result calls the target (default: ``target`` if a name).
        data: the text scored for perplexity; for a multiple-choice task, a JSONL file
            that replaces the shipped split.
        limit: the first N examples only (of each task of a group).
        split: the shipped split scored (``validation``; MMLU also ``dev``, ``test``).
        max_length: most tokens the model sees per choice; ``None``: the model's own
            limit (its config's ``max_position_embeddings``).
        max_tokens, window: the perplexity protocol (:func:`assy.evaluation.perplexity`).
        options: how to run (budget, swap policy, device, dtype, batch size, threads).
        log_samples: write one JSON line per example (or window) here.
        progress: show progress bars on stderr.

    Returns:
        The metrics with their standard errors, plus ``model``, ``task``, ``split`` (or
        ``data``), ``max_length``, ``seconds`` and the run's report
        (:class:`blockpool.session.RunSession`: device, threads, ``peak_rss_bytes`` and,
        under a budget, the swapper's counters).
    """
    if task == "perplexity":
        if data is None:
            raise UsageError(f"{arg('task')} perplexity needs {arg('data')} (a text file)")
        text = read_text(data)
    else:
        examples = load_task(task, data_file=data, limit=limit, split=split)
    positions = pool.max_positions(target) if isinstance(target, str) else None
    if positions is not None:  # learned positions: inputs must not exceed them
        lengths = {"window": window} if task == "perplexity" else {"max_length": max_length}
        for flag, value in lengths.items():
            if value is not None and value > positions:
                raise UsageError(
                    f"{arg(flag)} {value} is longer than the {positions} positions model "
                    f"{target!r} has learned; use {arg(flag)} {positions} or less"
                )
    if tokenizer is None:
        if not isinstance(target, str):
            raise UsageError("a chain needs the tokenizer of its embedding's model")
        tokenizer = pool.tokenizer(target)
    # tokenize everything first: the tokenizer is then released before the weights load
    # (Gemma-3's holds ~300 MB)
    if task == "perplexity":
        inputs = perplexity_inputs(tokenizer, text, max_tokens=max_tokens, window=window)
    else:
        rows, pad = choice_requests(tokenizer, examples), pad_token(tokenizer)
    del tokenizer
    release_memory()
    source = {"data": str(data)} if data is not None else {"split": split}
    start = time.perf_counter()
    with open_runner(pool, target, options) as run:
        runner = run.runner
        if not runner.is_causal:
            raise UsageError(f"{name or 'the chain'} is an encoder; {task} needs a causal LM")
        if task == "perplexity":
            scores = score_windows(runner, inputs, window=window, progress=progress)
            result, records = perplexity_result(inputs, scores)
        else:
            length = max_length or model_max_length(runner)
            scored = score_rows(
                runner,
                rows,
                pad_id=pad,
                batch_size=options.batch_size,
                max_length=length,
                progress=progress,
            )
            result = mc_metrics([[s.loglik for s in row] for row in scored], examples)
            result["max_length"] = length
            records = sample_records(examples, scored)
    if log_samples is not None:
        write_jsonl(log_samples, records)
    head = {"model": name or (target if isinstance(target, str) else "chain"), "task": task}
    return head | source | result | {"seconds": time.perf_counter() - start} | run.report


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``), so
    that what was dropped (a tokenizer's tables) leaves the resident set before the
    weights come in."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """Write one JSON object per line, atomically (temporary file, then rename)."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{arg('log_samples')} {path}: is a directory, expected a file")
    if not path.parent.is_dir():
        raise UsageError(f"{arg('log_samples')} {path}: no directory {path.parent}")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

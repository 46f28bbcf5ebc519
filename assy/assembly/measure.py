"""Measure an assembly under a budget: a real evaluation in a fresh process.

A fresh interpreter imports torch, transformers, assy, ``datasets`` (the code that reads
the task data, as a federated client's floor does) and bitsandbytes (the code packed
quantized blocks run with: ~110 MB of resident set on import, which a run of an int8 or
nf4 variant would otherwise count as its own), runs one tiny forward of the anchor's
family and reads its resident set: the *warm floor* (DESIGN.md "Budget"; the budget is
what a run may hold beyond it). It then
evaluates the assembly through the swapper with ``--budget`` and reports the swapper's
peak resident weights and budget use, the bytes it read, and the process's peak RSS
(``VmHWM``, reset after the floor was read) over the floor -- numbers to print beside the
plan's prediction.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from assy.errors import UsageError

__all__ = [
    "CONTRACT_TRIES",
    "contract_budget",
    "within_contract",
    "measure_assembly",
    "measure_runs",
    "tiny_config",
    "tiny_forward",
]

CONTRACT_TRIES = 3  # measured runs before giving up on keeping the contract (see contract_budget)

_WORKER = r"""
import json, sys
from pathlib import Path

import blockpool  # noqa: F401 - first: its log filter (blockpool.noise) before bitsandbytes
import bitsandbytes.functional  # noqa: F401 - code packed (quantized) blocks run with
import datasets  # noqa: F401 - code that reads the task data: part of the warm floor
import torch
import transformers  # noqa: F401 - part of the warm floor

import assy  # noqa: F401
from assy.evaluation import evaluate_pool_model
from blockpool import RunOptions


def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
# the warm floor: imports and one tiny forward of the anchor's family (DESIGN.md "Budget")
from assy.assembly.measure import tiny_forward
from blockpool import Pool

tiny_forward(dict(Pool(args["pool"]).model(args["anchor"]).config))
floor = status("VmRSS:")
try:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM restarts from here
except OSError:
    pass
options = RunOptions(budget=args["budget"], dtype=args["dtype"], batch_size=1,
                     threads=args["threads"])
results = []
for run in args["runs"]:
    results.append(evaluate_pool_model(
        Path(args["pool"]), None, run["task"], assembly=Path(args["assembly"]),
        data=Path(run["data"]) if run.get("data") else None, limit=run.get("limit"),
        max_tokens=run.get("max_tokens", 1024), window=run.get("window", 256), options=options,
        progress=False, log_samples=Path(run["log"]) if run.get("log") else None,
    ))
print(json.dumps({"floor_rss_bytes": floor, "peak_rss_over_floor_bytes": status("VmHWM:") - floor,
                  "results": results}))
"""


def tiny_config(config: dict[str, Any]):
    """A random model of the same family as ``config``, tiny: what the warm floor runs."""
    from transformers import AutoConfig

    cfg = {k: v for k, v in config.items() if k != "assy_converted_from"}
    small = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "vocab_size": 512,
    }
    cfg.update({k: v for k, v in small.items() if k in cfg})
    if cfg.get("layer_types"):
        cfg["layer_types"] = cfg["layer_types"][:1]
    return AutoConfig.for_model(**cfg)


def tiny_forward(config: dict[str, Any]) -> None:
    """One forward of a tiny random model of ``config``'s family: the warm floor's run
    (DESIGN.md "Budget"; what a first forward initialises once per process)."""
    import torch
    from transformers import AutoModelForCausalLM

    tiny = AutoModelForCausalLM.from_config(tiny_config(config))
    with torch.inference_mode():
        tiny(input_ids=torch.ones(1, 4, dtype=torch.long))


def within_contract(measured: dict[str, Any], budget: int) -> bool | None:
    """Whether a measured run's peak RSS over its warm floor kept DESIGN.md's budget
    contract for ``budget`` (:func:`blockpool.budget_allowance`); ``None`` where it was
    not read."""
    from blockpool import budget_allowance

    over = measured.get("peak_rss_over_floor_bytes")
    return None if over is None else over <= budget_allowance(budget)


def contract_budget(measured: dict[str, Any], budget: int, planned_for: int) -> int | None:
    """The budget to plan within next when a measured run broke DESIGN.md's budget
    contract -- peak RSS over the warm floor above :func:`blockpool.budget_allowance` of
    ``budget`` -- having been planned within ``planned_for``; ``None`` where it kept it
    (or the run was not read).

    What a process holds beyond a plan's count (the tokenizer's remnants, heap the
    allocator keeps between calls, read buffers: 70-90 MB beyond the resident weights in
    SmolLM2's runs on the CPU, ``benchmarks/assemble.py``) is measured, not modelled: the
    next plan is smaller by the excess and a slack of 1% of ``budget`` + 2 MiB (peak RSS
    varies by about 1 MB between identical runs).
    """
    from blockpool import budget_allowance

    if within_contract(measured, budget) is not False:
        return None
    excess = measured["peak_rss_over_floor_bytes"] - budget_allowance(budget)
    return planned_for - excess - (budget // 100 + (2 << 20))


def measure_assembly(
    pool: Path,
    assembly: Path,
    budget: int,
    *,
    task: str,
    data: Path | None = None,
    limit: int | None = None,
    tokens: int = 1024,
    window: int = 256,
    dtype: str = "fp32",
    threads: int = 1,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Evaluate ``assembly`` within ``budget`` in a fresh process and return what it used.

    Args:
        pool, assembly: the pool and the assembly directory.
        budget: bytes (the swapper's ``--budget``).
        task: ``perplexity`` (on ``data``, ``tokens`` tokens in windows of ``window``) or a
            multiple-choice task (its first ``limit`` validation examples).
        dtype, threads: how to run.

    Returns:
        ``budget``, ``weights_resident_peak_bytes``, ``budget_used_peak_bytes``,
        ``bytes_read``, ``floor_rss_bytes``, ``peak_rss_over_floor_bytes``,
        ``peak_rss_bytes``, ``seconds``, the task's metrics (``score``) and ``task``.

    Raises:
        UsageError: the run failed (its last line of error output is named).
    """
    run = {"task": task, "data": str(data) if data is not None else None, "limit": limit}
    run |= {"max_tokens": tokens, "window": window}
    doc = measure_runs(pool, assembly, budget, [run], dtype=dtype, threads=threads, timeout=timeout)
    result = doc["results"][0]
    metrics = ("bits_per_byte", "perplexity") if task == "perplexity" else ("acc", "acc_norm")
    return {
        "task": task,
        "budget": budget,
        "weights_resident_peak_bytes": result.get("weights_resident_peak_bytes"),
        "budget_used_peak_bytes": result.get("budget_used_peak_bytes"),
        "bytes_read": result.get("bytes_read"),
        "floor_rss_bytes": doc["floor_rss_bytes"],
        "peak_rss_over_floor_bytes": doc["peak_rss_over_floor_bytes"],
        # VmHWM, reset after the floor: the child's ru_maxrss is not its own (Linux keeps
        # it across exec, so it starts at the parent's resident set when forked)
        "peak_rss_bytes": doc["floor_rss_bytes"] + doc["peak_rss_over_floor_bytes"],
        "seconds": result.get("seconds"),
        "n": result.get("n") or result.get("tokens"),
        "score": {m: result.get(m) for m in metrics}
        | {f"{m}_stderr": result.get(f"{m}_stderr") for m in metrics},
    }


def measure_runs(
    pool: Path,
    assembly: Path,
    budget: int | None,
    runs: list[dict[str, Any]],
    *,
    dtype: str = "fp32",
    threads: int = 1,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Several evaluations of ``assembly`` in one fresh process within ``budget``
    (``None``: unbudgeted). Each run: ``task``, and ``data``, ``limit``, ``max_tokens``,
    ``window``, ``log`` (a ``--log-samples`` path) as :func:`evaluate_pool_model` takes
    them.

    Returns:
        ``floor_rss_bytes``, ``peak_rss_over_floor_bytes`` (over all runs) and
        ``results`` (each run's :func:`evaluate_pool_model` result).

    Raises:
        UsageError: the process failed (its last line of error output is named).
    """
    from assy.assembly.recipe import load_recipe

    args = {
        "anchor": load_recipe(Path(assembly) / "recipe.yaml").anchor,
        "pool": str(pool),
        "assembly": str(assembly),
        "budget": budget,
        "runs": runs,
        "dtype": dtype,
        "threads": threads,
    }
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [sys.executable, "-c", _WORKER, json.dumps(args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if done.returncode != 0:
        lines = [x for x in done.stderr.strip().splitlines() if x.strip()]
        raise UsageError(
            f"measuring {assembly} within {budget} bytes failed: "
            + (lines[-1] if lines else f"exit {done.returncode}")
        )
    return json.loads(done.stdout.strip().splitlines()[-1])

"""A client's peak memory, measured by running one client round alone in a fresh process.

A Ray worker runs many clients one after the other and keeps what it allocated, so its
peak says nothing about one client's need. Here one round runs in a new interpreter: after
the imports its resident high-water mark is reset (Linux ``/proc/self/clear_refs``), and
the peak during the round minus the resident set just before it is what the round itself
needs (weights, adapter, optimizer state, activations and gradients).

Run as ``python -m assy.federation.memory CONFIG_JSON train|score [BUDGET_BYTES]``.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from assy.errors import UsageError
from assy.federation.config import FederationConfig

__all__ = ["CLIENT_MALLOC_ENV", "measure_client_memory"]

CLIENT_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "1048576"}
"""glibc settings of client processes (simulation workers and the measurement): buffers of
1 MiB and more are mapped and unmapped, not kept. With glibc's default (a threshold that
rises after large frees) a training round's resident set grew by about one freed LM-head
matrix (113 MB for SmolLM2) per step and the measured need varied from 2.0 to 3.4 GB
between identical runs; with these it is the round's real peak. (blockpool's budgeted
runner does the same in-process; its helper is not public.)"""


def _status_bytes(key: str) -> int | None:
    """A ``VmRSS``/``VmHWM`` line of ``/proc/self/status`` in bytes (Linux; else None)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _release_freed_memory() -> None:
    """Collect cycles (peft models hold some) and hand freed heap back to the kernel, so
    that what was built before the round neither counts as the round's nor hides in RSS."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc


def _reset_peak() -> None:
    """Restart the kernel's resident high-water mark (``VmHWM``) from the current RSS, so
    that the peak measured is the round's, not the imports' (Linux ``clear_refs`` 5)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def measure_client_memory(
    cfg: FederationConfig, kind: str = "train", budget: int | None = None, timeout: float = 900
) -> dict[str, Any]:
    """Run one client round (partition 0) alone in a fresh process and measure it.

    Args:
        cfg: the run.
        kind: ``train`` (a fedit/local round: LoRA training of the anchor) or ``score``
            (forward-only scoring of the anchor through the swapper within ``budget``).
        budget: resident weight bytes for ``score`` (``None``: all resident).
        timeout: seconds before the measurement is given up.

    Returns:
        ``{"kind", "peak_rss_bytes", "baseline_rss_bytes", "need_bytes", "seconds"}``.

    Raises:
        UsageError: the round failed (its last error line is quoted).
    """
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    env |= {k: v for k, v in CLIENT_MALLOC_ENV.items() if k not in env}
    args = [sys.executable, "-m", "assy.federation.memory", json.dumps(cfg.to_record()), kind]
    args += [str(budget)] if budget is not None else []
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise UsageError(f"measuring a client's {kind} memory took over {timeout:.0f} s") from None
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()] or ["no output"]
        raise UsageError(f"measuring a client's {kind} memory failed: {lines[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _main(argv: list[str]) -> None:
    import time
    import warnings

    import torch

    warnings.simplefilter("ignore")  # stderr is only read on failure
    torch.set_num_threads(1)
    from assy.federation import task
    from blockpool import Pool, peak_rss_bytes

    cfg = FederationConfig.from_record(json.loads(argv[1]))
    kind, budget = argv[2], int(argv[3]) if len(argv) > 3 else None
    pool = Pool(cfg.pool)
    anchor = task.anchor_model(pool, cfg.anchor)
    for bid in pool.model(anchor).blocks:
        pool.empty_module(bid)  # import the model's classes: code is not the round's need
    examples = task.federated_data(cfg).clients[0]
    # What the server sends is not the client's to build: make it before the baseline.
    initial = task.initial_adapter(pool, anchor, cfg) if kind == "train" else None
    _release_freed_memory()
    _reset_peak()
    baseline = _status_bytes("VmRSS") or peak_rss_bytes()
    start = time.perf_counter()
    if kind == "train":
        task.fedit_round(cfg, 0, initial, 1)
    elif kind == "score":
        task.score_under_budget(pool, anchor, examples, budget)
    else:
        raise SystemExit(f"unknown kind {kind!r}")
    peak = _status_bytes("VmHWM") or peak_rss_bytes()
    result = {
        "kind": kind,
        "budget": budget,
        "peak_rss_bytes": peak,
        "baseline_rss_bytes": baseline,
        "need_bytes": max(0, peak - baseline),
        "seconds": time.perf_counter() - start,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    _main(sys.argv)

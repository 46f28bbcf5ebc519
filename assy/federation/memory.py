"""A client's peak memory, measured by running one client round alone in a fresh process.

A Ray worker runs many clients one after the other and keeps what it allocated, so its
peak says nothing about one client's need. Here one round runs in a new interpreter: after
the imports its resident high-water mark is reset (Linux ``/proc/self/clear_refs``), and
the peak during the round minus the resident set just before it is what the round itself
needs (weights, adapter, optimizer state, activations and gradients).

Two entry points: :func:`measure_client_memory` (a fedit training round or a forward-only
scoring pass of the anchor, before a run, to decide who can take part) and
:func:`measure_round` (any method's round, from the very content the server sends a client:
``assy federate --measure-memory`` runs it once per tier and phase).
Run as ``python -m assy.federation.memory CONFIG_JSON train|score [BUDGET_BYTES]`` or
``python -m assy.federation.memory round DIR PARTITION NUM_PARTITIONS``.

What a round itself holds while it runs is :mod:`~.held`'s.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from assy.errors import UsageError
from assy.federation.config import FederationConfig
from assy.federation.held import release_freed_memory, status_bytes

__all__ = ["CLIENT_MALLOC_ENV", "measure_client_memory", "measure_round"]

CLIENT_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "1048576"}
"""glibc settings of client processes (simulation workers and the measurement): buffers of
1 MiB and more are mapped and unmapped, not kept. With glibc's default (a threshold that
rises after large frees) a training round's resident set grew by about one freed LM-head
matrix (113 MB for SmolLM2) per step and the measured need varied from 2.0 to 3.4 GB
between identical runs; with these it is the round's real peak. (blockpool's budgeted
runner does the same in-process; its helper is not public.)"""


def _reset_peak() -> None:
    """Restart the kernel's resident high-water mark (``VmHWM``) from the current RSS, so
    that the peak measured is the round's, not the imports' (Linux ``clear_refs`` 5)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _import_round_code() -> None:
    """Import what a client round imports (the training code, ``datasets`` to read the
    bundled data), as a simulation worker's warm-up does (``client_app.hello``): code is
    part of a process's warm floor, not of a round's need (DESIGN.md "Budget").
    ``datasets`` alone adds about 87 MB of resident set on import."""
    import datasets  # noqa: F401

    from assy.federation import lego, selection, task  # noqa: F401


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
    args = [json.dumps(cfg.to_record()), kind] + ([str(budget)] if budget is not None else [])
    return _measure(args, f"a client's {kind} memory", timeout)


def measure_round(
    content: Any, partition: int, num_partitions: int, timeout: float = 1800
) -> dict[str, Any]:
    """Run one client round alone in a fresh process, from what the server sends it.

    The round is the ClientApp's own (:func:`~.client_app.train_content`), on the
    partition's data, under its tier's budget where the method keeps one (``assy``'s
    scoring goes through the swapper). What the client received (the message content) is
    loaded before the baseline; the need is the round's peak above it.

    Args:
        content: the ``RecordDict`` a ``train`` message to this client carries.
        partition, num_partitions: the client's node config.
        timeout: seconds before the measurement is given up.

    Returns:
        ``{"kind": "round", "partition", "peak_rss_bytes", "baseline_rss_bytes",
        "need_bytes", "seconds", "metrics"}`` (``metrics``: what the client replied).

    Raises:
        UsageError: the round failed (its last error line is quoted).
    """
    from safetensors.torch import save_file

    from assy.federation.records import ARRAYS, CONFIG

    with tempfile.TemporaryDirectory(prefix="assy-round-") as tmp:
        config = {k: v for k, v in content[CONFIG].items()}
        Path(tmp, "config.json").write_text(json.dumps(config))
        if ARRAYS in content:
            state = content[ARRAYS].to_torch_state_dict()
            save_file(
                {k: v.contiguous() for k, v in state.items()}, str(Path(tmp, "arrays.safetensors"))
            )
        args = ["round", tmp, str(partition), str(num_partitions)]
        return _measure(args, f"client {partition}'s round memory", timeout)


def _measure(args: list[str], what: str, timeout: float) -> dict[str, Any]:
    """``python -m assy.federation.memory ARGS`` in a fresh process: its last JSON line."""
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    env |= {k: v for k, v in CLIENT_MALLOC_ENV.items() if k not in env}
    command = [sys.executable, "-m", "assy.federation.memory", *args]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise UsageError(f"measuring {what} took over {timeout:.0f} s") from None
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()] or ["no output"]
        raise UsageError(f"measuring {what} failed: {lines[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _warm_floor(pool) -> None:
    """Bring this process to DESIGN.md's warm floor for ``pool``: every family's classes
    imported and one tiny forward of each decoder family run (what a first forward
    initialises once per process is not a round's need)."""
    from assy.assembly.measure import tiny_forward

    for name, model in pool.models.items():
        pool.empty_module(next(iter(model.blocks)))  # import the family's classes
        if pool.family(name).causal:
            tiny_forward(dict(pool.model(name).config))


def _round_main(directory: str, partition: int, num_partitions: int) -> None:
    """The child of :func:`measure_round`."""
    import time

    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
    from safetensors.torch import load_file

    from assy.federation.client_app import train_content
    from assy.federation.records import ARRAYS, CONFIG, METRICS
    from blockpool import Pool, peak_rss_bytes

    _import_round_code()  # code is not the need
    torch.set_num_threads(1)
    config = json.loads(Path(directory, "config.json").read_text())
    cfg = FederationConfig.from_record(config)
    pool = Pool(cfg.pool)
    _warm_floor(pool)
    content = RecordDict({CONFIG: ConfigRecord(config)})
    if Path(directory, "arrays.safetensors").is_file():
        content[ARRAYS] = ArrayRecord(load_file(str(Path(directory, "arrays.safetensors"))))
    release_freed_memory()
    _reset_peak()
    baseline = status_bytes("VmRSS") or peak_rss_bytes()
    start = time.perf_counter()
    node_config = {
        "partition-id": partition,
        "num-partitions": num_partitions,
        "client-dir": str(Path(directory, "client")),  # local: never the run's own state
    }
    reply = train_content(content, Context(0, 0, node_config, RecordDict(), {}))
    peak = status_bytes("VmHWM") or peak_rss_bytes()
    result = {
        "kind": "round",
        "partition": partition,
        "peak_rss_bytes": peak,
        "baseline_rss_bytes": baseline,
        "need_bytes": max(0, peak - baseline),
        "seconds": time.perf_counter() - start,
        "metrics": {k: float(v) for k, v in reply[METRICS].items()},
    }
    print(json.dumps(result))


def _main(argv: list[str]) -> None:
    import time
    import warnings

    import torch

    warnings.simplefilter("ignore")  # stderr is only read on failure
    if argv[1] == "round":
        _round_main(argv[2], int(argv[3]), int(argv[4]))
        return
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
    release_freed_memory()
    _reset_peak()
    baseline = status_bytes("VmRSS") or peak_rss_bytes()
    start = time.perf_counter()
    if kind == "train":
        task.fedit_round(cfg, 0, initial, 1)
    elif kind == "score":
        task.score_under_budget(pool, anchor, examples, budget)
    else:
        raise SystemExit(f"unknown kind {kind!r}")
    peak = status_bytes("VmHWM") or peak_rss_bytes()
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

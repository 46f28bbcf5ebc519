"""One way to open a runner: :class:`RunOptions` and the :func:`open_runner` context manager.

Every command that runs blocks (evaluate, generate, compare, the benchmarks) goes through
here: open the pool, build the runner (through the swapper when there is a budget), set
the compute threads, and on the way out close the swapper and report its counters, the
peak memory and the settings used::

    with open_runner(pool_dir, "smollm2-135m", RunOptions(budget=200_000_000)) as run:
        logits = run.runner(ids)
    print(run.report)   # budget, policy, device, threads, swapper stats, peak memory
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blockpool.errors import UsageError
from blockpool.pool import Pool
from blockpool.swapper import DEFAULT_POLICY, POLICIES

__all__ = [
    "DTYPES",
    "RunOptions",
    "RunSession",
    "default_threads",
    "open_runner",
    "parse_device",
    "peak_rss_bytes",
    "use_threads",
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_threads() -> int:
    """Intra-op threads for this machine as it is now: the cores not already busy.

    On a loaded machine OpenMP threads spin against each other and a run with as many
    threads as cores can be several times slower than one with fewer (measured on the
    2-core development machines: see the README, "Threads"). So the default is the cores
    this process may use minus the 1-minute load average, at least 1 — unless the user set
    ``OMP_NUM_THREADS``, which is then the default.
    """
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


def use_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (``None``: :func:`default_threads`); returns the number."""
    n = default_threads() if threads is None else threads
    if n < 1:
        raise UsageError(f"threads must be at least 1, got {n}")
    torch.set_num_threads(n)
    return n


def parse_device(device: str | torch.device) -> torch.device:
    """A device that exists here: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    Raises:
        UsageError: unknown spelling, or an accelerator this machine does not have.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {device}: no CUDA GPU is available here; use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(
                f"device {device}: only {torch.cuda.device_count()} CUDA device(s) here"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"device {device}: MPS is not available here; use cpu")
    elif dev.type != "cpu":
        raise UsageError(f"unsupported device {device!r}; use cpu, cuda, cuda:N or mps")
    return dev


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes (Linux ``ru_maxrss`` is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass(frozen=True)
class RunOptions:
    """How to run blocks (not what to run).

    Attributes:
        budget: most resident weight bytes (through the swapper); ``None``: all resident.
        policy: the swapper's policy (:data:`blockpool.swapper.POLICIES`).
        dtype: compute dtype name: ``fp32``, ``bf16`` or ``fp16``.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        batch_size: sequences per forward call, for callers that batch.
        threads: torch intra-op threads; ``None``: :func:`default_threads`.
    """

    budget: int | None = None
    policy: str = DEFAULT_POLICY
    dtype: str = "fp32"
    device: str = "cpu"
    batch_size: int = 8
    threads: int | None = None

    def validate(self) -> None:
        """Raise :class:`UsageError` naming the first bad field."""
        if self.policy not in POLICIES:
            raise UsageError(
                f"unknown swap policy {self.policy!r}; use one of {', '.join(POLICIES)}"
            )
        if self.dtype not in DTYPES:
            raise UsageError(f"unknown dtype {self.dtype!r}; use one of {', '.join(DTYPES)}")
        if self.batch_size < 1:
            raise UsageError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"threads must be at least 1, got {self.threads}")
        if self.budget is not None and self.budget <= 0:
            raise UsageError(f"budget must be positive, got {self.budget}")
        parse_device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass
class RunSession:
    """An open runner and, after the ``with`` block, what the run cost.

    Attributes:
        pool: the open pool.
        runner: a :class:`~blockpool.chain.ChainRunner` (a
            :class:`~blockpool.runner.BlockRunner` for a model name).
        swapper: the :class:`~blockpool.swapper.BlockSwapper`, ``None`` without a budget.
        options: the options it was opened with.
        threads: the intra-op threads in use.
        report: filled on exit: ``budget_bytes``, ``swap_policy``, ``device``, ``dtype``,
            ``threads``, the swapper's counters (with a budget), ``peak_rss_bytes`` and, on
            CUDA, ``device_peak_bytes``.
    """

    pool: Pool
    runner: Any
    swapper: Any
    options: RunOptions
    threads: int
    report: dict[str, Any] = field(default_factory=dict)


@contextmanager
def open_runner(
    pool: Pool | str | Path,
    target: str | Sequence[str | nn.Module],
    options: RunOptions = RunOptions(),
) -> Iterator[RunSession]:
    """Open a runner for a model (its name) or a chain, as ``options`` say.

    Args:
        pool: an open :class:`Pool` or its directory.
        target: a model name of the pool, or a chain (block ids and seams, see
            :mod:`blockpool.chain`).
        options: budget, policy, dtype, device, batch size, threads.

    Yields:
        A :class:`RunSession`; its ``report`` is complete once the block exits.

    Raises:
        UsageError: bad options, or a budget below the smallest working set.
    """
    from blockpool.offload import budgeted_runner

    options.validate()
    opened = pool if isinstance(pool, Pool) else Pool(pool)
    device = parse_device(options.device)
    threads = use_threads(options.threads)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runner, swapper = budgeted_runner(
        opened,
        target,
        budget=options.budget,
        policy=options.policy,
        dtype=options.torch_dtype,
        device=device,
    )
    session = RunSession(opened, runner, swapper, options, threads)
    try:
        yield session
    finally:
        if swapper is not None:
            swapper.close()
        report: dict[str, Any] = {
            "device": str(device),
            "dtype": options.dtype,
            "threads": threads,
        }
        if swapper is not None:
            report |= {
                "budget_bytes": options.budget,
                "swap_policy": options.policy,
                **swapper.stats.as_dict(),
            }
        report["peak_rss_bytes"] = peak_rss_bytes()
        if device.type == "cuda":
            report["device_peak_bytes"] = torch.cuda.max_memory_allocated(device)
        session.report = report

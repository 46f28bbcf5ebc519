"""Fault injection: every writing command, failed or killed at each of its write steps.

A *write step* is one file of the pool becoming visible (``blockpool.storage._publish``:
block files, tokenizer files, the manifest last). For each writing command the tests

* fail the write at every step in turn (a full disk: ``OSError(ENOSPC)``) or interrupt it
  (``KeyboardInterrupt``, as Ctrl-C does): exit 2 or 130 with one line and no traceback;
* kill the process with SIGKILL at seeded pseudo-random steps, before or after the file
  lands (in a forked child, and a sample in a fresh interpreter), and send it SIGINT;

and check afterwards that ``verify-pool`` passes, that every model the pool held before is
there and unchanged (its files match the sums recorded before), that no temporary file is
left, and that a rerun of the same command completes. Later writers add their command to
``SCENARIOS``.
"""

import functools
import os
import random
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
from click.testing import CliRunner
from pool_faults import (
    ROOT,
    assert_intact,
    at_write,
    disk_full,
    make_sources,
    pool_state,
    run_forked,
)

from assy.cli import cli
from blockpool import Pool, build_pool


@dataclass(frozen=True)
class Scenario:
    """A writing command on a prepared pool; ``target``: the pool it writes (``pool`` or
    ``out``); ``writes``: the models it adds or rebuilds."""

    args: tuple[str, ...]
    writes: tuple[str, ...]
    target: str = "pool"
    extra: dict = field(default_factory=dict)


SCENARIOS = {
    "build-pool": Scenario(
        ("build-pool", "g={gpt2}", "--out", "{pool}", "--dtype", "fp32"), ("g",)
    ),
    "build-pool-rebuild": Scenario(
        ("build-pool", "m={llama}", "--out", "{pool}", "--dtype", "fp16"), ("m",)
    ),
    "quantize": Scenario(
        ("quantize", "{pool}", "--out", "{out}", "--precision", "int8", "--model", "m"),
        ("m",),
        target="out",
    ),
    "prune": Scenario(
        ("prune", "{pool}", "--model", "m", "--method", "magnitude", "--sparsity", "0.5"),
        ("m50",),
        extra={"as": "m50"},
    ),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A pool with one model (``m``, fp32) and a second pool ``out`` with another (``x``)."""
    root = tmp_path_factory.mktemp("faults")
    sources = make_sources(root / "src")
    build_pool([f"m={sources['llama']}"], root / "pool", dtype="fp32")
    build_pool([f"x={sources['llama_b']}"], root / "out", dtype="fp32")
    return root, sources


def _prepare(base, tmp_path, name):
    root, sources = base
    for d in ("pool", "out"):
        shutil.copytree(root / d, tmp_path / d)
    s = SCENARIOS[name]
    paths = {"pool": tmp_path / "pool", "out": tmp_path / "out", **sources}
    args = [a.format(**paths) for a in s.args]
    if "as" in s.extra:
        args += ["--as", s.extra["as"]]
    target = paths[s.target]
    return args, target, pool_state(target)


def _invoke(args):
    return CliRunner().invoke(cli, args)


def _check_after_fault(target, before, writes, committed=False, killed=False):
    """The pool verifies, and every model it held before is unchanged (or, once the new
    manifest was committed, a model the command rebuilds is its new, valid version)."""
    keep = {n: m for n, m in before.items() if not (committed and n in writes)}
    assert_intact(target, keep, killed=killed)
    assert Pool(target).verify() == []


def _rerun_completes(args, target, before, writes):
    result = _invoke(args)
    assert result.exit_code == 0, result.output
    after = assert_intact(target, {n: m for n, m in before.items() if n not in writes})
    assert set(writes) <= set(after)
    assert Pool(target).verify() == []


def _steps(args, tmp_path):
    with at_write(10**9, lambda: None) as seen:
        assert _invoke(args).exit_code == 0
    return len(seen)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_a_failure_at_every_write_step_leaves_the_pool_valid(base, tmp_path, name):
    writes = SCENARIOS[name].writes
    steps = _steps(_prepare(base, tmp_path / "count", name)[0], tmp_path)
    assert steps >= 3
    for step in range(1, steps + 1):
        args, target, before = _prepare(base, tmp_path / f"s{step}", name)
        interrupt = step % 2 == 0
        action = (lambda: (_ for _ in ()).throw(KeyboardInterrupt)) if interrupt else disk_full
        with at_write(step, action):
            result = _invoke(args)
        lines = result.output.strip().splitlines()
        if interrupt:
            assert result.exit_code == 130 and lines[-1] == "interrupted", result.output
        else:
            assert result.exit_code == 2, result.output
            assert lines[-1].startswith("error: cannot write") and "disk is full" in lines[-1]
        assert "Traceback" not in result.output
        _check_after_fault(target, before, writes)
        _rerun_completes(args, target, before, writes)


def _kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def _interrupt_self():
    os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_sigkill_and_sigint_at_seeded_moments(base, tmp_path, name):
    writes = SCENARIOS[name].writes
    steps = _steps(_prepare(base, tmp_path / "count", name)[0], tmp_path)
    rng = random.Random(f"issue-11-{name}")
    for trial in range(3):
        args, target, before = _prepare(base, tmp_path / f"t{trial}", name)
        step, after = rng.randint(1, steps), rng.random() < 0.5
        sigint = trial == 2
        log = tmp_path / f"t{trial}.log"
        action = _interrupt_self if sigint else _kill_self
        patch = functools.partial(at_write, step, action, after=after)
        status = run_forked(args, log, patch)
        output = log.read_text()
        if sigint:
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 130, output
            assert output.strip().splitlines()[-1] == "interrupted" and "Traceback" not in output
        else:
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, output
        committed = step == steps and after  # killed just after the manifest was replaced
        _check_after_fault(
            target, before, writes, committed=committed and not sigint, killed=not sigint
        )
        _rerun_completes(args, target, before, writes)


def test_a_fresh_interpreter_killed_and_interrupted(base, tmp_path):
    """The same, in real processes started from scratch (no state shared with pytest);
    the two run side by side, on two pools."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = [sys.executable, str(ROOT / "tests" / "pool_faults.py")]
    args, target, before = _prepare(base, tmp_path / "a", "build-pool-rebuild")
    args2, target2, before2 = _prepare(base, tmp_path / "b", "prune")
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "env": env}
    killed = subprocess.Popen([*script, "kill", "3", "--", *args], **pipes)
    interrupted = subprocess.Popen([*script, "int", "2", "--", *args2], **pipes)
    _, err = killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL, err.decode()
    _, err = interrupted.communicate(timeout=300)
    stderr = err.decode()
    assert interrupted.returncode == 130 and stderr.strip().splitlines()[-1] == "interrupted"
    assert "Traceback" not in stderr
    _check_after_fault(target, before, ("m",), killed=True)
    _check_after_fault(target2, before2, ("m50",))
    _rerun_completes(args, target, before, ("m",))
    _rerun_completes(args2, target2, before2, ("m50",))

"""Helpers of the integrity tests: tiny sources, pool snapshots, and faults injected where
the pool's files are written (``blockpool.storage._publish``: every file of a pool
becomes visible there, one at a time).

Also a script: ``python tests/pool_faults.py ACTION STEP -- ASSY ARGS...`` runs the CLI in
a fresh interpreter with ACTION at the STEP-th write: ``kill`` (SIGKILL itself), ``int``
(SIGINT itself, as Ctrl-C), ``slow`` (sleep 0.15 s before every write, to make two writers
overlap) or ``none``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import TINY, char_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def make_sources(root: Path) -> dict[str, Path]:
    """Tiny checkpoints with tokenizers: ``llama``, ``gpt2`` and ``llama_b`` (llama's
    architecture and config, other weights: equal safetensors headers)."""
    dirs = {}
    for name, family, seed in (("llama", "llama", 0), ("gpt2", "gpt2", 0), ("llama_b", "llama", 1)):
        torch.manual_seed(seed)
        model = TINY[family]().eval()
        model.config.bos_token_id = model.config.eos_token_id = 1  # inside the tiny vocabulary
        model.save_pretrained(root / name)
        char_tokenizer().save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pool_state(root: Path) -> dict[str, dict]:
    """Every model of a pool: its config, and each block and tokenizer file with the sum
    the manifest records *and* the sum of the file on disk (equal when intact)."""
    doc = json.loads((root / "pool.json").read_text())
    state = {}
    for name, model in doc["models"].items():
        blocks = {}
        for bid in model["blocks"]:
            entry = doc["blocks"][bid]
            path = root / entry["file"]
            blocks[bid] = (entry["sha256"], _sha(path) if path.is_file() else None)
        files = {rel: (digest, _sha(root / rel)) for rel, digest in model["tokenizer"].items()}
        state[name] = {"config": model["config"], "blocks": blocks, "tokenizer": files}
    return state


def assert_intact(root: Path, before: dict[str, dict], *, killed: bool = False) -> dict[str, dict]:
    """Every model that was in the pool before is there, unchanged, and its files match;
    no temporary file is left (unless the writer was ``killed``: the next one removes them)."""
    after = pool_state(root)
    for model in after.values():
        for what in ("blocks", "tokenizer"):
            for key, (recorded, actual) in model[what].items():
                assert recorded == actual, f"{key}: file does not match its sum"
    for name, model in before.items():
        assert after.get(name) == model, f"model {name} changed or vanished"
    assert killed or not list(root.rglob("*.assy-tmp")), "temporary files left behind"
    return after


class Injected(Exception):
    pass


@contextmanager
def at_write(step: int, action, *, after: bool = False):
    """Call ``action()`` at the ``step``-th file a pool publishes (1-based), before the
    rename (``after``: once it is done); yields the list of published paths."""
    import blockpool.storage as storage

    real = storage._publish
    seen: list[Path] = []

    def publish(tmp: Path, path: Path) -> None:
        seen.append(path)
        if len(seen) == step and not after:
            action()
        real(tmp, path)
        if len(seen) == step and after:
            action()

    storage._publish = publish
    try:
        yield seen
    finally:
        storage._publish = real


@contextmanager
def slow_writes(seconds: float = 0.1):
    """Sleep before every file a pool publishes (to make two writers overlap)."""
    import blockpool.storage as storage

    real = storage._publish

    def publish(tmp: Path, path: Path) -> None:
        time.sleep(seconds)
        real(tmp, path)

    storage._publish = publish
    try:
        yield
    finally:
        storage._publish = real


def run_forked(args: list[str], log: Path, patch, *, start: int | None = None) -> int:
    """Run ``assy ARGS`` in a forked child under ``patch()`` (a context manager), its
    output in ``log``; with ``start`` (a pipe's read end) the child first waits for a byte
    on it. Returns the child's wait status."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 99
        try:
            _start_as_a_shell_would()
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = sys.stderr = open(fd, "w", buffering=1)  # noqa: SIM115
            if start is not None:
                os.read(start, 1)
            from assy.cli import cli

            with patch():
                try:
                    cli.main(args, prog_name="assy")
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else 1
        finally:
            sys.stdout.flush()
            os._exit(code)
    return pid if start is not None else wait_child(pid, log)


def wait_child(pid: int, log: Path, timeout: float = 120) -> int:
    """Wait for a forked child; kill it (and fail) if it hangs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"the writer hung: {log.read_text()}")


def disk_full() -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _start_as_a_shell_would() -> None:
    """SIGINT unblocked with Python's default handler, as a fresh `assy` started from a
    terminal has it, whatever the process that started this one ignored or blocked (a
    child inherits both across fork and exec)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _main() -> None:
    _start_as_a_shell_would()
    action, step = sys.argv[1], int(sys.argv[2])
    args = sys.argv[sys.argv.index("--") + 1 :]
    actions = {
        "kill": lambda: os.kill(os.getpid(), signal.SIGKILL),
        "int": lambda: os.kill(os.getpid(), signal.SIGINT),
        "none": lambda: None,
    }
    sys.argv = ["assy", *args]
    from assy.cli import main

    if action == "slow":
        with slow_writes(0.15):
            main()
    with at_write(step, actions[action]):
        main()


if __name__ == "__main__":
    _main()

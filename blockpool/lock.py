"""The pool's write lock: one writer at a time, released by the kernel when it dies.

Every command that writes a pool (build, quantize, prune, merge, and any later writer)
holds :func:`pool_lock` from before it reads the manifest it will rewrite until after it
has written it, so no update is lost. The lock is ``fcntl.flock`` on ``<pool>/pool.lock``:
the kernel releases it when its holder exits or is killed, so a dead writer never leaves
the pool locked. The file names the holder (host, pid, command, start time) for the
message a second writer gets. Readers take no lock: the manifest is replaced atomically,
so they see the old one or the new one.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from blockpool.errors import PoolBusy, arg
from blockpool.storage import make_dirs, writing

__all__ = ["LOCK_FILE", "lock_holder", "pool_lock"]

LOCK_FILE = "pool.lock"

_held: dict[tuple[str, int], int] = {}  # (lock file, thread) -> depth: re-entrant per thread
_held_guard = threading.Lock()


def lock_holder(root: str | Path) -> dict[str, str | int] | None:
    """What the lock file says about its current (or last) holder, if anything."""
    try:
        info = json.loads((Path(root) / LOCK_FILE).read_text() or "null")
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _holder_of_refusal(root: str | Path) -> dict[str, str | int] | None:
    """:func:`lock_holder` for a refused writer: the holder writes its record just after
    taking the lock, so a refusal in between waits for it a little (at most 1 s)."""
    deadline = time.monotonic() + 1.0
    while (info := lock_holder(root)) is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return info


def _describe(info: dict[str, str | int] | None) -> str:
    if not info:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info.get("since", 0))))
    command = f": {info['command']}" if info.get("command") else ""
    return f"pid {info.get('pid')} on {info.get('host')}{command} (since {since})"


def _open_locked(path: Path, wait: bool) -> int | None:
    """Open ``path`` and take its exclusive lock: the fd of the file that is there now, or
    ``None`` if another process holds it and ``wait`` is false."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    os.close(fd)
                    return None
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:  # the holder before us may have removed the file: lock the one there now
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _remove_empty(root: Path, top: Path) -> None:
    d = root
    while True:
        try:
            d.rmdir()
        except OSError:
            return  # not empty any more: someone else uses it
        if d == top:
            return
        d = d.parent


@contextmanager
def pool_lock(root: str | Path, *, wait: bool = False) -> Iterator[Path]:
    """Hold the exclusive write lock of the pool at ``root`` (created if missing).

    Re-entrant within one thread: a writer may call another writer under its lock.
    If the lock created ``root`` and nothing but the lock file is there on exit (the
    writer failed before writing anything), ``root`` is removed again.

    Args:
        root: the pool directory.
        wait: wait for the current holder to finish instead of failing at once.

    Yields:
        ``root`` as a :class:`~pathlib.Path`.

    Raises:
        PoolBusy: another process holds the lock and ``wait`` is false; the message names
            the holder's host, pid and command.
        PoolWriteError: the lock file cannot be created (read-only or missing location).
    """
    root = Path(root)
    top = root  # the outermost directory this call creates, removed again if left empty
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    created = not root.exists()
    make_dirs(root)
    path = root / LOCK_FILE
    key = (str(path.resolve()), threading.get_ident())
    with _held_guard:
        depth = _held.get(key, 0)
        _held[key] = depth + 1
    if depth:
        try:
            yield root
        finally:
            with _held_guard:
                _held[key] -= 1
        return
    try:
        with writing(path):
            fd = _open_locked(path, wait)
        if fd is None:
            raise PoolBusy(
                f"pool {root} is being written by {_describe(_holder_of_refusal(root))}; wait for it "
                f"to finish, or pass {arg('wait')} to wait for it"
            )
        try:
            info = {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200],
                "since": time.time(),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
            yield root
        finally:
            os.ftruncate(fd, 0)
            if created and [p.name for p in root.iterdir()] == [LOCK_FILE]:
                path.unlink()  # before unlocking: a waiter then sees the file is gone
                _remove_empty(root, top)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
    finally:
        with _held_guard:
            del _held[key]

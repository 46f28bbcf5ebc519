"""Two writers on one pool, started together: both models are there afterwards, or one
writer was refused with a message naming the other; never a lost model. Readers never
see a half-written manifest."""

import os
import shutil
import subprocess
import sys
import threading

import pytest
from pool_faults import (
    ROOT,
    assert_intact,
    make_sources,
    pool_state,
    run_forked,
    slow_writes,
    wait_child,
)

from blockpool import Pool, build_pool
from blockpool.manifest import read_manifest


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("conc")
    sources = make_sources(root / "src")
    build_pool([f"m={sources['llama']}"], root / "pool", dtype="fp32")
    build_pool([f"x={sources['llama_b']}"], root / "other", dtype="fp32")
    return root, sources


PAIRS = {  # (command, the model it adds) for each of two writers
    "build-pool and build-pool": (
        (("build-pool", "b={llama_b}", "--out", "{pool}"), "b"),
        (("build-pool", "g={gpt2}", "--out", "{pool}"), "g"),
    ),
    "build-pool and prune": (
        (("build-pool", "g={gpt2}", "--out", "{pool}"), "g"),
        (
            ("prune", "{pool}", "--model", "m", "--method", "magnitude", "--sparsity", "0.5")
            + ("--as", "m50"),
            "m50",
        ),
    ),
    "build-pool and quantize": (
        (("build-pool", "g={gpt2}", "--out", "{pool}"), "g"),
        (("quantize", "{other}", "--out", "{pool}", "--precision", "int8"), "x"),
    ),
}


def _start_together(commands, logs):
    """Fork one writer per command (slow writes), release them at once, wait for all."""
    read, write = os.pipe()
    pids = [
        run_forked(list(args), log, slow_writes, start=read)
        for args, log in zip(commands, logs, strict=True)
    ]
    os.write(write, b"go" * len(pids))
    return [wait_child(pid, log) for pid, log in zip(pids, logs, strict=True)]


@pytest.mark.parametrize("wait", [False, True], ids=["refuse", "wait"])
@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_two_writers_started_together(base, tmp_path, pair, wait):
    root, sources = base
    for d in ("pool", "other"):
        shutil.copytree(root / d, tmp_path / d)
    paths = {"pool": tmp_path / "pool", "other": tmp_path / "other", **sources}
    flag = ["--wait"] if wait else []
    commands = [[a.format(**paths) for a in args] + flag for args, _ in PAIRS[pair]]
    before = pool_state(tmp_path / "pool")
    logs = [tmp_path / "a.log", tmp_path / "b.log"]

    codes = [os.waitstatus_to_exitcode(s) for s in _start_together(commands, logs)]

    present = set(assert_intact(tmp_path / "pool", before))  # nothing that was there is lost
    for code, log, (_, model) in zip(codes, logs, PAIRS[pair], strict=True):
        output = log.read_text()
        assert "Traceback" not in output
        if code == 0:
            assert model in present, f"{model} was lost: {output}"
        else:  # refused at once, naming the other writer and the way out; nothing written
            assert code == 2 and not wait, output
            last = output.strip().splitlines()[-1]
            assert "is being written by pid" in last and "--wait" in last, output
            assert model not in present
    assert 0 in codes
    assert Pool(tmp_path / "pool").verify() == []


def test_two_fresh_interpreters_wait_for_each_other(base, tmp_path):
    """Real processes started from scratch, both with --wait: both models arrive."""
    root, sources = base
    shutil.copytree(root / "pool", tmp_path / "pool")
    before = pool_state(tmp_path / "pool")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = [sys.executable, str(ROOT / "tests" / "pool_faults.py"), "slow", "0", "--"]
    procs = [
        subprocess.Popen(
            [
                *script,
                "build-pool",
                f"{name}={sources[src]}",
                "--out",
                str(tmp_path / "pool"),
                "--wait",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for name, src in (("b", "llama_b"), ("g", "gpt2"))
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
    assert set(assert_intact(tmp_path / "pool", before)) == {"m", "b", "g"}
    assert Pool(tmp_path / "pool").verify() == []


def test_readers_never_see_a_half_written_manifest(base, tmp_path):
    root, sources = base
    shutil.copytree(root / "pool", tmp_path / "pool")
    errors, done = [], threading.Event()

    def read():
        while not done.is_set():
            try:
                read_manifest(tmp_path / "pool")
            except Exception as e:  # noqa: BLE001 (any failure is the finding)
                errors.append(e)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for name in ("b", "g"):
            src = sources["llama_b" if name == "b" else "gpt2"]
            build_pool([f"{name}={src}"], tmp_path / "pool")
    finally:
        done.set()
        reader.join()
    assert errors == []
    assert set(Pool(tmp_path / "pool").models) == {"m", "b", "g"}

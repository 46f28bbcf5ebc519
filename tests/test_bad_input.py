"""Bad input and environmental faults, for every command (issue 11, the general rule).

Every user error and every environmental fault exits 2 with one line that names the
problem (and the fix), no traceback, and nothing half-written: the pool is unchanged and a
new output location is not left behind. Options that do nothing say so in a note. Most
cases run in-process (click's CliRunner, tiny models); a sample runs as real
subprocesses. Full disks and read-only locations are injected as the ``OSError`` the
kernel would raise where the file is written (CI runs as root, so permissions cannot
make a location read-only).
"""

import errno
import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from pool_faults import ROOT, at_write, disk_full, make_sources, pool_state

from assy.cli import cli
from blockpool import build_pool


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A pool (llama ``m``, gpt2 ``g`` with 64 learned positions, fp32) and bad inputs."""
    root = tmp_path_factory.mktemp("bad")
    src = make_sources(root / "src")
    build_pool([f"m={src['llama']}", f"g={src['gpt2']}"], root / "pool", dtype="fp32")
    bad = root / "bad"
    bad.mkdir()
    (bad / "empty.gguf").write_bytes(b"")
    (bad / "text.gguf").write_text("not a gguf file")
    (bad / "truncated.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    weights = (src["llama"] / "model.safetensors").read_bytes()
    for name, mutate in {
        "truncated": lambda d: (d / "model.safetensors").write_bytes(weights[: len(weights) // 2]),
        "empty": lambda d: (d / "model.safetensors").write_bytes(b""),
        "json-as-safetensors": lambda d: (d / "model.safetensors").write_text('{"a": 1}'),
        "bad-config": lambda d: (d / "config.json").write_text("{"),
        "empty-config": lambda d: (d / "config.json").write_text(""),
        "bad-tokenizer": lambda d: (d / "tokenizer.json").write_text('{"version": "1.0", "tru'),
        "bad-index": lambda d: (d / "model.safetensors.index.json").write_text("{"),
        "missing-shard": lambda d: (d / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"x": "model-00002.safetensors"}})
        ),
    }.items():
        shutil.copytree(src["llama"], bad / name)
        mutate(bad / name)
    pickled = bad / "bad-pickle"
    pickled.mkdir()
    shutil.copy(src["llama"] / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_text("not a pickle")
    (root / "text.txt").write_text("\n".join(f"line {i}: some words to read" for i in range(40)))
    (root / "afile").write_text("a file, not a directory")
    long = {"context": "word " * 200, "choices": [" a", " b"], "label": 0}
    (root / "long.jsonl").write_text(json.dumps(long) + "\n")
    return {"root": root, "pool": root / "pool", "src": src, "bad": bad}


def _fill(env, args):
    paths = {
        "pool": env["pool"],
        "bad": env["bad"],
        "text": env["root"] / "text.txt",
        "file": env["root"] / "afile",
        "new": env["root"] / "new" / "out",
        "long": env["root"] / "long.jsonl",
        **env["src"],
    }
    return [str(a).format(**paths) for a in args]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_one_line_error(result, *words):
    assert result.exit_code == 2, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], lines[0]


SRC = ("build-pool",)
CASES = {
    # build-pool: sources of every format that are truncated, empty or not what they say
    "gguf empty": (SRC + ("{bad}/empty.gguf", "--out", "{new}"), ["not a GGUF file", "empty"]),
    "gguf is text": (SRC + ("{bad}/text.gguf", "--out", "{new}"), ["not a GGUF file"]),
    "gguf truncated": (SRC + ("{bad}/truncated.gguf", "--out", "{new}"), ["cannot convert"]),
    "safetensors truncated": (
        SRC + ("{bad}/truncated", "--out", "{new}"),
        ["model.safetensors", "truncated"],
    ),
    "safetensors empty": (SRC + ("{bad}/empty", "--out", "{new}"), ["not a readable safetensors"]),
    "safetensors is json": (
        SRC + ("{bad}/json-as-safetensors", "--out", "{new}"),
        ["not a readable safetensors"],
    ),
    "config not json": (SRC + ("{bad}/bad-config", "--out", "{new}"), ["config.json"]),
    "config empty": (SRC + ("{bad}/empty-config", "--out", "{new}"), ["config.json"]),
    "tokenizer truncated": (SRC + ("{bad}/bad-tokenizer", "--out", "{new}"), ["tokenizer"]),
    "index not json": (SRC + ("{bad}/bad-index", "--out", "{new}"), ["safetensors index"]),
    "index names a missing shard": (
        SRC + ("{bad}/missing-shard", "--out", "{new}"),
        ["missing", "model-00002"],
    ),
    "pickle not a pickle": (
        SRC + ("{bad}/bad-pickle", "--out", "{new}", "--allow-pickle"),
        ["pytorch_model.bin"],
    ),
    "pickle refused": (SRC + ("{bad}/bad-pickle", "--out", "{new}"), ["--allow-pickle"]),
    "source is a text file": (SRC + ("{text}", "--out", "{new}"), ["not an HF model directory"]),
    "no sources": (SRC + ("--out", "{new}"), ["SOURCES", "--help"]),
    "out is a file": (SRC + ("m={llama}", "--out", "{file}"), ["--out", "not a directory"]),
    "out under a file": (SRC + ("m={llama}", "--out", "{file}/pool"), ["not a directory"]),
    "name with a slash-free escape": (SRC + ("..={llama}", "--out", "{new}"), ["'..'"]),
    "name differs by case": (SRC + ("M={llama}", "--out", "{pool}"), ["only by letter case"]),
    # inspect, verify-pool
    "inspect a file": (("inspect", "{file}"), ["no such pool directory"]),
    "inspect no pool": (("inspect", "{bad}"), ["not a pool"]),
    "verify a file": (("verify-pool", "{file}"), ["no such pool directory"]),
    # eval
    "eval unknown model": (
        ("eval", "{pool}", "--model", "x", "--task", "perplexity", "--data", "{text}"),
        ["no model 'x'", "m"],
    ),
    "eval window over the positions": (
        ("eval", "{pool}", "--model", "g", "--task", "perplexity", "--data", "{text}"),
        ["--window 512", "64 positions", "--window 64"],
    ),
    "eval window zero": (
        ("eval", "{pool}", "--model", "m", "--task", "perplexity", "--data", "{text}")
        + ("--window", "0"),
        ["--window"],
    ),
    "eval data missing": (
        ("eval", "{pool}", "--model", "m", "--task", "perplexity", "--data", "{bad}/none"),
        ["no such file"],
    ),
    "eval data not utf-8": (
        ("eval", "{pool}", "--model", "m", "--task", "perplexity", "--data", "{bad}/empty.gguf"),
        ["empty"],
    ),
    "eval limit zero": (
        ("eval", "{pool}", "--model", "m", "--task", "piqa", "--data", "{long}", "--limit", "0"),
        ["--limit"],
    ),
    "eval bad budget": (
        ("eval", "{pool}", "--model", "m", "--task", "perplexity", "--data", "{text}")
        + ("--budget", "lots"),
        ["--budget", "4GB"],
    ),
    # generate
    "generate past the positions": (
        ("generate", "{pool}", "--model", "g", "--prompt", "hello", "--max-new-tokens", "100"),
        ["64 positions", "--max-new-tokens"],
    ),
    "generate negative temperature": (
        ("generate", "{pool}", "--model", "m", "--prompt", "hi", "--temperature", "-1"),
        ["--temperature"],
    ),
    # compare
    "compare empty model list": (
        ("compare", "{pool}", "--data", "{text}", "--out", "{new}", "--models", ","),
        ["--models is empty"],
    ),
    "compare out is a file": (
        ("compare", "{pool}", "--data", "{text}", "--out", "{file}"),
        ["--out", "not a directory"],
    ),
    "compare task and data": (
        ("compare", "{pool}", "--data", "{text}", "--task", "piqa", "--out", "{new}"),
        ["--task", "--data"],
    ),
    "compare too few texts": (
        ("compare", "{pool}", "--data", "{long}", "--out", "{new}"),
        ["at least 4"],
    ),
    "compare negative top": (
        ("compare", "{pool}", "--data", "{text}", "--out", "{new}", "--top", "-1"),
        ["--top"],
    ),
    # quantize
    "quantize no mode": (("quantize", "{pool}", "--out", "{new}"), ["--precision", "--auto"]),
    "quantize both modes": (
        ("quantize", "{pool}", "--out", "{new}", "--precision", "int8", "--auto"),
        ["--precision"],
    ),
    "quantize empty choices": (
        ("quantize", "{pool}", "--out", "{new}", "--auto", "--target-bits", "6")
        + ("--choices", ",", "--calib-data", "{text}"),
        ["--choices is empty"],
    ),
    "quantize unknown choice": (
        ("quantize", "{pool}", "--out", "{new}", "--auto", "--target-bits", "6")
        + ("--choices", "int3", "--calib-data", "{text}"),
        ["--choices", "int3"],
    ),
    "quantize empty model": (
        ("quantize", "{pool}", "--out", "{new}", "--precision", "int8", "--model", ""),
        ["--model is empty"],
    ),
    "quantize into its source": (
        ("quantize", "{pool}", "--out", "{pool}", "--precision", "int8"),
        ["source pool"],
    ),
    "quantize out is a file": (
        ("quantize", "{pool}", "--out", "{file}", "--precision", "int8"),
        ["--out", "not a directory"],
    ),
    "quantize cache-dir is a file": (
        ("quantize", "{pool}", "--out", "{new}", "--auto", "--target-bits", "6")
        + ("--cache-dir", "{file}", "--calib-data", "{text}"),
        ["--cache-dir", "not a directory"],
    ),
    "quantize screen zero": (
        ("quantize", "{pool}", "--out", "{new}", "--auto", "--target-bits", "6")
        + ("--screen", "0"),
        ["--screen"],
    ),
    # prune
    "prune bad name": (
        ("prune", "{pool}", "--model", "m", "--method", "magnitude", "--sparsity", "0.5")
        + ("--as", "a/b"),
        ["--as 'a/b'"],
    ),
    "prune taken name": (
        ("prune", "{pool}", "--model", "m", "--method", "magnitude", "--sparsity", "0.5")
        + ("--as", "g"),
        ["--as", "already"],
    ),
    "prune bad sparsity": (
        ("prune", "{pool}", "--model", "m", "--method", "magnitude", "--sparsity", "1.5")
        + ("--as", "p"),
        ["--sparsity 1.5"],
    ),
    "prune windows over the positions": (
        ("prune", "{pool}", "--model", "g", "--method", "wanda", "--sparsity", "0.5")
        + ("--as", "p", "--calib-data", "{text}", "--seq-len", "100"),
        ["64 positions", "--seq-len 64"],
    ),
    "prune two calibration sources": (
        ("prune", "{pool}", "--model", "m", "--method", "wanda", "--sparsity", "0.5")
        + ("--as", "p", "--calib-data", "{text}", "--calib-task", "piqa"),
        ["--calib-task", "--calib-data"],
    ),
    "prune batch size zero": (
        ("prune", "{pool}", "--model", "m", "--method", "wanda", "--sparsity", "0.5")
        + ("--as", "p", "--batch-size", "0"),
        ["--batch-size"],
    ),
    # stitch: refused before any state is computed, no assembly directory left
    "stitch samples zero": (
        ("stitch", "{pool}", "--anchor", "m", "--replace", "0-0", "--insert", "")
        + ("--data", "{text}", "--samples", "0", "--out", "{new}"),
        ["--samples"],
    ),
    "stitch unknown model": (
        ("stitch", "{pool}", "--anchor", "m", "--replace", "0-0", "--insert", "nope:0-0")
        + ("--data", "{text}", "--out", "{new}"),
        ["nope"],
    ),
    "stitch layers out of range": (
        ("stitch", "{pool}", "--anchor", "m", "--replace", "0-40", "--insert", "")
        + ("--data", "{text}", "--out", "{new}"),
        ["0-40"],
    ),
    "stitch replace without insert": (
        ("stitch", "{pool}", "--anchor", "m", "--replace", "0-0", "--data", "{text}")
        + ("--out", "{new}"),
        ["--insert"],
    ),
    "stitch out is a file": (
        ("stitch", "{pool}", "--anchor", "m", "--replace", "0-0", "--insert", "")
        + ("--data", "{text}", "--out", "{file}"),
        ["afile"],
    ),
    # assemble: refused before anything is fitted or written
    "assemble budget below the minimum": (
        ("assemble", "{pool}", "--budget", "1KB", "--data", "{text}", "--out", "{new}"),
        ["--budget", "smallest runnable assembly", "or more"],
    ),
    "assemble unparseable budget": (
        ("assemble", "{pool}", "--budget", "4 gigs", "--dry-run"),
        ["cannot read size"],
    ),
    "assemble negative max seams": (
        ("assemble", "{pool}", "--budget", "1GB", "--max-seams", "-1", "--dry-run"),
        ["--max-seams"],
    ),
    "assemble no data to fit": (
        ("assemble", "{pool}", "--budget", "1GB", "--out", "{new}"),
        ["--data", "--task"],
    ),
    "assemble out is a file": (
        ("assemble", "{pool}", "--budget", "1GB", "--data", "{text}", "--out", "{file}"),
        ["afile"],
    ),
    # finetune: names checked before training
    "finetune bad name": (
        ("finetune", "{pool}", "--model", "m", "--data", "{text}", "--as", "a/b"),
        ["--as 'a/b'"],
    ),
    "finetune taken name": (
        ("finetune", "{pool}", "--model", "m", "--data", "{text}", "--as", "g"),
        ["--as", "g"],
    ),
    "finetune unknown model": (
        ("finetune", "{pool}", "--model", "nope", "--data", "{text}", "--as", "x"),
        ["nope"],
    ),
    # lm-eval: the model arguments are checked before lm-eval starts
    "lm-eval no pool": (
        (
            "lm-eval",
            "--model",
            "assy",
            "--model_args",
            "pool={bad}/none,model=m",
            "--tasks",
            "piqa",
        ),
        ["no such pool directory"],
    ),
    "lm-eval unknown model": (
        ("lm-eval", "--model", "assy", "--model_args=pool={pool},model=x", "--tasks", "piqa"),
        ["no model 'x'"],
    ),
    "lm-eval no model": (
        ("lm-eval", "--model", "assy", "--model_args", "pool={pool}", "--tasks", "piqa"),
        ["model=NAME"],
    ),
    "lm-eval bad budget": (
        ("lm-eval", "--model", "assy", "--model_args", "pool={pool},model=m,budget=lots"),
        ["lots"],
    ),
    # federate: refused before any engine starts or anything is written
    "federate assy without adapter rounds": (
        ("federate", "{pool}", "--task", "arc_easy", "--method", "assy", "--rounds", "1")
        + ("--out", "{new}"),
        ["--method assy runs 1 selection round(s)", "--rounds more than 1"],
    ),
    "federate out is a file": (
        ("federate", "{pool}", "--task", "arc_easy", "--method", "fedit", "--rounds", "1")
        + ("--out", "{file}", "--data", "{long}"),
        ["--out", "is a file"],
    ),
    "federate data missing": (
        ("federate", "{pool}", "--task", "arc_easy", "--method", "fedit", "--rounds", "1")
        + ("--out", "{new}", "--data", "{bad}/none"),
        ["no such file"],
    ),
    "federate data too small to split": (
        ("federate", "{pool}", "--task", "arc_easy", "--method", "fedit", "--rounds", "1")
        + ("--out", "{new}", "--data", "{long}"),
        ["need at least 2"],
    ),
    "federate data not json lines": (
        ("federate", "{pool}", "--task", "arc_easy", "--method", "fedit", "--rounds", "1")
        + ("--out", "{new}", "--data", "{text}"),
        ["text.txt:1", "not valid JSON"],
    ),
    # demo: refused before it builds anything
    "demo limit zero": (("demo", "--limit", "0", "--out", "{new}"), ["--limit"]),
    "demo out is a file": (("demo", "--out", "{file}"), ["--out", "not a directory"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_on_one_line_and_writes_nothing(env, case):
    args, words = CASES[case]
    before = pool_state(env["pool"])
    assert_one_line_error(run(*_fill(env, args)), *words)
    assert pool_state(env["pool"]) == before
    assert not (env["root"] / "new").exists()
    assert not list(env["pool"].rglob("*.assy-tmp"))


def test_every_command_has_bad_input_cases():
    from assy.cli import cli as group

    covered = {args[0] for args, _ in CASES.values()}
    assert covered == set(group.commands), set(group.commands) - covered


# ------------------------------------------------------------ options that do nothing


@pytest.mark.parametrize(
    "args, note",
    [
        (
            ("quantize", "{pool}", "--out", "{new}", "--precision", "int8", "--screen", "0.5"),
            "--screen does nothing here",
        ),
        (
            ("prune", "{pool}", "--model", "m", "--method", "magnitude", "--sparsity", "0.5")
            + ("--as", "m50", "--samples", "8"),
            "--samples does nothing here",
        ),
        (
            ("eval", "{pool}", "--model", "m", "--task", "perplexity", "--data", "{text}")
            + ("--limit", "3", "--swap-policy", "lru"),
            "--limit does nothing here",
        ),
        (("verify-pool", "{pool}", "--wait"), "--wait does nothing here"),
    ],
    ids=["quantize", "prune", "eval", "verify-pool"],
)
def test_options_that_do_nothing_say_so(env, tmp_path, args, note):
    pool = tmp_path / "pool"
    shutil.copytree(env["pool"], pool)
    filled = [a.replace(str(env["pool"]), str(pool)) for a in _fill(env, args)]
    filled = [a.replace(str(env["root"] / "new"), str(tmp_path / "new")) for a in filled]
    result = run(*filled)
    assert result.exit_code == 0, result.output
    assert note in result.output


def test_a_too_small_budget_is_refused_before_calibration(env, tmp_path, monkeypatch):
    import blockpool.quant.plan

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibrated before checking the budget")

    monkeypatch.setattr(blockpool.quant.plan, "measure_blocks", no_calibration)
    out = tmp_path / "q"
    result = run(
        *("quantize", env["pool"], "--out", out, "--auto", "--pool-budget", "1KB"),
        *("--calib-data", env["root"] / "text.txt", "--calib-samples", "2"),
    )
    assert_one_line_error(result, "below the smallest plan")
    assert not out.exists()


def test_learned_positions_are_capped_where_inputs_are_cut(env, tmp_path):
    """Multiple choice cuts long contexts from the left; compare caps tokens per text."""
    result = run(
        *(
            "eval",
            env["pool"],
            "--model",
            "g",
            "--task",
            "piqa",
            "--data",
            env["root"] / "long.jsonl",
        )
    )
    assert result.exit_code == 0, result.output
    result = run(
        *("compare", env["pool"], "--data", env["root"] / "text.txt", "--out", tmp_path / "c"),
        *("--max-tokens", "500", "--samples", "8", "--json"),
    )
    assert result.exit_code == 0, result.output
    caps = {c["model"]: c["max_tokens"] for c in json.loads(result.stdout)["cache"]}
    assert caps == {"m": 500, "g": 64}


# ---------------------------------------------------------------- environmental faults


@contextmanager
def read_only(root: Path):
    """Make ``root`` (and what is below it) refuse writes as a read-only mount would."""
    real_open, real_mkdir, real_replace = os.open, os.mkdir, os.replace
    root = str(root.resolve())

    def inside(path) -> bool:
        return os.path.abspath(os.fspath(path)).startswith(root)

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

    def open_(path, flags, *a, **kw):
        if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_open(path, flags, *a, **kw)

    def mkdir(path, *a, **kw):
        if inside(path) and not os.path.isdir(path):
            refuse(path)
        return real_mkdir(path, *a, **kw)

    def replace(src, dst, *a, **kw):
        if inside(dst):
            refuse(dst)
        return real_replace(src, dst, *a, **kw)

    os.open, os.mkdir, os.replace = open_, mkdir, replace
    try:
        yield
    finally:
        os.open, os.mkdir, os.replace = real_open, real_mkdir, real_replace


WRITERS = {
    "build-pool": ("build-pool", "b={llama_b}", "--out", "{target}"),
    "quantize": ("quantize", "{target}", "--out", "{target}/../q", "--precision", "int8"),
    "prune": ("prune", "{target}", "--model", "m", "--method", "magnitude", "--sparsity", "0.5")
    + ("--as", "m50"),
    "verify-pool --rehash": ("verify-pool", "{target}", "--rehash"),
    "finetune": ("finetune", "{target}", "--model", "m", "--data", "{text}", "--as", "m2")
    + ("--steps", "1", "--seq-len", "32", "--batch-size", "1"),
    "compare": (
        "compare",
        "{target}",
        "--data",
        "{text}",
        "--out",
        "{target}/cmp",
        "--samples",
        "8",
    ),
}


@pytest.mark.parametrize("fault", ["disk full", "read-only"])
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_environmental_faults_exit_2_and_leave_the_pool_as_it_was(env, tmp_path, writer, fault):
    target = tmp_path / "target"
    shutil.copytree(env["pool"], target)
    before = pool_state(target)
    args = [a.format(target=target) if "{target}" in a else a for a in WRITERS[writer]]
    args = _fill(env, args)
    inject = at_write(1, disk_full) if fault == "disk full" else read_only(tmp_path)
    with inject:
        result = run(*args)
    words = ["disk is full"] if fault == "disk full" else ["read-only"]
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and lines and lines[-1].startswith("error: "), result.output
    assert all(w in lines[-1] for w in words) and "Traceback" not in result.output
    assert pool_state(target) == before
    assert not list(tmp_path.rglob("*.assy-tmp")) and not (tmp_path / "q" / "pool.json").exists()


# --------------------------------------------------------------- real subprocesses


def test_a_sample_as_real_subprocesses(env, tmp_path):
    samples = [
        ("build-pool", "{bad}/truncated", "--out", "{new}"),
        ("eval", "{pool}", "--model", "g", "--task", "perplexity", "--data", "{text}"),
        ("quantize", "{pool}", "--out", "{file}", "--precision", "int8"),
    ]
    environ = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "assy.cli", *_fill(env, args)],
            env=environ,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for args in samples
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        lines = err.decode().strip().splitlines()
        assert proc.returncode == 2, err.decode()
        assert len(lines) == 1 and lines[0].startswith("error: "), err.decode()
        assert out == b""
    assert not (env["root"] / "new").exists()


def test_torch_is_left_alone(env):
    """(the in-process cases above change no global torch state)"""
    assert torch.get_default_dtype() == torch.float32

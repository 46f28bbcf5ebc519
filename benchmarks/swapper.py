"""Swapper benchmark: a model larger than its budget, policy by policy, against accelerate.

Reproduce (about 10 minutes on a 2-core CPU machine):

    .venv/bin/python benchmarks/swapper.py --out results/swapper.json

For SmolLM2-135M and Gemma-3-270M (an fp32 pool, so pool bytes = bytes in memory), runs
prefill (batch 4 x 256 tokens) and decode (greedy, a KV cache) at budgets of 100 / 50 / 25%
of the model's pool bytes with the policies on-demand, lru, prefetch and prefetch+preswap,
and accelerate's disk offload (``device_map`` + ``max_memory`` + ``offload_folder``) at
the same budgets as the anchor, all in the same run. Block files are dropped from the page
cache (``posix_fadvise(DONTNEED)``) before every timed pass, so reads are real I/O.

The ideal bound of a pass is max(compute-only time, read-only time), where compute-only is
a pass with every block resident and warm, and read-only is the time to read (and verify,
deserialize) the bytes that must be read per pass in steady state: the model's bytes less
the budget, once per forward call of the pass (decode makes one per token). Each policy's ratio to that bound is reported. Last, peak RSS of ``assy eval
--task perplexity`` with and without ``--budget`` (35% of the model's bytes) is measured
with ``/usr/bin/time -v`` in fresh processes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import drop_page_cache

from blockpool import BlockRunner, Pool, RunOptions, build_pool, open_runner
from blockpool.offload import block_nbytes
from blockpool.session import use_threads
from blockpool.sizes import format_size
from blockpool.swapper import POLICIES

MODELS = ("smollm2-135m", "gemma3-270m")
FRACTIONS = (1.0, 0.5, 0.25)


def pool_files(pool: Pool, model: str) -> list[Path]:
    return [pool.path(b) for b in pool.model(model).blocks]


def prefill_pass(runner, ids: torch.Tensor) -> None:
    runner(ids)


def decode_pass(runner, prompt: torch.Tensor, new_tokens: int) -> None:
    out = runner.forward(prompt, use_cache=True)
    for _ in range(new_tokens):
        token = out.logits[:, -1:].argmax(-1)
        out = runner.forward(token, past_key_values=out.past_key_values, use_cache=True)


def timed(fn, files: list[Path], repeat: int) -> float:
    """Mean seconds of ``fn`` over ``repeat`` passes, each from a cold page cache."""
    total = 0.0
    for _ in range(repeat):
        drop_page_cache(files)
        start = time.perf_counter()
        fn()
        total += time.perf_counter() - start
    return total / repeat


def read_all_seconds(pool: Pool, model: str) -> float:
    """Cold read + verify + deserialize + cast of every block once (no compute)."""
    files = pool_files(pool, model)
    drop_page_cache(files)
    start = time.perf_counter()
    for b in pool.model(model).blocks:
        pool.build_module(b, fresh=True)
    return time.perf_counter() - start


def accelerate_runner(path: Path, budget: int, offload: Path):
    """transformers + accelerate disk offload within ``budget`` CPU bytes."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=torch.float32,
        device_map="auto",
        max_memory={"cpu": budget},
        offload_folder=str(offload),
        offload_state_dict=True,
    ).eval()

    class Runner:
        def __call__(self, ids):
            with torch.inference_mode():
                return model(input_ids=ids).logits

        def forward(self, ids, past_key_values=None, use_cache=False):
            with torch.inference_mode():
                return model(input_ids=ids, past_key_values=past_key_values, use_cache=use_cache)

    return Runner(), sorted(offload.rglob("*.dat"))


def forwards_per_pass(workload: str) -> int:
    """Forward calls in one pass: 1 for prefill, prompt + one per new token for decode."""
    return int(workload.split()[1]) + 1 if workload.startswith("decode") else 1


def bench_model(pool: Pool, name: str, args, workloads: dict) -> list[dict[str, Any]]:
    total = sum(block_nbytes(pool, b, torch.float32) for b in pool.model(name).blocks)
    files = pool_files(pool, name)
    resident = BlockRunner(pool, name)
    rows = []
    read_all = read_all_seconds(pool, name)
    for wl, fn in workloads.items():
        fn(resident)  # build every block, warm up
        compute = timed(lambda fn=fn: fn(resident), [], args.repeat)
        for frac in FRACTIONS:
            budget = int(total * frac)
            # every forward of the pass must re-read what does not fit (steady state)
            read_bound = read_all * max(0.0, 1.0 - frac) * forwards_per_pass(wl)
            bound = max(compute, read_bound)
            for policy in POLICIES + ("accelerate",):
                row = {
                    "model": name,
                    "workload": wl,
                    "budget_fraction": frac,
                    "budget_bytes": budget,
                    "policy": policy,
                    "compute_seconds": compute,
                    "read_bound_seconds": read_bound,
                    "bound_seconds": bound,
                }
                try:
                    row |= run_policy(pool, name, policy, budget, fn, files, args)
                    row["ratio_to_bound"] = row["seconds"] / bound
                    row["status"] = "ok"
                except Exception as e:  # noqa: BLE001 - recorded in the result, the run goes on
                    row |= {"status": "error", "error_msg": f"{type(e).__name__}: {e}"}
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
    return rows


def run_policy(pool, name, policy, budget, fn, files, args) -> dict[str, Any]:
    if policy == "accelerate":
        from blockpool.sources import open_source

        with open_source(name) as src, tempfile.TemporaryDirectory(dir=args.work) as tmp:
            runner, dats = accelerate_runner(src.path, budget, Path(tmp))
            fn(runner)  # warm-up pass
            return {"seconds": timed(lambda: fn(runner), dats + files, args.repeat)}
    options = RunOptions(budget=budget, policy=policy, threads=args.threads)
    with open_runner(pool, name, options) as run:
        fn(run.runner)  # warm-up pass: fills the cache as a steady state would
        run.swapper.reset_stats()
        seconds = timed(lambda: fn(run.runner), files, args.repeat)
    return {"seconds": seconds, **run.report}


def rss_check(pool_dir: Path, name: str, total: int, text: Path) -> dict[str, Any]:
    """Peak RSS of assy eval --task perplexity, unbudgeted vs a 35% budget."""
    budget = int(0.35 * total)
    result = {"model": name, "model_bytes": total, "budget_bytes": budget}
    for label, extra in (("unbudgeted", []), ("budget_35", ["--budget", str(budget)])):
        cmd = [
            "/usr/bin/time",
            "-v",
            sys.executable,
            "-m",
            "assy.cli",
            "eval",
            str(pool_dir),
            "--model",
            name,
            "--task",
            "perplexity",
            "--data",
            str(text),
            "--max-tokens",
            "1024",
            "--window",
            "256",
            "--json",
            *extra,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
        result[f"{label}_peak_rss_bytes"] = kib * 1024
        result[f"{label}_perplexity"] = json.loads(proc.stdout.strip().splitlines()[-1])[
            "perplexity"
        ]
    drop = result["unbudgeted_peak_rss_bytes"] - result["budget_35_peak_rss_bytes"]
    result["rss_drop_bytes"] = drop
    result["required_drop_bytes"] = (total - budget) // 2
    result["met"] = drop >= result["required_drop_bytes"]
    return result


def markdown(rows: list[dict], rss: list[dict]) -> str:
    lines = [
        "| model | workload | budget | policy | s/pass | tok/s | bound s | ratio | hidden I/O | read |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(
                f"| {r['model']} | {r['workload']} | {r['budget_fraction']:.0%} | "
                f"{r['policy']} | error: {r['error_msg'][:60]} | | | | | |"
            )
            continue
        hidden = f"{r['io_hidden_fraction']:.0%}" if "io_hidden_fraction" in r else ""
        read = format_size(r["bytes_read"]) if r.get("bytes_read") else ""
        lines.append(
            f"| {r['model']} | {r['workload']} | {r['budget_fraction']:.0%} | {r['policy']} | "
            f"{r['seconds']:.2f} | {r['tokens'] / r['seconds']:.1f} | {r['bound_seconds']:.2f} | "
            f"{r['ratio_to_bound']:.2f} | {hidden} | {read} |"
        )
    lines += [
        "",
        "| model | model bytes | budget | peak RSS unbudgeted | peak RSS at budget | drop | "
        "required drop | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rss:
        lines.append(
            f"| {r['model']} | {format_size(r['model_bytes'])} | {format_size(r['budget_bytes'])} | "
            f"{format_size(r['unbudgeted_peak_rss_bytes'])} | {format_size(r['budget_35_peak_rss_bytes'])} | "
            f"{format_size(r['rss_drop_bytes'])} | {format_size(r['required_drop_bytes'])} | {r['met']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/swapper.json"))
    parser.add_argument("--work", type=Path, default=Path("work/bench-swapper"))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, help="torch threads (default: the idle cores)")
    args = parser.parse_args()
    args.threads = use_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    models = args.models.split(",")
    pool_dir = args.work / "pool32"
    build_pool(models, pool_dir, dtype="fp32")
    pool = Pool(pool_dir)
    g = torch.Generator().manual_seed(0)
    prefill_ids = torch.randint(100, 20000, (4, 256), generator=g)
    prompt = torch.randint(100, 20000, (1, 16), generator=g)
    workloads = {
        "prefill 4x256": lambda r: prefill_pass(r, prefill_ids),
        f"decode {args.decode_tokens}": lambda r: decode_pass(r, prompt, args.decode_tokens),
    }
    tokens = {"prefill 4x256": 4 * 256, f"decode {args.decode_tokens}": args.decode_tokens}
    start = time.perf_counter()
    rows = []
    for name in models:
        for row in bench_model(pool, name, args, workloads):
            rows.append(row | {"tokens": tokens[row["workload"]]})
    text = args.work / "heldout.txt"
    from assy.data import heldout_text

    text.write_text(heldout_text(20_000))
    rss = [
        rss_check(
            pool_dir,
            n,
            sum(block_nbytes(pool, b, torch.float32) for b in pool.model(n).blocks),
            text,
        )
        for n in models
    ]
    result = {
        "benchmark": "swapper",
        "config": vars(args) | {"out": str(args.out), "work": str(args.work)},
        "git_sha": subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "wall_seconds": time.perf_counter() - start,
        "rows": rows,
        "rss": rss,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    table = markdown(rows, rss)
    args.out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

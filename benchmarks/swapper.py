"""Swapper benchmark: does a budgeted run keep its budget, and how close to the disk is it?

Reproduce (the default matrix takes a few hours on a 2-core CPU machine; ``--repeat 1
--fractions 0.25,0.5`` about an hour):

    .venv/bin/python benchmarks/swapper.py --out results/swapper.json

For SmolLM2-135M and Gemma-3-270M in an fp32 pool (pool bytes = bytes in memory, tied
weights counted once), at budgets of 25 / 35 / 50% of those bytes, two workloads:
``prefill`` (one sequence of ``--prefill-tokens`` 2048, logits at its last position, no KV
cache kept: 2,048 tokens of SmolLM2's cache alone take 94 MB, most of a 25% budget) and
``decode`` (a 16-token prompt, then ``--decode-tokens`` 16 greedy tokens with a KV cache).
Methods: the swapper's policies and accelerate's disk offload (``device_map="auto"``,
``max_memory={"cpu": budget}``, ``offload_folder``), plus each model resident (ours and
transformers') for the compute bound and the unbudgeted memory.

Every case runs in a fresh process. Its *warm floor* is measured first, as DESIGN.md's
budget contract defines it: torch, transformers and assy imported and one tiny forward of a
random model of the same family run. Then the page cache is dropped before every forward
call (the weight files of that method: pool blocks or accelerate's offload files), so
every re-read is real I/O, and the workload is timed. Reported per case: wall seconds,
peak RSS over the floor (``VmHWM`` after ``clear_refs``), bytes read from storage
(``/proc/self/io``), and the swapper's counters. Cases are interleaved (every method of a
(model, workload, budget) in a rotated order per repetition) and medians are reported.

The bound of a case is max(resident compute time, bytes that must be read / the sequential
read bandwidth of the pool's own block files, measured with ``dd bs=4M`` after dropping the
page cache): the bytes that must be read are the model once plus, for each later forward
call, what does not fit in the budget (model bytes - budget). ``dd`` of a freshly written
1 GiB file is measured too and reported beside it (on a VM, storage below the guest may
still cache a file just written, so it can read several times faster than the files a run
reads). A baseline that cannot run a case (accelerate placing everything on disk) is
reported as such, not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("prefetch+preswap", "prefetch", "lru", "on-demand")


# --------------------------------------------------------------------------- worker


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def _drop(files: list[Path]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _workload(forward, kind: str, args, drop) -> float:
    """Time the workload; ``forward(ids, cache, use_cache)`` -> (last logits [*, V], cache)."""
    import torch

    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    if kind == "prefill":  # the pass alone, no KV cache kept (it would not fit at 25%)
        ids = torch.randint(100, 20000, (1, args.prefill_tokens), generator=g)
        drop()
        forward(ids, None, False)
    else:
        ids = torch.randint(100, 20000, (1, 16), generator=g)
        drop()
        logits, cache = forward(ids, None, True)
        for _ in range(args.decode_tokens):
            token = logits[-1:].argmax(-1).view(1, 1)
            drop()
            logits, cache = forward(token, cache, True)
    return time.perf_counter() - start


def worker(case: dict[str, Any]) -> dict[str, Any]:
    """Run one case in this (fresh) process and return its measurements."""
    import torch

    torch.set_num_threads(case["threads"])
    import transformers

    import assy  # noqa: F401 - part of the warm floor
    from assy.assembly.measure import tiny_config
    from blockpool import Pool, RunOptions, open_runner

    pool = Pool(case["pool"])
    model = case["model"]
    tiny = transformers.AutoModelForCausalLM.from_config(
        tiny_config(dict(pool.model(model).config))
    )
    with torch.inference_mode():
        tiny(input_ids=torch.ones(1, 4, dtype=torch.long))
    del tiny
    floor = _status("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")
    read0 = _read_bytes()
    args = argparse.Namespace(**case)
    method, budget = case["method"], case["budget"]
    result: dict[str, Any] = {"floor_rss_bytes": floor}
    files = [pool.path(b) for b in pool.model(model).blocks]
    if method in ("accelerate", "transformers"):
        from blockpool.sources import open_source

        with (
            open_source(model, progress=False) as src,
            tempfile.TemporaryDirectory(dir=case["work"]) as tmp,
        ):
            kw: dict[str, Any] = {"dtype": torch.float32}
            if method == "accelerate":
                kw |= {"device_map": "auto", "max_memory": {"cpu": budget}}
                kw |= {"offload_folder": tmp, "offload_state_dict": True}
            hf = transformers.AutoModelForCausalLM.from_pretrained(src.path, **kw).eval()
            placement = set(getattr(hf, "hf_device_map", {"": "cpu"}).values())
            if method == "accelerate" and "cpu" not in placement:
                return result | {
                    "status": "cannot run",
                    "error_msg": f"accelerate placed every module on {sorted(placement)} "
                    "(it cannot fit the tied embedding and head within the budget)",
                }
            # what accelerate reads weights from: its offload files and the checkpoint itself
            dats = sorted(Path(tmp).rglob("*.dat")) + sorted(Path(src.path).glob("*.safetensors"))
            result["placement"] = sorted(str(p) for p in placement)

            def forward(ids, cache, use_cache):
                with torch.inference_mode():
                    out = hf(
                        input_ids=ids, past_key_values=cache, use_cache=use_cache, logits_to_keep=1
                    )
                return out.logits[:, -1], out.past_key_values

            Path("/proc/self/clear_refs").write_text("5")
            read0 = _read_bytes()
            result["seconds"] = _workload(forward, case["workload"], args, lambda: _drop(dats))
    else:
        options = RunOptions(
            budget=None if method == "resident" else budget,
            policy="prefetch+preswap" if method == "resident" else method,
            threads=case["threads"],
        )
        with open_runner(pool, model, options) as run:
            runner = run.runner

            def forward(ids, cache, use_cache):
                at = torch.zeros_like(ids, dtype=torch.bool)
                at[:, -1] = True
                out = runner.forward(ids, past_key_values=cache, use_cache=use_cache, logits_at=at)
                return out.logits, out.past_key_values

            if method == "resident":  # the compute bound: warm, nothing read
                _workload(forward, case["workload"], args, lambda: None)
                Path("/proc/self/clear_refs").write_text("5")
                read0 = _read_bytes()
                result["seconds"] = _workload(forward, case["workload"], args, lambda: None)
            else:
                result["seconds"] = _workload(forward, case["workload"], args, lambda: _drop(files))
        result |= {k: v for k, v in run.report.items() if k != "peak_rss_bytes"}
    result["peak_over_floor_bytes"] = _status("VmHWM:") - floor
    result["storage_read_bytes"] = _read_bytes() - read0
    return result | {"status": "ok"}


# --------------------------------------------------------------------------- driver


def files_bandwidth(files: list[Path], tries: int = 3) -> float:
    """Sequential read bandwidth (bytes/s) of the pool's own block files: ``dd bs=4M`` of
    each, page cache dropped first, best of ``tries`` (the bytes a run must read come from
    these files, wherever the storage put them)."""
    best = 0.0
    for _ in range(tries):
        _drop(files)
        start, total = time.perf_counter(), 0
        for f in files:
            subprocess.run(
                ["dd", f"if={f}", "of=/dev/null", "bs=4M"], check=True, capture_output=True
            )
            total += f.stat().st_size
        best = max(best, total / (time.perf_counter() - start))
    return best


def disk_bandwidth(work: Path, tries: int = 3) -> float:
    """Sequential read bandwidth (bytes/s) of the disk under ``work``: the best of ``tries``
    dd reads of a 1 GiB file after dropping it from the page cache (the best: a bound)."""
    path = work / "dd.bin"
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={path}", "bs=4M", "count=256", "oflag=direct"],
        check=True,
        capture_output=True,
    )
    best = 0.0
    for _ in range(tries):
        _drop([path])
        proc = subprocess.run(
            ["dd", f"if={path}", "of=/dev/null", "bs=4M"],
            check=True,
            capture_output=True,
            text=True,
        )
        match = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", proc.stderr)
        best = max(best, int(match.group(1)) / float(match.group(2)))
    path.unlink()
    return best


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(case)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        return {"status": "error", "error_msg": proc.stderr.strip().splitlines()[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get("status") == "ok" and r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize(
    runs: list[dict], model_bytes: dict[str, int], bandwidth: float, args, fresh: float = 0.0
) -> list[dict[str, Any]]:
    """Medians per case, with the bound, the ratio to accelerate and the budget check."""
    rows = []
    keys = sorted({(r["model"], r["workload"], r["fraction"], r["method"]) for r in runs})
    compute = {
        (r["model"], r["workload"]): _median(
            [
                x
                for x in runs
                if (x["model"], x["workload"], x["method"])
                == (r["model"], r["workload"], "resident")
            ],
            "seconds",
        )
        for r in runs
    }
    for model, workload, fraction, method in keys:
        group = [
            r
            for r in runs
            if (r["model"], r["workload"], r["fraction"], r["method"])
            == (model, workload, fraction, method)
        ]
        size = model_bytes[model]
        budget = int(fraction * size) if fraction else None
        calls = 1 if workload == "prefill" else 1 + args.decode_tokens
        must_read = size + (calls - 1) * max(0, size - (budget or size))
        bound = max(compute.get((model, workload)) or 0.0, must_read / bandwidth)
        row: dict[str, Any] = {
            "model": model,
            "workload": workload,
            "fraction": fraction,
            "budget_bytes": budget,
            "method": method,
            "runs": len(group),
            "status": "ok" if all(r["status"] == "ok" for r in group) else group[0]["status"],
            "error_msg": next((r.get("error_msg") for r in group if r["status"] != "ok"), None),
            "seconds": _median(group, "seconds"),
            "peak_over_floor_bytes": _median(group, "peak_over_floor_bytes"),
            "storage_read_bytes": _median(group, "storage_read_bytes"),
            "io_hidden_fraction": _median(group, "io_hidden_fraction"),
            "weights_resident_peak_bytes": _median(group, "weights_resident_peak_bytes"),
            "bound_seconds": bound,
            "bound_fresh_file_seconds": max(
                compute.get((model, workload)) or 0.0, must_read / (fresh or bandwidth)
            ),
        }
        if row["seconds"] is not None:
            row["ratio_to_bound"] = row["seconds"] / bound if bound else None
        if budget and row["peak_over_floor_bytes"] is not None:
            allowed = budget + max(0.1 * budget, 32e6)
            row["within_budget"] = row["peak_over_floor_bytes"] <= allowed
        rows.append(row)
    for row in rows:  # speed-up over accelerate at the same budget
        ref = next(
            (
                r
                for r in rows
                if r["method"] == "accelerate"
                and r["status"] == "ok"
                and (r["model"], r["workload"], r["fraction"])
                == (row["model"], row["workload"], row["fraction"])
            ),
            None,
        )
        if ref and row["seconds"]:
            row["speedup_vs_accelerate"] = ref["seconds"] / row["seconds"]
    return rows


def markdown(rows: list[dict], bandwidth: float, fresh: float = 0.0) -> str:
    from blockpool.sizes import format_size

    lines = [
        f"Sequential read bandwidth (dd bs=4M, page cache dropped): the pool's block files "
        f"{bandwidth / 1e6:.0f} MB/s (the bound's); a freshly written 1 GiB file "
        f"{fresh / 1e6:.0f} MB/s (`bound_fresh_file_seconds` in the JSON; storage below this VM may "
        "still cache a file just written).",
        "",
        "| model | workload | budget | method | s | bound s | ratio | × accelerate | "
        "peak RSS − floor | within | hidden I/O | read |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        budget = (
            f"{r['fraction']:.0%} ({format_size(r['budget_bytes'])})" if r["fraction"] else "none"
        )
        if r["status"] != "ok":
            lines.append(
                f"| {r['model']} | {r['workload']} | {budget} | {r['method']} | "
                f"{r['status']}: {(r['error_msg'] or '')[:90]} | | | | | | | |"
            )
            continue

        def fmt(key, spec, r=r):
            return format(r[key], spec) if r.get(key) is not None else ""

        within = {True: "yes", False: "**no**"}.get(r.get("within_budget"), "")
        lines.append(
            f"| {r['model']} | {r['workload']} | {budget} | {r['method']} | {fmt('seconds', '.2f')} | "
            f"{fmt('bound_seconds', '.2f')} | {fmt('ratio_to_bound', '.2f')} | "
            f"{fmt('speedup_vs_accelerate', '.2f')} | {format_size(r['peak_over_floor_bytes'])} | "
            f"{within} | {fmt('io_hidden_fraction', '.0%')} | "
            f"{format_size(r['storage_read_bytes'] or 0)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("results/swapper.json"))
    parser.add_argument("--work", type=Path, default=Path("work/bench-swapper"))
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--fractions", default="0.25,0.35,0.5")
    parser.add_argument("--workloads", default="decode,prefill")
    parser.add_argument("--methods", default="prefetch+preswap,lru,accelerate")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--prefill-tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    from blockpool import Pool, build_pool

    args.work.mkdir(parents=True, exist_ok=True)
    models = args.models.split(",")
    pool_dir = args.work / "pool32"
    build_pool(models, pool_dir, dtype="fp32")
    pool = Pool(pool_dir)
    model_bytes = {m: sum(pool.blocks[b].bytes for b in pool.model(m).blocks) for m in models}
    fresh = disk_bandwidth(args.work)
    bandwidth = files_bandwidth([pool.path(b) for m in models for b in pool.model(m).blocks])
    start = time.perf_counter()
    runs = []
    base = {k: getattr(args, k) for k in ("decode_tokens", "prefill_tokens", "threads")}
    base |= {"pool": str(pool_dir.resolve()), "work": str(args.work.resolve())}
    methods = args.methods.split(",")
    for rep in range(args.repeat):
        for model in models:
            for workload in args.workloads.split(","):
                cases = [(0.0, "resident"), (0.0, "transformers")]
                cases += [(float(f), m) for f in args.fractions.split(",") for m in methods]
                shift = rep % len(cases)
                for fraction, method in cases[shift:] + cases[:shift]:
                    budget = int(fraction * model_bytes[model]) if fraction else None
                    case = base | {"model": model, "workload": workload, "method": method}
                    case |= {"budget": budget}
                    row = run_case(case) | {"model": model, "workload": workload}
                    row |= {"fraction": fraction, "method": method, "rep": rep}
                    print(json.dumps(row), file=sys.stderr, flush=True)
                    runs.append(row)
    rows = summarize(runs, model_bytes, bandwidth, args, fresh)
    result = {
        "benchmark": "swapper",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "git_sha": subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "disk_bandwidth_bytes_per_s": bandwidth,
        "fresh_file_bandwidth_bytes_per_s": fresh,
        "model_bytes": model_bytes,
        "wall_seconds": time.perf_counter() - start,
        "rows": rows,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    table = markdown(rows, bandwidth, fresh)
    args.out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

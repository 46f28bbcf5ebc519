"""Time and peak memory of linear CKA (minibatch vs Gram form) and of ``assy compare``.

Reproduce (about 3 minutes each on a 2-core machine, plus a pool build if ``--pool`` is absent)::

    .venv/bin/python benchmarks/comparator.py --pool work/pool32 --out results/comparator.json
    .venv/bin/python benchmarks/comparator.py --threads 1 --skip-e2e --out results/comparator-1t.json

Claims checked (issue 5): :func:`assy.comparator.metrics.linear_cka` accumulates feature-space
statistics over minibatches, so its memory is flat in the number of examples ``n``, and at
``n = 8k`` (``d = 576`` vs ``640``, SmolLM2 vs Gemma3 widths) it is at least 10× faster
than the Gram-matrix form of the same unbiased estimator.

What runs. Every measurement is a fresh child process (this script re-invoked with
``--child``), so each peak is that child's alone:

* ``cka``: make ``x [n, 576]``, ``y [n, 640]`` (float32, ``y`` a noisy nonlinear function of
  ``x``), read the resident memory, reset the high-water mark (``/proc/self/clear_refs``),
  then time ``--repeat`` calls of one method (after one warm-up call on 256 rows) and read the high-water mark again:
  ``minibatch`` is ``linear_cka(x, y)`` as it runs by default on float32 activations
  (4096-row minibatches, float32 products, float64 sums), ``minibatch-fp64`` the same with
  float64 products; ``gram`` forms ``K = X Xᵀ`` and ``L = Y Yᵀ`` in float64 (``gram-fp32``:
  float32), zeroes their diagonals and evaluates HSIC_1 (Song et al. 2012 eq. 5) with O(n²)
  elementwise sums and matrix-vector products (no ``n³`` product), the usual efficient
  implementation. The Gram form is skipped where its two ``n × n`` matrices would not fit
  in half the machine's memory.
* ``e2e``: ``assy.comparator.pipeline.compare_pool`` on the real pool (every model), ``--samples`` PIQA
  prompts, ``--max-tokens`` tokens, into a fresh directory: once with an empty activation
  cache (capture + compare + heatmaps) and once more reusing it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

MiB = 1 << 20
MARK = "@@BENCH_RESULT@@"
SIZES = (1024, 8192, 65536)
WIDTHS = (576, 640)
CHILD_TIMEOUT_S = 1800


# ---------------------------------------------------------------- child side ----------------
def _status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    found = dict(re.findall(r"^(\w+):\s+(\d+) kB", text, re.M))
    return {k: int(found.get(k, 0)) * 1024 for k in ("VmHWM", "VmRSS")}


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def gram_cka(x, y, dtype=None) -> float:
    """Unbiased linear CKA through the two ``n × n`` Gram matrices (the baseline)."""
    import torch

    dtype = dtype or torch.float64
    k, lg = x.to(dtype) @ x.to(dtype).T, y.to(dtype) @ y.to(dtype).T
    k.fill_diagonal_(0)
    lg.fill_diagonal_(0)

    def hsic(a: torch.Tensor, b: torch.Tensor) -> float:
        n = a.shape[0]
        ra, rb = a.sum(1), b.sum(1)
        trace = torch.dot(a.view(-1), b.view(-1))
        value = trace + ra.sum() * rb.sum() / ((n - 1) * (n - 2)) - 2 / (n - 2) * (ra @ rb)
        return float(value) / (n * (n - 3))

    return hsic(k, lg) / math.sqrt(hsic(k, k) * hsic(lg, lg))


METHODS = {
    # name: (kind, products dtype)
    "minibatch": ("minibatch", "float32"),
    "minibatch-fp64": ("minibatch", "float64"),
    "gram": ("gram", "float64"),
    "gram-fp32": ("gram", "float32"),
}


def _child_cka(p: dict[str, Any]) -> dict[str, Any]:
    import torch

    from assy.comparator.metrics import linear_cka

    if p["threads"]:
        torch.set_num_threads(p["threads"])

    g = torch.Generator().manual_seed(0)
    x = torch.randn(p["n"], WIDTHS[0], generator=g)
    w = torch.randn(WIDTHS[0], WIDTHS[1], generator=g) / WIDTHS[0] ** 0.5
    y = torch.tanh(x @ w) + 0.5 * torch.randn(p["n"], WIDTHS[1], generator=g)
    kind, dtype = METHODS[p["method"]]
    dtype = getattr(torch, dtype)
    if kind == "minibatch":
        fn = lambda a, b: linear_cka(a, b, compute_dtype=dtype)  # noqa: E731
    else:
        fn = lambda a, b: gram_cka(a, b, dtype)  # noqa: E731
    fn(x[:256], y[:256])  # warm-up (thread pool, kernels), before the peak is reset
    before = _status()["VmRSS"]
    reset_ok = _reset_peak()
    seconds, value = [], math.nan
    for _ in range(p["repeat"]):
        t0 = time.perf_counter()
        value = fn(x, y)
        seconds.append(time.perf_counter() - t0)
    return {
        "seconds": statistics.median(seconds),
        "all_seconds": seconds,
        "cka": value,
        "input_bytes": (x.numel() + y.numel()) * 4,
        "peak_above_inputs": _status()["VmHWM"] - before,
        "hwm_reset_ok": reset_ok,
        "torch_threads": torch.get_num_threads(),
    }


def _child_e2e(p: dict[str, Any]) -> dict[str, Any]:
    from assy.comparator.capture import calibration_texts
    from assy.comparator.pipeline import compare_pool

    texts = calibration_texts(task="piqa", samples=p["samples"])
    runs = []
    with tempfile.TemporaryDirectory(prefix="assy-bench-compare-") as out:
        for _ in range(2):
            t0 = time.perf_counter()
            r = compare_pool(
                p["pool"], Path(out), texts, max_tokens=p["max_tokens"], progress=False
            )
            runs.append({"wall_s": time.perf_counter() - t0, **r["seconds"], "cache": r["cache"]})
    return {
        "models": r["models"],
        "layer_blocks": r["layer_blocks"],
        "samples": r["samples"],
        "cold": runs[0],
        "cached": runs[1],
        "top_seams": r["top_seams"][:3],
        "peak_rss": _status()["VmHWM"],
    }


CHILDREN = {"cka": _child_cka, "e2e": _child_e2e}


def child_main(mode: str, payload: str) -> None:
    result = CHILDREN[mode](json.loads(payload))
    print(MARK + json.dumps(result), flush=True)


# ---------------------------------------------------------------- parent side ---------------
def run_child(mode: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; never raises for the child's failure."""
    cmd = [sys.executable, __file__, "--child", mode, json.dumps(payload)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"status": "error", "error_msg": f"timed out after {CHILD_TIMEOUT_S}s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"status": "error", "error_msg": f"exit {proc.returncode}: " + " | ".join(tail)}
    result = json.loads(lines[-1][len(MARK) :])
    return result | {"status": "ok", "error_msg": None, "process_wall_s": time.perf_counter() - t0}


def environment() -> dict[str, Any]:
    versions = {}
    for pkg in ("torch", "transformers", "safetensors", "assy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    root = Path(__file__).resolve().parent.parent
    git = ["git", "-C", str(root)]
    sha = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    dirty = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True).stdout
    return {
        "git_sha": sha.strip() or None,
        "git_dirty": bool(dirty.strip()),
        "versions": versions,
        "machine": {
            "cpu_count": os.cpu_count(),
            "total_ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "loadavg_at_start": os.getloadavg(),
    }


def _gram_fits(n: int, dtype: str) -> bool:
    need = 2 * n * n * (8 if dtype == "float64" else 4)
    return need < 0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def measure_cka(sizes: list[int], repeat: int, threads: int | None) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        for method, (kind, dtype) in METHODS.items():
            row: dict[str, Any] = {"n": n, "method": method, "products": dtype}
            if kind == "gram" and not _gram_fits(n, dtype):
                gib = 2 * n * n * (8 if dtype == "float64" else 4) / (1 << 30)
                row |= {"status": "skipped", "error_msg": f"two n×n Grams need {gib:.0f} GiB"}
            else:
                print(f"  cka n={n} {method} ...", end=" ", flush=True, file=sys.stderr)
                payload = {"n": n, "method": method, "repeat": repeat, "threads": threads}
                row |= run_child("cka", payload)
                print(row["status"], row["error_msg"] or "", file=sys.stderr)
            rows.append(row)
    return rows


def _seconds(rows: list[dict[str, Any]], n: int, method: str) -> float | None:
    for r in rows:
        if r["n"] == n and r["method"] == method and r.get("status") == "ok":
            return r["seconds"]
    return None


def markdown(rows: list[dict[str, Any]], e2e: dict[str, Any] | None, repeat: int) -> str:
    threads = sorted({r["torch_threads"] for r in rows if r.get("status") == "ok"})
    head = (
        "| n | method | products | seconds | ÷ minibatch (same n) | peak above inputs MiB "
        "| inputs MiB | CKA |"
    )
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        if r.get("status") != "ok":
            why = f"{r.get('status')}: {r.get('error_msg')}"
            lines.append(
                f"| {r['n']:,} | {r['method']} | {r['products']} | — | — | — | — | {why} |"
            )
            continue
        base = _seconds(rows, r["n"], "minibatch")
        ratio = f"{r['seconds'] / base:.1f}×" if base else "—"
        lines.append(
            f"| {r['n']:,} | {r['method']} | {r['products']} | {r['seconds']:.3f} | {ratio} "
            f"| {r['peak_above_inputs'] / MiB:,.1f} | {r['input_bytes'] / MiB:,.1f} "
            f"| {r['cka']:.6f} |"
        )
    text = "\n".join(lines) + (
        f"\n\nd = {WIDTHS[0]} vs {WIDTHS[1]}, float32 inputs, torch threads {threads}; "
        "minibatch sums are float64 "
        f"whatever the products' dtype; median of {repeat} call(s) in a fresh process per row; "
        "peak = VmHWM after the calls minus RSS before them (high-water mark reset after the "
        "inputs were made).\n"
    )
    for n in sorted({r["n"] for r in rows}):
        pairs = [("gram", "minibatch-fp64"), ("gram-fp32", "minibatch"), ("gram", "minibatch")]
        found = [
            f"{g} ÷ {m} = {_seconds(rows, n, g) / _seconds(rows, n, m):.1f}×"
            for g, m in pairs
            if _seconds(rows, n, g) and _seconds(rows, n, m)
        ]
        if found:
            text += f"\nn = {n:,}: " + ", ".join(found) + "."
    text += "\n"
    if e2e and e2e.get("status") == "ok":
        cold, warm = e2e["cold"], e2e["cached"]
        text += (
            f"\nEnd to end, `compare_pool` on {', '.join(e2e['models'])} ({e2e['layer_blocks']} "
            f"layer blocks), {e2e['samples']} PIQA prompts: empty cache {cold['wall_s']:.1f} s "
            f"(capture {cold['capture']:.1f} s, compare + write + heatmaps {cold['compare']:.1f} s); "
            f"cache reused {warm['wall_s']:.1f} s (capture {warm['capture']:.1f} s, compare "
            f"{warm['compare']:.1f} s); peak RSS {e2e['peak_rss'] / MiB:,.0f} MiB.\n"
        )
    elif e2e:
        text += f"\nEnd to end: {e2e.get('status')}: {e2e.get('error_msg')}\n"
    return text


def _ensure_pool(path: Path) -> None:
    if (path / "pool.json").is_file():
        return
    from blockpool import build_pool

    print(f"building an fp32 pool of the real checkpoints in {path} ...", file=sys.stderr)
    build_pool(["smollm2-135m", "gemma3-270m", "minilm-l6"], path, dtype="fp32")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("results/comparator.json"))
    ap.add_argument("--pool", type=Path, default=Path("work/pool32"), help="Real fp32 pool.")
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--threads", type=int, help="torch threads in the CKA children (default: torch's)."
    )
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--skip-e2e", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t0 = time.perf_counter()
    result: dict[str, Any] = {"config": vars(args) | {"out": str(args.out), "pool": str(args.pool)}}
    result |= environment()
    result["cka"] = measure_cka(args.sizes, args.repeat, args.threads)
    e2e = None
    if not args.skip_e2e:
        _ensure_pool(args.pool)
        print("  end to end ...", file=sys.stderr)
        payload = {"pool": str(args.pool), "samples": args.samples, "max_tokens": args.max_tokens}
        e2e = run_child("e2e", payload)
    result["e2e"] = e2e
    result["loadavg_at_end"] = os.getloadavg()
    result["total_wall_s"] = time.perf_counter() - t0
    table = markdown(result["cka"], e2e, args.repeat)
    result["table_markdown"] = table
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child_main(sys.argv[2], sys.argv[3])
    else:
        main()

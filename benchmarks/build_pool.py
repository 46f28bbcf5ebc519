"""Peak memory and wall time of ``blockpool.build_pool`` on the real checkpoints.

Reproduce (3 to 6 minutes on a 2-core machine, depending on load; ``--repeat 1``, the
default, takes a third of that)::

    .venv/bin/python benchmarks/build_pool.py --out results/build_pool.json --repeat 3

The claim checked: the build streams one block at a time, so its peak memory should track
the largest block, not the whole model. Writes ``--out`` (JSON: config, git sha, package
versions, machine, every run with its status and error) and the same tables as markdown
beside it (``.md``), and prints the tables.

What runs. Every measurement is a fresh child process (this script re-invoked with
``--child``), so each peak is that child's alone. Per model and dtype (fp16, fp32), from
the model's safetensors directory (the cached fp32 conversion for the GGUF builtins):

* ``floor`` (once per repeat): imports torch, transformers and blockpool, nothing else;
* ``open``: the same imports, then opens the source as the build does (config, safetensors
  headers, family, block plan) and reads no tensor: the build's fixed cost;
* ``build``: the same imports, then ``build_pool(["NAME=DIR"], tmp, dtype=...)``;
* ``naive``: the same imports, then ``AutoModel[ForCausalLM].from_pretrained(DIR, dtype=...)``
  and ``safetensors.torch.save_file(state_dict)``, the whole model in memory at once.

How memory is measured. Each child reports its own numbers as JSON on stdout (no
``/usr/bin/time``): ``peak_rss`` is the kernel's high-water mark of resident memory
(``VmHWM`` = ``ru_maxrss``) over the child's life. RSS counts file pages mapped into the
process, and ``safe_open`` memory-maps the source file, so pages read from the source stay
in RSS for as long as the source stays open. The build child therefore also splits its
peak: after every block (from the ``progress`` callback) it reads ``VmHWM`` and the
file-backed resident pages, then resets the high-water mark (``/proc/self/clear_refs``).
``HWM - file-backed pages at the end of that window`` is a lower bound of the anonymous
(private, unreclaimable) memory peak in that window; it is exact when the peak falls after
the window's source pages were read, which is where ``_write_block`` peaks (end of
serialisation). ``peak_rss`` is the maximum over all windows, i.e. what ``ru_maxrss`` would
report without the resets. Page cache of the source files is dropped before each child
with ``posix_fadvise(POSIX_FADV_DONTNEED)`` (checked with ``fincore`` where present), so
reads are cold-ish.

``--models`` and ``--dtypes`` pick a subset, ``--repeat`` repeats every child (the tables
show medians). Models whose packages are not installed are skipped with a message.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from _common import drop_page_cache

MiB = 1 << 20
MODELS = ("smollm2-135m", "gemma3-270m", "minilm-l6")
DTYPES = ("fp16", "fp32")
MARK = "@@BENCH_RESULT@@"
CHILD_TIMEOUT_S = 600


# ---------------------------------------------------------------- child side ----------------
def _proc_status() -> dict[str, int]:
    """Resident memory of this process from /proc/self/status, in bytes."""
    text = Path("/proc/self/status").read_text()
    found = dict(re.findall(r"^(\w+):\s+(\d+) kB", text, re.M))
    keys = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")
    values = {k: int(found.get(k, 0)) * 1024 for k in keys}
    values["file"] = values["RssFile"] + values["RssShmem"]
    return values


class _PeakTracker:
    """High-water marks per window, reset between windows (see the module docstring)."""

    def __init__(self) -> None:
        self.windows: list[dict[str, Any]] = []
        self.can_reset = True

    def close_window(self, label: str) -> None:
        st = _proc_status()
        self.windows.append(
            {
                "label": label,
                "hwm": st["VmHWM"],
                "file_end": st["file"],
                "anon_end": st["RssAnon"],
                "anon_peak_lb": st["VmHWM"] - st["file"],
            }
        )
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.can_reset = False

    def on_block(self, model: str, done: int, total: int) -> None:
        self.close_window(f"block:{done - 1}")

    def peak_rss(self) -> int:
        return max(w["hwm"] for w in self.windows)


def _import_floor() -> None:
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import blockpool  # noqa: F401


def _child_floor(_: dict[str, Any]) -> dict[str, Any]:
    _import_floor()
    st = _proc_status()
    return {"peak_rss": st["VmHWM"], "anon": st["RssAnon"], "file": st["file"]}


def _child_build(p: dict[str, Any]) -> dict[str, Any]:
    _import_floor()
    from blockpool import build_pool
    from blockpool.pool import Pool, summarize

    tracker = _PeakTracker()
    tracker.close_window("imports")
    pre = _proc_status()
    out = Path(p["out"])
    t0 = time.perf_counter()
    build_pool([f"{p['name']}={p['path']}"], out, dtype=p["dtype"], progress=tracker.on_block)
    seconds = time.perf_counter() - t0
    tracker.close_window("tail")
    # the tail window may end after the source was closed; bound it with the last block's
    # file pages, which is still a lower bound (file pages only shrink after the last block)
    tail, last = tracker.windows[-1], tracker.windows[-2]
    tail["anon_peak_lb"] = tail["hwm"] - last["file_end"]
    model = summarize(Pool(out))["models"][p["name"]]
    sizes = [b["bytes"] for b in model["blocks"]]
    for i, w in enumerate(tracker.windows[1:-1]):
        w["block"] = model["blocks"][i]["id"]
        w["block_bytes"] = sizes[i]
    return {
        "seconds": seconds,
        "peak_rss": tracker.peak_rss(),
        "pre_build_anon": pre["RssAnon"],
        "pre_build_file": pre["file"],
        "hwm_reset_ok": tracker.can_reset,
        "windows": tracker.windows,
        "model_bytes": model["bytes"],
        "blocks": [
            {"id": b["id"], "kind": b["kind"], "bytes": b["bytes"]} for b in model["blocks"]
        ],
    }


def _child_naive(p: dict[str, Any]) -> dict[str, Any]:
    _import_floor()
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    dtype = {"fp16": torch.float16, "fp32": torch.float32}[p["dtype"]]
    t0 = time.perf_counter()
    config = AutoConfig.from_pretrained(p["path"], local_files_only=True)
    causal = any(a.endswith("ForCausalLM") for a in config.architectures or [])
    cls = AutoModelForCausalLM if causal else AutoModel
    model = cls.from_pretrained(p["path"], dtype=dtype, local_files_only=True)
    state, seen = {}, set()
    for k, v in model.state_dict().items():  # tied weights share storage: keep one
        ptr = v.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            state[k] = v.contiguous()
    Path(p["out"]).mkdir(parents=True, exist_ok=True)
    save_file(state, Path(p["out"]) / "model.safetensors")
    seconds = time.perf_counter() - t0
    st = _proc_status()
    return {"seconds": seconds, "peak_rss": st["VmHWM"], "anon": st["RssAnon"], "file": st["file"]}


def _child_open(p: dict[str, Any]) -> dict[str, Any]:
    """The build's fixed cost before its first block: open the source, find its family."""
    _import_floor()
    from blockpool.build import plan_blocks
    from blockpool.families import family_for_config
    from blockpool.sources import open_source

    with open_source(p["path"], progress=False) as src:
        plan_blocks(family_for_config(src.config), src.config, src.names())
        st = _proc_status()
    return {"peak_rss": st["VmHWM"], "anon": st["RssAnon"], "file": st["file"]}


def _child_resolve(p: dict[str, Any]) -> dict[str, Any]:
    """The safetensors directory of each builtin, or why it is unavailable."""
    from blockpool.errors import BlockpoolError
    from blockpool.sources import open_source

    found: dict[str, Any] = {}
    for name in p["models"]:
        try:
            with open_source(name, progress=False) as src:
                files = sorted(str(f) for f in Path(src.path).glob("*.safetensors"))
                found[name] = {"path": str(src.path), "files": files}
        except (BlockpoolError, ImportError, OSError) as e:
            found[name] = {"error": f"{type(e).__name__}: {e}"}
    return found


CHILDREN = {
    "floor": _child_floor,
    "open": _child_open,
    "build": _child_build,
    "naive": _child_naive,
    "resolve": _child_resolve,
}


def child_main(mode: str, payload: str) -> None:
    result = CHILDREN[mode](json.loads(payload))
    print(MARK + json.dumps(result), flush=True)


# ---------------------------------------------------------------- parent side ---------------
def run_child(mode: str, payload: dict[str, Any], cold: list[str] | None = None) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; never raises for the child's failure."""
    cached = None
    if cold:
        drop_page_cache(cold)
        cached = _cached_bytes(cold)
    cmd = [sys.executable, __file__, "--child", mode, json.dumps(payload)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"status": "error", "error_msg": f"timed out after {CHILD_TIMEOUT_S}s"}
    common = {"process_wall_s": time.perf_counter() - t0, "source_cached_after_drop": cached}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        msg = f"exit {proc.returncode}: " + " | ".join(tail)
        return {"status": "error", "error_msg": msg, **common}
    result = json.loads(lines[-1][len(MARK) :])
    result.update(status="ok", error_msg=None, **common)
    return result


def _command(*args: str) -> str | None:
    try:
        return subprocess.run(args, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def environment() -> dict[str, Any]:
    meminfo = Path("/proc/meminfo").read_text()
    total_kb = int(re.search(r"MemTotal:\s+(\d+)", meminfo).group(1))  # type: ignore[union-attr]
    versions = {}
    for pkg in ("torch", "transformers", "safetensors", "assy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    root = Path(__file__).resolve().parent.parent
    return {
        "git_sha": _command("git", "-C", str(root), "rev-parse", "HEAD"),
        "git_dirty": bool(_command("git", "-C", str(root), "status", "--porcelain")),
        "versions": versions,
        "machine": {
            "cpu_count": os.cpu_count(),
            "total_ram_bytes": total_kb * 1024,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_at_start": os.getloadavg(),
        },
    }


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get("status") == "ok" and r.get(key) is not None]
    return statistics.median(values) if values else None


def _cached_bytes(files: list[str]) -> int | None:
    """Bytes of ``files`` in the page cache (``fincore``), to check the drop; None without it."""
    if not shutil.which("fincore"):
        return None
    out = _command("fincore", "--bytes", "--noheadings", "--output", "RES", *files)
    return None if out is None else sum(int(x) for x in out.split())


def measure_model(
    name: str, info: dict[str, Any], dtype: str, repeat: int, work: Path
) -> dict[str, Any]:
    """Every repeat of the source-open baseline, the build and the naive baseline."""
    entry: dict[str, Any] = {"model": name, "dtype": dtype, "source": info["path"]}
    entry["source_bytes"] = sum(Path(f).stat().st_size for f in info["files"])
    for kind in ("open", "build", "naive"):
        entry[f"{kind}_runs"] = []
    for i in range(repeat):
        for kind in ("open", "build", "naive"):
            out = work / f"{name}-{dtype}-{kind}-{i}"
            payload = {"name": name, "path": info["path"], "dtype": dtype, "out": str(out)}
            print(f"  {name} {dtype} {kind} #{i + 1} ...", end=" ", flush=True, file=sys.stderr)
            run = run_child(kind, payload, cold=info["files"])
            print(run["status"], run.get("error_msg") or "", file=sys.stderr)
            entry[f"{kind}_runs"].append(run)
            shutil.rmtree(out, ignore_errors=True)
    return entry


def _build_stats(run: dict[str, Any], largest_id: str) -> dict[str, int]:
    """Peaks of one build run: anonymous (overall, and outside the largest block), mapped file."""
    windows = run["windows"][1:]  # after the imports
    others = [w["anon_peak_lb"] for w in windows if w.get("block") not in (None, largest_id)]
    return {
        "peak_rss": run["peak_rss"],
        "anon_peak": max(w["anon_peak_lb"] for w in windows),
        "anon_peak_other": max(others) if others else 0,
        "file_mapped": max(w["file_end"] for w in windows) - run["pre_build_file"],
    }


def summarize_entry(entry: dict[str, Any], floor: dict[str, float]) -> dict[str, Any] | None:
    """One table row from the repeats of one model and dtype (medians)."""
    ok = [r for r in entry["build_runs"] if r["status"] == "ok"]
    if not ok:
        return None
    blocks = sorted(ok[0]["blocks"], key=lambda b: b["bytes"], reverse=True)
    largest, second = blocks[0], (blocks[1] if len(blocks) > 1 else None)
    stats = [_build_stats(r, largest["id"]) for r in ok]
    med = {k: statistics.median(s[k] for s in stats) for k in stats[0]}
    opened = _median(entry["open_runs"], "anon")
    above = med["peak_rss"] - floor["peak_rss"]
    model_bytes = ok[0]["model_bytes"]
    naive_peak, naive_anon = (
        _median(entry["naive_runs"], "peak_rss"),
        _median(entry["naive_runs"], "anon"),
    )
    return {
        "model": entry["model"],
        "dtype": entry["dtype"],
        "source_bytes": entry["source_bytes"],
        "model_bytes": model_bytes,
        "largest_block": largest,
        "second_block": second,
        "build_s": statistics.median(r["seconds"] for r in ok),
        "peak_rss": med["peak_rss"],
        "rss_above_floor": above,
        "rss_above_floor_per_largest": above / largest["bytes"],
        "rss_above_floor_per_model": above / model_bytes,
        "source_mapped_at_end": med["file_mapped"],
        "anon_above_floor": med["anon_peak"] - floor["anon"],
        "source_open_anon_above_floor": None if opened is None else opened - floor["anon"],
        "anon_above_open_per_largest": (
            None if opened is None else (med["anon_peak"] - opened) / largest["bytes"]
        ),
        "anon_above_open_other_blocks_per_second": (
            None
            if opened is None or second is None
            else (med["anon_peak_other"] - opened) / second["bytes"]
        ),
        "naive_s": _median(entry["naive_runs"], "seconds"),
        "naive_rss_above_floor": None if naive_peak is None else naive_peak - floor["peak_rss"],
        "naive_anon_above_floor": None if naive_anon is None else naive_anon - floor["anon"],
    }


def _mib(x: float | None) -> str:
    return "—" if x is None else f"{x / MiB:,.1f}"


def _ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def _block(b: dict[str, Any] | None) -> str:
    return "—" if b is None else f"{b['bytes'] / MiB:,.1f} ({b['id'].split('/', 1)[1]})"


TABLE_SIZES = (
    "| model | dtype | source MiB | pool model MiB | largest block MiB | 2nd-largest block MiB "
    "| largest ÷ model | build s | naive s |"
)
TABLE_MEMORY = (
    "| model | dtype | peak RSS MiB | RSS above floor MiB | ÷ largest | ÷ model "
    "| source mapped at end MiB | anon peak above floor MiB | anon ÷ largest "
    "| anon, other blocks ÷ 2nd | naive RSS above floor MiB | naive anon above floor MiB |"
)
NOTE = """\
Import floor (a child importing torch, transformers, blockpool): peak RSS {peak} MiB, \
anonymous {anon} MiB. "RSS" is the child's own VmHWM (= ru_maxrss), file-backed pages \
included; "source mapped at end" is the growth of file-backed resident pages during the \
build (the memory-mapped source pages read so far). "anon" is the anonymous (private) peak: \
a lower bound from per-block high-water marks minus file-backed pages; "anon ÷ largest" and \
"anon, other blocks ÷ 2nd" are measured above a child that imported the same and only \
opened the source (config, safetensors headers, family), and divided by the largest / \
second-largest block's pool bytes. Naive = from_pretrained + save_file (its anon is at the \
end, model still alive). Page cache of the source dropped (POSIX_FADV_DONTNEED) before every \
child; medians over {repeat} repeat(s); MiB = 2^20 bytes.
"""


def _rows_sizes(r: dict[str, Any]) -> str:
    return (
        f"| {r['model']} | {r['dtype']} | {_mib(r['source_bytes'])} | {_mib(r['model_bytes'])} "
        f"| {_block(r['largest_block'])} | {_block(r['second_block'])} "
        f"| {_ratio(r['largest_block']['bytes'] / r['model_bytes'])} "
        f"| {r['build_s']:.2f} | {_ratio(r['naive_s'])} |"
    )


def _rows_memory(r: dict[str, Any]) -> str:
    return (
        f"| {r['model']} | {r['dtype']} | {_mib(r['peak_rss'])} | {_mib(r['rss_above_floor'])} "
        f"| {_ratio(r['rss_above_floor_per_largest'])} | {_ratio(r['rss_above_floor_per_model'])} "
        f"| {_mib(r['source_mapped_at_end'])} | {_mib(r['anon_above_floor'])} "
        f"| {_ratio(r['anon_above_open_per_largest'])} "
        f"| {_ratio(r['anon_above_open_other_blocks_per_second'])} "
        f"| {_mib(r['naive_rss_above_floor'])} | {_mib(r['naive_anon_above_floor'])} |"
    )


def markdown(rows: list[dict[str, Any]], floor: dict[str, float], repeat: int) -> str:
    """The two result tables (sizes and time; memory) and the notes under them."""
    t1 = [TABLE_SIZES, "|" + "---|" * 9] + [_rows_sizes(r) for r in rows]
    t2 = [TABLE_MEMORY, "|" + "---|" * 12] + [_rows_memory(r) for r in rows]
    note = NOTE.format(peak=_mib(floor["peak_rss"]), anon=_mib(floor["anon"]), repeat=repeat)
    return "\n".join(t1) + "\n\n" + "\n".join(t2) + "\n\n" + note


def _notes(result: dict[str, Any]) -> str:
    """Lines about this run: warm source pages, system load, skipped models."""
    runs = [
        r
        for m in result["measurements"]
        for k in ("open", "build", "naive")
        for r in m[f"{k}_runs"]
    ]
    warm = [r for r in runs if r.get("source_cached_after_drop")]
    checked = [r for r in runs if r.get("source_cached_after_drop") is not None]
    load = result["machine"]["loadavg_at_start"][0], result["machine"]["loadavg_at_end"][0]
    lines = [
        f"Page-cache drop checked with fincore in {len(checked)} of {len(runs)} runs; "
        f"source pages still cached (mapped by another process) in {len(warm)}.",
        f"Load average {load[0]:.1f} at start, {load[1]:.1f} at end "
        f"({result['machine']['cpu_count']} CPUs); total {result['total_wall_s']:.0f} s.",
    ]
    lines += [f"Skipped {name}: {msg}" for name, msg in result["skipped"].items()]
    return "\n" + "\n".join(lines) + "\n"


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Resolve the sources, measure the floor, then every model and dtype."""
    result: dict[str, Any] = {"config": vars(args) | {"out": str(args.out)}, **environment()}
    resolved = run_child("resolve", {"models": args.models})
    if resolved["status"] != "ok":
        raise SystemExit(f"cannot resolve the model sources: {resolved['error_msg']}")
    result["skipped"] = {}
    floors = [run_child("floor", {}) for _ in range(args.repeat)]
    result["floor_runs"] = floors
    floor = {"peak_rss": _median(floors, "peak_rss"), "anon": _median(floors, "anon")}
    if floor["peak_rss"] is None:
        raise SystemExit(f"the import-floor child failed: {floors[0]['error_msg']}")
    result["floor"] = floor
    result["measurements"] = []
    work = Path(tempfile.mkdtemp(prefix="assy-bench-build-"))
    try:
        for name in args.models:
            info = resolved[name]
            if "error" in info or not info.get("files"):
                msg = info.get("error", "no *.safetensors in the source directory")
                print(f"skipping {name}: {msg}", file=sys.stderr)
                result["skipped"][name] = msg
                continue
            for dtype in args.dtypes:
                entry = measure_model(name, info, dtype, args.repeat, work)
                entry["row"] = summarize_entry(entry, floor)
                result["measurements"].append(entry)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out",
        type=Path,
        default=Path("results/build_pool.json"),
        help="JSON result; the markdown tables go beside it as .md",
    )
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    ap.add_argument("--repeat", type=int, default=1, help="runs of every child (medians)")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t0 = time.perf_counter()
    result = run_all(args)
    result["total_wall_s"] = time.perf_counter() - t0
    result["machine"]["loadavg_at_end"] = os.getloadavg()
    rows = [m["row"] for m in result["measurements"] if m["row"] is not None]
    table = markdown(rows, result["floor"], args.repeat) + _notes(result)
    result["table_markdown"] = table
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(table)
    print(table)
    for m in result["measurements"]:
        for run in m["build_runs"] + m["naive_runs"]:
            if run["status"] != "ok":
                print(f"ERROR {m['model']} {m['dtype']}: {run['error_msg']}", file=sys.stderr)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child_main(sys.argv[2], sys.argv[3])
    else:
        main()

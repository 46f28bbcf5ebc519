"""HeteAgg vs FedAvg: time and peak memory over 20 and 200 clients' LoRA adapters.

Reproduce (about 3-5 minutes on a shared 2-core CPU)::

    .venv/bin/python benchmarks/aggregation.py --out results/aggregation.json

The tensors: LoRA adapters of SmolLM2-135M's q and v projections, rank 16, all 30 layers
(``A`` ``[16, 576]``; ``B`` ``[576, 16]`` for q, ``[192, 16]`` for v: 921,600 fp32
numbers, 3.7 MB per client), random, in LEGO's four client tiers (0/25/50/75% of the
factor entries zero, as the paper's sparse SLMs' adapters). Each client is one safetensors
file. The methods (``assy.lego``):

* ``fedavg``: the FedIT baseline, the mean of every tensor;
* ``heteagg``: Algorithm 2 of the LEGO paper, the new global only (non-zero sums and
  counts); the same output as ``fedavg``, so the fair comparison;
* ``heteagg+write-back``: also every client's masked update, as dicts (``memory``) or
  written as new client files (``files``): N client states more of output;
* ``heteagg_exact``: the masked products ``(B A) ⊙ M`` per client (masks: each tier's
  own random ``[out, in]`` pattern at the tier's sparsity), re-factored by truncated SVD.

Two input modes: ``files`` (clients passed as paths, read one at a time) and ``memory``
(all clients loaded as dicts first, as a server holding every reply would). Every
measurement is a fresh child process (this script with ``--child``): the peak is the
child's resident high-water mark during the call minus its resident memory just before it
(``/proc/self/clear_refs`` resets the mark), so it is what the aggregation itself adds on
top of its inputs. Seconds and peaks are medians over ``--repeat`` children; ratios are
against ``fedavg`` in the same mode and client count.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MARK = "@@AGG_RESULT@@"
MiB = 1 << 20
LAYERS, HIDDEN, KV, RANK = 30, 576, 192, 16
TIERS = (0.0, 0.25, 0.5, 0.75)


# ----------------------------------------------------------------- child side ----------
def _status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    found = dict(re.findall(r"^(\w+):\s+(\d+) kB", text, re.M))
    return {k: int(found.get(k, 0)) * 1024 for k in ("VmHWM", "VmRSS")}


def _masks(tier: int) -> dict[str, Any]:
    import torch

    gen = torch.Generator().manual_seed(1000 + tier)
    out = {}
    for layer in range(LAYERS):
        for proj, rows in (("q_proj", HIDDEN), ("v_proj", KV)):
            prefix = f"layers.{layer}.self_attn.{proj}"
            out[prefix] = torch.rand(rows, HIDDEN, generator=gen) >= TIERS[tier]
    return out


def _child(p: dict[str, Any]) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    paths = sorted(Path(p["clients"]).glob("client*.safetensors"))[: p["n"]]
    clients: list[Any] = paths if p["mode"] == "files" else [load_file(x) for x in paths]
    global_state = load_file(Path(p["clients"]) / "global.safetensors")
    masks = None
    if p["method"] == "heteagg_exact":
        tiers = [_masks(t) for t in range(len(TIERS))]
        masks = [tiers[i % len(TIERS)] for i in range(len(paths))]
    with tempfile.TemporaryDirectory(prefix="agg-out-") as out:
        return _timed(p, global_state, clients, masks, Path(out))


def _timed(p, global_state, clients, masks, out_dir: Path) -> dict[str, Any]:
    from assy.lego import fedavg, heteagg, heteagg_exact

    before = _status()["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    if p["method"] == "fedavg":
        fedavg(clients)
    elif p["method"] == "heteagg":
        heteagg(global_state, clients, write_back=False)
    elif p["method"] == "heteagg+write-back":
        heteagg(global_state, clients, out_dir=out_dir)
    else:
        heteagg_exact(global_state, clients, masks, out_dir=out_dir)
    seconds = time.perf_counter() - start
    peak = _status()["VmHWM"]
    return {"seconds": seconds, "peak_extra": peak - before, "rss_before": before}


# ----------------------------------------------------------------- parent side ---------
def _write_clients(root: Path, n: int) -> None:
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    for i in range(n + 1):
        keep = 1.0 if i == n else 1 - TIERS[i % len(TIERS)]
        state = {}
        for layer in range(LAYERS):
            for proj, rows in (("q_proj", HIDDEN), ("v_proj", KV)):
                prefix = f"layers.{layer}.self_attn.{proj}"
                for name, shape in (("lora_A", (RANK, HIDDEN)), ("lora_B", (rows, RANK))):
                    t = torch.randn(shape, generator=gen) * 0.02
                    state[f"{prefix}.{name}.weight"] = t * (torch.rand(shape, generator=gen) < keep)
        name = "global" if i == n else f"client{i:04d}"
        save_file(state, root / f"{name}.safetensors")


def _run_child(params: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", json.dumps(params)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return {"status": "ok", **json.loads(line[len(MARK) :])}
    return {"status": "error", "error_msg": proc.stderr[-2000:]}


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| clients | mode | method | seconds | × fedavg | peak extra MiB | × fedavg |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']} | {r['mode']} | {r['method']} | {r['seconds']:.2f} | "
            f"{r['time_ratio']:.2f} | {r['peak_extra'] / MiB:.1f} | {r['peak_ratio']:.2f} |"
        )
    return "\n".join(lines)


def _measure(args, root: Path) -> list[dict[str, Any]]:
    rows = []
    for n in args.clients:
        for mode in args.modes:
            base = None
            for method in ("fedavg", "heteagg", "heteagg+write-back", "heteagg_exact"):
                runs = [
                    _run_child({"clients": str(root), "n": n, "mode": mode, "method": method})
                    for _ in range(args.repeat)
                ]
                ok = [r for r in runs if r["status"] == "ok"]
                if not ok:
                    raise RuntimeError(f"{method} {mode} n={n} failed: {runs[0]['error_msg']}")
                row = {"n": n, "mode": mode, "method": method, "runs": runs}
                for key in ("seconds", "peak_extra", "rss_before"):
                    row[key] = statistics.median(r[key] for r in ok)
                base = base or row
                row["time_ratio"] = row["seconds"] / base["seconds"]
                row["peak_ratio"] = row["peak_extra"] / max(base["peak_extra"], 1)
                rows.append(row)
                print(
                    f"n={n} {mode} {method}: {row['seconds']:.2f} s, "
                    f"{row['peak_extra'] / MiB:.1f} MiB",
                    file=sys.stderr,
                    flush=True,
                )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("results/aggregation.json"))
    p.add_argument("--clients", type=int, nargs="+", default=[20, 200])
    p.add_argument("--modes", nargs="+", default=["files", "memory"])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(MARK + json.dumps(_child(json.loads(args.child))))
        return
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="agg-clients-") as tmp:
        _write_clients(Path(tmp), max(args.clients))
        rows = _measure(args, Path(tmp))
    result = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "tensors": {"layers": LAYERS, "rank": RANK, "per_client_numbers": 921_600},
        "rows": rows,
        "wall_s": time.perf_counter() - start,
        "load_average": os.getloadavg(),
        "status": "ok",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(_table(rows) + "\n")
    print(_table(rows))


if __name__ == "__main__":
    main()

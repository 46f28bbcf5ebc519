"""How many torch threads to use when other processes keep cores busy.

    .venv/bin/python benchmarks/threads.py --out results/threads.json

Two workloads of the project's own code paths, each timed with 1..N threads while 0..N
other processes spin on the cores (pure-Python busy loops), interleaved, ``--repeat``
times, medians reported:

* ``sparsegpt``: :func:`assy.lego.pruning.sparsegpt_prune` of one 576 x 576 matrix (a
  column loop of many small ops: the worst case for OpenMP threads that spin-wait);
* ``layer``: a SmolLM2-sized ``LlamaDecoderLayer`` (hidden 576, random weights) on 4 x 256
  tokens, forward only (large matrix products: the best case for threads).

The default of ``--threads`` (:func:`blockpool.session.default_threads`: cores minus the
1-minute load average) is checked against the fastest count in each load condition.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import torch


def _spin() -> None:
    while True:
        pass


def _sparsegpt() -> callable:
    from assy.lego.pruning import parse_sparsity, sparsegpt_prune

    g = torch.Generator().manual_seed(0)
    w = torch.randn(576, 576, generator=g)
    x = torch.randn(2048, 576, generator=g)
    hessian = x.t() @ x
    target = parse_sparsity("0.5")
    return lambda: sparsegpt_prune(w, hessian, target)


def _layer() -> callable:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_attention_heads=9,
        num_key_value_heads=3,
        num_hidden_layers=1,
    )
    config._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(config, 0).eval()
    rotary = LlamaRotaryEmbedding(config=config)
    x = torch.randn(4, 256, 576, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(256)[None]
    embeddings = rotary(x, positions)

    def run() -> None:
        with torch.inference_mode():
            for _ in range(3):
                layer(x, position_embeddings=embeddings, position_ids=positions)

    return run


def _time(fn, threads: int) -> float:
    torch.set_num_threads(threads)
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    from blockpool.session import default_threads

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/threads.json"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    workloads = {"sparsegpt": _sparsegpt(), "layer": _layer()}
    for fn in workloads.values():
        _time(fn, 1)  # warm up
    rows = []
    for hogs in range(cores + 1):
        procs = [mp.Process(target=_spin, daemon=True) for _ in range(hogs)]
        for p in procs:
            p.start()
        time.sleep(2.0)
        times: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.repeat):
            for name, fn in workloads.items():
                for threads in range(1, cores + 1):
                    times.setdefault((name, threads), []).append(_time(fn, threads))
        load = os.getloadavg()[0]
        for p in procs:
            p.terminate()
            p.join()
        for (name, threads), ts in times.items():
            rows.append(
                {
                    "workload": name,
                    "busy_processes": hogs,
                    "threads": threads,
                    "median_seconds": statistics.median(ts),
                    "seconds": ts,
                    "loadavg_1min_at_end": load,
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        time.sleep(1.0)
    best = {}
    for r in rows:
        key = (r["workload"], r["busy_processes"])
        if key not in best or r["median_seconds"] < best[key]["median_seconds"]:
            best[key] = r
    lines = [
        "| workload | busy processes | "
        + " | ".join(f"{t} thr (s)" for t in range(1, cores + 1))
        + " | fastest |",
        "|---|---|" + "---|" * cores + "---|",
    ]
    for (name, hogs), fastest in best.items():
        cells = [
            f"{r['median_seconds']:.3f}"
            for r in rows
            if r["workload"] == name and r["busy_processes"] == hogs
        ]
        lines.append(f"| {name} | {hogs} | " + " | ".join(cells) + f" | {fastest['threads']} |")
    table = "\n".join(lines)
    result = {
        "benchmark": "threads",
        "cores": cores,
        "default_threads_now": default_threads(),
        "rows": rows,
        "table": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(table)


if __name__ == "__main__":
    main()

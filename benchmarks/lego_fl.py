"""LEGO's federated fine-tuning in miniature: the paper's Tables 1-2 and Figures 3 and 5.

Reproduce the run recorded in ``benchmarks/README.md`` (three seeds and zero-shot
accuracy; 70 minutes on a shared 2-core CPU after the variants exist; making them takes
another ~3-10 minutes once)::

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/lego_fl.py \\
        --pool /tmp/legofl/pool --limit 16 --test-limit 24 --steps 6 --batch-size 2 \\
        --max-length 96 --seeds 0,1,2 --zero-shot arc_easy,arc_challenge,sciq,hellaswag \\
        --zero-shot-limit 100 --skip-categories --out results/lego_fl_seeds.json

Table 1's task-dependent rows and Figure 3 (eight clients, two rounds; 14 minutes)::

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/lego_fl.py \\
        --pool /tmp/legofl/pool --limit 8 --test-limit 8 --steps 3 --batch-size 2 \\
        --max-length 64 --rounds 2 --only-categories --out results/lego_fl_categories.json

and a longer one (the whole held-out set; several hours on that machine)::

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/lego_fl.py \\
        --pool /tmp/legofl/pool --limit 64 --test-limit 80 --steps 16 --batch-size 4 \\
        --max-length 256 --rounds 2 --seeds 0,1,2 --out results/lego_fl_long.json

The global model is SmolLM2-135M from the real pool (``--pool``: built here from the
installed checkpoint when it does not exist). Its pruned variants (SparseGPT by default,
``--prune wanda``) are made once into the pool and reused. Data: databricks-dolly-15k in
FedIT's split (``../shared/data/dolly-fed10``; ``--limit`` rows per client, IID re-split
or one client per category), ``global_test.json`` for the held-out loss. Every client
runs :func:`assy.federation.lego.lego_round` (the function the engine's ClientApp calls:
the variant with the global update written back, a fresh sparsity-preserving LoRA,
``--steps`` AdamW steps); aggregation is :func:`assy.federation.lego.aggregate_round`.
The Flower engine itself adds nothing to these numbers and is left out (its overhead is
``benchmarks/federation.py``'s subject).

Primary metric: held-out instruction loss (nats per response token; lower is better) and
bits per response byte. The paper reports average zero-shot accuracy of LLaMA-7B models;
a 135M model sits near chance on most of its benchmarks, so ``--zero-shot`` accuracy
(``assy eval``'s scoring, with standard errors; first seed only) is reported but not used
to rank. The paper's numbers are printed beside ours for the direction of each claim only.
With several ``--seeds`` every cell is mean ± sd and each claim is also given as a paired
difference per seed; the held-out rows are the first seed's in every run.

Experiments (same seed, same data for every method):

* ``table2``: four IID clients at 0/25/50/75% sparsity: pruned, fine-tuned (its own
  adapter), globally updated (``G ⊙ M``), and the dense global recombined (``W + G``);
  HeteAgg ``masked`` (default), ``factors``, ``exact`` and example-weighted ``fedavg``
  re-aggregate the one set of uploaded adapters (no retraining).
* ``figure5``: the same adapters, each client left out of the aggregation in turn.
* ``table1_iid``: LEGO with four 75% clients vs FedIT with four dense clients (FedAvg),
  IID; columns LLM initial, SLMs initial, SLMs globally updated, LLM recombined.
* ``table1_categories``: the same with eight clients, one per dolly category; with
  ``--rounds`` > 1 the SLMs' loss after each global update is the paper's Figure 3.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
ANCHOR = "smollm2-135m"
SPARSITIES = (0.0, 0.25, 0.5, 0.75)
PAPER = {  # seed 001: average accuracy (higher is better); ours: loss (lower is better)
    "table1": {
        "lego_iid": [0.559, 0.240, 0.416, 0.568],
        "fedit_iid": [0.559, None, None, 0.567],
        "lego_categories": [0.559, 0.240, 0.411, 0.571],
        "fedit_categories": [0.559, None, None, 0.563],
    },
    "table2": {
        "pruned": [0.559, 0.554, 0.529, 0.384],
        "fine_tuned": [0.563, 0.561, 0.526, 0.412],
        "globally_updated": [0.568, 0.565, 0.542, 0.396],
    },
}


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pool", type=Path, default=Path("/tmp/legofl/pool"))
    p.add_argument("--out", type=Path, default=Path("results/lego_fl.json"))
    p.add_argument("--data", default="", help="dolly-fed10 directory (default ../shared)")
    p.add_argument("--prune", default="sparsegpt", choices=["sparsegpt", "wanda", "magnitude"])
    p.add_argument("--limit", type=int, default=24, help="rows per client")
    p.add_argument("--test-limit", type=int, default=40, help="held-out rows scored")
    p.add_argument("--steps", type=int, default=6, help="local AdamW steps per client round")
    p.add_argument("--rounds", type=int, default=1, help="rounds of the Table 1 runs")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument(
        "--seeds", default="0",
        help="comma-separated seeds: each reruns Tables 1 (IID) and 2 (client data and "
        "LoRA initialisation); with several, cells are mean ± sd and paired differences "
        "are reported; the held-out rows are the first seed's in every run",
    )  # fmt: skip
    p.add_argument(
        "--zero-shot", default="",
        help="assy eval tasks scored zero-shot (first seed only), e.g. "
        "arc_easy,arc_challenge,sciq,hellaswag: the global model initial and recombined "
        "(LEGO, FedIT), every variant pruned and globally updated",
    )  # fmt: skip
    p.add_argument("--zero-shot-limit", type=int, default=100, help="examples per task")
    p.add_argument("--skip-categories", action="store_true", help="leave out Table 1's 8 clients")
    p.add_argument(
        "--only-categories", action="store_true", help="only Table 1's 8 clients (and Figure 3)"
    )
    return p.parse_args()


class Bench:
    """The shared state: pool, variants, masks, test rows; evaluation with a cache."""

    def __init__(self, args: argparse.Namespace) -> None:
        from assy.federation import lego
        from assy.federation.config import FederationConfig
        from assy.federation.instructions import instruction_splits
        from blockpool import Pool, build_pool

        self.args = args
        if not (args.pool / "pool.json").exists():
            print(f"building {args.pool} from the installed {ANCHOR} ...", flush=True)
            build_pool([ANCHOR], args.pool, dtype="fp32")
        self.pool = Pool(args.pool)
        start = time.perf_counter()
        made = lego.ensure_variants(self.pool, ANCHOR, args.prune, SPARSITIES, print)
        self.prune_seconds = time.perf_counter() - start
        self.pool = Pool(args.pool)
        self.variant = {s: made[s]["model"] for s in SPARSITIES}
        self.made = {str(s): v for s, v in made.items()}
        self._masks: dict[str, dict] = {}
        self.seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
        self.seed = self.seeds[0]
        _, self.test = instruction_splits(args.data, "iid", 4, self.seed, 0, args.test_limit)
        self.tasks = (
            lego.zero_shot_tasks(args.zero_shot, args.zero_shot_limit) if args.zero_shot else {}
        )
        self.zero_shot: dict[str, dict] = {}
        self._stored: dict[str, dict] = {}  # held-out loss of a model as stored
        self.cfg = lambda clients: FederationConfig(
            pool=str(args.pool), task="dolly", method="lego", rounds=1, out="/tmp/unused",
            data=args.data, clients=clients, per_round=clients, split="iid", tiers="lego",
            seed=self.seed, lora_rank=args.rank, lora_alpha=2.0 * args.rank,
            local_steps=args.steps, batch_size=args.batch_size, lr=args.lr,
            max_length=args.max_length, prune=args.prune,
        )  # fmt: skip
        self.scaling = 2.0
        self.evals = 0
        self.eval_seconds = 0.0

    def masks(self, model: str) -> dict:
        from assy.federation.lego import module_masks
        from assy.lego.lora import PoolModule

        if model not in self._masks:
            self._masks[model] = module_masks(PoolModule(self.pool, model))
        return self._masks[model]

    def loss(self, model: str, update=None, whole: bool = False) -> dict[str, float]:
        from assy.federation.lego import heldout_loss

        if not update and model in self._stored:  # a stored model's loss is the same every seed
            return self._stored[model]
        start = time.perf_counter()
        result = heldout_loss(self.pool, model, update, self.test, self.args.max_length, whole)
        self.evals += 1
        self.eval_seconds += time.perf_counter() - start
        out = {"loss": round(result["loss"], 5), "bpb": round(result["bpb"], 5)}
        if not update:
            self._stored[model] = out
        return out

    def score(self, label: str, model: str, update=None, whole: bool = False) -> None:
        """Zero-shot accuracy (``assy eval``'s scoring) of a model, first seed only."""
        from assy.federation.lego import updated_model, zero_shot

        if not self.tasks or self.seed != self.seeds[0] or label in self.zero_shot:
            return
        start = time.perf_counter()
        module = updated_model(self.pool, model, update, whole)
        result = zero_shot(module, self.pool.tokenizer(model), self.tasks)
        seconds = time.perf_counter() - start
        self.zero_shot[label] = result | {"seconds": round(seconds, 1)}
        cells = ", ".join(f"{t} {r['acc_norm']:.3f}" for t, r in result.items())
        print(f"  zero-shot {label}: {cells} ({seconds:.0f} s)", flush=True)

    def train(self, cfg, variants: list[str], parts, update, round_: int):
        """Every client's round: ``(adapters, metrics)``."""
        from assy.federation.lego import lego_round, variant_values

        states, metrics = [], []
        for p, v in enumerate(variants):
            values = variant_values(update, self.masks(v)) if update else {}
            state, m = lego_round(cfg, p, v, values, round_, examples=parts[p])
            states.append(state)
            metrics.append(
                {"client": p, "model": v} | {k: round(float(x), 4) for k, x in m.items()}
            )
            print(f"    client {p} ({v}): loss {m['loss_first']:.3f} -> {m['loss_last']:.3f}, "
                  f"{m['step_seconds']:.2f} s/step", flush=True)  # fmt: skip
        return states, metrics


def _aggregate(b: Bench, states, variants, how: str, weights=None):
    from assy.federation.lego import aggregate_round

    masks = [b.masks(v) for v in variants]
    start = time.perf_counter()
    delta = aggregate_round(states, masks, b.scaling, how, weights)
    return delta, time.perf_counter() - start


def table2(b: Bench) -> dict[str, Any]:
    """Four IID clients at 0/25/50/75%; HeteAgg variants and Figure 5's leave-one-out."""
    from assy.federation.instructions import instruction_splits
    from assy.federation.lego import masked_updates

    print("table 2: four IID clients at 0/25/50/75% sparsity", flush=True)
    parts, _ = instruction_splits(b.args.data, "iid", 4, b.seed, b.args.limit)
    variants = [b.variant[s] for s in SPARSITIES]
    states, metrics = b.train(b.cfg(4), variants, parts, {}, 1)
    rows: dict[str, Any] = {"clients": metrics, "pruned": {}, "fine_tuned": {}}
    for s, v, st in zip(SPARSITIES, variants, states, strict=True):
        rows["pruned"][str(s)] = b.loss(v)
        b.score("dense (initial)" if s == 0 else f"pruned {s:.0%}", v)
        rows["fine_tuned"][str(s)] = b.loss(v, masked_updates(st, b.masks(v), b.scaling))
    counts = [len(p) for p in parts]
    rows["aggregation"] = {}
    for how in ("masked", "factors", "exact", "fedavg"):
        delta, seconds = _aggregate(b, states, variants, how, counts)
        row = {"seconds": round(seconds, 2), "global": b.loss(ANCHOR, delta, whole=True)}
        row |= {str(s): b.loss(v, delta) for s, v in zip(SPARSITIES, variants, strict=True)}
        rows["aggregation"][how] = row
        print(f"  {how}: global {row['global']['loss']:.4f}", flush=True)
        if how == "masked":
            for s, v in zip(SPARSITIES, variants, strict=True):
                b.score(f"globally updated {s:.0%}", v, delta)
    rows["leave_one_out"] = {}
    for out in range(4):
        keep = [i for i in range(4) if i != out]
        delta, _ = _aggregate(b, [states[i] for i in keep], [variants[i] for i in keep], "masked")
        row = {str(s): b.loss(v, delta) for s, v in zip(SPARSITIES, variants, strict=True)}
        rows["leave_one_out"][f"without {SPARSITIES[out]}"] = row
        print(f"  without {SPARSITIES[out]:.0%}: {row}", flush=True)
    return rows


def table1(b: Bench, split: str, clients: int) -> dict[str, Any]:
    """LEGO (all clients at 75%, HeteAgg masked) vs FedIT (dense, FedAvg), ``--rounds``."""
    from assy.federation.instructions import instruction_splits
    from assy.federation.lego import add_update

    print(f"table 1 ({split}): LEGO {clients} SLMs at 75% vs FedIT {clients} dense", flush=True)
    parts, _ = instruction_splits(b.args.data, split, clients, b.seed, b.args.limit)
    counts = [len(p) for p in parts]
    result: dict[str, Any] = {"llm_initial": b.loss(ANCHOR)}
    slm = b.variant[0.75]
    result["slms_initial"] = b.loss(slm)
    for method, model, how in (("lego", slm, "masked"), ("fedit", ANCHOR, "fedavg")):
        update: dict = {}
        per_round = []
        for r in range(1, b.args.rounds + 1):
            print(f"  {method} round {r}", flush=True)
            states, metrics = b.train(b.cfg(clients), [model] * clients, parts, update, r)
            delta, _ = _aggregate(b, states, [model] * clients, how, counts)
            update = add_update(update, delta)
            row = {"round": r, "llm_recombined": b.loss(ANCHOR, update, whole=True)}
            if split == "iid" and r == b.args.rounds:
                b.score(f"LLM recombined, {method} {split}", ANCHOR, update, whole=True)
            if method == "lego":  # every SLM is the same variant: one model, one loss
                row["slms_globally_updated"] = b.loss(slm, update)
            row["step_seconds"] = sum(m["step_seconds"] for m in metrics) / len(metrics)
            per_round.append(row)
        result[method] = per_round
    return result


def _fmt(x: dict | None) -> str:
    if x is None:
        return "-"
    if x.get("n", 1) > 1:
        return f"{x['loss']:.4f} ± {x['loss_sd']:.4f}"
    return f"{x['loss']:.4f}"


def report(results: dict[str, Any]) -> str:
    """The tables as markdown (ours: held-out loss, lower is better; paper: accuracy)."""
    lines = []
    t2 = results.get("table2")
    if t2:
        lines += _table2_lines(t2)
    lines += _table1_lines(results)
    if len(results.get("seeds", [])) > 1 and "paired" in results:
        n = len(results["seeds"])
        lines += ["", f"Paired differences of held-out loss over {n} seeds (positive: the first "
                  "named is better)", "", "| claim | mean ± sd | positive | per seed |",
                  "|---|---|---|---|"]  # fmt: skip
        for r in results["paired"]:
            per = ", ".join(f"{d:+.4f}" for d in r["diffs"])
            lines.append(
                f"| {r['claim']} | {r['mean']:+.4f} ± {r['sd']:.4f} | {r['positive']}/{n} | {per} |"
            )
    if results.get("zero_shot"):
        lines += _zero_shot_lines(results["zero_shot"])
    return "\n".join(lines)


def _zero_shot_lines(zero: dict[str, dict]) -> list[str]:
    tasks = [t for t in next(iter(zero.values())) if t != "seconds"]
    n = next(iter(zero.values()))[tasks[0]]["n"]
    lines = ["", f"Zero-shot acc_norm ± standard error (first seed, n = {n} per task; "
             "assy eval's scoring)", "", "| model | " + " | ".join(tasks) + " |",
             "|---|" + "---|" * len(tasks)]  # fmt: skip
    for label, row in zero.items():
        cells = " | ".join(
            f"{row[t]['acc_norm']:.3f} ± {row[t]['acc_norm_stderr']:.3f}" for t in tasks
        )
        lines.append(f"| {label} | {cells} |")
    return lines


def _table2_lines(t2: dict[str, Any]) -> list[str]:
    lines = []
    lines += ["Table 2 (held-out loss; paper: accuracy, higher is better)", "",
              "| stage | 0% | 25% | 50% | 75% | paper 0/25/50/75% |", "|---|---|---|---|---|---|"]  # fmt: skip
    agg = t2["aggregation"]["masked"]
    for name, row in (("pruned", t2["pruned"]), ("fine-tuned", t2["fine_tuned"]),
                      ("globally updated", agg)):  # fmt: skip
        paper = PAPER["table2"][name.replace("-", "_").replace(" ", "_")]
        cells = " | ".join(_fmt(row[str(s)]) for s in SPARSITIES)
        lines.append(f"| {name} | {cells} | {' / '.join(map(str, paper))} |")
    steps = " | ".join(f"{c['step_seconds']:.2f}" for c in t2["clients"])
    lines.append(f"| s per training step (CPU, 1 thread) | {steps} | speed-up claimed: 1.4x |")
    lines += ["", "Aggregations of the same uploaded adapters (held-out loss)", "",
              "| aggregation | global recombined | 0% | 25% | 50% | 75% | seconds |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for how, row in t2["aggregation"].items():
        cells = " | ".join(_fmt(row[str(s)]) for s in SPARSITIES)
        lines.append(f"| {how} | {_fmt(row['global'])} | {cells} | {row['seconds']} |")
    lines += ["", "Figure 5: leave one out (masked HeteAgg; held-out loss)", "",
              "| omitted | 0% | 25% | 50% | 75% |", "|---|---|---|---|---|"]  # fmt: skip
    for name, row in t2["leave_one_out"].items():
        cells = " | ".join(_fmt(row[str(s)]) for s in SPARSITIES)
        lines.append(f"| {name} | {cells} |")
    return lines


def _table1_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for key in ("table1_iid", "table1_categories"):
        t1 = results.get(key)
        if not t1:
            continue
        lines += ["", f"Table 1, {key.removeprefix('table1_')} (held-out loss, last round)", "",
                  "| composition | LLM initial | SLMs initial | SLMs globally updated | "
                  "LLM recombined | paper (accuracy) |", "|---|---|---|---|---|---|"]  # fmt: skip
        split = key.removeprefix("table1_")
        for method in ("lego", "fedit"):
            last = t1[method][-1]
            slm_init = _fmt(t1["slms_initial"]) if method == "lego" else "N/A"
            slm_upd = _fmt(last.get("slms_globally_updated")) if method == "lego" else "N/A"
            paper = " / ".join(
                "N/A" if x is None else str(x) for x in PAPER["table1"][f"{method}_{split}"]
            )
            lines.append(f"| {method} | {_fmt(t1['llm_initial'])} | {slm_init} | {slm_upd} | "
                         f"{_fmt(last['llm_recombined'])} | {paper} |")  # fmt: skip
        if len(t1["lego"]) > 1:
            per = ", ".join(_fmt(r["slms_globally_updated"]) for r in t1["lego"])
            lines.append(f"\nFigure 3: SLMs after each global update: {per}")
    return lines


def mean_over_seeds(runs: list[Any]) -> Any:
    """The runs' results cell by cell: a loss cell becomes ``{"loss": mean, "bpb": mean,
    "loss_sd": sd, "n": seeds}``, a number its mean; the other leaves are the first run's."""
    first = runs[0]
    if isinstance(first, dict) and set(first) == {"loss", "bpb"}:
        losses = [r["loss"] for r in runs]
        return {
            "loss": round(statistics.fmean(losses), 5),
            "bpb": round(statistics.fmean(r["bpb"] for r in runs), 5),
            "loss_sd": round(statistics.stdev(losses), 5) if len(runs) > 1 else 0.0,
            "n": len(runs),
        }
    if isinstance(first, dict):
        return {k: mean_over_seeds([r[k] for r in runs]) for k in first}
    if isinstance(first, list):
        return [mean_over_seeds(list(xs)) for xs in zip(*runs, strict=True)]
    if isinstance(first, int | float) and not isinstance(first, bool):
        return round(statistics.fmean(runs), 5)
    return first


def paired(per_seed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The claims as paired differences of held-out loss (b - a: positive = a is better),
    one per seed, with their mean and sd."""
    checks = [
        ("FedIT IID (4 dense) recombined vs LEGO IID (4 x 75%) recombined: LEGO - FedIT",
         lambda r: r["table1_iid"]["fedit"][-1]["llm_recombined"],
         lambda r: r["table1_iid"]["lego"][-1]["llm_recombined"]),
        ("HeteAgg masked vs factors (= FedAvg) on the global model: factors - masked",
         lambda r: r["table2"]["aggregation"]["masked"]["global"],
         lambda r: r["table2"]["aggregation"]["factors"]["global"]),
        ("HeteAgg masked vs exact on the global model: exact - masked",
         lambda r: r["table2"]["aggregation"]["masked"]["global"],
         lambda r: r["table2"]["aggregation"]["exact"]["global"]),
    ]  # fmt: skip
    for s in SPARSITIES:
        checks += [
            (f"{s:.0%}: fine-tuned vs pruned: pruned - fine-tuned",
             lambda r, s=s: r["table2"]["fine_tuned"][str(s)],
             lambda r, s=s: r["table2"]["pruned"][str(s)]),
            (f"{s:.0%}: globally updated vs fine-tuned: fine-tuned - globally updated",
             lambda r, s=s: r["table2"]["aggregation"]["masked"][str(s)],
             lambda r, s=s: r["table2"]["fine_tuned"][str(s)]),
        ]  # fmt: skip
    for out in SPARSITIES:  # Figure 5: does leaving a client out hurt the dense model?
        checks.append(
            (f"dense model without the {out:.0%} client: without - with",
             lambda r: r["table2"]["aggregation"]["masked"]["0.0"],
             lambda r, out=out: r["table2"]["leave_one_out"][f"without {out}"]["0.0"])
        )  # fmt: skip
    rows = []
    for name, a, b in checks:
        diffs = [round(b(r)["loss"] - a(r)["loss"], 5) for r in per_seed]
        rows.append({
            "claim": name, "diffs": diffs, "mean": round(statistics.fmean(diffs), 5),
            "sd": round(statistics.stdev(diffs), 5) if len(diffs) > 1 else 0.0,
            "positive": sum(d > 0 for d in diffs),
        })  # fmt: skip
    return rows


def main() -> None:
    args = _args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    b = Bench(args)
    results: dict[str, Any] = {
        "command": "benchmarks/lego_fl.py "
        + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (False, "")
        ),
        "machine": f"{platform.machine()}, torch {torch.__version__}, 1 thread",
        "variants": b.made,
        "prune_seconds": round(b.prune_seconds, 1),
        "test_rows": len(b.test),
        "seeds": b.seeds,
    }
    per_seed = []
    if not args.only_categories:
        for seed in b.seeds:
            b.seed = seed
            print(f"seed {seed}", flush=True)
            per_seed.append({"table2": table2(b), "table1_iid": table1(b, "iid", 4)})
        results["per_seed"] = per_seed
        results |= mean_over_seeds(per_seed)
        results["paired"] = paired(per_seed)
    if not args.skip_categories:
        b.seed = b.seeds[0]
        results["table1_categories"] = table1(b, "categories", 8)
    if b.tasks:
        results["zero_shot"] = b.zero_shot
    results["evaluations"] = b.evals
    results["eval_seconds"] = round(b.eval_seconds, 1)
    results["seconds"] = round(time.perf_counter() - start, 1)
    results["report"] = report(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(results["report"])
    print(
        f"\n{results['seconds']:.0f} s ({b.evals} evaluations, {b.eval_seconds:.0f} s) -> {args.out}"
    )


if __name__ == "__main__":
    main()

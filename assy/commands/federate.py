"""``assy federate``: federated rounds on Flower (simulation in-process, or a deployment)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from assy.commands.common import progress_bars, user_errors

__all__ = ["federate_cmd"]


@click.command("federate")
@click.argument("pool", type=click.Path(path_type=Path))
@click.option(
    "--task",
    type=click.Choice(["arc_easy", "obqa", "boolq", "piqa", "mix", "dolly"]),
    required=True,
    help="A multiple-choice task, or dolly: instructions (databricks-dolly-15k) for lego.",
)
@click.option("--method", type=click.Choice(["assy", "fedit", "local", "lego"]), required=True)
@click.option(
    "--rounds", type=int, required=True, help="Rounds to run (a resumed run may add more)."
)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output directory.")
@click.option("--clients", default=20, show_default=True, help="Clients (the seed: 200).")
@click.option(
    "--per-round", default=5, show_default=True, help="Clients sampled per round (the seed: 20)."
)
@click.option("--alpha", default=1.0, show_default=True, help="Dirichlet concentration (non-IID).")
@click.option("--split", type=click.Choice(["labels", "tasks", "fed10", "iid", "categories"]),
              help="Multiple choice: labels (default; skew answer labels) or tasks (mix tasks "
              "per client, --task mix). dolly: fed10 (default; FedIT's 10 category-skewed "
              "clients), iid, or categories (one client per category).")  # fmt: skip
@click.option("--tiers", help="seed | lego | none | FILE.json (default: lego for --method lego, "
              "else seed).")  # fmt: skip
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--engine",
    type=click.Choice(["simulation", "deployment"]),
    default="simulation",
    show_default=True,
)
@click.option("--data", type=click.Path(path_type=Path),
              help="Your own multiple-choice .jsonl; for dolly the directory of FedIT's split "
              "(default ../shared/data/dolly-fed10).")  # fmt: skip
@click.option("--anchor", default="", help="Pool model fedit/local train (default: the largest).")
@click.option("--limit", default=0, help="First N examples of each task only (0: all).")
@click.option("--test-limit", default=200, show_default=True, help="Held-out examples scored.")
@click.option("--lora-rank", default=8, show_default=True)
@click.option(
    "--local-steps", default=10, show_default=True, help="Training steps per client round."
)
@click.option("--batch-size", default=4, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--max-length", default=256, show_default=True, help="Tokens per training example.")
@click.option("--round-timeout", default=0.0, help="Seconds to wait for clients (0: all).")
@click.option("--candidates", default=3, show_default=True,
              help="assy: assemblies proposed per tier (the planner's best).")  # fmt: skip
@click.option("--max-seams", default=2, show_default=True,
              help="assy: the most seams a proposed assembly may have.")  # fmt: skip
@click.option("--select-rounds", default=1, show_default=True,
              help="assy: forward-only selection rounds before the adapter rounds.")  # fmt: skip
@click.option("--fit-samples", default=32, show_default=True,
              help="assy: public-text windows the server fits candidates' adapters on.")  # fmt: skip
@click.option("--compat", type=click.Path(path_type=Path),
              help="assy: an assy compare output of this pool; the planner scores seams with "
              "its compatibility matrix (as assy assemble --compat). Default: the depth "
              "fallback.")  # fmt: skip
@click.option(
    "--sparsities",
    default="0,0.25,0.5,0.75",
    show_default=True,
    help="lego: the variants' sparsities, taken by the tiers from the largest.",
)
@click.option(
    "--prune",
    type=click.Choice(["sparsegpt", "wanda", "magnitude"]),
    default="sparsegpt",
    show_default=True,
    help="lego: how the variants are pruned (made into the pool once, reused).",
)
@click.option("--heteagg", type=click.Choice(["masked", "factors", "exact"]), default="masked",
              show_default=True, help="lego: Algorithm 2 on (s·B·A)⊙M, on A and B apart (= "
              "FedAvg), or on the masked products re-factored by SVD.")  # fmt: skip
@click.option("--zero-shot", default="", metavar="TASKS",
              help="lego: tasks of assy eval (e.g. arc_easy,arc_challenge,sciq,hellaswag,mmlu) "
              "on which the dense global model and every variant are scored zero-shot (acc, "
              "acc_norm) before training and after each round. Default: none.")  # fmt: skip
@click.option("--zero-shot-limit", default=100, show_default=True,
              help="lego: the first N examples of each --zero-shot task (of each mmlu "
              "subject).")  # fmt: skip
@click.option("--measure-memory", is_flag=True,
              help="Per device tier (and, for assy, per phase: select, adapt), run one "
              "client's round alone in a fresh process from what the server sends it and "
              "record its peak memory in rounds.jsonl (client_memory): what a device needs, "
              "which a reused simulation worker's peak is not. Adds one round's time per "
              "tier.")  # fmt: skip
@click.option("--secagg", is_flag=True,
              help="Secure aggregation (Flower's SecAgg+) for the adapter rounds of fedit and "
              "assy (assy's selection rounds stay plain): the server sees only the weighted "
              "average of each round's adapters, never one client's; per-client screening "
              "is off in those rounds. Four message exchanges per aggregation instead of "
              "one; needs 2 or more clients per round; not with local or lego.")  # fmt: skip
@click.option(
    "--cpus", type=int, help="Simulation: clients computing side by side (default: all CPUs)."
)
@click.option("--superlink", help="Deployment: the SuperLink's HOST:PORT.")
@click.option(
    "--root-certificates", type=click.Path(path_type=Path), help="Deployment: the CA (PEM)."
)
@click.option("--insecure", is_flag=True, help="Deployment: no TLS (tests only).")
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object (progress goes to stderr)."
)
@user_errors
def federate_cmd(
    pool, out, data, compat, cpus, superlink, root_certificates, insecure, as_json, **settings
) -> None:
    """Federate on --task: --method assy, fedit, local, or lego (--task dolly).

    assy (AssyLLM): the server proposes, per device tier, the planner's best assemblies
    within the tier's budget (adapters fitted in closed form on public text); clients score
    them forward-only on their data within their budget and vote; the winners' adapters
    are then trained by the clients and averaged. The planner scores seams with an assy
    compare output's compatibility (--compat DIR), else with its depth fallback.

    fedit: LoRA on the anchor, FedAvg; local: each client alone (the baseline).

    lego: each client's tier holds a pruned variant of the anchor, trains a
    sparsity-preserving LoRA on its instructions; the server aggregates with HeteAgg and
    writes the update back to every variant (only where non-zero) and to the dense
    anchor; rounds report the held-out instruction loss of both (and, with --zero-shot,
    their zero-shot accuracy, scored as assy eval scores).

    Writes OUT/rounds.jsonl (one line per round), accuracy/participation/bytes PNGs and the
    final adapter under OUT/final (lego: the global update G and the global model as a pool,
    OUT/final/pool, for assy eval: the last line prints the command); the server's state is
    saved after every round, so a killed run started again with the same options resumes.
    """
    from assy.federation.config import FederationConfig
    from assy.federation.engine import SuperLinkTarget, check_run, run_federation
    from assy.federation.progress import RoundProgress

    lego = settings["method"] == "lego"
    settings["tiers"] = settings["tiers"] or ("lego" if lego else "seed")
    settings["split"] = settings["split"] or ("fed10" if settings["task"] == "dolly" else "labels")
    cfg = FederationConfig(
        pool=str(pool), out=str(out), data=str(data or ""), compat=str(compat or ""), **settings
    )
    summary = check_run(cfg, lambda line: click.echo(line, err=as_json), progress_bars())
    target = SuperLinkTarget(superlink, root_certificates, insecure) if superlink else None
    with RoundProgress(cfg.rounds, stderr=as_json) as progress:
        progress.log(summary)
        run_federation(cfg, progress.log, target=target, cpus=cpus, on_round=progress.round_done)
    if as_json:
        written = out / "rounds.jsonl"  # a deployment writes it on the SuperLink's host
        rounds = (
            [json.loads(x) for x in written.read_text().splitlines()] if written.is_file() else None
        )
        doc = {"run": summary, "out": str(out), "rounds": rounds}
        if cfg.method == "assy":
            from assy.assembly.planner import compat_source

            doc["compatibility"] = compat_source(cfg.compat)
        click.echo(json.dumps(doc))

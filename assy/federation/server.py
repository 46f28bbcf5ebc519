"""The server's rounds on a Flower grid: discover, sample, send, screen, aggregate, save.

:func:`run_server` is what the ServerApp's ``main`` calls, on the simulation and on the
deployment engine alike. Each method's own server side is in :mod:`~.methods`; the work
that needs no Flower lives in :mod:`~.task`, :mod:`~.strategy`, :mod:`~.state` and
:mod:`~.tiers`; this module turns it into messages and rounds.

Flower facts it is built on (flwr 1.42): replies come back from whoever answered within
the round's timeout; a failed client answers with an error message, a slow one not at all,
and its work is not cancelled: it keeps its worker busy. So a client whose reply is missing
stays *pending*, is not sampled again until its late reply shows up, and the round goes on
with the others.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from assy.errors import UsageError
from assy.federation import task
from assy.federation.config import FederationConfig
from assy.federation.methods import ROUNDS, metric
from assy.federation.records import (
    CONFIG,
    METRICS,
    WARM_UP,
    content_bytes,
    error_reason,
    payload_bytes,
)
from assy.federation.state import ServerState
from assy.federation.strategy import sample_clients, state_digest
from assy.federation.tiers import Population, Tier, assign_tiers, load_tiers
from blockpool import format_size

__all__ = [
    "Population",
    "discover",
    "measure_tiers",
    "plan_population",
    "run_round",
    "run_server",
]

DISCOVERY_TIMEOUT = 900.0
Log = Callable[[str], None]


def discover(
    grid: Grid, num_clients: int, log: Log, warm_up: bool, timeout: float = DISCOVERY_TIMEOUT
) -> dict[int, int]:
    """Map each ``partition-id`` to its node: every node answers a query from its node config.

    Waits for ``num_clients`` nodes to connect. This first exchange also absorbs the
    engine's start (Ray's ~12 s in simulation) and, with ``warm_up``, the workers' imports,
    so that the first round is not cut by a timeout.

    Returns:
        partition id -> node id, for the nodes that answered.
    """
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < num_clients:
        if time.monotonic() > deadline:
            raise UsageError(
                f"only {len(nodes)} of {num_clients} clients connected in {timeout:.0f} s"
            )
        time.sleep(0.2)
    query = RecordDict({CONFIG: ConfigRecord({"ask": "partition-id", WARM_UP: warm_up})})
    messages = [Message(query, node, MessageType.QUERY) for node in nodes]
    node_of: dict[int, int] = {}
    for reply in grid.send_and_receive(messages, timeout=max(1.0, deadline - time.monotonic())):
        if not reply.has_content():
            continue
        said = reply.content[METRICS]
        if int(said["num-partitions"]) not in (0, num_clients):
            raise UsageError(
                f"a client's node config says num-partitions={int(said['num-partitions'])}, "
                f"the run has --clients {num_clients}; make them agree"
            )
        node_of[int(said["partition-id"])] = reply.metadata.src_node_id
    unknown = sorted(set(range(num_clients)) - set(node_of))
    if unknown:
        log(f"warning: {len(unknown)} client(s) did not answer the discovery: {unknown[:10]}")
    if not node_of:
        raise UsageError("no client answered; check that the SuperNodes run assy's ClientApp")
    return node_of


# --------------------------------------------------------------------------- rounds


def _ideal_makespan(durations: list[float], slots: int | None) -> float:
    """How long the clients' own compute takes on ``slots`` workers taking them in order
    (``None``: one worker each). The rest of a round's wall time is the engine's."""
    if not durations:
        return 0.0
    if slots is None:
        return max(durations)
    busy = [0.0] * max(1, slots)
    for d in durations:
        busy[busy.index(min(busy))] += d
    return max(busy)


def _free_pending(grid: Grid, pending: dict[int, str], log: Log) -> None:
    """Clients whose late reply has come in are free again; the late reply is dropped."""
    if not pending:
        return
    ids = {m: p for p, m in pending.items()}
    for late in grid.pull_messages(list(ids)):
        p = ids[late.metadata.reply_to_message_id]
        log(f"  client {p}: late reply arrived and was dropped; it can be sampled again")
        del pending[p]


EXTRA_FIELDS = ("chosen", "votes", "peak_resident_bytes", "per_tier")
"""A method's own fields of a round's record (``assy``: choices, votes, per-tier scores)."""


def run_round(
    grid: Grid,
    method,
    pop: Population,
    cfg: FederationConfig,
    round_: int,
    pending: dict[int, str],
    log: Log,
    slots: int | None = None,
) -> dict[str, Any]:
    """Sample, send, collect whoever answers in time, aggregate: one round's record."""
    start = time.perf_counter()
    _free_pending(grid, pending, log)
    available = [p for p in pop.eligible if p in pop.node_of and p not in pending]
    picked = sample_clients(available, cfg.per_round, cfg.seed, round_)
    secure = method.secure_groups(round_, picked, pop) if cfg.secagg else None
    if secure is not None:  # --secagg, an adapter round: SecAgg+ per group
        return _secure_round(grid, method, pop, cfg, round_, picked, secure, pending, start)
    per_client = getattr(method, "content_for", None)  # lego: each variant its own part
    shared = None if per_client else method.content(round_)
    contents = {p: per_client(round_, p) if per_client else shared for p in picked}
    down = sum(content_bytes(c) for c in contents.values())
    sent = {
        p: Message(contents[p], pop.node_of[p], MessageType.TRAIN, group_id=str(round_))
        for p in picked
    }
    comm_start = time.perf_counter()
    replies = grid.send_and_receive(list(sent.values()), timeout=cfg.round_timeout or None)
    comm = time.perf_counter() - comm_start
    by_node = {r.metadata.src_node_id: r for r in replies}
    ok, failed, missing = {}, [], []
    for p, msg in sent.items():
        reply = by_node.get(pop.node_of[p])
        if reply is None:
            missing.append(p)
            pending[p] = msg.metadata.message_id
        elif reply.has_error():
            failed.append({"client": p, "reason": error_reason(reply)})
        else:
            ok[p] = reply
    seconds = [s for r in ok.values() if (s := metric(r, "client-seconds")) is not None]
    fields = method.aggregate(ok, pop)
    engine = max(0.0, comm - _ideal_makespan(seconds, slots))
    return {
        "round": round_,
        "method": cfg.method,
        "sampled": picked,
        "participants": pop.by_tier(ok),
        "failed": failed,
        "missing": missing,
        "accepted": fields["accepted"],
        "rejected": fields["rejected"],
        "aggregation": fields["aggregation"],
        "global_sha256": fields.get("global_sha256"),
        **{k: fields[k] for k in EXTRA_FIELDS if k in fields},
        "accuracy": fields.get("acc"),
        "acc_norm": fields.get("acc_norm"),
        "n_test": fields.get("n"),
        "train_loss": _mean([metric(r, "loss_last") for r in ok.values()]),
        "bytes_down": down,
        "bytes_up": sum(payload_bytes(r) for r in ok.values()),
        "client_seconds": sum(seconds),
        "comm_seconds": comm,
        "engine_seconds": engine,
        "engine_share": engine / comm if comm > 0 else 0.0,
        "wall_seconds": time.perf_counter() - start,
        **_client_metrics(ok),
        **fields.get("extra", {}),
    }


SCREENING_OFF = (
    "per-client screening is off under SecAgg+ (the server never sees one update); "
    "the aggregate was checked (names, shapes, finite) before it was applied"
)


def _secure_round(
    grid: Grid, method, pop: Population, cfg: FederationConfig, round_: int,
    picked: list[int], secure, pending: dict[int, str], start: float,
) -> dict[str, Any]:  # fmt: skip
    """An adapter round under ``--secagg``: Flower's SecAgg+ workflow once per group of
    clients training the same adapter (:func:`~.secagg.run_group`); the record has the
    plain round's fields, its bytes and seconds those of every SecAgg+ stage."""
    from assy.federation.secagg import STAGES, run_group

    groups, left_out = secure
    outcomes = {}
    comm_start = time.perf_counter()
    for group in groups:
        outcomes[group.name] = run_group(
            grid, group, pop.node_of, pop.sizes, round_, cfg.round_timeout or None
        )
    comm = time.perf_counter() - comm_start
    fields = method.secure_apply(outcomes, pop)
    failed = [f for o in outcomes.values() for f in o.failed]
    missing = sorted(p for o in outcomes.values() for p in o.missing)
    for o in outcomes.values():
        pending.update(o.pending)
    summed = {p: m for o in outcomes.values() for p, m in o.metrics.items() if p in o.summed}
    seconds = [m["client-seconds"] for m in summed.values() if "client-seconds" in m]
    engine = max(0.0, comm - _ideal_makespan(seconds, None))
    stages = [
        {"stage": STAGES[i] if i < len(STAGES) else str(i), "bytes_down": down, "bytes_up": up,
         "seconds": sec}
        for o in outcomes.values()
        for i, (down, up, sec) in enumerate(zip(o.bytes_down, o.bytes_up, o.seconds, strict=True))
    ]  # fmt: skip
    return {
        "round": round_,
        "method": cfg.method,
        "sampled": picked,
        "participants": pop.by_tier(fields["accepted"]),
        "failed": failed,
        "missing": missing,
        "accepted": fields["accepted"],
        "rejected": [],
        "aggregation": fields["aggregation"],
        "global_sha256": fields.get("global_sha256"),
        **{k: fields[k] for k in EXTRA_FIELDS if k in fields},
        "accuracy": fields.get("acc"),
        "acc_norm": fields.get("acc_norm"),
        "n_test": fields.get("n"),
        "train_loss": _mean([m.get("loss_last") for m in summed.values()]),
        "bytes_down": sum(x["bytes_down"] for x in stages),
        "bytes_up": sum(x["bytes_up"] for x in stages),
        "client_seconds": sum(seconds),
        "comm_seconds": comm,
        "engine_seconds": engine,
        "engine_share": engine / comm if comm > 0 else 0.0,
        "wall_seconds": time.perf_counter() - start,
        "secagg": {
            "screening": SCREENING_OFF,
            "groups": {
                name: {**o.settings, "summed": o.summed, "aggregate": o.problem or "ok"}
                for name, o in outcomes.items()
            },
            "left_out": left_out,
            "stages": stages,
        },
        **fields.get("extra", {}),
    }


def _client_metrics(ok: dict[int, Message]) -> dict[str, Any]:
    """Resource accounting per client (lego): step time, peak memory, adapter bytes."""
    keys = ("step_seconds", "peak-rss-bytes", "adapter-bytes", "sparsity", "loss_last")
    rows = {
        str(p): {k: v for k in keys if (v := metric(r, k)) is not None}
        for p, r in sorted(ok.items())
    }
    return {"clients": rows} if any("sparsity" in r for r in rows.values()) else {}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


# --------------------------------------------------------------------------- the run


def _memory_need(cfg: FederationConfig, tiers: list[Tier], state: ServerState, log: Log) -> int:
    """The method's measured per-client need (bytes), measured once and kept in the state."""
    if "need_bytes" not in state.facts:
        need = 0
        # assy: forward-only selection runs within each tier's budget (the swapper), and
        # a tier takes part where the planner finds an assembly that fits it
        if cfg.method != "assy" and any(t.budget is not None for t in tiers):
            from assy.federation.memory import measure_client_memory

            log("measuring one client's training memory in a fresh process ...")
            measured = measure_client_memory(cfg, "train")
            need = measured["need_bytes"]
            state.facts["memory"] = measured
        state.facts["need_bytes"] = need
    return int(state.facts["need_bytes"])


def plan_population(cfg, pool, data, state: ServerState, log: Log) -> Population:
    """Tiers, each client's tier, its data size, and who can take part: the method's
    memory need is measured once (in a fresh process) and kept in ``state.facts``."""
    tiers = load_tiers(cfg.tiers, list(task.model_bytes(pool).values()))
    tier_of = assign_tiers(cfg.clients, tiers, cfg.seed)
    # lego: a tier picks the sparsity of its variant; pruned weights are stored dense, so
    # every variant needs the anchor's memory and no tier is measured against a budget
    need = 0 if cfg.method == "lego" else _memory_need(cfg, tiers, state, log)
    fits = [t.budget is None or t.budget >= need for t in tiers]
    eligible = [p for p in range(cfg.clients) if fits[tier_of[p]]]
    if cfg.secagg and 0 < len(eligible) < 2:
        raise UsageError(
            f"--secagg needs at least 2 clients per round, and only {len(eligible)} client "
            f"can take part ({cfg.method} needs {format_size(need)} per client); use more "
            "--clients, a tiers file with more memory, or drop --secagg"
        )
    state.facts["tiers"] = [
        {"name": t.name, "share": t.share, "budget": t.budget, "takes_part": f}
        for t, f in zip(tiers, fits, strict=True)
    ]
    if not eligible:
        largest = max(tiers, key=lambda t: t.budget or 0)
        raise UsageError(
            f"no client can take part: {cfg.method} needs {format_size(need)} per client "
            f"(measured), the largest tier {largest.describe()} holds less; "
            "use --tiers none or a tiers file with more memory"
        )
    sizes = [len(c) for c in data.clients]
    return Population({}, tiers, tier_of, sizes, eligible)


def _progress_line(record: dict[str, Any], rounds: int) -> str:
    acc, loss = record["accuracy"], record.get("heldout_loss")
    parts = ", ".join(f"{t} {n}" for t, n in record["participants"].items() if n)
    score = f"held-out loss {loss:.4f}" if loss is not None else (
        f"accuracy {'-' if acc is None else f'{acc:.4f}'}"
    )  # fmt: skip
    line = (
        f"round {record['round']}/{rounds}: {score}, "
        f"{len(record['accepted'])} aggregated ({parts or 'none'}), "
        f"up {record['bytes_up']} B, down {record['bytes_down']} B, {record['wall_seconds']:.1f} s"
    )
    if record.get("client_loss"):
        line += "; variants " + ", ".join(f"{v} {x:.4f}" for v, x in record["client_loss"].items())
    line += zero_shot_lines(record)
    problems = len(record["failed"]) + len(record["missing"]) + len(record["rejected"])
    if problems:
        line += (
            f"; {len(record['failed'])} failed, {len(record['missing'])} missing, "
            f"{len(record['rejected'])} rejected"
        )
    for r in record["rejected"]:
        line += f"\n  rejected client {r['client']}: {r['reason']}"
    secagg = record.get("secagg")
    if secagg:
        line += (
            f"; SecAgg+ over {len(record['accepted'])} clients, {len(secagg['stages'])} exchanges"
        )
        for name, g in secagg["groups"].items():
            if g["aggregate"] != "ok":
                line += f"\n  secagg group {name}: {g['aggregate']}"
        for x in secagg["left_out"]:
            line += f"\n  left out client {x['client']}: {x['reason']}"
    for f in record["failed"]:
        line += f"\n  failed client {f['client']}: {f['reason']}"
    return line


def measure_tiers(
    method, pop: Population, cfg: FederationConfig, round_: int, state: ServerState, log: Log
) -> dict[str, dict[str, Any]]:
    """``--measure-memory``: per tier, the first time a round of a phase (``train``; for
    ``assy`` ``select`` or ``adapt``) comes, one client of that tier runs the round alone in
    a fresh process from the content this round sends it (:func:`~.memory.measure_round`).

    Kept in ``state.facts["client_memory"][phase][tier]`` (a resumed run does not redo
    them); once every tier of a phase is, its rounds build nothing here. Returns this
    round's new measurements, ``{tier: result}``.
    """
    from assy.federation.memory import measure_round

    phase = method.phase(round_) if hasattr(method, "phase") else "train"
    done = state.facts.setdefault("client_memory", {}).setdefault(phase, {})
    todo = [  # (tier, its first client) of the tiers not measured in this phase yet
        (tier, members[0])
        for index, tier in enumerate(pop.tiers)
        if tier.name not in done
        and (members := [p for p in pop.eligible if pop.tier_of[p] == index])
    ]
    if not todo:  # every tier measured in this phase: build nothing
        return {}
    per_client = getattr(method, "content_for", None)
    shared = None if per_client else method.content(round_)
    measured = {}
    for tier, client in todo:
        content = per_client(round_, client) if per_client else shared
        result = measure_round(content, client, cfg.clients)
        result |= {"phase": phase, "round": round_, "budget": tier.budget}
        done[tier.name] = measured[tier.name] = result
        log(
            f"client memory, tier {tier.name} ({phase}): {format_size(result['need_bytes'])} "
            f"above a fresh process's floor (client {client} alone, {result['seconds']:.0f} s)"
        )
    return measured


def zero_shot_lines(record: dict[str, Any]) -> str:
    """lego's ``--zero-shot`` results of a round, one line per task: ``acc/acc_norm`` of
    the dense global model, then of each variant (``""`` without them)."""
    glob = record.get("zero_shot") or {}
    lines = ""
    for name, scores in glob.items():
        models = {"global": scores} | {
            v: per[name] for v, per in (record.get("client_zero_shot") or {}).items()
        }
        shown = ", ".join(f"{m} {s['acc']:.3f}/{s['acc_norm']:.3f}" for m, s in models.items())
        lines += f"\n  zero-shot {name} acc/acc_norm (n={scores['n']}): {shown}"
    return lines


def _round_zero(method, state: ServerState) -> dict[str, Any]:
    """Round 0: the held-out accuracy before any training (the shared baseline)."""
    scores = method.evaluate(method.global_state)
    empty = dict.fromkeys(("sampled", "failed", "missing", "accepted", "rejected"), [])
    timing = dict.fromkeys(("client_seconds", "comm_seconds", "engine_seconds"), 0.0)
    return {
        "round": 0,
        "method": state.config["method"],
        **empty,
        "participants": {},
        "aggregation": "none",
        "global_sha256": state_digest(method.global_state) if method.global_state else None,
        **({"per_tier": scores["per_tier"]} if "per_tier" in scores else {}),
        "accuracy": scores.get("acc"),
        "acc_norm": scores.get("acc_norm"),
        "n_test": scores.get("n"),
        "train_loss": None,
        "bytes_down": 0,
        "bytes_up": 0,
        **timing,
        "engine_share": 0.0,
        "wall_seconds": 0.0,
        **scores.get("extra", {}),
    }


def run_server(
    grid: Grid,
    cfg: FederationConfig,
    log: Log = print,
    slots: int | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> ServerState:
    """Run (or resume) the federation of ``cfg`` on ``grid`` up to ``cfg.rounds``.

    Args:
        grid: Flower's grid (simulation or deployment).
        cfg: the run.
        log: where progress lines go.
        slots: parallel ClientApp workers (simulation: Ray actors), for the engine's share.
        on_round: called with each finished round's record (e.g. a progress bar).

    Returns:
        The final state (also on disk under ``cfg.out``).
    """
    from assy.federation.plots import plot_run
    from blockpool import Pool

    state = ServerState.open(cfg)
    pool = Pool(cfg.pool)
    anchor = task.anchor_model(pool, cfg.anchor)
    data = task.federated_data(cfg)
    pop = plan_population(cfg, pool, data, state, log)
    method = ROUNDS[cfg.method](cfg, pool, anchor, data, state)
    if hasattr(method, "takes_part"):
        pop.eligible = [
            p for p in pop.eligible if method.takes_part(pop.tiers[pop.tier_of[p]].name)
        ]
        if not pop.eligible:
            raise UsageError(
                "no client can take part: no tier's budget holds an assembly of this pool; "
                "use --tiers none or a tiers file with more memory"
            )
    if state.round == 0 and not state.history:
        state.commit(_round_zero(method, state), method.global_state)
        if state.history[0].get("heldout_loss") is not None:  # lego: the pruned baseline
            log(f"round 0 (before training): held-out loss {state.history[0]['heldout_loss']:.4f}"
                f"{zero_shot_lines(state.history[0])}")  # fmt: skip
    elif state.round:
        log(f"resuming {cfg.out} after round {state.round}")
    tier_names = [t.name for t in pop.tiers]
    pop.node_of = discover(grid, cfg.clients, log, warm_up=cfg.engine == "simulation")
    pending: dict[int, str] = {}
    for round_ in range(state.round + 1, cfg.rounds + 1):
        measured = measure_tiers(method, pop, cfg, round_, state, log) if cfg.measure_memory else {}
        record = run_round(grid, method, pop, cfg, round_, pending, log, slots)
        if measured:
            record["client_memory"] = {
                t: {k: m[k] for k in ("phase", "need_bytes", "peak_rss_bytes", "budget")}
                for t, m in measured.items()
            }
        state.commit(record, method.global_state)
        plot_run(Path(cfg.out), cfg.method, state.history, tier_names)
        log(_progress_line(record, cfg.rounds))
        if on_round is not None:
            on_round(record)
    plot_run(Path(cfg.out), cfg.method, state.history, tier_names)
    final = method.finish(Path(cfg.out))
    log(f"done: {state.round} rounds -> {cfg.out}/rounds.jsonl, {final}")
    if getattr(method, "eval_command", None):  # lego: the global model as a pool
        log(f"the global model, for assy eval: {method.eval_command}")
    return state

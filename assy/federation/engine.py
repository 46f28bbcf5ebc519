"""Start a federated run on Flower: the simulation in this process, or a deployment.

Simulation (the default): Flower's simulation engine with its Ray backend, started from
``assy federate`` itself; one CPU per virtual client, so ``cpus`` clients compute side by
side. Ray's start (~12 s) falls into the server's discovery exchange, not into a round.

Deployment: the same ServerApp and ClientApp on a running Flower SuperLink and its
SuperNodes (``docs/federation.md``): this writes a minimal Flower app (a ``pyproject.toml``
naming ``assy.federation.server_app:app`` and ``...client_app:app``, the run's settings as
its config) and submits it with ``flwr run``, streaming the server's log.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from assy.errors import UsageError
from assy.federation.config import FederationConfig
from assy.federation.memory import CLIENT_MALLOC_ENV
from assy.federation.quiet import quiet_flower
from assy.federation.server import Log, plan_population

__all__ = ["SuperLinkTarget", "run_deployment", "run_federation", "run_simulation"]


def run_simulation(
    cfg: FederationConfig,
    log: Log = print,
    client_mods: Sequence = (),
    cpus: int | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Run ``cfg`` on Flower's simulation engine (Ray) in this process.

    Args:
        cfg: the run.
        log: where the server's progress lines go.
        client_mods: Flower mods wrapped around every ClientApp call (tests inject faults
            and capture messages with them).
        cpus: CPUs Ray may use, one per concurrent virtual client (default: all).
        on_round: called with each finished round's record.
    """
    quiet_flower()
    os.environ.setdefault("FLWR_HOME", str(Path(cfg.out).resolve() / ".flwr"))
    for key, value in CLIENT_MALLOC_ENV.items():  # Ray's workers start with this environment
        os.environ.setdefault(key, value)
    from flwr.simulation import run_simulation as flower_run_simulation

    from assy.federation.client_app import make_client_app
    from assy.federation.server_app import make_server_app

    cpus = cpus or os.cpu_count() or 1
    backend = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "num_gpus": 0, "logging_level": "ERROR",
                      "log_to_driver": False},
    }  # fmt: skip
    flower_run_simulation(
        server_app=make_server_app(cfg, log, min(cpus, cfg.clients), on_round),
        client_app=make_client_app(client_mods),
        num_supernodes=cfg.clients,
        backend_config=backend,
    )


@dataclass(frozen=True)
class SuperLinkTarget:
    """Where a deployment's SuperLink listens and how to trust it.

    Attributes:
        address: ``host:port`` of the SuperLink's HTTP API (``flower-superlink --port``).
        root_certificates: the CA certificate (PEM) that signed the SuperLink's TLS
            certificate; ``None`` with ``insecure``.
        insecure: talk without TLS (only for a SuperLink started with ``--insecure``).
    """

    address: str
    root_certificates: Path | None = None
    insecure: bool = False


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_flower_app(cfg: FederationConfig, directory: Path) -> Path:
    """The Flower app ``flwr run`` submits: a ``pyproject.toml`` naming assy's apps, the
    run's settings as its config. The apps come from the ``assy`` installed on each host."""
    directory.mkdir(parents=True, exist_ok=True)
    config = "\n".join(f'"{k}" = {_toml(v)}' for k, v in cfg.to_record().items())
    (directory / "pyproject.toml").write_text(
        f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "assy-federation"
version = "1.0.0"
description = "assy federate: the run's settings for assy's ServerApp and ClientApp"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "assy"

[tool.flwr.app.components]
serverapp = "assy.federation.server_app:app"
clientapp = "assy.federation.client_app:app"

[tool.flwr.app.config]
{config}
"""
    )
    return directory


def _write_connection(home: Path, target: SuperLinkTarget) -> None:
    lines = ["[superlink]", 'default = "assy"', "", "[superlink.assy]"]
    lines.append(f"address = {_toml(target.address)}")
    if target.insecure:
        lines.append("insecure = true")
    elif target.root_certificates is not None:
        lines.append(f"root-certificates = {_toml(target.root_certificates.resolve())}")
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text("\n".join(lines) + "\n")


def run_deployment(cfg: FederationConfig, target: SuperLinkTarget, log: Log = print) -> None:
    """Submit ``cfg`` to a running SuperLink with ``flwr run`` and stream its log.

    The ServerApp runs where the SuperLink runs, so ``cfg.out`` and ``cfg.pool`` are paths
    on that host; each SuperNode host needs assy installed (and its pool/data, see
    ``--node-config``).
    """
    beside = Path(sys.executable).with_name("flwr")  # the flwr of this environment first
    flwr = str(beside) if beside.exists() else shutil.which("flwr")
    if flwr is None:
        raise UsageError("the deployment engine needs Flower's `flwr` command on PATH")
    out = Path(cfg.out).resolve()
    app = write_flower_app(cfg, out / ".flwr-app")
    home = out / ".flwr-cli"
    _write_connection(home, target)
    package_root = str(Path(__file__).resolve().parents[2])  # flwr run imports the apps
    path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, FLWR_HOME=str(home), PYTHONPATH=path)
    env |= {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    with subprocess.Popen(
        [flwr, "run", str(app), "assy", "--stream"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    ) as proc:  # fmt: skip
        for line in proc.stdout or ():
            if line.strip():
                log(line.rstrip())
    if proc.returncode != 0:
        raise UsageError(f"flwr run failed (exit {proc.returncode}); see the lines above")


def run_federation(
    cfg: FederationConfig,
    log: Log = print,
    *,
    target: SuperLinkTarget | None = None,
    client_mods: Sequence = (),
    cpus: int | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Run ``cfg`` on its engine; returns the output directory.

    Raises:
        UsageError: a deployment without a SuperLink address.
    """
    done = _finished_rounds(cfg)
    if done >= cfg.rounds:
        log(f"nothing to do: {cfg.out} already holds {done} rounds (ask for more with --rounds)")
        return Path(cfg.out)
    if cfg.engine == "simulation":
        run_simulation(cfg, log, client_mods, cpus, on_round)
    else:
        if target is None:
            raise UsageError("--engine deployment needs --superlink HOST:PORT")
        run_deployment(cfg, target, log)
    return Path(cfg.out)


def _finished_rounds(cfg: FederationConfig) -> int:
    """Rounds the state in ``cfg.out`` holds (0 without one); raises on other settings."""
    from assy.federation.state import ServerState

    return ServerState.open(cfg).round if (Path(cfg.out) / "state").is_dir() else 0


def check_run(cfg: FederationConfig, log: Log = print, progress=None) -> str:
    """Every user error a run can hit at its start, raised before anything starts or is
    written: the method, the pool and anchor, the data and its partition, the tiers, the
    ``assy`` planner's compare output (``--compat``), and a previous run in ``out`` with
    other settings; ``lego``'s pruned variants are made here
    (``progress`` follows the pruning). Returns a one-line summary of the run."""
    from assy.federation import task
    from assy.federation.state import ServerState
    from assy.federation.tiers import load_tiers
    from blockpool import Pool

    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise UsageError(f"--out {cfg.out} is a file; give a directory")
    pool = Pool(cfg.pool)
    anchor = task.anchor_model(pool, cfg.anchor)
    data = task.federated_data(cfg)
    tiers = load_tiers(cfg.tiers, list(task.model_bytes(pool).values()))
    if cfg.compat:  # a bad --compat fails here, not in the server once the engine runs
        from assy.assembly.planner import pool_candidates
        from assy.federation.selection import federation_compat

        federation_compat(cfg, pool_candidates(pool, tokens=cfg.max_length))
    state = ServerState.open(cfg)
    if cfg.method == "lego":  # the variants go into the pool once, before any client starts
        from assy.federation.lego import ensure_variants, parse_sparsities

        sparsities = parse_sparsities(cfg.sparsities)
        made = ensure_variants(pool, anchor, cfg.prune, sparsities, log, progress)
        state.facts.setdefault("variants", {str(k): v for k, v in made.items()})
        if cfg.zero_shot:  # missing evaluation data fails here, before Ray starts
            from assy.federation.lego import zero_shot_tasks

            tasks = zero_shot_tasks(cfg.zero_shot, cfg.zero_shot_limit)
    if cfg.engine == "simulation" and not state.round:  # measure here: fail before Ray starts
        plan_population(cfg, pool, data, state, log)
        if cfg.method == "assy":  # propose and fit before Ray starts (it competes for CPUs)
            from assy.federation.methods import AssyRounds

            AssyRounds.prepare(cfg, pool, state, log)
        state.save()
    sizes = sorted(len(c) for c in data.clients)
    resumed = f", resuming after round {state.round}" if state.round else ""
    split = (
        f"{cfg.split} split" if cfg.task == "dolly" else f"{cfg.split} Dirichlet α={cfg.alpha:g}"
    )
    lego = (
        f", {cfg.prune} variants at sparsities {cfg.sparsities}, HeteAgg {cfg.heteagg}"
        if cfg.method == "lego" else ""
    )  # fmt: skip
    if cfg.zero_shot:
        counts = ", ".join(f"{name} {len(examples)}" for name, examples in tasks.items())
        lego += f", zero-shot on {counts} examples"
    what = anchor
    if cfg.method == "assy":
        from assy.assembly.planner import compat_source

        what = (
            f"assemblies of {', '.join(sorted(pool.models))} "
            f"(compatibility: {compat_source(cfg.compat)})"
        )
    return (
        f"{cfg.method} on {cfg.task} with {what}: {cfg.clients} clients "
        f"({sizes[0]}-{sizes[-1]} examples each, {split}){lego}, "
        f"{cfg.per_round} per round, {cfg.rounds} rounds, {len(data.test)} held-out examples, "
        f"tiers {', '.join(t.describe() for t in tiers)}, {cfg.engine} engine{resumed}"
    )

"""What a federated run is: one frozen, validated record, flat enough for Flower's configs.

The CLI builds a :class:`FederationConfig` once and validates it; the server reads it from
``context.run_config`` (deployment) or receives it directly (simulation); clients get the
part they need in every message (:meth:`FederationConfig.client_record`), so a client
needs nothing but its ``partition-id`` and the pool.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from assy.errors import UsageError

__all__ = [
    "METHODS",
    "MIX_TASKS",
    "PRUNE_METHODS",
    "TASK_CHOICES",
    "FederationConfig",
    "parse_sparsities",
    "parse_zero_shot",
]

METHODS = ("assy", "fedit", "local", "lego")
MIX_TASKS = ("arc_easy", "obqa", "boolq", "piqa")
TASK_CHOICES = (*MIX_TASKS, "mix", "dolly")
MC_SPLITS = ("labels", "tasks")
INSTRUCTION_SPLITS = ("fed10", "iid", "categories")

PRUNE_METHODS = ("sparsegpt", "wanda", "magnitude")


def parse_sparsities(text: str) -> list[float]:
    """``--sparsities "0,0.25,0.5,0.75"`` -> ``[0.0, 0.25, 0.5, 0.75]`` (each in ``[0, 1)``)."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or not all(0.0 <= v < 1.0 for v in values):
        raise UsageError(f"--sparsities {text!r}: give fractions in [0, 1), e.g. 0,0.25,0.5,0.75")
    return values


def parse_zero_shot(text: str) -> list[str]:
    """``--zero-shot "arc_easy,sciq"`` -> the task names (each one ``assy eval`` knows)."""
    from assy.data import task_names

    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise UsageError(f"--zero-shot {text!r}: give tasks of assy eval, e.g. arc_easy,sciq")
    known = set(task_names())
    for name in names:
        if name not in known:
            plain = [t for t in task_names() if not t.startswith("mmlu_")]
            raise UsageError(
                f"--zero-shot: unknown task {name!r}; use tasks assy eval knows: "
                f"{', '.join(plain)}, mmlu_<subject>"
            )
    if len(set(names)) != len(names):
        raise UsageError(f"--zero-shot {text!r} names a task twice")
    return names


def _flag(value: Any) -> bool:
    """A boolean setting from a record (``True``/``False``, or a TOML-ish string)."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


# Fields that do not change what a run computes: a resumed run may differ in them.
_RUN_ONLY = (
    "rounds", "engine", "out", "round_timeout", "zero_shot", "zero_shot_limit", "measure_memory",
)  # fmt: skip


@dataclass(frozen=True)
class FederationConfig:
    """Everything a federated run depends on (defaults: the CLI's).

    Attributes:
        pool: the pool directory (on every host, or given per SuperNode as node config).
        task: a multiple-choice task of :data:`TASK_CHOICES` (``mix``: all four), or
            ``dolly``: instruction data (:mod:`assy.federation.instructions`), for ``lego``.
        method: ``fedit`` (LoRA on the anchor, FedAvg), ``local`` (no federation),
            ``lego`` (pruned variants per tier, sparse LoRA, HeteAgg:
            :mod:`assy.federation.lego`) or ``assy`` (assemblies per tier: forward-only
            selection, then adapter rounds: :mod:`assy.federation.selection`).
        rounds: rounds to run (a resumed run may ask for more).
        out: the output directory (the server's state lives there).
        clients, per_round: the population and how many are sampled each round.
        alpha, split: Dirichlet(α) non-IID partition over ``labels`` or ``tasks``; for
            ``dolly``: ``fed10`` (FedIT's 10 category-skewed clients), ``iid`` or
            ``categories`` (one client per category).
        tiers: ``seed``, ``none`` or a JSON tiers file (:mod:`assy.federation.tiers`).
        seed: every draw (split, partition, tiers, sampling, training) derives from it.
        engine: ``simulation`` (in-process, Ray) or ``deployment`` (Flower SuperLink).
        data: a ``.jsonl`` file of the user's own multiple-choice examples.
        anchor: the pool model fedit trains (default: the largest causal model).
        limit: use only the first N examples of each task (before the 80/20 split).
        test_limit: score at most N held-out examples per evaluation.
        lora_rank, lora_alpha: LoRA's r and alpha (on every linear layer of the layers).
        local_steps, batch_size, lr, max_length: local training per round.
        round_timeout: seconds to wait for replies in a round (``None``: wait for all).
        client_dir: where clients keep their own state (``local``); default ``out/clients``.
        candidates: ``assy``: assemblies proposed per tier (the planner's top ones).
        max_seams: ``assy``: the most seams a proposed assembly may have.
        select_rounds: ``assy``: forward-only selection rounds before the adapter rounds.
        fit_samples: ``assy``: public-text windows the server fits candidates' adapters on.
        compat: ``assy``: an ``assy compare`` output (its directory or
            ``matrices.safetensors``) whose compatibility matrix the server's planner scores
            seams with, as ``assy assemble --compat`` does; ``""``: the depth fallback. A
            path on the host the server runs on (checked by ``check_run``).
        sparsities: ``lego``: the variants' sparsities, taken by the tiers from the largest.
        prune: ``lego``: how the variants are pruned (``sparsegpt``, ``wanda``,
            ``magnitude``).
        heteagg: ``lego``: ``masked`` (Algorithm 2 on ``(s·B·A) ⊙ M``), ``factors``
            (Algorithm 2 on A and B) or ``exact`` (masked products, SVD-refactored).
        zero_shot: ``lego``: comma-separated tasks of ``assy eval`` (``arc_easy,sciq``)
            on which the dense global model and every variant are scored zero-shot after
            each round (and before the first); ``""``: none.
        zero_shot_limit: the first N examples of each ``zero_shot`` task (of each subject
            of ``mmlu``).
        measure_memory: run, once per device tier and phase, one client's round alone in
            a fresh process from the content the server sends it, and record its peak
            memory (:func:`~.memory.measure_round`): a client's own need, which a reused
            simulation worker's peak is not.
        secagg: aggregate the adapter rounds (``fedit``; ``assy`` after its selection
            rounds) with Flower's secure aggregation, SecAgg+ (:mod:`~.secagg`): the
            server sees only the weighted average, never one client's adapter.
    """

    pool: str
    task: str
    method: str
    rounds: int
    out: str
    clients: int = 20
    per_round: int = 5
    alpha: float = 1.0
    split: str = "labels"
    tiers: str = "seed"
    seed: int = 0
    engine: str = "simulation"
    data: str = ""
    anchor: str = ""
    limit: int = 0
    test_limit: int = 200
    lora_rank: int = 8
    lora_alpha: float = 16.0
    local_steps: int = 10
    batch_size: int = 4
    lr: float = 1e-3
    max_length: int = 256
    round_timeout: float = 0.0
    client_dir: str = ""
    candidates: int = 3
    max_seams: int = 2
    select_rounds: int = 1
    fit_samples: int = 32
    compat: str = ""
    sparsities: str = "0,0.25,0.5,0.75"
    prune: str = "sparsegpt"
    heteagg: str = "masked"
    zero_shot: str = ""
    zero_shot_limit: int = 100
    measure_memory: bool = False
    secagg: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`UsageError` on the first bad setting (CLI wording)."""
        if self.task not in TASK_CHOICES:
            raise UsageError(f"--task must be one of {', '.join(TASK_CHOICES)}")
        if self.method not in METHODS:
            raise UsageError(f"--method must be one of {', '.join(METHODS)}")
        instruction = self.task == "dolly"
        if instruction != (self.method == "lego"):
            raise UsageError(
                "--method lego fine-tunes on instructions: use it with --task dolly (and "
                "--task dolly only with --method lego)"
            )
        splits = INSTRUCTION_SPLITS if instruction else MC_SPLITS
        if self.split not in splits:
            raise UsageError(f"--split must be one of {', '.join(splits)} for --task {self.task}")
        if instruction:
            parse_sparsities(self.sparsities)
            if self.prune not in PRUNE_METHODS:
                raise UsageError(f"--prune must be one of {', '.join(PRUNE_METHODS)}")
            if self.heteagg not in ("masked", "factors", "exact"):
                raise UsageError("--heteagg must be masked, factors or exact")
        if self.split == "tasks" and self.task != "mix":
            raise UsageError("--split tasks mixes tasks per client: use it with --task mix")
        if self.task == "mix" and self.data:
            raise UsageError("--data gives one task's examples; it cannot be used with --task mix")
        if self.engine not in ("simulation", "deployment"):
            raise UsageError("--engine must be simulation or deployment")
        counted = ("rounds", "clients", "per_round", "local_steps", "batch_size", "lora_rank")
        for name in (*counted, "candidates", "select_rounds", "fit_samples"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if self.per_round > self.clients:
            raise UsageError(f"--per-round {self.per_round} exceeds --clients {self.clients}")
        if self.max_seams < 0:
            raise UsageError("--max-seams must be 0 or more")
        if self.compat and self.method != "assy":
            raise UsageError("--compat scores the assy planner's seams: use it with --method assy")
        if self.method == "assy" and self.rounds <= self.select_rounds:
            raise UsageError(
                f"--method assy runs {self.select_rounds} selection round(s) before the "
                f"adapter rounds: give --rounds more than {self.select_rounds}"
            )
        if self.zero_shot:
            if self.method != "lego":
                raise UsageError(
                    "--zero-shot scores lego's global model and variants: use it with "
                    "--method lego (the other methods score --task itself)"
                )
            parse_zero_shot(self.zero_shot)
        if self.zero_shot_limit < 1:
            raise UsageError(
                f"--zero-shot-limit must be at least 1 (examples per task), got "
                f"{self.zero_shot_limit}"
            )
        if self.secagg and self.method in ("local", "lego"):
            raise UsageError(
                "--secagg sums the clients' adapters securely: --method local aggregates "
                "nothing; drop --secagg or use --method fedit or assy"
                if self.method == "local"
                else "--secagg cannot run lego's HeteAgg (it averages each weight over the "
                "clients whose variant keeps it; SecAgg+ gives one weighted sum): drop "
                "--secagg or use --method fedit or assy"
            )
        if self.secagg and self.per_round < 2:
            raise UsageError(
                f"--secagg needs at least 2 clients per round (SecAgg+ hides each adapter in "
                f"a sum of several), got --per-round {self.per_round}; give --per-round 2 or more"
            )
        if self.alpha <= 0 or self.lr <= 0:
            raise UsageError("--alpha and --lr must be positive")
        if min(self.limit, self.test_limit, self.round_timeout) < 0:
            raise UsageError("--limit, --test-limit and --round-timeout cannot be negative")

    # ---------------------------------------------------------------- serialization

    def to_record(self) -> dict[str, Any]:
        """Flat ``{name-with-dashes: str | int | float}`` for Flower's configs."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_record(cls, record: Any) -> FederationConfig:
        """Inverse of :meth:`to_record`; unknown keys are ignored, types are coerced."""
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in dict(record).items():
            name = key.replace("-", "_")
            if name in types:
                kind = {"int": int, "float": float, "str": str, "bool": _flag}[str(types[name])]
                kwargs[name] = kind(value)
        missing = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        if missing - set(kwargs):
            raise UsageError(f"federation config lacks {sorted(missing - set(kwargs))}")
        return cls(**kwargs)

    def fingerprint(self) -> str:
        """sha256 of the settings that decide the results (not rounds, engine, out)."""
        kept = {k: v for k, v in dataclasses.asdict(self).items() if k not in _RUN_ONLY}
        return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]

    def differences(self, other: FederationConfig) -> list[str]:
        """The result-deciding settings in which ``other`` differs from this one."""
        a, b = dataclasses.asdict(self), dataclasses.asdict(other)
        return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in a if k not in _RUN_ONLY and a[k] != b[k]]

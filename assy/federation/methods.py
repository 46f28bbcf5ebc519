"""The server side of each method: what goes down, how replies become the new global.

A method is a small class holding the server's state of that method (the global adapter,
the server's model for scoring it): ``content(round)`` is what every sampled client
receives, ``aggregate(replies, population)`` turns the replies into the round's fields
and the new global, ``evaluate(state)`` scores a global on the held-out split, and
``finish(out)`` writes the final result. :data:`ROUNDS` maps method names to them.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import Message, RecordDict

from assy.federation import task
from assy.federation.config import FederationConfig
from assy.federation.records import (
    ARRAYS,
    CONFIG,
    METRICS,
    arrays_record,
    config_record,
    payload_bytes,
    record_tensors,
)
from assy.federation.state import ServerState
from assy.federation.strategy import (
    Rejection,
    Update,
    aggregate_adapters,
    screen_updates,
    state_digest,
)
from assy.federation.tiers import Population

__all__ = ["ASSY_NEEDS_PLANNER", "ROUNDS", "FeditRounds", "LocalRounds", "metric"]

ASSY_NEEDS_PLANNER = (
    "--method assy needs the assembly planner of `assy assemble`, which is not available "
    "yet; use --method fedit or --method local"
)


class _Evaluator:
    """The server's copy of the anchor with LoRA, to score a global adapter on the test."""

    def __init__(self, pool, anchor: str, cfg: FederationConfig, test) -> None:
        self.model = task.lora_model(pool, anchor, cfg)
        self.tokenizer = pool.tokenizer(anchor)
        self.test = test

    def __call__(self, state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        task.load_adapter_state(self.model, state)
        return task.accuracy(self.model, self.tokenizer, self.test)


def metric(reply: Message, key: str) -> float | None:
    """A number of a reply's MetricRecord, or None."""
    value = reply.content[METRICS].get(key) if METRICS in reply.content else None
    return float(value) if isinstance(value, int | float) else None


def parse_updates(replies: dict[int, Message], model_of) -> tuple[list[Update], list[Rejection]]:
    """The adapters of the replies as updates (``model_of(partition)``: the model
    it trained); a reply without a readable adapter is rejected as malformed."""
    updates, rejected = [], []
    for p, reply in sorted(replies.items()):
        try:
            state = record_tensors(reply.content[ARRAYS])
            count = metric(reply, "num-examples")
            n = int(count) if count is not None and count == int(count) else -1
            updates.append(Update(p, state, n, payload_bytes(reply), model_of(p)))
        except (KeyError, TypeError, ValueError) as e:
            rejected.append(Rejection(p, f"malformed payload: {e}"))
    return updates, rejected


class FeditRounds:
    """FedIT: sampled clients train the global LoRA of the anchor; FedAvg of the screened."""

    def __init__(self, cfg, pool, anchor, data, state: ServerState) -> None:
        self.cfg, self.anchor = cfg, anchor
        self.evaluate = _Evaluator(pool, anchor, cfg, data.test)
        self.global_state = dict(state.global_state) or task.initial_adapter(pool, anchor, cfg)
        size = sum(v.numel() * v.element_size() + len(k) for k, v in self.global_state.items())
        self.max_bytes = 2 * size + 65536  # room for keys and metrics, not for a second model

    def content(self, round_: int) -> RecordDict:
        return RecordDict(
            {CONFIG: config_record(self.cfg, round_), ARRAYS: arrays_record(self.global_state)}
        )

    def aggregate(self, replies: dict[int, Message], pop: Population) -> dict[str, Any]:
        updates, rejected = parse_updates(replies, lambda p: self.anchor)
        sizes = dict(enumerate(pop.sizes))
        kept, screened = screen_updates(
            self.global_state, updates, max_bytes=self.max_bytes, max_examples=sizes
        )
        self.global_state, how = aggregate_adapters(self.global_state, kept)
        return {
            "accepted": [u.client for u in kept],
            "rejected": [vars(r) for r in sorted(rejected + screened, key=lambda r: r.client)],
            "aggregation": how,
            "global_sha256": state_digest(self.global_state),
            **self.evaluate(self.global_state),
        }

    def finish(self, out: Path) -> Path:
        """Write the final global adapter (peft format) and its recipe under ``out/final``."""
        task.load_adapter_state(self.evaluate.model, self.global_state)
        return _write_final(out, self.cfg, self.anchor, self.evaluate.model)


class LocalRounds:
    """Each client trains its own adapter alone; nothing is aggregated (the baseline)."""

    def __init__(self, cfg, pool, anchor, data, state: ServerState) -> None:
        self.cfg, self.anchor = cfg, anchor
        self.global_state: dict[str, torch.Tensor] = {}
        self._initial = lambda: _Evaluator(pool, anchor, cfg, data.test)(
            task.initial_adapter(pool, anchor, cfg)
        )

    def evaluate(self, _state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        return self._initial()

    def content(self, round_: int) -> RecordDict:
        return RecordDict({CONFIG: config_record(self.cfg, round_)})

    def aggregate(self, replies: dict[int, Message], pop: Population) -> dict[str, Any]:
        scored = {p: r for p, r in replies.items() if metric(r, "acc") is not None}
        return {
            "accepted": sorted(scored),
            "rejected": [],
            "aggregation": "none",
            **{k: _mean([metric(r, k) for r in scored.values()]) for k in ("acc", "acc_norm", "n")},
        }

    def finish(self, out: Path) -> Path:
        return _write_final(out, self.cfg, self.anchor, None)


ROUNDS = {"fedit": FeditRounds, "local": LocalRounds}
"""Method name -> its server side. ``assy`` joins here once the planner exists: its
selection rounds send candidate assemblies and aggregate :class:`~.strategy.Vote`s with
:func:`~.strategy.aggregate_votes`; its adapter rounds reuse :class:`FeditRounds`'
screening and :func:`~.strategy.aggregate_adapters` (HeteAgg where masks differ)."""


def _write_final(out: Path, cfg: FederationConfig, anchor: str, model) -> Path:
    """``out/final``: ``recipe.json`` (pool, anchor, method) and the adapter, swapped in whole."""
    final, tmp = out / "final", out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    recipe = {"method": cfg.method, "pool": str(Path(cfg.pool).resolve()), "anchor": anchor}
    if model is not None:
        model.save_pretrained(tmp / "adapter")
        recipe["adapter"] = "adapter"
    (tmp / "recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


class LegoRounds:
    """LEGO (seed 001, Algorithm 1): each client fine-tunes a sparse LoRA on its tier's
    pruned variant; the server aggregates the adapters into the global update ``G``
    (:func:`~.lego.aggregate_round`, ``cfg.heteagg``) and sends each client ``G`` where
    its variant is non-zero. ``global_state`` is ``G`` (module -> ``[out, in]``)."""

    def __init__(self, cfg, pool, anchor, data, state: ServerState) -> None:
        from assy.federation import lego

        self.cfg, self.pool, self.anchor, self.test = cfg, pool, anchor, data.test
        self.variant_of = lego.client_variants(cfg, pool, anchor)
        self.global_state: dict[str, torch.Tensor] = dict(state.global_state)
        self.scaling = cfg.lora_alpha / cfg.lora_rank
        torch.manual_seed(cfg.seed)
        template = task.initial_adapter(pool, anchor, cfg)
        self.zero = {k: torch.zeros_like(v) for k, v in template.items()}  # shapes to screen
        size = sum(v.numel() * v.element_size() + len(k) for k, v in template.items())
        self.max_bytes = 2 * size + 65536
        self._masks: dict[str, dict[str, torch.Tensor]] = {}
        self._values: tuple[int, dict[str, Any]] = (-1, {})

    def masks(self, variant: str) -> dict[str, torch.Tensor]:
        """The variant's non-zero pattern per module (read from the pool once)."""
        from assy.federation.lego import module_masks
        from assy.lego.lora import PoolModule

        if variant not in self._masks:
            self._masks[variant] = module_masks(PoolModule(self.pool, variant))
        return self._masks[variant]

    def content(self, round_: int) -> RecordDict:
        return RecordDict({CONFIG: config_record(self.cfg, round_)})

    def content_for(self, round_: int, partition: int) -> RecordDict:
        """Client ``partition``'s message: the settings, its variant, ``G[M]`` of it."""
        from assy.federation.lego import variant_values

        variant = self.variant_of[partition]
        if self._values[0] != round_:
            self._values = (round_, {})
        cache = self._values[1]  # one record per variant and round, shared by its clients
        if variant not in cache:
            cache[variant] = arrays_record(variant_values(self.global_state, self.masks(variant)))
        settings = config_record(self.cfg, round_)
        settings["variant"] = variant
        return RecordDict({CONFIG: settings, ARRAYS: cache[variant]})

    def aggregate(self, replies: dict[int, Message], pop: Population) -> dict[str, Any]:
        from assy.federation.lego import add_update, aggregate_round

        updates, rejected = parse_updates(replies, self.variant_of.__getitem__)
        sizes = dict(enumerate(pop.sizes))
        kept, screened = screen_updates(
            self.zero, updates, max_bytes=self.max_bytes, max_examples=sizes
        )
        delta = aggregate_round(
            [u.state for u in kept], [self.masks(u.model) for u in kept], self.scaling,
            self.cfg.heteagg, [u.num_examples for u in kept],
        )  # fmt: skip
        self.global_state = add_update(self.global_state, delta)
        self._values = (-1, {})
        return {
            "accepted": [u.client for u in kept],
            "rejected": [vars(r) for r in sorted(rejected + screened, key=lambda r: r.client)],
            "aggregation": f"heteagg-{self.cfg.heteagg}" if kept else "none",
            "global_sha256": state_digest(self.global_state) if self.global_state else None,
            "extra": {"variants": {str(u.client): u.model for u in kept}},
            **self.evaluate(self.global_state),
        }

    def evaluate(self, update: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Held-out instruction loss of the dense global (``W + G``) and of every variant
        in use (``W_i + G ⊙ M_i``)."""
        from assy.federation.lego import heldout_loss

        glob = heldout_loss(self.pool, self.anchor, update, self.test, self.cfg.max_length, True)
        clients = {
            v: heldout_loss(self.pool, v, update, self.test, self.cfg.max_length)["loss"]
            for v in sorted(set(self.variant_of))
        }
        extra = {"heldout_loss": glob["loss"], "heldout_bpb": glob["bpb"], "client_loss": clients}
        return {"acc": None, "acc_norm": None, "n": len(self.test), "extra": extra}

    def finish(self, out: Path) -> Path:
        """``out/final``: ``recipe.json`` and ``global-update.safetensors`` (``G``; the
        global model is the anchor plus it, a client's its variant plus ``G ⊙ M``)."""
        from assy.federation.lego import write_update

        final = _write_final(out, self.cfg, self.anchor, None)
        if self.global_state:
            write_update(final / "global-update.safetensors", self.global_state)
        recipe = json.loads((final / "recipe.json").read_text())
        recipe |= {"update": "global-update.safetensors", "heteagg": self.cfg.heteagg,
                   "variants": sorted(set(self.variant_of))}  # fmt: skip
        (final / "recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")
        return final


ROUNDS["lego"] = LegoRounds

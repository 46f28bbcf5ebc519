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

from assy.assembly.planner import compat_source
from assy.assembly.recipe import describe_recipe, recipe_from_dict
from assy.federation import selection, task
from assy.federation.config import FederationConfig, parse_zero_shot
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
    Vote,
    aggregate_adapters,
    aggregate_votes,
    screen_updates,
    screen_votes,
    state_digest,
)
from assy.federation.tiers import Population

__all__ = ["ROUNDS", "AssyRounds", "FeditRounds", "LocalRounds", "metric"]


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

    def secure_groups(self, round_: int, picked: list[int], pop: Population):
        """``--secagg``: every sampled client trains the anchor's LoRA: one SecAgg+ group."""
        from assy.federation.secagg import SecureGroup

        group = SecureGroup(self.anchor, picked, self.content(round_), dict(self.global_state))
        return [group], []

    def secure_apply(self, outcomes: dict, pop: Population) -> dict[str, Any]:
        """The checked SecAgg+ average becomes the global (unchanged if it halted)."""
        outcome = outcomes[self.anchor]
        if outcome.average is not None and outcome.problem is None:
            self.global_state = {k: outcome.average[k] for k in self.global_state}
        applied = outcome.average is not None and outcome.problem is None
        return {
            "accepted": outcome.summed if applied else [],
            "rejected": [],
            "aggregation": "secagg-fedavg" if applied else "none",
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


class AssyRounds:
    """AssyLLM: candidate assemblies per tier, forward-only selection, adapter rounds.

    Rounds ``1..cfg.select_rounds`` send every tier's candidates (recipes and closed-form
    adapters fitted by the server on public text) and aggregate the clients' votes
    (:func:`~.strategy.aggregate_votes`, sample-weighted) into one recipe per tier; later
    rounds send the chosen recipes' global adapters and average what the clients trained
    (:func:`~.strategy.aggregate_adapters` per recipe, after screening). The held-out
    accuracy of a round is the tiers' accuracies weighted by their shares of clients.
    """

    def __init__(self, cfg, pool, anchor, data, state: ServerState) -> None:
        self.cfg, self.pool, self.test = cfg, pool, data.test
        self.prepare(cfg, pool, state)
        self.shares = {t["name"]: t["share"] for t in state.facts["tiers"]}
        facts = state.facts["assy"]
        self.proposals = {t: [c["key"] for c in cs] for t, cs in facts["proposals"].items()}
        self.recipes = {
            c["key"]: recipe_from_dict(c["recipe"], f"candidate {c['key']}")
            for cs in facts["proposals"].values()
            for c in cs
        }
        self.chosen: dict[str, str] = facts["chosen"]
        self.compatibility = compat_source(cfg.compat)  # what prepare proposed with
        self.global_state = dict(state.global_state)
        self._phase = "select"

    @staticmethod
    def prepare(cfg, pool, state: ServerState, log=lambda _m: None) -> None:
        """Propose candidates per tier and fit their adapters, once: kept in ``state``
        (``facts["assy"]`` and the global state), so that a resumed run, and the server
        after ``check_run`` did it before the engine started, reuse them."""
        from assy.data import heldout_text

        if "assy" not in state.facts:
            tiers = {t["name"]: t["budget"] for t in state.facts["tiers"]}
            proposals = selection.propose(pool, tiers, cfg)
            state.facts["assy"] = {
                "compatibility": compat_source(cfg.compat),
                "proposals": {t: [c.to_json() for c in cs] for t, cs in proposals.items()},
                "chosen": {},
            }
            for tier, cs in proposals.items():
                names = (
                    ", ".join(f"{c.key} ({describe_recipe(c.recipe)})" for c in cs) or "none fits"
                )
                log(f"tier {tier}: {names}")
        if not state.global_state:
            seen = {
                c["key"]: recipe_from_dict(c["recipe"])
                for cs in state.facts["assy"]["proposals"].values()
                for c in cs
            }
            log(f"fitting the adapters of {sum(bool(r.seams) for r in seen.values())} candidates "
                "in closed form on public text ...")  # fmt: skip
            state.global_state = selection.fit_candidates(pool, seen, cfg, heldout_text(200_000))

    def takes_part(self, tier: str) -> bool:
        """Whether clients of ``tier`` have a candidate (their budget holds an assembly)."""
        return bool(self.proposals.get(tier))

    def _current(self) -> dict[str, str]:
        """Tier -> the recipe it runs now: the chosen one, else the planner's first."""
        return {t: self.chosen.get(t, ks[0]) for t, ks in self.proposals.items() if ks}

    def _select_phase(self, round_: int) -> bool:
        return round_ <= self.cfg.select_rounds

    def phase(self, round_: int) -> str:
        """What clients do in ``round_``: ``select`` (vote) or ``adapt`` (train adapters)."""
        return "select" if self._select_phase(round_) else "adapt"

    def content(self, round_: int) -> RecordDict:
        config = config_record(self.cfg, round_)
        self._phase = self.phase(round_)
        if self._phase == "select":
            keys = {k for ks in self.proposals.values() for k in ks}
            config["proposals"] = json.dumps(self.proposals, sort_keys=True)
        else:
            keys = set(self._current().values())
            config["proposals"] = json.dumps(
                {t: [k] for t, k in sorted(self._current().items())}, sort_keys=True
            )
        config["recipes"] = selection.recipes_json({k: self.recipes[k] for k in keys})
        arrays = {k: v for k, v in self.global_state.items() if k.split("/", 1)[0] in keys}
        config["phase"] = self._phase
        content = RecordDict({CONFIG: config})
        if arrays:
            content[ARRAYS] = arrays_record(arrays)
        return content

    def aggregate(self, replies: dict[int, Message], pop: Population) -> dict[str, Any]:
        if self._phase == "select":
            return self._aggregate_votes(replies, pop)
        return self._aggregate_adapters(replies, pop)

    def _aggregate_votes(self, replies: dict[int, Message], pop: Population) -> dict[str, Any]:
        votes, rejected = [], []
        for p, reply in sorted(replies.items()):
            tier = pop.tiers[pop.tier_of[p]].name
            keys = self.proposals.get(tier, [])
            choice, count = metric(reply, "choice"), metric(reply, "num-examples")
            scores = {
                k: float(v)
                for name, v in reply.content[METRICS].items()
                if name.startswith("score:") and (k := name[len("score:") :])
            }
            if choice is None or choice != int(choice) or not 0 <= int(choice) < len(keys):
                rejected.append(Rejection(p, f"malformed vote: choice {choice!r}"))
                continue
            n = int(count) if count is not None and count == int(count) else -1
            votes.append(Vote(p, tier, keys[int(choice)], scores, n))
        kept, screened = screen_votes(votes, self.proposals, dict(enumerate(pop.sizes)))
        choices = aggregate_votes(kept)
        for tier, chosen in choices.items():
            self.chosen[tier] = chosen.choice
        return {
            "accepted": [v.client for v in kept],
            "rejected": [vars(r) for r in sorted(rejected + screened, key=lambda r: r.client)],
            "aggregation": "votes",
            "global_sha256": state_digest(self.global_state) if self.global_state else None,
            "chosen": dict(sorted(self._current().items())),
            "votes": {t: dict(c.tally) for t, c in choices.items()},
            "peak_resident_bytes": _peaks(replies, pop),
            **self.evaluate(self.global_state),
        }

    def _aggregate_adapters(self, replies: dict[int, Message], pop: Population) -> dict[str, Any]:
        current = self._current()
        by_key: dict[str, list[Update]] = {}
        rejected = []
        for p, reply in sorted(replies.items()):
            key = current.get(pop.tiers[pop.tier_of[p]].name)
            if key is None or not self.recipes[key].seams:
                continue  # a whole model: nothing to train
            try:
                state = record_tensors(reply.content[ARRAYS])
                count = metric(reply, "num-examples")
                n = int(count) if count is not None and count == int(count) else -1
                by_key.setdefault(key, []).append(Update(p, state, n, payload_bytes(reply), key))
            except (KeyError, TypeError, ValueError) as e:
                rejected.append(Rejection(p, f"malformed payload: {e}"))
        accepted, hows = [], set()
        sizes = dict(enumerate(pop.sizes))
        for key, updates in sorted(by_key.items()):
            adapters = selection.adapters_of(self.pool, self.recipes[key], key, self.global_state)
            trained = selection.flat_state(key, adapters, trainable=True)
            own = {k: self.global_state[k] for k in trained}
            size = sum(v.numel() * v.element_size() + len(k) for k, v in own.items())
            kept, screened = screen_updates(
                own, updates, max_bytes=2 * size + 65536, max_examples=sizes
            )
            rejected += screened
            new, how = aggregate_adapters(own, kept)
            hows.add(how)
            self.global_state |= new
            accepted += [u.client for u in kept]
        return {
            "accepted": sorted(accepted),
            "rejected": [vars(r) for r in sorted(rejected, key=lambda r: r.client)],
            "aggregation": "+".join(sorted(hows - {"none"})) or "none",
            "global_sha256": state_digest(self.global_state) if self.global_state else None,
            "chosen": dict(sorted(current.items())),
            **self.evaluate(self.global_state),
        }

    def secure_groups(self, round_: int, picked: list[int], pop: Population):
        """``--secagg``: the adapter rounds' SecAgg+ groups, one per recipe in training
        (its clients, its adapters), and the clients left out with why; ``None`` in the
        selection rounds, which stay plain (votes are choices, not vectors to sum)."""
        from assy.federation.secagg import SecureGroup

        if self._select_phase(round_):
            return None
        content = self.content(round_)
        current = self._current()
        members: dict[str, list[int]] = {}
        left_out = []
        for p in picked:
            key = current.get(pop.tiers[pop.tier_of[p]].name)
            if key is None or not self.recipes[key].seams:
                left_out.append({"client": p, "reason": "its assembly has no adapter to train"})
            else:
                members.setdefault(key, []).append(p)
        groups = []
        for key, clients in sorted(members.items()):
            if len(clients) < 2:  # an average of one is that client's adapter
                reason = f"alone with recipe {key} this round (SecAgg+ needs 2)"
                left_out += [{"client": p, "reason": reason} for p in clients]
                continue
            adapters = selection.adapters_of(self.pool, self.recipes[key], key, self.global_state)
            trained = selection.flat_state(key, adapters, trainable=True)
            own = RecordDict({CONFIG: content[CONFIG]})
            arrays = {k: v for k, v in self.global_state.items() if k.split("/", 1)[0] == key}
            if arrays:
                own[ARRAYS] = arrays_record(arrays)
            groups.append(
                SecureGroup(key, clients, own, {k: self.global_state[k] for k in trained})
            )
        return groups, sorted(left_out, key=lambda x: x["client"])

    def secure_apply(self, outcomes: dict, pop: Population) -> dict[str, Any]:
        """Each group's checked SecAgg+ average replaces its recipe's trained adapters."""
        accepted = []
        for outcome in outcomes.values():
            if outcome.average is not None and outcome.problem is None:
                self.global_state |= outcome.average
                accepted += outcome.summed
        return {
            "accepted": sorted(accepted),
            "rejected": [],
            "aggregation": "secagg-fedavg" if accepted else "none",
            "global_sha256": state_digest(self.global_state) if self.global_state else None,
            "chosen": dict(sorted(self._current().items())),
            **self.evaluate(self.global_state),
        }

    def evaluate(self, state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Held-out accuracy of every tier's current assembly, and their share-weighted mean."""
        by_key: dict[str, dict[str, float]] = {}
        per_tier = {}
        for tier, key in sorted(self._current().items()):
            if key not in by_key:
                recipe = self.recipes[key]
                adapters = selection.adapters_of(self.pool, recipe, key, state)
                by_key[key] = selection.score_candidate(
                    self.pool, recipe, adapters, self.test, None
                )
            per_tier[tier] = {"recipe": key, **{k: by_key[key][k] for k in ("acc", "acc_norm")}}
        weight = sum(self.shares[t] for t in per_tier) or 1.0
        mean = {
            k: sum(self.shares[t] * v[k] for t, v in per_tier.items()) / weight
            for k in ("acc", "acc_norm")
        }
        return {**mean, "n": float(len(self.test)), "per_tier": per_tier}

    def finish(self, out: Path) -> Path:
        """``out/final``: one assembly directory per tier's recipe, and ``recipe.json``."""
        from assy.assembly.assemble import Fitted, write_assembly

        final, tmp = out / "final", out / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        current = self._current()
        for key in sorted(set(current.values())):
            recipe = self.recipes[key]
            adapters = selection.adapters_of(self.pool, recipe, key, self.global_state)
            fitted = Fitted(recipe, adapters, {"federated": {"method": "assy", "key": key}})
            write_assembly(tmp / key, fitted)
        summary = {
            "method": "assy",
            "pool": str(Path(self.cfg.pool).resolve()),
            "compatibility": self.compatibility,
            "tiers": {t: {"assembly": k} for t, k in sorted(current.items())},
        }
        (tmp / "recipe.json").write_text(json.dumps(summary, indent=1) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        return final


ROUNDS = {"assy": AssyRounds, "fedit": FeditRounds, "local": LocalRounds}
"""Method name -> its server side."""


def _peaks(replies: dict[int, Message], pop: Population) -> dict[str, int]:
    """Tier -> the largest resident weight bytes a client of it held while scoring."""
    peaks: dict[str, int] = {}
    for p, reply in replies.items():
        value = metric(reply, "peak-resident-bytes")
        if value is not None:
            tier = pop.tiers[pop.tier_of[p]].name
            peaks[tier] = max(peaks.get(tier, 0), int(value))
    return dict(sorted(peaks.items()))


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
        self.tasks = (
            lego.zero_shot_tasks(cfg.zero_shot, cfg.zero_shot_limit) if cfg.zero_shot else {}
        )
        self.eval_command: str | None = None  # set by finish: assy eval of the global model

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
        scores = self.evaluate(self.global_state)  # its "extra" joins the variants, not replaces
        scores["extra"] = {"variants": {str(u.client): u.model for u in kept}, **scores["extra"]}
        return {
            "accepted": [u.client for u in kept],
            "rejected": [vars(r) for r in sorted(rejected + screened, key=lambda r: r.client)],
            "aggregation": f"heteagg-{self.cfg.heteagg}" if kept else "none",
            "global_sha256": state_digest(self.global_state) if self.global_state else None,
            **scores,
        }

    def evaluate(self, update: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Held-out instruction loss of the dense global (``W + G``) and of every variant
        in use (``W_i + G ⊙ M_i``), and with ``--zero-shot`` their zero-shot accuracy on
        those tasks (``assy eval``'s scoring, :func:`~.lego.zero_shot`)."""
        from assy.federation.lego import module_loss, updated_model, zero_shot

        def scores(model: str, whole: bool = False) -> tuple[dict, dict]:
            module = updated_model(self.pool, model, update, whole)
            tokenizer = self.pool.tokenizer(model)
            loss = module_loss(module, tokenizer, self.test, self.cfg.max_length)
            return loss, zero_shot(module, tokenizer, self.tasks) if self.tasks else {}

        glob, glob_zs = scores(self.anchor, True)
        clients, clients_zs = {}, {}
        for v in sorted(set(self.variant_of)):
            # the unpruned variant is the global model itself where the anchor has no zeros
            dense = v == self.anchor and all(bool(m.all()) for m in self.masks(v).values())
            loss, clients_zs[v] = (glob, glob_zs) if dense else scores(v)
            clients[v] = loss["loss"]
        extra = {"heldout_loss": glob["loss"], "heldout_bpb": glob["bpb"], "client_loss": clients}
        if self.tasks:
            extra |= {"zero_shot": glob_zs, "client_zero_shot": clients_zs}
        return {"acc": None, "acc_norm": None, "n": len(self.test), "extra": extra}

    def finish(self, out: Path) -> Path:
        """``out/final``: ``recipe.json``, ``global-update.safetensors`` (``G``; a client's
        model is its variant plus ``G ⊙ M``) and ``pool/``: the dense global model
        ``W + G`` as model ``<anchor>`` of a pool of its own (layer blocks in float32, so
        that the update is kept whole), which ``assy eval`` runs (:attr:`eval_command`)."""
        from assy.federation.lego import updated_model, write_update
        from assy.lego.lora import write_merged_model

        final = _write_final(out, self.cfg, self.anchor, None)
        if self.global_state:
            write_update(final / "global-update.safetensors", self.global_state)
        module = updated_model(self.pool, self.anchor, self.global_state, whole=True)
        write_merged_model(
            self.pool, self.anchor, module, self.anchor, out=final / "pool", fp32_layers=True
        )
        recipe = json.loads((final / "recipe.json").read_text())
        recipe |= {"update": "global-update.safetensors", "heteagg": self.cfg.heteagg,
                   "variants": sorted(set(self.variant_of)), "global_pool": "pool"}  # fmt: skip
        (final / "recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")
        task_name = parse_zero_shot(self.cfg.zero_shot)[0] if self.cfg.zero_shot else "arc_easy"
        limit = f" --limit {self.cfg.zero_shot_limit}" if self.cfg.zero_shot else ""
        self.eval_command = (
            f"assy eval {final / 'pool'} --model {self.anchor} --task {task_name}{limit}"
        )
        return final


ROUNDS["lego"] = LegoRounds

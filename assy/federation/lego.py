"""LEGO's federated fine-tuning (seed 001, Algorithm 1) as plain functions, no Flower.

Clients hold pruned variants of the global model (one sparsity per device tier, made once
into the pool by SparseGPT, Wanda or magnitude pruning and reused). Each round a client
starts from its variant with the global update written back where it is non-zero, trains
a fresh sparsity-preserving LoRA on its local instruction data (:mod:`assy.lego.lora`),
and uploads the adapter (A and B). The server aggregates the round's adapters into one
dense update ``δ`` (``[out, in]`` per LoRA'd linear) and adds it to the global update
``G``; the dense global model is ``W + G``, client ``i``'s model ``W_i + G ⊙ M_i`` (its
zeros stay zeros: write-back only where it was non-zero).

How ``δ`` is formed (``--heteagg``):

* ``masked`` (default): Algorithm 2 on the masked updates ``ΔW_i = (s·B_i·A_i) ⊙ M_i``,
  non-zero where client ``i``'s model is; each position is averaged over the clients
  that hold it, positions no client holds keep the global's value (``δ = 0``). The paper
  allows this reading ("with the actual client weights, or with the multiplied LoRA
  adapters"); it is the one where Algorithm 2's "non-zero" means something.
* ``factors``: Algorithm 2 on the factors A and B themselves. They are dense, so this is
  the unweighted FedAvg of A and B (:func:`aggregate_round` is tested to be), and
  ``δ = s·B̄·Ā`` is dense, also where no client's model has a weight.
* ``exact``: :func:`assy.lego.heteagg_exact`: the masked average of the products
  re-factored to rank r by truncated SVD (noise-free ``Σ(B A)`` instead of ``ΣB ΣA``).
* ``fedavg`` (the FedIT baseline, not a CLI choice of ``lego``): example-weighted FedAvg
  of A and B, ``δ = s·B̄·Ā``.

Because every round starts a fresh LoRA (B = 0) on top of the written-back update,
HeteAgg of the clients' cumulative updates ``G ⊙ M_i + ΔW_i`` equals ``G + HeteAgg(ΔW_i)``
on every position some client holds, so aggregating the round's increments is Algorithm
1 exactly, and clients keep no state between rounds.
"""

from __future__ import annotations

import math
import resource
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from assy.errors import UsageError
from assy.federation.config import PRUNE_METHODS, parse_sparsities, parse_zero_shot
from assy.lego import fedavg, heteagg, heteagg_exact, prunable_linears
from assy.lego.heteagg import lora_pairs

__all__ = [
    "AGGREGATIONS",
    "CALIBRATION",
    "PRUNE_METHODS",
    "aggregate_round",
    "apply_update",
    "client_variants",
    "ensure_variants",
    "heldout_loss",
    "lego_round",
    "masked_updates",
    "module_masks",
    "module_loss",
    "parse_sparsities",
    "parse_zero_shot",
    "tier_sparsities",
    "updated_model",
    "variant_name",
    "variant_values",
    "zero_shot",
    "zero_shot_tasks",
]

AGGREGATIONS = ("masked", "factors", "exact", "fedavg")
CALIBRATION = {"samples": 16, "seq_len": 128}
"""SparseGPT/Wanda calibration for the variants: windows of public text (the sciq task's,
as ``assy prune`` by default), never the clients' data."""

_PEFT_PREFIX = "base_model.model."


# --------------------------------------------------------------------------- variants


def variant_name(anchor: str, prune: str, sparsity: float) -> str:
    """The pool name of ``anchor`` pruned by ``prune`` to ``sparsity`` (the anchor at 0)."""
    return anchor if sparsity == 0 else f"{anchor}-{prune}-s{round(sparsity * 100):02d}"


def tier_sparsities(budgets: Sequence[int | None], sparsities: Sequence[float]) -> list[float]:
    """Each tier's sparsity: tiers ranked by budget (largest, or unlimited, first) take the
    sparsities in order, spread evenly when there are more tiers than sparsities."""
    rank = sorted(range(len(budgets)), key=lambda i: -(budgets[i] or float("inf")))
    out = [0.0] * len(budgets)
    for place, tier in enumerate(rank):
        out[tier] = sparsities[min(place * len(sparsities) // len(budgets), len(sparsities) - 1)]
    return out


def client_variants(cfg, pool, anchor: str) -> list[str]:
    """Per partition id: the pool model it fine-tunes (its tier's pruned variant)."""
    from assy.federation.task import model_bytes
    from assy.federation.tiers import assign_tiers, load_tiers

    tiers = load_tiers(cfg.tiers, list(model_bytes(pool).values()))
    per_tier = tier_sparsities([t.budget for t in tiers], parse_sparsities(cfg.sparsities))
    tier_of = assign_tiers(cfg.clients, tiers, cfg.seed)
    return [variant_name(anchor, cfg.prune, per_tier[t]) for t in tier_of]


def ensure_variants(
    pool, anchor: str, prune: str, sparsities: Sequence[float], log, progress=None
) -> dict:
    """Make the pruned variants the run needs into the pool once; reuse those there.

    A model of the variant's name is reused only if it was pruned from ``anchor``;
    ``progress(label, blocks_done, blocks_total)`` follows each pruning.

    Returns:
        sparsity -> ``{"model", "made", "seconds"}``.
    """
    from assy.calibration import calibration_text, calibration_windows
    from assy.lego import parse_sparsity, prune_pool_model
    from blockpool import Pool

    done: dict[float, dict[str, Any]] = {}
    ids = None
    for s in sorted(set(sparsities)):
        name = variant_name(anchor, prune, s)
        if s == 0 or name in pool.models:
            if s and pool.model(name).parent_model != anchor:
                raise UsageError(
                    f"pool model {name!r} is not a variant of {anchor!r}; rename it or use "
                    "another --anchor"
                )
            done[s] = {"model": name, "made": False, "seconds": 0.0}
            continue
        if ids is None and prune != "magnitude":
            text = calibration_text().text
            ids = calibration_windows(pool.tokenizer(anchor), text, **CALIBRATION)
        log(f"pruning {anchor} to {s:.0%} with {prune} into the pool as {name} (once) ...")
        report = prune_pool_model(
            pool, anchor, prune, parse_sparsity(str(s)), name, calib_ids=ids, progress=progress
        )
        pool = Pool(pool.root)
        log(f"  {report.summary()}")
        done[s] = {"model": name, "made": True, "seconds": report.seconds}
    return done


# --------------------------------------------------------------------------- masks, updates


def _linears(module: nn.Module) -> dict[str, nn.Module]:
    """``layers.<i>.<name>`` -> every prunable linear of a :class:`PoolModule` (under peft:
    the LoRA layers' base linears, by the same names; the LoRA factors left out)."""
    found = {}
    for i, layer in enumerate(module.layers):
        for name, mod in prunable_linears(layer).items():
            if ".lora_" in f".{name}":
                continue
            found[f"layers.{i}.{name.removesuffix('.base_layer')}"] = mod
    return found


def _weight_oi(mod: nn.Module) -> torch.Tensor:
    w = mod.weight.data
    return w.t() if isinstance(mod, Conv1D) else w


def module_masks(module: nn.Module) -> dict[str, torch.Tensor]:
    """``layers.<i>.<name>`` -> ``[out, in]`` bool, ``True`` where the weight is non-zero."""
    return {name: _weight_oi(mod) != 0 for name, mod in _linears(module).items()}


def _module_name(prefix: str) -> str:
    return prefix.removeprefix(_PEFT_PREFIX)


def masked_updates(
    state: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], scaling: float
) -> dict[str, torch.Tensor]:
    """A client's adapter as its masked updates ``(s · B A) ⊙ M`` per module (float32)."""
    out = {}
    for prefix, (ka, kb) in lora_pairs(list(state)).items():
        name = _module_name(prefix)
        delta = (state[kb].float() @ state[ka].float()).mul_(scaling)
        out[name] = delta.mul_(masks[name]) if name in masks else delta
    return out


def _product(state: Mapping[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    return masked_updates(state, {}, scaling)


def aggregate_round(
    states: Sequence[Mapping[str, torch.Tensor]],
    masks: Sequence[Mapping[str, torch.Tensor]],
    scaling: float,
    how: str = "masked",
    weights: Sequence[float] | None = None,
) -> dict[str, torch.Tensor]:
    """The round's global update ``δ`` (module -> ``[out, in]``) from uploaded adapters.

    Args:
        states: the clients' adapters (peft LoRA states), in a fixed (client) order.
        masks: per client, module -> its model's non-zero pattern.
        scaling: LoRA's ``alpha / r`` (equal for every client).
        how: ``masked``, ``factors``, ``exact`` or ``fedavg`` (the module doc).
        weights: per-client example counts (``fedavg`` only).
    """
    if how not in AGGREGATIONS:
        raise UsageError(f"--heteagg must be one of {', '.join(AGGREGATIONS[:3])}")
    if not states:
        return {}
    zero_adapter = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in states[0].items()}
    if how == "masked":
        return _heteagg_masked(states, masks, scaling)
    if how == "factors":
        return _product(heteagg(zero_adapter, list(states), write_back=False)[0], scaling)
    if how == "fedavg":
        return _product(fedavg(list(states), weights), scaling)
    prefixes = lora_pairs(list(states[0]))
    by_prefix = [{p: m[_module_name(p)] for p in prefixes if _module_name(p) in m} for m in masks]
    return _product(heteagg_exact(zero_adapter, list(states), by_prefix)[0], scaling)


def _heteagg_masked(states, masks, scaling: float) -> dict[str, torch.Tensor]:
    """Algorithm 2 on the masked updates, one client's ``ΔW_i`` in memory at a time (as
    :func:`assy.lego.heteagg` reads clients from files): per module ``sums += ΔW_i``,
    ``counts += (ΔW_i != 0)``, ``δ = sums / max(counts, 1)`` (0 where no client counts)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}
    for state, mask in zip(states, masks, strict=True):
        for name, update in masked_updates(state, mask, scaling).items():
            if name not in sums:
                sums[name] = torch.zeros_like(update)
                counts[name] = torch.zeros(update.shape, dtype=torch.int16)
            sums[name] += update
            counts[name] += update != 0
    return {name: total.div_(counts.pop(name).clamp_min(1)) for name, total in sums.items()}


def add_update(
    total: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``G + δ`` per module (a module absent from one side counts as zero)."""
    out = dict(total)
    for name, d in delta.items():
        out[name] = out[name] + d if name in out else d.clone()
    return out


def variant_values(
    total: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """What a client needs of ``G``: ``G[M]`` per module (1-D, row-major), all zero-free
    modules left out. The client knows its own mask, so the positions never travel."""
    return {name: g[masks[name]].contiguous() for name, g in total.items() if bool(g.any())}


def apply_update(
    module: nn.Module,
    update: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Write the global update back into a :class:`PoolModule`'s (or a peft model's base)
    linear weights: ``W += G ⊙ M``.

    ``update`` holds either dense ``[out, in]`` tensors (``masks`` ``None``: added whole,
    the dense global model; or masked by ``masks``) or :func:`variant_values`' 1-D
    values, which need ``masks`` (the client's own pattern, taken before any update).
    """
    linears = _linears(_base(module))
    for name, values in update.items():
        if name not in linears:
            raise UsageError(f"the global update has {name!r}, which this model does not")
        w = _weight_oi(linears[name])
        with torch.no_grad():
            if values.dim() == 1:
                if masks is None:
                    raise UsageError("a client's update values need its masks")
                w[masks[name]] += values.to(w.dtype)
            elif masks is not None and name in masks:
                w += (values * masks[name]).to(w.dtype)
            else:
                w += values.to(w.dtype)


def _base(module: nn.Module) -> nn.Module:
    """The :class:`PoolModule` under a peft model (its LoRA layers' base weights)."""
    inner = getattr(getattr(module, "base_model", None), "model", None)
    return inner if inner is not None and hasattr(inner, "layers") else module


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --------------------------------------------------------------------------- client, eval


def client_seed(cfg, round_: int, partition: int) -> int:
    return int(np.random.default_rng([cfg.seed, round_, partition, 0x1E90]).integers(2**31))


def lego_round(
    cfg,
    partition: int,
    variant: str,
    values: Mapping[str, torch.Tensor],
    round_: int,
    *,
    pool_dir: str | None = None,
    data_file: str | None = None,
    examples=None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """A LEGO client's round: its variant plus ``G ⊙ M``, a fresh sparse LoRA trained on
    its instruction rows, the adapter returned.

    Args:
        cfg: the run.
        partition: the client's partition id.
        variant: the pool model its tier holds.
        values: :func:`variant_values` of the global update for this variant.
        round_: the round (seeds the LoRA init and the batches).
        pool_dir, data_file: this host's copies of the pool and the data directory.
        examples: the client's rows (default: its partition of ``cfg``'s split).

    Returns:
        ``(adapter_state, metrics)``: metrics carry ``num-examples``, ``sparsity``, the
        training losses, ``step_seconds``, ``adapter-bytes`` and ``peak-rss-bytes`` (the
        process's high-water mark: a fresh process's is the client's own).
    """
    from assy.federation import task
    from assy.federation.instructions import encode_instructions, instruction_splits
    from blockpool import Pool

    pool = Pool(pool_dir or cfg.pool)
    if examples is None:
        parts, _ = instruction_splits(
            data_file if data_file is not None else cfg.data, cfg.split, cfg.clients,
            cfg.seed, cfg.limit,
        )  # fmt: skip
        examples = parts[partition]
    seed = client_seed(cfg, round_, partition)
    torch.manual_seed(seed)
    model = task.lora_model(pool, variant, cfg)  # masks come from the pristine variant
    masks = module_masks(_base(model))
    apply_update(model, values, masks)
    tokenizer = pool.tokenizer(variant)
    encoded = encode_instructions(tokenizer, examples, cfg.max_length)
    metrics = task.train_encoded(
        model, encoded, task._pad_id(tokenizer), steps=cfg.local_steps,
        batch_size=cfg.batch_size, lr=cfg.lr, seed=seed,
    )  # fmt: skip
    state = task.adapter_state(model)
    zeros = sum(int((~m).sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    metrics |= {
        "num-examples": float(len(examples)),
        "step_seconds": metrics["seconds"] / cfg.local_steps,
        "sparsity": zeros / total if total else 0.0,
        "adapter-bytes": float(sum(v.numel() * v.element_size() for v in state.values())),
        "peak-rss-bytes": float(_peak_rss()),
    }
    return state, metrics


def updated_model(pool, model_name: str, update, whole: bool = False):
    """Pool model ``model_name`` as a :class:`~assy.lego.lora.PoolModule` (float32, eval
    mode) with the global update written back.

    Args:
        update: ``G`` (module -> ``[out, in]``); ``None`` or empty: the model as stored.
        whole: add all of ``G`` (the dense global model); otherwise only where the
            model's weights are non-zero (a client's variant: its zeros stay zeros).
    """
    from assy.lego.lora import PoolModule

    module = PoolModule(pool, model_name).eval()
    if update:
        apply_update(module, update, None if whole else module_masks(module))
    return module


def heldout_loss(pool, model_name: str, update, test, max_length: int, whole=False) -> dict:
    """Held-out instruction loss of ``model_name`` with the global update written back
    (:func:`updated_model`; ``whole``: the dense global model).

    Returns:
        ``{"loss": nats per response token, "bpb": bits per response byte, "tokens"}``.
    """
    module = updated_model(pool, model_name, update, whole)
    return module_loss(module, pool.tokenizer(model_name), test, max_length)


def module_loss(module, tokenizer, test, max_length: int) -> dict:
    """:func:`heldout_loss` of a model already built."""
    from assy.federation import task
    from assy.federation.instructions import bits_per_byte, encode_instructions, response_bytes

    encoded = encode_instructions(tokenizer, test, max_length)
    loss, tokens = task.sequence_loss(module, encoded, task._pad_id(tokenizer))
    nbytes = response_bytes(tokenizer, encoded)
    return {"loss": loss, "bpb": bits_per_byte(loss, tokens, nbytes), "tokens": tokens}


ZERO_SHOT_METRICS = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n")


def zero_shot_tasks(text: str, limit: int) -> dict[str, list]:
    """The examples of every ``--zero-shot`` task, the first ``limit`` of each (of each
    subject of a group), from the data ``assy eval`` reads (:func:`assy.data.load_task`)."""
    from assy.data import load_task

    return {name: load_task(name, limit=limit) for name in parse_zero_shot(text)}


def zero_shot(module, tokenizer, tasks: Mapping[str, Sequence], batch_size: int = 8) -> dict:
    """Zero-shot accuracy of a built model on ``tasks`` (name -> examples), scored by
    ``assy eval``'s code: :func:`assy.evaluation.multiple_choice` on a runner over the
    module's own blocks (positions-only head, shared contexts), the models' own
    ``max_length``.

    Returns:
        task -> ``{"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}`` (a standard
        error of one example is ``None``).
    """
    from assy.evaluation import multiple_choice

    runner = module.inference_runner()
    out = {}
    with torch.inference_mode():
        for name, examples in tasks.items():
            result = multiple_choice(
                runner, tokenizer, examples, batch_size=batch_size, progress=False
            )
            out[name] = {
                k: None if isinstance(result[k], float) and math.isnan(result[k]) else result[k]
                for k in ZERO_SHOT_METRICS
            }
    return out


def write_update(path: Path, update: Mapping[str, torch.Tensor]) -> None:
    """``G`` as a safetensors file, atomically."""
    from safetensors.torch import save

    from blockpool import atomic_write_bytes

    atomic_write_bytes(path, save({k: v.contiguous() for k, v in update.items()}))

"""Prune a pool model layer by layer into a new pool model of sparse variant blocks.

The calibration batch is embedded once, then each layer block in turn is built, its
``nn.Linear`` inputs are summarized by forward hooks (Wanda: the squared norm of every
input feature; SparseGPT: ``X X^T``), its weights are pruned, and the *pruned* layer is
run to produce the next layer's inputs, as in the reference implementations of Wanda and
SparseGPT. Only one layer's activations are held (``samples x seq_len x hidden`` floats,
overwritten in place), checked against a byte budget before anything runs. Embeddings,
norms and the LM head are not pruned.

The result is written by :func:`blockpool.variants.write_variant_model`: every block
records its parent and its sparsity (fraction of zeros over its pruned matrices).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from assy.errors import UsageError, arg
from assy.lego.pruning import SparsityTarget, magnitude_mask, sparsegpt_prune, wanda_mask

__all__ = ["PruneReport", "check_prune", "prunable_linears", "prune_pool_model"]

_FLOAT_PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class PruneReport:
    """What a pruning run did.

    Attributes:
        model: the new model's name.
        method: ``magnitude``, ``wanda`` or ``sparsegpt``.
        target: the requested sparsity, as written (``"0.5"``, ``"2:4"``).
        layers: per layer block: ``{"block", "sparsity", "matrices", "zeros", "weights",
            "min", "max", "seconds"}``, sparsities as fractions of zeros (``min``/``max``
            over the block's matrices).
        sparsity: fraction of zeros over all pruned matrices of the model.
        calibration_tokens: ``samples x seq_len`` (0 for magnitude).
        calibration: what the windows were cut from (``task sciq (default)``), if known.
        seconds: wall time of the whole run, writing included.
    """

    model: str
    method: str
    target: str
    layers: list[dict[str, Any]] = field(default_factory=list)
    sparsity: float = 0.0
    calibration_tokens: int = 0
    calibration: str = ""
    seconds: float = 0.0

    def summary(self) -> str:
        """One line: method, matrices, achieved sparsity (overall and per matrix), time."""
        lo = min((r["min"] for r in self.layers), default=0.0)
        hi = max((r["max"] for r in self.layers), default=0.0)
        matrices = sum(r["matrices"] for r in self.layers)
        calib = (
            f"{self.calibration_tokens} calibration tokens"
            + (f" of {self.calibration}" if self.calibration else "")
            if self.calibration_tokens
            else "no calibration"
        )
        return (
            f"{self.model}: {self.method} {self.target} of {matrices} matrices in "
            f"{len(self.layers)} layers, sparsity {self.sparsity:.4f} (per matrix "
            f"{lo:.4f}-{hi:.4f}), {calib}, {self.seconds:.1f} s"
        )


def prunable_linears(layer: nn.Module) -> dict[str, nn.Module]:
    """The ``nn.Linear`` and GPT-2 ``Conv1D`` modules of a layer block, by name."""
    return {name: mod for name, mod in layer.named_modules() if isinstance(mod, nn.Linear | Conv1D)}


def _weight_oi(mod: nn.Module) -> torch.Tensor:
    """The weight as ``[out, in]`` (``Conv1D`` stores ``[in, out]``)."""
    return mod.weight.detach().t() if isinstance(mod, Conv1D) else mod.weight.detach()


class _InputStats:
    """Accumulates, per module, what its pruning method needs from its inputs.

    Modules fed the very same input tensor (q/k/v; gate/up) share one accumulator: the
    tensors seen during one micro-batch are kept alive so that ``id()`` stays unique.
    """

    def __init__(self, modules: dict[str, nn.Module], method: str) -> None:
        self.method = method
        self.stats: dict[str, torch.Tensor] = {}
        self.alias: dict[str, str] = {}
        self._seen: dict[int, str] = {}
        self._alive: list[torch.Tensor] = []
        self._hooks = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str) -> Callable:
        def hook(_mod: nn.Module, args: tuple, _out: Any) -> None:
            x = args[0]
            owner = self._seen.setdefault(id(x), name)
            self._alive.append(x)
            if owner != name:
                self.alias[name] = owner
                return
            x2 = x.reshape(-1, x.shape[-1]).float()
            add = x2.pow(2).sum(0) if self.method == "wanda" else x2.t() @ x2
            self.stats[name] = self.stats[name] + add if name in self.stats else add

        return hook

    def next_batch(self) -> None:
        self._seen.clear()
        self._alive.clear()

    def of(self, name: str) -> torch.Tensor:
        return self.stats[self.alias.get(name, name)]

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self.next_batch()


def _prune_group(
    method: str, ws: list[torch.Tensor], stat: torch.Tensor | None, target: SparsityTarget
) -> list[torch.Tensor]:
    """The pruned ``[out, in]`` float32 weights of modules that share one input.

    SparseGPT prunes them stacked (one OBS pass for q/k/v), each with its own sparsity.
    """
    ws = [w.float() for w in ws]
    if method == "magnitude":
        return [w * magnitude_mask(w, target) for w in ws]
    if method == "wanda":
        return [w * wanda_mask(w, stat.sqrt(), target) for w in ws]
    rows = tuple(w.shape[0] for w in ws)
    stacked = sparsegpt_prune(torch.cat(ws), stat, target, row_groups=rows)[0]
    return list(stacked.split(list(rows)))


def _groups(modules: dict[str, nn.Module], stats: _InputStats | None) -> list[list[str]]:
    """Module names grouped by shared input (each module alone without statistics)."""
    if stats is None:
        return [[n] for n in modules]
    groups: dict[str, list[str]] = {}
    for name in modules:
        groups.setdefault(stats.alias.get(name, name), []).append(name)
    return list(groups.values())


class _SequentialPruner:
    """The stateful ``Transform`` handed to ``write_variant_model``: one block per call."""

    def __init__(self, pool, model, method, target, calib_ids, batch_size, device) -> None:
        from blockpool import BlockRunner

        self.pool, self.method, self.target = pool, method, target
        # config, rotary and masks between layers, on the device the pruning runs on
        self.runner = BlockRunner(pool, model, device=device)
        self.calib_ids = calib_ids.to(self.runner.device) if calib_ids is not None else None
        self.batch_size = batch_size
        self.hidden: torch.Tensor | None = None
        self.layers: list[dict[str, Any]] = []

    def __call__(self, bid: str, tensors: dict[str, torch.Tensor]):
        kind = self.pool.blocks[bid].kind
        if kind == "embed" and self.calib_ids is not None:
            self._embed(bid)
        if kind != "layer":
            return tensors, {}
        return self._prune_layer(bid, tensors)

    def _chunks(self) -> list[slice]:
        n = self.hidden.shape[0]
        return [slice(i, min(i + self.batch_size, n)) for i in range(0, n, self.batch_size)]

    @torch.no_grad()
    def _embed(self, bid: str) -> None:
        ids = self.calib_ids
        embed = self.pool.build_module(bid, config=self.runner.config).to(self.runner.device)
        parts = range(0, len(ids), self.batch_size)
        hidden = [
            self.runner.run_block(bid, ids[i : i + self.batch_size], module=embed) for i in parts
        ]
        self.hidden = torch.cat(hidden).float()

    @torch.no_grad()
    def _run_layer(self, bid: str, layer: nn.Module, stats: _InputStats | None) -> None:
        """Run every micro-batch through ``layer``; with ``stats`` only observe the inputs."""
        for part in self._chunks():
            out = self.runner.run_block(bid, self.hidden[part], module=layer)
            if stats is None:
                self.hidden[part] = out
            else:
                stats.next_batch()

    def _prune_layer(self, bid: str, tensors: dict[str, torch.Tensor]):
        start = time.perf_counter()
        layer = self.pool.build_module(bid, config=self.runner.config).to(self.runner.device)
        modules = prunable_linears(layer)
        stats = None
        if self.method != "magnitude":
            stats = _InputStats(modules, self.method)
            self._run_layer(bid, layer, stats)
            stats.close()
        new_tensors = dict(tensors)
        per_matrix: list[tuple[int, int]] = []  # (zeros, weights)
        for names in _groups(modules, stats):
            stat = stats.of(names[0]) if stats else None
            ws = [_weight_oi(modules[n]) for n in names]
            for name, w in zip(
                names, _prune_group(self.method, ws, stat, self.target), strict=True
            ):
                mod, key = modules[name], f"{name}.weight"
                w = (w.t() if isinstance(mod, Conv1D) else w).to(tensors[key].dtype)
                new_tensors[key] = w.contiguous().cpu()
                mod.weight.data = w.float()  # propagate what the stored model will compute
                per_matrix.append((int((w == 0).sum()), w.numel()))
        if self.hidden is not None:
            self._run_layer(bid, layer, None)
        zeros, total = sum(z for z, _ in per_matrix), sum(n for _, n in per_matrix)
        sparsity = zeros / total if total else 0.0
        fractions = [z / n for z, n in per_matrix]
        row = {"block": bid, "sparsity": sparsity, "matrices": len(per_matrix)}
        row.update(zeros=zeros, weights=total)
        row.update(min=min(fractions, default=0.0), max=max(fractions, default=0.0))
        row["seconds"] = time.perf_counter() - start
        self.layers.append(row)
        meta = {"pruning": self.method, "pruning_target": str(self.target)}
        return new_tensors, {"sparsity": sparsity, "metadata": meta, "entry": {"pruning": meta}}


def check_prune(pool, model: str, new_name: str, out: Path | None = None) -> None:
    """Check, before any calibration, that ``model`` can be pruned into ``new_name``.

    Raises:
        UsageError: an unknown model, a quantized one, a bad name or a name in use.
    """
    from blockpool import check_model_name, check_variant_target

    check_model_name(new_name, argument="new_name", taken=pool.models)
    entry = pool.model(model)
    bad = sorted({pool.blocks[b].precision for b in entry.blocks} - set(_FLOAT_PRECISIONS))
    if bad:
        raise UsageError(
            f"model {model!r} has {'/'.join(bad)} blocks; prune a full-precision model "
            "(fp32/bf16/fp16) and quantize the pruned model afterwards"
        )
    same_pool = out is None or Path(out).resolve() == pool.root.resolve()
    if same_pool and new_name in pool.models:
        raise UsageError(
            f"pool {pool.root} already has a model {new_name!r}; choose another {arg('new_name')}"
        )
    check_variant_target(pool, model, out, new_name)


def _check_positions(pool, model: str, calib_ids: torch.Tensor | None) -> None:
    limit = pool.max_positions(model)
    if calib_ids is not None and limit is not None and calib_ids.shape[1] > limit:
        raise UsageError(
            f"calibration windows of {calib_ids.shape[1]} tokens exceed the {limit} positions "
            f"model {model!r} has learned; use {arg('seq_len')} {limit} or less"
        )


def _check_activation_budget(calib_ids, hidden_size: int, budget_bytes: int) -> None:
    need = calib_ids.numel() * hidden_size * 4
    if need > budget_bytes:
        raise UsageError(
            f"calibration activations need {need / 1e9:.2f} GB ({calib_ids.shape[0]} samples x "
            f"{calib_ids.shape[1]} tokens x {hidden_size} x fp32), over the "
            f"{budget_bytes / 1e9:.2f} GB budget; use fewer samples or shorter sequences"
        )


def prune_pool_model(
    pool,
    model: str,
    method: str,
    target: SparsityTarget,
    new_name: str,
    *,
    calib_ids: torch.Tensor | None = None,
    batch_size: int = 8,
    activation_budget_bytes: int = 2 * 10**9,
    out: Path | None = None,
    device: str = "cpu",
    progress: Callable[[str, int, int], None] | None = None,
    wait: bool = False,
) -> PruneReport:
    """Prune every layer block of ``model`` and add the result to the pool as ``new_name``.

    Args:
        pool: the open source pool (``blockpool.Pool``).
        model: the source model's name; its blocks must be fp32, bf16 or fp16.
        method: ``magnitude`` (no calibration), ``wanda`` or ``sparsegpt``.
        target: the sparsity of every pruned matrix.
        new_name: the new model's name.
        calib_ids: ``[samples, seq_len]`` token ids (see
            :func:`assy.calibration.calibration_windows`); required by Wanda and SparseGPT,
            ignored by magnitude pruning.
        batch_size: calibration sequences per forward call.
        activation_budget_bytes: most bytes the held layer activations may take.
        out: another pool directory to write to (default: the source pool).
        device: where the layers run and are pruned (``cpu``, ``cuda:N``, ``mps``).
        progress: ``progress(name, blocks_done, blocks_total)``.
        wait: wait for another writer of the destination pool instead of failing at once
            (it is locked before calibration starts).

    Returns:
        A :class:`PruneReport`.

    Raises:
        UsageError: unknown method, missing calibration, a quantized source, a bad or
            taken name, or calibration activations over the budget.
        PoolBusy: another process writes the destination pool.
    """
    start = time.perf_counter()
    from blockpool import Pool, pool_lock, write_variant_model

    if method not in ("magnitude", "wanda", "sparsegpt"):
        raise UsageError(f"unknown pruning method {method!r}; use magnitude, wanda or sparsegpt")
    if method != "magnitude" and calib_ids is None:
        raise UsageError(
            f"{method} needs calibration windows ({arg('calib_ids')}: see "
            "assy.calibration.calibration_windows)"
        )
    if method == "magnitude":
        calib_ids = None  # magnitude pruning looks at the weights only
    check_prune(pool, model, new_name, out)
    if calib_ids is not None:
        _check_activation_budget(calib_ids, pool.config(model).hidden_size, activation_budget_bytes)
    if batch_size < 1:
        raise UsageError(f"{arg('batch_size')} must be at least 1, got {batch_size}")
    _check_positions(pool, model, calib_ids)
    with pool_lock(out if out is not None else pool.root, wait=wait):
        # again, on the manifest as it is now that no other writer can change it
        check_prune(Pool(pool.root), model, new_name, out)
        pruner = _SequentialPruner(pool, model, method, target, calib_ids, batch_size, device)
        write_variant_model(pool, model, pruner, out=out, name=new_name, progress=progress)
    report = PruneReport(new_name, method, str(target), pruner.layers)
    weights = sum(r["weights"] for r in pruner.layers)
    report.sparsity = sum(r["zeros"] for r in pruner.layers) / weights if weights else 0.0
    report.calibration_tokens = 0 if calib_ids is None else calib_ids.numel()
    report.seconds = time.perf_counter() - start
    return report

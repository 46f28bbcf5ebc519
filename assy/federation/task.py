"""What clients and the server compute, without Flower: data, LoRA training, scoring.

Everything here is a plain function of a :class:`~assy.federation.config.FederationConfig`,
a partition id and tensors, callable from a test or a fresh process as from a ClientApp.
Models come from the pool (:class:`~assy.lego.lora.PoolModule`); scoring is
:func:`assy.evaluate.multiple_choice`; forward-only scoring under a memory budget runs
through the swapper (:func:`blockpool.open_runner` with a budget).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict

from assy.data import MCExample, load_task
from assy.errors import UsageError
from assy.evaluate import encode_pair, multiple_choice
from assy.federation.config import MIX_TASKS, FederationConfig
from assy.federation.partition import dirichlet_labels, dirichlet_tasks, heldout_split

__all__ = [
    "FederatedData",
    "accuracy",
    "adapter_state",
    "anchor_model",
    "choice_loss",
    "client_seed",
    "federated_data",
    "fedit_round",
    "initial_adapter",
    "local_round",
    "lora_model",
    "load_adapter_state",
    "model_bytes",
    "score_under_budget",
    "sequence_loss",
    "train_adapter",
    "train_encoded",
]


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class FederatedData:
    """The examples of a run: one list per client partition and the held-out test."""

    clients: list[list[MCExample]]
    test: list[MCExample]


def federated_data(cfg: FederationConfig, data_file: str | None = None) -> FederatedData:
    """Split the task's validation data 80/20 by seed, partition the 80% over clients.

    Args:
        cfg: the run (task, ``data``, ``limit``, ``clients``, ``alpha``, ``split``,
            ``seed``, ``test_limit``).
        data_file: this host's copy of ``cfg.data`` (a SuperNode's node config may move it).

    Returns:
        :class:`FederatedData`; the test set is shuffled by seed and cut to ``test_limit``.
        For ``--task dolly`` the clients' instruction rows and the held-out rows
        (:func:`assy.federation.instructions.instruction_splits`).
    """
    if cfg.task == "dolly":
        from assy.federation.instructions import instruction_splits

        data = data_file if data_file is not None else cfg.data
        parts, test = instruction_splits(
            data, cfg.split, cfg.clients, cfg.seed, cfg.limit, cfg.test_limit
        )
        return FederatedData(parts, test)
    tasks = MIX_TASKS if cfg.task == "mix" else (cfg.task,)
    data_file = data_file if data_file is not None else cfg.data
    pool: list[MCExample] = []
    groups: list[str | int] = []
    test: list[MCExample] = []
    for task in tasks:
        examples = load_task(task, data_file=Path(data_file) if data_file else None,
                             limit=cfg.limit or None)  # fmt: skip
        client_idx, test_idx = heldout_split(len(examples), cfg.seed)
        pool += [examples[i] for i in client_idx]
        groups += [task if cfg.split == "tasks" else examples[i].label for i in client_idx]
        test += [examples[i] for i in test_idx]
    split = dirichlet_tasks if cfg.split == "tasks" else dirichlet_labels
    parts = split(groups, cfg.clients, cfg.alpha, cfg.seed)
    order = np.random.default_rng([cfg.seed, 0x7E]).permutation(len(test))
    test = [test[i] for i in order[: cfg.test_limit or None]]
    return FederatedData([[pool[i] for i in part] for part in parts], test)


# --------------------------------------------------------------------------- models


def model_bytes(pool) -> dict[str, int]:
    """Stored bytes of every model of an open pool."""
    from blockpool import summarize

    return {name: m["bytes"] for name, m in summarize(pool)["models"].items()}


def anchor_model(pool, name: str = "") -> str:
    """``name`` checked, or the pool's largest causal model (by stored bytes; a pruned or
    merged variant only when the pool holds nothing else)."""
    sizes = model_bytes(pool)
    causal = [m for m in sizes if pool.family(m).causal]
    if name:
        if name not in sizes:
            raise UsageError(f"--anchor {name!r} is not in the pool ({', '.join(sorted(sizes))})")
        if name not in causal:
            raise UsageError(f"--anchor {name!r} is an encoder; the tasks need a causal LM")
        return name
    if not causal:
        raise UsageError("the pool holds no causal LM to federate (only encoders)")
    originals = [m for m in causal if pool.model(m).parent_model is None] or causal
    return max(originals, key=lambda m: (sizes[m], m))


def lora_model(pool, anchor: str, cfg: FederationConfig) -> torch.nn.Module:
    """The anchor as a trainable module with LoRA on every linear layer of its layers.

    Sparsity-preserving (:func:`assy.lego.lora.apply_sparse_lora`): on a pruned anchor
    the update keeps the zeros. Only the LoRA factors are trainable.
    """
    from transformers.pytorch_utils import Conv1D

    from assy.lego import prunable_linears
    from assy.lego.lora import PoolModule, apply_sparse_lora

    base = PoolModule(pool, anchor)
    linears = prunable_linears(base.layers[0])
    targets = sorted({name.rsplit(".", 1)[-1] for name in linears})
    config = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=0.0,
        target_modules=targets,
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in linears.values()),
    )
    return apply_sparse_lora(base, config)


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA factors by their saved-adapter names (``...q_proj.lora_A.weight``)."""
    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def load_adapter_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Put ``state`` (as :func:`adapter_state` returns it) into the model's LoRA factors."""
    result = set_peft_model_state_dict(model, dict(state))
    lora_missing = [k for k in result.missing_keys if "lora_" in k]
    if lora_missing or result.unexpected_keys:
        raise UsageError(
            f"adapter does not fit the model: missing {lora_missing[:3]}, "
            f"unexpected {list(result.unexpected_keys)[:3]}"
        )


def initial_adapter(pool, anchor: str, cfg: FederationConfig) -> dict[str, torch.Tensor]:
    """Round 0's global adapter: LoRA's own initialization (B = 0), seeded by ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    return adapter_state(lora_model(pool, anchor, cfg))


# --------------------------------------------------------------------------- train, score


def _encode(tokenizer, examples: Sequence[MCExample], max_length: int) -> list[tuple[list, int]]:
    """Per example: the token ids of context + correct choice (left-truncated to
    ``max_length``) and how many trailing ids are the choice."""
    encoded = []
    for ex in examples:
        ctx, cont = encode_pair(tokenizer, ex.context, ex.choices[ex.label])
        ids = (ctx + cont)[-max_length:]
        encoded.append((ids, min(len(cont), len(ids) - 1)))
    return encoded


def _batch_loss(model: torch.nn.Module, batch: list[tuple[list, int]], pad: int) -> torch.Tensor:
    """Mean NLL of the choice tokens given the context (right padding, masked)."""
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    target = torch.full_like(ids, -100)
    for row, (seq, n_cont) in enumerate(batch):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        target[row, len(seq) - n_cont : len(seq)] = ids[row, len(seq) - n_cont : len(seq)]
    logits = model(ids, mask)
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), target[:, 1:].reshape(-1)
    )


def train_adapter(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[MCExample],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    max_length: int,
    seed: int,
) -> dict[str, float]:
    """``steps`` AdamW steps on the NLL of each example's correct choice given its context.

    See :func:`train_encoded` (which this calls on the encoded examples).
    """
    if not examples:
        raise UsageError("no local examples to train on")
    encoded = _encode(tokenizer, examples, max_length)
    return train_encoded(
        model, encoded, _pad_id(tokenizer), steps=steps, batch_size=batch_size, lr=lr, seed=seed
    )


def _pad_id(tokenizer) -> int:
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)


def train_encoded(
    model: torch.nn.Module,
    encoded: Sequence[tuple[list, int]],
    pad: int,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> dict[str, float]:
    """``steps`` AdamW steps on the NLL of each sequence's trailing target tokens.

    ``encoded`` holds ``(token ids, number of trailing ids that carry the loss)``.
    Batches are drawn by ``seed`` (reshuffled each pass over the data); only parameters
    with ``requires_grad`` (the LoRA factors) are updated. Gradients flow back through
    every layer from the head down to the first layer holding LoRA factors.

    Returns:
        ``{"loss_first", "loss_last", "steps", "seconds", "trainable_params",
        "frozen_params"}``.
    """
    if not encoded:
        raise UsageError("no local examples to train on")
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    order: list[int] = []
    losses = []
    start = time.perf_counter()
    model.train()
    for _ in range(steps):
        if len(order) < batch_size:
            order += rng.permutation(len(encoded)).tolist() * -(-batch_size // len(encoded))
        batch, order = [encoded[i] for i in order[:batch_size]], order[batch_size:]
        loss = _batch_loss(model, batch, int(pad))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    trainable = sum(p.numel() for p in params)
    return {
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "steps": float(steps),
        "seconds": time.perf_counter() - start,
        "trainable_params": float(trainable),
        "frozen_params": float(sum(p.numel() for p in model.parameters()) - trainable),
    }


def choice_loss(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[MCExample],
    max_length: int = 256,
    batch_size: int = 8,
) -> float:
    """Mean NLL (nats per token) of the correct choices given their contexts."""
    encoded = _encode(tokenizer, examples, max_length)
    return sequence_loss(model, encoded, _pad_id(tokenizer), batch_size)[0]


@torch.no_grad()
def sequence_loss(
    model: torch.nn.Module, encoded: Sequence[tuple[list, int]], pad: int, batch_size: int = 8
) -> tuple[float, int]:
    """``(mean NLL in nats per target token, target tokens)`` of encoded sequences."""
    total = tokens = 0.0
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start : start + batch_size]
        n = sum(n_cont for _, n_cont in batch)
        total += float(_batch_loss(model, batch, pad)) * n
        tokens += n
    return total / max(tokens, 1), int(tokens)


def accuracy(
    model: torch.nn.Module, tokenizer, examples: Sequence[MCExample], batch_size: int = 8
) -> dict[str, float]:
    """Zero-shot multiple-choice metrics of a trainable model (``acc``, ``acc_norm``, ``n``)."""
    result = multiple_choice(
        lambda ids, mask: model(ids, mask), tokenizer, examples, batch_size=batch_size,
        progress=False,
    )  # fmt: skip
    return {k: float(result[k]) for k in ("acc", "acc_norm", "n")}


def score_under_budget(
    pool, model: str, examples: Sequence[MCExample], budget: int | None
) -> dict[str, Any]:
    """Forward-only scoring of a pool model within ``budget`` resident weight bytes.

    What a selection round's client does with each candidate (AssyLLM step 2), run
    through the block swapper so that it keeps the tier's budget.

    Returns:
        :func:`assy.evaluate.multiple_choice`'s metrics plus the swapper's counters.
    """
    from blockpool import RunOptions, open_runner

    options = RunOptions(budget=budget, threads=torch.get_num_threads())
    with open_runner(pool, model, options) as run:
        result = dict(multiple_choice(run.runner, pool.tokenizer(model), examples, progress=False))
    if run.swapper is not None:
        result |= run.swapper.stats.as_dict()
    return result


# --------------------------------------------------------------------------- client rounds


def client_seed(cfg: FederationConfig, round_: int, partition: int) -> int:
    return int(np.random.default_rng([cfg.seed, round_, partition]).integers(2**31))


def fedit_round(
    cfg: FederationConfig,
    partition: int,
    global_state: Mapping[str, torch.Tensor],
    round_: int,
    *,
    pool_dir: str | None = None,
    data_file: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """A FedIT client's round: load the global LoRA, train it on local data, return it.

    Returns:
        ``(adapter_state, metrics)``; metrics carry ``num-examples`` (the FedAvg weight),
        the training losses and times, and ``backprop-layers`` (gradients pass through
        every layer of the anchor).
    """
    from blockpool import Pool

    pool = Pool(pool_dir or cfg.pool)
    anchor = anchor_model(pool, cfg.anchor)
    examples = federated_data(cfg, data_file).clients[partition]
    model = lora_model(pool, anchor, cfg)
    load_adapter_state(model, global_state)
    metrics = train_adapter(
        model,
        pool.tokenizer(anchor),
        examples,
        steps=cfg.local_steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        max_length=cfg.max_length,
        seed=client_seed(cfg, round_, partition),
    )
    metrics |= {"num-examples": float(len(examples)), "backprop-layers": float(len(model.layers))}
    return adapter_state(model), metrics


def _local_dir(cfg: FederationConfig, partition: int, client_dir: str | None) -> Path:
    root = Path(client_dir or cfg.client_dir or Path(cfg.out) / "clients")
    return root / f"p{partition:05d}"


def _latest_local(directory: Path, before: int) -> Path | None:
    """This client's adapter saved by the latest round before ``before``."""
    saved = sorted(directory.glob("adapter-r*.safetensors"))
    saved = [p for p in saved if int(p.stem.removeprefix("adapter-r")) < before]
    return saved[-1] if saved else None


def local_round(
    cfg: FederationConfig,
    partition: int,
    round_: int,
    *,
    pool_dir: str | None = None,
    data_file: str | None = None,
    client_dir: str | None = None,
) -> dict[str, float]:
    """A ``local`` client's round: continue its own adapter on its own data, score it.

    The adapter never leaves the client: it is kept in the client's directory, one file
    per round (so a round redone after a server restart starts from the same state).

    Returns:
        metrics: ``acc``/``acc_norm``/``n`` on the held-out test, training losses,
        ``num-examples``.
    """
    from safetensors.torch import load_file, save

    from blockpool import Pool, atomic_write_bytes

    pool = Pool(pool_dir or cfg.pool)
    anchor = anchor_model(pool, cfg.anchor)
    data = federated_data(cfg, data_file)
    directory = _local_dir(cfg, partition, client_dir)
    previous = _latest_local(directory, round_)
    state = load_file(previous) if previous else initial_adapter(pool, anchor, cfg)
    model = lora_model(pool, anchor, cfg)
    load_adapter_state(model, state)
    tokenizer = pool.tokenizer(anchor)
    metrics = train_adapter(
        model,
        tokenizer,
        data.clients[partition],
        steps=cfg.local_steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        max_length=cfg.max_length,
        seed=client_seed(cfg, round_, partition),
    )
    atomic_write_bytes(directory / f"adapter-r{round_:05d}.safetensors", save(adapter_state(model)))
    metrics |= accuracy(model, tokenizer, data.test)
    return metrics | {"num-examples": float(len(data.clients[partition]))}

"""Training: one loop for adapters (and LoRA), and the three adapter objectives.

:func:`train_loop` is the loop every trainer here uses (adapters in ``assy stitch``, LoRA
in ``assy finetune``, later the federated clients): AdamW on the given parameters, one
batch per step from a ``loss_at(step)`` callable, gradient clipping, a progress bar, and
what it cost (seconds, the bytes autograd saved for backward, peak RSS).

Adapter objectives (the blocks stay frozen; only adapter parameters change):

- ``hidden``: match the anchor's own hidden state a few layers past the span's exit
  (mean squared error on per-dimension standardized states, positions >= 1). It starts at
  the stream entering the span's first seam (cached), so gradients reach only the span's
  adapters and pass only through the blocks between them and that depth.
- ``kl``: distil the anchor's next-token distribution, ``KL(anchor || assembly)`` at
  ``kl_positions`` random positions per window; needs no labels; backpropagates through
  every block after the first seam, the head included.
- ``task``: cross-entropy over the choices of multiple-choice examples, each choice scored
  by its summed log-likelihood (as the evaluation ranks them); backpropagates through every
  block after the first seam.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from assy.progress import bar
from blockpool import peak_rss_bytes

__all__ = [
    "choice_loss",
    "freeze_blocks",
    "hidden_loss",
    "kl_loss",
    "refetching",
    "step_bytes",
    "train_assembly",
    "train_loop",
]


def train_loop(
    parameters: Iterable[torch.nn.Parameter],
    loss_at: Callable[[int], torch.Tensor | Iterable[torch.Tensor]],
    *,
    steps: int,
    lr: float,
    desc: str = "train",
    start_step: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    on_step: Callable[[int, torch.optim.Optimizer], None] | None = None,
    clip: float = 1.0,
    log_every: int = 10,
) -> dict[str, Any]:
    """Run ``steps`` optimizer steps (from ``start_step``) of ``loss_at(step)``.

    Args:
        parameters: what trains (everything else should have ``requires_grad=False``).
        loss_at: the scalar loss of step ``step``'s batch (deterministic in ``step``, so a
            resumed run sees the same batches), or an iterable of parts that sum to it:
            each part's backward pass runs before the next part is computed (gradient
            accumulation over micro-batches that do not fit in memory together).
        steps: the last step (exclusive).
        lr: AdamW learning rate (no weight decay).
        desc: the progress bar's label.
        start_step: resume from here (with ``optimizer`` holding its state).
        optimizer: an optimizer to continue; default a fresh AdamW.
        on_step: called as ``on_step(steps_done, optimizer)`` after every step (checkpoints).
        clip: gradient norm clipping.
        log_every: keep one loss in this many in the report.

    Returns:
        ``steps``, ``losses`` (every ``log_every``-th, and the last), ``first_loss``,
        ``last_loss``, ``seconds``, ``saved_for_backward_bytes`` (the most autograd held
        for one step: activations and the frozen weights they multiply) and
        ``peak_rss_bytes`` (the process's, so far).
    """
    params = [p for p in parameters if p.requires_grad]
    opt = optimizer or torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses: list[tuple[int, float]] = []
    saved_peak = 0
    tic = time.perf_counter()
    for step in bar(range(start_step, steps), desc=desc, leave=False):
        saved = [0]

        def pack(t: torch.Tensor, saved: list[int] = saved) -> torch.Tensor:
            saved[0] += t.numel() * t.element_size()
            return t

        opt.zero_grad(set_to_none=True)
        value = 0.0
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_at(step)
            for part in [loss] if isinstance(loss, torch.Tensor) else loss:
                part.backward()
                value += float(part.detach())
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        saved_peak = max(saved_peak, saved[0])
        if not math.isfinite(value):
            raise FloatingPointError(f"{desc}: loss became {value} at step {step}; lower --lr")
        if step % log_every == 0 or step == steps - 1:
            losses.append((step, value))
        if on_step is not None:
            on_step(step + 1, opt)
    return {
        "steps": steps - start_step,
        "lr": lr,
        "losses": losses,
        "first_loss": losses[0][1] if losses else None,
        "last_loss": losses[-1][1] if losses else None,
        "seconds": time.perf_counter() - tic,
        "saved_for_backward_bytes": saved_peak,
        "peak_rss_bytes": peak_rss_bytes(),
    }


# --------------------------------------------------------------------------- losses


def hidden_loss(pred: torch.Tensor, target: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Mean squared error of ``[B, T, d]`` states standardized by ``scale [d]``, positions >= 1."""
    return (((pred[:, 1:] - target[:, 1:]) / scale) ** 2).mean()


def kl_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``KL(teacher || student)`` of ``[N, V]`` logits, mean over the N positions (nats)."""
    t = torch.log_softmax(teacher.float(), -1)
    s = torch.log_softmax(student.float(), -1)
    return (t.exp() * (t - s)).sum(-1).mean()


def choice_loss(
    model: Callable[..., torch.Tensor], batch: Sequence[Any], tokenizer, pad_id: int, device
) -> torch.Tensor:
    """Cross-entropy over choices, each choice scored by its summed log-likelihood.

    Args:
        model: ``(ids [B, T], mask [B, T], logits_at [B, T] bool) -> logits [N, V]`` (the
            rows where ``logits_at`` is set, in row-major order).
        batch: :class:`~assy.data.MCExample` s.
        tokenizer: the model's tokenizer; pairs are encoded as the evaluation encodes them
            (:func:`assy.evaluate.encode_pair`), inputs cut to their last 512 tokens.
        pad_id: the padding token (masked).
        device: where inputs go.

    Returns:
        The mean cross-entropy (nats) of the correct choice among the example's choices.
    """
    from assy.evaluate import encode_pair

    requests = []  # (example, input tokens, continuation tokens)
    for e, ex in enumerate(batch):
        for choice in ex.choices:
            context, cont = encode_pair(tokenizer, ex.context, choice)
            tokens = (context + cont)[-513:]
            requests.append((e, tokens[:-1], cont))
    width = max(len(r[1]) for r in requests)
    ids = torch.full((len(requests), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    at = torch.zeros_like(ids, dtype=torch.bool)
    for row, (_, tokens, cont) in enumerate(requests):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
        at[row, len(tokens) - len(cont) : len(tokens)] = True
    logprobs = torch.log_softmax(model(ids.to(device), mask.to(device), at.to(device)).float(), -1)
    per_example: list[list[torch.Tensor]] = [[] for _ in batch]
    offset = 0
    for e, _, cont in requests:
        target = torch.tensor(cont, device=logprobs.device)[:, None]
        per_example[e].append(logprobs[offset : offset + len(cont)].gather(-1, target).sum())
        offset += len(cont)
    k = max(len(x) for x in per_example)
    pad = torch.tensor(-torch.inf, device=logprobs.device)
    scores = torch.stack([torch.stack(x + [pad] * (k - len(x))) for x in per_example])
    labels = torch.tensor([ex.label for ex in batch], device=scores.device)
    return F.cross_entropy(scores, labels)


# --------------------------------------------------------------------------- adapters


def _batches(pool_size: int, batch: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Indices of each step's batch: successive seeded permutations, cut into batches."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch:
        order += torch.randperm(pool_size, generator=generator).tolist()
    return [torch.tensor(order[i * batch : (i + 1) * batch]) for i in range(steps)]


def freeze_blocks(runner) -> None:
    """Stop gradients into every block of ``runner``'s chain (adapters keep theirs)."""
    for bid in dict.fromkeys(runner.block_ids):
        for p in runner.fetch(bid).parameters():
            p.requires_grad_(False)


def refetching(fetch: Callable[[str], Any]) -> Callable[[str], Callable[..., Any]]:
    """``fetch`` for a backward pass through frozen blocks that a swapper may evict.

    Autograd keeps what a block's backward needs -- its weights among it -- until the
    backward pass, so blocks a budgeted runner evicted would stay in memory all the same.
    A block called here on input that requires a gradient runs under activation
    checkpointing instead: autograd keeps its input, and the backward pass fetches the block
    again (from the swapper: within its budget, re-read if evicted) and recomputes it. A
    block called on input that needs no gradient (before the first adapter) runs as is.
    Every block is frozen when fetched (a swapper's re-read builds new parameters).

    Args:
        fetch: block id -> module (a runner's ``fetch``).

    Returns:
        Block id -> a callable with the module's signature, for ``runner.walk``.
    """
    from torch.utils.checkpoint import checkpoint

    def run(bid: str, *args: Any, **kwargs: Any) -> Any:
        module = fetch(bid)
        for p in module.parameters():
            p.requires_grad_(False)
        return module(*args, **kwargs)

    def get(bid: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if torch.is_grad_enabled() and any(
                isinstance(a, torch.Tensor) and a.requires_grad for a in args
            ):
                return checkpoint(run, bid, *args, use_reentrant=False, **kwargs)
            return run(bid, *args, **kwargs)

        return call

    return get


def step_bytes(runner, batch: int, length: int, logit_rows: int) -> int:
    """Working memory of one training step through :func:`refetching` blocks, a bound.

    The forward call's working memory (``runner.working_bytes``) three times: the backward
    pass recomputes each block, keeps what the block's own backward needs of it and makes
    the gradients of those activations beside; plus the input of every block, which
    checkpointing keeps for the backward pass (float32). Measured on the federation
    benchmark's SmolLM2 chain (8GB tier, batches of 8 x 34-57 tokens): the round's peak
    within 3% of its budget with this bound, 11% over with twice the forward's.
    """
    layers = len(runner.block_ids)
    width = max(runner.pool.blocks[b].hidden_size for b in runner.block_ids)
    kept = layers * batch * length * width * 4
    return 3 * runner.working_bytes(batch, length, 0, logit_rows) + kept


def _hidden_stop(pool, items: list, exit_position: int, offset: int) -> tuple[int, int]:
    """How far past the exit seam ``hidden`` runs: (stop index into items, layers run)."""
    k = 0
    while (
        k < offset
        and exit_position + 1 + k < len(items)
        and isinstance(items[exit_position + 1 + k], str)
        and pool.blocks[items[exit_position + 1 + k]].kind == "layer"
    ):
        k += 1
    return exit_position + 1 + k, k


def train_assembly(
    stream, recipe, adapters: dict[int, Any], data, fit, log: Callable[[str], None]
) -> dict[str, Any]:
    """Train ``adapters`` (boundary -> adapter) of ``stream``'s chain with ``fit.objective``.

    The blocks stay frozen. ``hidden`` and ``kl`` start from the cached stream entering the
    first of these adapters (:class:`~assy.assembly.chain.ChainStream`); ``task`` runs the
    whole chain on the examples of ``data``.

    Returns:
        The report: objective, trainable parameters, the blocks gradients pass through,
        the loop's report (:func:`train_loop`) and held-out losses before and after
        (``hidden``, ``kl``: on the validation windows).
    """
    from assy.assembly.chain import destination, run_tail
    from assy.assembly.states import own_states

    runner, pool, items = stream.runner, stream.pool, stream.items
    windows, options, cache, device = stream.windows, stream.options, stream.cache, runner.device
    befores = sorted(adapters)
    chosen = [adapters[b] for b in befores]
    positions = [items.index(a) for a in chosen]
    first = min(positions)
    freeze_blocks(runner)
    params = [p for a in chosen for p in a.parameters()]
    for p in params:
        p.requires_grad_(True)
    for a in chosen:
        a.train()
    train_w = (~windows.validation).nonzero().flatten()
    val_w = windows.validation.nonzero().flatten()
    objective = fit.objective
    through: list[str]
    held_out: Callable[[], float] | None = None
    if objective in ("hidden", "kl"):
        x0 = stream.at(first)
        batches = _batches(len(train_w), fit.train_batch, fit.steps, fit.seed)
    if objective == "hidden":
        stop, k = _hidden_stop(pool, items, max(positions), fit.hidden_offset)
        depth = destination(recipe, pool, befores[-1])[1] + k
        target = own_states(
            pool, recipe.anchor, windows.ids, None, [depth], options=options, cache=cache
        )[depth]
        scale = target[train_w, 1:].reshape(-1, target.shape[-1]).std(0).clamp_min(1e-6).to(device)
        tail = items[first:stop]
        through = [i for i in tail if isinstance(i, str)]

        def loss_on(idx: torch.Tensor) -> torch.Tensor:
            pred = run_tail(runner, tail, x0[idx].to(device))
            return hidden_loss(pred, target[idx].to(device), scale)

        def loss_at(step: int) -> torch.Tensor:
            return loss_on(train_w[batches[step]])

        target_name = f"{recipe.anchor} own state at depth {depth}"
    elif objective == "kl":
        n_layers = sum(pool.blocks[b].kind == "layer" for b in pool.model(recipe.anchor).blocks)
        final = own_states(
            pool, recipe.anchor, windows.ids, None, [n_layers], options=options, cache=cache
        )[n_layers]
        head = items[-1]
        tail = items[first:-1]
        through = [i for i in items[first:] if isinstance(i, str)]
        generator = torch.Generator().manual_seed(fit.seed + 1)
        t = windows.ids.shape[1]

        def loss_on(idx: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
            h = run_tail(runner, tail, x0[idx].to(device))[:, at]
            student = runner.run_block(head, h)
            with torch.no_grad():
                teacher = runner.run_block(head, final[idx][:, at].to(device))
            return kl_loss(student.flatten(0, 1), teacher.flatten(0, 1))

        def loss_at(step: int) -> torch.Tensor:
            at = 1 + torch.randperm(t - 1, generator=generator)[: fit.kl_positions].sort().values
            return loss_on(train_w[batches[step]], at)

        target_name = f"{recipe.anchor} next-token distribution"
    else:
        examples = data.examples
        tokenizer = pool.tokenizer(recipe.anchor)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        batches = _batches(len(examples), fit.train_batch, fit.steps, fit.seed)
        through = [i for i in items[first:] if isinstance(i, str)]

        def model(ids, mask, at):
            return runner.walk(runner.fetch, ids, mask, logits_at=at).logits

        def loss_at(step: int) -> torch.Tensor:
            return choice_loss(model, [examples[i] for i in batches[step]], tokenizer, pad, device)

        target_name = "the correct choice of the training examples"
    if objective in ("hidden", "kl") and len(val_w):
        fixed = torch.arange(1, windows.ids.shape[1], 4)

        def held_out() -> float:
            with torch.no_grad():
                losses = [
                    float(
                        loss_on(val_w[i : i + fit.train_batch])
                        if objective == "hidden"
                        else loss_on(val_w[i : i + fit.train_batch], fixed)
                    )
                    for i in range(0, len(val_w), fit.train_batch)
                ]
            return sum(losses) / len(losses)

    before = held_out() if held_out else None
    # the gated cross-attention starts at zero and has far to go: it learns faster
    xattn = [
        p for a in chosen if a.cross_attention is not None for p in a.cross_attention.parameters()
    ]
    rest = [p for p in params if all(p is not q for q in xattn)]
    groups = [{"params": rest, "lr": fit.lr}]
    if xattn:
        groups.append({"params": xattn, "lr": fit.xattn_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    with torch.enable_grad():
        report = train_loop(
            params, loss_at, steps=fit.steps, lr=fit.lr, desc=f"train {objective}", optimizer=opt
        )
    after = held_out() if held_out else None
    for a in chosen:
        a.eval()
        for p in a.parameters():
            p.requires_grad_(False)
    log(
        f"trained {objective}: {report['steps']} steps, loss {report['first_loss']:.4f} -> "
        f"{report['last_loss']:.4f}"
        + (f", held-out {before:.4f} -> {after:.4f}" if before is not None else "")
    )
    return {
        "objective": objective,
        "target": target_name,
        "seams": befores,
        "trainable_parameters": sum(p.numel() for p in params),
        "blocks_gradients_pass_through": through,
        "backpropagates_through_frozen_blocks": bool(through),
        "held_out_loss_before": before,
        "held_out_loss_after": after,
        "cross_attention_gates": [
            float(torch.tanh(a.cross_attention.gate))
            for a in chosen
            if a.cross_attention is not None
        ],
        **report,
    }

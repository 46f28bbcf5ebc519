"""A relative in the pool: LoRA-fine-tune a pool model and register the merged result.

As the seed's Vicuna is to Llama: ``finetune_pool_model(pool, "smollm2-135m", data,
"smollm2-dolly")`` trains a LoRA (peft; sparsity-preserving on pruned models,
:mod:`assy.lego.lora`) on instruction data with the loss on the response tokens,
merges it, and writes every block as a variant of its parent (each block records the block
it came from). Steps and sequence length are capped; a checkpoint (LoRA and AdamW state,
safetensors) is written every ``checkpoint_every`` steps under ``POOL/.assy-finetune/NAME``,
and a rerun with the same settings resumes from it (``restart`` discards it). The pool
manifest is written last, so a killed run never leaves a half-registered model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from assy.assembly.calibration import FitData
from assy.assembly.train import train_loop
from assy.errors import UsageError, arg
from blockpool import Pool, RunOptions, check_model_name, parse_device, use_threads

__all__ = ["FinetuneOptions", "finetune_pool_model", "training_pairs"]


@dataclass(frozen=True)
class FinetuneOptions:
    """How to fine-tune.

    Attributes:
        rank, alpha: LoRA rank and scale numerator.
        targets: module names LoRA wraps (``q_proj``, ``v_proj``, ...).
        steps: optimizer steps (one batch each).
        lr: AdamW learning rate.
        batch_size: sequences per step.
        seq_len: tokens per sequence (longer ones are cut).
        seed: seed of the batch order and LoRA initialization.
        checkpoint_every: steps between checkpoints.
    """

    rank: int = 16
    alpha: int = 32
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    steps: int = 200
    lr: float = 2e-4
    batch_size: int = 4
    seq_len: int = 256
    seed: int = 0
    checkpoint_every: int = 25

    def validate(self) -> None:
        if self.rank < 1 or self.steps < 1 or self.batch_size < 1 or self.seq_len < 8:
            raise UsageError("--rank, --steps, --batch-size must be >= 1 and --seq-len >= 8")
        if self.lr <= 0:
            raise UsageError(f"--lr must be positive, got {self.lr}")


def training_pairs(data: FitData) -> list[tuple[str, str]]:
    """``(prompt, response)`` pairs: instructions as given, multiple-choice examples as
    (context, correct choice), plain text as paragraphs with an empty prompt."""
    if data.instructions:
        return list(data.instructions)
    if data.examples:
        return [(ex.context, ex.choices[ex.label]) for ex in data.examples]
    return [("", p) for p in data.text.split("\n\n") if p.strip()]


def _encode(
    tokenizer, pairs: Sequence[tuple[str, str]], seq_len: int
) -> list[tuple[list[int], int]]:
    """Token ids of prompt + response (+ EOS), cut to ``seq_len`` (a prompt to its last
    ``seq_len // 2`` tokens), and where the response starts."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for prompt, response in pairs:
        head = list(tokenizer(prompt).input_ids) if prompt else list(tokenizer("").input_ids)
        head = head[-(seq_len // 2) :]  # a long prompt keeps its end, so the response fits
        ids = (head + list(tokenizer(response, add_special_tokens=False).input_ids) + eos)[:seq_len]
        if len(ids) > len(head):
            out.append((ids, len(head)))
    return out


def _settings_digest(model: str, name: str, data: FitData, options: FinetuneOptions) -> str:
    blob = json.dumps(
        {"model": model, "name": name, "data": data.source, **asdict(options)},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _save_checkpoint(
    path: Path, named: dict[str, torch.nn.Parameter], opt, step: int, digest: str
) -> None:
    tensors = {f"param/{n}": p.detach().cpu().contiguous() for n, p in named.items()}
    for n, p in named.items():
        for k, v in opt.state.get(p, {}).items():
            tensors[f"{k}/{n}"] = v.detach().cpu().reshape(v.shape).contiguous()
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "state.safetensors.tmp"
    save_file(tensors, tmp, metadata={"step": str(step), "settings": digest})
    tmp.replace(path / "state.safetensors")


def _load_checkpoint(path: Path, named: dict[str, torch.nn.Parameter], opt, digest: str) -> int:
    from safetensors import safe_open

    file = path / "state.safetensors"
    with safe_open(file, "pt") as f:
        meta = f.metadata() or {}
    if meta.get("settings") != digest:
        raise UsageError(
            f"{path}: a checkpoint of another fine-tuning run (other settings or "
            "data) is there; pass --restart to discard it"
        )
    tensors = load_file(file)
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(tensors[f"param/{n}"])
            state = {
                k.split("/", 1)[0]: v
                for k, v in tensors.items()
                if k.endswith(f"/{n}") and not k.startswith("param/")
            }
            if state:
                opt.state[p] = {k: v.to(p.device) for k, v in state.items()}
    return int(meta["step"])


def finetune_pool_model(
    pool: Pool,
    model: str,
    data: FitData,
    name: str,
    options: FinetuneOptions = FinetuneOptions(),
    *,
    run: RunOptions = RunOptions(),
    restart: bool = False,
    wait: bool = False,
    log: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """LoRA-fine-tune ``model`` on ``data`` and add the merged model to the pool as ``name``.

    Returns:
        The report: steps, losses, trainable parameters, seconds, peak RSS, the step it
        resumed from, and the new model's name.

    Raises:
        UsageError: ``name`` taken, an encoder, no training pairs, a checkpoint of other
            settings (without ``restart``).
    """
    from peft import LoraConfig

    from assy.lego.lora import PoolModule, apply_sparse_lora, write_merged_model

    options.validate()
    run.validate()
    check_model_name(name, argument="name", taken=pool.models)
    if name in pool.models:
        raise UsageError(f"model {name!r} exists in pool {pool.root}; choose another {arg('name')}")
    if not pool.family(model).causal:
        raise UsageError(f"model {model!r} is an encoder; fine-tuning here trains causal LMs")
    tokenizer = pool.tokenizer(model)
    examples = _encode(tokenizer, training_pairs(data), options.seq_len)
    if not examples:
        raise UsageError("no training pairs in the data (need instructions, examples or text)")
    use_threads(run.threads)
    device = parse_device(run.device)
    torch.manual_seed(options.seed)
    module = PoolModule(pool, model, dtype=run.torch_dtype, device=str(device))
    for p in module.parameters():
        p.requires_grad_(False)
    config = LoraConfig(
        r=options.rank,
        lora_alpha=options.alpha,
        target_modules=list(options.targets),
        lora_dropout=0.0,
    )
    peft_model = apply_sparse_lora(module, config)
    named = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(list(named.values()), lr=options.lr, weight_decay=0.0)
    digest = _settings_digest(model, name, data, options)
    ckpt = pool.root / ".assy-finetune" / name
    if restart:
        shutil.rmtree(ckpt, ignore_errors=True)
    start = (
        _load_checkpoint(ckpt, named, opt, digest) if (ckpt / "state.safetensors").is_file() else 0
    )
    if start:
        log(f"resuming {name} from step {start} ({ckpt})")
    generator = torch.Generator().manual_seed(options.seed)
    order: list[int] = []
    while len(order) < options.steps * options.batch_size:
        order += torch.randperm(len(examples), generator=generator).tolist()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def loss_at(step: int) -> torch.Tensor:
        batch = [
            examples[i] for i in order[step * options.batch_size : (step + 1) * options.batch_size]
        ]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for row, (tokens, start_at) in enumerate(batch):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
            labels[row, start_at : len(tokens)] = ids[row, start_at : len(tokens)]
        # logits only where a response token is predicted (the LM head is the largest matrix)
        at = torch.zeros_like(ids, dtype=torch.bool)
        at[:, :-1] = labels[:, 1:] != -100
        logits = peft_model(ids.to(device), mask.to(device), logits_at=at.to(device))
        return F.cross_entropy(logits.float(), labels[:, 1:][at[:, :-1]].to(device))

    def on_step(done: int, optimizer) -> None:
        if done % options.checkpoint_every == 0 and done < options.steps:
            _save_checkpoint(ckpt, named, optimizer, done, digest)

    peft_model.train()
    report = train_loop(
        list(named.values()),
        loss_at,
        steps=options.steps,
        lr=options.lr,
        desc=f"finetune {name}",
        start_step=start,
        optimizer=opt,
        on_step=on_step,
    )
    merged = peft_model.merge_and_unload().eval()
    write_merged_model(pool, model, merged, name, wait=wait)
    shutil.rmtree(ckpt, ignore_errors=True)
    return {
        "model": name,
        "parent": model,
        "resumed_from": start,
        "pairs": len(examples),
        "data": data.source,
        "settings": asdict(options),
        "trainable_parameters": sum(p.numel() for p in named.values()),
        **report,
    }

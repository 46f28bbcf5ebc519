"""Stitch an assembly: fit its adapters along the assembled chain, in order, and write it.

The states a seam is fitted on are the states that flow through the assembly built so far
(fitting on each source model's own states barely beats dropping the layers; DESIGN.md):
the stream is run from the anchor's embedding through the slices and the adapters already
fitted, and each seam is fitted, in closed form, on what reaches it, against the next
slice's own model's state at that depth (the anchor's own state, or -- for a slice of
another model with another tokenizer -- that model's state at the tokens that end on the
same character). Optionally the adapters then train (:mod:`assy.assembly.train`).

The stream entering each seam is cached by the sums of everything before it
(:mod:`assy.assembly.states`), so variants of one seam share the forward passes before it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from assy.assembly.adapter import ElasticAdapter, save_adapter
from assy.assembly.calibration import FitData, Windows, align_by_characters, token_windows
from assy.assembly.chain import ChainStream, build_items, destination, new_adapters
from assy.assembly.fit import LAMBDAS, PairStats, fit_seam_map
from assy.assembly.recipe import (
    Recipe,
    dump_recipe,
    lineage,
    n_layers,
    pin_blocks,
    validate_recipe,
)
from assy.assembly.states import StateCache, own_states
from assy.errors import UsageError
from blockpool import Pool, RunOptions, open_runner

__all__ = [
    "FitOptions",
    "Fitted",
    "fit_assembly",
    "fit_seam",
    "same_tokenizer",
    "seam_targets",
    "stitch",
    "write_assembly",
]

OBJECTIVES = ("hidden", "kl", "task")


@dataclass(frozen=True)
class FitOptions:
    """How adapters are fitted (not what is assembled: that is the :class:`Recipe`).

    Attributes:
        samples: calibration windows (one in eight held out to choose the ridge penalty).
        seq_len: tokens per window.
        seed: seed of the window places, adapter initialization and training batches.
        lambdas: ridge penalties tried.
        massive_factor: RMS over the median dimension's above which a dimension is massive.
        hold_below_r2: massive dimensions predicted worse than this are held at their mean.
        rms_match: scale the mapped deviations so the stream's mean-square RMS per token
            matches the destination's (ridge shrinks them). Off by default: measured on the
            real pool it helped SmolLM2 12-17 <- Gemma3 7-10 (perplexity 38.8 -> 38.2) and
            hurt 18-23 <- 11-13 (65.3 -> 69.6); the fit reports the ratio either way.
        sink: give position 0 the destination's own first-position state.
        objective: ``None`` (closed form only), ``hidden``, ``kl`` or ``task``.
        steps: training steps (capped; each one batch).
        lr: AdamW learning rate of the projections, which act on per-dimension standardized
            inputs (SmolLM2 18-23 <- Gemma3 11-13, ``hidden``, 20 steps: 3e-5 / 1e-4 / 3e-4 /
            1e-3 / 3e-3 gave perplexity 68.8 / 67.2 / 64.3 / 63.5 / 63.0 from 69.6; 1e-3
            keeps a margin to rates that diverge).
        xattn_lr: AdamW learning rate of the cross-attention sublayers (the seed's adapter
            rate, 0.01: they start gated shut and have further to go than the closed-form
            projection, which a rate this high would wreck).
        train_batch: windows (hidden, kl) or examples (task) per step.
        hidden_offset: ``hidden``: anchor layers past the exit depth where states are matched.
        kl_positions: ``kl``: positions per window scored (the head is the largest matrix).
    """

    samples: int = 64
    seq_len: int = 256
    seed: int = 0
    lambdas: tuple[float, ...] = LAMBDAS
    massive_factor: float = 20.0
    hold_below_r2: float = 0.5
    rms_match: bool = False
    sink: bool = True
    objective: str | None = None
    steps: int = 100
    lr: float = 1e-3
    xattn_lr: float = 1e-2
    train_batch: int = 4
    hidden_offset: int = 2
    kl_positions: int = 64

    def validate(self) -> None:
        """Raise :class:`UsageError` naming the first bad field."""
        if self.samples < 1:
            raise UsageError(f"--samples must be at least 1, got {self.samples}")
        if self.seq_len < 8:
            raise UsageError(f"--seq-len must be at least 8, got {self.seq_len}")
        if self.objective is not None and self.objective not in OBJECTIVES:
            raise UsageError(f"--objective {self.objective!r}: use one of {', '.join(OBJECTIVES)}")
        if self.objective is not None and self.steps < 1:
            raise UsageError(f"--steps must be at least 1 with --objective, got {self.steps}")
        if self.lr <= 0 or self.train_batch < 1 or self.hidden_offset < 0:
            raise UsageError(
                "--lr must be positive, --train-batch at least 1, --hidden-offset >= 0"
            )
        if not self.lambdas or min(self.lambdas) <= 0:
            raise UsageError("ridge penalties must be positive")


@dataclass
class Fitted:
    """A fitted assembly, in memory.

    Attributes:
        recipe: the recipe with its block sums pinned (adapter files not yet written).
        adapters: boundary -> adapter.
        report: what ``fit.json`` will hold.
    """

    recipe: Recipe
    adapters: dict[int, ElasticAdapter]
    report: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- targets


def same_tokenizer(pool: Pool, a: str, b: str) -> bool:
    """Whether two pool models ship the same tokenizer files (by their sums)."""
    files_a = set(pool.model(a).tokenizer.values())
    files_b = set(pool.model(b).tokenizer.values())
    return bool(files_a) and files_a == files_b


def _foreign_tokens(
    pool: Pool, model: str, windows: Windows
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each window's text tokenized by ``model``'s tokenizer: ids, mask, absolute end offsets
    (``-1`` for special tokens and padding), right-padded."""
    tokenizer = pool.tokenizer(model)
    config = pool.config(model)
    limit = getattr(config, "max_position_embeddings", None) or 4 * windows.ids.shape[1]
    rows, ends = [], []
    for w in range(windows.ids.shape[0]):
        start, end = windows.span(w)
        enc = tokenizer(
            windows.text[start:end],
            return_offsets_mapping=True,
            truncation=True,
            max_length=min(limit, 4 * windows.ids.shape[1]),
        )
        rows.append(enc.input_ids)
        ends.append([start + e if e > s else -1 for s, e in enc.offset_mapping])
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    end_t = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, (r, e) in enumerate(zip(rows, ends, strict=True)):
        ids[i, : len(r)], mask[i, : len(r)], end_t[i, : len(e)] = (
            torch.tensor(r),
            1,
            torch.tensor(e),
        )
    return ids, mask, end_t


def seam_targets(
    pool: Pool,
    recipe: Recipe,
    model: str,
    depth: int,
    windows: Windows,
    options: RunOptions,
    cache: StateCache,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, str]:
    """What a seam into ``model`` at ``depth`` is fitted to, on the chain's ``windows``.

    Returns:
        Per window, (positions in the window, ``model``'s own states there ``[k, d]``); the
        model's own first-position state per window ``[n, d]``; how tokens were aligned
        (the same tokens, or -- another tokenizer -- tokens ending on the same character).
    """
    if same_tokenizer(pool, recipe.anchor, model):
        own = own_states(
            pool,
            model,
            windows.ids,
            None,
            [depth],
            options=options,
            cache=cache,
            desc=f"{model} depth {depth}",
        )[depth]
        t = windows.ids.shape[1]
        positions = torch.arange(1, t)
        return [(positions, own[w, 1:]) for w in range(own.shape[0])], own[:, 0], "same tokens"
    ids, mask, ends = _foreign_tokens(pool, model, windows)
    own = own_states(
        pool, model, ids, mask, [depth], options=options, cache=cache, desc=f"{model} depth {depth}"
    )[depth]
    anchor_ends = windows.offsets[:, :, 1].clone()
    anchor_ends[windows.offsets[:, :, 0] < 0] = -1
    pairs = []
    for w in range(ids.shape[0]):
        pa, pb = align_by_characters(anchor_ends[w], ends[w])
        pairs.append((pa, own[w, pb]))
    return pairs, own[:, 0], "tokens ending on the same character"


# --------------------------------------------------------------------------- fitting


def _apply(adapter: ElasticAdapter, fit, sink: torch.Tensor | None) -> None:
    with torch.no_grad():
        adapter.in_scale.copy_(fit.in_scale)  # the projection sees x / in_scale
        if adapter.kind == "affine":
            adapter.weight.copy_(fit.weight * fit.in_scale)
            adapter.bias.copy_(fit.bias)
        elif adapter.kind == "diagonal":
            adapter.scale.copy_(fit.weight.diagonal() * fit.in_scale)
            adapter.bias.copy_(fit.bias)
        adapter.held.copy_(fit.held)
        adapter.held_value.copy_(fit.held_value)
        if sink is not None:
            adapter.sink.copy_(sink)
            adapter.use_sink.fill_(True)


def fit_seam(
    adapter: ElasticAdapter,
    x: torch.Tensor,
    pairs: list[tuple[torch.Tensor, torch.Tensor]],
    first: torch.Tensor,
    validation: torch.Tensor,
    fit: FitOptions,
) -> dict[str, Any]:
    """Fit one adapter in closed form on the stream ``x [n, T, d_in]`` entering it.

    Args:
        adapter: the adapter to set.
        x: the stream entering the seam, per window.
        pairs: per window, (positions of ``x``, target states at them ``[k, d_out]``).
        first: ``[n, d_out]`` the destination's own first-position state per window.
        validation: ``[n]`` bool, windows held out to choose the ridge penalty.
        fit: the options.

    Returns:
        The fit's report.
    """
    if adapter.kind == "identity":
        return {"kind": "identity"}
    train, val = PairStats(adapter.d_in, adapter.d_out), PairStats(adapter.d_in, adapter.d_out)
    for w, (positions, target) in enumerate(pairs):
        (val if validation[w] else train).add(x[w, positions], target)
    if train.n < 2:
        raise UsageError(
            f"too few aligned tokens to fit a seam ({train.n}); give more data (--samples, "
            "--seq-len) or text both tokenizers split alike"
        )
    result = fit_seam_map(
        train,
        val if val.n else None,
        diagonal=adapter.kind == "diagonal",
        lambdas=fit.lambdas,
        massive_factor=fit.massive_factor,
        hold_below_r2=fit.hold_below_r2,
        rms_match=fit.rms_match,
    )
    sink = first.mean(0) if fit.sink else None
    _apply(adapter, result, sink)
    report = dict(result.report)
    if sink is not None:
        report["sink_norm"] = float(sink.norm())
    return report


def _spans(recipe: Recipe, pool: Pool) -> list[list[int]]:
    """Seams grouped into spans: each span ends at a seam leading back into the anchor's
    line (or into the head); seams into other models before it belong to it."""
    home = lineage(pool, recipe.anchor)[-1]
    spans, current = [], []
    for seam in recipe.seams:
        current.append(seam.before)
        into_anchor = seam.before == len(recipe.slices) or recipe.slices[seam.before].model == home
        if into_anchor:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return spans


def fit_assembly(
    pool: Pool,
    recipe: Recipe,
    data: FitData,
    fit: FitOptions = FitOptions(),
    *,
    options: RunOptions = RunOptions(),
    cache: StateCache | None = None,
    log: Callable[[str], None] = lambda _m: None,
) -> Fitted:
    """Fit every adapter of ``recipe`` along the assembled chain, in order.

    Args:
        pool: the open pool.
        recipe: what to assemble (its seams' adapter files are ignored).
        data: the fitting data (never the evaluation data).
        fit: how to fit.
        options: how to run the blocks (budget, device, dtype, batch size, threads).
        cache: states shared with other fits.
        log: progress lines.

    Returns:
        The :class:`Fitted` assembly.
    """
    from assy.assembly.train import train_assembly

    fit.validate()
    if fit.objective is not None and options.budget is not None:
        raise UsageError(
            "--budget covers closed-form fitting only; training backpropagates through the "
            "blocks after each seam and holds them: drop --budget or --objective"
        )
    if fit.objective == "task" and not data.examples:
        raise UsageError(
            "--objective task needs multiple-choice examples (--data FILE.jsonl or "
            "a commonsense training file, or --task)"
        )
    validate_recipe(recipe, pool, pinned=False)
    recipe = pin_blocks(
        replace(recipe, seams=tuple(replace(s, adapter=None, sha256=None) for s in recipe.seams)),
        pool,
    )
    cache = cache or StateCache()
    start = time.perf_counter()
    windows = token_windows(
        pool.tokenizer(recipe.anchor), data.text, fit.samples, fit.seq_len, seed=fit.seed
    )
    adapters = new_adapters(recipe, pool, fit.seed)
    items = build_items(recipe, pool, adapters)
    position = {id(a): items.index(a) for a in adapters.values()}
    seams_report: list[dict[str, Any]] = []
    trained: list[dict[str, Any]] = []
    _warm_anchor(pool, recipe, items, windows, fit, options, cache)
    with open_runner(pool, items, options) as run:
        stream = ChainStream(run.runner, pool, items, windows, cache, options)
        span_of = {b: span for span in _spans(recipe, pool) for b in span}
        for seam in recipe.seams:
            adapter = adapters[seam.before]
            tic = time.perf_counter()
            x = stream.at(position[id(adapter)])
            model, depth = destination(recipe, pool, seam.before)
            pairs, first, how = seam_targets(pool, recipe, model, depth, windows, options, cache)
            report = fit_seam(adapter, x, pairs, first, windows.validation, fit)
            seams_report.append(
                {
                    "before": seam.before,
                    "kind": seam.kind,
                    "into": f"{model} depth {depth}",
                    "aligned": how,
                    "parameters": adapter.trainable_parameters(),
                    "seconds": time.perf_counter() - tic,
                    **report,
                }
            )
            log(f"seam {seam.before} -> {model} depth {depth}: {_summary(report)}")
            span = span_of[seam.before]
            if fit.objective == "hidden" and seam.before == span[-1]:
                chosen = {b: adapters[b] for b in span}
                trained.append(train_assembly(stream, recipe, chosen, data, fit, log))
        if fit.objective in ("kl", "task"):
            trained.append(train_assembly(stream, recipe, adapters, data, fit, log))
    report = {
        "recipe_fingerprint": recipe.fingerprint(),
        "data": data.source,
        "windows": {
            "samples": fit.samples,
            "seq_len": fit.seq_len,
            "seed": fit.seed,
            "tokens": int(windows.ids.numel()),
            "validation_windows": int(windows.validation.sum()),
        },
        "settings": {k: v for k, v in asdict(fit).items()},
        "seams": seams_report,
        "training": trained,
        "run": {
            "device": options.device,
            "dtype": options.dtype,
            "budget": options.budget,
            "threads": run.report.get("threads"),
            "peak_rss_bytes": run.report.get("peak_rss_bytes"),
        },
        "seconds": time.perf_counter() - start,
    }
    return Fitted(recipe, adapters, report)


def _summary(report: dict[str, Any]) -> str:
    if report.get("kind") == "identity":
        return "identity"
    r2 = report.get("validation_r2")
    r2_text = f"R2 {r2:.3f}" if r2 is not None else "no validation"
    return (
        f"ridge {report['ridge']:g}, {r2_text}, {report['pairs']} pairs, "
        f"held {report['held_dims']}, RMS ratio {report['rms_ratio_before']:.2f}->"
        f"{report['rms_ratio_after']:.2f}"
    )


def _warm_anchor(pool, recipe, items, windows, fit, options, cache) -> None:
    """Compute the anchor's own states once, at every depth fits and objectives need; the
    chain's stream before its first seam is the same state, and is found in the cache."""
    depths = set()
    for seam in recipe.seams:
        model, depth = destination(recipe, pool, seam.before)
        if model == recipe.anchor:
            depths.add(depth)
    anchor_blocks = list(pool.model(recipe.anchor).blocks)
    first = next((i for i, it in enumerate(items) if not isinstance(it, str)), None)
    if first is not None and items[:first] == anchor_blocks[:first]:
        depths.add(first - 1)
    n = n_layers(pool, recipe.anchor)
    if fit.objective == "kl":
        depths.add(n)
    if fit.objective == "hidden":
        for span in _spans(recipe, pool):
            depths.add(min(n, destination(recipe, pool, span[-1])[1] + fit.hidden_offset))
    if depths:
        own_states(
            pool,
            recipe.anchor,
            windows.ids,
            None,
            sorted(depths),
            options=options,
            cache=cache,
            desc=f"{recipe.anchor} own states",
        )


# --------------------------------------------------------------------------- writing


def write_assembly(out: Path, fitted: Fitted, *, overwrite: bool = False) -> Recipe:
    """Write ``recipe.yaml``, ``adapters/*.safetensors`` and ``fit.json`` to ``out``.

    The directory appears whole or not at all: everything is written to a temporary
    directory beside ``out`` and renamed into place.

    Raises:
        UsageError: ``out`` exists (and not ``overwrite``).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise UsageError(f"{out} exists; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        fingerprint = fitted.recipe.fingerprint()
        seams = []
        for seam in fitted.recipe.seams:
            rel = f"adapters/seam-{seam.before}.safetensors"
            digest = save_adapter(
                fitted.adapters[seam.before], tmp / rel, fingerprint=fingerprint, before=seam.before
            )
            seams.append(replace(seam, adapter=rel, sha256=digest))
        recipe = replace(fitted.recipe, seams=tuple(seams))
        (tmp / "recipe.yaml").write_text(dump_recipe(recipe))
        (tmp / "fit.json").write_text(json.dumps(fitted.report, indent=1, default=str))
        os.chmod(tmp, 0o755)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return recipe


def stitch(
    pool: Pool | str | Path,
    recipe: Recipe,
    data: FitData,
    out: Path,
    fit: FitOptions = FitOptions(),
    *,
    options: RunOptions = RunOptions(),
    cache_dir: Path | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """Fit an assembly and write it to ``out`` (see :func:`fit_assembly`, :func:`write_assembly`).

    Returns:
        The fit report (``fit.json``), with ``out``.
    """
    pool = pool if isinstance(pool, Pool) else Pool(pool)
    out = Path(out)
    if out.exists() and not overwrite:
        raise UsageError(f"{out} exists; choose another --out or pass --overwrite")
    fitted = fit_assembly(
        pool, recipe, data, fit, options=options, cache=StateCache(cache_dir), log=log
    )
    write_assembly(out, fitted, overwrite=overwrite)
    return {"out": str(out), **fitted.report}

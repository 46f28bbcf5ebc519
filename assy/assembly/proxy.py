"""The measured proxy: the planner's best candidates scored on the user's own data.

The planner ranks chains by the comparator's compatibility (no forward pass); this module
measures the few best of them. Each candidate's adapters are fitted in closed form on the
first part of the data (:func:`~assy.assembly.assemble.fit_assembly`) and the assembly's
loss is measured on windows of the held-back last part, as bits per byte (candidates with
different anchors tokenize differently; bytes are what they share).

**Incremental.** Every state is cached by the sums of the blocks and adapters that made it
(:mod:`assy.assembly.states`): the anchor's own states, the stream entering each seam and
the stream entering the head, on the fitting and on the scoring windows. A candidate that
shares a prefix with one scored before it (the same blocks and the same fitted adapters up
to a seam) starts from the cached state there; only what differs runs.
:data:`~assy.assembly.states.FORWARDS` counts the block passes that did run, one per block
per window, and each :class:`Scored` says how many were its own.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from assy.assembly.assemble import FitOptions, Fitted, fit_assembly
from assy.assembly.calibration import FitData, Windows, token_windows
from assy.assembly.chain import ChainStream, build_items
from assy.assembly.planner import Plan
from assy.assembly.states import FORWARDS, StateCache
from assy.errors import UsageError
from blockpool import Pool, RunOptions, open_runner

__all__ = [
    "SCORE_SHARE",
    "Scored",
    "chain_loss",
    "measured_choice",
    "score_plans",
    "split_text",
    "window_losses",
]

SCORE_SHARE = 0.2  # the last fifth of the data is held back to score the candidates


@dataclass
class Scored:
    """A candidate plan, fitted and measured.

    Attributes:
        plan: the planner's plan.
        fitted: its adapters fitted in closed form on the fitting part of the data.
        nats: summed negative log-likelihood of the scored tokens.
        tokens: tokens scored; nbytes: UTF-8 bytes of the text they cover.
        forwards: block passes (per window) this candidate ran; the rest came from states
            cached by candidates before it.
        seconds: wall time of its fit and scoring.
    """

    plan: Plan
    fitted: Fitted
    nats: float
    tokens: int
    nbytes: int
    forwards: int
    seconds: float

    @property
    def bits_per_byte(self) -> float:
        return self.nats / math.log(2) / max(self.nbytes, 1)

    def to_json(self) -> dict[str, Any]:
        return {
            "recipe": self.plan.to_json()["recipe"],
            "objective": round(self.plan.objective, 6),
            "bytes": dict(self.plan.bytes),
            "seams": self.plan.seams,
            "bits_per_byte": round(self.bits_per_byte, 6),
            "loss": round(self.nats / max(self.tokens, 1), 6),
            "tokens": self.tokens,
            "scored_bytes": self.nbytes,
            "forwards": self.forwards,
            "seconds": round(self.seconds, 2),
        }


def split_text(text: str, share: float = SCORE_SHARE) -> tuple[str, str]:
    """``text`` cut at the whitespace nearest ``1 - share`` of its length: (fit, score)."""
    cut = int(len(text) * (1 - share))
    space = text.rfind(" ", 0, cut)
    cut = space if space > 0 else cut
    return text[:cut], text[cut:]


def _scored_bytes(windows: Windows, w: int) -> int:
    """UTF-8 bytes of the text window ``w``'s scored tokens (every one after the first
    position) cover: from the end of the first position's token, or from the first real
    token's start when the first position is a special token."""
    offsets = windows.offsets[w]
    start = int(offsets[0, 1]) if offsets[0, 0] >= 0 else int(offsets[1, 0])
    real = offsets[offsets[:, 0] >= 0]
    return len(windows.text[start : int(real[-1, 1])].encode("utf-8"))


def chain_loss(
    pool: Pool,
    fitted: Fitted,
    windows: Windows,
    options: RunOptions,
    cache: StateCache,
) -> tuple[float, int, int]:
    """Summed next-token loss (nats), tokens and bytes of a fitted assembly on ``windows``
    (:func:`window_losses`, summed)."""
    nats, tokens, nbytes = window_losses(pool, fitted, windows, options, cache)
    return float(sum(nats)), int(sum(tokens)), int(sum(nbytes))


def window_losses(
    pool: Pool,
    fitted: Fitted,
    windows: Windows,
    options: RunOptions,
    cache: StateCache,
) -> tuple[list[float], list[int], list[int]]:
    """Per window: next-token loss (nats), tokens and bytes of a fitted assembly.

    The stream entering every seam and the head is taken from ``cache`` when a chain that
    shares the prefix left it there, else computed and left there.
    """
    items = build_items(fitted.recipe, pool, fitted.adapters)
    seams = [i for i, item in enumerate(items) if not isinstance(item, str)]
    nats: list[float] = []
    tokens: list[int] = []
    with open_runner(pool, items, options) as run:
        stream = ChainStream(run.runner, pool, items, windows, cache, options)
        for position in seams:
            stream.at(position)
        hidden = stream.at(len(items) - 1)
        head = items[-1]
        with torch.no_grad():
            for w in range(hidden.shape[0]):  # one window at a time: logits are vocab wide
                logits = run.runner.run_block(head, hidden[w : w + 1].to(run.runner.device))
                FORWARDS.add(1, 1)
                logp = torch.log_softmax(logits[0, :-1].float(), -1)
                target = windows.ids[w, 1:].to(logp.device)
                nats.append(-float(logp.gather(-1, target[:, None]).sum()))
                tokens.append(int(target.numel()))
    nbytes = [_scored_bytes(windows, w) for w in range(windows.ids.shape[0])]
    return nats, tokens, nbytes


def score_plans(
    pool: Pool,
    plans: Sequence[Plan],
    data: FitData,
    fit: FitOptions,
    *,
    score_windows: int = 8,
    options: RunOptions = RunOptions(),
    cache: StateCache | None = None,
    log: Callable[[str], None] = lambda _m: None,
    done: Callable[[int, Scored], None] = lambda _i, _s: None,
) -> list[Scored]:
    """Fit every plan's adapters in closed form and measure its bits per byte, in order,
    sharing the forward passes of common prefixes (see the module docstring).

    Args:
        pool: the open pool.
        plans: the candidates (the planner's best first).
        data: the user's data; its last :data:`SCORE_SHARE` is held back for scoring.
        fit: how to fit (``objective`` is ignored: the proxy is closed form).
        score_windows: windows of ``fit.seq_len`` tokens scored per candidate.
        options: how to run the blocks.
        cache: the state cache (shared by the candidates; give it a directory to share
            across runs too).
        log: progress lines of the fits.
        done: called after each candidate with its index and result.

    Raises:
        UsageError: data too short for the fitting and scoring windows.
    """
    if score_windows < 1:
        raise UsageError(f"--score-windows must be at least 1, got {score_windows}")
    cache = cache or StateCache()
    fit_text, score_text = split_text(data.text)
    fit_data = replace(data, text=fit_text, source={**data.source, "held_back": SCORE_SHARE})
    closed = replace(fit, objective=None)
    out: list[Scored] = []
    for i, plan in enumerate(plans):
        tic, before = time.perf_counter(), FORWARDS.value
        windows = token_windows(
            pool.tokenizer(plan.recipe.anchor),
            score_text,
            score_windows,
            fit.seq_len,
            seed=fit.seed,
        )
        fitted = fit_assembly(
            pool, plan.recipe, fit_data, closed, options=options, cache=cache, log=log
        )
        nats, tokens, nbytes = chain_loss(pool, fitted, windows, options, cache)
        scored = Scored(
            plan,
            fitted,
            nats,
            tokens,
            nbytes,
            FORWARDS.value - before,
            time.perf_counter() - tic,
        )
        out.append(scored)
        done(i, scored)
        if cache.root is not None:
            cache.forget()  # on disk still: memory stays bounded over many candidates
    return out


def measured_choice(
    pool: Pool,
    plans: Sequence[Plan],
    data: FitData,
    fit: FitOptions,
    *,
    score_windows: int = 8,
    options: RunOptions = RunOptions(),
    cache: StateCache | None = None,
    say: Callable[[str], None] = lambda _m: None,
) -> tuple[Scored, list[Scored]]:
    """Score ``plans`` (:func:`~assy.assembly.planner.plan_shortlist`) on the held-back
    data and return the one with the fewest bits per byte, and every score; ``say`` gets
    a line per candidate."""
    from assy.assembly.recipe import describe_recipe

    say(
        f"measuring {len(plans)} candidates on your data: closed-form fit on "
        f"{1 - SCORE_SHARE:.0%}, bits per byte on {score_windows} windows of the last "
        f"{SCORE_SHARE:.0%}"
    )

    def done(i: int, s: Scored) -> None:
        say(
            f"  [{i + 1}/{len(plans)}] {describe_recipe(s.plan.recipe)} (objective "
            f"{s.plan.objective:.3f}): {s.bits_per_byte:.4f} bits/byte, "
            f"{s.forwards:,} block passes run, {s.seconds:.0f} s"
        )

    scored = score_plans(
        pool,
        plans,
        data,
        fit,
        score_windows=score_windows,
        options=options,
        cache=cache,
        done=done,
    )
    best = min(scored, key=lambda s: s.bits_per_byte)
    say(f"  chosen: [{scored.index(best) + 1}] {describe_recipe(best.plan.recipe)}")
    return best, scored

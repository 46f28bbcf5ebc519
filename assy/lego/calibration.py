"""Calibration inputs for pruning: token windows drawn from a text file or a task's data.

Following SparseGPT and Wanda (which draw 128 random 2048-token windows of C4), a
calibration batch is ``samples`` windows of ``seq_len`` consecutive tokens at random
offsets (seeded) of one long tokenized text.
"""

from __future__ import annotations

from pathlib import Path

import torch

from assy.errors import UsageError

__all__ = ["calibration_ids", "calibration_text"]


def calibration_text(*, task: str | None = None, file: Path | None = None) -> str:
    """The text to calibrate on: a UTF-8 file, or a multiple-choice task's examples.

    A task's examples become ``context + correct choice`` paragraphs, in data order.

    Args:
        task: a task of :data:`assy.data.TASKS` (its shipped validation split).
        file: a text file.

    Raises:
        UsageError: neither or both given, or the source cannot be read.
    """
    from assy.data import load_task, read_text

    if (task is None) == (file is None):
        raise UsageError(
            "give exactly one calibration source: --calib-task TASK or --calib-file FILE"
        )
    if file is not None:
        return read_text(Path(file))
    examples = load_task(task)
    return "\n\n".join(ex.context + ex.choices[ex.label] for ex in examples)


def calibration_ids(
    tokenizer, text: str, samples: int, seq_len: int, *, seed: int = 0
) -> torch.Tensor:
    """``samples`` random windows of ``seq_len`` tokens of ``text``.

    Args:
        tokenizer: the model's Hugging Face tokenizer (default special tokens are kept).
        text: the calibration text.
        samples: number of windows (>= 1).
        seq_len: tokens per window (>= 2).
        seed: seed of the window offsets.

    Returns:
        ``[samples, seq_len]`` int64 token ids. Windows may overlap when the text holds
        fewer than ``samples * seq_len`` tokens.

    Raises:
        UsageError: bad sizes, or a text shorter than one window.
    """
    if samples < 1 or seq_len < 2:
        raise UsageError(f"need samples >= 1 and seq_len >= 2, got {samples} and {seq_len}")
    ids = torch.tensor(tokenizer(text).input_ids, dtype=torch.long)
    if len(ids) < seq_len:
        raise UsageError(
            f"calibration text has {len(ids)} tokens, fewer than one window of {seq_len}; "
            "give a longer text or a smaller --seq-len"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len + 1, (samples,), generator=generator)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])

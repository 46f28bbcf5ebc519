"""Calibration inputs: generic text and the token windows cut from it, for every command.

Pruning (Wanda, SparseGPT), the quantizer's sensitivity and anything else that needs
"some representative text" calibrates here, so that they all mean the same by it:

* :func:`calibration_text`: a task's examples (``context + correct choice`` paragraphs) or
  a user's text file; when neither is named, :data:`DEFAULT_TASK`. The result carries a key
  (for caches) and a label (for the output: every command says what it calibrated on).
* :func:`calibration_windows`: ``samples`` windows of ``seq_len`` tokens at seeded random
  offsets of the tokenized text (SparseGPT and Wanda draw 128 random 2048-token windows of
  C4), each starting with the tokenizer's BOS (or CLS) token where it has one, as every
  real input does.

Calibration text is never the user's task data (``--task``/``--data`` of evaluation); its
flags are ``--calib-task`` and ``--calib-data``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from assy.data import TASKS, load_task, read_text
from assy.errors import UsageError, arg

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_TASK", "CalibrationText", "calibration_text", "calibration_windows"]

DEFAULT_TASK = "sciq"
"""Default calibration source: SciQ's support paragraphs and answers (science prose), a
task none of the benchmarks evaluate."""


@dataclass(frozen=True)
class CalibrationText:
    """Calibration text and where it came from.

    Attributes:
        text: the text.
        key: names it in cache keys: ``task:<name>:<chars>`` or ``file:<sha256>:<chars>``.
        label: names it for people: ``task sciq (default)``, ``file notes.txt``.
    """

    text: str
    key: str
    label: str


def calibration_text(
    task: str | None = None, data: Path | None = None, *, max_chars: int = 400_000
) -> CalibrationText:
    """The calibration text: a task's examples, a UTF-8 file, or the default task.

    Args:
        task: a multiple-choice task of :data:`assy.data.TASKS` (its shipped validation
            split): each example's context followed by its correct choice, examples
            separated by blank lines.
        data: a UTF-8 text file, used as is.
        max_chars: the text is cut after this many characters.

    Raises:
        UsageError: both sources given, an unknown task, or an unreadable file.
    """
    if task is not None and data is not None:
        raise UsageError(f"give one calibration source: {arg('calib_task')} or {arg('calib_data')}")
    if data is not None:
        text = read_text(Path(data))[:max_chars]
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        return CalibrationText(text, f"file:{digest}:{len(text)}", f"file {data}")
    name = task or DEFAULT_TASK
    if name not in TASKS:
        raise UsageError(
            f"unknown {arg('calib_task')} {name!r}; known tasks: {', '.join(sorted(TASKS))}"
        )
    parts, size = [], 0
    for example in load_task(name):
        parts.append(example.context + example.choices[example.label])
        size += len(parts[-1]) + 2
        if size >= max_chars:
            break
    text = "\n\n".join(parts)[:max_chars]
    label = f"task {name}" + ("" if task else " (default)")
    return CalibrationText(text, f"task:{name}:{len(text)}", label)


def calibration_windows(
    tokenizer: Any, text: str, samples: int, seq_len: int, *, seed: int = 0
) -> torch.Tensor:
    """``samples`` windows of ``seq_len`` tokens of ``text`` at seeded random offsets.

    Args:
        tokenizer: the model's Hugging Face tokenizer.
        text: the calibration text.
        samples: number of windows (>= 1).
        seq_len: tokens per window (>= 2), the BOS/CLS token included.
        seed: seed of the window offsets.

    Returns:
        ``[samples, seq_len]`` int64 token ids. Windows may overlap when the text holds
        fewer than ``samples * seq_len`` tokens.

    Raises:
        UsageError: bad sizes, or a text shorter than one window.
    """
    import torch

    if samples < 1 or seq_len < 2:
        raise UsageError(
            f"calibration needs {arg('samples')} >= 1 and {arg('seq_len')} >= 2, "
            f"got {samples} and {seq_len}"
        )
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    body = seq_len - (start is not None)
    if len(ids) < body:
        raise UsageError(
            f"calibration text has {len(ids)} tokens, fewer than one window of {seq_len}; "
            f"give a longer text or a smaller {arg('seq_len')}"
        )
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.randint(0, len(ids) - body + 1, (samples,), generator=generator).tolist()
    windows = torch.stack([ids[o : o + body] for o in offsets])
    if start is not None:
        windows = torch.cat([torch.full((samples, 1), start, dtype=torch.long), windows], 1)
    return windows

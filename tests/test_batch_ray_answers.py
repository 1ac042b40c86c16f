"""The Ray driver's check of a node's answer (`mas2c.batch_ray.check_answer`), without Ray.

A node's answer is hostile input to the driver: any type, size or value. Each test hands
`check_answer` and `store_answer` what a broken or hostile node could return and checks
what the driver records (results row, files, engine.json, warnings), that the row keeps
the batch's numbers sane (cost cap, summary), and that nothing lands outside the row's
folder. The whole engine on a real two-node cluster is tests/test_batch_ray.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from mas2c import batch_ray
from mas2c.batch import Job, Plan, Row, _cost, summarize
from mas2c.batch_ray import (
    BAD_RESULT,
    MAX_FILE_BYTES,
    MAX_WARNINGS,
    Answer,
    check_answer,
    known_fields,
    store_answer,
)

PLAN = Plan(mode="spec", keep=("task_id",))
ROW = Row(key="r1", index=3, data={"question": "q", "answer": "42", "task_id": "T/1"})
JOB = Job(ROW.key, ROW)


def good_row(**changes: Any) -> dict[str, Any]:
    row = {
        "key": "r1", "index": 3, "task_id": "T/1", "status": "ok", "llm_calls": 2,
        "prompt_tokens": 10, "completion_tokens": 5, "tokens": 15, "cost_usd": 0.25,
        "seconds": 1.5, "prediction": "42", "expected": "42", "score": 1.0, "passed": True,
        "score_seconds": 0.1, "total_seconds": 1.7,
    }  # fmt: skip
    row.update(changes)
    return row


def answer_of(row: Any, **extra: Any) -> dict[str, Any]:
    return {"row": row, "files": [("mas/out.json", b"{}")], "node": "n1", "host": "h",
            "pid": 7, "warnings": [], **extra}  # fmt: skip


def stored(tmp_path: Path, out: Any) -> tuple[Answer, list[dict[str, Any]], list[str]]:
    answer = check_answer(JOB, out, known_fields(PLAN, ROW))
    rows: list[dict[str, Any]] = []
    warned: list[str] = []
    if answer.row is not None:
        store_answer(JOB, answer, tmp_path, lambda job, row: rows.append(row), warned.append)
    return answer, rows, warned


def strict_json(value: Any) -> Any:
    return json.loads(json.dumps(value, allow_nan=False))


def test_a_good_answer_is_recorded_as_the_node_said(tmp_path: Path) -> None:
    answer, rows, _ = stored(tmp_path, answer_of(good_row(cost_usd=0.000123456789)))
    assert answer.problem == "" and rows == [good_row(cost_usd=0.000123456789)]
    assert (tmp_path / "rows" / ROW.slug / "mas" / "out.json").read_bytes() == b"{}"
    engine = json.loads((tmp_path / "rows" / ROW.slug / "engine.json").read_text())
    assert (engine["node"], engine["host"], engine["pid"]) == ("n1", "h", 7)


@pytest.mark.parametrize(
    "out",
    [None, "row", 5, [], {"files": []}, {"row": "r1"}, {"row": {"key": "r2"}}, {"row": {}}],
    ids=["none", "str", "int", "list", "no-row", "row-str", "other-key", "no-key"],
)
def test_an_answer_that_is_no_result_of_the_row_is_an_infrastructure_failure(
    tmp_path: Path, out: Any
) -> None:
    """The driver runs the row again (up to --max-retries), then leaves it unrecorded."""
    answer, rows, _ = stored(tmp_path, out)
    assert answer.row is None and answer.problem and rows == []
    assert not (tmp_path / "rows").exists()


NAN = float("nan")
HOSTILE_VALUES = {
    "cost-nan": {"cost_usd": NAN},
    "cost-inf": {"cost_usd": math.inf},
    "cost-negative": {"cost_usd": -1e9},
    "cost-text": {"cost_usd": "0.1"},
    "cost-bool": {"cost_usd": True},
    "tokens-text": {"tokens": "many"},
    "tokens-negative": {"tokens": -3},
    "tokens-float": {"llm_calls": 2.5},
    "tokens-huge": {"prompt_tokens": 10**40},
    "seconds-nan": {"total_seconds": NAN},
    "score-high": {"score": 2.0},
    "score-nan": {"score": NAN},
    "score-missing": {"score": None},
    "passed-text": {"passed": "yes"},
    "status-html": {"status": "<script>alert(1)</script>"},
    "status-int": {"status": 5},
    "code-path": {"status": "error", "error_code": "../../etc/passwd"},
    "error-dict": {"error": {"a": 1}},
    "scorer-error-bad": {"scorer_error": "x" * 100},
    "prediction-nan": {"prediction": {"a": NAN}},
    "prediction-set": {"prediction": {1, 2}},
    "prediction-deep": {"prediction": "deep"},
}


@pytest.mark.parametrize("changes", HOSTILE_VALUES.values(), ids=list(HOSTILE_VALUES))
def test_a_row_with_bad_values_is_an_error_row_with_sane_numbers(
    tmp_path: Path, changes: dict[str, Any]
) -> None:
    if changes.get("prediction") == "deep":
        deep: Any = "x"
        for _ in range(10_000):
            deep = [deep]
        changes = {"prediction": deep}
    answer, rows, _ = stored(tmp_path, answer_of(good_row(**changes)))
    assert len(rows) == 1, answer
    row = strict_json(rows[0])  # no NaN, no infinity, no set: one strict JSON line
    assert (row["status"], row["error_code"]) == ("error", BAD_RESULT), row
    assert row["passed"] is False and row["score"] == 0.0
    assert "bad values" in row["error"] and len(row["error"]) < 700
    assert row["key"] == "r1" and row["index"] == 3
    cost = _cost(row)
    assert math.isfinite(cost) and cost >= 0 and cost in (0.0, 0.25)
    for name in ("llm_calls", "tokens", "prompt_tokens", "completion_tokens"):
        assert isinstance(row[name], int) and 0 <= row[name] <= 10**15
    summary = summarize([ROW], {"r1": row}, {}, 1.0, [], None)
    strict_json(summary)
    assert summary["failures"] == {BAD_RESULT: 1} and summary["passed"] == 0


def test_texts_are_clipped_and_unknown_fields_dropped(tmp_path: Path) -> None:
    big = "y" * 5_000_000
    _, rows, _ = stored(
        tmp_path,
        answer_of(good_row(error=big, note=big, prediction=big, spec_source=big, extra=big)),
    )
    row = rows[0]
    assert row["status"] == "ok" and "extra" not in row
    assert len(json.dumps(row)) < 10_000


def test_the_fields_the_driver_knows_are_the_drivers(tmp_path: Path) -> None:
    forged = good_row(index=99, task_id="../forged", expected="what the node wants")
    _, rows, _ = stored(tmp_path, answer_of(forged))
    assert (rows[0]["index"], rows[0]["task_id"], rows[0]["expected"]) == (3, "T/1", "42")


def test_files_keep_to_the_rows_folder_and_the_caps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batch_ray, "MAX_FILES", 40)  # the count cap, without 5,000 fsyncs
    files: list[Any] = [
        ("../escape.txt", b"x"), ("/tmp/abs.txt", b"x"), ("a\\b", b"x"), ("", b"x"),
        (".", b"x"), ("a/./b", b"x"), ("a/../../b", b"x"), ("nul\0l", b"x"), (5, b"x"),
        ("text.txt", "not bytes"), ("triple", b"x", b"y"), "loose",
        ("clash", b"file"), ("clash/inside", b"under a file"), ("x" * 300, b"long name"),
        ("big.bin", b"z" * (MAX_FILE_BYTES + 10)), ("ok/kept.txt", b"kept"),
    ]  # fmt: skip
    files += [(f"many/{i}", b"") for i in range(100)]
    answer, rows, _ = stored(tmp_path, answer_of(good_row(), files=files))
    assert rows
    written = sorted(
        p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()
    )
    assert all(name.startswith(f"rows/{ROW.slug}/") for name in written), written[:5]
    folder = tmp_path / "rows" / ROW.slug
    assert (folder / "ok" / "kept.txt").read_bytes() == b"kept"
    assert (folder / "clash").read_bytes() == b"file"  # the clashing name is skipped
    assert (folder / "big.bin").stat().st_size < MAX_FILE_BYTES + 100
    assert len(answer.files) == 40
    assert not (tmp_path / "escape.txt").exists() and not Path("/tmp/abs.txt").exists()


def test_warnings_are_texts_clipped_and_few(tmp_path: Path) -> None:
    warnings = ["w" * 10_000] + [f"warning {i}" for i in range(1_000)] + [None, 5, {"a": 1}]
    _, _, warned = stored(tmp_path, answer_of(good_row(), warnings=warnings))
    assert len(warned) == MAX_WARNINGS and all(isinstance(w, str) for w in warned)
    assert len(warned[0]) == 500
    _, _, warned = stored(tmp_path, answer_of(good_row(), warnings="not a list"))
    assert warned == []


def test_engine_facts_of_the_wrong_type_are_left_out(tmp_path: Path) -> None:
    stored(tmp_path, answer_of(good_row(), node=["n"], host="h" * 10_000, pid=True))
    engine = json.loads((tmp_path / "rows" / ROW.slug / "engine.json").read_text())
    assert (engine["node"], len(engine["host"]), engine["pid"]) == ("", 200, None)

"""Converters from published dataset files to the JSONL that `mas2c batch` reads.

``python -m mas2c.batch_datasets FORMAT INPUT -o OUTPUT [--limit N]``, FORMAT one of
``gsm8k``, ``math``, ``hotpotqa``, ``mbpp``. The user brings the files (nothing is
downloaded); JSON Lines or a JSON array (HotpotQA ships one), optionally gzipped.

What each row becomes (the fields a spec's inputs and the scorers use):

| format | input file | row | scorer |
| --- | --- | --- | --- |
| gsm8k | ``question``, ``answer`` ending ``#### N`` | ``id``, ``question``, ``answer`` (N), ``solution`` | ``numeric`` |
| math | ``problem``, ``solution`` with ``\\boxed{..}`` | ``id``, ``question``, ``answer`` (the boxed text), ``level``, ``type`` | ``math`` |
| hotpotqa | ``_id``, ``question``, ``answer``, ``context`` [[title, sentences]] | ``id``, ``question`` (the paragraphs, then the question), ``answer``, ``type``, ``level`` | ``f1`` or ``exact`` |
| mbpp | ``task_id``, ``text``, ``code``, ``test_list``, ``test_setup_code`` | ``id``, ``prompt``, ``entry_point``, ``test`` (``def check(candidate)``), ``canonical_solution`` | ``code`` |

A row that lacks what its format needs is an error naming the input line, and nothing is
written (the output is written atomically).
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from mas2c import argtypes
from mas2c.batch import STRICT_JSON, BatchError, boxed, decode_line, parse_json_line
from mas2c.files import write_text_atomic

__all__ = ["CONVERTERS", "convert", "convert_file", "read_records"]


def read_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line, record) from JSON Lines or a JSON array, gzipped or not: the line is where the
    record starts. Text that is not UTF-8, not strict JSON (NaN, Infinity) or nested too deeply
    is an error at its line."""
    opener: Any = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise BatchError(f"{path}: cannot read it ({exc})") from None
    lines = data.split(b"\n")
    texts: list[str] = []
    for number, raw in enumerate(lines, 1):
        try:
            texts.append(decode_line(raw))
        except ValueError as exc:
            raise BatchError(f"{path}:{number}: {exc}") from None
    text = "\n".join(texts)
    if text.lstrip().startswith("["):
        yield from _array_records(path, text)
        return
    for number, line in enumerate(texts, 1):
        if not line.strip():
            continue
        try:
            record = parse_json_line(line)
        except ValueError as exc:
            raise BatchError(f"{path}:{number}: not valid JSON ({exc})") from None
        if not isinstance(record, dict):
            raise BatchError(f"{path}:{number}: not a JSON object")
        yield number, record


def _array_records(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """The objects of a JSON array, each with the line it starts on."""

    def fail(position: int, reason: str) -> BatchError:
        return BatchError(f"{path}:{text.count(chr(10), 0, position) + 1}: {reason}")

    position = text.index("[") + 1
    state = "first"  # after '[': an item or ']'; "item": after ','; "next": after an item
    while True:
        while position < len(text) and text[position] in " \t\r\n":
            position += 1
        if position >= len(text):
            raise fail(position, "not valid JSON (the array is not closed)")
        char = text[position]
        if state != "item" and char == "]":
            if text[position + 1 :].strip():
                raise fail(position + 1, "not valid JSON (text after the array)")
            return
        if state == "next":
            if char != ",":
                raise fail(position, "not valid JSON (expected ',' or ']' between items)")
            position, state = position + 1, "item"
            continue
        start = position
        try:
            record, position = STRICT_JSON.raw_decode(text, position)
        except RecursionError:
            raise fail(start, "not valid JSON (nested too deeply)") from None
        except ValueError as exc:
            raise fail(start, f"not valid JSON ({exc})") from None
        if not isinstance(record, dict):
            raise fail(start, "not a JSON object")
        yield text.count("\n", 0, start) + 1, record
        state = "next"


def _text(record: dict[str, Any], key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise BatchError(f"{where}: no text field {key!r}")
    return value


def _id(record: dict[str, Any], keys: Sequence[str], default: str, where: str) -> str:
    """The record's id: the first of `keys` it has (a non-empty string or an integer)."""
    for key in keys:
        if key in record:
            value = record[key]
            if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
                shown = json.dumps(value)[:60]
                raise BatchError(
                    f"{where}: the id field {key!r} is {shown}: expected a non-empty string or an integer"
                )
            return str(value)
    return default


def _optional_text(record: dict[str, Any], key: str, where: str) -> str:
    value = record.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BatchError(f"{where}: the field {key!r} must be text, not {type(value).__name__}")
    return value


def gsm8k(record: dict[str, Any], index: int, where: str) -> dict[str, Any]:
    solution = _text(record, "answer", where)
    if "####" not in solution:
        raise BatchError(f"{where}: the answer has no '#### <number>' line")
    final = solution.rsplit("####", 1)[1].strip().replace(",", "")
    if not final:
        raise BatchError(f"{where}: the answer's '####' line has no number after it")
    return {
        "id": _id(record, ("id",), f"gsm8k-{index}", where),
        "question": _text(record, "question", where),
        "answer": final,
        "solution": solution,
    }


def math(record: dict[str, Any], index: int, where: str) -> dict[str, Any]:
    solution = _text(record, "solution", where)
    answer = record.get("answer") if isinstance(record.get("answer"), str) else boxed(solution)
    if answer is None:
        raise BatchError(f"{where}: the solution has no \\boxed{{...}} answer")
    return {
        "id": _id(record, ("unique_id", "id"), f"math-{index}", where),
        "question": _text(record, "problem", where),
        "answer": answer,
        "level": record.get("level"),
        "type": record.get("type"),
    }


def hotpotqa(record: dict[str, Any], index: int, where: str) -> dict[str, Any]:
    paragraphs = [f"{title}: {body}" for title, body in _paragraphs(record, where)]
    question = _text(record, "question", where)
    text = ("\n\n".join(paragraphs) + "\n\nQuestion: " + question) if paragraphs else question
    return {
        "id": _id(record, ("_id", "id"), f"hotpotqa-{index}", where),
        "question": text,
        "answer": _text(record, "answer", where),
        "type": record.get("type"),
        "level": record.get("level"),
    }


def _paragraphs(record: dict[str, Any], where: str) -> list[tuple[str, str]]:
    """HotpotQA's `context`: [[title, [sentence, ...]], ...], or the Hugging Face layout
    {"title": [...], "sentences": [[...], ...]}; (title, text) pairs."""
    context = record.get("context")
    if context is None:
        return []
    shape = "a list of [title, sentences] pairs or {title: [...], sentences: [...]}"
    if isinstance(context, dict):
        titles, bodies = context.get("title"), context.get("sentences")
        if (
            not isinstance(titles, list)
            or not isinstance(bodies, list)
            or len(titles) != len(bodies)
        ):
            raise BatchError(f"{where}: the context must be {shape}")
        pairs: list[Any] = [[t, b] for t, b in zip(titles, bodies, strict=True)]
    elif isinstance(context, list):
        pairs = context
    else:
        raise BatchError(f"{where}: the context must be {shape}")
    out: list[tuple[str, str]] = []
    for number, item in enumerate(pairs, 1):
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
            raise BatchError(f"{where}: context item {number} must be a [title, sentences] pair")
        title, sentences = item
        if isinstance(sentences, str):
            out.append((title, sentences))
        elif isinstance(sentences, list) and all(isinstance(x, str) for x in sentences):
            out.append((title, "".join(sentences)))
        else:
            raise BatchError(f"{where}: context item {number}'s sentences must be text")
    return out


_CALLED = re.compile(r"assert\s+(?:not\s+)?\(?\s*(?:set\()?\s*([A-Za-z_]\w*)\s*\(")
_DEFINED = re.compile(r"^def\s+([A-Za-z_]\w*)\s*\(", re.MULTILINE)


def mbpp(record: dict[str, Any], index: int, where: str) -> dict[str, Any]:
    tests = record.get("test_list")
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
        raise BatchError(f"{where}: no test_list of assert statements")
    code = _optional_text(record, "code", where)
    called = [m.group(1) for t in tests if (m := _CALLED.search(t))]
    defined = _DEFINED.findall(code or "")
    entry = next((name for name in called if not defined or name in defined), None)
    if entry is None:
        raise BatchError(f"{where}: cannot tell the function's name from test_list")
    text = _text(record, "text", where)
    setup = _optional_text(record, "test_setup_code", where)
    prompt = f'"""\n{text}\n{tests[0]}\n"""\n'
    body = "\n".join(f"    {t.strip()}" for t in tests)
    test = (setup + "\n\n" if setup else "") + f"def check(candidate):\n{body}\n"
    return {
        "id": "mbpp-" + _id(record, ("task_id",), str(index), where),
        "prompt": prompt,
        "entry_point": entry,
        "test": test,
        "canonical_solution": code,
    }


CONVERTERS: dict[str, Callable[[dict[str, Any], int, str], dict[str, Any]]] = {
    "gsm8k": gsm8k,
    "math": math,
    "hotpotqa": hotpotqa,
    "mbpp": mbpp,
}


def convert(kind: str, path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    if kind not in CONVERTERS:
        raise BatchError(f"unknown format {kind!r}: one of {', '.join(CONVERTERS)}")
    rows = []
    seen: dict[str, int] = {}
    for index, (line, record) in enumerate(read_records(path)):
        row = CONVERTERS[kind](record, index, f"{path}:{line}")
        if row["id"] in seen:
            raise BatchError(
                f"{path}:{line}: duplicate id {row['id']!r} (first on line {seen[row['id']]})"
            )
        seen[row["id"]] = line
        rows.append(row)
        if limit is not None and len(rows) >= limit:
            break
    return rows


def convert_file(kind: str, path: Path, out: Path, limit: int | None = None) -> int:
    rows = convert(kind, path, limit)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    write_text_atomic(out, text, parents=False, user_file=True)  # -o FILE makes no folder
    return len(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mas2c.batch_datasets",
        description="Convert a dataset file you have to the JSONL of `mas2c batch`.",
    )
    parser.add_argument("format", choices=sorted(CONVERTERS))
    parser.add_argument("input")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--limit", type=argtypes.positive_int, help="the first N records (N >= 1)")
    args = parser.parse_args(argv)
    output = Path(args.output)
    if output.is_dir() or not output.parent.is_dir():
        why = "is a folder" if output.is_dir() else f"the folder {output.parent} does not exist"
        sys.stderr.write(f"mas2c.batch_datasets: cannot write {output}: {why}\n")
        return 2
    try:
        n = convert_file(args.format, Path(args.input), output, args.limit)
    except BatchError as exc:
        sys.stderr.write(f"mas2c.batch_datasets: {exc}\n")
        return 1
    except OSError as exc:
        sys.stderr.write(f"mas2c.batch_datasets: {args.output}: {exc.strerror or exc}\n")
        return 1
    sys.stdout.write(f"{n} rows written to {args.output}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

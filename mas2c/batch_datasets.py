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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from mas2c.batch import BatchError, boxed
from mas2c.files import write_text_atomic

__all__ = ["CONVERTERS", "convert", "convert_file", "read_records"]


def read_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line or position, record) from JSON Lines or a JSON array, gzipped or not."""
    opener: Any = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise BatchError(f"{path}: cannot read it ({exc})") from None
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise BatchError(f"{path}: not valid JSON ({exc})") from None
        for i, record in enumerate(data, 1):
            if not isinstance(record, dict):
                raise BatchError(f"{path}: item {i} is not a JSON object")
            yield i, record
        return
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise BatchError(f"{path}:{number}: not valid JSON ({exc})") from None
        if not isinstance(record, dict):
            raise BatchError(f"{path}:{number}: not a JSON object")
        yield number, record


def _text(record: dict[str, Any], key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise BatchError(f"{where}: no text field {key!r}")
    return value


def gsm8k(record: dict[str, Any], index: int, where: str) -> dict[str, Any]:
    solution = _text(record, "answer", where)
    if "####" not in solution:
        raise BatchError(f"{where}: the answer has no '#### <number>' line")
    final = solution.rsplit("####", 1)[1].strip().replace(",", "")
    return {
        "id": str(record.get("id", f"gsm8k-{index}")),
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
        "id": str(record.get("unique_id", record.get("id", f"math-{index}"))),
        "question": _text(record, "problem", where),
        "answer": answer,
        "level": record.get("level"),
        "type": record.get("type"),
    }


def hotpotqa(record: dict[str, Any], index: int, where: str) -> dict[str, Any]:
    paragraphs = []
    context = record.get("context") or []
    if isinstance(context, dict):  # the Hugging Face layout: {title: [...], sentences: [...]}
        context = list(zip(context.get("title", []), context.get("sentences", []), strict=False))
    for item in context:
        if isinstance(item, list | tuple) and len(item) == 2:
            title, sentences = item
            body = "".join(sentences) if isinstance(sentences, list) else str(sentences)
            paragraphs.append(f"{title}: {body}")
    question = _text(record, "question", where)
    text = ("\n\n".join(paragraphs) + "\n\nQuestion: " + question) if paragraphs else question
    return {
        "id": str(record.get("_id", record.get("id", f"hotpotqa-{index}"))),
        "question": text,
        "answer": _text(record, "answer", where),
        "type": record.get("type"),
        "level": record.get("level"),
    }


_CALLED = re.compile(r"assert\s+(?:not\s+)?\(?\s*(?:set\()?\s*([A-Za-z_]\w*)\s*\(")
_DEFINED = re.compile(r"^def\s+([A-Za-z_]\w*)\s*\(", re.MULTILINE)


def mbpp(record: dict[str, Any], index: int, where: str) -> dict[str, Any]:
    tests = record.get("test_list")
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
        raise BatchError(f"{where}: no test_list of assert statements")
    code = record.get("code") if isinstance(record.get("code"), str) else ""
    called = [m.group(1) for t in tests if (m := _CALLED.search(t))]
    defined = _DEFINED.findall(code or "")
    entry = next((name for name in called if not defined or name in defined), None)
    if entry is None:
        raise BatchError(f"{where}: cannot tell the function's name from test_list")
    text = _text(record, "text", where)
    setup = record.get("test_setup_code") if isinstance(record.get("test_setup_code"), str) else ""
    prompt = f'"""\n{text}\n{tests[0]}\n"""\n'
    body = "\n".join(f"    {t.strip()}" for t in tests)
    test = (setup + "\n\n" if setup else "") + f"def check(candidate):\n{body}\n"
    return {
        "id": f"mbpp-{record.get('task_id', index)}",
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
    for index, (line, record) in enumerate(read_records(path)):
        rows.append(CONVERTERS[kind](record, index, f"{path}:{line}"))
        if limit is not None and len(rows) >= limit:
            break
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise BatchError(f"{path}: the rows' ids are not unique")
    return rows


def convert_file(kind: str, path: Path, out: Path, limit: int | None = None) -> int:
    rows = convert(kind, path, limit)
    write_text_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return len(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mas2c.batch_datasets",
        description="Convert a dataset file you have to the JSONL of `mas2c batch`.",
    )
    parser.add_argument("format", choices=sorted(CONVERTERS))
    parser.add_argument("input")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--limit", type=int)
    args = parser.parse_args(argv)
    try:
        n = convert_file(args.format, Path(args.input), Path(args.output), args.limit)
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

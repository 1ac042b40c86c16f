"""`mas2c batch`: a spec (or `mas2c solve`) over a JSONL dataset, every result scored.

Contract:

* **Dataset**: JSON Lines, one JSON object per row (``.jsonl`` or ``.jsonl.gz``). A row's
  id is its ``id`` field (``--id-field``), else ``row-<n>``; ids must be unique. The spec's
  inputs come from the row's fields of the same name, or through ``--map INPUT=FIELD``
  (a dotted path reaches into nested objects). The expected answer is ``answer``
  (``--answer-field``; a list means "any of these"). Every row is checked before anything
  runs: a missing field is an error naming the row and line, not a failed row.
* **Scorers** (``--scorer``): ``exact`` (case, spacing and a final period ignored),
  ``numeric`` (the last number in the prediction against the expected one, thousands
  separators, ``$``, ``%`` and fractions understood), ``f1`` (SQuAD token F1), ``math``
  (numeric if both sides are numbers, else the LaTeX answer normalised: ``\\boxed``,
  ``\\left``/``\\right``, ``\\dfrac``, spaces), ``code`` (HumanEval-style tests run IN THE
  SANDBOX: the row's ``test`` and ``check(<entry_point>)`` against the system's code), and
  ``python:FILE``: a user scorer, ``def score(prediction, row)`` returning a bool or a number
  in [0, 1] (or ``{"score": ..., "note": ...}``), which runs IN THE SANDBOX and never on the
  host; what it returns is checked like any hostile output.
* **Engines**: ``threads`` (a bounded pool of threads on this machine; was ``local``) and ``ray`` (one Ray task
  per row, see :mod:`mas2c.batch_ray`). Either way the driver alone writes the run folder and
  enforces the cost cap.
* **Run folder**::

      RUN_DIR/config.json     what is measured (a resumed batch must match it)
      RUN_DIR/results.jsonl   one line per finished row (append-only, the resume point)
      RUN_DIR/summary.json    accuracy with its 95% interval, tokens, cost, seconds, failures by code
      RUN_DIR/report.md       the same for people
      RUN_DIR/rows/<id>/      the system's run folder (mas/ or solve/) and the scorer's (score/)
      RUN_DIR/baseline/       with --baseline cot-sc: the baseline's own batch (same layout)

* **Resume**: rows in results.jsonl are skipped; an unfinished row is redone from scratch.
  **Cost cap** (``--max-cost USD``): the recorded cost of the batch (resumed rows included)
  is checked before each row starts; once it reaches the cap no row starts, the running ones
  finish and are recorded, and the summary says ``stopped: cost cap``. The overshoot is at
  most the in-flight rows, each bounded by the spec's own ``budgets.max_cost_usd``.
* **Baseline** (``--baseline cot-sc``): chain-of-thought with self-consistency (n samples, a
  majority vote on the answer) on the same rows; n is chosen so that its mean cost matches
  the system's, measured on the first ``--pilot`` rows (the system's rows and a 1-sample
  pilot of the baseline on them; tokens when there are no prices). The summary puts both side
  by side with the paired difference and its 95% interval (Newcombe's for pass/fail scores).

Error codes of failed rows (``summary.json`` ``failures``): the runtime's ``error.code`` when
it gives one, else the error's ``type``; ``SandboxError`` when the sandbox could not run; the
scorer's own failures as ``scorer:ScorerTimeout``, ``scorer:ScorerBadValue``,
``scorer:ScorerRaised`` and ``scorer:ScorerFailed``. A run that gives no prediction scores 0
(``note``: no prediction in the result).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import re
import shutil
import statistics
import string
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, TypeGuard

from mas2c.errors import RunFailure, terminal_safe
from mas2c.files import build_replaceable, check_owned_folder, write_text_atomic
from mas2c.runfolder import result_or_error
from mas2c.values import final_answer as _stated_answer

__all__ = [
    "SCORERS",
    "BatchError",
    "BatchOptions",
    "Plan",
    "Row",
    "code_from_outputs",
    "load_rows",
    "newcombe_paired",
    "normalize_answer",
    "read_results",
    "run_batch",
    "run_code_tests",
    "score_text",
    "wilson",
    "write_code_scorer",
]

Backend = Literal["docker", "unisolated"]
Engine = Literal["threads", "ray"]
#: Engine names of earlier versions, accepted for one version (with a warning).
DEPRECATED_ENGINES: dict[str, Engine] = {"local": "threads"}
SCORERS = ("exact", "numeric", "f1", "math", "code")
CODE_SCORER_MODULE = "mas2c_humaneval_scorer"
USER_SCORER_MODULE = "mas2c_user_scorer"
MAX_PREDICTION_CHARS = 2000  # kept in results.jsonl; the run folder has the whole output
MAX_NOTE_CHARS = 2000  # a row's `note` (the scorer's words) and `error` in results.jsonl
TIMING_FIELDS = ("seconds", "score_seconds", "total_seconds")


class BatchError(RunFailure):
    """The batch cannot run (bad dataset, spec, mapping or run folder): a user-facing message."""

    code = "batch"


# ------------------------------------------------------------------------------------ dataset


@dataclass(frozen=True)
class Row:
    key: str
    index: int
    data: dict[str, Any]
    line: int = 0

    @property
    def slug(self) -> str:
        return slug(self.key)


def slug(key: str) -> str:
    """A file name for a row id: unsafe characters replaced, never empty, '.' or '..'."""
    text = re.sub(r"[^A-Za-z0-9_.-]+", "-", key)[:100].strip(".") or "row"
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:8]
    return text if text == key else f"{text}-{digest}"


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


#: JSON as a dataset allows it: NaN, Infinity and -Infinity are refused (ValueError).
STRICT_JSON = json.JSONDecoder(parse_constant=_no_constant)


def parse_json_line(text: str) -> Any:
    """One JSON value as a dataset allows it: strict JSON (no NaN or Infinity), a
    ValueError (with the reason) for anything else, too-deep nesting included."""
    try:
        return STRICT_JSON.decode(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def decode_line(raw: bytes) -> str:
    """A line as UTF-8 text, or a ValueError naming the column of the first bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        byte = raw[exc.start]
        raise ValueError(f"not UTF-8 text (byte 0x{byte:02x} at column {exc.start + 1})") from None


def load_rows(
    path: Path,
    *,
    id_field: str = "id",
    limit: int | None = None,
    require_id: bool = False,
    name: str | None = None,
) -> list[Row]:
    """The dataset's rows in file order (the first `limit`); a BatchError located at
    `FILE:LINE` for a bad line: not UTF-8, not strict JSON, not an object, a bad or
    duplicate id. A row without `id_field` is `row-<n>`, unless `require_id`. Messages name
    the file `name` (default: `path`)."""
    opener: Any = gzip.open if path.suffix == ".gz" else open
    where = name or str(path)  # how messages name the file (`<stdin>` for `-`)
    rows: list[Row] = []
    seen: dict[str, int] = {}
    try:
        with opener(path, "rb") as handle:
            for number, raw in enumerate(handle, 1):
                if not raw.strip():
                    continue
                try:
                    text = decode_line(raw)
                except ValueError as exc:
                    raise BatchError(f"{where}:{number}: {exc}") from None
                try:
                    data = parse_json_line(text)
                except ValueError as exc:
                    raise BatchError(f"{where}:{number}: not valid JSON ({exc})") from None
                if not isinstance(data, dict):
                    raise BatchError(f"{where}:{number}: a row must be a JSON object")
                try:  # 1e400 reads as infinity: no JSON number
                    json.dumps(data, allow_nan=False)
                except ValueError:
                    raise BatchError(
                        f"{where}:{number}: not valid JSON (a number out of range)"
                    ) from None
                key = _row_key(data, id_field, len(rows), require_id, f"{where}:{number}")
                if key in seen:
                    raise BatchError(
                        f"{where}:{number}: duplicate id {key!r} (first on line {seen[key]})"
                    )
                seen[key] = number
                rows.append(Row(key, len(rows), data, number))
                if limit is not None and len(rows) >= limit:
                    break
    except OSError as exc:
        raise BatchError(f"{where}: {exc.strerror or exc}") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise BatchError(f"{where}: unreadable ({exc})") from None
    if not rows:
        raise BatchError(f"{where}: no rows")
    return rows


def _row_key(data: dict[str, Any], id_field: str, index: int, required: bool, where: str) -> str:
    """A row's id: its `id_field`, a non-empty string or an integer; else `row-<index>`."""
    if id_field not in data:
        if required:
            raise BatchError(f"{where}: no id field {id_field!r} (--id-field)")
        return f"row-{index}"
    raw = data[id_field]
    if isinstance(raw, bool) or not isinstance(raw, str | int) or raw == "":
        shown = json.dumps(raw)[:60]
        raise BatchError(
            f"{where}: the id field {id_field!r} is {shown}: expected a non-empty string or an integer"
        )
    return str(raw)


_MISSING = object()


def lookup(data: Any, dotted: str) -> Any:
    """`a.b.0` in nested objects and lists; _MISSING when absent."""
    value = data
    for part in dotted.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def parse_mapping(pairs: Iterable[str]) -> dict[str, str]:
    """`INPUT=FIELD` pairs (the CLI's --map) as a dict."""
    mapping: dict[str, str] = {}
    for pair in pairs:
        name, sep, source = pair.partition("=")
        if not sep or not name.strip() or not source.strip():
            raise BatchError(f"--map {pair!r}: expected INPUT=FIELD")
        mapping[name.strip()] = source.strip()
    return mapping


def inputs_for(
    row: Row,
    names: Sequence[str],
    mapping: Mapping[str, str],
    optional: Sequence[str] = (),
) -> dict[str, Any]:
    """The row's values of the inputs `names` (a missing `optional` one, which has a schema
    default, is left out; a missing other one is a KeyError)."""
    values: dict[str, Any] = {}
    for name in names:
        value = lookup(row.data, mapping.get(name, name))
        if value is _MISSING:
            if name in optional:
                continue
            raise KeyError(name)
        values[name] = value
    return values


def row_place(row: Row, source: Path | str | None) -> str:
    """Where a row is, for messages: `FILE:LINE (id X)`, or `row X` for a preset's rows."""
    if source is not None and row.line:
        return f"{source}:{row.line} (id {row.key})"
    return f"row {row.key}"


def check_rows(
    rows: Sequence[Row],
    names: Sequence[str],
    mapping: Mapping[str, str],
    needs: Sequence[str],
    *,
    source: Path | str | None = None,
    declared: Mapping[str, Any] | None = None,
) -> None:
    """Every row has every mapped input (bar those with a schema default) and every field the
    scorer needs, and, given the spec's `declared` inputs, its values fit their schemas (the
    check `mas2c run` makes of an input); the first few problems, each at `FILE:LINE`."""
    from mas2c.values import input_problems

    optional = {
        n
        for n, schema in (declared or {}).items()
        if isinstance(schema, dict) and "default" in schema
    }
    problems: list[str] = []
    for row in rows:
        where = row_place(row, source)
        missing = False
        for name in names:
            field_name = mapping.get(name, name)
            if name not in optional and lookup(row.data, field_name) is _MISSING:
                missing = True
                problems.append(f"{where}: no field {field_name!r} for input {name!r}")
        for field_name in needs:
            if lookup(row.data, field_name) is _MISSING:
                problems.append(f"{where}: no field {field_name!r} for the scorer")
        if declared is not None and not missing:
            values = inputs_for(row, names, mapping, tuple(optional))
            found = input_problems(values, declared)[:2]
            for pointer, message in found:
                token = pointer.removeprefix("/inputs/").replace("~1", "/").replace("~0", "~")
                via = f" (field {mapping[token]!r})" if token in mapping else ""
                problems.append(f"{where}: {message}{via}")
        if len(problems) >= 5:
            break
    if problems:
        raise BatchError(
            "the dataset does not fit the spec and scorer:\n  "
            + "\n  ".join(problems[:5])
            + "\n(map fields with --map INPUT=FIELD, --answer-field FIELD)"
        )


# -------------------------------------------------------------------------- text scorers


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_EDGES = re.compile(r"^[\s\"'`]+|[\s\"'`.]+$")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """exact: case folded, spaces collapsed, surrounding quotes and a final period dropped."""
    text = " ".join(str(text).split()).casefold()
    return _EDGES.sub("", text)


def _f1_tokens(text: str) -> list[str]:
    text = str(text).casefold().translate(_PUNCT)
    return _ARTICLES.sub(" ", text).split()


def token_f1(prediction: str, expected: str) -> float:
    """SQuAD's token F1 (lower case, punctuation and articles removed)."""
    pred, gold = _f1_tokens(prediction), _f1_tokens(expected)
    if not pred or not gold:
        return float(pred == gold)
    common = Counter(pred) & Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


# A number: digits with thousands separators only in a valid grouping (`1,250`, not `1,2`,
# which reads as the two numbers 1 and 2), a decimal part, a fraction, `$` and `%`.
_NUMBER = re.compile(
    r"-?\$?(?:\d{1,3}(?:,\d{3})+(?!\d|,\d)|\d+)(?:\.\d+)?"
    r"(?:\s*/\s*\d+(?:\.\d+)?)?%?|-?\.\d+"
)


def parse_exact(text: Any) -> Fraction | None:
    """The last number in `text` (`1,250`, `$3.50`, `-7`, `3/4`, `12%`), exactly, or None.

    Digits are read as written (never through a float), so `9999999999999999` and
    `10000000000000000` differ; commas are thousands separators only in a valid grouping.
    """
    if isinstance(text, bool):
        return None
    if isinstance(text, int):
        return Fraction(text)
    if isinstance(text, float):
        return Fraction(repr(text)) if math.isfinite(text) else None
    found = _NUMBER.findall(str(text)[-10000:])
    if not found:
        return None
    token = found[-1].replace(",", "").replace("$", "").replace(" ", "").rstrip("%")
    try:
        if "/" in token:
            top, bottom = (Fraction(part) for part in token.split("/"))
            return top / bottom if bottom else None
        return Fraction(token)
    except (ValueError, ZeroDivisionError):
        return None


def parse_number(text: Any) -> float | None:
    """`parse_exact` as a float (for display; scorers compare the exact value)."""
    value = parse_exact(text)
    return None if value is None else float(value)


_TOLERANCE = Fraction(1, 10**9)


def _numbers_equal(a: Fraction, b: Fraction) -> bool:
    """Integers exactly; others within a relative 1e-9 (0.1 + 0.2 is 0.3)."""
    if a.denominator == 1 and b.denominator == 1:
        return a == b
    return abs(a - b) <= _TOLERANCE * max(abs(a), abs(b)) or abs(a - b) <= Fraction(1, 10**12)


def final_answer(text: str) -> str:
    """What votes compare: the answer after the text's last `answer:` marker
    (`mas2c.values.final_answer`, the compiled packages' very function), else the whole text."""
    found = _stated_answer(text)
    return text if found is None else found


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (balanced braces), or None."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    start = depth = starts[-1]
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
    return None


def normalize_math(text: str) -> str:
    """A LaTeX answer compared loosely: boxed content, no $, \\left/\\right, spaces, dfrac."""
    text = str(text)
    inner = boxed(text)
    if inner is not None:
        text = inner
    for old, new in (
        ("\\left", ""),
        ("\\right", ""),
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("\\!", ""),
        ("\\,", ""),
        ("\\ ", ""),
        ("^\\circ", ""),
        ("^{\\circ}", ""),
        ("$", ""),
        ("\\%", ""),
        ("%", ""),
        ("\\text{", "{"),
        ("\\mbox{", "{"),
    ):
        text = text.replace(old, new)
    text = "".join(text.split()).rstrip(".")
    if text.startswith("{") and text.endswith("}") and text.count("{") == 1:
        text = text[1:-1]
    return text


def _expected_list(expected: Any) -> list[Any]:
    if isinstance(expected, list):
        return expected or [""]
    return [expected]


def score_text(kind: str, prediction: Any, expected: Any) -> float:
    """The score in [0, 1] of a prediction under one of the text scorers."""
    golds = _expected_list(expected)
    if kind == "exact":
        # The stated answers match, or the whole texts do (an expected answer that itself
        # holds a marker, such as "ANSWER:", is matched by a prediction that is that text).
        pred = normalize_answer(_answer_text(prediction))
        whole = normalize_answer(_as_text(prediction))
        return float(
            any(
                pred == normalize_answer(_answer_text(g)) or whole == normalize_answer(_as_text(g))
                for g in golds
            )
        )
    if kind == "numeric":
        value = _number_of(prediction)
        if value is None:
            return 0.0
        return float(
            any(
                (g_value := _number_of(g)) is not None and _numbers_equal(value, g_value)
                for g in golds
            )
        )
    if kind == "f1":
        return max(token_f1(_answer_text(prediction), _answer_text(g)) for g in golds)
    if kind == "math":
        pred_text = _answer_text(prediction)
        pred = normalize_math(pred_text)
        for gold in golds:
            gold_norm = normalize_math(_answer_text(gold))
            if pred == gold_norm:
                return 1.0
            a, b = parse_exact(pred), parse_exact(gold_norm)
            if (
                a is not None
                and b is not None
                and re.fullmatch(r"-?[\d.,/]+", pred)
                and re.fullmatch(r"-?[\d.,/]+", gold_norm)
                and _numbers_equal(a, b)
            ):
                return 1.0
        return 0.0
    raise ValueError(f"unknown text scorer {kind!r}")


def _number_of(value: Any) -> Fraction | None:
    """A prediction's or expected answer's number: a JSON number as it is, else parsed."""
    if isinstance(value, dict) and "answer" in value:
        return _number_of(value["answer"])
    if isinstance(value, int | float) and not isinstance(value, bool):
        return parse_exact(value)
    return parse_exact(_answer_text(value))


def _answer_text(value: Any) -> str:
    """A prediction or expected answer as text, its final answer if it states one."""
    return final_answer(_as_text(value))


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "answer" in value:
        return _as_text(value["answer"])
    if value is None:
        return ""
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


# ------------------------------------------------------------------------- sandboxed scorers

# Runs inside the sandbox as `python -m mas2c_humaneval_scorer --input .. --output ..`:
# the candidate, the tests and `check(entry_point)` in a child interpreter in a temp dir,
# its own process group killed at the timeout. Standard library only.
CODE_SCORER_MAIN = r'''"""HumanEval scorer (generated by mas2c.batch): runs code + test + check(entry_point).

Pass is reported positively: a driver runs the program in a child interpreter and, only
after check(entry_point) has returned, writes a line marked with a random nonce (handed
over in the environment and removed before the candidate runs). An exit of any kind
(sys.exit(), exit(), quit(), os._exit, a signal) before that line is a failure, whatever
its exit status.
"""
import argparse, json, os, signal, subprocess, sys, tempfile, time

CAP = 4000

DRIVER = """\
import os as _os, sys as _sys
def _main():
    nonce = _os.environ.pop("MAS2C_SCORER_NONCE", "")
    with open(_sys.argv[1], encoding="utf-8") as f:
        source = f.read()
    scope = {"__name__": "__main__", "__builtins__": __builtins__}
    exec(compile(source, "candidate.py", "exec"), scope)
    for stream in (_sys.stdout, _sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    _os.write(1, ("\\n" + nonce + "\\n").encode("ascii"))
_main()
"""


def main():
    parser = argparse.ArgumentParser()
    for flag in ("--input", "--output", "--trace"):
        parser.add_argument(flag, required=True)
    args = parser.parse_args()
    with open(args.input, encoding="utf-8") as f:
        req = json.load(f)
    program = req["code"] + "\n\n" + req["test"] + "\n\ncheck(" + req["entry_point"] + ")\n"
    nonce = "@@mas2c-scored-" + os.urandom(16).hex() + "@@"
    started = time.monotonic()
    timed_out = False
    with tempfile.TemporaryDirectory(prefix="score-") as tmp:
        path = os.path.join(tmp, "candidate.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(program)
        driver = os.path.join(tmp, "driver.py")
        with open(driver, "w", encoding="utf-8") as f:
            f.write(DRIVER)
        proc = subprocess.Popen(
            [sys.executable, "-I", driver, path], cwd=tmp, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            env=dict(os.environ, MAS2C_SCORER_NONCE=nonce),
        )
        try:
            output, _ = proc.communicate(timeout=float(req["timeout_s"]))
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            output, _ = proc.communicate()
    text = output.decode("utf-8", errors="replace")
    marker = "\n" + nonce + "\n"
    reported = marker in text
    text = text.replace(marker, "")
    if len(text) > CAP:
        text = "...\n" + text[-CAP:]
    if not reported and not timed_out:
        text += "\n[no pass reported: the program ended (exit code %s) before every check ran]" % (
            proc.returncode,
        )
    outputs = {
        "passed": reported and proc.returncode == 0 and not timed_out,
        "exit_code": proc.returncode,
        "timed_out": timed_out,
        "seconds": round(time.monotonic() - started, 3),
        "output": text,
    }
    with open(args.trace, "a", encoding="utf-8") as f:
        f.write(json.dumps({"event": "scored", "passed": outputs["passed"]}) + "\n")
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump({"status": "ok", "outputs": outputs}, f)


main()
'''

# Runs inside the sandbox: imports the user's scorer (copied in as user_scorer.py) and calls
# score(prediction, row). Whatever it returns goes back as JSON; the host checks it.
USER_SCORER_MAIN = r'''"""User scorer runner (generated by mas2c.batch): score(prediction, row) in the sandbox."""
import argparse, json, sys, traceback


def main():
    parser = argparse.ArgumentParser()
    for flag in ("--input", "--output", "--trace"):
        parser.add_argument(flag, required=True)
    args = parser.parse_args()
    with open(args.input, encoding="utf-8") as f:
        req = json.load(f)
    try:
        from mas2c_user_scorer import user_scorer
        value = user_scorer.score(req["prediction"], req["row"])
        json.dumps(value)
        result = {"status": "ok", "outputs": {"value": value}}
    except BaseException as exc:
        result = {"status": "error", "error": {
            "type": type(exc).__name__, "message": str(exc)[:2000],
            "traceback": traceback.format_exc()[-4000:]}}
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(result, f)


main()
'''


def write_code_scorer(folder: Path) -> Path:
    """The HumanEval-style scorer package in `folder` (the package dir for sandbox.run_package)."""
    package = folder / CODE_SCORER_MODULE
    package.mkdir(parents=True, exist_ok=True)
    write_text_atomic(package / "__init__.py", "")
    write_text_atomic(package / "__main__.py", CODE_SCORER_MAIN)
    return folder


def write_user_scorer(folder: Path, source: str) -> Path:
    package = folder / USER_SCORER_MODULE
    package.mkdir(parents=True, exist_ok=True)
    write_text_atomic(package / "__init__.py", "")
    write_text_atomic(package / "__main__.py", USER_SCORER_MAIN)
    write_text_atomic(package / "user_scorer.py", source)
    return folder


def check_user_scorer(path: Path) -> str:
    """The scorer file's source, after checking (on the host, without running it) that it
    parses and defines `score`."""
    import ast

    from mas2c import pyast

    try:
        source = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BatchError(f"--scorer python:{path}: cannot read it ({exc})") from None
    try:
        tree = pyast.parse(source, filename=str(path))
    except SyntaxError as exc:
        raise BatchError(
            f"{path}:{exc.lineno}:{exc.offset}: the scorer does not parse: {exc.msg}"
        ) from None
    if not any(
        isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == "score"
        for node in tree.body
    ):
        raise BatchError(f"{path}: the scorer defines no top-level `def score(prediction, row)`")
    return source


@dataclass
class Score:
    score: float
    seconds: float = 0.0
    timed_out: bool = False
    output: str = ""
    note: str | None = None
    error: str | None = None  # the scorer itself failed: an error code

    @property
    def passed(self) -> bool:
        return self.score >= 1.0


def _sandbox_limits(timeout_s: float, slack_s: float = 60.0) -> Any:
    from mas2c import sandbox

    return sandbox.Limits(timeout_s=timeout_s + slack_s, memory_mb=1024, cpus=1.0)


def run_code_tests(
    code: str,
    test: str,
    entry_point: str,
    run_dir: Path,
    *,
    scorer_dir: Path,
    backend: Backend = "docker",
    image: str | None = None,
    test_timeout_s: float = 20.0,
    on_warning: Callable[[str], None] | None = None,
) -> Score:
    """`code` + `test` + `check(entry_point)` in the sandbox. Raises SandboxError if it cannot run."""
    from mas2c import sandbox

    run_dir.mkdir(parents=True, exist_ok=True)
    request = {"code": code, "test": test, "entry_point": entry_point, "timeout_s": test_timeout_s}
    input_path = run_dir / "score-input.json"
    write_text_atomic(input_path, json.dumps(request))
    started = time.monotonic()
    sandbox.run_package(
        scorer_dir,
        CODE_SCORER_MODULE,
        input_path,
        run_dir,
        backend=backend,
        limits=_sandbox_limits(test_timeout_s),
        image=image or sandbox.DEFAULT_IMAGE,
        on_warning=on_warning,
    )
    seconds = time.monotonic() - started
    # The scorer ran the system's code: its result is hostile input (the run-folder contract).
    result = result_or_error(run_dir / "result.json")
    outputs = result.outputs if result.ok else None
    if not isinstance(outputs, dict):
        message = result.error.message if result.error is not None else "no outputs"
        return Score(0.0, seconds, note=f"scorer failed: {message}", error="ScorerFailed")
    passed = outputs.get("passed") is True
    return Score(
        score=1.0 if passed else 0.0,
        seconds=seconds,
        timed_out=bool(outputs.get("timed_out")),
        output=str(outputs.get("output", ""))[-4000:],
        note="tests timed out" if outputs.get("timed_out") else None,
    )


def run_user_scorer(
    prediction: Any,
    row: Row,
    run_dir: Path,
    *,
    scorer_dir: Path,
    backend: Backend,
    image: str | None,
    timeout_s: float,
    on_warning: Callable[[str], None] | None,
) -> Score:
    """The user's score(prediction, row) in the sandbox; its answer checked as hostile data."""
    from mas2c import sandbox

    run_dir.mkdir(parents=True, exist_ok=True)
    input_path = run_dir / "score-input.json"
    write_text_atomic(
        input_path, json.dumps({"prediction": prediction, "row": row.data}, ensure_ascii=False)
    )
    started = time.monotonic()
    report = sandbox.run_package(
        scorer_dir,
        USER_SCORER_MODULE,
        input_path,
        run_dir,
        backend=backend,
        limits=_sandbox_limits(timeout_s, slack_s=10.0),
        image=image or sandbox.DEFAULT_IMAGE,
        on_warning=on_warning,
    )
    seconds = time.monotonic() - started
    if report.timed_out:
        why = f"the scorer did not finish in {timeout_s + 10:g} s"
        return Score(0.0, seconds, note=why, error="ScorerTimeout")
    # What the user's code answered is hostile input: read through the run-folder contract.
    result = result_or_error(run_dir / "result.json")
    if not result.ok:
        error = result.error
        message = f"{error.type}: {error.message[:300]}" if error is not None else "no result"
        if result.code == "bad_result":  # too large, NaN, too deep, not JSON, ...
            why = f"the scorer's answer is unreadable ({message})"
            return Score(0.0, seconds, note=why, error="ScorerBadValue")
        if error is not None and error.traceback is not None:  # score() raised
            return Score(0.0, seconds, note=f"the scorer raised {message}", error="ScorerRaised")
        return Score(0.0, seconds, note=f"the scorer failed: {message}", error="ScorerFailed")
    value = (result.outputs or {}).get("value")
    note: str | None = None
    if isinstance(value, dict):
        note = str(value.get("note"))[:300] if value.get("note") is not None else None
        value = value.get("score")
    if isinstance(value, bool):
        return Score(float(value), seconds, note=note)
    if isinstance(value, int | float) and math.isfinite(value) and 0.0 <= value <= 1.0:
        return Score(float(value), seconds, note=note)
    shown = json.dumps(value)[:80]
    return Score(
        0.0,
        seconds,
        note=f"the scorer returned {shown}: expected a bool or a number in [0, 1]",
        error="ScorerBadValue",
    )


# ------------------------------------------------------------------------- the code of a run

_PYTHON_BLOCK = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\r?\n(.*?)```", re.DOTALL)


def _strip_fence(text: str) -> str:
    found = _PYTHON_BLOCK.search(text)
    return found.group(1) if found else text


def code_from_outputs(outputs: Any, entry_point: str, prompt: str) -> str:
    """The candidate module in a system's outputs ("" if none).

    The `code` output (or a `code` field of an output object), else the first string
    output that defines the entry point, else the first string output. A bare function
    body (no `def <entry_point>`) is appended to the prompt, like a HumanEval completion.
    """
    candidates: list[str] = []
    if isinstance(outputs, dict):
        values = list(outputs.values())
        first = outputs.get("code")
        if isinstance(first, str):
            candidates.append(first)
        for value in values:
            if isinstance(value, dict) and isinstance(value.get("code"), str):
                candidates.append(value["code"])
        candidates += [v for v in values if isinstance(v, str)]
    elif isinstance(outputs, str):
        candidates.append(outputs)
    if not candidates:
        return ""
    defines = re.compile(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", re.MULTILINE)
    chosen = next((c for c in candidates if defines.search(_strip_fence(c))), candidates[0])
    code = _strip_fence(chosen)
    if not code.strip():
        return ""
    return code if defines.search(code) else prompt + code


# ------------------------------------------------------------------------------ result files


def read_results(path: Path) -> dict[str, dict[str, Any]]:
    """Finished rows by key; a torn last line (a crash mid-write) is cut off the file."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(path, "r+b") as handle:
            handle.truncate(cut)
        data = data[:cut]
    rows: dict[str, dict[str, Any]] = {}
    for line in data.decode("utf-8", errors="replace").split("\n"):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("key"), str):
            rows[row["key"]] = sane_numbers(row)
    return rows


_ROW_COUNTS = ("llm_calls", "prompt_tokens", "completion_tokens", "tokens")
_ROW_AMOUNTS = ("cost_usd", "seconds", "score_seconds", "total_seconds")


def sane_numbers(row: dict[str, Any]) -> dict[str, Any]:
    """A results.jsonl row (a file that may have been edited or come from elsewhere) with
    numbers every reader can use: counts whole and not negative, amounts finite and not
    negative (a NaN or negative cost would hide spending from the cost cap), `passed` a
    bool, `score` in [0, 1]; anything else becomes 0 (a score: 1 if passed, else 0)."""
    out = dict(row)
    for name in _ROW_COUNTS:
        value = out.get(name)
        if name in out and not (_is_number(value) and isinstance(value, int) and value >= 0):
            out[name] = 0
    for name in _ROW_AMOUNTS:
        value = out.get(name)
        if name in out:
            sane = _is_number(value) and math.isfinite(value) and value >= 0
            out[name] = float(value) if sane and _is_number(value) else 0.0
    if "passed" in out:
        out["passed"] = out["passed"] is True
    score = out.get("score")
    if "score" in out and not (_is_number(score) and 0 <= score <= 1):
        out["score"] = 1.0 if out.get("passed") is True else 0.0
    return out


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


class Appender:
    """Appends one JSON line per finished row, whole lines only, synced to disk."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()

    def append(self, row: dict[str, Any]) -> None:
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock, open(self._path, "ab") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())


def read_json(path: Path, max_bytes: int = 50_000_000) -> dict[str, Any]:
    try:
        if path.stat().st_size > max_bytes:
            return {}
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------- progress


class ProgressBar:
    """One stderr line: a bar, done/total, passes, seconds per row, ETA.

    On a terminal the line rewrites itself; elsewhere (logs, CI) one line per finished row.
    """

    def __init__(
        self,
        total: int,
        done: int,
        passed: int,
        label: str,
        stream: Any = None,
        word: str = "passed",
    ) -> None:
        self.total, self.done, self.passed = total, done, passed
        self.label, self.word = label, word
        self.stream = stream if stream is not None else sys.stderr
        self.started = time.monotonic()
        self.finished_here = 0
        self.cost = 0.0
        self._lock = threading.Lock()

    def line(self, note: str = "") -> str:
        width = 24
        filled = int(width * self.done / self.total) if self.total else width
        rate = (time.monotonic() - self.started) / self.finished_here if self.finished_here else 0
        eta = rate * (self.total - self.done)
        pct = 100.0 * self.passed / self.done if self.done else 0.0
        text = (
            f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
            f"{self.word} {self.passed} ({pct:.1f}%)"
        )
        if self.cost:
            text += f" ${self.cost:.4f}"
        if self.finished_here:
            text += f" {rate:.1f} s/row, ETA {_duration(eta)}"
        return text + (f"  {note}" if note else "")

    def update(self, passed: bool, note: str = "", cost: float = 0.0) -> None:
        with self._lock:
            self.done += 1
            self.finished_here += 1
            self.passed += int(passed)
            self.cost += cost
            self._write(self.line(terminal_safe(note)))

    def say(self, message: str) -> None:
        with self._lock:
            if self._tty():
                self.stream.write("\r\033[K")
            self.stream.write(f"{terminal_safe(message)}\n")
            self.stream.flush()

    def start(self) -> None:
        with self._lock:
            self._write(self.line())

    def close(self) -> None:
        if self._tty():
            self.stream.write("\n")
            self.stream.flush()

    def _tty(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def _write(self, text: str) -> None:
        if self._tty():
            self.stream.write(f"\r\033[K{text}")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# ------------------------------------------------------------------------------- the pool


@dataclass
class Job:
    key: str
    row: Row
    kind: str = "system"  # "system", or what the caller needs ("canonical", "raise", ...)


Work = Callable[[Job], dict[str, Any] | None]


def run_pool(
    jobs: Sequence[Job],
    work: Work,
    record: Callable[[Job, dict[str, Any]], None],
    bar: ProgressBar,
    workers: int,
    should_stop: Callable[[], bool] = lambda: False,
) -> tuple[int, list[str]]:
    """Run the jobs on `workers` threads; returns (finished, infrastructure errors).

    A job starts only if `should_stop()` is false (the cost cap); a finished one is
    recorded by its worker thread before that thread takes the next job. Ctrl-C: no new job
    starts; the running ones finish and are recorded (a second Ctrl-C abandons them);
    then KeyboardInterrupt is raised. A resumed run redoes only what is not recorded.
    """
    from mas2c import pyast

    pyast.guard_ast()  # rows parse Python on their threads (see mas2c.pyast)
    stop = threading.Event()
    errors: list[str] = []
    finished = 0

    def guarded(job: Job) -> dict[str, Any] | None:
        if stop.is_set() or should_stop():
            return None
        row = work(job)
        if row is not None:
            record(job, row)  # here, so that the cost cap sees it before the next row starts
        return row

    executor = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="batch")
    pending: set[Future[dict[str, Any] | None]] = set()
    futures: dict[Future[dict[str, Any] | None], Job] = {}
    interrupted = False
    try:
        for job in jobs:
            future = executor.submit(guarded, job)
            futures[future] = job
            pending.add(future)
        while pending:
            try:
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            except KeyboardInterrupt:
                if interrupted:
                    raise
                interrupted = True
                stop.set()
                running = sum(1 for f in pending if f.running())
                bar.say(
                    f"interrupted: finishing {running} running row(s) and recording them, "
                    "then stopping (Ctrl-C again: stop without recording them; their sandboxes "
                    "are still removed). Run the same command to resume."
                )
                continue
            for future in done:
                job = futures[future]
                try:
                    row = future.result()
                # An infrastructure failure: not recorded, retried on resume.
                except Exception as exc:
                    errors.append(f"{job.key}: {type(exc).__name__}: {exc}")
                    bar.say(f"{job.key}: not recorded ({type(exc).__name__}: {exc})")
                    continue
                if row is not None:
                    finished += 1
    finally:
        stop.set()
        executor.shutdown(wait=not interrupted or not pending, cancel_futures=True)
        bar.close()
    if interrupted:
        raise KeyboardInterrupt
    return finished, errors


def row_note(row: dict[str, Any]) -> str:
    if "expected" in row and "kind" in row:
        verdict = "as expected" if row.get("ok") else "UNEXPECTED"
        return f"{row['task_id']} {row['kind']}: {'pass' if row['passed'] else 'fail'} ({verdict})"
    label = row.get("task_id", row.get("key"))
    return f"{label}: {'pass' if row.get('passed') else 'fail'}"


def warn_once(inner: Callable[[str], None] | None) -> Callable[[str], None]:
    seen: set[str] = set()
    lock = threading.Lock()

    def warn(message: str) -> None:
        with lock:
            if message in seen:
                return
            seen.add(message)
        if inner is not None:
            inner(message)

    return warn


def check_sandbox(backend: Backend, image: str | None) -> None:
    if backend != "docker":
        return
    from mas2c import sandbox

    status = sandbox.status(image or sandbox.DEFAULT_IMAGE)
    daemon = status.get("daemon") or {}
    if not daemon.get("reachable"):
        raise BatchError(
            f"the Docker daemon is not reachable ({daemon.get('error')}): start it, "
            "or use --sandbox unisolated (which does not isolate)"
        )
    if not (status.get("image") or {}).get("present"):
        raise BatchError(
            f"the sandbox image {image or sandbox.DEFAULT_IMAGE} is missing: mas2c sandbox build"
        )


RESUME_KEYS = (
    "mode",
    "spec_sha256",
    "hide_tests",
    "broken_kinds",
    "dataset_sha256",
    "scorer",
    "mapping",
    "answer_field",
    "output",
    "solve_task",
    "scorer_sha256",  # a python:FILE scorer edited between runs measures something else
    "model",  # solve's generator and implementer (None with a spec)
    "id_field",  # other ids would run every row again beside the old ones
)
#: Resume keys that folders of earlier versions lack (such a folder is resumed as it was).
_LATER_RESUME_KEYS = frozenset({"id_field"})


def prepare_run_dir(run_dir: Path, config: dict[str, Any]) -> None:
    """Create the run folder, or check that a resumed one measures the same thing."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BatchError(f"cannot create the run folder {run_dir}: {exc.strerror or exc}") from None
    path = run_dir / "config.json"
    old = read_json(path)
    if old:
        changed = [
            k
            for k in RESUME_KEYS
            if (k in old or k not in _LATER_RESUME_KEYS) and old.get(k) != config.get(k)
        ]
        if changed:
            raise BatchError(
                f"{run_dir} holds a different benchmark run ({', '.join(changed)} differ); "
                "give another --run-dir to start a new one"
            )
    write_text_atomic(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------- statistics

Z95 = 1.959963984540054


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a proportion (sound at 0, 1 and small n)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    low = 0.0 if successes <= 0 else max(0.0, min(p, centre - half))
    high = 1.0 if successes >= n else min(1.0, max(p, centre + half))
    return (low, high)


def mean_interval(values: Sequence[float], z: float = Z95) -> tuple[float, float]:
    """A normal-approximation interval for a mean (scores that are not pass/fail)."""
    if not values:
        return (0.0, 0.0)
    mean = statistics.fmean(values)
    if len(values) < 2:
        return (mean, mean)
    half = z * statistics.stdev(values) / math.sqrt(len(values))
    return (mean - half, mean + half)


def newcombe_paired(
    a: Sequence[bool], b: Sequence[bool], z: float = Z95
) -> tuple[float, float, float]:
    """The difference of two paired proportions (a - b) with Newcombe's interval (method 10)."""
    n = len(a)
    if n == 0 or n != len(b):
        return (0.0, -1.0, 1.0)
    both = sum(1 for x, y in zip(a, b, strict=True) if x and y)
    only_a = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    only_b = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    neither = n - both - only_a - only_b
    p1, p2 = (both + only_a) / n, (both + only_b) / n
    l1, u1 = wilson(both + only_a, n, z)
    l2, u2 = wilson(both + only_b, n, z)
    product = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    phi = 0.0
    if product > 0:
        phi = (both * neither - only_a * only_b) / math.sqrt(product)
        phi = max(phi, 0.0) if both * neither - only_a * only_b > 0 else phi
    diff = p1 - p2
    lower = diff - math.sqrt(
        max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2)
    )
    upper = diff + math.sqrt(
        max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2)
    )
    return (diff, max(-1.0, lower), min(1.0, upper))


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Plan:
    """Everything a worker needs to run and score one row; picklable (Ray ships it to nodes).

    It holds no API key: a node reads OPENAI_API_KEY from its own environment.
    """

    mode: Literal["spec", "solve"]
    package: str = ""
    build_files: tuple[tuple[str, bytes], ...] = ()  # the compiled package, for remote nodes
    build_sha256: str = ""
    spec_inputs: tuple[str, ...] = ()
    optional_inputs: tuple[str, ...] = ()  # inputs with a schema default: a row may lack them
    mapping: tuple[tuple[str, str], ...] = ()
    output: str | None = None
    scorer: str = "exact"
    user_scorer: str | None = None  # the source of a python:FILE scorer
    answer_field: str = "answer"
    code_fields: tuple[str, str, str] = ("test", "entry_point", "prompt")
    keep: tuple[str, ...] = ()  # row fields copied into the result (task_id for HumanEval)
    solve_task: str | None = None
    model: str | None = None
    backend: Backend = "docker"
    image: str | None = None
    test_timeout_s: float = 20.0
    llm_url: str | None = None
    llm_replay: str | None = None
    llm_cache: bool = False
    llm_embedded_model: str | None = None


@dataclass
class Context:
    """Where a worker is: the host's run folder (threads engine) or a node's temp dir (Ray)."""

    build_dir: Path | None
    scorer_dir: Path | None
    upstream: Any
    warn: Callable[[str], None]


def llm_config(plan: Plan) -> Any:
    from mas2c.run import LLMConfig

    return LLMConfig(
        url=plan.llm_url,
        embedded_model=Path(plan.llm_embedded_model) if plan.llm_embedded_model else None,
        replay=Path(plan.llm_replay) if plan.llm_replay else None,
        cache=plan.llm_cache,
    )


def run_row(plan: Plan, row: Row, folder: Path, ctx: Context) -> dict[str, Any]:
    """Run the system on one row in `folder` (replaced), score it; the result row."""
    shutil.rmtree(folder, ignore_errors=True)  # an unfinished earlier attempt
    folder.mkdir(parents=True)
    started = time.monotonic()
    result: dict[str, Any] = {"key": row.key, "index": row.index}
    for name in plan.keep:
        result[name] = row.data.get(name)
    outputs: Any = None
    if plan.mode == "spec":
        outputs = _run_spec(plan, row, folder, ctx, result)
    else:
        outputs = _run_solve(plan, row, folder, ctx, result)
    result["seconds"] = round(time.monotonic() - started, 3)
    expected = lookup(row.data, plan.answer_field)
    prediction, score = _score(plan, row, outputs, folder / "score", ctx)
    if plan.scorer != "code":
        result["prediction"] = _clip(prediction)
        result["expected"] = None if expected is _MISSING else _clip(expected)
    result.update(score=round(score.score, 6), passed=score.passed)
    result["score_seconds"] = round(score.seconds, 3)
    if score.note:
        result["note"] = score.note[:MAX_NOTE_CHARS]
    if score.error:
        result["scorer_error"] = score.error
    result["total_seconds"] = round(time.monotonic() - started, 3)
    return result


def _clip(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_PREDICTION_CHARS:
        return value[:MAX_PREDICTION_CHARS] + "..."
    if not isinstance(value, str | int | float | bool | type(None)):
        text = json.dumps(value, ensure_ascii=False, sort_keys=True)
        return value if len(text) <= MAX_PREDICTION_CHARS else text[:MAX_PREDICTION_CHARS] + "..."
    return value


def error_code(error: Any) -> str:
    """A failed run's error code: the runtime's `code`, else its `type`."""
    if not isinstance(error, dict):
        return "Error"
    for key in ("code", "type"):
        value = error.get(key)
        if isinstance(value, str) and re.fullmatch(r"[A-Za-z][A-Za-z0-9_.:-]{0,60}", value):
            return value
    return "Error"


def _usage_fields(usage: Mapping[str, Any]) -> dict[str, Any]:
    def number(key: str) -> float:
        value = usage.get(key, 0)
        return float(value) if isinstance(value, int | float) and math.isfinite(value) else 0.0

    return {
        "llm_calls": int(number("calls")),
        "prompt_tokens": int(number("prompt_tokens")),
        "completion_tokens": int(number("completion_tokens")),
        "tokens": int(number("total_tokens")),
        "cost_usd": number("cost_usd"),
    }


def _run_spec(plan: Plan, row: Row, folder: Path, ctx: Context, result: dict[str, Any]) -> Any:
    from mas2c.run import run_system
    from mas2c.sandbox import SandboxError

    assert ctx.build_dir is not None
    input_path = folder / "input.json"
    values = inputs_for(row, plan.spec_inputs, dict(plan.mapping), plan.optional_inputs)
    write_text_atomic(input_path, json.dumps(values, ensure_ascii=False))
    try:
        outcome = run_system(
            ctx.build_dir,
            input_path,
            folder / "mas",
            backend=plan.backend,
            image=plan.image,
            llm=llm_config(plan),
            upstream=ctx.upstream,
            on_warning=ctx.warn,
        )
    except SandboxError as exc:
        result.update(status="error", error_code="SandboxError", error=str(exc)[:300])
        result.update(_usage_fields({}))
        return None
    result["status"] = outcome.status
    result.update(_usage_fields(outcome.usage))
    if outcome.ok:
        return outcome.result.get("outputs")
    error = outcome.result.get("error")
    error = error if isinstance(error, dict) else {}
    result["error_code"] = error_code(error)
    result["error"] = f"{error.get('type', 'Error')}: {str(error.get('message', ''))[:300]}"
    return None


def _run_solve(plan: Plan, row: Row, folder: Path, ctx: Context, result: dict[str, Any]) -> Any:
    from mas2c.configure import ConfigureError
    from mas2c.sandbox import SandboxError
    from mas2c.solve import SolveError, solve

    input_path = folder / "input.json"
    values = inputs_for(row, plan.spec_inputs, dict(plan.mapping), plan.optional_inputs)
    write_text_atomic(input_path, json.dumps(values, ensure_ascii=False))
    try:
        solved = solve(
            plan.solve_task or "",
            input_path,
            folder / "solve",
            llm=llm_config(plan),
            model=plan.model,
            backend=plan.backend,
            image=plan.image,
            on_warning=ctx.warn,
        )
    # solve gave up, or its sandbox refused the system: the row failed (as in spec mode)
    except (SolveError, ConfigureError, SandboxError) as exc:
        result.update(status="error", error_code=type(exc).__name__)
        result["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        result.update(llm_calls=0, tokens=0, cost_usd=0.0)
        return None
    data = solved.to_json()
    result.update(
        status=solved.status,
        spec_source=solved.spec_source,
        llm_calls=int(data.get("llm_calls", 0)),
        tokens=int(data.get("tokens", 0)),
        cost_usd=float(data.get("run_cost_usd", 0.0)),
    )
    if not solved.ok and data.get("error"):
        error = data["error"]
        result["error_code"] = error_code(error)
        result["error"] = f"{error.get('type', 'Error')}: {str(error.get('message', ''))[:300]}"
    return solved.answer


def prediction_of(outputs: Any, output: str | None) -> Any:
    """The output scored against the expected answer (None if the system gave none)."""
    if not isinstance(outputs, dict):
        return outputs
    if output is not None:
        return outputs.get(output)
    if "answer" in outputs:
        return outputs["answer"]
    if len(outputs) == 1:
        return next(iter(outputs.values()))
    return outputs


def _score(plan: Plan, row: Row, outputs: Any, folder: Path, ctx: Context) -> tuple[Any, Score]:
    if plan.scorer == "code":
        test_f, entry_f, prompt_f = plan.code_fields
        entry = str(lookup(row.data, entry_f))
        prompt_value = lookup(row.data, prompt_f)
        prompt = "" if prompt_value is _MISSING else str(prompt_value)
        code = code_from_outputs(outputs, entry, prompt) if outputs is not None else ""
        if not code:
            return code, Score(0.0, note="no code in the result")
        assert ctx.scorer_dir is not None
        score = run_code_tests(
            code,
            str(lookup(row.data, test_f)),
            entry,
            folder,
            scorer_dir=ctx.scorer_dir,
            backend=plan.backend,
            image=plan.image,
            test_timeout_s=plan.test_timeout_s,
            on_warning=ctx.warn,
        )
        return code, score
    prediction = prediction_of(outputs, plan.output)
    if prediction is None:
        return None, Score(0.0, note="no prediction in the result")
    if plan.user_scorer is not None:
        assert ctx.scorer_dir is not None
        return prediction, run_user_scorer(
            prediction,
            row,
            folder,
            scorer_dir=ctx.scorer_dir,
            backend=plan.backend,
            image=plan.image,
            timeout_s=plan.test_timeout_s,
            on_warning=ctx.warn,
        )
    expected = lookup(row.data, plan.answer_field)
    return prediction, Score(score_text(plan.scorer, prediction, expected))


# --------------------------------------------------------------------------------- options


@dataclass
class BatchOptions:
    """A batch (the CLI's flags)."""

    run_dir: Path
    dataset: Path | None = None
    dataset_name: str | None = None  # how config.json names it (`<stdin>` for `-`)
    rows: list[Row] | None = None  # a preset's rows instead of `dataset` (HumanEval)
    dataset_sha256: str | None = None  # with `rows`: what identifies them
    spec: Path | None = None
    solve_task: str | None = None  # run `mas2c solve` with this task per row (no spec)
    solve_inputs: tuple[str, ...] = ()  # the row fields solve gets as its input
    mapping: dict[str, str] = field(default_factory=dict)
    id_field: str | None = None  # None: `id` when a row has one, else row-<n>; given: required
    answer_field: str = "answer"
    output: str | None = None
    scorer: str = "exact"  # one of SCORERS, or "python:FILE"
    code_fields: tuple[str, str, str] = ("test", "entry_point", "prompt")
    keep: tuple[str, ...] = ()
    limit: int | None = None
    workers: int = 2
    engine: Engine = "threads"
    ray_address: str | None = None
    ray_max_retries: int = 3
    max_cost_usd: float | None = None
    backend: Backend = "docker"
    image: str | None = None
    test_timeout_s: float = 20.0
    llm: Any = None  # mas2c.run.LLMConfig
    model: str | None = None
    upstream: Any = None  # a shared upstream (tests); else made from `llm`
    baseline: str | None = None  # "cot-sc"
    baseline_model: str | None = None
    baseline_field: str | None = None
    pilot_rows: int = 5
    label: str = "batch"
    unit: str = "row"  # how progress messages name a row ("problem" for HumanEval)
    extra_config: dict[str, Any] = field(default_factory=dict)
    on_warning: Callable[[str], None] | None = None
    stream: Any = None  # where the progress goes (default stderr)


def _spec_of(path: Path) -> Any:
    from mas2c.lang.validate import SpecInvalid, load_spec

    try:
        return load_spec(path)
    except SpecInvalid as exc:
        raise BatchError(f"{path} is not a valid spec:\n{exc.report.format()}") from None
    except OSError as exc:
        raise BatchError(f"{path}: {exc.strerror or exc}") from None


def _build_files(build_dir: Path) -> tuple[tuple[str, bytes], ...]:
    files = []
    for path in sorted(build_dir.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            files.append((path.relative_to(build_dir).as_posix(), path.read_bytes()))
    return tuple(files)


def _scorer_kind(scorer: str) -> tuple[str, Path | None]:
    if scorer.startswith("python:"):
        path = Path(scorer.removeprefix("python:"))
        return "python", path
    if scorer not in SCORERS:
        raise BatchError(
            f"unknown scorer {scorer!r}: use one of {', '.join(SCORERS)} or python:FILE"
        )
    return scorer, None


def plan_batch(options: BatchOptions, rows: Sequence[Row]) -> tuple[Plan, dict[str, Any]]:
    """Compile the spec (into RUN_DIR/build), check every row, and describe the batch."""
    kind, scorer_path = _scorer_kind(options.scorer)
    user_source = check_user_scorer(scorer_path) if scorer_path is not None else None
    config: dict[str, Any] = {
        "benchmark": options.label,
        "dataset": options.dataset_name or (str(options.dataset) if options.dataset else None),
        "dataset_sha256": options.dataset_sha256,
        "scorer": options.scorer if scorer_path is None else f"python:{scorer_path.name}",
        "scorer_sha256": sha256(user_source.encode()) if user_source else None,
        "mapping": dict(sorted(options.mapping.items())),
        "answer_field": options.answer_field,
        "output": options.output,
        "sandbox": options.backend,
        "test_timeout_s": options.test_timeout_s,
        "model": options.model if options.solve_task is not None else None,
        "id_field": options.id_field or "id",
        **options.extra_config,
    }
    needs: list[str] = []
    if kind == "code":
        needs = [options.code_fields[0], options.code_fields[1]]
    elif kind != "python":
        needs = [options.answer_field]
    if options.solve_task is not None:
        names = options.solve_inputs or tuple(sorted(options.mapping))
        if not names:
            raise BatchError("solve needs the row fields it gets as input: give --map INPUT=FIELD")
        check_rows(rows, names, options.mapping, needs, source=dataset_label(options))
        config.update(mode="solve", spec=None, spec_sha256=None, solve_task=options.solve_task)
        plan = Plan(mode="solve", spec_inputs=tuple(names))
    else:
        if options.spec is None:
            raise BatchError("give a spec (or --solve TASK)")
        spec = _spec_of(options.spec)
        unknown = sorted(set(options.mapping) - set(spec.inputs))
        if unknown:
            raise BatchError(
                f"--map names {unknown}, which are not inputs of {options.spec} "
                f"(its inputs: {sorted(spec.inputs)})"
            )
        if options.output is not None and options.output not in spec.outputs:
            raise BatchError(
                f"--output {options.output!r} is not an output of {options.spec} "
                f"(its outputs: {sorted(spec.outputs)})"
            )
        names = tuple(sorted(spec.inputs))
        declared = spec.to_data().get("inputs") or {}
        check_rows(
            rows, names, options.mapping, needs, source=dataset_label(options), declared=declared
        )
        optional = tuple(n for n in names if "default" in (declared.get(n) or {}))
        from mas2c.compile import compile_spec

        build_dir = options.run_dir / "build"
        compile_spec(spec).write(build_dir)
        files = _build_files(build_dir)
        config.update(
            mode="spec",
            spec=str(options.spec),
            spec_sha256=sha256(options.spec.read_bytes()),
            solve_task=None,
        )
        plan = Plan(
            mode="spec",
            package=spec.package_name,
            build_files=files,
            build_sha256=sha256(json.dumps([(n, sha256(b)) for n, b in files]).encode()),
            spec_inputs=names,
            optional_inputs=optional,
        )
    llm = options.llm
    plan = replace(
        plan,
        mapping=tuple(sorted(options.mapping.items())),
        output=options.output,
        scorer=kind,
        user_scorer=user_source,
        answer_field=options.answer_field,
        code_fields=options.code_fields,
        keep=options.keep,
        solve_task=options.solve_task,
        model=options.model,
        backend=options.backend,
        image=options.image,
        test_timeout_s=options.test_timeout_s,
        llm_url=llm.endpoint() if llm is not None else None,
        llm_replay=str(llm.replay) if llm is not None and llm.replay else None,
        llm_cache=bool(llm.cache) if llm is not None else False,
        llm_embedded_model=(
            str(llm.embedded_model) if llm is not None and llm.embedded_model else None
        ),
    )
    return plan, config


def write_scorer_package(plan: Plan, folder: Path) -> Path | None:
    if plan.scorer == "code":
        return write_code_scorer(folder)
    if plan.user_scorer is not None:
        return write_user_scorer(folder, plan.user_scorer)
    return None


# --------------------------------------------------------------------------------- running


def run_batch(options: BatchOptions) -> dict[str, Any]:
    """Run (or resume) the batch and, with a baseline, the baseline; returns the summary."""
    if options.workers < 1:
        raise BatchError("--workers must be at least 1")
    for flag, value in (
        ("--max-cost", options.max_cost_usd),
        ("--test-timeout", options.test_timeout_s),
    ):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise BatchError(f"{flag} must be a positive number, not {value!r}")
    if options.ray_max_retries < 0:
        raise BatchError("--max-retries must be 0 or more")
    if options.engine in DEPRECATED_ENGINES:
        new = DEPRECATED_ENGINES[options.engine]
        print(
            f"mas2c: the batch engine {options.engine!r} is deprecated: use {new!r}",
            file=sys.stderr,
        )
        options.engine = new
    if options.baseline is not None and options.baseline != "cot-sc":
        raise BatchError(f"unknown baseline {options.baseline!r}: the baseline is cot-sc")
    if options.engine == "ray":
        from mas2c.batch_ray import check_cluster

        check_cluster(options.ray_address)  # before any folder, build or row
    if options.baseline is None:
        return _run_one(options)
    from mas2c.batch_baseline import check_baseline, run_baseline

    check_baseline(options)
    return run_baseline(options, _run_one(options))


def dataset_label(options: BatchOptions) -> str | None:
    """How messages name the dataset: `dataset_name` (`<stdin>`), else its path."""
    if options.dataset_name is not None:
        return options.dataset_name
    return str(options.dataset) if options.dataset is not None else None


def select_rows(options: BatchOptions) -> list[Row]:
    if options.rows is not None:
        return options.rows[: options.limit] if options.limit else list(options.rows)
    if options.dataset is None:
        raise BatchError("give a dataset (JSONL)")
    rows = load_rows(
        options.dataset,
        id_field=options.id_field or "id",
        limit=options.limit,
        require_id=options.id_field is not None,
        name=options.dataset_name,
    )
    if options.dataset_sha256 is None:
        options.dataset_sha256 = sha256(options.dataset.read_bytes())
    return rows


#: What a batch writes at the top of its folder (besides build/, scorer/ and rows/).
BATCH_FILES = frozenset(
    {"config.json", "results.jsonl", "summary.json", "report.md", "report.html", "results.md"}
)
_ROW_FILES = ("input.json", "engine.json")


def batch_owns(folder: Path) -> Callable[[str], bool]:
    """Which entries (relative POSIX paths) of a batch folder a batch wrote: a row's
    folder holds its input, its engine note and run folders (`mas/`, `score/`)."""
    build_ok = build_replaceable(folder / "build")

    def owns(relative: str) -> bool:
        parts = relative.split("/")
        if len(parts) == 1:
            return relative in BATCH_FILES
        if parts[0] in ("rows", "problems"):  # problems/: the humaneval preset's rows
            # a row's own files, or anything in its run folders (mas/, score/, canonical/)
            return len(parts) >= 4 or (len(parts) == 3 and parts[2] in _ROW_FILES)
        return parts[0] == "scorer" or (parts[0] == "build" and build_ok)

    return owns


def _run_one(options: BatchOptions) -> dict[str, Any]:
    rows = select_rows(options)
    run_dir = options.run_dir
    check_sandbox(options.backend, options.image)
    check_owned_folder(run_dir, marker="config.json", owns=batch_owns(run_dir), what="batch")
    old = read_json(run_dir / "config.json")
    if old:  # check before compiling into the folder
        prepare_run_dir(run_dir, {**old, **_quick_config(options)})
    plan, config = plan_batch(options, rows)
    config["engine"] = options.engine
    prepare_run_dir(run_dir, config)
    scorer_dir = write_scorer_package(plan, run_dir / "scorer")
    results_path = run_dir / "results.jsonl"
    done = read_results(results_path)
    selected = {r.key for r in rows}
    already = [row for key, row in done.items() if key in selected]
    todo = [Job(r.key, r) for r in rows if r.key not in done]
    bar = ProgressBar(
        len(rows),
        len(already),
        sum(bool(r.get("passed")) for r in already),
        options.label,
        options.stream,
    )
    if already:
        bar.say(
            f"{options.label}: resuming: {len(already)} {options.unit}(s) already in {results_path}"
        )
    spent = [sum(_cost(r) for r in done.values())]
    cap = options.max_cost_usd
    capped = threading.Event()

    def should_stop() -> bool:
        if cap is not None and spent[0] >= cap:
            capped.set()
            return True
        return False

    appender = Appender(results_path)
    lock = threading.Lock()

    def record(job: Job, row: dict[str, Any]) -> None:
        appender.append(row)
        with lock:
            spent[0] += _cost(row)
        bar.update(bool(row.get("passed")), note=row_note(row), cost=_cost(row))

    bar.start()
    started = time.monotonic()
    errors: list[str] = []
    stopped: str | None = None
    try:
        if options.engine == "ray":
            from mas2c.batch_ray import run_on_ray

            errors = run_on_ray(plan, todo, options, record, should_stop, bar, run_dir=run_dir)
        else:
            errors = _run_threads(plan, todo, options, record, should_stop, bar, scorer_dir)
    except KeyboardInterrupt:
        stopped = "interrupted"
        raise
    finally:
        if capped.is_set():
            stopped = f"cost cap: {spent[0]:.4f} of {cap} USD spent"
            bar.say(
                f"{options.label}: stopped: {stopped}; run the same command with a higher --max-cost to go on"
            )
        rows_done = read_results(results_path)
        summary = summarize(rows, rows_done, config, time.monotonic() - started, errors, stopped)
        write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        write_text_atomic(run_dir / "report.md", report(rows, rows_done, summary))
    return summary


def _quick_config(options: BatchOptions) -> dict[str, Any]:
    """The resume keys that are known before compiling (to refuse a mismatched folder early)."""
    quick: dict[str, Any] = {"mode": "solve" if options.solve_task else "spec"}
    if options.spec is not None and options.solve_task is None and options.spec.is_file():
        quick["spec_sha256"] = sha256(options.spec.read_bytes())
    if options.dataset_sha256 is not None:
        quick["dataset_sha256"] = options.dataset_sha256
    return quick


def _cost(row: Mapping[str, Any]) -> float:
    value = row.get("cost_usd", 0.0)
    sane = _is_number(value) and math.isfinite(value) and value >= 0
    return float(value) if sane and _is_number(value) else 0.0


_UPSTREAMS: dict[str, Any] = {}
_UPSTREAMS_LOCK = threading.Lock()


def shared_upstream(plan: Plan) -> Any:
    """One upstream per process and endpoint (a Ray worker reuses it across its tasks).

    The key comes from this process's environment (OPENAI_API_KEY), never from the plan;
    so does the endpoint URL when the plan leaves it out (a Ray task: OPENAI_BASE_URL).
    """
    from mas2c.run import make_upstream

    if plan.llm_replay is not None:
        return None
    config = llm_config(plan)
    name = f"{config.endpoint()}|{plan.llm_embedded_model}"
    with _UPSTREAMS_LOCK:
        if name not in _UPSTREAMS:
            _UPSTREAMS[name] = make_upstream(config)
        return _UPSTREAMS[name]


def _run_threads(
    plan: Plan,
    todo: Sequence[Job],
    options: BatchOptions,
    record: Callable[[Job, dict[str, Any]], None],
    should_stop: Callable[[], bool],
    bar: ProgressBar,
    scorer_dir: Path | None,
) -> list[str]:
    from mas2c.run import make_upstream

    warn = warn_once(options.on_warning)
    upstream = options.upstream
    owned = upstream is None and plan.mode == "spec" and plan.llm_replay is None and bool(todo)
    if owned:
        upstream = make_upstream(options.llm or llm_config(plan))
    ctx = Context(
        build_dir=options.run_dir / "build" if plan.mode == "spec" else None,
        scorer_dir=scorer_dir,
        upstream=upstream,
        warn=warn,
    )

    def work(job: Job) -> dict[str, Any]:
        return run_row(plan, job.row, options.run_dir / "rows" / job.row.slug, ctx)

    try:
        _, errors = run_pool(todo, work, record, bar, options.workers, should_stop)
    finally:
        if owned and hasattr(upstream, "close"):
            upstream.close()
    return errors


# ------------------------------------------------------------------------------- summaries


def accuracy(scores: Sequence[float]) -> dict[str, Any]:
    """Mean score with its 95% interval: Wilson's for pass/fail scores, else a normal one."""
    n = len(scores)
    if n == 0:
        return {"accuracy": None, "ci95": None, "ci_method": None}
    mean = statistics.fmean(scores)
    binary = all(s in (0.0, 1.0) for s in scores)
    low, high = wilson(sum(scores), n) if binary else mean_interval(scores)
    return {
        "accuracy": round(mean, 4),
        "ci95": [round(max(0.0, low), 4), round(min(1.0, high), 4)],
        "ci_method": "wilson" if binary else "normal",
    }


def failures(chosen: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for r in chosen:
        if r.get("status") not in (None, "ok"):
            counts[str(r.get("error_code") or r.get("status"))] += 1
        if r.get("scorer_error"):
            counts[f"scorer:{r['scorer_error']}"] += 1
    return dict(sorted(counts.items()))


def summarize(
    rows: Sequence[Row],
    done: Mapping[str, dict[str, Any]],
    config: Mapping[str, Any],
    seconds: float,
    errors: Sequence[str],
    stopped: str | None,
) -> dict[str, Any]:
    chosen = [done[r.key] for r in rows if r.key in done]
    scores = [float(r.get("score", 1.0 if r.get("passed") else 0.0)) for r in chosen]
    times = [float(r.get("total_seconds", 0.0)) for r in chosen]
    cost = sum(_cost(r) for r in chosen)
    return {
        **config,
        "selected": len(rows),
        "finished": len(chosen),
        "complete": len(chosen) == len(rows),
        "stopped": stopped,
        "passed": sum(bool(r.get("passed")) for r in chosen),
        **accuracy(scores),
        "system_errors": sum(1 for r in chosen if r.get("status") not in (None, "ok")),
        "failures": failures(chosen),
        "tokens": sum(int(r.get("tokens", 0)) for r in chosen),
        "llm_calls": sum(int(r.get("llm_calls", 0)) for r in chosen),
        "cost_usd": round(cost, 6),
        "cost_per_row_mean": round(cost / len(chosen), 6) if chosen else None,
        "seconds_per_row_mean": round(statistics.mean(times), 3) if times else None,
        "seconds_per_row_median": round(statistics.median(times), 3) if times else None,
        "this_invocation_seconds": round(seconds, 1),
        "not_recorded": list(errors),
    }


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _cell(value: Any, n: int = 80) -> str:
    """A value (an LLM's prediction, a program's error: hostile text) as plain text in one
    Markdown table cell: no link, image, HTML or column of its own (`mas2c.markdown`)."""
    from mas2c import markdown

    text = "" if value is None else str(value)
    return markdown.cell(text[:n] + ("..." if len(text) > n else ""))


def _title(summary: Mapping[str, Any]) -> str:
    if summary.get("benchmark") == "batch" and summary.get("dataset"):
        return Path(str(summary["dataset"])).name
    return str(summary.get("benchmark"))


def report(
    rows: Sequence[Row],
    done: Mapping[str, dict[str, Any]],
    summary: Mapping[str, Any],
    extra: str = "",
) -> str:
    """The Markdown report: the summary table, `extra` (the baseline), failures, wrong rows."""
    what = (
        f"`mas2c solve` ({summary.get('solve_task')!r})"
        if summary.get("mode") == "solve"
        else f"spec `{summary.get('spec')}`"
    )
    ci = summary.get("ci95")
    interval = f"[{_pct(ci[0])}, {_pct(ci[1])}]" if ci else "-"
    lines = [
        f"# Batch: {_title(summary)}",
        "",
        f"System: {what}; dataset: `{summary.get('dataset') or summary.get('benchmark')}`; "
        f"scorer: {summary.get('scorer')}; engine: {summary.get('engine')}; "
        f"sandbox: {summary.get('sandbox')}.",
        "",
        "| accuracy | 95% interval | passed | finished | tokens | LLM calls | cost (USD) | s/row (median) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {_pct(summary.get('accuracy'))} | {interval} ({summary.get('ci_method') or '-'}) | "
        f"{summary['passed']} | {summary['finished']}/{summary['selected']} | {summary['tokens']} | "
        f"{summary['llm_calls']} | {summary['cost_usd']:.4f} | "
        f"{summary.get('seconds_per_row_median') or 0:.1f} |",
        "",
    ]
    if summary.get("stopped"):
        lines += [f"**Stopped**: {summary['stopped']}.", ""]
    if extra:
        lines += [extra]
    if summary.get("failures"):
        lines += ["| failure | rows |", "| --- | --- |"]
        lines += [f"| {_cell(k)} | {v} |" for k, v in summary["failures"].items()]
        lines.append("")
    wrong = [done[r.key] for r in rows if r.key in done and not done[r.key].get("passed")]
    if wrong:
        lines += [
            f"Rows not passed ({len(wrong)}{', the first 50' if len(wrong) > 50 else ''}):",
            "",
            "| row | score | status | prediction | expected | note |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in wrong[:50]:
            lines.append(
                f"| {_cell(r['key'])} | {float(r.get('score', 0.0)):.2f} | {_cell(r.get('status'))} | "
                f"{_cell(r.get('prediction'), 60)} | {_cell(r.get('expected'), 60)} | "
                f"{_cell(r.get('note') or r.get('error'), 100)} |"
            )
        lines.append("")
    return "\n".join(lines)


def comparable(row: Mapping[str, Any]) -> dict[str, Any]:
    """A result row without its timing: what two engines must agree on."""
    return {k: v for k, v in row.items() if k not in TIMING_FIELDS}

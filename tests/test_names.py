"""One meaning per word: "local" named the embedded model, the unisolated sandbox backend and
the batch engine on this machine. Each has its own name now; the old spellings still work for
one version, each with a deprecation warning on stderr."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from mas2c import sandbox
from mas2c.cli import _llm_config, build_parser
from mas2c.runfolder import read_sandbox


@pytest.mark.parametrize(
    ("argv", "field", "value", "old"),
    [
        (
            ["run", "b", "--input", "i", "--sandbox", "local"],
            "sandbox",
            "unisolated",
            "--sandbox local",
        ),
        (["batch", "d", "--spec", "s", "--engine", "local"], "engine", "threads", "--engine local"),
        (["solve", "t", "--input", "i", "--llm", "local"], "llm", "embedded", "--llm local"),
        (
            ["solve", "t", "--input", "i", "--local-model", "m.gguf"],
            "embedded_model",
            "m.gguf",
            "--local-model",
        ),
    ],
)
def test_old_spellings_work_with_a_warning(
    argv: list[str], field: str, value: str, old: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser().parse_args(argv)
    assert getattr(args, field) == value
    err = capsys.readouterr().err
    assert old in err and "deprecated" in err


@pytest.mark.parametrize(
    ("argv", "field", "value"),
    [
        (["run", "b", "--input", "i", "--sandbox", "unisolated"], "sandbox", "unisolated"),
        (["batch", "d", "--spec", "s", "--engine", "threads"], "engine", "threads"),
        (["solve", "t", "--input", "i", "--llm", "embedded"], "llm", "embedded"),
    ],
)
def test_new_names_are_quiet(
    argv: list[str], field: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser().parse_args(argv)
    assert getattr(args, field) == value
    assert capsys.readouterr().err == ""


def test_llm_embedded_means_no_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    args = build_parser().parse_args(["solve", "t", "--input", "i", "--llm", "embedded"])
    config = _llm_config(args)
    assert config.force_embedded and config.endpoint() is None


def test_sandbox_backend_names() -> None:
    said: list[str] = []
    assert sandbox.backend_name("local", said.append) == "unisolated"
    assert said and "deprecated" in said[0]
    assert sandbox.backend_name("unisolated") == "unisolated"
    with pytest.raises(sandbox.SandboxError, match="unknown sandbox backend"):
        sandbox.backend_name("nowhere")


def test_old_run_folders_still_read(tmp_path: Path) -> None:
    path = tmp_path / "sandbox.json"
    path.write_text(json.dumps({"backend": "local", "isolation": "none"}))
    report = read_sandbox(path)
    assert report is not None and report.backend == "unisolated"


def test_old_module_name_is_an_alias() -> None:
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        from mas2c import embedded, local

    assert local.LocalUpstream is embedded.EmbeddedUpstream

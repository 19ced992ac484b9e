"""pipelines.cli and the scripts built on it: help said once with defaults, one-line errors, data found
from the project whatever the current directory."""
from __future__ import annotations

import subprocess
import sys

import pytest

from pipelines.cli import SHARED_DATA, run_cli, script_parser

from .helpers import ROOT, SHARED_DATA as TESTS_SHARED_DATA

DOC = """First paragraph, the description.

Second paragraph: details and commands.
"""


def test_help_says_each_paragraph_once_and_the_defaults(capsys):
    parser = script_parser(DOC, prog="x")
    parser.add_argument("--files", type=int, default=400, help="files to use")
    parser.add_argument("--fast", action="store_true", help="a flag")
    parser.add_argument("--json", help="also write here")
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    out = capsys.readouterr().out
    assert out.count("First paragraph") == 1 and out.count("Second paragraph") == 1
    assert "files to use (default: 400)" in out
    assert "a flag\n" in out and "also write here\n" in out  # no "(default: False)", "(default: None)"


@pytest.mark.parametrize("error", [FileNotFoundError("no such file: w.h5"), ValueError("bad value"),
                                   IsADirectoryError("w.h5 is a folder")])
def test_run_cli_turns_user_errors_into_one_line(error, capsys):
    def main():
        raise error

    assert run_cli(main, prog="x.py") == 2
    assert capsys.readouterr().err == f"x.py: error: {error}\n"


def test_run_cli_lets_bugs_through():
    def main():
        raise KeyError("a bug, not a user error")

    with pytest.raises(KeyError):
        run_cli(main)


def test_shared_data_is_the_one_beside_the_project():
    assert SHARED_DATA.resolve() == TESTS_SHARED_DATA.resolve()


SCRIPTS = ["dali_gpu_smoke"]


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS)
def test_script_help_from_elsewhere(name, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / f"{name}.py"), "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    description = lines[lines.index(next(line for line in lines if not line.startswith(("usage", " ")))) ]
    assert done.stdout.count(description) == 1  # the first paragraph is not repeated in the epilog
    assert "(default: False)" not in done.stdout and "(default: None)" not in done.stdout
    assert str(SHARED_DATA) in " ".join(done.stdout.split())  # the shared data, found from the project


def test_the_traceback_comes_back_on_request(monkeypatch):
    from pipelines.cli import TRACEBACK_ENV

    def main():
        raise ValueError("bad value")

    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(ValueError):
        run_cli(main)
    monkeypatch.setenv(TRACEBACK_ENV, "0")
    assert run_cli(main) == 2


def test_train_py_traceback_on_request(monkeypatch, capsys):
    from pipelines.cli import TRACEBACK_ENV
    from train import main

    assert main(["--data-dir", "/nonexistent/xray"]) == 2
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(FileNotFoundError, match="/nonexistent/xray"):
        main(["--data-dir", "/nonexistent/xray"])

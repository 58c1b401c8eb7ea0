"""The installed `cordgen` entry point, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cordgen import __version__

CORDGEN = str(Path(sys.executable).with_name("cordgen"))
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CORDGEN, *args], capture_output=True, text=True, timeout=120)


def test_help_and_version():
    assert run("--help").returncode == 0
    version = run("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"cordgen {__version__}"
    module = subprocess.run([sys.executable, "-m", "cordgen", "--version"], capture_output=True, text=True)
    assert module.stdout.strip() == f"cordgen {__version__}"


def test_recipe_prints_resolved_defaults():
    result = run("recipe", str(CONFIGS / "paper-heterogeneous.yaml"))
    assert result.returncode == 0
    assert "enable_prefix_caching: true" in result.stdout and "trust_remote_code: false" in result.stdout


@pytest.mark.parametrize("debug", [False, True])
def test_bad_recipe_is_one_line_without_traceback(tmp_path, debug):
    bad = tmp_path / "bad.yaml"
    bad.write_text("teachers: []\nscorer: {engine: {model: x/y}}\n")
    result = run(*(["--debug"] if debug else []), "recipe", str(bad))
    assert result.returncode != 0
    if debug:
        assert "Traceback" in result.stderr
    else:
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [
            f"error: {bad}: teachers: List should have at least 1 item after validation, not 0"
        ]

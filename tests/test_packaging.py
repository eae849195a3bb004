"""The package as a user meets it: its licence, ``python -m hiseg``, and one version string."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import hiseg

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def test_the_declared_licence_ships_as_a_file():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "MIT"}
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Copyright (c) 2026 hiseg authors" in text


def test_python_dash_m_runs_the_command_line():
    done = subprocess.run(
        [sys.executable, "-m", "hiseg", "--version"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"hiseg {hiseg.__version__}"


def test_the_version_is_written_once():
    """pyproject reads it from hiseg.__version__; no other file repeats it."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in config["project"] and "version" in config["project"]["dynamic"]
    assert config["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "hiseg.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", hiseg.__version__)
    files = [ROOT / "pyproject.toml", *(ROOT / "src").rglob("*.py")]
    holding = [p.relative_to(ROOT) for p in files if hiseg.__version__ in p.read_text()]
    assert holding == [Path("src/hiseg/__init__.py")]

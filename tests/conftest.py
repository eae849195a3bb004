"""Shared fixtures: the real data sets beside the repository, skipped with a reason when absent."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _data_dir(name: str) -> Path:
    path = DATA / name
    if not path.is_dir():
        pytest.skip(f"real data not found at {path} (../shared/data beside the repository)")
    return path


@pytest.fixture(scope="session")
def pascal_root() -> Path:
    return _data_dir("pascal-person-part")


@pytest.fixture(scope="session")
def picsart_root() -> Path:
    return _data_dir("picsart-person")

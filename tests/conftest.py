"""Shared fixtures: a synthetic dataset made at test time (every clone), and the real data sets
beside the repository (tests that use them are marked ``real_data`` and skip when absent).

``HISEG_SHARED_DATA`` points the real data elsewhere, e.g. at a missing folder to run the suite
as a fresh clone without ``../shared`` would.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from synthetic import make_folder_dataset, make_person_folder_dataset

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HISEG_SHARED_DATA") or ROOT.parent / "shared" / "data")
REAL_DATA_FIXTURES = {"pascal_root", "picsart_root"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that read the real data carry the ``real_data`` marker (``-m "not real_data"``)."""
    for item in items:
        if REAL_DATA_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real_data)


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


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """8 train and 3 val synthetic images of drawn people, ``folder`` layout, Pascal tree."""
    return make_folder_dataset(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="session")
def tiny_person_data(tmp_path_factory) -> Path:
    """4 synthetic images with 0/255 person masks in the ``person-folder`` layout (``valid``)."""
    return make_person_folder_dataset(tmp_path_factory.mktemp("synthetic_person"))


@pytest.fixture(scope="session")
def synthetic_photo(tmp_path_factory) -> Path:
    """A 500 x 375 JPEG of three drawn people (a photo for prediction tests)."""
    import numpy as np
    from PIL import Image
    from synthetic import scene

    path = tmp_path_factory.mktemp("photos") / "people.jpg"
    Image.fromarray(scene(500, 375, np.random.default_rng(67), people=3)[0]).save(path, quality=95)
    return path


def tiny_config(data: Path, out: Path, **extra):
    """A config that trains FPN + Lite0 on ``data`` in seconds (128 px crops, 6 epochs)."""
    from hiseg.config import load_config

    overrides = [
        f"data.root={data}",
        f"out_dir={out}",
        "name=tiny",
        "data.crop_size=128",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.val_long_side=160",
        "data.scale=[0.7, 1.0]",
        "optim.lr=3e-3",
        "optim.encoder_lr=1e-3",
        "optim.warmup_steps=1",
        "trainer.max_epochs=6",
        "trainer.precision=32-true",
        "trainer.progress_bar=false",
        "tracking.mlflow=false",
        "tracking.sample_images=1",
        *[f"{k}={v}" for k, v in extra.items()],
    ]
    return load_config(ROOT / "configs" / "pascal-person-part.yaml", overrides)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_data, tmp_path_factory) -> Path:
    """A small model trained inside the test session; its last checkpoint."""
    pytest.importorskip("torch")
    from hiseg.training import run_dir, train

    config = tiny_config(tiny_data, tmp_path_factory.mktemp("runs"))
    train(config, track=False)
    return run_dir(config) / "last.ckpt"

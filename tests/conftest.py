"""Shared fixtures: the real data sets beside the repository, skipped with a reason when absent."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


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
def tiny_data(pascal_root, tmp_path_factory) -> Path:
    """8 train and 3 val images of the real data, in the prepared-release layout."""
    root = tmp_path_factory.mktemp("ppp")
    ids = (pascal_root / "val_id.txt").read_text().split()[:11]
    for sub in ("JPEGImages", "gt_masks"):
        (root / sub).mkdir()
    for sid in ids:
        shutil.copy(pascal_root / "JPEGImages" / f"{sid}.jpg", root / "JPEGImages")
        shutil.copy(pascal_root / "gt_masks" / f"{sid}.png", root / "gt_masks")
    (root / "train_id.txt").write_text("\n".join(ids[:8]))
    (root / "val_id.txt").write_text("\n".join(ids[8:]))
    return root


def tiny_config(data: Path, out: Path, **extra) -> dict:
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
        "data.scale=[0.4, 0.6]",
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

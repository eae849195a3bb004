"""A tiny synthetic dataset made at test time: drawn people with a head, torso, arms and legs.

Written in the ``folder`` layout of :class:`hiseg.data.FolderDataset` with the Pascal-Person-Part
tree (and, for person models, in the ``person-folder`` layout), so training, export, prediction
and evaluation tests run on any clone, without ``../shared``.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import yaml
from PIL import Image

from hiseg.data import Dataset
from hiseg.taxonomy import load_tree

TREE = load_tree("pascal-person-part")
#: Part name -> (label value, base RGB colour); every part has its own colour, jittered.
PARTS = {
    name: (TREE.nodes[name].value, color)
    for name, color in {
        "head": (225, 180, 150),
        "torso": (40, 90, 200),
        "up_hand": (60, 160, 60),
        "low_hand": (230, 200, 170),
        "up_leg": (120, 40, 120),
        "low_leg": (90, 60, 30),
    }.items()
}


def draw_person(
    image: np.ndarray, mask: np.ndarray, x: int, y: int, height: int, rng: np.random.Generator
) -> None:
    """A standing person whose feet are near ``(x, y + height)``, in place."""
    unit = height / 8  # a head is about an eighth of a body

    def colour(name: str) -> tuple[int, ...]:
        base = np.array(PARTS[name][1]) + rng.integers(-25, 26, 3)
        return tuple(int(c) for c in np.clip(base, 0, 255))

    def point(p: tuple[float, float]) -> tuple[int, int]:
        return round(p[0]), round(p[1])

    def limb(name: str, a: tuple[float, float], b: tuple[float, float], width: float) -> None:
        pa, pb, thickness = point(a), point(b), max(2, round(width))
        cv2.line(image, pa, pb, colour(name), thickness)
        cv2.line(mask, pa, pb, PARTS[name][0], thickness)

    def box(name: str, x0: float, y0: float, x1: float, y1: float) -> None:
        p0, p1 = point((x0, y0)), point((x1, y1))
        cv2.rectangle(image, p0, p1, colour(name), -1)
        cv2.rectangle(mask, p0, p1, PARTS[name][0], -1)

    hip, shoulder, neck = y + 4.2 * unit, y + 1.5 * unit, y + 1.1 * unit
    spread = unit * rng.uniform(0.2, 0.9)
    for side in (-1, 1):
        knee = (x + side * (0.4 * unit + spread / 2), y + 6.1 * unit)
        limb("up_leg", (x + side * 0.4 * unit, hip), knee, 0.7 * unit)
        limb("low_leg", knee, (x + side * (0.4 * unit + spread), y + 7.9 * unit), 0.6 * unit)
    box("torso", x - 0.9 * unit, shoulder, x + 0.9 * unit, hip + 0.3 * unit)
    for side in (-1, 1):
        swing = unit * rng.uniform(0.3, 1.6)
        elbow = (x + side * (1.2 * unit + swing / 2), y + 3.0 * unit)
        limb("up_hand", (x + side * 1.1 * unit, shoulder + 0.3 * unit), elbow, 0.45 * unit)
        limb("low_hand", elbow, (x + side * (1.2 * unit + swing), y + 4.4 * unit), 0.4 * unit)
    centre, radius = point((x, neck - 0.6 * unit)), max(2, round(0.6 * unit))
    cv2.circle(image, centre, radius, colour("head"), -1)
    cv2.circle(mask, centre, radius, PARTS["head"][0], -1)


def scene(
    width: int, height: int, rng: np.random.Generator, people: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image of 1-3 people (one often small) on a smooth noisy background, and its mask
    of Pascal-Person-Part leaf values."""
    coarse = rng.integers(50, 200, (4, 4, 3)).astype(np.uint8)  # muted: people stand out
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    image = np.clip(image.astype(np.int16) + rng.integers(-12, 13, image.shape), 0, 255)
    image = np.ascontiguousarray(image.astype(np.uint8))
    mask = np.zeros((height, width), np.uint8)
    for i in range(people or int(rng.integers(1, 4))):
        share = rng.uniform(0.55, 0.9) if i == 0 else rng.uniform(0.15, 0.5)
        tall = max(16, int(share * height))
        x = int(rng.integers(tall // 5, max(tall // 5 + 1, width - tall // 5)))
        y = int(rng.integers(0, max(1, height - tall)))
        draw_person(image, mask, x, y, tall, rng)
    return image, mask


#: (width, height) of the images: both orientations, odd sizes.
SIZES = [(200, 150), (150, 200), (181, 137), (160, 160)]


def make_folder_dataset(
    root: Path, n_train: int = 8, n_val: int = 3, seed: int = 0, background: int | None = None
) -> Path:
    """``images/`` (JPEG) + ``masks/`` (PNG) + ``tree.yaml`` + ``train.txt`` / ``val.txt``.

    ``background`` relabels the background (and the tree) to another value, for code that must
    not assume background is 0; it must not be a part's value.
    """
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    spec = TREE.to_dict()
    if background is not None:
        spec = {**spec, "nodes": [dict(n) for n in spec["nodes"]]}
        spec["nodes"][0]["value"] = background
    (root / "tree.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    ids = [f"synth_{i:03d}" for i in range(n_train + n_val)]
    for i, sid in enumerate(ids):
        image, mask = scene(*SIZES[i % len(SIZES)], rng)
        if background is not None:
            mask[mask == 0] = background
        Image.fromarray(image).save(root / "images" / f"{sid}.jpg", quality=95)
        Image.fromarray(mask).save(root / "masks" / f"{sid}.png")
    (root / "train.txt").write_text("\n".join(ids[:n_train]) + "\n")
    (root / "val.txt").write_text("\n".join(ids[n_train:]) + "\n")
    return root


def make_person_folder_dataset(root: Path, n: int = 4, split: str = "valid", seed: int = 1) -> Path:
    """The ``person-folder`` layout (PicsArt's): ``<split>/`` images, ``<split>_mask/`` 0/255."""
    rng = np.random.default_rng(seed)
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / f"{split}_mask").mkdir(exist_ok=True)
    for i in range(n):
        image, mask = scene(*SIZES[i % len(SIZES)], rng)
        Image.fromarray(image).save(root / split / f"{i}.jpg", quality=95)
        Image.fromarray(np.where(mask > 0, 255, 0).astype(np.uint8)).save(
            root / f"{split}_mask" / f"{i}.png"
        )
    return root


def make_pascal_layout(root: Path, n: int = 6, split: str = "val", seed: int = 2) -> list[str]:
    """The prepared Pascal-Person-Part layout: ``JPEGImages/``, ``gt_masks/``, ``<split>_id.txt``.
    Returns the ids."""
    rng = np.random.default_rng(seed)
    (root / "JPEGImages").mkdir(parents=True)
    (root / "gt_masks").mkdir()
    ids = [f"2099_{i:06d}" for i in range(n)]
    for i, sid in enumerate(ids):
        image, mask = scene(*SIZES[i % len(SIZES)], rng)
        Image.fromarray(image).save(root / "JPEGImages" / f"{sid}.jpg", quality=95)
        Image.fromarray(mask).save(root / "gt_masks" / f"{sid}.png")
    (root / f"{split}_id.txt").write_text("\n".join(ids) + "\n")
    return ids


def save_perfect_predictions(dataset: Dataset, folder: Path) -> Path:
    """Each sample's ground truth saved as its prediction, ``<folder>/<id>.png`` (what
    ``hiseg eval --pred-dir`` reads): every score is 1 until a test spoils some."""
    folder.mkdir()
    for sample in dataset.samples:
        Image.fromarray(dataset.read_labels(sample)).save(folder / f"{sample.id}.png")
    return folder

"""Dataset readers, checks and statistics.

Three on-disk formats, each read in place:

* ``pascal-person-part``: the prepared release: ``JPEGImages/<id>.jpg``, ``gt_masks/<id>.png``
  (or ``.npy``) and one id list per split, ``<split>_id.txt``.
* ``person-folder``: images in ``<split>/`` and 0/255 masks in ``<split>_mask/`` (the PicsArt
  layout: ``train/`` + ``train_mask/``, ``valid/`` + ``valid_mask/``).
* ``folder``: ``images/`` + ``masks/`` + ``tree.yaml``; optional split lists ``<split>.txt``
  (without one, the split ``all`` is every image).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np

from hiseg.errors import HisegError
from hiseg.files import publish
from hiseg.images import IMAGE_SUFFIXES, MASK_SUFFIXES, ImageReadError, read_image, read_mask
from hiseg.taxonomy import BACKGROUND, IGNORE_VALUE, Tree, load_tree

#: Person-size buckets, as a share of the image covered by one connected body region.
SIZE_BUCKETS: tuple[tuple[str, float, float], ...] = (
    ("<1%", 0.0, 0.01),
    ("1-5%", 0.01, 0.05),
    ("5-20%", 0.05, 0.20),
    (">20%", 0.20, 1.01),
)


class DatasetError(HisegError, ValueError):
    """A dataset cannot be opened at all (wrong path, unknown layout, unknown split)."""


@dataclass(frozen=True)
class Sample:
    id: str
    image_path: Path | None  # None: listed or masked, but no image file found
    mask_path: Path | None  # None: no mask file found


@dataclass(frozen=True)
class Problem:
    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def _natural_key(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _files_by_stem(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in suffixes and path.stem not in found:
            found[path.stem] = path
    return found


def read_id_list(path: str | Path) -> list[str]:
    """Sample ids, one per line; text after ``#`` is a comment."""
    try:
        text = Path(path).read_text()
    except UnicodeDecodeError as err:
        reason = f"{err.reason} at byte {err.start}"
        raise DatasetError(f"{path}: not a text list of ids ({reason})") from None
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


class Dataset:
    """A split of a segmentation dataset: samples, their tree, and how to read them."""

    format: str = ""

    def __init__(self, root: str | Path, split: str, tree: Tree | None = None):
        self.root = Path(root)
        self.split = split
        self.tree = tree or self.default_tree(self.root)
        self.samples: list[Sample] = self._list_samples()

    # Each format says how it lays out splits and files, and its tree unless one is given.
    @classmethod
    def default_tree(cls, root: Path) -> Tree:
        raise NotImplementedError

    @classmethod
    def detect(cls, root: Path) -> bool:
        raise NotImplementedError

    @classmethod
    def splits(cls, root: Path) -> list[str]:
        raise NotImplementedError

    def _list_samples(self) -> list[Sample]:
        raise NotImplementedError

    def id_list(self) -> Path | None:
        """The file that lists the split's ids, if the format has one."""
        return None

    def _missing_image_reason(self, sample: Sample) -> str:
        mask = f"its mask is {sample.mask_path}" if sample.mask_path else "no mask either"
        return f"image for '{sample.id}' is missing ({mask})"

    # Shared behaviour.
    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.read(self.samples[index])

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for sample in self.samples:
            yield self.read(sample)

    @property
    def ids(self) -> list[str]:
        return [s.id for s in self.samples]

    def drop(self, ids: Collection[str]) -> None:
        """Leave these samples out, e.g. train masks found to be wrong. An id the split does
        not hold is an error, so a typo never silently keeps a sample."""
        ids = set(ids)
        unknown = sorted(ids - set(self.ids), key=_natural_key)
        if unknown:
            raise DatasetError(
                f"{self.root}: split '{self.split}' has no sample '{unknown[0]}' "
                f"({len(unknown)} of {len(ids)} ids to drop are unknown)"
            )
        self.samples = [s for s in self.samples if s.id not in ids]

    def read(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        """(RGB uint8 image, leaf-value label map); mask values outside the tree -> ignore."""
        if sample.image_path is None:
            raise ImageReadError(self.root / sample.id, self._missing_image_reason(sample))
        if sample.mask_path is None:
            raise ImageReadError(sample.image_path, "no mask for this image")
        return read_image(sample.image_path), self.read_labels(sample)

    def read_labels(self, sample: Sample) -> np.ndarray:
        if sample.mask_path is None:
            raise ImageReadError(sample.image_path or sample.id, "no mask for this image")
        return self.tree.encode_mask(read_mask(sample.mask_path))

    def check_listing(self) -> list[Problem]:
        """Problems of the split as a whole: no samples at all, or ids listed more than once
        (a duplicated id is trained and scored twice)."""
        where = self.id_list() or self.root
        if not self.samples:
            return [Problem(where, f"split '{self.split}' has no samples")]
        counts = Counter(self.ids)
        return [
            Problem(where, f"id '{sid}' is listed {n} times") for sid, n in counts.items() if n > 1
        ]

    def check_sample(self, sample: Sample) -> list[Problem]:
        """Every problem of one sample, each naming its file; [] when the sample is sound."""
        problems: list[Problem] = []
        image = raw = None
        if sample.image_path is None:
            problems.append(Problem(self.root / sample.id, self._missing_image_reason(sample)))
        else:
            try:
                image = read_image(sample.image_path)
            except ImageReadError as err:
                problems.append(Problem(err.path, err.reason))
        if sample.mask_path is None:
            where = sample.image_path or self.root / sample.id
            problems.append(Problem(where, "mask is missing"))
        else:
            try:
                raw = read_mask(sample.mask_path)
            except ImageReadError as err:
                problems.append(Problem(err.path, err.reason))
        if raw is not None and sample.mask_path is not None:
            unknown = self.tree.unknown_values(raw)
            if unknown:
                allowed = sorted(set(self.tree.values) | set(self.tree.value_map))
                problems.append(
                    Problem(
                        sample.mask_path,
                        f"label values {unknown} are not in tree '{self.tree.name}' "
                        f"(allowed: {allowed}, {IGNORE_VALUE} = ignore)",
                    )
                )
            if image is not None and image.shape[:2] != raw.shape:
                name = Path(sample.image_path or sample.id).name
                problems.append(
                    Problem(
                        sample.mask_path,
                        f"mask is {raw.shape[1]}x{raw.shape[0]} but image "
                        f"{name} is {image.shape[1]}x{image.shape[0]}",
                    )
                )
        return problems

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r}, split={self.split!r}, n={len(self)})"


class PascalPersonPart(Dataset):
    format = "pascal-person-part"

    @classmethod
    def default_tree(cls, root: Path) -> Tree:
        return load_tree("pascal-person-part")

    @classmethod
    def detect(cls, root: Path) -> bool:
        return (root / "JPEGImages").is_dir() and (root / "gt_masks").is_dir()

    @classmethod
    def splits(cls, root: Path) -> list[str]:
        return sorted(p.name.removesuffix("_id.txt") for p in root.glob("*_id.txt"))

    def id_list(self) -> Path:
        return self.root / f"{self.split}_id.txt"

    def _list_samples(self) -> list[Sample]:
        id_file = self.id_list()
        images, masks = self.root / "JPEGImages", self.root / "gt_masks"
        samples = []
        for sid in read_id_list(id_file):
            image = images / f"{sid}.jpg"
            mask = next(
                (m for m in (masks / f"{sid}.png", masks / f"{sid}.npy") if m.exists()), None
            )
            samples.append(Sample(sid, image if image.exists() else None, mask))
        return samples

    def _missing_image_reason(self, sample: Sample) -> str:
        listed = f"{self.split}_id.txt"
        return f"id '{sample.id}' is listed in {listed} but JPEGImages/{sample.id}.jpg is absent"


class PersonFolder(Dataset):
    format = "person-folder"

    @classmethod
    def default_tree(cls, root: Path) -> Tree:
        return load_tree("person")

    @classmethod
    def detect(cls, root: Path) -> bool:
        return bool(cls.splits(root))

    @classmethod
    def splits(cls, root: Path) -> list[str]:
        return sorted(
            p.name for p in root.iterdir() if p.is_dir() and (root / f"{p.name}_mask").is_dir()
        )

    def _list_samples(self) -> list[Sample]:
        images = _files_by_stem(self.root / self.split, IMAGE_SUFFIXES)
        masks = _files_by_stem(self.root / f"{self.split}_mask", MASK_SUFFIXES)
        return [
            Sample(sid, images.get(sid), masks.get(sid))
            for sid in sorted(images.keys() | masks.keys(), key=_natural_key)
        ]


class FolderDataset(Dataset):
    """``images/`` + ``masks/`` + ``tree.yaml``, with optional ``<split>.txt`` id lists."""

    format = "folder"

    @classmethod
    def default_tree(cls, root: Path) -> Tree:
        return load_tree(root / "tree.yaml")

    @classmethod
    def detect(cls, root: Path) -> bool:
        return (root / "images").is_dir() and (root / "masks").is_dir()

    @classmethod
    def splits(cls, root: Path) -> list[str]:
        return sorted(p.stem for p in root.glob("*.txt")) or ["all"]

    def id_list(self) -> Path | None:
        path = self.root / f"{self.split}.txt"
        return path if path.exists() else None

    def _list_samples(self) -> list[Sample]:
        images = _files_by_stem(self.root / "images", IMAGE_SUFFIXES)
        masks = _files_by_stem(self.root / "masks", MASK_SUFFIXES)
        id_file = self.id_list()
        ids = (
            read_id_list(id_file)
            if id_file is not None
            else sorted(images.keys() | masks.keys(), key=_natural_key)
        )
        return [Sample(sid, images.get(sid), masks.get(sid)) for sid in ids]


FORMATS: dict[str, type[Dataset]] = {
    cls.format: cls for cls in (PascalPersonPart, PersonFolder, FolderDataset)
}


def detect_format(root: str | Path) -> str:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder")
    for name, cls in FORMATS.items():
        if cls.detect(root):
            return name
    raise DatasetError(
        f"{root}: unknown dataset layout; expected JPEGImages/ + gt_masks/ (pascal-person-part), "
        "<split>/ + <split>_mask/ (person-folder) or images/ + masks/ + tree.yaml (folder)"
    )


#: What each format expects on disk, for errors.
LAYOUTS = {
    "pascal-person-part": "JPEGImages/ + gt_masks/ and <split>_id.txt lists",
    "person-folder": "<split>/ + <split>_mask/ folders",
    "folder": "images/ + masks/ + tree.yaml",
}


def resolve_format(root: str | Path, format: str = "auto") -> str:
    """The format of ``root``: detected for ``auto``; a named one must exist and fit the folder,
    so a wrong ``--format`` never finds nothing and reports success."""
    root = Path(root)
    if format == "auto":
        return detect_format(root)
    if format not in FORMATS:
        raise DatasetError(f"unknown format '{format}' (known: auto, {', '.join(FORMATS)})")
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder")
    if not FORMATS[format].detect(root):
        raise DatasetError(f"{root}: not a {format} dataset (expected {LAYOUTS[format]})")
    return format


def dataset_splits(root: str | Path, format: str = "auto") -> list[str]:
    """The splits of a dataset folder; an error if it has none."""
    fmt = resolve_format(root, format)
    splits = FORMATS[fmt].splits(Path(root))
    if not splits:
        raise DatasetError(f"{root}: no splits in this {fmt} dataset (expected {LAYOUTS[fmt]})")
    return splits


def open_dataset(root: str | Path, split: str, format: str = "auto") -> Dataset:
    """Open one split of a dataset folder, detecting its format unless one is given."""
    root = Path(root)
    fmt = resolve_format(root, format)
    splits = FORMATS[fmt].splits(root)
    if split not in splits:
        listed = ", ".join(splits)
        raise DatasetError(f"{root}: no split '{split}' in this {fmt} dataset (splits: {listed})")
    return FORMATS[fmt](root, split)


_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


def parallel_map(fn: Callable[[_Item], _Result], items: Iterable[_Item]) -> Iterator[_Result]:
    """Map in threads, in order. Image decoding releases the GIL, so threads use every core."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        yield from pool.map(fn, items)


def check_dataset(dataset: Dataset, progress: Callable[[int], None] | None = None) -> list[Problem]:
    """All problems of a split (its listing, then each sample); never stops at the first."""
    problems = dataset.check_listing()
    for sample_problems in parallel_map(dataset.check_sample, dataset.samples):
        problems.extend(sample_problems)
        if progress:
            progress(1)
    return problems


# -- statistics ------------------------------------------------------------------------------


#: Connected body regions smaller than this many pixels are annotation specks, not people.
MIN_REGION_PIXELS = 64


def person_components(labels: np.ndarray, tree: Tree) -> tuple[np.ndarray, np.ndarray]:
    """Connected non-background regions (8-connectivity) of a leaf label map: the (H, W) region
    index of each pixel (0 = background or ignored) and each index's area in pixels."""
    person = (tree.person_labels(labels) == 1).astype(np.uint8)
    count, regions, stats, _ = cv2.connectedComponentsWithStats(person, connectivity=8)
    return regions, stats[:count, cv2.CC_STAT_AREA]


def person_regions(labels: np.ndarray, tree: Tree) -> np.ndarray:
    """Share of the image covered by each connected non-background region (8-connectivity).

    Regions under ``MIN_REGION_PIXELS`` are left out: they are stray labelled pixels.
    """
    areas = person_components(labels, tree)[1][1:]
    return areas[areas >= MIN_REGION_PIXELS] / float(labels.size)


def size_bucket(share: float) -> str:
    return next(name for name, lo, hi in SIZE_BUCKETS if lo <= share < hi)


@dataclass
class DatasetStats:
    tree: Tree
    n_images: int = 0
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height)
    leaf_pixels: np.ndarray | None = None  # pixels per leaf value, (256,)
    region_shares: list[float] = field(default_factory=list)
    skipped: list[Problem] = field(default_factory=list)

    def level_shares(self, k: int) -> dict[str, float]:
        """Share of labelled pixels per node of level ``k``."""
        assert self.leaf_pixels is not None
        level = self.tree.level(k)
        counts = np.bincount(
            level.lut[self.tree.values],
            weights=self.leaf_pixels[self.tree.values],
            minlength=len(level.nodes),
        )
        total = counts.sum() or 1.0
        return {name: float(c / total) for name, c in zip(level.names, counts, strict=True)}

    def bucket_counts(self) -> dict[str, int]:
        counts = {name: 0 for name, _, _ in SIZE_BUCKETS}
        for share in self.region_shares:
            counts[size_bucket(share)] += 1
        return counts

    def to_dict(self) -> dict:
        widths = np.array([w for w, _ in self.sizes] or [0])
        heights = np.array([h for _, h in self.sizes] or [0])

        def summary(a: np.ndarray) -> dict[str, float]:
            return {"min": int(a.min()), "median": float(np.median(a)), "max": int(a.max())}

        return {
            "tree": self.tree.name,
            "n_images": self.n_images,
            "width": summary(widths),
            "height": summary(heights),
            "levels": {str(k): self.level_shares(k) for k in range(self.tree.num_levels)},
            "person_regions": {
                "count": len(self.region_shares),
                "median_share": float(np.median(self.region_shares)) if self.region_shares else 0.0,
                "buckets": self.bucket_counts(),
            },
            "skipped": [str(p) for p in self.skipped],
        }

    def plot(self, path: str | Path) -> Path:
        """A PNG with the image sizes, the pixel share per node per level, and person sizes."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        levels = self.tree.num_levels
        fig, axes = plt.subplots(1, 2 + levels, figsize=(4.2 * (2 + levels), 4))
        ax = axes[0]
        ax.scatter([w for w, _ in self.sizes], [h for _, h in self.sizes], s=4, alpha=0.4)
        ax.set(title=f"image sizes (n={self.n_images})", xlabel="width", ylabel="height")
        ax = axes[1]
        shares = np.clip(np.asarray(self.region_shares) * 100, 1e-3, 100)
        ax.hist(shares, bins=np.logspace(-3, 2, 41), color="tab:red")
        ax.set_xscale("log")
        for _, lo, _ in SIZE_BUCKETS[1:]:
            ax.axvline(lo * 100, color="gray", ls="--", lw=0.8)
        ax.set(title="person regions", xlabel="% of image per region", ylabel="regions")
        for k in range(levels):
            ax = axes[2 + k]
            share = self.level_shares(k)
            names = [n for n in share if n != BACKGROUND]
            colors = [np.array(self.tree.color(n)) / 255 for n in names]
            ax.barh(names, [share[n] * 100 for n in names], color=colors)
            ax.invert_yaxis()
            bg = share.get(BACKGROUND, 0.0) * 100
            ax.set(title=f"level {k} pixel share (bg {bg:.1f}%)", xlabel="% of pixels")
        fig.suptitle(f"{self.tree.name}")
        fig.tight_layout()

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        publish(path, lambda tmp: fig.savefig(tmp, dpi=110))
        plt.close(fig)
        return path


def dataset_stats(dataset: Dataset, progress: Callable[[int], None] | None = None) -> DatasetStats:
    """Sizes, pixel shares and person sizes over a split; unreadable samples are listed, skipped."""
    leaf_pixels = np.zeros(256, dtype=np.int64)
    stats = DatasetStats(tree=dataset.tree, leaf_pixels=leaf_pixels)

    def one(sample: Sample) -> np.ndarray | Problem:
        try:
            return dataset.read_labels(sample)
        except ImageReadError as err:
            return Problem(err.path, err.reason)

    for labels in parallel_map(one, dataset.samples):
        if progress:
            progress(1)
        if isinstance(labels, Problem):
            stats.skipped.append(labels)
            continue
        stats.n_images += 1
        stats.sizes.append((labels.shape[1], labels.shape[0]))
        leaf_pixels += np.bincount(labels.ravel(), minlength=256)[:256]
        stats.region_shares.extend(person_regions(labels, dataset.tree).tolist())
    return stats

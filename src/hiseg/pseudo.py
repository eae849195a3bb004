"""Pseudo-labels for unlabelled photos (semi-supervised training: teacher -> labels -> student).

:func:`pseudo_label` runs a teacher (a :class:`hiseg.predictor.Predictor`: one model or an
ensemble, with its flip / scale test-time augmentation) over a folder of photos and writes, per
photo, under ``out/`` (:func:`label_photos` does the same for any other teacher):

* ``soft`` mode: ``<stem>.npz`` holding ``probs``, the (leaves, H, W) leaf probabilities at the
  photo's size, quantised to uint8 (255 = 1.0; channel i = ``tree.leaves[i]``);
* ``hard`` mode: ``<stem>.png``, the teacher's leaf label map with every uncertain pixel (highest
  leaf probability under ``threshold``) set to ``IGNORE_VALUE``, so the student never learns the
  teacher's guesses there.

``manifest.json`` records the teachers, the settings, the class tree, the photo folder and, per
photo, its label file and confident share. It is rewritten (atomically) after every batch, so a
run stopped at any point is resumed by running the same command again: photos already in the
manifest are skipped. The photos are read in place and never written.

:class:`PseudoLabels` reads such a folder back as a training set (``data.pseudo`` in a training
config). Torch-free: labelling runs on the ONNX runtime.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hiseg.data import Dataset, DatasetError, Sample, _natural_key
from hiseg.errors import HisegError
from hiseg.files import json_writer, png_writer, publish, writable_folder
from hiseg.images import IMAGE_SUFFIXES, ImageReadError, path_fault, read_mask
from hiseg.predictor import Predictor, Result
from hiseg.taxonomy import IGNORE_VALUE, Tree, TreeError

MANIFEST = "manifest.json"
MODES = ("soft", "hard")
#: Written in every manifest, so a reader knows what it holds.
FORMAT = "hiseg-pseudo-labels"
#: The manifest keys that must match for a run to continue an earlier one in the same folder.
RESUME_KEYS = ("images", "tree", "teachers", "settings")


class PseudoLabelError(HisegError, ValueError):
    """A pseudo-labelling run cannot start: bad settings, or an output folder made otherwise."""


@dataclass
class PseudoReport:
    """What a run did: photos labelled now, skipped as already done, and failed (with reasons);
    the mean confident share over every photo the folder holds labels for."""

    manifest: Path
    labelled: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (photo, reason)
    mean_confident: float | None = None


def list_photos(folder: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """The folder's photos in natural order, and those refused with the reason: a broken link
    or link loop (never skipped in silence), and a photo whose name stem another one already has
    (``a.jpg``, ``a.png``: they would share a label file)."""
    photos: dict[str, Path] = {}
    refused = []
    named = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    for path in sorted(named, key=lambda p: _natural_key(p.name)):
        if fault := path_fault(path):
            refused.append((str(path), fault))
        elif not path.is_file():
            continue  # not a regular file (a folder, a pipe)
        elif path.stem in photos:
            refused.append((str(path), f"same name stem as {photos[path.stem].name}; skipped"))
        else:
            photos[path.stem] = path
    return list(photos.values()), refused


def confident_share(probs: np.ndarray, threshold: float) -> float:
    """Share of pixels whose highest leaf probability reaches ``threshold``."""
    return float((probs.max(axis=0) >= threshold).mean())


def hard_labels(result: Result, threshold: float) -> np.ndarray:
    """The teacher's leaf labels, ``IGNORE_VALUE`` where its highest leaf probability is under
    ``threshold`` (the uncertain band, mostly along boundaries)."""
    labels = result.labels.copy()
    labels[result.probs.max(axis=0) < threshold] = IGNORE_VALUE
    return labels


def quantise(probs: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] -> uint8 (255 = 1): a quarter of float32's size, then compressed."""
    return np.rint(np.clip(probs, 0, 1) * 255).astype(np.uint8)


def npz_writer(probs: np.ndarray) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        np.savez_compressed(tmp, probs=probs)

    return write


def teacher_records(predictor: Predictor) -> list[dict[str, Any]]:
    """Each teacher model's file and what its spec says it is."""
    return [
        {
            "file": str(Path(b.name).resolve()),
            "arch": b.spec.arch,
            "encoder": b.spec.encoder,
            "tree": b.spec.tree.name,
            "long_side": b.spec.long_side,
        }
        for b in predictor.backends
    ]


def pseudo_label(
    predictor: Predictor,
    photos: Path,
    out: Path,
    mode: str = "soft",
    threshold: float = 0.9,
    limit: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> PseudoReport:
    """Label every photo of ``photos`` (the first ``limit``) with ``predictor`` into ``out``.

    A photo that cannot be read is reported in the result and the manifest, and the run goes
    on. Photos already labelled by an earlier run with the same teachers and settings are
    skipped; an ``out`` made with others is refused (never mixed). ``progress(n)`` is called as
    photos finish (skipped ones included).
    """
    settings = {
        "flip": predictor.flip,
        "scales": list(predictor.scales),
        "long_side": predictor.long_side,
        "clean": predictor.clean,
    }
    teachers = teacher_records(predictor)
    return label_photos(
        predictor.predict_batch,
        predictor.tree,
        teachers,
        settings,
        photos,
        out,
        mode=mode,
        threshold=threshold,
        limit=limit,
        progress=progress,
        batch_size=predictor.batch_size,
    )


def label_photos(
    label_batch: Callable[[list[Path]], list[Result | HisegError]],
    tree: Tree,
    teachers: list[dict[str, Any]],
    settings: dict[str, Any],
    photos: Path,
    out: Path,
    mode: str = "soft",
    threshold: float = 0.9,
    limit: int | None = None,
    progress: Callable[[int], None] | None = None,
    batch_size: int = 1,
) -> PseudoReport:
    """:func:`pseudo_label` for any teacher: ``label_batch(paths)`` gives each photo's
    :class:`Result` (leaf probabilities of ``tree``) or its error, e.g. a blend with a model that
    is not a hiseg one (benchmarks/mediapipe_teacher.py). ``teachers`` and ``settings`` describe
    it in the manifest, beside ``mode`` and ``threshold``, and decide whether a run resumes."""
    if mode not in MODES:
        raise PseudoLabelError(f"unknown mode '{mode}' (known: {', '.join(MODES)})")
    if not 0 < threshold <= 1:
        raise PseudoLabelError(f"threshold must be above 0 and at most 1, not {threshold}")
    if not photos.is_dir():
        raise PseudoLabelError(f"{photos}: no such folder of photos")
    if out.resolve() == photos.resolve():
        raise PseudoLabelError(f"{out}: the output folder is the photo folder; choose another")
    writable_folder(out, "output folder")
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "images": str(photos.resolve()),
        "tree": tree.to_dict(),
        "teachers": teachers,
        "settings": {"mode": mode, "threshold": threshold, **settings},
        "labels": {},
        "failed": [],
    }
    manifest = json.loads(json.dumps(manifest))  # as read back: e.g. value_map keys are text
    path = out / MANIFEST
    if path.exists():
        earlier = read_manifest(out)
        for key in RESUME_KEYS:
            if earlier[key] != manifest[key]:
                raise PseudoLabelError(
                    f"{path}: made with other {_difference(key, earlier[key], manifest[key])}; "
                    "continue it with the same teachers and settings, or choose another folder"
                )
        # labels whose file was lost (e.g. deleted) are made again
        manifest["labels"] = {
            stem: entry
            for stem, entry in earlier["labels"].items()
            if (out / entry["file"]).exists()
        }
    found, refused = list_photos(photos)
    if limit is not None:  # and the refusals among the names it reaches, not beyond
        found = found[:limit]
        last = _natural_key(found[-1].name) if found else None
        refused = [r for r in refused if last and _natural_key(Path(r[0]).name) < last]
    report = PseudoReport(path, failed=list(refused))
    todo = []
    for photo in found:
        entry = manifest["labels"].get(photo.stem)
        if entry and entry["image"] == photo.name:
            report.skipped += 1
        else:
            todo.append(photo)
    if progress and report.skipped:
        progress(report.skipped)
    suffix = ".npz" if mode == "soft" else ".png"
    if not path.exists():  # a fresh run: every file it would replace belongs to someone else
        taken = [out / f"{p.stem}{suffix}" for p in todo if (out / f"{p.stem}{suffix}").exists()]
        if taken:
            raise PseudoLabelError(
                f"{taken[0]}: exists, and no {MANIFEST} says a pseudo-label run wrote it "
                f"({len(taken)} such file(s)); choose an empty folder"
            )

    def save_manifest() -> None:
        manifest["failed"] = [{"image": p, "reason": r} for p, r in report.failed]
        publish(path, json_writer(manifest))

    save_manifest()  # before any label, so a run killed at once is resumed, not refused
    try:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            for photo, result in zip(chunk, label_batch(chunk), strict=True):
                if isinstance(result, HisegError):
                    reason = result.reason if isinstance(result, ImageReadError) else str(result)
                    report.failed.append((str(photo), reason))
                    manifest["labels"].pop(photo.stem, None)
                else:
                    target = out / f"{photo.stem}{suffix}"
                    probs = result.probs
                    if mode == "soft":
                        publish(target, npz_writer(quantise(probs)))
                    else:
                        publish(target, png_writer(hard_labels(result, threshold)))
                    manifest["labels"][photo.stem] = {
                        "image": photo.name,
                        "file": target.name,
                        "confident": round(confident_share(probs, threshold), 5),
                    }
                    report.labelled += 1
            save_manifest()
            if progress:
                progress(len(chunk))
    finally:  # also when stopped (Ctrl-C): what is done stays listed
        save_manifest()
    shares = [entry["confident"] for entry in manifest["labels"].values()]
    report.mean_confident = float(np.mean(shares)) if shares else None
    return report


def _difference(key: str, earlier: Any, now: Any, width: int = 100) -> str:
    """``settings (mode: "hard", not "soft")``: the first differing entry, shortened."""
    if isinstance(earlier, dict) and isinstance(now, dict):
        for name in sorted(earlier.keys() | now.keys()):
            if earlier.get(name) != now.get(name):
                key, earlier, now = f"{key} ({name}", earlier.get(name), now.get(name)
                break
    texts = [json.dumps(v) for v in (earlier, now)]
    a, b = (t if len(t) <= width else t[: width - 3] + "..." for t in texts)
    close = ")" if "(" in key else ""
    return f"{key}: {a}, not {b}{close}"


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of a pseudo-label folder, checked enough to read labels by it."""
    path = root / MANIFEST
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder of pseudo-labels")
    if not path.is_file():
        raise DatasetError(f"{root}: no {MANIFEST}; make pseudo-labels with `hiseg pseudo-label`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DatasetError(f"{path}: not a manifest of `hiseg pseudo-label`")
    missing = [k for k in (*RESUME_KEYS, "labels") if k not in manifest]
    settings = manifest.get("settings")
    if missing or not isinstance(settings, dict) or settings.get("mode") not in MODES:
        raise DatasetError(f"{path}: incomplete manifest (missing {missing or ['settings.mode']})")
    if not isinstance(manifest["images"], str) or not isinstance(manifest["labels"], dict):
        raise DatasetError(f"{path}: 'images' must be a folder and 'labels' an object")
    for stem, entry in manifest["labels"].items():
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("image"), str)
            and isinstance(entry.get("file"), str)
            and isinstance(entry.get("confident"), int | float)
        ):
            raise DatasetError(
                f"{path}: labels entry '{stem}' needs 'image', 'file' and 'confident' "
                f"(got {entry!r})"
            )
    return manifest


class PseudoLabels(Dataset):
    """A folder written by :func:`pseudo_label`, read as a dataset: the photos (in place, from
    ``images`` or the folder its manifest names) and their labels. ``read_labels`` gives a hard
    folder's leaf label map (uncertain pixels ``IGNORE_VALUE``) or a soft folder's (leaves, H, W)
    uint8 probabilities."""

    format = "pseudo-labels"

    def __init__(self, root: str | Path, images: str | Path | None = None):
        root = Path(root)
        self.manifest = read_manifest(root)
        self.mode: str = self.manifest["settings"]["mode"]
        self.images = Path(images if images is not None else self.manifest["images"])
        if not self.images.is_dir():
            raise DatasetError(f"{self.images}: no such folder (the photos of {root})")
        try:
            tree = Tree.from_dict(self.manifest["tree"], source=str(root / MANIFEST))
        except TreeError as err:
            raise DatasetError(f"{root / MANIFEST}: bad tree ({err})") from None
        super().__init__(root, "all", tree)

    def _list_samples(self) -> list[Sample]:
        return [
            Sample(stem, self.images / entry["image"], self.root / entry["file"])
            for stem, entry in self.manifest["labels"].items()
        ]

    def read(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        image, labels = super().read(sample)
        if labels.shape[-2:] != image.shape[:2]:
            raise ImageReadError(
                sample.mask_path or sample.id,
                f"labels are {labels.shape[-1]}x{labels.shape[-2]} but the photo "
                f"{image.shape[1]}x{image.shape[0]}",
            )
        return image, labels

    def read_labels(self, sample: Sample) -> np.ndarray:
        path = sample.mask_path
        if path is None:
            raise ImageReadError(sample.id, "no pseudo-label file")
        if self.mode == "hard":
            # Raw values, not encode_mask: a person tree maps 255 to 'person', here it is ignore.
            raw = read_mask(path)
            return np.where(np.isin(raw, self.tree.values), raw, IGNORE_VALUE).astype(np.uint8)
        try:
            with np.load(path, allow_pickle=False) as archive:
                probs = archive["probs"]
        except (OSError, ValueError, KeyError) as err:
            raise ImageReadError(path, f"not a soft pseudo-label file ({err})") from None
        if probs.dtype != np.uint8 or probs.ndim != 3 or len(probs) != self.tree.num_leaves:
            raise ImageReadError(
                path,
                f"holds {probs.dtype} {probs.shape}; tree '{self.tree.name}' needs uint8 "
                f"({self.tree.num_leaves}, H, W)",
            )
        return probs

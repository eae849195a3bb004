"""Scoring predictions against a dataset split with the hierarchical metrics.

Either score a folder of predicted label maps (:func:`score_prediction_dir`) or run a model over
the split (:func:`evaluate_model`), which also scores each person-size bucket and keeps the worst
images for the report.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from hiseg.data import (
    MIN_REGION_PIXELS,
    SIZE_BUCKETS,
    Dataset,
    Sample,
    parallel_map,
    person_components,
    person_regions,
    size_bucket,
)
from hiseg.errors import HisegError
from hiseg.files import png_writer, publish
from hiseg.images import ImageReadError, read_mask
from hiseg.metrics import ConfusionMatrix
from hiseg.taxonomy import Tree, load_tree

if TYPE_CHECKING:
    from hiseg.predictor import Predictor

BUCKET_NAMES = [name for name, _, _ in SIZE_BUCKETS]


class EvaluationError(HisegError, ValueError):
    """Predictions cannot be scored (missing files, wrong sizes, unknown values)."""


def score_prediction_dir(
    dataset: Dataset, pred_dir: str | Path, progress: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """Score ``<pred_dir>/<id>.png`` leaf label maps against every sample of ``dataset``.

    Any model's output can be scored this way. Every missing or malformed prediction, and every
    ground-truth mask with values outside the tree (which would otherwise be silently ignored),
    is named in one :class:`EvaluationError`, before any score is reported.
    """
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise EvaluationError(f"{pred_dir}: no such folder of predictions")
    missing = [s.id for s in dataset.samples if not (pred_dir / f"{s.id}.png").is_file()]
    if missing:
        shown = ", ".join(missing[:20]) + (
            f", ... ({len(missing)} in all)" if len(missing) > 20 else ""
        )
        raise EvaluationError(f"{pred_dir}: no prediction <id>.png for id(s) {shown}")
    tree = dataset.tree

    def one(sample: Sample) -> tuple[ConfusionMatrix | None, list[str]]:
        """The sample's matrix, or None and every problem of its prediction and mask."""
        path = pred_dir / f"{sample.id}.png"
        problems, target, pred = [], None, None
        try:
            if sample.mask_path is None:
                raise ImageReadError(sample.image_path or sample.id, "no ground-truth mask")
            raw = read_mask(sample.mask_path)
            unknown = tree.unknown_values(raw)
            if unknown:
                problems.append(
                    f"{sample.mask_path}: ground-truth values {unknown} are not in tree "
                    f"'{tree.name}' (leaf values: {tree.values})"
                )
            target = tree.encode_mask(raw)
        except ImageReadError as err:
            problems.append(str(err))
        try:
            pred = read_mask(path).astype(np.int64)
        except ImageReadError as err:
            problems.append(str(err))
        if pred is not None:
            outside = np.unique(pred[tree.leaf_index(pred) < 0]).tolist()
            if outside:
                problems.append(
                    f"{path}: values {outside} are not leaf values of tree '{tree.name}' "
                    f"({tree.values})"
                )
            elif target is not None and pred.shape != target.shape:
                problems.append(
                    f"{path}: prediction is {pred.shape[1]}x{pred.shape[0]}, "
                    f"ground truth is {target.shape[1]}x{target.shape[0]}"
                )
        if problems or target is None or pred is None:
            return None, problems
        cm = ConfusionMatrix(tree)
        cm.update(target, pred)
        return cm, []

    total = ConfusionMatrix(tree)
    problems: list[str] = []
    for cm, found in parallel_map(one, dataset.samples):
        problems.extend(found)
        if cm is not None:
            total.merge(cm)
        if progress:
            progress(1)
    if problems:
        raise EvaluationError(f"{len(problems)} problem(s): " + "; ".join(problems))
    return total.scores()


# -- running a model over a split ---------------------------------------------------------------


@dataclass
class Example:
    """One scored image, kept whole for the gallery of worst images."""

    id: str
    miou: float
    image: np.ndarray
    target: np.ndarray
    pred: np.ndarray


@dataclass
class EvalResult:
    """Everything :func:`evaluate_model` measured; :meth:`scores` is the JSON-ready summary."""

    total: ConfusionMatrix
    by_size: dict[str, ConfusionMatrix]
    regions: dict[str, int]  # ground-truth person regions per size bucket
    image_miou: dict[str, float | None] = field(default_factory=dict)
    worst: list[Example] = field(default_factory=list)  # worst first

    @property
    def tree(self) -> Tree:
        return self.total.tree

    def scores(self) -> dict[str, Any]:
        """:meth:`ConfusionMatrix.scores` of the split, plus ``by_size`` (the same dict per
        bucket, with its region count) and ``worst`` (ids and mIoU, worst first)."""
        out = self.total.scores()
        out["by_size"] = {
            name: {"regions": self.regions[name], **cm.scores()}
            for name, cm in self.by_size.items()
        }
        out["worst"] = [{"id": e.id, "miou": e.miou} for e in self.worst]
        return out


def size_bucket_map(target: np.ndarray, pred: np.ndarray, tree: Tree) -> np.ndarray:
    """(H, W) index into ``SIZE_BUCKETS`` of the bucket each pixel is scored in; -1 for none.

    A pixel of a ground-truth person region (a connected body region, as in
    :func:`hiseg.data.person_regions`) belongs to its region's size bucket. A pixel the prediction
    calls body where the ground truth says background belongs to the bucket of the nearest
    ground-truth region: a false positive is charged to the person it most likely spills from.
    True background, ignored pixels and specks under ``MIN_REGION_PIXELS`` are in no bucket, so a
    bucket's IoU measures how well people of that size are found and parsed, errors around them
    included, without the large background of the image swamping small people.
    """
    bg = tree.background.value
    regions, areas = person_components(target, tree)
    lut = np.full(len(areas), -1, np.int8)
    for i, area in enumerate(areas[1:], start=1):
        if area >= MIN_REGION_PIXELS:
            lut[i] = BUCKET_NAMES.index(size_bucket(area / target.size))
    out = lut[regions]
    spill = (pred != bg) & (target == bg)
    if spill.any() and (out >= 0).any():
        _, nearest = cv2.distanceTransformWithLabels(
            (out < 0).astype(np.uint8), cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_CCOMP
        )
        owner = np.full(nearest.max() + 1, -1, np.int8)
        owner[nearest[out >= 0]] = out[out >= 0]
        out[spill] = owner[nearest[spill]]
    return out


def evaluate_model(
    predictor: Predictor,
    dataset: Dataset,
    limit: int | None = None,
    progress: Callable[[int], None] | None = None,
    keep_worst: int = 8,
    save_dir: str | Path | None = None,
) -> EvalResult:
    """Run ``predictor`` on the split's first ``limit`` samples and score it.

    Returns one confusion matrix over the split (the same scores as ``hiseg eval --pred-dir``),
    one per person-size bucket (see :func:`size_bucket_map`), each image's mIoU at the finest
    level, and the ``keep_worst`` images of lowest mIoU. With ``save_dir``, each prediction is
    also written as ``<id>.png`` so it can be rescored or inspected (never into the split's own
    image or mask folder, whose ``<id>.png`` masks it would replace).

    A model whose tree differs from the dataset's (a part model on person masks, or the
    reverse) is scored at the level both share: person vs background, in the ``person`` tree.
    """
    same_tree = predictor.tree.same_as(dataset.tree)
    tree = dataset.tree if same_tree else load_tree("person")
    target_labels, pred_labels = dataset.tree.relabeller(tree), predictor.tree.relabeller(tree)
    result = EvalResult(
        total=ConfusionMatrix(tree),
        by_size={name: ConfusionMatrix(tree) for name in BUCKET_NAMES},
        regions=dict.fromkeys(BUCKET_NAMES, 0),
    )
    if save_dir is not None:
        save_dir = Path(save_dir)
        folders = {p.parent for s in dataset.samples for p in (s.image_path, s.mask_path) if p}
        if save_dir.resolve() in {folder.resolve() for folder in folders}:  # <id>.png: a mask
            raise EvaluationError(
                f"{save_dir}: holds the split's images or masks; save predictions elsewhere"
            )
        save_dir.mkdir(parents=True, exist_ok=True)
    kept: list[tuple[float, int, Example]] = []  # max-heap on mIoU via negation
    for i, sample in enumerate(dataset.samples[:limit]):
        try:
            image, target = dataset.read(sample)  # reads values outside the tree as ignored
            unknown = dataset.tree.unknown_values(read_mask(sample.mask_path or ""))
        except ImageReadError as err:
            raise EvaluationError(str(err)) from None
        if unknown:  # scored as ignored, they would leave wrong masks unnoticed
            raise EvaluationError(
                f"{sample.mask_path}: ground-truth values {unknown} are not in tree "
                f"'{dataset.tree.name}' (leaf values: {dataset.tree.values}); "
                "`hiseg data check` lists every such mask"
            )
        pred = predictor.predict(image).labels
        target, pred = target_labels(target), pred_labels(pred)
        if save_dir is not None:
            publish(save_dir / f"{sample.id}.png", png_writer(pred))
        try:
            miou = _score_image(result, target, pred, tree)
        except ValueError as err:  # e.g. a mask whose size differs from its image
            raise EvaluationError(f"{sample.mask_path}: {err}") from None
        result.image_miou[sample.id] = miou
        if miou is not None and keep_worst > 0:
            heapq.heappush(kept, (-miou, i, Example(sample.id, miou, image, target, pred)))
            if len(kept) > keep_worst:
                heapq.heappop(kept)
        if progress:
            progress(1)
    result.worst = [e for _, _, e in sorted(kept, key=lambda t: (-t[0], t[1]))]
    return result


def _score_image(
    result: EvalResult, target: np.ndarray, pred: np.ndarray, tree: Tree
) -> float | None:
    """Add one image to every matrix of ``result``; return its finest-level mIoU."""
    image = ConfusionMatrix(tree)
    image.update(target, pred)
    result.total.merge(image)
    buckets = size_bucket_map(target, pred, tree)
    for b, name in enumerate(BUCKET_NAMES):
        inside = buckets == b
        if inside.any():
            result.by_size[name].update(target[inside], pred[inside])
    for share in person_regions(target, tree):
        result.regions[size_bucket(share)] += 1
    return image.scores()["levels"][str(tree.num_levels - 1)]["miou"]

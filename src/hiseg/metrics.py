"""Hierarchical segmentation metrics from one confusion matrix accumulated over a whole split.

The leaf-level confusion matrix is the only state; every level's matrix is derived from it by
summing the rows and columns of the leaves under each node, so levels can never disagree. Scores
follow the task's definition:

* per level, IoU per node; ``miou`` = mean over the non-background nodes;
* a node absent from both ground truth and prediction has an undefined IoU (NaN): it is left out
  of every mean, never counted as 0 or 1;
* ``miou_all_with_background``: the literature's mean IoU over all leaf classes, background in;
* ``pixel_accuracy`` over labelled pixels; Dice/F1 per node (for binary trees: of the foreground).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from hiseg.taxonomy import BACKGROUND, IGNORE_VALUE, Tree


class ConfusionMatrix:
    """Leaf-level confusion counts, rows = ground truth, columns = prediction."""

    def __init__(self, tree: Tree):
        self.tree = tree
        self.matrix = np.zeros((tree.num_leaves, tree.num_leaves), dtype=np.int64)
        self.n_images = 0

    def update(self, target: np.ndarray, pred: np.ndarray) -> None:
        """Add one image: leaf-value label maps of equal shape. Target pixels marked ignore skip."""
        if target.shape != pred.shape:
            raise ValueError(f"target shape {target.shape} != prediction shape {pred.shape}")
        t = np.asarray(target, dtype=np.int64).ravel()
        p = np.asarray(pred, dtype=np.int64).ravel()
        valid = t != IGNORE_VALUE
        t, p = t[valid], p[valid]
        ti, pi = self.tree.leaf_index(t), self.tree.leaf_index(p)
        for name, values, index in (("target", t, ti), ("prediction", p, pi)):
            if (index < 0).any():
                raise ValueError(
                    f"{name} holds values outside tree '{self.tree.name}': "
                    f"{np.unique(values[index < 0]).tolist()} (leaf values: {self.tree.values})"
                )
        n = self.tree.num_leaves
        self.matrix += np.bincount(ti * n + pi, minlength=n * n).reshape(n, n)
        self.n_images += 1

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add ``other``'s counts (another worker's or process's images) to this matrix: the
        scores of the merged matrix are those of one matrix over all their images, unlike any
        mean of their scores. Both must count the same tree's leaves."""
        if not self.tree.same_as(other.tree):
            raise ValueError(
                f"cannot merge a confusion matrix of tree '{other.tree.name}' into one of "
                f"'{self.tree.name}'"
            )
        self.matrix += other.matrix
        self.n_images += other.n_images
        return self

    def level_matrix(self, k: int) -> np.ndarray:
        """Confusion between the nodes of level ``k``: leaf rows/columns summed per node."""
        members = self.tree.membership(k).astype(np.int64)
        return members.T @ self.matrix @ members

    def scores(self) -> dict[str, Any]:
        """All scores as the JSON-ready dict that ``hiseg eval`` writes."""
        levels = {}
        for k in range(self.tree.num_levels):
            level = self.tree.level(k)
            iou, dice = iou_dice(self.level_matrix(k))
            levels[str(k)] = {
                "miou": nanmean(
                    [v for n, v in zip(level.names, iou, strict=True) if n != BACKGROUND]
                ),
                "iou": {n: none_if_nan(v) for n, v in zip(level.names, iou, strict=True)},
                "dice": {n: none_if_nan(v) for n, v in zip(level.names, dice, strict=True)},
            }
        leaf_iou, leaf_dice = iou_dice(self.matrix)
        total = self.matrix.sum()
        out: dict[str, Any] = {
            "tree": self.tree.name,
            "levels": levels,
            "miou_all_with_background": nanmean(leaf_iou),
            "pixel_accuracy": float(np.trace(self.matrix) / total) if total else None,
            "n_images": self.n_images,
            "n_pixels": int(total),
        }
        if self.tree.is_binary:
            fg = next(i for i, leaf in enumerate(self.tree.leaves) if leaf.name != BACKGROUND)
            out["iou"] = none_if_nan(leaf_iou[fg])
            out["dice"] = none_if_nan(leaf_dice[fg])
        return out


def iou_dice(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class IoU and Dice from a confusion matrix; NaN where a class is absent from both."""
    tp = np.diag(matrix).astype(np.float64)
    fp = matrix.sum(axis=0) - tp
    fn = matrix.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (tp + fp + fn)
        dice = 2 * tp / (2 * tp + fp + fn)
    return iou, dice


def nanmean(values) -> float | None:
    """Mean of the defined values; None when none is defined."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(sum(vals) / len(vals)) if vals else None


def none_if_nan(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def format_score(value: float | None) -> str:
    """A score as printed in tables and reports: 4 decimals, ``n/a`` for a class never seen."""
    return "n/a" if value is None else f"{value:.4f}"

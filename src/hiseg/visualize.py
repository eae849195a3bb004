"""Colouring label maps: per-node colours from the class tree, overlays on the photo."""

from __future__ import annotations

import cv2
import numpy as np

from hiseg.taxonomy import Tree


def colorize(labels: np.ndarray, tree: Tree, level: int | None = None) -> np.ndarray:
    """Leaf label map -> RGB image, coloured by leaf or by the node at ``level``."""
    return tree.palette(level)[labels]


def overlay(
    image: np.ndarray, labels: np.ndarray, tree: Tree, level: int | None = None, alpha: float = 0.55
) -> np.ndarray:
    """The RGB uint8 photo with the coloured labels blended (weight ``alpha``) over every
    non-background pixel, a new array. In uint8 with OpenCV and only inside the box around the
    labelled pixels: a video's writer thread draws one per frame, and the float blend took longer
    than the network (this one is within 1 of it, equal on the background)."""
    out = image.copy()
    labels = labels.astype(np.uint8, copy=False)
    x, y, w, h = cv2.boundingRect((labels != tree.background.value).view(np.uint8))
    if w == 0:
        return out
    box = np.s_[y : y + h, x : x + w]
    leaves = labels[box]
    colours = cv2.LUT(cv2.merge([leaves, leaves, leaves]), tree.palette(level)[:, None])
    blended = cv2.addWeighted(image[box], 1 - alpha, colours, alpha, 0.0)
    background = (leaves == tree.background.value).view(np.uint8)
    out[box] = cv2.copyTo(image[box], background, blended)
    return out


def legend_panel(tree: Tree, names: list[str], height: int) -> np.ndarray:
    """A white column listing ``names`` with their colours, as tall as the image (rows past
    its bottom are cut)."""
    scale = max(0.4, min(1.0, height / 600))
    row = int(28 * scale)
    width = int(150 * scale)
    panel = np.full((height, width, 3), 255, np.uint8)
    for i, name in enumerate(names):
        y = row * (i + 1)
        cv2.rectangle(panel, (6, y - row + 8), (6 + row - 10, y - 2), tree.color(name), -1)
        cv2.putText(
            panel,
            name,
            (row + 2, y - 6),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.5 * scale,
            (0, 0, 0),
            1,
            cv2.LINE_AA,
        )
    return panel


def overlay_with_legend(
    image: np.ndarray,
    labels: np.ndarray,
    tree: Tree,
    level: int | None = None,
    legend: bool = True,
) -> np.ndarray:
    """:func:`overlay` plus, on the right, a legend of the nodes shown (leaves or ``level``)."""
    out = overlay(image, labels, tree, level)
    if not legend:
        return out
    names = tree.level(level if level is not None else -1).names
    panel = legend_panel(tree, [n for n in names if n != tree.background.name], out.shape[0])
    return np.concatenate([out, panel], axis=1)

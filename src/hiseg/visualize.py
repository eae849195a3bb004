"""Colouring label maps: per-node colours from the class tree, overlays on the photo."""

from __future__ import annotations

import numpy as np

from hiseg.taxonomy import Tree


def colorize(labels: np.ndarray, tree: Tree, level: int | None = None) -> np.ndarray:
    """Leaf label map -> RGB image, coloured by leaf or by the node at ``level``."""
    return tree.palette(level)[labels]


def overlay(
    image: np.ndarray, labels: np.ndarray, tree: Tree, level: int | None = None, alpha: float = 0.55
) -> np.ndarray:
    """The photo with the coloured labels blended over every non-background pixel."""
    colours = colorize(labels, tree, level).astype(np.float32)
    out = image.astype(np.float32)
    fg = (labels != tree.background.value)[..., None]
    out = np.where(fg, (1 - alpha) * out + alpha * colours, out)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)

"""Optional clean-up of a prediction: small islands removed and small holes filled, per level.

One mechanism serves both: at each level, top-down, a connected region of one node smaller than
``min_pixels`` is re-decided as if that node were impossible there (its leaves' probabilities set
to zero), so the pixels go to the likeliest other node, consistently with the tree. A background
region counts as a hole only when it does not touch the image border.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np

from hiseg.taxonomy import Tree

if TYPE_CHECKING:
    from hiseg.pipeline import Probabilities


def clean_labels(
    probs: np.ndarray | Probabilities, labels: np.ndarray, tree: Tree, min_pixels: int
) -> np.ndarray:
    """``labels`` with regions under ``min_pixels`` re-decided without their node; ``probs`` is
    read only on those regions (``probs[:, mask]``), so lazy probabilities stay cheap."""
    labels = labels.copy()
    h, w = labels.shape
    for level in tree.levels:
        lut = level.lut.astype(np.int16)  # a lookup 4x cheaper than through the int64 table
        nodes = lut[labels]
        for j, node in enumerate(level.nodes):
            mask = (nodes == j).view(np.uint8)
            _, regions, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
            x, y, bw, bh, area = stats.T
            touches_border = (x == 0) | (y == 0) | (x + bw == w) | (y + bh == h)
            is_hole = ~touches_border if node is tree.background else True
            small = (area < min_pixels) & is_hole
            small[0] = False  # label 0: the pixels outside this node
            if not small[1:].any():
                continue
            where = small[regions]
            suppressed = probs[:, where].copy()
            suppressed[tree.leaf_index(np.array([leaf.value for leaf in node.leaves()]))] = 0
            labels[where] = tree.decode(suppressed[:, :, None])[:, 0]
            nodes = lut[labels]
    return labels

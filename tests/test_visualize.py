"""Overlays: the uint8 blend is the float blend within 1, and the photo itself on the background."""

from __future__ import annotations

import numpy as np
import pytest

from hiseg.taxonomy import load_tree
from hiseg.visualize import overlay

TREE = load_tree("pascal-person-part")
BACKGROUND = TREE.background.value
LEAVES = np.array([leaf.value for leaf in TREE.leaves], np.uint8)


def float_blend(image: np.ndarray, labels: np.ndarray, level: int | None, alpha: float):
    """The exact blend, rounded half up: the photo on the background, else
    ``(1 - alpha) * photo + alpha * colour``."""
    colours = TREE.palette(level)[labels].astype(np.float64)
    blended = np.floor((1 - alpha) * image + alpha * colours + 0.5)
    return np.where((labels != BACKGROUND)[..., None], blended, image)


def label_maps(rng: np.random.Generator, h: int, w: int) -> dict[str, np.ndarray]:
    """Everywhere labelled, a few scattered pixels, only the two far corners, none."""
    dense = rng.choice(LEAVES, (h, w))
    sparse = np.where(rng.random((h, w)) < 0.02, dense, BACKGROUND).astype(np.uint8)
    corners = np.full((h, w), BACKGROUND, np.uint8)
    corners[0, 0], corners[-1, -1] = LEAVES[1], LEAVES[-1]
    return {
        "dense": dense,
        "sparse": sparse,
        "corners": corners,
        "none": np.full((h, w), BACKGROUND, np.uint8),
    }


@pytest.mark.parametrize(("alpha", "level"), [(0.55, None), (0.3, 0), (0.9, 1), (1.0, None)])
def test_overlay_is_the_float_blend_within_one_and_the_photo_on_the_background(alpha, level):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (61, 83, 3), dtype=np.uint8)
    before = image.copy()
    for name, labels in label_maps(rng, *image.shape[:2]).items():
        out = overlay(image, labels, TREE, level, alpha)
        exact = float_blend(image, labels, level, alpha)
        assert out.dtype == np.uint8 and out.shape == image.shape
        difference = np.abs(out.astype(np.int16) - exact)
        assert difference.max() <= 1, name
        assert (difference == 0).mean() > 0.95, name  # off by one only near halves
        background = labels == BACKGROUND
        np.testing.assert_array_equal(out[background], image[background], err_msg=name)
        assert not np.shares_memory(out, image)
    np.testing.assert_array_equal(image, before)


def test_overlay_blends_the_node_colour_with_its_weight():
    """Numbers worked out by hand: head is (255, 215, 0) as a leaf, body (220, 20, 60) at level
    0; the photo pixel is (100, 40, 220)."""
    image = np.tile(np.array([100, 40, 220], np.uint8), (2, 3, 1))
    labels = np.full((2, 3), BACKGROUND, np.uint8)
    labels[1, 1] = TREE.nodes["head"].value
    assert TREE.color("head") == (255, 215, 0) and TREE.color("body") == (220, 20, 60)
    cases = {
        (None, 0.55): [185, 136, 99],  # 0.45 * photo + 0.55 * head
        (None, 0.2): [131, 75, 176],  # 0.8 * photo + 0.2 * head
        (0, 0.25): [130, 35, 180],  # 0.75 * photo + 0.25 * body
    }
    for (level, alpha), expected in cases.items():
        out = overlay(image, labels, TREE, level, alpha)
        assert out[1, 1].tolist() == expected, (level, alpha)
        others = np.ones((2, 3), bool)
        others[1, 1] = False
        assert (out[others] == [100, 40, 220]).all(), (level, alpha)

"""The clean-up (``hiseg.postprocess.clean_labels``) against the plain implementation it replaced:
the same labels byte for byte on random maps (many tiny regions, a few large ones, holes on and
off the border, absent nodes), for flat and deep trees, full-size and lazy probabilities."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from hiseg.pipeline import Geometry, Probabilities, softmax
from hiseg.postprocess import clean_labels
from hiseg.taxonomy import Tree, load_tree

#: Four levels, a shallow leaf beside deep ones, background not 0 and values out of order.
DEEP = Tree.from_dict(
    {
        "name": "deep",
        "nodes": [
            {"name": "background", "value": 3},
            {"name": "thing", "value": 7},
            {
                "name": "a",
                "children": [
                    {"name": "a1", "value": 0},
                    {
                        "name": "a2",
                        "children": [
                            {"name": "a21", "value": 5},
                            {
                                "name": "a22",
                                "children": [
                                    {"name": "a221", "value": 1},
                                    {"name": "a222", "value": 2},
                                ],
                            },
                        ],
                    },
                ],
            },
        ],
    }
)
TREES = [load_tree("pascal-person-part"), load_tree("person"), DEEP]


def reference_clean(probs, labels: np.ndarray, tree: Tree, min_pixels: int) -> np.ndarray:
    """The clean-up as first written: every node's regions, with OpenCV's statistics, at full
    size, on a node map rebuilt after every change."""
    labels = labels.copy()
    h, w = labels.shape
    for level in tree.levels:
        nodes = level.lut[labels]
        for j, node in enumerate(level.nodes):
            mask = (nodes == j).astype(np.uint8)
            _, regions, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
            x, y, bw, bh, area = stats.T
            touches_border = (x == 0) | (y == 0) | (x + bw == w) | (y + bh == h)
            is_hole = ~touches_border if node is tree.background else True
            small = (area < min_pixels) & is_hole
            small[0] = False
            if not small[1:].any():
                continue
            where = small[regions]
            suppressed = np.asarray(probs)[:, where].copy()
            suppressed[tree.leaf_index([leaf.value for leaf in node.leaves()])] = 0
            labels[where] = tree.decode(suppressed[:, :, None])[:, 0]
            nodes = level.lut[labels]
    return labels


def random_probs(rng: np.random.Generator, leaves: int, h: int, w: int) -> np.ndarray:
    """Smooth random logits (regions of many sizes) plus pixel noise (specks), softmaxed."""
    coarse = rng.normal(size=(rng.integers(2, 9), rng.integers(2, 9), leaves)).astype(np.float32)
    logits = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC).reshape(h, w, leaves)
    logits = logits.transpose(2, 0, 1) * rng.uniform(2, 8)
    logits += rng.normal(scale=rng.uniform(0, 1.5), size=logits.shape).astype(np.float32)
    return softmax(logits)


@pytest.mark.parametrize("tree", TREES, ids=lambda t: t.name)
def test_clean_labels_equal_the_reference_on_random_maps(tree):
    rng = np.random.default_rng(17)
    for trial in range(40):
        h, w = (int(v) for v in rng.integers(3, 70, size=2))
        probs = random_probs(rng, tree.num_leaves, h, w)
        labels = tree.decode(probs)
        if trial % 3 == 0:  # labels that are not the probabilities' argmax: specks anywhere
            specks = rng.random((h, w)) < 0.05
            labels[specks] = rng.choice(tree.values, size=int(specks.sum()))
        if trial % 7 == 0:  # one node everywhere, or all but a corner
            labels[:] = tree.values[trial % tree.num_leaves]
            labels[: h // 3, : w // 3] = tree.values[0]
        min_pixels = int(rng.choice([0, 1, 2, 5, 20, 80, 400, 10_000]))
        want = reference_clean(probs, labels, tree, min_pixels)
        got = clean_labels(probs, labels, tree, min_pixels)
        assert got.dtype == labels.dtype
        np.testing.assert_array_equal(got, want, err_msg=f"trial {trial}, {h}x{w}, {min_pixels}")


@pytest.mark.parametrize("tree", TREES, ids=lambda t: t.name)
def test_clean_labels_on_lazy_probabilities_equal_the_reference(tree):
    """As the predictor calls it: probabilities at network resolution, labels at image size."""
    rng = np.random.default_rng(5)
    for _ in range(15):
        rh, rw = (int(v) for v in rng.integers(4, 40, size=2))
        oh, ow = (int(v) for v in rng.integers(4, 90, size=2))
        small = random_probs(rng, tree.num_leaves, rh, rw)
        lazy = Probabilities.from_network(small, Geometry((oh, ow), (rh, rw), (rh, rw)))
        labels = lazy.decode(tree)
        min_pixels = int(rng.choice([3, 30, 300]))
        want = reference_clean(lazy.full(), labels, tree, min_pixels)
        np.testing.assert_array_equal(clean_labels(lazy, labels, tree, min_pixels), want)


def test_a_lone_region_goes_below_min_pixels_not_at_it():
    tree = load_tree("person")
    probs = np.zeros((2, 20, 20), np.float32)
    probs[0] = 1.0
    labels = np.zeros((20, 20), np.uint8)
    labels[5:8, 5:8] = 1  # one 9-pixel person: the only region of its node
    np.testing.assert_array_equal(clean_labels(probs, labels, tree, 9), labels)
    assert not clean_labels(probs, labels, tree, 10).any()
    probs = probs[::-1].copy()  # now a 9-pixel hole in a person covering the image
    labels = 1 - labels
    np.testing.assert_array_equal(clean_labels(probs, labels, tree, 9), labels)
    assert clean_labels(probs, labels, tree, 10).all()


@pytest.mark.parametrize("spacing", [2, 3, 5])
def test_clean_labels_with_more_regions_than_a_byte_counts(spacing):
    """Isolated specks every ``spacing`` pixels: up to about 1000 regions of one node, more
    than the 8-bit region map holds, so the wide path is taken too."""
    tree = load_tree("pascal-person-part")
    rng = np.random.default_rng(spacing)
    probs = random_probs(rng, tree.num_leaves, 61, 67)
    labels = np.zeros((61, 67), np.uint8)
    labels[::spacing, ::spacing] = 4  # head specks on background
    labels[1 :: spacing * 2, 1 :: spacing * 2] = 2  # and torso ones
    labels[20:40, 20:40] = 2  # a torso block with background holes in it
    labels[22:38:spacing, 22:38:spacing] = 0
    for min_pixels in (2, 50):
        want = reference_clean(probs, labels, tree, min_pixels)
        np.testing.assert_array_equal(clean_labels(probs, labels, tree, min_pixels), want)

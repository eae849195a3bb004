import math

import numpy as np
import pytest

from hiseg.data import open_dataset
from hiseg.metrics import ConfusionMatrix
from hiseg.taxonomy import IGNORE_VALUE, load_tree

PPP = load_tree("pascal-person-part")
# label values: 0 bg, 1 low_hand, 2 torso, 3 low_leg, 4 head, 5 up_leg, 6 up_hand


def scores_of(pairs, tree=PPP):
    cm = ConfusionMatrix(tree)
    for target, pred in pairs:
        cm.update(np.array(target), np.array(pred))
    return cm.scores()


def test_hand_worked_example():
    # 8 pixels. target: bg bg head head torso torso up_leg low_leg
    #            pred:  bg head head torso torso low_hand low_leg bg
    s = scores_of([([0, 0, 4, 4, 2, 2, 5, 3], [0, 4, 4, 2, 2, 1, 3, 0])])
    # level 0: body target = px 2..7 (6), pred body = px 1..6 (6), both = px 2..6 (5)
    assert s["levels"]["0"]["iou"]["body"] == pytest.approx(5 / 7)
    assert s["levels"]["0"]["iou"]["background"] == pytest.approx(1 / 3)
    assert s["levels"]["0"]["miou"] == pytest.approx(5 / 7)
    # level 1: upper target px2-5, pred px1-5 -> tp 4, union 5; lower target px6,7 pred px6 -> 1/2
    assert s["levels"]["1"]["iou"]["upper_body"] == pytest.approx(4 / 5)
    assert s["levels"]["1"]["iou"]["lower_body"] == pytest.approx(1 / 2)
    assert s["levels"]["1"]["miou"] == pytest.approx((4 / 5 + 1 / 2) / 2)
    # level 2: head tp1 (px2) fp1 (px1) fn1 (px3) -> 1/3; torso tp1 (px4) fp1 (px3) fn1 (px5) -> 1/3
    # low_hand: 0 tp, 1 fp -> 0; up_leg: fn only -> 0; low_leg: fp px6, fn px7 -> 0; up_hand absent
    l2 = s["levels"]["2"]
    assert l2["iou"]["head"] == pytest.approx(1 / 3)
    assert l2["iou"]["torso"] == pytest.approx(1 / 3)
    assert l2["iou"]["low_hand"] == 0 and l2["iou"]["up_leg"] == 0 and l2["iou"]["low_leg"] == 0
    assert l2["iou"]["up_hand"] is None  # absent from both: left out of the mean
    assert l2["miou"] == pytest.approx((1 / 3 + 1 / 3) / 5)
    assert s["pixel_accuracy"] == pytest.approx(3 / 8)
    assert s["levels"]["0"]["dice"]["body"] == pytest.approx(2 * 5 / (2 * 5 + 1 + 1))


def test_identity_gives_one_everywhere():
    rng = np.random.default_rng(1)
    target = rng.integers(0, 7, size=(30, 40))
    s = scores_of([(target, target)])
    for level in s["levels"].values():
        assert level["miou"] == 1.0
        assert all(v == 1.0 for v in level["iou"].values())
    assert s["miou_all_with_background"] == 1.0 and s["pixel_accuracy"] == 1.0


def test_pooled_over_the_split_not_averaged_per_image():
    # image A: big, perfect body; image B: tiny, body missed entirely
    a = np.ones((10, 10), int) * 2
    b_target, b_pred = np.array([[2, 0]]), np.array([[0, 0]])
    s = scores_of([(a, a), (b_target, b_pred)])
    assert s["levels"]["0"]["iou"]["body"] == pytest.approx(100 / 101)  # per-image mean: 0.5
    assert s["n_images"] == 2


def test_ignore_pixels_and_foreign_values():
    s = scores_of([([2, IGNORE_VALUE], [2, 0])])
    assert s["n_pixels"] == 1 and s["pixel_accuracy"] == 1.0
    with pytest.raises(ValueError, match=r"prediction holds values outside .*\[9\]"):
        scores_of([([2, 0], [9, 0])])
    with pytest.raises(ValueError, match="shape"):
        scores_of([([2, 0], [2])])


def test_binary_tree_reports_foreground_dice_and_iou():
    tree = load_tree("person")
    s = scores_of([([1, 1, 1, 0], [1, 1, 0, 0])], tree)
    assert s["iou"] == pytest.approx(2 / 3)
    assert s["dice"] == pytest.approx(4 / 5)
    assert s["levels"]["0"]["miou"] == pytest.approx(2 / 3)


def test_levels_never_disagree_with_a_direct_level_computation():
    rng = np.random.default_rng(2)
    target, pred = rng.integers(0, 7, (2, 50, 50))
    cm = ConfusionMatrix(PPP)
    cm.update(target, pred)
    for k in range(3):
        lut = PPP.level(k).lut
        n = len(PPP.level(k).nodes)
        direct = np.bincount(lut[target].ravel() * n + lut[pred].ravel(), minlength=n * n)
        np.testing.assert_array_equal(cm.level_matrix(k), direct.reshape(n, n))


def test_cross_check_with_sklearn_on_real_masks(pascal_root):
    sk = pytest.importorskip("sklearn.metrics")
    ds = open_dataset(pascal_root, "val")
    rng = np.random.default_rng(3)
    cm = ConfusionMatrix(PPP)
    targets, preds = [], []
    for sample in ds.samples[:25]:
        target = ds.read_labels(sample)
        pred = np.roll(target, shift=(3, -5), axis=(0, 1))  # misaligned boundaries
        noise = rng.random(target.shape) < 0.05
        pred[noise] = rng.integers(0, 7, noise.sum())
        pred[target == 4] = np.where(rng.random((target == 4).sum()) < 0.3, 2, pred[target == 4])
        cm.update(target, pred)
        targets.append(target.ravel())
        preds.append(pred.ravel())
    t, p = np.concatenate(targets), np.concatenate(preds)
    s = cm.scores()
    for k in range(3):
        level = PPP.level(k)
        m = sk.confusion_matrix(level.lut[t], level.lut[p], labels=range(len(level.nodes)))
        iou = sk.jaccard_score(
            level.lut[t],
            level.lut[p],
            labels=range(len(level.nodes)),
            average=None,
            zero_division=0,
        )
        iou = np.where(m.sum(0) + m.sum(1) > 0, iou, np.nan)  # absent from both: undefined
        np.testing.assert_array_equal(cm.level_matrix(k), m)
        for name, value in zip(level.names, iou, strict=True):
            got = s["levels"][str(k)]["iou"][name]
            assert (got is None and math.isnan(value)) or got == pytest.approx(value)
        fg = [v for n, v in zip(level.names, iou, strict=True) if n != "background"]
        assert s["levels"][str(k)]["miou"] == pytest.approx(np.nanmean(fg))
    assert s["pixel_accuracy"] == pytest.approx(sk.accuracy_score(t, p))


def test_merged_worker_matrices_score_as_one_matrix_over_all_images():
    """Workers (Ray actors, DDP processes) each count their images; the merge scores the whole
    split, which a mean of their scores would not: here worker B's one image is nearly all
    background, so its tiny body share must not weigh as much as A's."""
    rng = np.random.default_rng(3)
    images = [(rng.integers(0, 7, (20, 30)), rng.integers(0, 7, (20, 30))) for _ in range(4)]
    images.append((np.zeros((20, 30), int), np.where(rng.random((20, 30)) < 0.02, 4, 0)))
    whole = scores_of(images)
    a, b = ConfusionMatrix(PPP), ConfusionMatrix(PPP)
    for target, pred in images[:4]:
        a.update(target, pred)
    b.update(*images[4])
    mean_of_workers = np.mean([a.scores()["pixel_accuracy"], b.scores()["pixel_accuracy"]])
    merged = a.merge(b).scores()
    assert merged == whole and merged["n_images"] == 5
    assert merged["pixel_accuracy"] != pytest.approx(mean_of_workers)
    with pytest.raises(ValueError, match="tree 'person'"):
        ConfusionMatrix(PPP).merge(ConfusionMatrix(load_tree("person")))

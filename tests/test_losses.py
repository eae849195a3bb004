from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("segmentation_models_pytorch")

from hiseg.losses import IGNORE_INDEX, HierarchicalLoss, build_loss  # noqa: E402
from hiseg.taxonomy import load_tree  # noqa: E402

TREE = load_tree("pascal-person-part")
ALL_TERMS = {"dice": 0.5, "lovasz": 0.5, "tree_min": 1.0}


def leaf(name: str) -> int:
    return int(TREE.leaf_index([TREE.nodes[name].value])[0])


def random_problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, TREE.num_leaves, 6, 6, generator=gen)
    target = torch.randint(0, TREE.num_leaves, (2, 6, 6), generator=gen)
    target[0, :2] = IGNORE_INDEX
    return logits, target


@pytest.mark.parametrize("kind", ["ce", "focal"])
def test_perfect_logits_give_near_zero_loss(kind: str) -> None:
    _, target = random_problem()
    safe = target.clamp(max=TREE.num_leaves - 1)
    logits = 30.0 * torch.nn.functional.one_hot(safe, TREE.num_leaves).permute(0, 3, 1, 2).float()
    loss_fn = build_loss(TREE, {"kind": kind, **ALL_TERMS})
    assert loss_fn(logits, target).item() < 1e-4
    assert all(v < 1e-4 for v in loss_fn.last_parts.values()), loss_fn.last_parts


@pytest.mark.parametrize("kind", ["ce", "focal"])
def test_sgd_steps_reduce_the_loss(kind: str) -> None:
    logits, target = random_problem()
    logits.requires_grad_(True)
    loss_fn = build_loss(TREE, {"kind": kind, **ALL_TERMS})
    opt = torch.optim.SGD([logits], lr=50.0)  # the loss is a pixel mean: small per-logit grads
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = loss_fn(logits, target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]


def test_ignored_pixels_do_not_contribute() -> None:
    logits, target = random_problem()
    loss_fn = build_loss(TREE, ALL_TERMS)
    changed = logits.clone()
    changed[0, :, :2] = 100 * torch.randn_like(changed[0, :, :2])
    changed.requires_grad_(True)
    assert loss_fn(changed, target).item() == pytest.approx(loss_fn(logits, target).item())
    loss_fn(changed, target).backward()
    assert changed.grad is not None
    assert changed.grad[0, :, :2].abs().max() == 0


def test_all_ignored_gives_zero_with_a_graph() -> None:
    logits = torch.randn(1, TREE.num_leaves, 3, 3, requires_grad=True)
    loss = build_loss(TREE, ALL_TERMS)(logits, torch.full((1, 3, 3), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0


def one_pixel() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0, -0.5, 0.3]).view(1, -1, 1, 1)
    probs = logits.flatten().softmax(0)
    return logits, torch.tensor([[[leaf("head")]]]), probs


def test_level_marginals_match_a_hand_computation() -> None:
    logits, target, p = one_pixel()
    upper = sum(p[leaf(n)] for n in ("head", "torso", "up_hand", "low_hand"))
    expected = {
        "level0": -math.log(1 - p[leaf("background")]),
        "level1": -math.log(upper),
        "level2": -math.log(p[leaf("head")]),
    }
    loss_fn = HierarchicalLoss(TREE, level_weights=[1, 2, 1])
    total = loss_fn(logits, target).item()
    assert loss_fn.last_parts == pytest.approx(expected, rel=1e-5)
    weighted = (expected["level0"] + 2 * expected["level1"] + expected["level2"]) / 4
    assert total == pytest.approx(weighted, rel=1e-5)

    focal_fn = HierarchicalLoss(TREE, kind="focal", focal_gamma=2.0)
    focal_fn(logits, target)
    assert focal_fn.last_parts["level1"] == pytest.approx(
        (1 - float(upper)) ** 2 * expected["level1"], rel=1e-5
    )


def test_tree_min_is_per_node_binary_cross_entropy() -> None:
    logits, target, p = one_pixel()
    head = TREE.nodes["head"]
    path = {head, *head.ancestors()}
    bce = []
    for node in TREE.nodes.values():
        mass = sum(float(p[leaf(lf.name)]) for lf in node.leaves())
        bce.append(-math.log(mass) if node in path else -math.log(1 - mass))
    loss_fn = HierarchicalLoss(TREE, tree_min_weight=1.0)
    loss_fn(logits, target)
    assert len(bce) == 10
    assert loss_fn.last_parts["tree_min"] == pytest.approx(sum(bce) / len(bce), rel=1e-5)


def test_tree_min_is_finite_with_gradients_even_for_extreme_logits() -> None:
    logits, target = random_problem()
    logits = (logits * 500).requires_grad_(True)
    loss = build_loss(TREE, {"tree_min": 1.0})(logits, target)
    loss.backward()
    assert torch.isfinite(loss)
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


def test_binary_tree_has_one_level() -> None:
    tree = load_tree("person")
    logits = torch.randn(1, 2, 4, 4)
    loss_fn = build_loss(tree, {"tree_min": 1.0})
    loss_fn(logits, torch.randint(0, 2, (1, 4, 4)))
    assert set(loss_fn.last_parts) == {"level0", "tree_min"}


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown loss settings"):
        build_loss(TREE, {"dicee": 1.0})
    with pytest.raises(ValueError, match="level weights"):
        build_loss(TREE, {"level_weights": [1, 1]})
    with pytest.raises(ValueError, match="kind"):
        build_loss(TREE, {"kind": "hinge"})
    logits, target = random_problem()
    with pytest.raises(ValueError, match="indices outside"):
        build_loss(TREE)(logits, target.masked_fill(target == 3, -1))

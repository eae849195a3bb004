"""Training losses over a class tree, computed from the model's leaf logits.

The model predicts one softmax over the leaves; every coarser node's probability is the sum of its
leaves'. Supervising each level on those marginals teaches "body vs background" and "upper vs
lower body" directly, so a confusion inside the upper body costs less than one across the body.
Targets are dense leaf indices (``tree.leaf_index`` of the label values), ``ignore_index`` where a
pixel carries no label.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss, LovaszLoss
from torch import nn

from hiseg.taxonomy import IGNORE_VALUE, Tree

#: Target index of ignored pixels; the label-map ignore value, so the training code can keep it.
IGNORE_INDEX = IGNORE_VALUE
LOSS_KINDS = ("ce", "focal")


class HierarchicalLoss(nn.Module):
    """Weighted per-level cross-entropy (or focal) on node marginals, plus optional extra terms.

    For level ``k`` the loss at a pixel is ``-log P(node_k(target))``, where ``P(node)`` is the
    softmax mass of the node's leaves, computed as a logsumexp over those leaves' log-probabilities
    (stable even when every leaf of the node is far from the winner). Levels are weighted by
    ``level_weights`` (default equal), normalised to sum to 1, and averaged over labelled pixels.

    Optional terms, each added with its weight:

    * ``dice_weight`` / ``lovasz_weight``: multiclass Dice and Lovász-softmax on the leaves
      (segmentation_models_pytorch), which favour the overlap of small parts and small people.
    * ``tree_min_weight``: the tree-min loss of Li et al., "Deep Hierarchical Semantic
      Segmentation" (HSSN, CVPR 2022). The paper scores every node ``v`` with ``s_v`` in [0, 1] and
      minimises, summed over the nodes,
      ``-y_v log(min_{u in A_v} s_u) - (1 - y_v) log(1 - max_{u in C_v} s_u)``, with ``A_v`` = ``v``
      and its ancestors, ``C_v`` = ``v`` and its descendants, ``y_v`` = 1 iff ``v`` is on the
      pixel's root-to-leaf path. The min/max make a positive node pay for its weakest ancestor
      and a negative node for its strongest descendant. Here ``s_v = P(v)``, the node marginal;
      marginals never grow down a path, so the min over ``A_v`` and the max over ``C_v`` are
      ``s_v`` itself and the loss is exactly the per-node binary cross-entropy
      ``-y_v log P(v) - (1 - y_v) log(1 - P(v))``, with ``log(1 - P(v))`` taken as the logsumexp
      of the leaves outside ``v``. It is averaged over the tree's distinct nodes (each once,
      background once) and the labelled pixels. Beyond the level terms it adds a penalty
      ``-log(1 - P(v))`` on every node off the true path. The min/max would only matter for
      node scores predicted independently of the leaves, which this leaf-softmax model lacks.

    Soft targets (pseudo-labels): a float (B, L, H, W) target of leaf probabilities trains the
    level terms only, as a soft-target cross-entropy on the node marginals (see :meth:`soft`).

    After each forward pass, ``last_parts`` maps each term's name to its (unweighted) value.
    """

    # Buffers: declared so their type is Tensor, not the Tensor | Module of nn.Module.__getattr__.
    same_level: torch.Tensor
    same_side: torch.Tensor

    def __init__(
        self,
        tree: Tree,
        level_weights: Sequence[float] | None = None,
        kind: str = "ce",
        focal_gamma: float = 2.0,
        dice_weight: float = 0.0,
        lovasz_weight: float = 0.0,
        tree_min_weight: float = 0.0,
        ignore_index: int = IGNORE_INDEX,
    ):
        super().__init__()
        if kind not in LOSS_KINDS:
            raise ValueError(f"loss kind '{kind}' is unknown (known: {', '.join(LOSS_KINDS)})")
        if tree.num_leaves < 2:
            raise ValueError(f"tree '{tree.name}' has one leaf; there is nothing to classify")
        weights = [1.0] * tree.num_levels if level_weights is None else list(level_weights)
        if len(weights) != tree.num_levels:
            raise ValueError(
                f"{len(weights)} level weights given; "
                f"tree '{tree.name}' has {tree.num_levels} levels"
            )
        extra = {"dice": dice_weight, "lovasz": lovasz_weight, "tree_min": tree_min_weight}
        if min(weights) < 0 or sum(weights) <= 0 or min(extra.values()) < 0:
            raise ValueError("loss weights must be >= 0, and the level weights not all 0")
        self.num_leaves = tree.num_leaves
        self.kind = kind
        self.focal_gamma = focal_gamma
        self.ignore_index = ignore_index
        self.level_weights = [w / sum(weights) for w in weights]
        self.extra_weights = extra
        # same_level[k, t, i]: leaf i lies in the level-k node of leaf t.
        members = [torch.from_numpy(tree.membership(k)) for k in range(tree.num_levels)]
        same_level = torch.stack([m @ m.T > 0 for m in members])
        self.register_buffer("same_level", same_level, persistent=False)
        # same_side[v, t, i]: leaves t and i are both inside node v or both outside it.
        inside = torch.zeros(len(tree.nodes), tree.num_leaves, dtype=torch.bool)
        for v, node in enumerate(tree.nodes.values()):
            values = [leaf.leaf_value for leaf in node.leaves()]
            inside[v, torch.from_numpy(tree.leaf_index(values))] = True
        self.register_buffer(
            "same_side", inside[:, :, None] == inside[:, None, :], persistent=False
        )
        self.dice = DiceLoss("multiclass", from_logits=True, ignore_index=ignore_index)
        self.lovasz = LovaszLoss("multiclass", ignore_index=ignore_index)
        self.last_parts: dict[str, float] = {}

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B, L, H, W) leaf logits and (B, H, W) leaf indices, or (B, L, H, W) leaf
        probabilities (:meth:`soft`) -> the scalar loss."""
        if target.is_floating_point():
            return self.soft(logits, target)
        expected = (target.shape[0], self.num_leaves, *target.shape[1:])
        if logits.dim() != 4 or target.dim() != 3 or tuple(logits.shape) != expected:
            raise ValueError(
                f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not fit "
                f"(B, {self.num_leaves}, H, W) and (B, H, W)"
            )
        valid = target != self.ignore_index
        labels = target[valid]
        if labels.numel() == 0:  # nothing labelled: a zero that keeps the graph
            self.last_parts = {}
            return logits.sum() * 0.0
        if labels.min() < 0 or labels.max() >= self.num_leaves:
            raise ValueError(
                f"target holds indices outside 0..{self.num_leaves - 1} "
                f"that are not the ignore index {self.ignore_index}"
            )
        log_probs = F.log_softmax(logits.float(), dim=1).movedim(1, -1)[valid]  # (P, L)
        parts: dict[str, torch.Tensor] = {}
        total = logits.new_zeros((), dtype=torch.float32)
        for k, weight in enumerate(self.level_weights):
            log_pt = _log_mass(log_probs, self.same_level[k][labels])
            nll = -log_pt
            if self.kind == "focal":
                nll = nll * (1.0 - log_pt.exp()).pow(self.focal_gamma)
            parts[f"level{k}"] = nll.mean()
            total = total + weight * parts[f"level{k}"]
        extras = {
            "dice": lambda: self.dice(logits.float(), target),
            "lovasz": lambda: self.lovasz(logits.float(), target),
            "tree_min": lambda: self._tree_min(log_probs, labels),
        }
        for name, weight in self.extra_weights.items():
            if weight > 0:
                parts[name] = extras[name]()
                total = total + weight * parts[name]
        self.last_parts = {name: float(value.detach()) for name, value in parts.items()}
        return total

    def soft(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Soft-target cross-entropy per level, weighted as the hard level terms:
        ``-sum_node q(node) log P(node)``, ``q(node)`` the target's leaf probabilities summed
        over the node (the KL divergence to ``q`` up to ``q``'s entropy, a constant). One-hot
        targets give exactly the hard level terms. Pixels whose target sums to 0 (padding) are
        ignored. Dice, Lovász and tree-min need hard labels and are left out."""
        if target.shape != logits.shape or logits.dim() != 4 or logits.shape[1] != self.num_leaves:
            raise ValueError(
                f"logits {tuple(logits.shape)} and soft target {tuple(target.shape)} must both "
                f"be (B, {self.num_leaves}, H, W)"
            )
        valid = target.sum(dim=1) > 0
        if not valid.any():
            self.last_parts = {}
            return logits.sum() * 0.0
        log_probs = F.log_softmax(logits.float(), dim=1).movedim(1, -1)[valid]  # (P, L)
        q = target.float().movedim(1, -1)[valid]  # (P, L)
        parts: dict[str, torch.Tensor] = {}
        total = logits.new_zeros((), dtype=torch.float32)
        for k, weight in enumerate(self.level_weights):
            # log P(node of leaf t) for every t: (P, L); q-weighted, summing over leaves of a
            # node adds up q(node) log P(node).
            same = self.same_level[k][None]  # (1, L, L)
            log_node = log_probs[:, None, :].masked_fill(~same, float("-inf")).logsumexp(-1)
            parts[f"soft{k}"] = -(q * log_node).sum(-1).mean()
            total = total + weight * parts[f"soft{k}"]
        self.last_parts = {name: float(value.detach()) for name, value in parts.items()}
        return total

    def _tree_min(self, log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean over nodes of -log P(the pixel falls on the same side of the node as its label)."""
        sides = [-_log_mass(log_probs, same[labels]).mean() for same in self.same_side]
        return torch.stack(sides).mean()


def _log_mass(log_probs: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """log of the summed probability of the allowed leaves, per pixel: (P, L), (P, L) -> (P,)."""
    return log_probs.masked_fill(~allowed, float("-inf")).logsumexp(dim=1)


def build_loss(tree: Tree, config: Mapping[str, Any] | None = None) -> HierarchicalLoss:
    """A :class:`HierarchicalLoss` from a config section.

    Keys (all optional): ``kind`` ("ce" | "focal"), ``level_weights`` (one per level),
    ``focal_gamma``, ``dice``, ``lovasz``, ``tree_min`` (term weights) and ``ignore_index``.
    """
    keys = {
        "kind": "kind",
        "level_weights": "level_weights",
        "focal_gamma": "focal_gamma",
        "dice": "dice_weight",
        "lovasz": "lovasz_weight",
        "tree_min": "tree_min_weight",
        "ignore_index": "ignore_index",
    }
    config = dict(config or {})
    unknown = sorted(set(config) - set(keys))
    if unknown:
        raise ValueError(f"unknown loss settings {unknown} (known: {', '.join(keys)})")
    return HierarchicalLoss(tree, **{keys[name]: value for name, value in config.items()})

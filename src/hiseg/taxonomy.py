"""Class trees: named nodes whose leaves carry the label values found in masks.

A tree answers, for any level of detail, "which node does this pixel's leaf value belong to?".
Level ``k`` holds, on every root-to-leaf path, the node at depth ``k + 1`` (or the leaf, if the path
is shorter), so a shallow leaf such as ``background`` appears at every level and each level is a
partition of the leaf values. Builtin trees live as YAML files in ``hiseg/trees/``.
"""

from __future__ import annotations

import colorsys
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from numpy.typing import ArrayLike

from hiseg.errors import HisegError

BACKGROUND = "background"
#: Label value that marks pixels to ignore (padding, unlabeled borders). Never a leaf value.
IGNORE_VALUE = 255


class TreeError(HisegError, ValueError):
    """A class tree definition is invalid; the message names the fault."""


@dataclass(eq=False)
class Node:
    name: str
    value: int | None = None  # only leaves carry a label value
    color: tuple[int, int, int] | None = None
    children: list[Node] = field(default_factory=list)
    parent: Node | None = field(default=None, repr=False)

    @property
    def is_leaf(self) -> bool:
        return not self.children

    @property
    def depth(self) -> int:
        """Distance from the root: the root is 0, its children 1."""
        return 0 if self.parent is None else self.parent.depth + 1

    def ancestors(self) -> list[Node]:
        """Parents up to (not including) the root, nearest first."""
        out, node = [], self.parent
        while node is not None and node.parent is not None:
            out.append(node)
            node = node.parent
        return out

    @property
    def leaf_value(self) -> int:
        """The label value of a leaf; a validated tree gives every leaf one."""
        if self.value is None:
            raise TreeError(f"node '{self.name}' is no leaf with a label value")
        return self.value

    def leaves(self) -> list[Node]:
        return [self] if self.is_leaf else [leaf for c in self.children for leaf in c.leaves()]

    def walk(self) -> Iterator[Node]:
        yield self
        for child in self.children:
            yield from child.walk()


@dataclass(frozen=True)
class Level:
    """One level of detail: its nodes and a lookup table leaf value -> node index."""

    index: int
    nodes: tuple[Node, ...]
    lut: np.ndarray  # shape (256,), int64; -1 for values that are no leaf of the tree

    @property
    def names(self) -> list[str]:
        return [n.name for n in self.nodes]

    def map(self, labels: np.ndarray) -> np.ndarray:
        """Leaf label map -> this level's node indices (-1 where the value is no leaf)."""
        return self.lut[labels]


class Tree:
    """A validated class tree. Build it with :func:`load_tree`, :meth:`from_dict` or by name."""

    def __init__(self, name: str, root: Node, value_map: Mapping[int, int] | None = None):
        self.name = name
        self.root = root
        #: Raw mask value -> leaf value, applied when a mask file is read (e.g. 255 -> 1).
        self.value_map = dict(value_map or {})
        self._validate()
        self.nodes: dict[str, Node] = {n.name: n for n in root.walk() if n is not root}
        self.leaves: list[Node] = sorted(root.leaves(), key=lambda n: n.leaf_value)
        self.values: list[int] = [leaf.leaf_value for leaf in self.leaves]
        depth = max(leaf.depth for leaf in self.leaves)
        self.levels: list[Level] = [self._build_level(k) for k in range(depth)]
        self._decode_lut = self._build_decode_lut()

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any], source: str = "<dict>") -> Tree:
        """Build from the YAML schema: ``name``, ``nodes``, optional ``value_map``.

        Nodes nest with ``children`` or name their ``parent`` (a flat list); both may be mixed.
        """
        if not isinstance(spec, Mapping) or not isinstance(spec.get("nodes"), list):
            raise TreeError(f"{source}: a tree needs a 'nodes' list")
        root = Node(name="<root>")
        flat: list[tuple[Node, str | None]] = []
        for item in spec["nodes"]:
            _collect_nodes(item, None, flat, source)
        by_name = {node.name: node for node, _ in flat}
        for node, parent_name in flat:
            if node.parent is not None:  # nested under its parent already
                if parent_name is not None:
                    raise TreeError(
                        f"{source}: node '{node.name}' is nested under '{node.parent.name}' "
                        f"and names parent '{parent_name}'; give one"
                    )
                continue
            if parent_name is None:
                node.parent = root
            elif parent_name not in by_name:
                raise TreeError(f"{source}: node '{node.name}' has unknown parent '{parent_name}'")
            else:
                node.parent = by_name[parent_name]
            node.parent.children.append(node)
        for node, _ in flat:  # a parent cycle never reaches the root: its nodes would vanish
            chain = [node]
            while chain[-1].parent is not None and chain[-1].parent is not root:
                chain.append(chain[-1].parent)
                if chain[-1] in chain[:-1]:
                    loop = " -> ".join(n.name for n in chain[chain.index(chain[-1]) :])
                    raise TreeError(f"{source}: parent cycle {loop}")
        value_map = _value_map(spec.get("value_map") or {}, source)
        try:
            return cls(str(spec.get("name", Path(source).stem)), root, value_map)
        except TreeError as err:
            raise TreeError(f"{source}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        def node_dict(node: Node) -> dict[str, Any]:
            out: dict[str, Any] = {"name": node.name, "color": list(self.color(node.name))}
            if node.is_leaf:
                out["value"] = node.value
            else:
                out["children"] = [node_dict(c) for c in node.children]
            return out

        spec: dict[str, Any] = {
            "name": self.name,
            "nodes": [node_dict(c) for c in self.root.children],
        }
        if self.value_map:
            spec["value_map"] = dict(self.value_map)
        return spec

    def _validate(self) -> None:
        seen_names: set[str] = set()
        seen_values: dict[int, str] = {}
        for node in self.root.walk():
            if node is self.root:
                if not node.children:
                    raise TreeError("the tree has no nodes")
                continue
            if not node.name:
                raise TreeError("a node has an empty name")
            if node.name in seen_names:
                raise TreeError(f"duplicate node name '{node.name}'")
            seen_names.add(node.name)
            if node.is_leaf and node.value is None:
                raise TreeError(f"leaf '{node.name}' has no value")
            if not node.is_leaf and node.value is not None:
                raise TreeError(
                    f"inner node '{node.name}' has a value ({node.value}); only leaves do"
                )
            if node.value is not None:
                if not 0 <= node.value < IGNORE_VALUE:
                    raise TreeError(
                        f"leaf '{node.name}' has value {node.value}; values must lie in "
                        f"0..{IGNORE_VALUE - 1} ({IGNORE_VALUE} marks ignored pixels)"
                    )
                if node.value in seen_values:
                    raise TreeError(
                        f"duplicate value {node.value} on '{seen_values[node.value]}' "
                        f"and '{node.name}'"
                    )
                seen_values[node.value] = node.name
        background = [c for c in self.root.children if c.name == BACKGROUND]
        if not background or not background[0].is_leaf:
            raise TreeError(f"no '{BACKGROUND}' leaf directly under the root")
        for raw, leaf_value in self.value_map.items():
            if leaf_value not in seen_values:
                raise TreeError(f"value_map sends {raw} to {leaf_value}, which is no leaf value")

    def _build_level(self, k: int) -> Level:
        nodes: list[Node] = []
        lut = np.full(256, -1, dtype=np.int64)
        for leaf in self.leaves:
            path = [*reversed(leaf.ancestors()), leaf]  # depth 1 .. leaf
            node = path[min(k, len(path) - 1)]
            if node not in nodes:
                nodes.append(node)
        order = {id(n): i for i, n in enumerate(self.root.walk())}
        nodes.sort(key=lambda n: order[id(n)])  # stable, readable order: tree order
        for leaf in self.leaves:
            path = [*reversed(leaf.ancestors()), leaf]
            lut[leaf.value] = nodes.index(path[min(k, len(path) - 1)])
        return Level(index=k, nodes=tuple(nodes), lut=lut)

    def _build_decode_lut(self) -> np.ndarray:
        lut = np.full(256, IGNORE_VALUE, dtype=np.uint8)
        for value in self.values:
            lut[value] = value
        for raw, value in self.value_map.items():
            lut[raw] = value
        return lut

    # -- queries ------------------------------------------------------------------------------

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    @property
    def num_leaves(self) -> int:
        return len(self.leaves)

    @property
    def is_binary(self) -> bool:
        return self.num_leaves == 2

    @property
    def background(self) -> Node:
        return self.nodes[BACKGROUND]

    def level(self, k: int) -> Level:
        if not -self.num_levels <= k < self.num_levels:
            raise IndexError(f"tree '{self.name}' has levels 0..{self.num_levels - 1}, not {k}")
        return self.levels[k]

    def children(self, name: str) -> list[str]:
        return [c.name for c in self.nodes[name].children]

    def ancestors(self, name: str) -> list[str]:
        return [a.name for a in self.nodes[name].ancestors()]

    def leaf_index(self, values: ArrayLike) -> np.ndarray:
        """Leaf values -> dense indices 0..num_leaves-1 (model channels); -1 for non-leaves."""
        lut = np.full(256, -1, dtype=np.int64)
        lut[self.values] = np.arange(self.num_leaves)
        values = np.asarray(values)
        inside = (values >= 0) & (values < 256)
        return np.where(inside, lut[np.clip(values, 0, 255)], -1)

    def same_as(self, other: Tree) -> bool:
        """Same nodes, values, colours and structure (models and datasets must agree on it)."""
        return self.to_dict() == other.to_dict()

    def person_labels(self, labels: np.ndarray) -> np.ndarray:
        """Leaf values -> the builtin ``person`` tree's values: 0 background, 1 any other leaf;
        ignore pixels stay ignored. Lets models and datasets with different trees be compared
        at the level they share, person vs background."""
        labels = np.asarray(labels)
        out = (labels != self.background.value).astype(np.uint8)
        out[labels == IGNORE_VALUE] = IGNORE_VALUE
        return out

    def relabeller(self, target: Tree) -> Callable[[np.ndarray], np.ndarray]:
        """How this tree's leaf values become ``target``'s: unchanged for the same tree, person
        vs background (:meth:`person_labels`) for a person tree; ``ValueError`` otherwise.

        Decided once (tree comparisons, the builtin ``person`` tree) and applied per image; the
        function is picklable, so DataLoader workers can hold it.
        """
        if self.same_as(target):
            return _unchanged
        if target.same_as(load_tree("person")):
            return self.person_labels
        raise ValueError(
            f"labels of tree '{self.name}' cannot be turned into tree '{target.name}' "
            "(only the same tree, or any tree into 'person')"
        )

    def membership(self, k: int) -> np.ndarray:
        """(num_leaves, nodes of level k) 0/1 matrix: leaf channel i belongs to node j.

        ``leaf_probs @ membership(k)`` gives level ``k``'s probabilities: a node's probability is
        the sum of its leaves'.
        """
        level = self.level(k)
        out = np.zeros((self.num_leaves, len(level.nodes)), dtype=np.float32)
        out[np.arange(self.num_leaves), level.lut[self.values]] = 1
        return out

    def decode(self, leaf_probs: np.ndarray) -> np.ndarray:
        """(num_leaves, H, W) leaf probabilities -> leaf-value label map, decided top-down.

        Level 0 picks the likeliest node; each finer level picks among the children of the node
        chosen above, so a pixel's part always lies inside its upper/lower body and its body.
        A running maximum over siblings (not argmax over an axis) keeps this a few vector passes.
        """
        flat = leaf_probs.reshape(self.num_leaves, -1)
        channel = dict(zip(self.values, flat, strict=True))
        scores: dict[str, np.ndarray] = {}

        def score(node: Node) -> np.ndarray:  # a node's probability: its children's, summed
            if node.name not in scores:
                if node.is_leaf:
                    scores[node.name] = channel[node.leaf_value]
                else:
                    total = score(node.children[0]).copy()
                    for child in node.children[1:]:
                        total += score(child)
                    scores[node.name] = total
            return scores[node.name]

        def likeliest(members: list[int], nodes: tuple[Node, ...]) -> np.ndarray:
            """Level index of the likeliest of ``members`` (the first on ties): a running
            arg-max in plain arithmetic, as np.where / masked copies are ten times slower."""
            first = members[0]
            best = score(nodes[first])
            if len(members) == 1:
                return np.full(flat.shape[1], first, dtype=np.int16)
            value = score(nodes[members[1]])
            pick = (value > best) * np.int16(members[1] - first) + np.int16(first)
            for j in members[2:]:
                best = np.maximum(best, value)
                value = score(nodes[j])
                pick += (value > best) * (np.int16(j) - pick)
            return pick

        # Each level decides only among siblings: the children of the node chosen above. A
        # node alone under its parent (background at every level) needs no comparison.
        chosen = likeliest(list(range(len(self.levels[0].nodes))), self.levels[0].nodes)
        for k, level in enumerate(self.levels[1:], start=1):
            siblings: dict[int, list[int]] = {}
            for j, parent in enumerate(self._parent_index(k)):
                siblings.setdefault(int(parent), []).append(j)
            first = np.zeros(len(self.levels[k - 1].nodes), dtype=np.int16)
            for parent, members in siblings.items():
                first[parent] = members[0]
            pick = first[chosen]
            for parent, members in siblings.items():
                if len(members) > 1:
                    offset = likeliest(members, level.nodes) - np.int16(members[0])
                    pick += (chosen == parent) * offset
            chosen = pick
        leaf_values = np.array([n.value for n in self.levels[-1].nodes], dtype=np.uint8)
        return leaf_values[chosen].reshape(leaf_probs.shape[1:])

    def _parent_index(self, k: int) -> np.ndarray:
        """For each node of level ``k``, the index of the level ``k - 1`` node containing it."""
        above = self.level(k - 1)
        return np.array([above.lut[n.leaves()[0].value] for n in self.level(k).nodes])

    def encode_mask(self, raw: np.ndarray) -> np.ndarray:
        """Raw mask values -> leaf values; values outside the tree become ``IGNORE_VALUE``.

        Use :meth:`unknown_values` first to report such values instead of hiding them.
        """
        if raw.dtype != np.uint8:
            if raw.size and (raw.min() < 0 or raw.max() > 255):
                return np.where(
                    (raw >= 0) & (raw <= 255), self._decode_lut[np.clip(raw, 0, 255)], IGNORE_VALUE
                ).astype(np.uint8)
            raw = raw.astype(np.uint8)
        return self._decode_lut[raw]

    def unknown_values(self, raw: np.ndarray) -> list[int]:
        """Values in a raw mask that are neither leaf values, mapped values nor the ignore value."""
        known = set(self.values) | set(self.value_map) | {IGNORE_VALUE}
        return sorted(int(v) for v in np.unique(raw) if int(v) not in known)

    def color(self, name: str) -> tuple[int, int, int]:
        """A stable RGB colour: the one given in the tree, else one derived from the name."""
        node = self.nodes[name]
        if node.color is not None:
            return node.color
        if name == BACKGROUND:
            return (0, 0, 0)
        hue = (zlib.crc32(name.encode()) % 360) / 360.0
        r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.95)
        return (round(r * 255), round(g * 255), round(b * 255))

    def palette(self, level: int | None = None) -> np.ndarray:
        """(256, 3) uint8 colours indexed by leaf value, coloured by the node at ``level``."""
        pal = np.zeros((256, 3), dtype=np.uint8)
        for leaf in self.leaves:
            node = (
                leaf
                if level is None
                else self.level(level).nodes[self.level(level).lut[leaf.value]]
            )
            pal[leaf.value] = self.color(node.name)
        return pal

    def render(self) -> str:
        """The tree as indented text, leaves with their values."""
        lines = [self.name]

        def add(node: Node, indent: int) -> None:
            tag = f" ({node.value})" if node.is_leaf else ""
            lines.append("  " * indent + f"- {node.name}{tag}")
            for child in node.children:
                add(child, indent + 1)

        for child in self.root.children:
            add(child, 1)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Tree({self.name!r}, leaves={self.values}, levels={self.num_levels})"


def _unchanged(labels: np.ndarray) -> np.ndarray:
    return labels


def _collect_nodes(
    item: Any, parent: Node | None, out: list[tuple[Node, str | None]], source: str
) -> None:
    """Flatten one YAML node (and its nested children) into ``out`` as (node, parent name)."""
    if not isinstance(item, Mapping) or "name" not in item:
        raise TreeError(f"{source}: every node needs a 'name' (got {item!r})")
    unknown = set(item) - {"name", "value", "color", "children", "parent"}
    if unknown:
        raise TreeError(f"{source}: node '{item['name']}' has unknown keys {sorted(unknown)}")
    color, value, parent_name = item.get("color"), item.get("value"), item.get("parent")
    if color is not None and (
        not isinstance(color, list | tuple)
        or len(color) != 3
        or not all(type(c) is int and 0 <= c <= 255 for c in color)  # not bool, not 1.5
    ):
        raise TreeError(
            f"{source}: node '{item['name']}' color must be three whole numbers 0..255, "
            f"not {color!r}"
        )
    if value is not None and type(value) is not int:
        raise TreeError(
            f"{source}: node '{item['name']}' value must be a whole number, not {value!r}"
        )
    if parent_name is not None and not isinstance(parent_name, str):
        raise TreeError(
            f"{source}: node '{item['name']}' parent must be a name, not {parent_name!r}"
        )
    node = Node(
        name=str(item["name"]),
        value=value,
        color=None if color is None else (color[0], color[1], color[2]),
    )
    if parent is not None:
        node.parent = parent
        parent.children.append(node)
    out.append((node, parent_name))
    for child in item.get("children") or []:
        _collect_nodes(child, node, out, source)


def _value_map(raw: Any, source: str) -> dict[int, int]:
    """``value_map`` as ints; keys may be text (JSON object keys are, e.g. in a model's spec)."""
    if not isinstance(raw, Mapping):
        raise TreeError(
            f"{source}: value_map must be a mapping raw value -> leaf value, not {raw!r}"
        )
    out = {}
    for key, value in raw.items():
        if isinstance(key, str) and key.strip().isdigit():
            key = int(key)
        if not (type(key) is int and 0 <= key <= 255 and type(value) is int):
            raise TreeError(
                f"{source}: value_map entry {key!r}: {value!r} must map a mask value 0..255 "
                "to a leaf value"
            )
        out[key] = value
    return out


def builtin_trees() -> list[str]:
    """Names of the trees shipped with hiseg."""
    folder = resources.files("hiseg") / "trees"
    return sorted(
        p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml")
    )


def load_tree(name_or_path: str | Path) -> Tree:
    """A builtin tree by name (``pascal-person-part``, ``person``) or a tree YAML file."""
    text = str(name_or_path)
    builtin = resources.files("hiseg") / "trees" / f"{text}.yaml"
    if builtin.is_file():
        return Tree.from_dict(yaml.safe_load(builtin.read_text()), source=text)
    path = Path(text)
    if not path.is_file():
        raise TreeError(
            f"{text}: no such tree file, and no builtin tree of that name "
            f"(builtin: {', '.join(builtin_trees())})"
        )
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise TreeError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    except UnicodeDecodeError as err:  # e.g. an image given for the tree file
        raise TreeError(f"{path}: not a text file ({err.reason} at byte {err.start})") from None
    return Tree.from_dict(spec, source=str(path))

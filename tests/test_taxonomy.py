import json
import pickle

import numpy as np
import pytest
import yaml

from hiseg.taxonomy import IGNORE_VALUE, Tree, TreeError, builtin_trees, load_tree

PPP = load_tree("pascal-person-part")


def test_builtins_listed():
    assert builtin_trees() == ["pascal-person-part", "person"]


def test_pascal_levels_follow_the_task_definition():
    assert [lv.names for lv in PPP.levels] == [
        ["background", "body"],
        ["background", "upper_body", "lower_body"],
        ["background", "head", "torso", "up_hand", "low_hand", "up_leg", "low_leg"],
    ]
    # classes.txt: 0 bg, 1 low_hand, 2 torso, 3 low_leg, 4 head, 5 up_leg, 6 up_hand
    level1 = PPP.level(1)
    names = [level1.names[i] for i in level1.map(np.arange(7))]
    assert names == [
        "background",
        "upper_body",
        "upper_body",
        "lower_body",
        "upper_body",
        "lower_body",
        "upper_body",
    ]
    level2 = PPP.level(2)
    assert [level2.names[i] for i in level2.map(np.arange(7))] == [
        "background",
        "low_hand",
        "torso",
        "low_leg",
        "head",
        "up_leg",
        "up_hand",
    ]
    assert level2.lut[9] == -1 and level2.lut[IGNORE_VALUE] == -1


def test_ancestors_children_and_colours():
    assert PPP.ancestors("low_leg") == ["lower_body", "body"]
    assert PPP.ancestors("background") == []
    assert PPP.children("upper_body") == ["head", "torso", "up_hand", "low_hand"]
    colours = {PPP.color(n) for n in PPP.nodes}
    assert len(colours) == len(PPP.nodes)
    assert PPP.color("background") == (0, 0, 0)
    assert load_tree("pascal-person-part").color("head") == PPP.color("head")


def test_person_tree_maps_255_to_1():
    tree = load_tree("person")
    raw = np.array([[0, 255], [1, 7]], dtype=np.uint8)
    assert tree.encode_mask(raw).tolist() == [[0, 1], [1, IGNORE_VALUE]]
    assert tree.unknown_values(raw) == [7]
    assert tree.is_binary and tree.num_levels == 1


def test_person_labels_collapse_any_tree_to_person_vs_background():
    parts = load_tree("pascal-person-part")
    labels = np.array([[0, 4, 2], [3, IGNORE_VALUE, 1]], dtype=np.uint8)
    assert parts.person_labels(labels).tolist() == [[0, 1, 1], [1, IGNORE_VALUE, 1]]
    person = load_tree("person")
    binary = np.array([[0, 1, IGNORE_VALUE]], dtype=np.uint8)
    assert person.person_labels(binary).tolist() == binary.tolist()


NESTED = """
name: toy
nodes:
  - {name: background, value: 0}
  - name: thing
    children:
      - {name: a, value: 1}
      - {name: b, value: 2}
"""
FLAT = """
name: toy
nodes:
  - {name: background, value: 0}
  - {name: thing}
  - {name: a, value: 1, parent: thing}
  - {name: b, value: 2, parent: thing}
"""


def test_nested_and_flat_yaml_give_the_same_tree(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text(FLAT)
    flat = load_tree(path)
    nested = Tree.from_dict(yaml.safe_load(NESTED))
    assert flat.to_dict() == nested.to_dict()
    assert Tree.from_dict(flat.to_dict()).to_dict() == flat.to_dict()


@pytest.mark.parametrize(
    "nodes, message",
    [
        (
            [{"name": "background", "value": 0}, {"name": "background", "value": 1}],
            "duplicate node name 'background'",
        ),
        ([{"name": "background", "value": 0}, {"name": "x", "value": 0}], "duplicate value 0"),
        ([{"name": "background", "value": 0}, {"name": "x"}], "leaf 'x' has no value"),
        (
            [
                {"name": "background", "value": 0},
                {"name": "x", "value": 3, "children": [{"name": "y", "value": 1}]},
            ],
            "inner node 'x' has a value",
        ),
        ([{"name": "a", "value": 0}, {"name": "b", "value": 1}], "no 'background' leaf"),
        (
            [{"name": "background", "value": 0}, {"name": "y", "value": 1, "parent": "nope"}],
            "unknown parent 'nope'",
        ),
        ([{"name": "background", "value": 0}, {"name": "x", "value": 255}], "values must lie"),
        # malformed entries of a hand-written file: one line each, never a ValueError/TypeError
        ([{"name": "background", "value": 0}, {"name": "x", "value": "one"}], "whole number"),
        ([{"name": "background", "value": 0, "color": 5}], "color must be three whole"),
        ([{"name": "background", "value": 0, "color": ["a", 0, 0]}], "color must be three"),
        ([{"name": "background", "value": 0}, {"name": "x", "value": 1, "parent": [1]}], "parent"),
        # a parent cycle never reaches the root: its nodes vanished and the tree was background
        (
            [
                {"name": "background", "value": 0},
                {"name": "a", "parent": "b"},
                {"name": "b", "parent": "a"},
                {"name": "leaf", "value": 1, "parent": "a"},
            ],
            "parent cycle (a -> b -> a|b -> a -> b)",
        ),
        ([{"name": "background", "value": 0}, {"name": "a", "value": 1, "parent": "a"}], "a -> a"),
        (
            [
                {"name": "background", "value": 0},
                {"name": "p", "children": [{"name": "c", "value": 1, "parent": "background"}]},
            ],
            "node 'c' is nested under 'p' and names parent 'background'; give one",
        ),
    ],
)
def test_invalid_trees_name_the_fault(tmp_path, nodes, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "nodes": nodes}))
    with pytest.raises(TreeError, match=message) as err:
        load_tree(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "value_map, message",
    [([255, 1], "value_map must be a mapping"), ({"x": 1}, "entry 'x'"), ({1000: 1}, "entry 1000")],
)
def test_malformed_value_map_is_named(tmp_path, value_map, message):
    path = tmp_path / "bad.yaml"
    nodes = [{"name": "background", "value": 0}, {"name": "person", "value": 1}]
    path.write_text(yaml.safe_dump({"name": "bad", "nodes": nodes, "value_map": value_map}))
    with pytest.raises(TreeError, match=message) as err:
        load_tree(path)
    assert str(path) in str(err.value)


def test_value_map_keys_written_as_text_still_read():
    """A tree read back from JSON (a model's spec, a pseudo-label manifest) has text keys."""
    tree = load_tree("person")
    again = Tree.from_dict(json.loads(json.dumps(tree.to_dict())))
    assert again.value_map == {255: 1} and again.same_as(tree)


def test_a_binary_or_broken_tree_file_is_one_line(tmp_path):
    """An image passed as the tree, or broken YAML: a TreeError of one line, no traceback."""
    binary = tmp_path / "photo.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(TreeError, match=r"photo\.yaml: not a text file"):
        load_tree(binary)
    broken = tmp_path / "broken.yaml"
    broken.write_text("nodes: [a\n  b: {")
    with pytest.raises(TreeError, match=r"broken\.yaml: not valid YAML") as err:
        load_tree(broken)
    assert "\n" not in str(err.value)


def test_unknown_tree_name_lists_builtins():
    with pytest.raises(TreeError, match="builtin: pascal-person-part, person"):
        load_tree("no-such-tree")


def test_decode_is_top_down_consistent():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(7) * 0.3, size=(40, 50)).transpose(2, 0, 1)
    # one pixel where the single likeliest leaf is background but body as a whole wins
    probs[:, 0, 0] = [0.4, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]
    labels = PPP.decode(probs)
    assert labels[0, 0] != 0
    for k in range(PPP.num_levels):
        level_probs = np.tensordot(PPP.membership(k).T, probs, axes=1)
        chosen = PPP.level(k).map(labels)
        if k == 0:
            np.testing.assert_array_equal(chosen, level_probs.argmax(0))
        else:  # the chosen node lies inside the node chosen one level up
            parent = PPP.level(k - 1).map(labels)
            assert (PPP._parent_index(k)[chosen] == parent).all()


def test_palette_colours_by_level():
    pal = PPP.palette(level=0)
    assert (pal[[1, 2, 3, 4, 5, 6]] == PPP.color("body")).all()
    assert (PPP.palette()[4] == PPP.color("head")).all()


def test_relabeller_keeps_same_tree_maps_parts_to_person_and_refuses_the_rest():
    parts, person = load_tree("pascal-person-part"), load_tree("person")
    labels = np.array([[0, 1, 2], [6, IGNORE_VALUE, 0]], np.uint8)
    assert parts.relabeller(parts)(labels) is labels
    to_person = pickle.loads(pickle.dumps(parts.relabeller(person)))  # DataLoader workers
    np.testing.assert_array_equal(to_person(labels), [[0, 1, 1], [1, IGNORE_VALUE, 0]])
    with pytest.raises(ValueError, match="cannot be turned into tree 'pascal-person-part'"):
        person.relabeller(parts)


def plain_decode(tree: Tree, probs: np.ndarray) -> np.ndarray:
    """Top-down decoding spelt out: at each level, np.argmax (first on ties) over the nodes'
    summed probabilities, among the children of the node chosen above."""
    chosen = None
    for k in range(tree.num_levels):
        scores = np.tensordot(tree.membership(k).T, probs, axes=1)
        if chosen is not None:  # only the children of the node chosen one level up compete
            inside = tree._parent_index(k)[:, None, None] == chosen[None]
            scores = np.where(inside, scores, -np.inf)
        chosen = scores.argmax(0)
    leaf_values = np.array([node.value for node in tree.level(-1).nodes])
    return leaf_values[chosen]


@pytest.mark.parametrize("name", ["pascal-person-part", "person"])
def test_decode_breaks_ties_toward_the_first_node_at_every_level(name):
    """Probabilities in eighths (sums exact in any order), so most pixels hold ties."""
    tree = load_tree(name)
    rng = np.random.default_rng(1)
    probs = (rng.integers(0, 4, size=(tree.num_leaves, 30, 40)) / 8).astype(np.float32)
    np.testing.assert_array_equal(tree.decode(probs), plain_decode(tree, probs))

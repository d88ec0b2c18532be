"""MGSC pipeline on hand-made masks: inclusion tree, same-label merging, panoptic/fine-grained answers."""

import random

import numpy as np

from datapipes.mgsc import annotate, build_mask_tree, finegrained_answer, panoptic_answer
from datapipes.schema import Sample, decode_mask


def box(y0, x0, y1, x1, size=(20, 40)):
    m = np.zeros(size, bool)
    m[y0:y1, x0:x1] = True
    return m


HOUSE, WINDOW, PANE, DOOR = box(2, 2, 18, 18), box(4, 4, 10, 10), box(5, 5, 7, 7), box(12, 8, 18, 12)
CIRCLE, TREE = box(2, 30, 8, 38), box(2, 20, 18, 26)


def test_mask_hangs_under_the_smallest_mask_containing_it():
    root = build_mask_tree([PANE, HOUSE, WINDOW, CIRCLE], ["pane", "house", "window", "circle"])
    assert [c.label for c in root.children] == ["house", "circle"]
    house = root.children[0]
    assert [c.label for c in house.children] == ["window"]
    assert [c.label for c in house.children[0].children] == ["pane"]  # not directly under house
    assert root.children[1].children == []


def test_inclusion_ratio_threshold_decides_parenthood():
    mostly_inside = box(2, 10, 12, 19)  # 80 of its 90 pixels inside HOUSE (0.89)
    half_inside = box(2, 14, 12, 22)  # 40 of 80 inside
    root = build_mask_tree([HOUSE, mostly_inside], ["house", "a"], inclusion=0.9)
    assert [c.label for c in root.children] == ["house", "a"]
    root = build_mask_tree([HOUSE, mostly_inside], ["house", "a"], inclusion=0.85)
    assert [c.label for c in root.children[0].children] == ["a"]
    root = build_mask_tree([HOUSE, half_inside], ["house", "b"], inclusion=0.8)
    assert sorted(c.label for c in root.children) == ["b", "house"]


def test_same_label_siblings_are_merged_with_the_union_of_their_masks():
    w2 = box(4, 12, 10, 16)
    root = build_mask_tree([HOUSE, WINDOW, w2, DOOR], ["house", "window", "window", "door"])
    house = root.children[0]
    assert sorted(c.label for c in house.children) == ["door", "window"]
    window = next(c for c in house.children if c.label == "window")
    assert window.count == 2
    np.testing.assert_array_equal(window.mask, WINDOW | w2)


def test_same_label_nodes_under_different_parents_are_not_merged():
    other_house = box(2, 20, 18, 38)
    w2 = box(4, 24, 10, 30)
    root = build_mask_tree([HOUSE, other_house, WINDOW, w2], ["red house", "blue house", "window", "window"])
    assert [len(c.children) for c in root.children] == [1, 1]
    assert all(c.children[0].count == 1 for c in root.children)


def test_panoptic_answer_lists_root_children_left_to_right_with_their_masks():
    root = build_mask_tree([CIRCLE, WINDOW, HOUSE, TREE], ["blue circle", "window", "red house", "green tree"])
    text, owned = panoptic_answer(root, random.Random(0))
    assert [p for p, _ in owned] == ["a red house", "a green tree", "a blue circle"]
    for (_, mask), want in zip(owned, [HOUSE, TREE, CIRCLE]):
        np.testing.assert_array_equal(mask, want)
    assert text.count("[SEG]") == 3
    positions = [text.index(f"<p> {p} </p> [SEG]") for p, _ in owned]
    assert positions == sorted(positions)


def test_panoptic_answer_names_merged_siblings_with_a_count():
    c2 = box(12, 30, 18, 38)
    root = build_mask_tree([CIRCLE, c2, HOUSE], ["blue circle", "blue circle", "red house"])
    _, owned = panoptic_answer(root, random.Random(0))
    assert [p for p, _ in owned] == ["a red house", "two blue circles"]


def test_finegrained_answer_covers_the_subtree_depth_first():
    root = build_mask_tree([HOUSE, WINDOW, PANE, DOOR], ["red house", "window", "pane", "door"])
    text, owned = finegrained_answer(root.children[0], random.Random(0))
    assert [p for p, _ in owned] == ["the red house", "its window", "its pane", "its door"]
    assert "<p> the red house </p> [SEG] with <p> its window </p> [SEG] with <p> its pane </p> [SEG] and <p> its door </p> [SEG]" in text


def test_annotate_makes_valid_uscdf_samples_per_subtree():
    image = np.zeros((20, 40, 3), np.uint8)
    masks = [HOUSE, WINDOW, CIRCLE, TREE, box(12, 21, 18, 25)]
    labels = ["red house", "window", "blue circle", "green tree", "trunk"]
    samples = annotate(image, masks, lambda img, ms: labels, key="k", dataset="test", rng=random.Random(0))
    assert [s.task for s in samples] == ["panoptic_segcap", "finegrained_segcap", "finegrained_segcap"]
    for s in samples:
        Sample.from_dict(s.to_dict())  # validates: [SEG] count == masks, sizes
    np.testing.assert_array_equal(decode_mask(samples[1].masks[1].rle), WINDOW)
    assert "red house" in samples[1].conversation[0]["content"]
    assert "green tree" in samples[2].conversation[0]["content"]

"""The MGSC annotation pipeline (MGLMM, seed 004): masks -> labels (pluggable labeller) -> mask tree
by inclusion (root = whole image, same-label siblings merged) -> dense context organisation: a panoptic
SegCap answer from the root's children and a fine-grained one per subtree, as USCDF text + masks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from datapipes.schema import IMAGE_TOKEN, P_END, P_START, SEG_TOKEN, Sample, mask_ann

INCLUSION = 0.9  # |child & parent| / |child| at or above this puts child under parent

PANOPTIC_PROMPTS = (
    "Please describe all the objects in this image with interleaved segmentation masks.",
    "Can you describe the image in detail, with interleaved segmentation masks for the objects?",
    "What objects are in this image? Please answer with interleaved segmentation masks.",
)
PANOPTIC_OPENERS = ("The image shows {}.", "In this image there is {}.", "This picture contains {}.")
FINEGRAINED_PROMPTS = (
    "Can you provide a detailed description of the {} in the image with interleaved segmentation masks?",
    "Please describe the {} in detail with interleaved segmentation masks.",
)
FINEGRAINED_OPENERS = ("Here is {}.", "The image has {}.")
NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
IRREGULAR_PLURALS = {"snowman": "snowmen", "body": "bodies"}


class Labeller(Protocol):
    """Short semantic labels for the masks of one image (GPT-4o/Osprey in the paper; the synthetic
    generator's labeller simply knows them)."""

    def __call__(self, image: np.ndarray, masks: list[np.ndarray]) -> list[str]: ...


@dataclass
class MaskNode:
    label: str
    mask: np.ndarray  # (h, w) bool
    children: list["MaskNode"] = field(default_factory=list)
    count: int = 1  # how many same-label masks were merged into this node

    @property
    def area(self) -> int:
        return int(self.mask.sum())


def build_mask_tree(masks: list[np.ndarray], labels: list[str], inclusion: float = INCLUSION) -> MaskNode:
    """Root = the whole image; each mask hangs under the smallest mask that contains it.

    Masks are placed largest first so every possible parent is already in the tree; equal masks
    nest in input order. Children are sorted left to right and same-label siblings merged.
    Areas are counted once and intersections only inside the two masks' common bounding box: SA-1B
    photos are 1500x2250, where whole-image passes per pair dominated the pipeline.
    """
    if len(masks) != len(labels):
        raise ValueError(f"{len(masks)} masks but {len(labels)} labels")
    shape = masks[0].shape if masks else (1, 1)
    root = MaskNode("root", np.ones(shape, dtype=bool))
    nodes = [MaskNode(label, m.astype(bool)) for m, label in zip(masks, labels)]
    area = {id(n): n.area for n in nodes}
    area[id(root)] = shape[0] * shape[1]
    box = {id(n): _bbox(n.mask) for n in nodes}
    placed: list[MaskNode] = []
    for node in sorted(nodes, key=lambda n: -area[id(n)]):  # stable: ties keep input order
        parent, a = root, area[id(node)]
        for cand in placed:
            if a and _intersection(node, cand, box) / a >= inclusion and area[id(cand)] < area[id(parent)]:
                parent = cand
        parent.children.append(node)
        placed.append(node)
    _merge_and_order(root)
    return root


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1), end exclusive; None for an empty mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1) if len(rows) else None


def _intersection(a: MaskNode, b: MaskNode, box: dict) -> int:
    ba, bb = box[id(a)], box[id(b)]
    if ba is None or bb is None:
        return 0
    y0, y1, x0, x1 = max(ba[0], bb[0]), min(ba[1], bb[1]), max(ba[2], bb[2]), min(ba[3], bb[3])
    if y0 >= y1 or x0 >= x1:
        return 0
    return int((a.mask[y0:y1, x0:x1] & b.mask[y0:y1, x0:x1]).sum())


def _merge_and_order(node: MaskNode) -> None:
    """Merge same-label siblings (union of masks, children pooled), then recurse and order left to right."""
    by_label: dict[str, MaskNode] = {}
    for child in node.children:
        if child.label in by_label:
            m = by_label[child.label]
            m.mask = m.mask | child.mask
            m.children += child.children
            m.count += child.count
        else:
            by_label[child.label] = child
    node.children = sorted(by_label.values(), key=_reading_order)
    for child in node.children:
        _merge_and_order(child)


def _reading_order(node: MaskNode) -> tuple[float, float]:
    """The mask's centroid (x, y): computed inside its bounding box (sums of integers, so the same floats)."""
    box = _bbox(node.mask)
    if box is None:
        return (0.0, 0.0)
    y0, y1, x0, x1 = box
    ys, xs = np.nonzero(node.mask[y0:y1, x0:x1])
    n = len(xs)
    return (float((xs.sum() + n * x0) / n), float((ys.sum() + n * y0) / n))


def plural(noun_phrase: str) -> str:
    head, _, last = noun_phrase.rpartition(" ")
    last = IRREGULAR_PLURALS.get(last, last + ("es" if last.endswith(("s", "sh", "ch", "x")) else "s"))
    return f"{head} {last}".strip()


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _phrase(node: MaskNode, determiner: str) -> str:
    """'a red house' / 'two red circles' / 'the roof' / 'its roof' depending on the determiner."""
    if node.count > 1:
        num = NUMBERS.get(node.count, "several")
        return f"{'the ' + num if determiner == 'the' else num} {plural(node.label)}"
    if determiner == "a":
        return f"{article(node.label)} {node.label}"
    return f"{determiner} {node.label}"


def grounded(phrase: str) -> str:
    """USCDF's grounded phrase: the i-th of these in an answer owns the i-th mask."""
    return f"{P_START} {phrase} {P_END} {SEG_TOKEN}"


def join(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def panoptic_answer(root: MaskNode, rng: random.Random) -> tuple[str, list[tuple[str, np.ndarray]]]:
    """One grounded phrase per child of the root, left to right; returns (text, [(phrase, mask)])."""
    if not root.children:
        raise ValueError("the mask tree has no objects to describe")
    owned = [(_phrase(c, "a"), c.mask) for c in root.children]
    text = rng.choice(PANOPTIC_OPENERS).format(join([grounded(p) for p, _ in owned]))
    return text, owned


def finegrained_answer(node: MaskNode, rng: random.Random) -> tuple[str, list[tuple[str, np.ndarray]]]:
    """The node and all its descendants, depth first: '<p> the red house </p> [SEG] with <p> its roof ...'."""
    owned: list[tuple[str, np.ndarray]] = []

    def describe(n: MaskNode, determiner: str) -> str:
        phrase = _phrase(n, determiner)
        owned.append((phrase, n.mask))
        text = grounded(phrase)
        if n.children:
            text += " with " + join([describe(c, "its" if n.count == 1 else "their") for c in n.children])
        return text

    text = describe(node, "the")
    return rng.choice(FINEGRAINED_OPENERS).format(text), owned


def segcap_sample(
    task: str, prompt: str, answer: str, owned: list[tuple[str, np.ndarray]], key: str, dataset: str, extra: dict
) -> Sample:
    h, w = owned[0][1].shape
    return Sample(
        task=task,
        conversation=[{"role": "user", "content": f"{IMAGE_TOKEN}\n{prompt}"}, {"role": "assistant", "content": answer}],
        masks=[mask_ann(m, p) for p, m in owned],
        image_size=[h, w],
        source={"dataset": dataset, "id": key},
        extra=extra,
    )


def annotate(
    image: np.ndarray,
    masks: list[np.ndarray],
    labeller: Labeller,
    *,
    key: str,
    dataset: str,
    rng: random.Random,
    extra: dict | None = None,
) -> list[Sample]:
    """The whole pipeline for one image: a panoptic sample plus a fine-grained one per subtree that has
    descendants (a leaf object would only repeat the panoptic phrase)."""
    labels = labeller(image, masks)
    root = build_mask_tree(masks, labels)
    extra = dict(extra or {})
    text, owned = panoptic_answer(root, rng)
    out = [segcap_sample("panoptic_segcap", rng.choice(PANOPTIC_PROMPTS), text, owned, key, dataset, extra)]
    for node in root.children:
        if node.children:
            text, owned = finegrained_answer(node, rng)
            name = plural(node.label) if node.count > 1 else node.label
            prompt = rng.choice(FINEGRAINED_PROMPTS).format(name)
            out.append(segcap_sample("finegrained_segcap", prompt, text, owned, key, dataset, extra))
    return out

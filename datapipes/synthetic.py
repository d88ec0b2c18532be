"""Learnable multi-granularity synthetic scenes (coloured objects made of parts) as USCDF shards,
deterministic from a seed, plus the word-level tokenizer over their vocabulary with a Vicuna-v1
chat template. SegCap answers go through the MGSC pipeline (datapipes/mgsc.py) like real data.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from datapipes import mgsc
from datapipes.config import SyntheticConfig
from datapipes.schema import IMAGE_TOKEN, Sample, box_ann, encode_mask, group_ann, mask_ann
from datapipes.shards import write_shards
from datapipes.templates import VICUNA_SYSTEM, VICUNA_V1_TEMPLATE

COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (45, 75, 215),
    "yellow": (230, 200, 30),
    "purple": (135, 55, 175),
    "orange": (240, 135, 25),
}
# Parts in drawing order with the shade applied to the object's colour (parts differ in brightness,
# so a part is visible without being another colour). One-part classes have no part masks.
CLASSES = {
    "circle": (),
    "square": (),
    "triangle": (),
    "house": (("roof", 0.6), ("walls", 1.0)),
    "tree": (("crown", 1.0), ("trunk", 0.5)),
    "snowman": (("head", 1.15), ("body", 0.85)),
}
TALL = {"tree", "snowman"}
DEFAULT_MIX = SyntheticConfig().task_mix

REFER_PROMPTS = (
    "Please segment the {}.",
    "Can you segment the {} in this image?",
    "Where is the {}? Please output the segmentation mask.",
    "Please find the {} and output the segmentation mask.",
)
REFER_ANSWERS = ("Sure, {}.", "It is {}.")
MULTI_PROMPTS = ("Please segment all the {}.", "Can you segment every one of the {} in this image?")
GROUP_PROMPTS = ("Please segment the {}.", "Please find the {} and output the segmentation mask.")
EMPTY_ANSWERS = ("There is no {} in the image.", "Sorry, there is no {} in this image.")

SYSTEM = VICUNA_SYSTEM  # the synthetic vocabulary covers the default system prompt


# --- drawing -------------------------------------------------------------------------------------

def _disk(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.ogrid[:h, :w]
    return (yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2 <= r * r


def _rect(h: int, w: int, y0: float, x0: float, y1: float, x1: float) -> np.ndarray:
    yy, xx = np.ogrid[:h, :w]
    return (yy + 0.5 >= y0) & (yy + 0.5 < y1) & (xx + 0.5 >= x0) & (xx + 0.5 < x1)


def _triangle(h: int, w: int, y0: float, x0: float, y1: float, x1: float) -> np.ndarray:
    """Apex at the top centre, base at y1."""
    yy, xx = np.ogrid[:h, :w]
    t = np.clip((yy + 0.5 - y0) / max(y1 - y0, 1e-6), 0, None)
    half = t * (x1 - x0) / 2
    cx = (x0 + x1) / 2
    return (yy + 0.5 >= y0) & (yy + 0.5 < y1) & (np.abs(xx + 0.5 - cx) <= half)


def draw_object(cls: str, h: int, w: int, box: tuple[float, float, float, float]) -> list[tuple[str, np.ndarray]]:
    """Part masks of one object inside box (y0, x0, y1, x1); the parts are disjoint."""
    y0, x0, y1, x1 = box
    bh, bw = y1 - y0, x1 - x0
    cx = (x0 + x1) / 2
    if cls == "circle":
        return [(cls, _disk(h, w, (y0 + y1) / 2, cx, min(bh, bw) / 2))]
    if cls == "square":
        return [(cls, _rect(h, w, y0, x0, y1, x1))]
    if cls == "triangle":
        return [(cls, _triangle(h, w, y0, x0, y1, x1))]
    if cls == "house":
        split = y0 + 0.42 * bh
        walls = _rect(h, w, split, x0 + 0.12 * bw, y1, x1 - 0.12 * bw)
        return [("roof", _triangle(h, w, y0, x0, split, x1) & ~walls), ("walls", walls)]
    if cls == "tree":
        r = min(bw / 2, 0.34 * bh)
        crown = _disk(h, w, y0 + r, cx, r)
        trunk = _rect(h, w, y0 + r, cx - 0.14 * bw, y1, cx + 0.14 * bw) & ~crown
        return [("crown", crown), ("trunk", trunk)]
    if cls == "snowman":
        rb = min(bw / 2, 0.3 * bh)
        body = _disk(h, w, y1 - rb, cx, rb)
        rh = 0.65 * rb
        head = _disk(h, w, y1 - 2 * rb - rh + 1, cx, rh) & ~body
        return [("head", head), ("body", body)]
    raise ValueError(f"unknown class {cls!r}")


def render_scene(specs: list[tuple[str, str]], size: int, rng: random.Random) -> tuple[np.ndarray, list[dict]]:
    """Place and draw (colour, class) objects without overlap; returns the image and per object
    {"colour", "class", "mask", "parts": [(name, mask)]} (parts empty for one-part classes)."""
    scale = 1.0
    while True:
        boxes = _place(specs, size, rng, scale)
        if boxes is not None:
            break
        scale *= 0.85  # crowded: shrink everything and try again
    bg = rng.randint(185, 235)
    img = np.full((size, size, 3), bg, dtype=np.float32)
    img += np.array([rng.uniform(-8, 8) for _ in range(3)], dtype=np.float32)
    objects = []
    for (colour, cls), box in zip(specs, boxes):
        base = np.array(COLOURS[colour], dtype=np.float32) + np.array([rng.uniform(-12, 12) for _ in range(3)])
        parts = draw_object(cls, size, size, box)
        shades = dict(CLASSES[cls]) or {cls: 1.0}
        for name, m in parts:
            img[m] = np.clip(base * shades[name], 0, 255)
        whole = np.logical_or.reduce([m for _, m in parts])
        objects.append({"colour": colour, "class": cls, "mask": whole, "parts": parts if CLASSES[cls] else []})
    if rng.random() < 0.5:  # lightly noisy half of the time
        noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 4, img.shape)
        img += noise.astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8), objects


def _place(specs: list[tuple[str, str]], size: int, rng: random.Random, scale: float):
    boxes: list[tuple[float, float, float, float]] = []
    for _, cls in specs:
        for _ in range(100):
            bh = rng.uniform(0.24, 0.36) * size * scale
            bw = bh * (rng.uniform(0.6, 0.75) if cls in TALL else rng.uniform(0.85, 1.15))
            y0, x0 = rng.uniform(1, size - 1 - bh), rng.uniform(1, size - 1 - bw)
            box = (y0, x0, y0 + bh, x0 + bw)
            if all(box[2] + 2 <= b[0] or b[2] + 2 <= box[0] or box[3] + 2 <= b[1] or b[3] + 2 <= box[1] for b in boxes):
                boxes.append(box)
                break
        else:
            return None
    return boxes


# --- tasks ---------------------------------------------------------------------------------------

def _user(prompt: str) -> dict:
    return {"role": "user", "content": f"{IMAGE_TOKEN}\n{prompt}"}


def _other(options, exclude, rng: random.Random):
    return rng.choice([o for o in options if o != exclude])


def _random_specs(n: int, rng: random.Random, avoid: tuple[str, str] | None = None) -> list[tuple[str, str]]:
    out = []
    while len(out) < n:
        spec = (rng.choice(list(COLOURS)), rng.choice(list(CLASSES)))
        if spec != avoid:
            out.append(spec)
    return out


def _left_to_right(objects: list[dict]) -> list[dict]:
    return sorted(objects, key=lambda o: float(np.nonzero(o["mask"])[1].mean()))


def make_sample(task: str, key: str, size: int, rng: random.Random) -> tuple[np.ndarray, Sample]:
    """One image and its sample for `task`; every random choice comes from `rng`."""
    colours, classes = list(COLOURS), list(CLASSES)
    query: dict = {}
    if task in ("referring", "empty_referring", "box_referring"):
        # The target (c, k) is identified only by both words: the scene holds c with another class
        # and k with another colour, and never a second (c, k).
        c, k = rng.choice(colours), rng.choice(classes)
        specs = [(_other(colours, c, rng), k), (c, _other(classes, k, rng))]
        specs += _random_specs(rng.randint(0, 1), rng, avoid=(c, k))
        if task != "empty_referring":
            specs.append((c, k))
        rng.shuffle(specs)
        image, objects = render_scene(specs, size, rng)
        if task == "empty_referring":
            conv = [_user(rng.choice(REFER_PROMPTS).format(f"{c} {k}")),
                    {"role": "assistant", "content": rng.choice(EMPTY_ANSWERS).format(f"{c} {k}")}]
            owned: list[tuple[str, np.ndarray]] = []
            query = {"colour": c, "class": k, "part": None}
        else:
            target = next(o for o in objects if (o["colour"], o["class"]) == (c, k))
            part = None
            if target["parts"] and rng.random() < 0.3:
                part, mask = rng.choice(target["parts"])
                ref = f"{part} of the {c} {k}"
            else:
                mask, ref = target["mask"], f"{c} {k}"
            owned = [(f"the {ref}", mask)]
            conv = [_user(rng.choice(REFER_PROMPTS).format(ref)),
                    {"role": "assistant", "content": rng.choice(REFER_ANSWERS).format(mgsc.grounded(f"the {ref}"))}]
            query = {"colour": c, "class": k, "part": part}
    elif task in ("multi_referring", "group_referring"):
        n = rng.randint(2, 3)
        if rng.random() < 0.5:
            c = rng.choice(colours)
            specs = [(c, rng.choice(classes)) for _ in range(n)] + [(_other(colours, c, rng), rng.choice(classes))]
            group, match = f"{c} objects", lambda o: o["colour"] == c
            query = {"colour": c, "class": None, "part": None}
        else:
            k = rng.choice(classes)
            specs = [(rng.choice(colours), k) for _ in range(n)] + [(rng.choice(colours), _other(classes, k, rng))]
            group, match = mgsc.plural(k), lambda o: o["class"] == k
            query = {"colour": None, "class": k, "part": None}
        rng.shuffle(specs)
        image, objects = render_scene(specs, size, rng)
        owned = [(f"the {o['colour']} {o['class']}", o["mask"]) for o in _left_to_right([o for o in objects if match(o)])]
        if task == "group_referring":  # one [SEG] for the whole set: its instances are matched as a set
            answer = "Sure, " + mgsc.grounded(f"the {group}") + "."
            conv = [_user(rng.choice(GROUP_PROMPTS).format(group)), {"role": "assistant", "content": answer}]
        else:
            answer = "Sure, " + mgsc.join([mgsc.grounded(p) for p, _ in owned]) + "."
            conv = [_user(rng.choice(MULTI_PROMPTS).format(group)), {"role": "assistant", "content": answer}]
    elif task in ("panoptic_segcap", "finegrained_segcap"):
        specs = _random_specs(rng.randint(2, 4), rng)
        if task == "finegrained_segcap":
            specs[0] = (specs[0][0], rng.choice([k for k in classes if CLASSES[k]]))
            rng.shuffle(specs)
        image, objects = render_scene(specs, size, rng)
        masks, labels = [], []
        for o in objects:  # the labeller of synthetic scenes knows every label
            masks += [o["mask"]] + [m for _, m in o["parts"]]
            labels += [f"{o['colour']} {o['class']}"] + [name for name, _ in o["parts"]]
        samples = mgsc.annotate(image, masks, lambda img, ms: labels, key=key, dataset="synthetic", rng=rng,
                                extra={"objects": _objects(objects)})
        pool = [s for s in samples if s.task == task]
        return image, rng.choice(pool)
    else:
        raise ValueError(f"unknown synthetic task {task!r}")
    if task == "group_referring":
        anns = [group_ann([m for _, m in owned], f"the {group}")]
    elif task == "box_referring":  # the referring sample, annotated as detection data is: a box only
        anns = [box_ann(m, p) for p, m in owned]
    else:
        anns = [mask_ann(m, p) for p, m in owned]
    sample = Sample(
        task=task,
        conversation=conv,
        masks=anns,
        image_size=[size, size],
        source={"dataset": "synthetic", "id": key},
        extra={"objects": _objects(objects), "query": query},
    )
    return image, sample


def _objects(objects: list[dict]) -> list[dict]:
    """Every whole object, for the text-blind baseline (union of all objects)."""
    return [{"rle": encode_mask(o["mask"]), "label": o["class"], "colour": o["colour"]} for o in objects]


def generate(n: int, seed: int, size: int = 64, mix: dict[str, float] | None = None, prefix: str = "s"):
    """Yield (key, image, sample) for n samples; sample i depends only on (seed, i)."""
    mix = mix or DEFAULT_MIX
    tasks, weights = list(mix), list(mix.values())
    for i in range(n):
        rng = random.Random(f"{seed}-{i}")
        task = rng.choices(tasks, weights)[0]
        key = f"{prefix}{i:07d}"
        image, sample = make_sample(task, key, size, rng)
        yield key, image, sample


def write_synthetic(cfg: SyntheticConfig) -> tuple[str, str]:
    """Write train and val shard folders (val from another seed: held-out scenes); returns their paths."""
    out = Path(cfg.out_dir)
    mix = dict(cfg.task_mix) if cfg.task_mix else None
    train_dir, val_dir = out / "train", out / "val"
    write_shards(generate(cfg.num_train, cfg.seed, cfg.image_size, mix, "train"), train_dir, maxcount=cfg.samples_per_shard)
    write_shards(generate(cfg.num_val, cfg.seed + 7919, cfg.image_size, mix, "val"), val_dir, maxcount=cfg.samples_per_shard)
    return str(train_dir), str(val_dir)


# --- tokenizer -----------------------------------------------------------------------------------

def vocabulary() -> list[str]:
    """Every word the synthetic data and the chat template can produce."""
    texts = [SYSTEM, "USER: ASSISTANT:", "Sure, the of objects a an its their with and several < > [ ] / \\"]
    texts += [t.replace("{}", " ") for t in (*REFER_PROMPTS, *REFER_ANSWERS, *MULTI_PROMPTS, *GROUP_PROMPTS, *EMPTY_ANSWERS)]
    texts += [t.replace("{}", " ") for t in (*mgsc.PANOPTIC_PROMPTS, *mgsc.PANOPTIC_OPENERS)]
    texts += [t.replace("{}", " ") for t in (*mgsc.FINEGRAINED_PROMPTS, *mgsc.FINEGRAINED_OPENERS)]
    texts += list(mgsc.NUMBERS.values()) + list(COLOURS)
    for cls, parts in CLASSES.items():
        texts += [cls, mgsc.plural(cls)] + [p for p, _ in parts] + [mgsc.plural(p) for p, _ in parts]
    words: set[str] = set()
    pre = _pre_tokenizer()
    for t in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(t))
    return sorted(words)


def _pre_tokenizer():
    # Words and each punctuation character on their own ("house." -> "house", ".").
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the synthetic vocabulary with the Vicuna-v1 chat template.

    The four special tokens are not in it: modeling adds them (then they are single ids, matched
    before pre-tokenisation)."""
    specials = ["<unk>", "<s>", "</s>", "<pad>"]  # Llama order: unk 0, bos 1, eos 2
    vocab = {tok: i for i, tok in enumerate(specials + vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = _pre_tokenizer()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=4096
    )
    fast.chat_template = VICUNA_V1_TEMPLATE
    return fast

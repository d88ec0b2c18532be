"""Fuzzing the loader's Decoder (datapipes.loader.Decoder) with random and mutated USCDF JSON, RLE
strings and tar members: every input must come out as a valid Example or as a BadSample (a counted
skip with a reason), never as another exception that would stop a training run. Seeded: a failure
prints the seed and input that reproduce it."""

import copy
import io
import json
import random
import traceback

import numpy as np
import pytest
from PIL import Image

from datapipes.loader import Decoder
from datapipes.schema import IMAGE_TOKEN, SEG_TOKEN, SPECIAL_TOKENS, BadSample
from datapipes.synthetic import build_tokenizer, generate

SIZE = 16  # image side: keeps each decode cheap
TRIALS = 1500  # per family; about 10 s in all on an idle core

JUNK = [None, True, False, 0, -1, 1, 7, 2**63, -(2**70), 0.5, -3.25, float("nan"), float("inf"), "", "x",
        "\u00e9\u4e2d\U0001f600", "\x00", "\ud800", IMAGE_TOKEN, SEG_TOKEN, [], {}, [1, 2], [SIZE, SIZE], [[SIZE]],
        {"size": [SIZE, SIZE], "counts": "0"}, {"role": "user"}, ["a", "b", "c", "d"], "0" * 300]


@pytest.fixture(scope="module")
def decoder():
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    return Decoder(tok, num_image_tokens=4, max_length=256)


@pytest.fixture(scope="module")
def seeds():
    """Valid samples of every task, as raw tar members (what webdataset hands the decoder)."""
    out = []
    for key, image, sample in generate(24, seed=5, size=SIZE):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, "PNG") if isinstance(image, np.ndarray) else image.save(buf, "PNG")
        out.append({"__key__": key, "png": buf.getvalue(), "json": sample.to_dict()})
    return out


def outcome(decoder, raw: dict):
    """'ok', 'skip:<reason>', or the escaping exception's traceback."""
    try:
        ex = decoder(raw)
    except BadSample as e:
        assert e.reason and str(e), "a BadSample must name its reason and problem"
        return f"skip:{e.reason}"
    except Exception:  # noqa: BLE001 - the finding
        return traceback.format_exc(limit=-4)
    h, w = ex.image.height, ex.image.width
    assert ex.masks.ndim == 3 and ex.masks.shape[1:] == (h, w) and set(np.unique(ex.masks)) <= {0, 1}
    return "ok"


def paths(node, prefix=()):
    """Every (path, value) inside a JSON value, the root included."""
    yield prefix, node
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield from paths(v, (*prefix, k))


def mutate_json(rng: random.Random, d: dict) -> dict:
    d = copy.deepcopy(d)
    for _ in range(rng.randint(1, 3)):
        path, _ = rng.choice(list(paths(d))[1:])
        parent = d
        for k in path[:-1]:
            parent = parent[k]
        op = rng.random()
        if op < 0.15 and isinstance(parent, dict):
            del parent[path[-1]]
        elif op < 0.25 and isinstance(parent, list):
            parent.insert(path[-1], copy.deepcopy(rng.choice(JUNK)))
        else:
            parent[path[-1]] = copy.deepcopy(rng.choice(JUNK))
    return d


def mutate_rle(rng: random.Random, counts: str) -> str:
    chars = list(counts)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        i = rng.randrange(len(chars) + 1)
        if op < 0.3 and chars:
            chars[min(i, len(chars) - 1)] = chr(rng.choice([rng.randrange(32, 127), rng.randrange(0, 0x250)]))
        elif op < 0.5:
            chars.insert(i, chr(rng.randrange(48, 112)))
        elif op < 0.7:
            del chars[i:]
        else:
            chars[i:i] = chars[: rng.randrange(1, 8)]
    return "".join(chars)


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.random()
        i = rng.randrange(len(b) + 1)
        if op < 0.5 and b:
            b[min(i, len(b) - 1)] = rng.randrange(256)
        elif op < 0.7:
            del b[i:]
        else:
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
    return bytes(b)


def random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(6 if depth < 4 else 4)
    if kind == 4:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 5:
        keys = ["task", "conversation", "masks", "image_size", "source", "extra", "rle", "box", "phrase", "x"]
        return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randrange(6))}
    return copy.deepcopy(rng.choice(JUNK))


def family_inputs(family: str, rng: random.Random, seeds: list[dict]):
    base = copy.deepcopy(rng.choice(seeds))
    raw = {"__key__": base["__key__"], "png": base["png"]}
    d = base["json"]
    if family == "json":  # structural mutations of a valid sample
        raw["json"] = json.dumps(mutate_json(rng, d), allow_nan=True).encode()
    elif family == "rle":  # mutated counts strings (and sizes) of a sample with masks
        regions = [m for m in d["masks"] if m["rle"]] + [i for m in d["masks"] for i in m.get("instances", []) if i["rle"]]
        for r in regions:
            r["rle"]["counts"] = mutate_rle(rng, r["rle"]["counts"])
            if rng.random() < 0.2:
                r["rle"]["size"] = rng.choice(JUNK)
        raw["json"] = json.dumps(d).encode()
    elif family == "bytes":  # the JSON member's bytes damaged, or random
        text = json.dumps(d).encode()
        op = rng.random()
        if op < 0.8:
            raw["json"] = mutate_bytes(rng, text)
        elif op < 0.9:
            raw["json"] = json.dumps(random_json(rng)).encode()
        else:  # nested deeper than Python's recursion limit
            raw["json"] = rng.choice([b"[", b'{"a":']) * rng.randrange(1, 50_000)
    elif family == "members":  # tar members missing, renamed, swapped or damaged
        raw["json"] = json.dumps(d).encode()
        op = rng.randrange(6)
        if op == 0:
            del raw[rng.choice(["png", "json"])]
        elif op == 1:
            raw[rng.choice(["jpg", "jpeg"])] = raw.pop("png")
        elif op == 2:
            raw["png"] = mutate_bytes(rng, raw["png"])
        elif op == 3:
            raw["png"], raw["json"] = raw["json"], raw["png"]
        elif op == 4:
            raw["png"] = rng.choice([b"", b"\x89PNG\r\n\x1a\n", bytes(rng.randrange(256) for _ in range(64))])
        else:
            big = Image.new("RGB", (SIZE + rng.randrange(1, 4), SIZE))
            buf = io.BytesIO()
            big.save(buf, rng.choice(["PNG", "JPEG"]))
            raw["png"] = buf.getvalue()
    return raw


@pytest.mark.parametrize("family", ["json", "rle", "bytes", "members"])
def test_decoder_turns_every_fuzzed_input_into_a_sample_or_a_counted_skip(decoder, seeds, family):
    assert all(outcome(decoder, s | {"json": json.dumps(s["json"]).encode()}) == "ok" for s in seeds)
    rng = random.Random(f"fuzz-{family}")
    counts: dict[str, int] = {}
    escaped = []
    for trial in range(TRIALS):
        raw = family_inputs(family, rng, seeds)
        result = outcome(decoder, raw)
        if result.startswith(("ok", "skip:")):
            counts[result] = counts.get(result, 0) + 1
        else:
            escaped.append(f"trial {trial} ({family}): {raw.get('json', b'')[:300]!r}\n{result}")
    assert not escaped, f"{len(escaped)} of {TRIALS} inputs escaped as exceptions; first:\n{escaped[0]}"
    # The fuzzer reached both outcomes (a mutation that never invalidates, or always does, tests little).
    assert sum(v for k, v in counts.items() if k.startswith("skip:")) > TRIALS // 10, counts
    print(family, dict(sorted(counts.items())))

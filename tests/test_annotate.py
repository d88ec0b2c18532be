"""MGSC annotation at scale (datapipes/annotate.py, datapipes/labellers.py): SA-1B-format files written here, the
mask filter, the mask tree's ties and alignment, the `openai` labeller against a real HTTP server that misbehaves
(slow, 429 + Retry-After, 500, malformed JSON, timeout), its cache across a restart, and shards the loader reads."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from datapipes import mgsc
from datapipes.annotate import (
    GT_CAPTIONS,
    GT_MASKS,
    MaskFilter,
    annotate_folder,
    filter_masks,
    held_out,
    plain_caption,
)
from datapipes.config import DataConfig, SourceConfig
from datapipes.labellers import FileLabeller, LabelCache, LabellerError, OpenAILabeller, clean_label
from datapipes.loader import build_train_loader
from datapipes.schema import P_END, P_START, SEG_TOKEN, SPECIAL_TOKENS
from datapipes.synthetic import build_tokenizer

H, W = 48, 64
# (label, colour, box x0, y0, x1, y1): a blue house with a red door in its lower left, a green tree beside it
SCENE = [("house", (30, 60, 220), 4, 6, 36, 44), ("door", (220, 30, 30), 8, 26, 18, 42), ("tree", (30, 200, 40), 44, 10, 60, 40)]


def box_mask(x0, y0, x1, y1):
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def rle_json(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def write_sa1b(folder: Path, stem: str, extra_anns=(), scene=SCENE) -> list[np.ndarray]:
    """sa_<id>.jpg + sa_<id>.json exactly as SA-1B ships them (FORMATS.md section 10)."""
    img = np.full((H, W, 3), 240, np.uint8)
    masks = []
    for _, colour, x0, y0, x1, y1 in scene:
        img[y0:y1, x0:x1] = colour
        masks.append(box_mask(x0, y0, x1, y1))
    Image.fromarray(img).save(folder / f"{stem}.jpg", quality=95)
    anns = [
        {"id": i, "segmentation": rle_json(m), "bbox": [float(v) for v in mask_utils.toBbox(mask_utils.encode(
            np.asfortranarray(m.astype(np.uint8))))], "area": int(m.sum()), "predicted_iou": 0.95,
         "stability_score": 0.97, "crop_box": [0, 0, W, H], "point_coords": [[1.0, 1.0]]}
        for i, m in enumerate(masks)
    ] + list(extra_anns)
    (folder / f"{stem}.json").write_text(json.dumps({"image": {"image_id": 1, "width": W, "height": H,
                                                               "file_name": f"{stem}.jpg"}, "annotations": anns}))
    return masks


# ---------------------------------------------------------------- mask tree and filter


def test_equal_masks_nest_in_input_order_and_ties_keep_both():
    m = box_mask(0, 0, 10, 10)
    root = mgsc.build_mask_tree([m, m.copy()], ["wheel", "tyre"])
    assert [c.label for c in root.children] == ["wheel"] and [c.label for c in root.children[0].children] == ["tyre"]


def test_every_answer_aligns_its_phrases_and_masks_one_to_one():
    masks = [box_mask(*s[2:]) for s in SCENE] + [box_mask(48, 12, 56, 20)]
    labels = ["house", "door", "tree", "leaf"]
    import random

    samples = mgsc.annotate(None, masks, lambda _i, _m: labels, key="k", dataset="t", rng=random.Random(0))
    assert [s.task for s in samples] == ["panoptic_segcap", "finegrained_segcap", "finegrained_segcap"]
    for s in samples:
        answer = s.conversation[-1]["content"]
        phrases = re.findall(re.escape(P_START) + r" (.*?) " + re.escape(P_END) + " " + re.escape(SEG_TOKEN), answer)
        assert answer.count(SEG_TOKEN) == len(s.masks) == len(phrases)
        assert phrases == [m.phrase for m in s.masks]


def test_filter_drops_low_scores_specks_and_near_duplicates_keeping_the_better_one(tmp_path):
    base = box_mask(10, 10, 30, 30)
    near = base.copy()
    near[10, 10] = False  # IoU 399/400 with base
    anns = [
        {"id": "base", "segmentation": rle_json(base), "predicted_iou": 0.90, "stability_score": 0.96},
        {"id": "near_better", "segmentation": rle_json(near), "predicted_iou": 0.99, "stability_score": 0.99},
        {"id": "low_iou", "segmentation": rle_json(box_mask(0, 0, 8, 8)), "predicted_iou": 0.5, "stability_score": 0.99},
        {"id": "unstable", "segmentation": rle_json(box_mask(40, 0, 50, 8)), "predicted_iou": 0.99, "stability_score": 0.8},
        {"id": "speck", "segmentation": rle_json(box_mask(60, 40, 61, 41)), "predicted_iou": 0.99, "stability_score": 0.99},
        {"id": "other", "segmentation": rle_json(box_mask(40, 20, 60, 40)), "predicted_iou": 0.95, "stability_score": 0.95},
        {"id": "wrong_size", "segmentation": {"size": [10, 10], "counts": "0"}},
        {"id": "no_rle", "segmentation": [[0, 0, 5, 0, 5, 5]]},
    ]
    bad = []
    kept = filter_masks(anns, H, W, MaskFilter(min_area_fraction=0.01), lambda r, m: bad.append(r))
    assert [k["id"] for k in kept] == ["near_better", "other"]
    assert sorted(bad) == ["bad_annotation", "bad_rle"]
    capped = filter_masks(anns, H, W, MaskFilter(min_area_fraction=0.01, max_masks=1), lambda r, m: None)
    assert [k["id"] for k in capped] == ["near_better"]


def test_held_out_split_is_stable_and_near_its_fraction():
    stems = [f"sa_{i}" for i in range(4000)]
    share = sum(held_out(s, 0.1) for s in stems) / len(stems)
    assert 0.08 < share < 0.12 and [held_out(s, 0.1) for s in stems[:50]] == [held_out(s, 0.1) for s in stems[:50]]


def test_labels_are_cleaned_to_short_noun_phrases():
    assert clean_label("A Red car.\nmore") == "red car"
    assert clean_label("  the  door ") == "door" and clean_label("None") == "" and clean_label("") == ""


# ---------------------------------------------------------------- a real OpenAI-compatible server


class Server:
    """A chat-completions endpoint on 127.0.0.1. It names the region by the colour at the centre of the close-up
    (red door, blue house, green tree) and follows a script of misbehaviours, one per request, then answers."""

    COLOURS = {0: "door", 1: "tree", 2: "house"}

    def __init__(self, script=()):
        self.script = list(script)
        self.requests = []  # digest of each request's close-up, in arrival order
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                assert self.path == "/v1/chat/completions" and body["model"] == "tiny-vlm"
                crop = body["messages"][0]["content"][2]["image_url"]["url"].split(",", 1)[1]
                with outer.lock:
                    outer.requests.append(hashlib.sha256(crop.encode()).hexdigest())
                    action = outer.script.pop(0) if outer.script else ("ok",)
                if action[0] == "sleep":
                    import time

                    time.sleep(action[1])
                    action = ("ok",)
                if action[0] == "status":
                    self.send_response(action[1])
                    for k, v in action[2].items() if len(action) > 2 else ():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(b'{"error": "try later"}')
                    return
                if action[0] == "malformed":
                    payload = b'{"choices": [ {"message": '  # cut off
                else:
                    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(crop))).convert("RGB"))
                    centre = img[img.shape[0] // 2, img.shape[1] // 2].astype(int)
                    label = outer.COLOURS[int(np.argmax(centre))]
                    payload = json.dumps({"choices": [{"message": {"role": "assistant",
                                                                   "content": f"The {label}."}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    made = []

    def make(script=()):
        made.append(Server(script))
        return made[-1]

    yield make
    for s in made:
        s.close()


def image_and_masks():
    img = np.full((H, W, 3), 240, np.uint8)
    masks = []
    for _, colour, x0, y0, x1, y1 in SCENE:
        img[y0:y1, x0:x1] = colour
        masks.append(box_mask(x0, y0, x1, y1))
    return img, masks


def labeller(url, **kw):
    return OpenAILabeller(url, "tiny-vlm", "secret", concurrency=2, backoff_s=0.01, max_backoff_s=2.0, **kw)


def test_openai_labeller_names_each_region(server):
    s = server()
    img, masks = image_and_masks()
    assert labeller(s.url).label("img", img, masks) == ["house", "door", "tree"]
    assert len(s.requests) == 3


def test_openai_labeller_survives_429_with_retry_after_500s_and_malformed_replies(server):
    s = server([("status", 429, {"Retry-After": "1"}), ("status", 500), ("status", 503), ("malformed",)])
    img, masks = image_and_masks()
    lab = labeller(s.url)
    assert lab.label("img", img, masks) == ["house", "door", "tree"]
    assert len(s.requests) == 3 + 4 and lab.requests_sent == 7


def test_openai_labeller_retries_a_timeout_and_waits_out_a_slow_answer(server):
    s = server([("sleep", 1.5), ("sleep", 0.3)])
    img, masks = image_and_masks()
    lab = OpenAILabeller(s.url, "tiny-vlm", concurrency=1, timeout_s=1.0, backoff_s=0.01)
    assert lab.label("img", img, masks[:2]) == ["house", "door"]
    assert len(s.requests) == 3  # the timed-out one was asked again; the slow one was waited for


def test_openai_labeller_gives_up_with_a_clear_error_and_never_retries_a_4xx(server):
    img, masks = image_and_masks()
    s = server([("status", 500)] * 10)
    with pytest.raises(LabellerError, match="gave up after 3 attempts; last: HTTP 500"):
        labeller(s.url, max_retries=2).label("img", img, masks[:1])
    s = server([("status", 401)])
    with pytest.raises(LabellerError, match="HTTP 401"):
        labeller(s.url).label("img", img, masks[:1])
    assert len(s.requests) == 1


@pytest.mark.slow
def test_a_killed_and_restarted_annotation_asks_no_region_twice(server, tmp_path):
    """A real `launcher data annotate` process killed while the server answers, then run again with the same
    arguments: the cache (SQLite beside the shards) means no region is answered twice, and every image lands."""
    import subprocess
    import sys
    import time

    src = tmp_path / "sa1b"
    src.mkdir()
    for i in range(4):  # colours differ a little, so every region's close-up (what the server records) is unique
        scene = [(lab, tuple(c - 8 * i for c in colour), *box) for lab, colour, *box in SCENE]
        write_sa1b(src, f"sa_{i}", scene=scene)
    s = server([("sleep", 0.4)] * 12)
    cmd = [sys.executable, "-m", "launcher", "data", "annotate", "--src", str(src), "--out", str(tmp_path / "out"),
           "--labeller", "openai", "--url", s.url, "--model", "tiny-vlm", "--concurrency", "1",
           "--val-fraction", "0", "--min-shards", "4"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while len(s.requests) < 5 and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    first.kill()
    first.wait()
    asked_before = len(s.requests)
    assert 5 <= asked_before < 12  # killed mid-run
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    manifest = json.loads((tmp_path / "out" / "train" / "manifest.json").read_text())
    assert manifest["total"] == 4 * 2 and manifest["convert"]["bad"] == {}
    answered = s.requests  # every request was answered (the killed one at most once, mid-flight)
    assert len(answered) <= 12 + 1 and len(set(answered)) >= 12
    assert len(answered) - len(set(answered)) <= 1  # only a request in flight at the kill can repeat


# ---------------------------------------------------------------- end to end


def test_annotate_writes_shards_and_ground_truth_that_the_loader_trains_on(tmp_path):
    src = tmp_path / "sa1b"
    src.mkdir()
    stems = [f"sa_{i}" for i in range(6)]
    for stem in stems:
        write_sa1b(src, stem, extra_anns=[{"id": 99, "segmentation": rle_json(box_mask(0, 0, 2, 2)),
                                           "predicted_iou": 0.3, "stability_score": 0.3}])
    labels = {stem: {"0": "house", "1": "door", "2": "tree"} for stem in stems}
    labels["sa_5"] = {}  # named nothing: skipped and counted
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    from launcher.__main__ import main

    rc = main(["data", "annotate", "--src", str(src), "--out", str(tmp_path / "out"), "--labeller", "file",
               "--labels", str(tmp_path / "labels.json"), "--val-fraction", "0.34", "--min-shards", "2"])
    assert rc == 0
    train, val = (json.loads((tmp_path / "out" / s / "manifest.json").read_text()) for s in ("train", "val"))
    n_val = sum(held_out(s, 0.34) for s in stems if s != "sa_5")
    assert train["total"] + val["total"] == 2 * 5 and val["total"] == 2 * n_val
    assert train["tasks"].get("panoptic_segcap") == train["tasks"].get("finegrained_segcap")
    bad = {**train["convert"]["bad"], **val["convert"]["bad"]}
    assert bad == {"no_label": 1}
    gt_caps = json.loads((tmp_path / "out" / "val" / GT_CAPTIONS).read_text())
    gt_masks = json.loads((tmp_path / "out" / "val" / GT_MASKS).read_text())
    assert len(gt_caps["annotations"]) == val["total"] and all("[SEG]" not in a["caption"] for a in gt_caps["annotations"])
    panoptic = [a for a in gt_masks["annotations"] if a["image_id"].endswith("-0")]
    assert sorted(a["phrase"] for a in panoptic) == sorted(["a house", "a tree"] * n_val)
    house = next(a for a in panoptic if a["phrase"] == "a house")
    decoded = mask_utils.decode({"size": house["segmentation"]["size"], "counts": house["segmentation"]["counts"].encode()})
    assert np.array_equal(decoded.astype(bool), box_mask(4, 6, 36, 44))  # the SA-1B RLE, unchanged
    # photos are the original JPEG bytes
    import tarfile

    shard = tmp_path / "out" / "train" / train["shards"][0]["url"]
    with tarfile.open(shard) as tar:
        jpg = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        stem = jpg.name.split("-")[2]
        assert tar.extractfile(jpg).read() == (src / f"{stem}.jpg").read_bytes()

    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    cfg = DataConfig(train=[SourceConfig(name="mgsc", path=str(tmp_path / "out" / "train"))], val=[], batch_size=2,
                     num_workers=0, max_length=300)
    batch = next(iter(build_train_loader(cfg, tok, num_image_tokens=4, clip_size=32, sam_size=48, rank=0,
                                         world_size=1, seed=0)))
    assert set(batch.tasks) <= {"panoptic_segcap", "finegrained_segcap"} and batch.skipped == {}
    assert all(m.shape[0] >= 2 and m.any() for m in batch.gt_masks)


def test_plain_caption_drops_the_grounding_markup():
    assert plain_caption("Here is <p> the house </p> [SEG] with <p> its door </p> [SEG].") == \
        "Here is the house with its door."


def test_file_labeller_reads_lists_and_index_maps(tmp_path):
    path = tmp_path / "l.json"
    path.write_text(json.dumps({"a": ["Dog", "a cat"], "b": {"1": "tree"}}))
    lab = FileLabeller(path)
    assert lab.label("a", None, [None] * 3, refs=[("7", 1), ("8", 0), ("9", 2)]) == ["cat", "dog", ""]
    assert lab.label("b", None, [None] * 2, refs=[("1", 0), ("2", 1)]) == ["tree", ""]
    assert lab.label("zzz", None, [None]) == [""]
    path.write_text("[1, 2]")
    with pytest.raises(LabellerError, match="expected"):
        FileLabeller(path)

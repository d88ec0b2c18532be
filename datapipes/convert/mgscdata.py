"""MGSCData (MGLMM), as far as its loader code describes the unreleased format (FORMATS.md section 9): per
SA-1B photo a JSON list of tree nodes, `root` (panoptic SegCap) and `subtree:<label>` (fine-grained), each
a `gcg_caption` tagging phrases `<k>...</k>` whose masks are JSON strings of RLE with base64 counts.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

from datapipes.convert.common import (
    BadRecord,
    ConvertError,
    Output,
    read_photo,
    rle_ann,
    rng_for,
    segm_rle,
)
from datapipes.convert.run import Converter
from datapipes.mgsc import grounded
from datapipes.schema import IMAGE_TOKEN, Sample

ROOT_PROMPTS = (
    ("Please provide a detailed description of all the objects present in this image, with interleaved "
    "segmentation masks for the corresponding parts of the answer."),
    "Can you describe every object in this image in detail? Please respond with interleaved segmentation masks.",
)
SUBTREE_PROMPTS = (
    ("Can you provide a detailed description of the different parts for {} in the image? Please respond with "
    "interleaved segmentation masks for the corresponding parts of the answer."),
    "Please describe the {} in the image and its parts in detail, with interleaved segmentation masks.",
)
TAG = re.compile(r"<([^<>/\s]+)>(.*?)</\1>", re.DOTALL)


class MGSCDataConverter(Converter):
    """--src MGLMM_gcg_new/ (MGLMM_{train,val}_split.txt, here or under annotations/, listing the files of
    annotations/), --images SegmentAnything/imgs/."""

    splits = ("train", "val")

    def __init__(self, args):
        super().__init__(args)
        name = f"MGLMM_{self.split}_split.txt"
        split_file = next((p for p in (self.src / name, self.src / "annotations" / name) if p.is_file()), None)
        if split_file is None:
            raise ConvertError(f"{self.name}: no {name} in {self.src} or {self.src / 'annotations'}")
        self.files = [ln.strip() for ln in split_file.read_text().splitlines() if ln.strip()]

    def units(self):
        return [(Path(f).stem, f) for f in self.files]

    def _annotation(self, entry: str) -> Path:
        path = self.src / "annotations" / entry
        return path if path.exists() else self.src / "annotations" / f"mglmm_{Path(entry).stem}.json"

    def image_path(self, payload) -> Path | None:
        return None  # the photo's name is inside the annotation file; the estimate goes without it

    def convert(self, uid, payload, bad) -> list[Output]:
        path = self._annotation(payload)
        try:
            nodes = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise BadRecord("missing_annotation", f"{path} does not exist") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRecord("bad_json", f"{path}: {e}") from e
        if not isinstance(nodes, list) or not nodes or not all(isinstance(n, dict) for n in nodes):
            raise BadRecord("bad_json", f"{path}: expected a list of tree nodes")
        photo = read_photo(self.images / nodes[0]["file_name"])
        rng = rng_for(self.name, self.split, uid)
        outs = []
        for i, node in enumerate(nodes):
            if not str(node.get("gcg_caption", "")).strip():
                continue  # MGLMM skips nodes without a caption
            try:
                outs.append(self._sample(node, uid, i, photo, rng))
            except BadRecord as e:
                bad(e.reason, f"{path.name} node {i}: {e}")
        return outs

    def _sample(self, node: dict, uid: str, i: int, photo, rng) -> Output:
        h, w = photo.height, photo.width
        masks = []

        def tag(m: re.Match) -> str:
            key, phrase = m.group(1), m.group(2).strip()
            if key not in node or "mask" not in node[key]:
                raise BadRecord("missing_mask", f"tag <{key}> has no mask entry")
            masks.append(rle_ann(_rle(node[key]["mask"], h, w, key), phrase, f"tag <{key}>"))
            return grounded(phrase)

        answer = TAG.sub(tag, node["gcg_caption"].strip())
        if not masks:
            raise BadRecord("no_phrase", "caption has no tagged phrase")
        label = str(node.get("label", "root"))
        if label.startswith("subtree:"):
            task, prompt = "finegrained_segcap", rng.choice(SUBTREE_PROMPTS).format(label.split(":", 1)[1])
        else:
            task, prompt = "panoptic_segcap", rng.choice(ROOT_PROMPTS)
        conv = [{"role": "user", "content": f"{IMAGE_TOKEN}\n{prompt}"}, {"role": "assistant", "content": answer}]
        source = {"dataset": self.name, "id": uid, "split": self.split, "node": i, "label": label,
                  "file_name": node.get("file_name")}
        return Output(Sample(task, conv, masks, [h, w], source), photo.data, reencoded=photo.reencoded)


def _rle(mask, h: int, w: int, key: str) -> dict:
    """MGLMM's mask: a JSON string of RLE whose counts are base64 of the compressed counts bytes."""
    try:
        rle = json.loads(mask) if isinstance(mask, str) else dict(mask)
        counts = base64.b64decode(rle["counts"])
        size = [int(v) for v in rle["size"]]
    except (ValueError, KeyError, TypeError) as e:
        raise BadRecord("bad_rle", f"tag <{key}>: mask is not a JSON RLE with base64 counts: {e}") from e
    if size != [h, w]:
        raise BadRecord("rle_size_mismatch", f"tag <{key}>: RLE size {size} != photo {h}x{w}")
    return segm_rle({"size": size, "counts": counts}, h, w, f"tag <{key}>")

"""GLaMM's GranD-f grounded-caption files -> panoptic SegCap samples: the caption with each grounded phrase
written `<p> phrase </p> [SEG]` (phrases in caption order, overlapping spans dropped), one mask per phrase.
--split names the file: grandf_train, psg_{train,val}, refcocog_{train,val}, flickr_{train,val}.
"""

from __future__ import annotations

import json
from pathlib import Path

from datapipes.convert.common import (
    BadRecord,
    ConvertError,
    Output,
    load_json,
    read_photo,
    rle_ann,
    rng_for,
    segm_rle,
    union_rle,
)
from datapipes.convert.run import Converter
from datapipes.mgsc import grounded
from datapipes.schema import IMAGE_TOKEN, Sample

FILES = {
    "grandf_train": "GranDf_HA_GCG_train.json",
    "psg_train": "OpenPsgGCG_train.json",
    "psg_val": "OpenPsgGCG_val.json",
    "refcocog_train": "RefCOCOg_GCG_train.json",
    "refcocog_val": "RefCOCOg_GCG_val.json",
    "flickr_train": "flickr_mergedGT_GCG_train.json",
    "flickr_val": "flickr_mergedGT_GCG_val.json",
}
GCG_PROMPTS = (
    ("Could you please give me a detailed description of the image? Please respond with interleaved segmentation "
    "masks for the corresponding parts of the answer."),
    ("Can you provide a thorough description of this image? Please output with interleaved segmentation masks "
    "for the corresponding phrases."),
    "Please describe the image in detail, with interleaved segmentation masks for the phrases of your answer.",
)


class GCGConverter(Converter):
    """--src GranDf/annotations/train/, --images the set's photos (SA-1B for grandf, coco/train2017 for psg,
    coco/train2014 for refcocog, flickr30k images for flickr)."""

    splits = tuple(FILES)

    def __init__(self, args):
        super().__init__(args)
        path = self.src / FILES[self.split]
        data = load_json(path)
        self.kind = self.split.split("_")[0]
        try:
            self.records = self._records(data)
        except (KeyError, TypeError, AttributeError, IndexError) as e:
            raise ConvertError(f"{path}: not a {self.kind} GCG file: {e}") from e

    def _records(self, data) -> list[tuple[str, dict]]:
        """(uid, {"file_name", "caption", "phrases": [(start, end, [segmentation, ...], text)]})."""
        out = []
        if self.kind in ("grandf", "psg"):
            for i, r in enumerate(data):
                phrases = [(*g["token_positives"][:2], g["rle_masks"], p) for p, g in r["groundings"].items()]
                out.append((f"{i}", {"file_name": r["file_name"], "caption": r["caption"], "phrases": phrases}))
        elif self.kind == "refcocog":
            for i, item in enumerate(data):
                key, r = next(iter(item.items()))
                cap = r["caption"]
                phrases = []
                for ref in r["refs"]:
                    start = cap.lower().find(ref["sentence"].lower())
                    phrases.append((start, start + len(ref["sentence"]), [ref["segmentation"]], ref["sentence"]))
                out.append((f"{i}-{key}", {"file_name": r["img_file_name"], "caption": cap, "phrases": phrases}))
        else:  # flickr: COCO-style, one annotation per box; annotations of one span are one phrase
            by_image: dict = {}
            for a in data["annotations"]:
                if not a.get("ignore"):
                    by_image.setdefault(a["image_id"], []).append(a)
            for im in data["images"]:
                spans: dict = {}
                for a in by_image.get(im["id"], []):
                    spans.setdefault(tuple(a["tokens_positive"][0][:2]), []).append(a["sam_mask"])
                phrases = [(s, e, segs, im["caption"][s:e]) for (s, e), segs in spans.items()]
                out.append((f"{im['id']}", {"file_name": im["file_name"], "caption": im["caption"], "phrases": phrases,
                                            "height": im.get("height"), "width": im.get("width")}))
        return out

    def units(self):
        return self.records

    def image_path(self, payload) -> Path:
        return self.images / payload["file_name"]

    def convert(self, uid, payload, bad) -> list[Output]:
        cap = payload["caption"].strip()
        if self.kind == "flickr":  # GLaMM drops short captions and tiny photos
            if len(cap.split()) < 3:
                raise BadRecord("short_caption", f"caption {cap!r} has fewer than 3 words")
            if min(payload.get("height") or 32, payload.get("width") or 32) < 32:
                raise BadRecord("small_image", f"{payload['file_name']} is under 32 pixels on a side")
        photo = read_photo(self.images / payload["file_name"])
        h, w = photo.height, photo.width
        text, masks, end = "", [], 0
        for start, stop, segs, phrase in sorted(payload["phrases"], key=lambda p: (p[0], p[1])):
            what = f"phrase {phrase!r}"
            if start < 0 or stop > len(cap) or stop <= start:
                bad("phrase_not_found", f"{what}: span {start}:{stop} is not in the caption {cap!r}")
                continue
            if start < end:
                bad("overlapping_phrase", f"{what} overlaps the phrase before it")
                continue
            try:
                rles = [segm_rle(_plain(s), h, w, what) for s in segs]
                ann = rle_ann(union_rle(rles), cap[start:stop], what)
            except BadRecord as e:
                bad(e.reason, str(e))
                continue
            text += cap[end:start] + grounded(cap[start:stop])
            masks.append(ann)
            end = stop
        if not masks:
            raise BadRecord("no_phrase", f"{payload['file_name']}: no grounded phrase left")
        text += cap[end:]
        rng = rng_for(self.name, self.split, uid)
        conv = [{"role": "user", "content": f"{IMAGE_TOKEN}\n{rng.choice(GCG_PROMPTS)}"},
                {"role": "assistant", "content": text}]
        source = {"dataset": self.name, "id": uid, "split": self.split, "file_name": payload["file_name"]}
        sample = Sample("panoptic_segcap", conv, masks, [h, w], source, extra={"caption": cap})
        return [Output(sample, photo.data, reencoded=photo.reencoded)]


def _plain(segm):
    """GranD-f stores some RLE as a JSON string."""
    return json.loads(segm) if isinstance(segm, str) else segm

"""Mask-free image-text sets: LLaVA-Pretrain (blip_laion_cc_sbu_558k.json) -> caption samples, LLaVA-Instruct
(llava_instruct_150k.json) -> vqa samples, COCO captions (captions_{split}2017.json) -> caption samples.
LLaVA turns: `<image>` is taken out and put first in the first human turn; a leading gpt turn is dropped.
"""

from __future__ import annotations

from pathlib import Path

from datapipes.convert.common import (
    BadRecord,
    ConvertError,
    Output,
    load_json,
    read_photo,
    rng_for,
)
from datapipes.convert.run import Converter
from datapipes.schema import IMAGE_TOKEN, Sample

ROLES = {"human": "user", "gpt": "assistant"}
CAPTION_PROMPTS = (
    "Please describe the image briefly.",
    "Write a short caption for this image.",
    "Can you briefly describe what you see in this image?",
    "Give a one-sentence description of the image.",
)


class LlavaConverter(Converter):
    """--src: the folder holding the JSON; --images: the photo root its `image` paths are under
    (llava_pretrain: the unzipped images/; llava_instruct: coco/train2017)."""

    json_file = "llava_instruct_150k.json"
    task = "vqa"

    def __init__(self, args):
        super().__init__(args)
        path = self.src / self.json_file
        self.records = load_json(path)
        if not isinstance(self.records, list):
            raise ConvertError(f"{path}: expected a list of {{id, image, conversations}} records")

    def units(self):
        return [(f"{i}-{r.get('id', '')}" if isinstance(r, dict) else str(i), i) for i, r in enumerate(self.records)]

    def image_path(self, payload) -> Path | None:
        image = self.records[payload].get("image") if isinstance(self.records[payload], dict) else None
        return self.images / image if isinstance(image, str) else None

    def convert(self, uid, payload, bad) -> list[Output]:
        r = self.records[payload]
        if not isinstance(r, dict) or not isinstance(r.get("conversations"), list):
            raise BadRecord("bad_record", f"record {payload} has no conversations list")
        if not isinstance(r.get("image"), str):
            raise BadRecord("no_image", f"record {payload} ({r.get('id')}) has no image (text-only)")
        turns = []
        for t in r["conversations"]:
            role = ROLES.get(t.get("from")) if isinstance(t, dict) else None
            if role is None or not isinstance(t.get("value"), str):
                raise BadRecord("bad_record", f"record {payload}: turn {t!r} is not {{from: human|gpt, value: str}}")
            turns.append({"role": role, "content": t["value"].replace(IMAGE_TOKEN, "").strip()})
        if turns and turns[0]["role"] == "assistant":
            turns = turns[1:]
        if len(turns) < 2 or turns[-1]["role"] != "assistant":
            raise BadRecord("bad_record", f"record {payload}: no question/answer pair")
        turns[0]["content"] = f"{IMAGE_TOKEN}\n{turns[0]['content']}"
        photo = read_photo(self.images / r["image"])
        source = {"dataset": self.name, "id": uid, "split": self.split, "record_id": r.get("id"), "file_name": r["image"]}
        sample = Sample(self.task, turns, [], [photo.height, photo.width], source)
        return [Output(sample, photo.data, reencoded=photo.reencoded)]


class LlavaPretrainConverter(LlavaConverter):
    json_file = "blip_laion_cc_sbu_558k.json"
    task = "caption"


class CocoCaptionConverter(Converter):
    """--src coco/annotations/ (captions_train2017.json), --images coco/train2017. One sample per photo: one of
    its captions, picked by a seeded draw; all of them are kept in extra["captions"]."""

    splits = ("train", "val")

    def __init__(self, args):
        super().__init__(args)
        path = self.src / f"captions_{self.split}2017.json"
        data = load_json(path)
        try:
            self.photos = {im["id"]: im for im in data["images"]}
            self.captions: dict[int, list[str]] = {}
            for a in sorted(data["annotations"], key=lambda a: a["id"]):
                self.captions.setdefault(a["image_id"], []).append(a["caption"].strip())
        except (KeyError, TypeError, AttributeError) as e:
            raise ConvertError(f"{path}: not COCO captions (images/annotations with caption): {e}") from e

    def units(self):
        return [(str(i), i) for i in sorted(self.captions)]

    def image_path(self, payload) -> Path | None:
        im = self.photos.get(payload)
        return self.images / im["file_name"] if im else None

    def convert(self, uid, payload, bad) -> list[Output]:
        im = self.photos.get(payload)
        if im is None:
            raise BadRecord("missing_annotation", f"image_id {payload} is not in images")
        photo = read_photo(self.images / im["file_name"])
        caps = [c for c in self.captions[payload] if c]
        if not caps:
            raise BadRecord("empty_caption", f"image {payload} has only empty captions")
        rng = rng_for(self.name, self.split, uid)
        turns = [{"role": "user", "content": f"{IMAGE_TOKEN}\n{rng.choice(CAPTION_PROMPTS)}"},
                 {"role": "assistant", "content": rng.choice(caps)}]
        source = {"dataset": self.name, "id": uid, "split": self.split, "image_id": payload, "file_name": im["file_name"]}
        sample = Sample("caption", turns, [], [photo.height, photo.width], source, extra={"captions": caps})
        return [Output(sample, photo.data, reencoded=photo.reencoded)]

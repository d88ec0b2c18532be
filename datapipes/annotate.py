"""`launcher data annotate`: SA-1B-style photos + automatic masks -> MGSC SegCap shards (MGLMM seed 004).

Per image: read `<stem>.jpg` and `<stem>.json` (SA-1B's per-image JSON, or any JSON with COCO-RLE
`annotations`), filter the masks (quality scores, minimum area, near-duplicates by IoU), name them with a
labeller (datapipes/labellers.py), build the mask tree and dense answers (datapipes/mgsc.py), and write USCDF
shards through the converters' writer (datapipes/convert/run.py: resumable, bad records counted). A fixed
share of images (by a hash of the stem) is held out as `val`, with GCG-style ground truth files for evaluation.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from datapipes import mgsc
from datapipes.convert.common import BadRecord, ConvertError, Output, read_photo, rng_for
from datapipes.convert.run import ConvertArgs, Converter, run_conversion
from datapipes.schema import P_END, P_START, SEG_TOKEN

GT_CAPTIONS = "mgsc_caption_gt.json"  # COCO caption format: what CIDEr/METEOR score against
GT_MASKS = "mgsc_mask_gt.json"  # COCO instances format (one category, "object"): what AP50/mIoU score against


@dataclass(frozen=True)
class MaskFilter:
    """Which automatic masks become tree nodes. Defaults follow SAM's automatic generator (predicted IoU 0.88,
    stability 0.95); the area floor drops specks, the IoU ceiling drops near-duplicates (the better-scored one
    stays), and max_masks bounds the labeller's work per image (the best-scored are kept)."""

    min_predicted_iou: float = 0.88
    min_stability: float = 0.95
    min_area_fraction: float = 0.001
    max_duplicate_iou: float = 0.9
    max_masks: int = 48

    def __post_init__(self):
        for name in ("min_predicted_iou", "min_stability", "min_area_fraction", "max_duplicate_iou"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConvertError(f"mask filter: {name} must be in [0, 1], got {getattr(self, name)}")
        if self.max_masks < 1:
            raise ConvertError(f"mask filter: max_masks must be >= 1, got {self.max_masks}")


def filter_masks(annotations: list, height: int, width: int, rules: MaskFilter, bad) -> list[dict]:
    """SA-1B annotations -> the kept ones (each with its compressed RLE under "rle"), best score first.

    Scores missing from a mask file count as perfect (plain COCO-RLE folders have none). A malformed
    annotation is reported through bad(reason, message) and dropped; the image goes on.
    """
    candidates = []
    for i, ann in enumerate(annotations):
        what = f"annotation {ann.get('id', i) if isinstance(ann, dict) else i}"
        if not isinstance(ann, dict) or not isinstance(ann.get("segmentation"), dict):
            bad("bad_annotation", f"{what}: no COCO-RLE segmentation")
            continue
        seg = ann["segmentation"]
        try:
            size = [int(v) for v in seg["size"]]
            counts = seg["counts"]
            rle = {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
            if size != [height, width]:
                raise ValueError(f"RLE size {size} != photo {height}x{width}")
            area = int(mask_utils.area(rle))
        except Exception as e:  # noqa: BLE001  pycocotools raises bare exceptions on broken counts
            bad("bad_rle", f"{what}: {e}")
            continue
        iou, stability = float(ann.get("predicted_iou", 1.0)), float(ann.get("stability_score", 1.0))
        if iou < rules.min_predicted_iou or stability < rules.min_stability:
            continue  # filtered by design: not a bad record
        if area < rules.min_area_fraction * height * width or area == 0:
            continue
        candidates.append({"id": ann.get("id", i), "index": i, "rle": rle, "area": area, "score": iou * stability})
    candidates.sort(key=lambda c: (-c["score"], -c["area"], str(c["id"])))
    kept: list[dict] = []
    for c in candidates:
        if len(kept) == rules.max_masks:
            break
        if kept:
            ious = mask_utils.iou([c["rle"]], [k["rle"] for k in kept], [0] * len(kept))
            if float(np.max(ious)) > rules.max_duplicate_iou:
                continue
        kept.append(c)
    return kept


def image_pairs(src: Path) -> list[tuple[str, Path, Path]]:
    """(stem, photo, mask JSON) for every photo with a JSON beside it (SA-1B: sa_<id>.jpg + sa_<id>.json)."""
    pairs = []
    for photo in sorted(src.rglob("*")):
        if photo.suffix.lower() in (".jpg", ".jpeg", ".png") and photo.with_suffix(".json").is_file():
            pairs.append((str(photo.relative_to(src).with_suffix("")), photo, photo.with_suffix(".json")))
    return pairs


def held_out(stem: str, fraction: float) -> bool:
    """A stable split by the stem's hash: the same images are held out on every run and machine."""
    h = int.from_bytes(hashlib.sha256(stem.encode()).digest()[:8], "big")
    return h / 2**64 < fraction


class AnnotateConverter(Converter):
    """SA-1B-style folders through the MGSC pipeline. options: labeller (built by the caller and passed in),
    filter (MaskFilter fields), val_fraction."""

    splits = ("train", "val")

    def __init__(self, args: ConvertArgs, labeller, rules: MaskFilter, val_fraction: float):
        super().__init__(args)
        self.labeller, self.rules, self.val_fraction = labeller, rules, val_fraction
        pairs = image_pairs(self.src)
        if not pairs:
            raise ConvertError(f"{self.src}: no photo (.jpg/.png) with a mask JSON of the same name beside it")
        want_val = self.split == "val"
        self.pairs = [p for p in pairs if held_out(p[0], val_fraction) == want_val]

    def units(self):
        return [(stem, (photo, js)) for stem, photo, js in self.pairs]

    def image_path(self, payload):
        return payload[0]

    def convert(self, uid, payload, bad) -> list[Output]:
        photo_path, json_path = payload
        photo = read_photo(photo_path)
        try:
            record = json.loads(json_path.read_bytes())
            annotations = record["annotations"] if isinstance(record, dict) else record
            if not isinstance(annotations, list):
                raise TypeError("annotations is not a list")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise BadRecord("bad_json", f"{json_path}: not a mask file with an annotations list: {e}") from e
        kept = filter_masks(annotations, photo.height, photo.width, self.rules, bad)
        if not kept:
            raise BadRecord("no_mask", f"{uid}: no mask passed the filter")
        masks = [mask_utils.decode(k["rle"]).astype(bool) for k in kept]
        image = None
        if getattr(self.labeller, "needs_image", True):
            image = np.asarray(Image.open(io.BytesIO(photo.data)).convert("RGB"))
        try:
            labels = self.labeller.label(uid, image, masks, refs=[(str(k["id"]), k["index"]) for k in kept])
        except Exception as e:  # noqa: BLE001  one image's labeller failure (timeout, 5xx, bad reply) skips that image
            raise BadRecord("labeller_error", f"{uid}: {type(e).__name__}: {e}") from e
        named = [(m, lab) for m, lab in zip(masks, labels) if lab]
        if not named:
            raise BadRecord("no_label", f"{uid}: the labeller named none of the {len(masks)} masks")
        if len(named) < len(masks):  # the image goes on without them
            bad("unlabelled_mask", f"{uid}: {len(masks) - len(named)} of {len(masks)} masks got no label")
        samples = mgsc.annotate(image, [m for m, _ in named], lambda _i, _m: [lab for _, lab in named], key=uid,
                                dataset=self.name, rng=rng_for(self.name, self.split, uid))
        for s in samples:
            s.source.update(split=self.split, file_name=photo_path.name)
        return [Output(s, photo.data, reencoded=photo.reencoded) for s in samples]


def annotate_folder(src: str, out: str, labeller, *, rules: MaskFilter | None = None, val_fraction: float = 0.05,
                    workers: int = 1, shard_size_mb: float = 512.0, min_shards: int = 256, dataset: str = "mgsc",
                    log=None) -> dict[str, dict]:
    """Annotate every image of `src` into `out/train` and (val_fraction > 0) `out/val` plus its ground truth."""
    import sys

    rules = rules or MaskFilter()
    if not 0.0 <= val_fraction < 1.0:
        raise ConvertError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    manifests = {}
    splits = ["train"] + (["val"] if val_fraction > 0 else [])
    for split in splits:
        options = {"labeller": labeller.describe(), "filter": asdict(rules), "val_fraction": val_fraction}
        args = ConvertArgs(dataset=dataset, src=src, out=str(Path(out) / split), split=split, workers=workers,
                           shard_size_mb=shard_size_mb, min_shards=min_shards, options=options)
        conv = AnnotateConverter(args, labeller, rules, val_fraction)
        if not conv.pairs:
            print(f"annotate: no image falls in the {split} split; nothing written there", file=log or sys.stderr)
            continue
        manifests[split] = run_conversion(conv, args, log=log or sys.stderr)
        if split == "val":
            write_ground_truth(Path(out) / split)
    return manifests


def write_ground_truth(split_dir: Path) -> tuple[Path, Path]:
    """GCG-style ground truth of a written split, read back from its shards (what was written is what is scored):
    captions with the grounding markup removed (COCO caption format) and every [SEG]'s mask (COCO instances),
    keyed by the sample's `__key__` as image id."""
    import webdataset as wds

    from datapipes.shards import read_manifest

    manifest = read_manifest(split_dir)
    images, captions, instances = [], [], []
    for shard in manifest["shards"]:
        for raw in wds.WebDataset(str(split_dir / shard["url"]), shardshuffle=False, empty_check=False):
            d = json.loads(raw["json"])
            key = raw["__key__"]
            h, w = d["image_size"]
            images.append({"id": key, "height": h, "width": w, "task": d["task"]})
            answer = d["conversation"][-1]["content"]
            captions.append({"id": len(captions) + 1, "image_id": key, "caption": plain_caption(answer)})
            for m in d["masks"]:
                instances.append({"id": len(instances) + 1, "image_id": key, "category_id": 1, "iscrowd": 0,
                                  "segmentation": m["rle"], "bbox": m["box"], "phrase": m["phrase"],
                                  "area": float(mask_utils.area({"size": m["rle"]["size"],
                                                                 "counts": m["rle"]["counts"].encode()}))})
    caption_gt = {"images": images, "annotations": captions}
    mask_gt = {"images": images, "annotations": instances, "categories": [{"id": 1, "name": "object"}]}
    paths = (split_dir / GT_CAPTIONS, split_dir / GT_MASKS)
    for path, data in zip(paths, (caption_gt, mask_gt)):
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)
    return paths


def plain_caption(answer: str) -> str:
    """'Here is <p> the house </p> [SEG] with ...' -> 'Here is the house with ...' (what a caption metric reads)."""
    text = answer.replace(P_START, " ").replace(P_END, " ").replace(SEG_TOKEN, " ")
    return " ".join(text.split()).replace(" .", ".").replace(" ,", ",")


# --- the command line (`python -m launcher data annotate`) -----------------------------------------------

def add_arguments(p) -> None:
    p.add_argument("--src", required=True, help="SA-1B layout: sa_<id>.jpg + sa_<id>.json (or any photo + COCO-RLE JSON)")
    p.add_argument("--out", required=True, help="writes OUT/train, OUT/val (+ ground truth), OUT/labeller_cache.sqlite")
    p.add_argument("--labeller", required=True, choices=["file", "openai", "segcap"])
    p.add_argument("--labels", help="file: JSON {image stem: [label per kept mask] or {index: label}}")
    p.add_argument("--url", help="openai: the server's base URL, e.g. http://host:8000/v1 (or SEGCAP_LABELLER_URL)")
    p.add_argument("--model", help="openai: the served model's name (or SEGCAP_LABELLER_MODEL); segcap: the export dir")
    p.add_argument("--api-key", help="openai: bearer key (or SEGCAP_LABELLER_API_KEY / OPENAI_API_KEY); never stored")
    p.add_argument("--concurrency", type=int, default=4, help="openai: requests in flight per worker process")
    p.add_argument("--timeout", type=float, default=60.0, help="openai: seconds per request")
    p.add_argument("--retries", type=int, default=5, help="openai: retries per request (429/5xx/timeout/bad reply)")
    rules = MaskFilter()
    p.add_argument("--min-predicted-iou", type=float, default=rules.min_predicted_iou)
    p.add_argument("--min-stability", type=float, default=rules.min_stability)
    p.add_argument("--min-area-fraction", type=float, default=rules.min_area_fraction)
    p.add_argument("--max-duplicate-iou", type=float, default=rules.max_duplicate_iou)
    p.add_argument("--max-masks", type=int, default=rules.max_masks)
    p.add_argument("--val-fraction", type=float, default=0.05, help="held-out share (by image hash) written as val")
    p.add_argument("--dataset", default="mgsc", help="the name in sample keys and sources")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--shard-size", type=float, default=512.0, help="target MB per shard")
    p.add_argument("--min-shards", type=int, default=256)


def main(args, segcap_labeller=None) -> int:
    """Run the annotate verb; `segcap_labeller(export_dir)` builds the segcap labeller (it lives in launcher/)."""
    import sys

    from datapipes.labellers import LabellerError, build_labeller

    try:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        cache = str(Path(args.out) / "labeller_cache.sqlite")
        if args.labeller == "segcap":
            if segcap_labeller is None or not args.model:
                raise ConvertError("--labeller segcap needs --model EXPORT_DIR (a `launcher export` folder)")
            if args.workers != 1:  # each forked worker would hold the model and fight over the device
                raise ConvertError("--labeller segcap runs one model: use --workers 1")
            labeller = segcap_labeller(args.model, cache)
        else:
            labeller = build_labeller(args.labeller, labels=args.labels, url=args.url, model=args.model,
                                      api_key=args.api_key, cache_path=cache,
                                      concurrency=args.concurrency, timeout_s=args.timeout, max_retries=args.retries)
        rules = MaskFilter(args.min_predicted_iou, args.min_stability, args.min_area_fraction, args.max_duplicate_iou,
                           args.max_masks)
        annotate_folder(args.src, args.out, labeller, rules=rules, val_fraction=args.val_fraction,
                        workers=args.workers, shard_size_mb=args.shard_size, min_shards=args.min_shards,
                        dataset=args.dataset)
    except (ConvertError, LabellerError, FileNotFoundError) as e:
        print(f"annotate error: {e}", file=sys.stderr)
        return 2
    return 0

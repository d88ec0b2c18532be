"""`launcher data convert`: the public datasets' official files -> USCDF shards. The registry below maps a
dataset name to its converter class (one module per family) and the defaults it needs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from datapipes.convert.common import ConvertError

# name -> ("module:Class", options fixed by the name)
REGISTRY: dict[str, tuple[str, dict]] = {
    "refcoco": ("refer:ReferConverter", {"split_by": "unc"}),
    "refcoco+": ("refer:ReferConverter", {"split_by": "unc"}),
    "refcocog": ("refer:ReferConverter", {"split_by": "umd"}),
    "grefcoco": ("refer:GReferConverter", {"split_by": "unc"}),
    "reasonseg": ("reasonseg:ReasonSegConverter", {}),
    "ade20k": ("semseg:ADE20KConverter", {}),
    "cocostuff": ("semseg:CocoStuffConverter", {}),
    "mapillary": ("semseg:MapillaryConverter", {}),
    "paco_lvis": ("parts:PacoLvisConverter", {}),
    "pascal_part": ("parts:PascalPartConverter", {}),
    "coco_panoptic": ("panoptic:PanopticConverter", {}),
    "gcg": ("gcg:GCGConverter", {}),
    "llava_pretrain": ("llava:LlavaPretrainConverter", {}),
    "llava_instruct": ("llava:LlavaConverter", {}),
    "coco_caption": ("llava:CocoCaptionConverter", {}),
    "mgscdata": ("mgscdata:MGSCDataConverter", {}),
}


def converter_class(name: str):
    if name not in REGISTRY:
        raise ConvertError(f"unknown dataset {name!r} (known: {', '.join(sorted(REGISTRY))})")
    target, _ = REGISTRY[name]
    module, cls = target.split(":")
    return getattr(importlib.import_module(f"datapipes.convert.{module}"), cls)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", help=f"one of: {', '.join(REGISTRY)}")
    p.add_argument("--src", required=True, help="the folder of the dataset's annotation files as downloaded")
    p.add_argument("--images", help="the photo folder when it is not --src (COCO-based sets: e.g. coco/train2014)")
    p.add_argument("--out", required=True, help="the shard folder (configs/data/*.yaml read $SEGCAP_DATA_ROOT/shards/...)")
    p.add_argument("--split", help="train, val, ... (default: the converter's first)")
    p.add_argument("--workers", type=int, default=1, help="processes writing shards in parallel")
    p.add_argument("--shard-size", type=float, default=512.0, help="target MB per shard")
    p.add_argument("--min-shards", type=int, default=256, help="at least this many shards (ranks x loader workers)")
    p.add_argument("--turns", type=int, help="question/answer pairs per sample (default per dataset and split)")
    p.add_argument("--split-by", help="refcocog: umd (default) or google")
    p.add_argument("--class-names", help="semantic sets: the class-name file when it is not in --src")


def main(args: argparse.Namespace) -> int:
    from datapipes.convert.run import ConvertArgs, run_conversion

    try:
        cls = converter_class(args.dataset)
        options = dict(REGISTRY[args.dataset][1])
        if args.split_by:
            options["split_by"] = args.split_by
        if args.class_names:
            options["class_names"] = args.class_names
        cargs = ConvertArgs(dataset=args.dataset, src=args.src, out=args.out, images=args.images, split=args.split,
                            workers=args.workers, shard_size_mb=args.shard_size, min_shards=args.min_shards,
                            turns=args.turns, options=options)
        if cargs.min_shards < 1 or cargs.workers < 1 or cargs.shard_size_mb <= 0 or (cargs.turns is not None and cargs.turns < 1):
            raise ConvertError("--min-shards, --workers, --turns and --shard-size must be positive")
        run_conversion(cls(cargs), cargs)
    except ConvertError as e:
        print(f"convert error: {e}", file=sys.stderr)
        return 2
    return 0

"""`python -m launcher <verb>`: train, eval, demo, data, count.

Config errors are reported as one line naming the key, before any worker starts work.
"""

from __future__ import annotations

import argparse
import sys

from launcher.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("train", help="train with a config (single process, torchrun or srun)")
    p.add_argument("--config", required=True, help="configs/train/<name>.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=10")

    p = verbs.add_parser("eval", help="score a checkpoint on its val shards or on benchmarks, or a predictions file")
    from launcher.eval.verb import add_arguments

    add_arguments(p)

    p = verbs.add_parser("demo", help="synthetic shards -> 2-rank ZeRO-3 CPU training -> eval -> MLflow")
    p.add_argument("--config", default="configs/train/demo.yaml")
    p.add_argument("--nproc", type=int, default=2, help="ranks (torchrun --nproc_per_node)")
    p.add_argument("overrides", nargs="*")

    p = verbs.add_parser("count", help="parameters and forward FLOPs per part (built on the meta device)")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")

    p = verbs.add_parser("data", help="dataset tools")
    data_verbs = p.add_subparsers(dest="data_verb", required=True)
    q = data_verbs.add_parser("synth", help="write the synthetic train/val shards of a config")
    q.add_argument("--config", default="configs/train/demo.yaml")
    q.add_argument("overrides", nargs="*")
    q = data_verbs.add_parser("inspect", help="print a shard folder's manifest and its first samples")
    q.add_argument("path")
    q.add_argument("-n", type=int, default=3)
    q = data_verbs.add_parser("convert", help="a public dataset's official files -> USCDF shards (docs/DATA.md)")
    from datapipes.convert import add_arguments

    add_arguments(q)
    q = data_verbs.add_parser("group", help="one shard folder listing several converted folders' shards")
    q.add_argument("--out", required=True)
    q.add_argument("members", nargs="+", help="converted shard folders")

    args = parser.parse_args(argv)
    try:
        if args.verb == "train":
            from launcher.train import train

            return train(load_config(args.config, args.overrides))
        if args.verb == "eval":
            from launcher.eval.verb import main as eval_main

            return eval_main(args)
        if args.verb == "demo":
            from launcher.demo import demo

            return demo(args.config, args.overrides, nproc=args.nproc)
        if args.verb == "count":
            from launcher.count import count

            print(count(load_config(args.config, args.overrides)))
            return 0
        if args.verb == "data" and args.data_verb == "synth":
            from datapipes.synthetic import write_synthetic

            cfg = load_config(args.config, args.overrides)
            train_dir, val_dir = write_synthetic(cfg.data.synthetic)
            print(f"wrote {train_dir} and {val_dir}")
            return 0
        if args.verb == "data" and args.data_verb == "inspect":
            from datapipes.shards import inspect

            print(inspect(args.path, args.n))
            return 0
        if args.verb == "data" and args.data_verb == "convert":
            from datapipes.convert import main as convert_main

            return convert_main(args)
        if args.verb == "data" and args.data_verb == "group":
            from datapipes.convert.common import ConvertError
            from datapipes.convert.group import write_group

            try:
                m = write_group(args.out, args.members)
            except ConvertError as e:
                print(f"group error: {e}", file=sys.stderr)
                return 2
            print(f"{args.out}: {m['total']} samples in {len(m['shards'])} shards of {len(m['members'])} folders")
            return 0
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())

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

    p = verbs.add_parser("eval", help="score the latest complete checkpoint of train.output_dir")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")

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

    args = parser.parse_args(argv)
    try:
        if args.verb == "train":
            from launcher.train import train

            return train(load_config(args.config, args.overrides))
        if args.verb == "eval":
            from launcher.evaluate import evaluate_checkpoint

            return evaluate_checkpoint(load_config(args.config, args.overrides))
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
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    from launcher.dist import exit_process

    exit_process(main())

"""`python -m launcher <verb>`: train, eval, demo, data, count, plan, export, infer, runs.

Config errors are reported as one line naming the key, before any worker starts work.
"""

from __future__ import annotations

import argparse
import sys

if __name__ == "__main__" and sys.argv[1:2] == ["train"]:
    from launcher import stop

    stop.install()  # before any heavy import: a preemption signal during start-up must not kill the rank

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

    p = verbs.add_parser("count", help="parameters and forward FLOPs per part (the model's forward on fake weights)")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")

    p = verbs.add_parser("plan", help="preflight, memory per GPU, step time and MFU for ZeRO-2/3/ZeRO++ (no GPU needed)")
    p.add_argument("--config", required=True)
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu", default="a100-80g", help="a100-40g | a100-80g | h100-80g | h200")
    p.add_argument("--inter-node-gbps", type=float, default=None, help="network bandwidth of a node, Gbit/s")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sample (default data.max_length)")
    p.add_argument("--global-batch", type=int, default=None, help="default data.batch_size x train.grad_accum x gpus")
    p.add_argument("--json", default=None, help="also write the plan here")
    p.add_argument("--no-preflight", action="store_true", help="only the estimate")
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
    q = data_verbs.add_parser("annotate", help="SA-1B photos + automatic masks -> MGSC SegCap shards (a labeller names them)")
    from datapipes.annotate import add_arguments as add_annotate_arguments

    add_annotate_arguments(q)
    q = data_verbs.add_parser("group", help="one shard folder listing several converted folders' shards")
    q.add_argument("--out", required=True)
    q.add_argument("members", nargs="+", help="converted shard folders")

    p = verbs.add_parser("export", help="a checkpoint step -> a self-contained Hugging Face-style folder")
    p.add_argument("--run", required=True, help="the run directory (train.output_dir)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest complete)")
    p.add_argument("--out", required=True, help="the folder to write (must not exist or be empty)")
    p.add_argument("--lora-only", action="store_true", help="keep the LoRA adapter unmerged (peft format in adapter/)")
    p.add_argument("--max-shard-size", default="2GB", help="safetensors shard size of the LLM")

    p = verbs.add_parser("infer", help="answer prompts about images with an exported model: JSON + overlay PNG")
    p.add_argument("--model", required=True, help="a folder written by `export`")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="one image (with --prompt)")
    src.add_argument("--jsonl", help='a batch: one {"image": path, "prompt": str[, "name": stem]} per line')
    p.add_argument("--prompt", help="the question or instruction for --image")
    p.add_argument("--out", default="infer_out", help="output folder: <stem>.json and <stem>.png per image")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on a GPU that supports it, else float32")
    p.add_argument("--max-new-tokens", type=int, default=64)

    p = verbs.add_parser("runs", help="MLflow runs: compare two or more, upload a run dir's spooled calls")
    runs_verbs = p.add_subparsers(dest="runs_verb", required=True)
    q = runs_verbs.add_parser("compare", help="differing params, final and best metrics, the UI's compare URL")
    q.add_argument("runs", nargs="+", help="run dirs or MLflow run ids")
    q.add_argument("--tracking-uri", help="for run ids (default MLFLOW_TRACKING_URI); run dirs know theirs")
    q = runs_verbs.add_parser("sync", help="apply what RUN_DIR/mlflow/spool.jsonl holds that the store lacks")
    q.add_argument("run_dir")
    q.add_argument("--tracking-uri", help="default: the URI the run used")
    q.add_argument("--timeout", type=float, default=300.0)

    args = parser.parse_args(argv)
    if args.verb == "infer" and bool(args.image) != bool(args.prompt):
        parser.error("infer: --image needs --prompt (or give --jsonl)")
    try:
        if args.verb == "train":
            from launcher.train import train

            return train(_with_model_files(load_config(args.config, args.overrides)))
        if args.verb == "eval":
            from launcher.eval.verb import main as eval_main

            return eval_main(args, _with_model_files)
        if args.verb == "demo":
            from launcher.demo import demo

            return demo(args.config, args.overrides, nproc=args.nproc)
        if args.verb == "count":
            from launcher.count import count

            print(count(load_config(args.config, args.overrides)))
            return 0
        if args.verb == "plan":
            from launcher.plan import main as plan_main

            return plan_main(load_config(args.config, args.overrides), args)
        if args.verb == "export":
            from launcher.export import export

            out = export(args.run, args.out, step=args.step, lora_only=args.lora_only, max_shard_size=args.max_shard_size)
            print(f"exported {args.run} to {out}")
            return 0
        if args.verb == "infer":
            from pathlib import Path

            from launcher.infer import Request, infer, requests_from_jsonl, safe_stem

            if args.jsonl:
                requests = requests_from_jsonl(Path(args.jsonl))
            else:
                requests = [Request(Path(args.image), args.prompt, safe_stem(Path(args.image).stem))]
            infer(Path(args.model), requests, Path(args.out), args.device, args.dtype, args.max_new_tokens)
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
        if args.verb == "data" and args.data_verb == "annotate":
            from datapipes.annotate import main as annotate_main

            def segcap_labeller(model_dir, cache_path):
                from launcher.labeller import SegcapLabeller

                return SegcapLabeller(model_dir, cache_path=cache_path)

            return annotate_main(args, segcap_labeller)
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
        if args.verb == "runs":
            from launcher import runs

            if args.runs_verb == "compare":
                print(runs.compare(args.runs, args.tracking_uri))
                return 0
            return runs.sync_run_dir(args.run_dir, args.tracking_uri, args.timeout)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        if args.verb not in ("export", "infer"):
            raise
        print(f"{args.verb}: {e}", file=sys.stderr)  # a wrong path or input file: one line, no traceback
        return 2
    return 1


def _with_model_files(cfg):
    """The config, once every model file it names is there (else a one-line ConfigError, before any
    process group or DeepSpeed engine starts)."""
    from modeling.weights import ModelPathError, check_model_paths

    try:
        check_model_paths(cfg.model)
    except ModelPathError as e:
        raise ConfigError(str(e)) from None
    return cfg


if __name__ == "__main__":
    from launcher.dist import exit_process

    exit_process(main())

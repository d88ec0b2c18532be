"""`python -m launcher plan`: before GPUs are allocated, whether a config can run (launcher/preflight.py),
what it needs per GPU under ZeRO-2, ZeRO-3 and ZeRO-3 + ZeRO++, how fast each would go, and which
(stage, micro-batch, accumulation) to use. Model states are counted from the model's parameters as
DeepSpeed's estimators count them; activations and FLOPs come from the model's own forward and backward
on fake tensors (launcher/fake_model.py), at the real size, with gradient checkpointing as configured."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from launcher.config import RunConfig

GIB = 2**30


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float
    bf16_tflops: float  # dense peak
    hbm_gbs: float  # memory bandwidth, GB/s
    nvlink_gbs: float  # per-GPU NVLink bandwidth in one direction, GB/s
    inter_node_gbps: float  # default network injection bandwidth of a node (all its NICs), Gbit/s


GPUS = {
    "a100-40g": Gpu("A100-SXM 40GB", 40, 312, 1555, 300, 8 * 200),
    "a100-80g": Gpu("A100-SXM 80GB", 80, 312, 2039, 300, 8 * 200),
    "h100-80g": Gpu("H100-SXM 80GB", 80, 989, 3350, 450, 8 * 400),
    "h200": Gpu("H200-SXM 141GB", 141, 989, 4800, 450, 8 * 400),
}

def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a CUDA device by its name (torch.cuda.get_device_name), if it is one of GPUS."""
    name = device_name.upper()
    for key, gpu in GPUS.items():
        if key.split("-")[0].upper() in name:
            return gpu.bf16_tflops
    return None


# Assumptions of the estimate (printed with it): the share of peak FLOPs that the kernels reach, the share
# of nominal link bandwidth that NCCL's collectives reach, and what CUDA and the allocator keep.
COMPUTE_EFFICIENCY = 0.5
LINK_EFFICIENCY = 0.7
RESERVED_GIB = 2.0  # CUDA context, NCCL buffers
FRAGMENTATION = 0.10  # of the rest
MAX_MICRO_BATCH = 32
TIE = 0.02  # options this close to the fastest count as equally fast
STAGES = ("zero2", "zero3", "zero3++")  # zero3++: hierarchical partitioning + int8 weights + int4 gradients


@dataclass(frozen=True)
class Cluster:
    gpu: Gpu
    gpus: int
    gpus_per_node: int
    inter_node_gbps: float

    @property
    def nodes(self) -> int:
        return math.ceil(self.gpus / self.gpus_per_node)

    def collective_s(self, nbytes: float, within_node: bool = False) -> float:
        """A ring all-gather / reduce-scatter of nbytes (the full tensor): each GPU moves (n-1)/n of it,
        over NVLink inside a node and, across nodes, over its share of the node's network links."""
        n = self.gpus_per_node if within_node or self.nodes == 1 else self.gpus
        if n <= 1:
            return 0.0
        moved = nbytes * (n - 1) / n
        t = moved / (self.gpu.nvlink_gbs * 1e9 * LINK_EFFICIENCY)
        if self.nodes > 1 and not within_node:
            per_gpu = self.inter_node_gbps * 1e9 / 8 / self.gpus_per_node
            t = max(t, moved / (per_gpu * LINK_EFFICIENCY))
        return t


@dataclass
class ParamCounts:
    frozen: int
    trainable: int
    largest_layer: int  # parameters of the module holding the most directly (ZeRO-3 gathers it whole)
    largest_layer_trainable: int
    bytes_per_weight: int  # the model dtype's


def param_counts(model: torch.nn.Module, bytes_per_weight: int) -> ParamCounts:
    """What the model-state figures need, from the (fake or real) model's own parameters; every weight
    counts at the training precision's width (DeepSpeed casts the module to it: LoRA's fp32 too)."""
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    layers = [list(m.parameters(recurse=False)) for m in model.modules()]
    largest = max(layers, key=lambda ps: sum(p.numel() for p in ps))
    return ParamCounts(
        frozen, trainable, sum(p.numel() for p in largest), sum(p.numel() for p in largest if p.requires_grad), bytes_per_weight
    )


def model_states(pc: ParamCounts, stage: str, gpus: int, gpus_per_node: int) -> dict[str, float]:
    """Bytes per GPU of weights, gradients and optimizer states, split as DeepSpeed's estimators count a
    trainable parameter (no offload): 16-bit weight 2, then 18 bytes partitioned over the GPUs (16- and
    32-bit gradients 2 + 4, fp32 master weight 4, Adam's two moments 8); ZeRO-3 partitions the 16-bit
    weights too (its 18 then holds them) and gathers the largest layer whole (weights + gradients).
    A frozen parameter is its 16-bit weight only: replicated under ZeRO-2, partitioned under ZeRO-3.
    ZeRO++'s hierarchical partitioning adds a secondary copy of the 16-bit weights per node."""
    w, n = pc.bytes_per_weight, gpus
    if stage == "zero2":
        return {
            "frozen_weights": w * pc.frozen,
            "trainable_weights": w * pc.trainable,
            "gradients": 6 * pc.trainable / n,
            "optimizer": 12 * pc.trainable / n,
            "gathered": 0.0,
            "secondary_weights": 0.0,
        }
    states = {
        "frozen_weights": w * pc.frozen / n,
        "trainable_weights": 2 * pc.trainable / n,
        "gradients": 4 * pc.trainable / n,
        "optimizer": 12 * pc.trainable / n,
        "gathered": 2 * pc.largest_layer + 2 * pc.largest_layer_trainable,
        "secondary_weights": 0.0,
    }
    if stage == "zero3++":
        states["secondary_weights"] = w * (pc.frozen + pc.trainable) / min(gpus_per_node, n)
    return states


def comm_bytes(pc: ParamCounts, stage: str) -> dict[str, float]:
    """Bytes each collective carries per micro-step (the full tensor; Cluster.collective_s prices it).
    ZeRO-2 reduce-scatters the 16-bit gradients every micro-step and all-gathers the updated trainable
    weights once per optimizer step; ZeRO-3 all-gathers every weight in forward and again in backward."""
    w = pc.bytes_per_weight
    params = pc.frozen + pc.trainable
    if stage == "zero2":
        return {"gradient_reduce": w * pc.trainable, "weight_gather_per_step": w * pc.trainable}
    out = {"forward_gather": w * params, "backward_gather": w * params, "gradient_reduce": w * pc.trainable}
    if stage == "zero3++":  # int8 weights, int4 gradients; the backward gather stays inside the node
        out = {"forward_gather": params, "backward_gather_in_node": w * params, "gradient_reduce": pc.trainable / 2}
    return out


@dataclass
class Option:
    stage: str
    micro_batch: int
    accumulation: int
    memory_gib: dict[str, float]  # per GPU: model states by kind, activations, total
    fits: bool
    comm_gb_per_micro_step: float
    compute_s: float  # per micro-step
    comm_s: float  # per micro-step (overlapped with compute: DeepSpeed's overlap_comm / prefetch)
    step_s: float  # per optimizer step
    samples_per_s: float  # whole cluster
    tokens_per_s: float
    mfu: float


def micro_batches(per_gpu: int) -> list[int]:
    """Micro-batches that split a GPU's samples per step exactly (so every option trains the same global batch)."""
    return [b for b in range(1, min(per_gpu, MAX_MICRO_BATCH) + 1) if per_gpu % b == 0]


def pick(options: list[Option]) -> Option | None:
    """The fastest; among options within TIE of it (the estimate is not finer than that), the one that
    moves the fewest bytes (overlap with compute is assumed, and hides less in practice), then the one
    with the most memory to spare."""
    if not options:
        return None
    fastest = max(o.samples_per_s for o in options)
    close = [o for o in options if o.samples_per_s >= (1 - TIE) * fastest]
    return min(close, key=lambda o: (round(o.comm_gb_per_micro_step * o.accumulation, 3), o.memory_gib["total"]))


@dataclass
class Plan:
    config: str
    cluster: dict
    seq_len: int
    global_batch: int
    params: dict
    flops_per_sample: dict
    activation_gib: dict  # micro-batch -> GiB (from the two measured runs)
    options: list[Option] = field(default_factory=list)
    recommendation: Option | None = None
    preflight: list[dict] = field(default_factory=list)
    length_stats: dict = field(default_factory=dict)  # per data source, from preflight
    assumptions: dict = field(default_factory=dict)


@dataclass
class Measured:
    """What the fake runs found, independent of the cluster: reused across clusters."""

    seq_len: int
    params: ParamCounts
    one: object  # fake_model.StepProfile of micro-batch 1
    two: object  # ... of micro-batch 2


def measure(cfg: RunConfig, seq_len: int | None = None) -> Measured:
    """Parameters, and two real-size fake forward + backward runs (micro-batch 1 and 2): activations and
    FLOPs are linear in the micro-batch, so the two give both coefficients."""
    from launcher.fake_model import build_fake, profile_step

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    model = build_fake(cfg, mode)
    seq = seq_len or max(cfg.data.max_length, model.num_image_tokens + 16)
    pc = param_counts(model, 4 if cfg.train.precision == "fp32" else 2)
    return Measured(seq, pc, profile_step(model, mode, 1, seq), profile_step(model, mode, 2, seq))


def estimate(cfg: RunConfig, cluster: Cluster, seq_len: int | None = None, global_batch: int | None = None,
             measured: Measured | None = None) -> Plan:
    """Memory and speed of every (stage, micro-batch) on `cluster`, and the fastest that fits."""
    m = measured or measure(cfg, seq_len)
    seq, pc, p1, p2 = m.seq_len, m.params, m.one, m.two
    act = {b: (p1.activation_bytes + (p2.activation_bytes - p1.activation_bytes) * (b - 1)) / GIB for b in range(1, MAX_MICRO_BATCH + 1)}
    hw_flops = p2.train_flops - p1.train_flops  # per sample, as run (checkpointed layers recompute forward)
    recompute = p2.flops_by_module.get("SegCapModel.llm", 0) - p1.flops_by_module.get("SegCapModel.llm", 0)
    model_flops = hw_flops - (recompute if cfg.model.llm.gradient_checkpointing else 0)
    g = cluster.gpu
    target = global_batch or cfg.data.batch_size * cfg.train.grad_accum * cluster.gpus
    if target % cluster.gpus:
        raise ValueError(f"global batch {target} does not split evenly over {cluster.gpus} GPUs")
    per_gpu = target // cluster.gpus
    usable = (g.memory_gib - RESERVED_GIB) * (1 - FRAGMENTATION)

    options = []
    for stage in STAGES:
        states = model_states(pc, stage, cluster.gpus, cluster.gpus_per_node)
        comm = comm_bytes(pc, stage)
        for mb in micro_batches(per_gpu):
            accum = per_gpu // mb
            memory = {k: v / GIB for k, v in states.items()}
            memory["activations"] = act[mb]
            memory["total"] = sum(memory.values())
            compute = mb * hw_flops / (g.bf16_tflops * 1e12 * COMPUTE_EFFICIENCY)
            per_micro = {k: v for k, v in comm.items() if k != "weight_gather_per_step"}
            comm_s = sum(cluster.collective_s(v, within_node=k.endswith("_in_node")) for k, v in per_micro.items())
            # The optimizer step streams each trainable partition's 16 bytes of state in and out of HBM.
            opt_s = 32 * pc.trainable / cluster.gpus / (g.hbm_gbs * 1e9) + cluster.collective_s(comm.get("weight_gather_per_step", 0.0))
            step = accum * max(compute, comm_s) + opt_s
            samples = mb * accum * cluster.gpus / step
            options.append(Option(
                stage, mb, accum, memory, memory["total"] <= usable, sum(per_micro.values()) / 1e9, compute, comm_s, step,
                samples, samples * seq, samples * model_flops / (cluster.gpus * g.bf16_tflops * 1e12),
            ))
    best = pick([o for o in options if o.fits])
    return Plan(
        config=cfg.model.name,
        cluster={"gpu": g.name, "gpus": cluster.gpus, "gpus_per_node": cluster.gpus_per_node, "nodes": cluster.nodes,
                 "inter_node_gbps": cluster.inter_node_gbps},
        seq_len=seq, global_batch=target,
        params=asdict(pc),
        flops_per_sample={"forward": p2.forward_flops - p1.forward_flops, "train_as_run": hw_flops, "train_model": model_flops},
        activation_gib=act, options=options, recommendation=best,
        assumptions={"compute_efficiency": COMPUTE_EFFICIENCY, "link_efficiency": LINK_EFFICIENCY,
                     "usable_gib": usable, "reserved_gib": RESERVED_GIB, "fragmentation": FRAGMENTATION},
    )


def render(plan: Plan) -> str:
    """The printed report: for each stage its best fitting micro-batch (or the smallest, marked), then the pick."""
    c, pc = plan.cluster, plan.params
    lines = [
        (f"plan for {plan.config} on {c['gpus']} x {c['gpu']} ({c['nodes']} node(s) of {c['gpus_per_node']}, "
         f"{c['inter_node_gbps']:.0f} Gbit/s per node between nodes); sequence {plan.seq_len} tokens, global batch {plan.global_batch}"),
        (f"parameters: {pc['frozen'] / 1e9:.3f} B frozen, {pc['trainable'] / 1e6:.2f} M trainable; "
         f"train FLOPs per sample {plan.flops_per_sample['train_model'] / 1e12:.2f} T (as run, with recompute: "
         f"{plan.flops_per_sample['train_as_run'] / 1e12:.2f} T)"),
        (f"per GPU, GiB: usable {plan.assumptions['usable_gib']:.1f} of the GPU's memory; assumes {COMPUTE_EFFICIENCY:.0%} of peak "
         f"FLOPs and {LINK_EFFICIENCY:.0%} of link bandwidth, communication overlapped with compute"),
        (f"{'stage':<9}{'mb':>4}{'accum':>6}{'frozen W':>10}{'train W':>9}{'grads':>8}{'optim':>8}{'gather':>8}{'2nd W':>8}"
         f"{'activ':>8}{'total':>8}{'fits':>6}{'comm GB':>9}{'step s':>9}{'samples/s':>11}{'MFU':>7}"),
    ]
    for stage in STAGES:
        mine = [o for o in plan.options if o.stage == stage]
        o = pick([o for o in mine if o.fits]) or mine[0]
        m = o.memory_gib
        lines.append(
            f"{stage:<9}{o.micro_batch:>4}{o.accumulation:>6}{m['frozen_weights']:>10.1f}{m['trainable_weights']:>9.2f}"
            f"{m['gradients']:>8.2f}{m['optimizer']:>8.2f}{m['gathered']:>8.2f}{m['secondary_weights']:>8.1f}{m['activations']:>8.1f}"
            f"{m['total']:>8.1f}{'yes' if o.fits else 'NO':>6}{o.comm_gb_per_micro_step:>9.1f}{o.step_s:>9.2f}{o.samples_per_s:>11.2f}{o.mfu:>7.1%}"
        )
    r = plan.recommendation
    if r is None:
        lines.append("recommendation: nothing fits (even micro-batch 1): more GPUs, or GPUs with more memory")
    else:
        lines.append(
            f"recommendation: train.zero_stage={3 if r.stage != 'zero2' else 2}"
            + (f" train.zero3_hpz_partition_size={c['gpus_per_node']} train.zero3_quantized_weights=true "
               "train.zero3_quantized_gradients=true" if r.stage == "zero3++" else "")
            + f" data.batch_size={r.micro_batch} train.grad_accum={r.accumulation}  "
            f"({r.samples_per_s:.2f} samples/s, {r.tokens_per_s:,.0f} tokens/s, MFU {r.mfu:.1%})"
        )
    return "\n".join(lines)


def to_json(plan: Plan) -> str:
    return json.dumps(asdict(plan), indent=1)


def main(cfg: RunConfig, args) -> int:
    """The verb: preflight findings, the table, the JSON; exit 1 when preflight found an error."""
    from launcher.preflight import preflight

    if args.gpu not in GPUS:
        raise ValueError(f"--gpu {args.gpu!r}: choices {sorted(GPUS)}")
    if args.gpus < 1 or args.gpus_per_node < 1:
        raise ValueError("--gpus and --gpus-per-node must be >= 1")
    gpu = GPUS[args.gpu]
    cluster = Cluster(gpu, args.gpus, min(args.gpus_per_node, args.gpus), args.inter_node_gbps or gpu.inter_node_gbps)
    stats: dict = {}
    findings = [] if args.no_preflight else preflight(cfg, world_size=args.gpus, stats=stats)
    for f in findings:
        print(f"{f.level.upper():<8}{f.what}: {f.message}")
    errors = [f for f in findings if f.level == "error"]
    if findings:
        print(f"preflight: {len(errors)} error(s), {len(findings) - len(errors)} warning(s)")
    # Batches are padded to their longest sample, not to data.max_length: plan for the sampled p95.
    train_p95 = [v["p95"] for k, v in stats.items() if k.startswith("data.train")]
    seq = args.seq_len or (min(cfg.data.max_length, math.ceil(max(train_p95))) if train_p95 else None)
    plan = estimate(cfg, cluster, seq, args.global_batch)
    plan.length_stats = stats
    plan.preflight = [asdict(f) for f in findings]
    print(render(plan))
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(to_json(plan))
    return 1 if errors else 0

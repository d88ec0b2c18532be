"""Autotune benchmarks for kernels.msda (`python -m kernels.bench --help`): Triton (plain and fused prologue) vs
the grid_sample reference and, when importable, the Deformable-DETR CUDA extension. Reports dispatch time and
CUDA-graph kernel time, GB/s, ratios to the HBM floor and to the L1 gather floor, the first call's time (compile
+ autotune); local (~2 px) and uniform-random offsets; CSV, JSON and plots. Providers or timings that could not
run are named in the output and in msda_skipped.csv, never dropped silently.
On a CPU-only machine it runs the Triton interpreter on tiny shapes: those timings mean nothing.
"""

import argparse
import csv
import functools
import json
import math
import os
import statistics
import time

import torch

from kernels.msda import fused_prologue_reference, ms_deform_attn, ms_deform_attn_fused, ms_deform_attn_reference

# Encoder self-attention of the multi-scale pixel decoder: every pixel of every level is a query (Lq = S).
SHAPES = {
    # Mask2Former at 1024x1024: strides 8/16/32, 8 heads of 32 channels, 4 points per level.
    "mask2former": dict(levels=[(128, 128), (64, 64), (32, 32)], heads=8, head_dim=32, points=4),
    # OpenSeeD-style 4-level variant that adds stride 4.
    "openseed": dict(levels=[(256, 256), (128, 128), (64, 64), (32, 32)], heads=8, head_dim=32, points=4),
    # For the CPU interpreter only.
    "tiny": dict(levels=[(4, 4), (2, 2), (1, 1)], heads=2, head_dim=8, points=2),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CPU_BANNER = (
    "CPU only: Triton runs in its interpreter (TRITON_INTERPRET=1) on tiny shapes. These timings, GB/s and ratios\n"
    "MEAN NOTHING about GPU performance; they only show that the benchmark runs. Run on a GPU to measure."
)


def peak_hbm_gbps(device_name, total_bytes):
    """Datasheet HBM bandwidth in GB/s for the GPUs the targets are stated for; None when unknown."""
    name = device_name.upper()
    if "H200" in name:
        return 4800.0
    if "H100" in name:
        return 2000.0 if "PCIE" in name else 3350.0
    if "A100" in name:
        return 2039.0 if total_bytes > 50e9 else 1555.0
    return None


def peak_l1_gbps(device_name):
    """Aggregate L1 load bandwidth, GB/s: SMs x 128 B/clock x boost clock. The gathers (4 corners x D channels per
    point) are served from L1/L2, so this, not HBM, bounds the forward when rows of neighbouring queries share
    pixels. None when unknown."""
    name = device_name.upper()
    if "H100" in name or "H200" in name:
        return (114 if "PCIE" in name else 132) * 128 * 1.98
    if "A100" in name:
        return 108 * 128 * 1.41
    return None


def gather_bytes(mode, value, loc):
    """Bytes the kernel loads through L1 for its corner gathers: 4 corners x D channels per (row, level, point);
    the backward loads them again (for <grad_out, value>) and scatters as many."""
    N, Lq, M, L, P, _ = loc.shape
    fwd = N * Lq * M * L * P * 4 * value.shape[-1] * value.element_size()
    return fwd if mode == "fwd" else 3 * fwd


def make_problem(shape, batch, dtype, device, seed=0, offsets="local"):
    """Inputs as the pixel decoder makes them: each query samples a few pixels around its own location
    (offsets="local", ~2 px: neighbouring queries share cache lines), or anywhere in the level ("uniform": the
    cache-hostile case, what a trained decoder's long-range points approach).

    sampling_locations stay fp32 (bf16 cannot address sub-pixel positions on a 256-pixel level); value and
    attention_weights take the benchmarked precision.
    """
    g = torch.Generator().manual_seed(seed)
    spec = SHAPES[shape]
    shapes = torch.tensor(spec["levels"], dtype=torch.int64)
    areas = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    S, M, D, P, L = int(areas.sum()), spec["heads"], spec["head_dim"], spec["points"], len(spec["levels"])
    # reference point of each query: its pixel centre, normalised to [0, 1]
    refs = torch.cat([
        torch.stack(torch.meshgrid((torch.arange(W) + 0.5) / W, (torch.arange(H) + 0.5) / H, indexing="xy"), -1)
        .reshape(-1, 2) for H, W in spec["levels"]
    ])
    sizes = shapes.flip(-1).float()  # (W, H) per level
    if offsets == "uniform":
        loc = torch.rand(batch, S, M, L, P, 2, generator=g)
    else:
        pixel_offsets = torch.randn(batch, S, M, L, P, 2, generator=g) * 2.0 / sizes[:, None, :]  # ~2 pixels
        loc = refs[None, :, None, None, None, :] + pixel_offsets
    value = torch.randn(batch, S, M, D, generator=g)
    attn = torch.rand(batch, S, M, L, P, generator=g).flatten(-2).softmax(-1).view(batch, S, M, L, P)
    return (value.to(device, dtype), shapes.to(device), starts.to(device), loc.to(device),
            attn.to(device, dtype))


def compulsory_bytes(mode, value, loc, attn, out):
    """Each input read once and each output written once (forward; backward adds grad_out and three grads)."""
    inputs = sum(t.numel() * t.element_size() for t in (value, loc, attn))
    output = out.numel() * out.element_size()
    forward = inputs + output
    backward = inputs + output + inputs  # read value, loc, attn, grad_out; write their three gradients
    return forward if mode == "fwd" else forward + backward


def activation_bytes(fn, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Floating-point bytes `fn` (an MSDA implementation) leaves alive after its forward: its output plus what
    autograd saved for backward that is not an input. Counts tensors, so it is the same on any device."""
    inputs = [x.detach().requires_grad_() for x in (value, sampling_locations, attention_weights)]
    input_storages = {x.untyped_storage().data_ptr() for x in inputs}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if t.is_floating_point() and storage.data_ptr() not in input_storages:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(inputs[0], spatial_shapes, level_start_index, inputs[1], inputs[2])
    kept[out.untyped_storage().data_ptr()] = out.untyped_storage().nbytes()
    return sum(kept.values())


def cuda_extension():
    """The Deformable-DETR CUDA extension (`MultiScaleDeformableAttention`), or None."""
    try:
        import MultiScaleDeformableAttention

        return MultiScaleDeformableAttention
    except ImportError:
        return None


def provider_fn(provider, mode, problem, deterministic):
    """A zero-argument callable running one forward (or forward+backward) and the tensors whose .grad to reset."""
    value, shapes, starts, loc, attn = problem
    if provider == "cuda_ext":  # fp32 only, no autograd: call its forward/backward directly
        ext, step = cuda_extension(), min(64, value.shape[0])
        v, l, a = value.float(), loc.float(), attn.float()
        if mode == "fwd":
            return (lambda: ext.ms_deform_attn_forward(v, shapes, starts, l, a, step)), []
        grad = torch.randn(v.shape[0], l.shape[1], v.shape[2] * v.shape[3], device=v.device)

        def fwd_bwd():
            ext.ms_deform_attn_forward(v, shapes, starts, l, a, step)
            ext.ms_deform_attn_backward(v, shapes, starts, l, a, grad, step)

        return fwd_bwd, []

    if provider == "triton_fused":  # prologue inside: offsets in pixels and logits, as the pixel decoder passes
        refs = torch.full((loc.shape[1], 2), 0.5, device=loc.device)
        pixel_offsets = (loc - refs[None, :, None, None, None, :]) * shapes.flip(-1).to(loc)[None, None, None, :, None, :]
        logits = attn.float().clamp_min(1e-6).log().to(attn.dtype)  # softmax(log a) == a for normalised a
        op = lambda v, o, lg: ms_deform_attn_fused(
            v, shapes, starts, refs, o, lg, backend="triton", deterministic=deterministic
        )
        loc, attn = pixel_offsets, logits
    elif provider == "triton_native_atomics":  # backward scatters fp16/bf16 atomics straight into grad_value
        op = lambda v, l, a: ms_deform_attn(v, shapes, starts, l, a, backend="triton", deterministic=False)
        if mode == "fwd":
            return (lambda: op(value, loc, attn)), []
        v, l, a = (x.detach().requires_grad_() for x in (value, loc, attn))
        grad = torch.randn(v.shape[0], l.shape[1], v.shape[2] * v.shape[3], device=v.device, dtype=v.dtype)

        def native():
            os.environ["SEGCAP_MSDA_NATIVE_ATOMICS"] = "1"  # read by the backward; set only around this call
            try:
                op(v, l, a).backward(grad)
            finally:
                os.environ.pop("SEGCAP_MSDA_NATIVE_ATOMICS", None)

        return native, [v, l, a]
    elif provider == "triton":
        op = lambda v, l, a: ms_deform_attn(
            v, shapes, starts, l, a, backend="triton", deterministic=deterministic
        )
    else:  # grid_sample wants one dtype: its users run everything in the benchmarked precision
        op = lambda v, l, a: ms_deform_attn_reference(v, shapes, starts, l, a)
        loc = loc.to(value.dtype)
    if mode == "fwd":
        return (lambda: op(value, loc, attn)), []
    v, l, a = (x.detach().requires_grad_() for x in (value, loc, attn))
    grad = torch.randn(v.shape[0], l.shape[1], v.shape[2] * v.shape[3], device=v.device, dtype=v.dtype)
    return (lambda: op(v, l, a).backward(grad)), [v, l, a]


def time_ms(fn, grad_to_none, on_cuda, cpu_reps):
    """(median, p20, p80) in ms with Python dispatch included. triton.testing.do_bench needs a GPU driver; the
    interpreter gets a CPU timer."""
    if on_cuda:
        import triton.testing

        return tuple(triton.testing.do_bench(fn, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8]))
    times = []  # no warm-up: the interpreter does not compile
    for _ in range(cpu_reps):
        for t in grad_to_none:
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(times, n=5) if len(times) > 1 else times * 4
    return statistics.median(times), q[0], q[-1]


def graph_ms(fn, grad_to_none):
    """Kernel time without Python dispatch: the call replayed from a CUDA graph (triton.testing's cudagraph bench).
    At batch 1-2 dispatch (40-80 us) exceeds the kernels (15-40 us): only this column measures them."""
    import triton.testing

    for t in grad_to_none:
        t.grad = None

    def step():
        for t in grad_to_none:
            t.grad = None
        fn()

    return float(triton.testing.do_bench_cudagraph(step))


def first_call_s(fn, on_cuda):
    """Seconds of the first call: compile plus autotuning (what a run pays once per shape bucket and dtype)."""
    if on_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if on_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


class Runner:
    """Measures each (shape, offsets, mode, precision, batch, provider) once; perf_report plots read the cache."""

    def __init__(self, args, on_cuda):
        self.args, self.on_cuda, self.results, self.skipped = args, on_cuda, {}, []
        self.device = "cuda" if on_cuda else "cpu"
        props = torch.cuda.get_device_properties(0) if on_cuda else None
        self.device_name = props.name if props else "cpu (Triton interpreter)"
        self.peak_gbps = args.hbm_gbps or (peak_hbm_gbps(props.name, props.total_memory) if props else None)
        self.l1_gbps = args.l1_gbps or (peak_l1_gbps(props.name) if props else None)

    def skip(self, what, why):
        self.skipped.append({"what": what, "why": why})
        print(f"SKIPPED {what}: {why}")

    def measure(self, shape, mode, precision, batch, provider, offsets="local"):
        key = (shape, offsets, mode, precision, batch, provider)
        if key in self.results:
            return self.results[key]
        problem = make_problem(shape, batch, DTYPES[precision], self.device, offsets=offsets)
        value, _, _, loc, attn = problem
        row = dict(shape=shape, offsets=offsets, mode=mode, precision=precision, batch=batch, provider=provider)
        nan = float("nan")
        ms = lo = hi = ms_graph = first_s = nan
        try:
            fn, grads = provider_fn(provider, mode, problem, self.args.deterministic)
            if provider.startswith("triton"):
                first_s = first_call_s(fn, self.on_cuda)
            ms, lo, hi = time_ms(fn, grads, self.on_cuda, self.args.cpu_reps)
            if self.on_cuda:
                try:
                    ms_graph = graph_ms(fn, grads)
                except Exception as e:  # capture can fail (e.g. a host sync inside): say so, keep the row
                    self.skip(f"cuda-graph timing of {key}", f"{type(e).__name__}: {e}")
        except torch.OutOfMemoryError:
            self.skip(f"{key}", "out of GPU memory")
            torch.cuda.empty_cache()
        if provider == "cuda_ext":  # it reads and writes fp32 whatever the benchmarked precision
            value, attn = value.float(), attn.float()
        out = torch.empty(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3], dtype=value.dtype)
        nbytes = compulsory_bytes(mode, value, loc, attn, out)
        kernel_ms = ms_graph if not math.isnan(ms_graph) else ms
        floor_ms = nbytes / (self.peak_gbps * 1e9) * 1e3 if self.peak_gbps else nan
        l1_ms = gather_bytes(mode, value, loc) / (self.l1_gbps * 1e9) * 1e3 if self.l1_gbps else nan
        row.update(ms=ms, ms_p20=lo, ms_p80=hi, ms_graph=ms_graph, first_call_s=first_s,
                   compulsory_mb=nbytes / 1e6, gbps=nbytes / (kernel_ms * 1e6),
                   floor_ms=floor_ms, x_floor=kernel_ms / floor_ms, l1_floor_ms=l1_ms, x_l1_floor=kernel_ms / l1_ms)
        self.results[key] = row
        return row


def perf_reports(runner, args, providers):
    """One triton.testing.perf_report per (shape, mode, precision, metric): batch on x, one line per provider."""
    import triton.testing

    names = {"triton": "Triton", "triton_fused": "Triton fused prologue", "reference": "grid_sample",
             "triton_native_atomics": "Triton, native half atomics",
             "cuda_ext": "CUDA ext (fp32)"}
    benchmarks = [
        triton.testing.Benchmark(
            x_names=["batch"], x_vals=args.batch, line_arg="provider", line_vals=providers,
            line_names=[names[p] for p in providers], ylabel=metric, xlabel="batch",
            plot_name=f"msda-{shape}-{offsets}-{mode}-{precision}-{metric.replace('/', 'per')}",
            args=dict(shape=shape, offsets=offsets, mode=mode, precision=precision, metric=metric),
        )
        for shape in args.shapes
        for offsets in args.offsets
        for mode in args.mode
        for precision in args.precision
        for metric in ("ms", "ms_graph", "GB/s", "x_floor", "x_l1_floor")
    ]

    @triton.testing.perf_report(benchmarks)
    def bench(batch, provider, shape, offsets, mode, precision, metric):
        row = runner.measure(shape, mode, precision, batch, provider, offsets)
        if metric == "ms":
            return row["ms"], row["ms_p20"], row["ms_p80"]
        return row[{"GB/s": "gbps"}.get(metric, metric)]

    return bench


def check_against_reference(shapes, precisions, device):
    """Max relative error of the Triton forward against the fp32 reference, batch 1, printed before timing."""
    for shape in shapes:
        for precision in precisions:
            value, shapes_t, starts, loc, attn = make_problem(shape, 1, DTYPES[precision], device, seed=1)
            out = ms_deform_attn(value, shapes_t, starts, loc, attn, backend="triton").float()
            ref = ms_deform_attn_reference(value.float(), shapes_t, starts, loc, attn.float())
            err = ((out - ref).abs().max() / ref.abs().max()).item()
            print(f"check {shape:12s} {precision}: max relative error vs reference {err:.2e}")


def activation_table(shapes, device):
    """Activation memory of the op vs the grid_sample reference, batch 1, fp32. Counted, not timed: valid on CPU.
    The custom op saves only its inputs whatever the backend, so its reference backend stands in on CPU."""
    rows = []
    for shape in shapes:
        problem = make_problem(shape, 1, torch.float32, device)
        backend = "triton" if problem[0].is_cuda else "reference"
        ours = activation_bytes(functools.partial(ms_deform_attn, backend=backend), *problem)
        theirs = activation_bytes(ms_deform_attn_reference, *problem)
        rows.append(
            {"shape": shape, "batch": 1, "op_mib": ours / 2**20, "grid_sample_mib": theirs / 2**20,
             "ratio": theirs / ours}
        )
        print(f"activation memory {shape:12s} batch 1 fp32: ms_deform_attn {ours / 2**20:8.1f} MiB, "
              f"grid_sample reference {theirs / 2**20:8.1f} MiB ({theirs / ours:.1f}x)")
    return rows


def write_csv(path, rows):
    if rows:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def parse_args(argv, on_cuda):
    p = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES),
                   default=["mask2former", "openseed"] if on_cuda else ["tiny"])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 2, 4, 8] if on_cuda else [1, 2])
    p.add_argument("--precision", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    p.add_argument("--mode", nargs="+", choices=["fwd", "fwd_bwd"], default=["fwd", "fwd_bwd"])
    p.add_argument("--providers", nargs="+",
                   choices=["triton", "triton_fused", "triton_native_atomics", "reference", "cuda_ext"],
                   help="default: triton, triton_fused, reference, and cuda_ext when MultiScaleDeformableAttention "
                        "imports (its absence is reported as a skip)")
    p.add_argument("--offsets", nargs="+", choices=["local", "uniform"], default=["local"],
                   help="sampling offsets: ~2 px around each query (cache-friendly) and/or uniform over the level")
    p.add_argument("--deterministic", action="store_true", help="time the deterministic (atomic-free) backward")
    p.add_argument("--hbm-gbps", type=float, help="peak HBM bandwidth for the floor (default: from the GPU name)")
    p.add_argument("--l1-gbps", type=float, help="aggregate L1 bandwidth for the gather floor (default: from the name)")
    p.add_argument("--json", help="also write every row, the skips and the device as one JSON file")
    p.add_argument("--memory-shapes", nargs="*", choices=list(SHAPES), default=["mask2former", "openseed"],
                   help="shapes for the activation-memory table (batch 1; counted, so meaningful on CPU too)")
    p.add_argument("--cpu-reps", type=int, default=2, help="timed repetitions per point in interpreter mode")
    p.add_argument("--out-dir", default="runs/msda_bench", help="CSV files, plots and results.html go here")
    return p.parse_args(argv)


def main(argv=None):
    on_cuda = torch.cuda.is_available()
    args = parse_args(argv, on_cuda)
    if not on_cuda:
        # Must happen before the Triton kernels are first imported (kernels.msda imports them lazily).
        os.environ.setdefault("TRITON_INTERPRET", "1")
        print(CPU_BANNER)
    runner = Runner(args, on_cuda)
    have_ext = on_cuda and cuda_extension() is not None
    providers = args.providers or ["triton", "triton_fused", "reference"] + (["cuda_ext"] if have_ext else [])
    if not have_ext:
        runner.skip("provider cuda_ext", "no GPU" if not on_cuda else
                    "MultiScaleDeformableAttention (Deformable-DETR's CUDA extension) is not importable")
        providers = [p for p in providers if p != "cuda_ext"]
    os.makedirs(args.out_dir, exist_ok=True)

    check_against_reference(args.shapes, args.precision, "cuda" if on_cuda else "cpu")
    if runner.peak_gbps is None:
        print("no known HBM peak for this device: x_floor is nan (pass --hbm-gbps)")
    if runner.l1_gbps is None:
        print("no known L1 bandwidth for this device: x_l1_floor is nan (pass --l1-gbps)")
    perf_reports(runner, args, providers).run(print_data=True, save_path=args.out_dir)
    rows = list(runner.results.values())
    write_csv(os.path.join(args.out_dir, "msda_summary.csv"), rows)
    write_csv(os.path.join(args.out_dir, "msda_skipped.csv"), runner.skipped or [{"what": "", "why": "nothing skipped"}])
    memory = activation_table(args.memory_shapes, "cuda" if on_cuda else "cpu")
    write_csv(os.path.join(args.out_dir, "msda_activation_memory.csv"), memory)
    if args.json:
        with open(args.json, "w") as f:
            clean = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in rows]
            json.dump({"device": runner.device_name, "hbm_gbps": runner.peak_gbps, "l1_gbps": runner.l1_gbps,
                       "rows": clean, "skipped": runner.skipped, "activation_memory": memory}, f, indent=1)
    print(f"wrote {args.out_dir}/msda_summary.csv, msda_skipped.csv, msda_activation_memory.csv, one CSV + PNG "
          "per plot, results.html" + (f", {args.json}" if args.json else ""))
    for item in runner.skipped:
        print(f"skipped: {item['what']}: {item['why']}")
    if not on_cuda:
        print(CPU_BANNER)


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# One-shot GPU check of kernels.msda (issue 15), sized to finish within 9 minutes on one H100/H200:
#   1. the CUDA correctness tests (tests/test_msda_cuda.py: every interpreter-suite case in fp32/fp16/bf16, the
#      fused prologue, the out-of-bounds guard, a deterministic backward bit-identical across two processes);
#   2. the first call's time (compile + autotune) in a fresh Triton cache, then again in a second process that
#      finds the cache (the disk-cached autotune result must make it cheap);
#   3. the benchmark: Mask2Former and 4-level shapes, batch 1 and 8, fp32 and bf16, fwd and fwd+bwd, local and
#      uniform offsets, dispatch and CUDA-graph times, HBM and L1 floors; the backward's three grad_value paths
#      (fp32-buffer atomics, native half atomics, deterministic sort + gather);
# and writes $OUT/gpu_check.json (everything) and $OUT/gpu_check.png (kernel time per provider).
# Usage: bash scripts/gpu_check.sh [OUT_DIR]   (default runs/gpu_check; the device tool's $OUT when set)
# Needs: python3 with torch (CUDA), triton, pytest, pytest-timeout, matplotlib. Nothing else of segcap.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
out=${1:-${OUT:-runs/gpu_check}}
mkdir -p "$out"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
started=$(date +%s)
status=0

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  "$py" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__,
             "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
} 2>&1 | tee "$out/environment.txt"

echo "== 1. CUDA correctness tests"
timeout 240 "$py" -m pytest -q -p no:cacheprovider tests/test_msda_cuda.py --junitxml="$out/cuda_tests.xml" \
    2>&1 | tail -n 40 | tee "$out/cuda_tests.log" || status=1

echo "== 2. first call: compile + autotune, then the same in a second process with the cache"
first_call='
import json, sys, time, torch
from kernels.bench import make_problem
from kernels.msda import ms_deform_attn
times = {}
for shape in ("mask2former", "openseed"):
    for prec, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        v, s, st, l, a = make_problem(shape, 1, dt, "cuda")
        v.requires_grad_()
        torch.cuda.synchronize(); t0 = time.perf_counter()
        ms_deform_attn(v, s, st, l, a, backend="triton").float().sum().backward()
        torch.cuda.synchronize(); times[f"{shape}-{prec}-fwd_bwd"] = time.perf_counter() - t0
print(json.dumps(times))'
rm -rf "$out/triton_cache"
for attempt in fresh cached; do
    TRITON_CACHE_DIR="$out/triton_cache" timeout 240 "$py" -c "$first_call" >"$out/first_call_$attempt.json" \
        2>"$out/first_call_$attempt.err" || status=1
    echo "$attempt cache: $(cat "$out/first_call_$attempt.json")"
done

echo "== 3. benchmark"
timeout 300 "$py" -m kernels.bench --shapes mask2former openseed --batch 1 8 --precision fp32 bf16 \
    --mode fwd fwd_bwd --offsets local uniform --out-dir "$out/bench" --json "$out/bench.json" \
    --providers triton triton_fused triton_native_atomics reference cuda_ext \
    --memory-shapes mask2former openseed 2>&1 | tail -n 60 | tee "$out/bench.log" || status=1
echo "== 3b. the deterministic (sort + gather) backward, to set against the atomic rows above"
timeout 90 "$py" -m kernels.bench --shapes mask2former --batch 1 8 --precision fp32 bf16 --mode fwd_bwd \
    --providers triton --deterministic --out-dir "$out/bench_det" --json "$out/bench_deterministic.json" \
    --memory-shapes 2>&1 | tail -n 20 | tee "$out/bench_deterministic.log" || status=1

echo "== summary"
"$py" - "$out" "$started" "$status" <<'PY'
import json, os, sys, time, xml.etree.ElementTree as ET
out, started, status = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        return {"error": f"{name}: {e}"}
tests = {}
try:
    suite = ET.parse(os.path.join(out, "cuda_tests.xml")).getroot().iter("testsuite").__next__()
    tests = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
except Exception as e:
    tests = {"error": str(e)}
bench = load("bench.json")
deterministic = load("bench_deterministic.json")
summary = {"deterministic_backward": deterministic.get("rows", deterministic),"seconds": round(time.time() - started, 1), "exit_status": status, "tests": tests,
           "first_call_s": {"fresh_cache": load("first_call_fresh.json"), "cached": load("first_call_cached.json")},
           "bench": bench}
with open(os.path.join(out, "gpu_check.json"), "w") as f:
    json.dump(summary, f, indent=1)
rows = [r for r in bench.get("rows", []) if r.get("ms_graph") or r.get("ms")]
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = sorted({(r["shape"], r["offsets"], r["mode"], r["precision"], r["batch"]) for r in rows})
    providers = sorted({r["provider"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(8, len(labels) * 0.5), 5))
    for i, p in enumerate(providers):
        ys = [next((r.get("ms_graph") or r.get("ms") for r in rows if r["provider"] == p and
                    (r["shape"], r["offsets"], r["mode"], r["precision"], r["batch"]) == lab), None) for lab in labels]
        ax.bar([j + i * 0.8 / len(providers) for j in range(len(labels))], [y or 0 for y in ys],
               width=0.8 / len(providers), label=p)
    ax.set_yscale("log"); ax.set_ylabel("ms (CUDA graph where available)")
    ax.set_xticks(range(len(labels))); ax.set_xticklabels(["-".join(map(str, l)) for l in labels], rotation=90, fontsize=6)
    ax.legend(); fig.tight_layout(); fig.savefig(os.path.join(out, "gpu_check.png"), dpi=120)
except Exception as e:
    print("plot skipped:", e)
print(json.dumps({k: summary[k] for k in ("seconds", "exit_status", "tests", "first_call_s")}, indent=1))
for r in rows:
    if r["provider"].startswith("triton") or r["provider"] == "reference":
        fmt = lambda x: "-" if x is None else f"{x:.4g}"
        print(f'{r["shape"]:11s} {r["offsets"]:7s} {r["mode"]:7s} {r["precision"]} b{r["batch"]} {r["provider"]:12s} '
              f'ms {fmt(r["ms"])} graph {fmt(r["ms_graph"])} x_hbm_floor {fmt(r["x_floor"])} '
              f'x_l1_floor {fmt(r["x_l1_floor"])} first_call_s {fmt(r["first_call_s"])}')
PY
exit "$status"

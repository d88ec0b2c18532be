"""kernels.msda compiled for a real GPU: the interpreter suite's cases in fp32/fp16/bf16, the fused prologue,
the out-of-bounds guard, launches on value's device, and a deterministic backward bit-identical across processes.

Runs only where CUDA is present and TRITON_INTERPRET=0 (scripts/gpu_check.sh sets it); skipped elsewhere, including
CI, which has no GPU.
"""

import os
import subprocess
import sys

import pytest
import torch

from tests.test_msda import CASES, assert_rel, grad_out_like, make_inputs
from tests.test_msda_tuning import NAMES, fused_inputs, fused_with_grads

interpreting = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available() or interpreting,
                       reason="needs a CUDA GPU with compiled Triton kernels (TRITON_INTERPRET=0)"),
    pytest.mark.timeout(600),
]

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def on_gpu(tensors):
    return [t.cuda() for t in tensors]


def grads(backend, value, shapes, starts, loc, attn, grad_out, deterministic=False):
    from kernels.msda import ms_deform_attn

    v, l, a = (x.detach().clone().requires_grad_() for x in (value, loc, attn))
    out = ms_deform_attn(v, shapes, starts, l, a, backend=backend, deterministic=deterministic)
    out.backward(grad_out)
    return out.detach(), v.grad, l.grad, a.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_kernels_match_the_fp32_reference(case, dtype, deterministic):
    value, shapes, starts, loc, attn = on_gpu(make_inputs(CASES[case], seed=7, dtype=dtype))
    loc = loc.float()  # locations stay fp32, as the pixel decoder keeps them
    grad_out = grad_out_like(value, loc, seed=7).cuda()
    expected = grads("reference", value.float(), shapes, starts, loc, attn.float(), grad_out.float())
    actual = grads("triton", value, shapes, starts, loc, attn, grad_out, deterministic)
    for name, a, e in zip(("output", "grad_value", "grad_loc", "grad_attn"), actual, expected):
        assert_rel(a.float(), e, TOL[dtype], f"{case} {dtype} {name}")


@pytest.mark.parametrize("case", ["base", "five_levels", "P8"])
def test_cuda_fused_prologue_matches_the_unfused_reference(case):
    inputs = on_gpu(fused_inputs(CASES[case], seed=8))
    grad_out = grad_out_like(inputs[0], inputs[4], seed=8).cuda()
    expected = fused_with_grads("reference", *inputs, grad_out)
    actual = fused_with_grads("triton", *inputs, grad_out)
    for name, a, e in zip(NAMES, actual, expected):
        assert_rel(a, e, 1e-5, name)


def test_cuda_kernel_reads_nothing_of_a_level_outside_value():
    from kernels.msda import ms_deform_attn_reference

    value, shapes, starts, loc, attn = on_gpu(make_inputs(CASES["base"], seed=9))
    short = value[:, :30].contiguous()
    out = torch.ops.segcap.ms_deform_attn(short, shapes, starts, loc, attn, "triton", False)
    padded = torch.cat([short, torch.zeros_like(value[:, 30:])], dim=1)
    assert_rel(out, ms_deform_attn_reference(padded, shapes, starts, loc, attn), 1e-5, "output")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_kernels_launch_on_the_tensors_device_not_the_current_one():
    from kernels.msda import ms_deform_attn, ms_deform_attn_reference

    value, shapes, starts, loc, attn = (t.to("cuda:1") for t in make_inputs(CASES["base"], seed=10))
    with torch.cuda.device(0):
        out = ms_deform_attn(value, shapes, starts, loc, attn, backend="triton")
    assert out.device == torch.device("cuda:1")
    assert_rel(out, ms_deform_attn_reference(value, shapes, starts, loc, attn), 1e-5, "output")


DIGEST = r"""
import hashlib, sys, torch
from tests.test_msda import grad_out_like, make_inputs
from kernels.msda import ms_deform_attn
case = dict(N=2, M=8, D=32, Lq=4096, P=4, levels=[(32, 32), (16, 16), (8, 8)])
value, shapes, starts, loc, attn = (t.cuda() for t in make_inputs(case, seed=11, loc_low=0.3, loc_high=0.7))
v, l, a = (x.requires_grad_() for x in (value, loc, attn))
ms_deform_attn(v, shapes, starts, l, a, backend="triton", deterministic=True).backward(
    grad_out_like(value, loc, seed=11).cuda())
h = hashlib.sha256()
for g in (v.grad, l.grad, a.grad):
    h.update(g.cpu().numpy().tobytes())
print(h.hexdigest())
"""


def test_cuda_deterministic_backward_is_bit_identical_across_processes(tmp_path):
    """Two fresh processes, each with its own (empty) autotune cache: the fixed deterministic config and the
    sorted gather give the same bits whatever the autotuner would have picked."""
    digests = []
    for i in range(2):
        env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / f"cache{i}"), "TRITON_INTERPRET": "0"}
        p = subprocess.run([sys.executable, "-c", DIGEST], capture_output=True, text=True, env=env, timeout=300,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert p.returncode == 0, p.stderr[-3000:]
        digests.append(p.stdout.strip().splitlines()[-1])
    assert digests[0] == digests[1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_native_half_atomics_stay_within_half_precision_of_the_reference(dtype, monkeypatch):
    from kernels.msda.triton_bwd import native_atomics_apply

    value, shapes, starts, loc, attn = on_gpu(make_inputs(CASES["base"], seed=12, dtype=dtype))
    monkeypatch.setenv("SEGCAP_MSDA_NATIVE_ATOMICS", "1")
    if not native_atomics_apply(value):
        pytest.skip(f"no native {dtype} atomics on this GPU")
    loc = loc.float()
    grad_out = grad_out_like(value, loc, seed=12).cuda()
    expected = grads("reference", value.float(), shapes, starts, loc, attn.float(), grad_out.float())
    actual = grads("triton", value, shapes, starts, loc, attn, grad_out)
    assert actual[1].dtype == dtype
    assert_rel(actual[1].float(), expected[1], 2e-2, "grad_value")

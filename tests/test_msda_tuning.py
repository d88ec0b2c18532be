"""kernels.msda around the maths: bounded autotuning, the config pin, determinism's fixed config, input
validation, the out-of-bounds guard, contiguity inside the op, and the fused prologue against its reference."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is imported (conftest does the same)

from types import SimpleNamespace

import pytest
import torch

from kernels.msda import fused_prologue_reference, ms_deform_attn, ms_deform_attn_fused, ms_deform_attn_reference
from kernels.msda import autotune
from tests.test_msda import BASE, CASES, assert_rel, grad_out_like, make_inputs

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def compiled_mode(monkeypatch):
    """The autotuner's view of a GPU process: not interpreting, no pin in the environment."""
    monkeypatch.setattr(autotune, "knobs", SimpleNamespace(runtime=SimpleNamespace(interpret=False)))
    monkeypatch.delenv(autotune.PIN_ENV, raising=False)


# ---------------------------------------------------------------- autotuning


def test_config_set_is_small_and_never_sweeps_stages():
    configs = autotune.row_configs()
    assert len(configs) <= 8
    assert {c.num_stages for c in configs} == {1}
    assert len({(c.kwargs["BLOCK_R"], c.num_warps) for c in configs}) == len(configs)


def test_rows_enter_the_key_as_a_power_of_two_bucket():
    from kernels.msda.triton_bwd import msda_bwd_kernel
    from kernels.msda.triton_fwd import msda_fwd_kernel

    assert autotune.rows_bucket(21_504) == autotune.rows_bucket(24_000) == 32_768
    assert autotune.rows_bucket(1) == 1 and autotune.rows_bucket(17) == 32
    for kernel in (msda_fwd_kernel, msda_bwd_kernel):
        assert "ROWS_BUCKET" in kernel.keys and "n_rows" not in kernel.keys
    # (the disk cache, cache_results=True, is off under the interpreter; scripts/gpu_check.sh times a second
    # process's first call against the first's)


def test_interpreter_gets_exactly_one_config():
    kept = autotune.prune_row_configs(autotune.row_configs(), {"ROWS_BUCKET": 2**20}, BLOCK_D=32)
    assert kept == [autotune.INTERPRETER_CONFIG]


def test_compiled_mode_keeps_the_configs_whose_tile_fits(compiled_mode):
    configs = autotune.row_configs()
    kept = autotune.prune_row_configs(configs, {"ROWS_BUCKET": 2**20}, BLOCK_D=32)
    assert 1 < len(kept) < len(configs)
    assert all(c.kwargs["BLOCK_R"] * 32 // (c.num_warps * 32) <= 32 for c in kept)
    small = autotune.prune_row_configs(configs, {"ROWS_BUCKET": 8}, BLOCK_D=32)
    assert {c.kwargs["BLOCK_R"] for c in small} == {16}


def test_environment_pins_one_config(compiled_mode, monkeypatch):
    monkeypatch.setenv(autotune.PIN_ENV, "BLOCK_R=64,num_warps=2")
    kept = autotune.prune_row_configs(autotune.row_configs(), {"ROWS_BUCKET": 2**20}, BLOCK_D=32)
    assert [(c.kwargs["BLOCK_R"], c.num_warps, c.num_stages) for c in kept] == [(64, 2, 1)]


@pytest.mark.parametrize("pin", ["BLOCK_R=48,num_warps=4", "BLOCK=64", "BLOCK_R=x", "num_warps"])
def test_malformed_pin_is_an_error_naming_the_variable(compiled_mode, monkeypatch, pin):
    monkeypatch.setenv(autotune.PIN_ENV, pin)
    with pytest.raises(ValueError, match=autotune.PIN_ENV):
        autotune.prune_row_configs(autotune.row_configs(), {"ROWS_BUCKET": 64}, BLOCK_D=32)


def test_deterministic_backward_always_gets_the_same_fixed_config(compiled_mode):
    for bucket in (8, 4096, 2**20):
        kept = autotune.prune_row_configs(autotune.row_configs(), {"ROWS_BUCKET": bucket, "DETERMINISTIC": True},
                                          BLOCK_D=32)
        assert kept == [autotune.DETERMINISTIC_CONFIG]
    free = autotune.prune_row_configs(autotune.row_configs(), {"ROWS_BUCKET": 2**20, "DETERMINISTIC": False},
                                      BLOCK_D=32)
    assert len(free) > 1  # negative control: without determinism the autotuner may choose


# ---------------------------------------------------------------- validation and guards


def test_spatial_shapes_inconsistent_with_value_length_is_rejected():
    value, shapes, starts, loc, attn = make_inputs(BASE, seed=90)
    with pytest.raises(ValueError, match=r"cover 39 pixels but value has S=38"):
        ms_deform_attn(value[:, :-1], shapes, starts, loc, attn, backend="triton")
    with pytest.raises(ValueError, match="level_start_index"):
        ms_deform_attn(value, shapes, starts + 1, loc, attn, backend="triton")
    with pytest.raises(ValueError, match="integer"):
        ms_deform_attn(value, shapes.float(), starts, loc, attn, backend="triton")


def test_kernel_reads_nothing_of_a_level_that_lies_outside_value():
    """The registered op called directly (no Python validation): a level past value's end contributes zero
    instead of reading out of bounds (which on a GPU reads garbage and under the interpreter crashes)."""
    case = {**BASE, "levels": [(6, 5), (3, 3)]}
    value, shapes, starts, loc, attn = make_inputs(case, seed=91)
    short = value[:, :30].contiguous()  # only level 0's 6*5 pixels
    out = torch.ops.segcap.ms_deform_attn(short, shapes, starts, loc, attn, "triton", False)
    padded = torch.cat([short, torch.zeros_like(value[:, 30:])], dim=1)
    expected = ms_deform_attn_reference(padded, shapes, starts, loc, attn)
    assert_rel(out, expected, 1e-5, "output")
    assert out.abs().sum() > 0  # negative control: level 0 is still sampled


def test_direct_op_call_with_non_contiguous_inputs_is_correct():
    value, shapes, starts, loc, attn = make_inputs(BASE, seed=92)
    strided_value = value.transpose(0, 1).contiguous().transpose(0, 1)  # same values, batch-minor strides
    strided_loc = loc.transpose(1, 2).contiguous().transpose(1, 2)
    assert not strided_value.is_contiguous() and not strided_loc.is_contiguous()
    out = torch.ops.segcap.ms_deform_attn(strided_value, shapes, starts, strided_loc, attn, "triton", False)
    assert_rel(out, ms_deform_attn_reference(value, shapes, starts, loc, attn), 1e-5, "output")


# ---------------------------------------------------------------- fused prologue


def fused_inputs(case, seed, dtype=torch.float32):
    """value, shapes, starts, reference points (Lq, 2), pixel offsets, logits: as the pixel decoder makes them."""
    g = torch.Generator().manual_seed(seed)
    value, shapes, starts, loc, _ = make_inputs(case, seed, dtype)
    N, Lq, M, L, P, _ = loc.shape
    refs = torch.rand(Lq, 2, generator=g)
    offsets = torch.randn(N, Lq, M, L, P, 2, generator=g) * 2.0  # ~2 pixels, some points leave the image
    logits = torch.randn(N, Lq, M, L, P, generator=g) * 2.0
    return value, shapes, starts, refs, offsets.to(dtype), logits.to(dtype)


def fused_with_grads(backend, value, shapes, starts, refs, offsets, logits, grad_out, deterministic=False):
    v, r, o, lg = (x.detach().clone().requires_grad_() for x in (value, refs, offsets, logits))
    out = ms_deform_attn_fused(v, shapes, starts, r, o, lg, backend=backend, deterministic=deterministic)
    out.backward(grad_out)
    return out.detach(), v.grad, r.grad, o.grad, lg.grad


NAMES = ("output", "grad_value", "grad_reference_points", "grad_offsets", "grad_logits")


@pytest.mark.parametrize("case", ["base", "D_not_power_of_two", "five_levels", "P8"])
def test_fused_prologue_matches_the_unfused_reference(case):
    inputs = fused_inputs(CASES[case], seed=100)
    grad_out = grad_out_like(inputs[0], inputs[4], seed=100)
    expected = fused_with_grads("reference", *inputs, grad_out)
    actual = fused_with_grads("triton", *inputs, grad_out)
    for name, a, e in zip(NAMES, actual, expected):
        assert_rel(a, e, 1e-5, name)


def test_fused_deterministic_backward_matches_and_repeats():
    inputs = fused_inputs(CASES["base"], seed=101)
    grad_out = grad_out_like(inputs[0], inputs[4], seed=101)
    expected = fused_with_grads("reference", *inputs, grad_out)
    runs = [fused_with_grads("triton", *inputs, grad_out, deterministic=True) for _ in range(2)]
    for name, a, e in zip(NAMES, runs[0], expected):
        assert_rel(a, e, 1e-5, name)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_fused_reference_is_the_pixel_decoders_prologue():
    value, shapes, starts, refs, offsets, logits = fused_inputs(CASES["base"], seed=102)
    loc, weights = fused_prologue_reference(shapes, refs, offsets, logits)
    W = shapes[:, 1].float()
    assert torch.allclose(loc[0, 3, 1, 1, 0, 0], refs[3, 0] + offsets[0, 3, 1, 1, 0, 0] / W[1])
    row = logits[0, 3, 1].flatten().softmax(0).view_as(weights[0, 3, 1])
    assert torch.allclose(weights[0, 3, 1], row)  # one softmax over all L*P samples of a (query, head)
    out = ms_deform_attn_fused(value, shapes, starts, refs, offsets, logits, backend="reference")
    assert torch.equal(out, ms_deform_attn(value, shapes, starts, loc, weights, backend="reference"))


def test_fused_rejects_reference_points_of_the_wrong_shape():
    value, shapes, starts, refs, offsets, logits = fused_inputs(CASES["base"], seed=103)
    with pytest.raises(ValueError, match="reference_points"):
        ms_deform_attn_fused(value, shapes, starts, refs[:-1], offsets, logits, backend="triton")


# ---------------------------------------------------------------- benchmark


def test_l1_floor_counts_four_corner_rows_of_d_channels_per_point():
    from kernels.bench import gather_bytes, make_problem, peak_l1_gbps

    value, _, _, loc, _ = make_problem("tiny", 2, torch.bfloat16, "cpu")
    N, Lq, M, L, P, _ = loc.shape
    assert gather_bytes("fwd", value, loc) == N * Lq * M * L * P * 4 * value.shape[-1] * 2
    assert gather_bytes("fwd_bwd", value, loc) == 3 * gather_bytes("fwd", value, loc)
    assert peak_l1_gbps("NVIDIA H200") == pytest.approx(132 * 128 * 1.98)
    assert peak_l1_gbps("Some other GPU") is None


def test_uniform_offsets_spread_over_the_level_and_local_ones_stay_near_their_query():
    from kernels.bench import make_problem

    _, _, _, local, _ = make_problem("mask2former", 1, torch.float32, "cpu", offsets="local")
    _, _, _, uniform, _ = make_problem("mask2former", 1, torch.float32, "cpu", offsets="uniform")
    refs_x = local[0, :, 0, 0, 0, 0]  # level 0's own queries sample around themselves (128 px wide level)
    assert (local[0, :16384, 0, 0, :, 0] - refs_x[:16384, None]).abs().mean() < 4 / 128
    assert uniform.min() >= 0 and uniform.max() <= 1 and uniform[..., 0].std() > 0.25


@pytest.mark.slow
def test_benchmark_names_what_it_skipped_in_its_output_and_files(tmp_path, capsys):
    import json

    from kernels import bench

    bench.main(["--batch", "1", "--precision", "fp32", "--mode", "fwd", "--offsets", "local", "uniform",
                "--cpu-reps", "1", "--memory-shapes", "--out-dir", str(tmp_path), "--json", str(tmp_path / "b.json")])
    report = json.loads((tmp_path / "b.json").read_text())
    assert [s["what"] for s in report["skipped"]] == ["provider cuda_ext"]
    assert "skipped: provider cuda_ext" in capsys.readouterr().out
    assert "cuda_ext" in (tmp_path / "msda_skipped.csv").read_text()
    seen = {(r["provider"], r["offsets"]) for r in report["rows"]}
    assert seen == {(p, o) for p in ("triton", "triton_fused", "reference") for o in ("local", "uniform")}
    assert all(r["first_call_s"] > 0 for r in report["rows"] if r["provider"].startswith("triton"))

"""A checkpoint outlives its world size: 2 ranks -> 1 -> 2 under real ZeRO-3 (gloo, CPU), through
launcher.checkpoint's consolidated trainable state. The global batch stays the same (one rank with
grad_accum 2 takes both ranks' micro-batches), so the resumed losses must equal the uninterrupted run's;
the weights, Adam moments, step counts and LR schedule must come back bit for bit."""

import pytest
import torch

from distributed import run_distributed

pytestmark = [pytest.mark.dist, pytest.mark.slow]
COUNTS = ([2, 1, 0, 1], [1, 0, 3, 1])  # [SEG]s per sample of the global batch's two halves
TIMEOUT = 180


def _engine(gas: int):
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from modeling import build_model
    from test_model_fixtures import tiny_config, tiny_tokenizer

    ds = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": 0.5,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.05, "torch_adam": True}},
        "steps_per_print": 10**9,
    }
    dschf = HfDeepSpeedConfig(ds)
    model = build_model(tiny_config(), tiny_tokenizer(), dschf=dschf)

    def warmup(optimizer):  # a schedule whose position matters: lr grows each step
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 8))

    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.trainable_parameters(), config=ds,
                                      lr_scheduler=warmup)
    engine.keep = dschf
    return engine, model


def _job(ckpt_dir, gas: int, load_step: int, last_step: int, save_step: int):
    """Train global steps load_step+1..last_step; micro-batch `part` of a step is the same data at
    every world size. Returns the losses by (step, part) and the state right after the load."""
    from pathlib import Path

    from launcher import checkpoint
    from launcher.dist import identity
    from test_model_fixtures import make_batch

    info = identity()
    engine, model = _engine(gas)
    ckpt_dir = Path(ckpt_dir)
    start, reloaded = 0, None
    if load_step:
        start = checkpoint.load(engine, ckpt_dir / checkpoint.tag_for(load_step), info)["step"]
        reloaded = ckpt_dir / f"reloaded_{info.world_size}"
        checkpoint.save_trainable(engine, reloaded, {"step": start}, info)  # what this engine now holds
    losses = {}
    for step in range(start + 1, last_step + 1):
        for micro in range(gas):
            part = info.rank * gas + micro
            out = engine(**make_batch(model, list(COUNTS[part]), seed=10 * step + part))
            engine.backward(out.loss)
            engine.step()
            losses[(step, part)] = out.loss.item()
        if step == save_step:
            checkpoint.save(engine, ckpt_dir, step, {"step": step}, info, keep=5)
    return {"losses": losses, "start": start, "reloaded": str(reloaded) if reloaded else None}


def _merged(results) -> dict:
    return {k: v for r in results for k, v in r["losses"].items()}


def _files(folder):
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    folder = Path(folder)
    state = json.loads((folder / "state.json").read_text())
    state.pop("world_size")
    return load_file(str(folder / "model.safetensors")), load_file(str(folder / "optimizer.safetensors")), state


def _assert_same_state(saved, reloaded) -> None:
    for a, b in zip(_files(saved)[:2], _files(reloaded)[:2]):
        assert sorted(a) == sorted(b) and a
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert _files(saved)[2] == _files(reloaded)[2]


def test_two_ranks_to_one_to_two_keeps_state_and_losses(tmp_path):
    from launcher.checkpoint import TRAINABLE, tag_for

    full = _merged(run_distributed(_job, 2, args=(str(tmp_path / "a"), 1, 0, 6, 2), timeout=TIMEOUT, workdir=tmp_path / "ra"))
    # 2 -> 1: one rank, grad_accum 2, resumes step 2 of the 2-rank run and saves at 4
    (one,) = run_distributed(_job, 1, args=(str(tmp_path / "a"), 2, 2, 4, 4), timeout=TIMEOUT, workdir=tmp_path / "rb")
    assert one["start"] == 2
    saved2 = tmp_path / "a" / tag_for(2) / TRAINABLE
    _assert_same_state(saved2, one["reloaded"])
    state = _files(saved2)[2]
    assert state["optimizer_step"] == 2 and state["global_steps"] == 2 and state["lr_scheduler"]["last_epoch"] == 2
    # 1 -> 2: two ranks resume step 4 of the one-rank run
    two = run_distributed(_job, 2, args=(str(tmp_path / "a"), 1, 4, 6, 0), timeout=TIMEOUT, workdir=tmp_path / "rc")
    assert two[0]["start"] == 4
    _assert_same_state(tmp_path / "a" / tag_for(4) / TRAINABLE, two[0]["reloaded"])
    resumed = {**_merged([one]), **_merged(two)}
    assert sorted(resumed) == [(s, p) for s in range(3, 7) for p in (0, 1)]
    for (step, part), loss in resumed.items():
        want = full[(step, part)]
        if step in (3, 5):  # the first step after a load runs on the restored weights: nothing else differs
            assert loss == want, (step, part)
        else:  # later steps: gradients summed in another order (all-reduce vs accumulation)
            assert loss == pytest.approx(want, rel=1e-5, abs=1e-6), (step, part)
    assert len({round(v, 4) for v in full.values()}) > 6  # the losses did change step to step


def _round_trip_job(folder: str) -> dict:
    """Under ZeRO stages 0 and 2 (one rank): train 2 steps, save the consolidated state, load it into a
    fresh engine; then both engines take the same 2 steps."""
    from pathlib import Path

    import deepspeed

    from launcher import checkpoint
    from launcher.dist import identity
    from modeling import build_model
    from test_model_fixtures import make_batch, tiny_config, tiny_tokenizer

    info, out = identity(), {}
    for stage in (0, 2):
        def engine():
            ds = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage}, "steps_per_print": 10**9,
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
            model = build_model(tiny_config(), tiny_tokenizer())
            warmup = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / 8)  # noqa: E731
            return deepspeed.initialize(model=model, model_parameters=model.trainable_parameters(), config=ds,
                                        lr_scheduler=warmup)[0]

        def step(e, seed):
            loss = e(**make_batch(e.module, [1, 1], seed=seed)).loss
            e.backward(loss)
            e.step()
            return loss.item()

        first = engine()
        for s in range(2):
            step(first, s)
        ckpt = Path(folder) / f"zero{stage}"
        checkpoint.save_trainable(first, ckpt / checkpoint.TRAINABLE, {"step": 2}, info)
        second = engine()
        checkpoint.load_trainable(second, ckpt)
        checkpoint.save_trainable(second, Path(folder) / f"zero{stage}_reloaded", {"step": 2}, info)
        out[stage] = [(step(first, s), step(second, s)) for s in (2, 3)]
    return out


def test_consolidated_state_round_trips_under_zero_stages_0_and_2(tmp_path):
    (got,) = run_distributed(_round_trip_job, 1, args=(str(tmp_path),), timeout=TIMEOUT, workdir=tmp_path / "w")
    for stage in (0, 2):
        _assert_same_state(tmp_path / f"zero{stage}" / "trainable", tmp_path / f"zero{stage}_reloaded")
        assert _files(tmp_path / f"zero{stage}_reloaded")[2]["optimizer_step"] == 2
        for a, b in got[stage]:
            assert a == b, stage  # same weights, moments, step and lr: the same next steps, bit for bit

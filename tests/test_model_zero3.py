"""SegCapModel under real DeepSpeed ZeRO-3: 2 spawned ranks, gloo, DS_ACCELERATOR=cpu, every parameter
partitioned (persistence threshold 0). New-token ids and rows, new-row-only training, a rank without
[SEG] beside one with, and generation of different lengths per rank; a hang fails by timeout."""

import pytest
import torch

from distributed import run_distributed

pytestmark = [pytest.mark.dist, pytest.mark.slow]  # 2 spawned ranks: 50-110 s a test on a loaded 2-core machine
TIMEOUT = 150


def ds_config() -> dict:
    return {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "steps_per_print": 10**9,
    }


def _build(cfg=None, ds: dict | None = None):
    """Model + engine the way launcher/train.py builds them (HfDeepSpeedConfig alive while building)."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from modeling import build_model
    from test_model_fixtures import tiny_config, tiny_tokenizer

    ds = ds or ds_config()
    dschf = HfDeepSpeedConfig(ds) if ds["zero_optimization"]["stage"] == 3 else None  # as launcher.engine.build_run
    tok = tiny_tokenizer()
    old_len = len(tok)
    model = build_model(cfg or tiny_config(), tok, dschf=dschf)
    # transformers built LLM, CLIP and SAM under deepspeed.zero.Init: already partitioned here (except
    # the resized embed_tokens/lm_head, which transformers recreates as plain parameters by design;
    # deepspeed.initialize partitions them with our own new modules)
    built = [
        model.llm.get_base_model().model.norm.weight,
        model.vision.clip.embeddings.patch_embedding.weight,
        model.segmenter.sam.vision_encoder.patch_embed.projection.weight,
    ]
    model.built_under_zero_init = all(hasattr(p, "ds_id") for p in built)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.trainable_parameters(), config=ds)
    return engine, model, tok, old_len, dschf


def _gathered(*params) -> list[torch.Tensor]:
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(params)):
        return [p.detach().clone() for p in params]


def _new_token_job():
    import torch.distributed as dist

    from modeling.llm import SPECIAL_TOKENS, merge_new_token_rows
    from test_model_fixtures import make_batch

    engine, model, tok, old_len, _ = _build()
    emb, head = model.llm.get_input_embeddings(), model.llm.get_output_embeddings()
    before = _gathered(emb.base.weight, head.base.weight, emb.rows, head.rows)
    batch = make_batch(model, [1, 2, 0, 1], seed=dist.get_rank())
    for _ in range(2):
        out = engine(**batch)
        engine.backward(out.loss)
        engine.step()
    after = _gathered(emb.base.weight, head.base.weight, emb.rows, head.rows)
    merge_new_token_rows(model.llm.get_base_model())
    merged = _gathered(model.llm.get_input_embeddings().weight, model.llm.get_output_embeddings().weight)
    return {
        "old_len": old_len,
        "ids": [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS],
        "partitioned": model.built_under_zero_init and emb.base.weight.numel() == 0 and emb.rows.numel() == 0,
        "before": before,
        "after": after,
        "merged": merged,
    }


def test_new_token_ids_rows_and_row_only_training_under_zero3(tmp_path):
    ranks = run_distributed(_new_token_job, 2, timeout=TIMEOUT, workdir=tmp_path)
    for r in ranks:
        old = r["old_len"]
        assert r["ids"] == [old, old + 1, old + 2, old + 3]
        assert r["partitioned"]  # the test really exercised ZeRO-3 partitioning
        emb0, head0, emb_rows0, head_rows0 = r["before"]
        emb1, head1, emb_rows1, head_rows1 = r["after"]
        # intended init: each new row is the mean of the old rows, in both matrices
        assert torch.allclose(emb0[old:], emb0[:old].mean(0).expand(4, -1), atol=1e-6)
        assert torch.allclose(head0[old:], head0[:old].mean(0).expand(4, -1), atol=1e-6)
        assert torch.equal(emb_rows0, emb0[old:]) and torch.equal(head_rows0, head0[old:])
        # only the new rows train: the full matrices are bit-identical, the rows moved
        assert torch.equal(emb1, emb0) and torch.equal(head1, head0)
        assert (emb_rows1 - emb_rows0).abs().amax(1).gt(0).sum() >= 2  # rows used by the batch
        assert not torch.equal(head_rows1, head_rows0)
        # export: merging writes the trained rows into the full matrices, old rows untouched
        emb_m, head_m = r["merged"]
        assert torch.equal(emb_m[:old], emb0[:old]) and torch.equal(emb_m[old:], emb_rows1)
        assert torch.equal(head_m[:old], head0[:old]) and torch.equal(head_m[old:], head_rows1)
    for a, b in zip(ranks[0]["before"] + ranks[0]["after"], ranks[1]["before"] + ranks[1]["after"]):
        assert torch.equal(a, b)  # both ranks hold the same (gathered) values


CE_WEIGHT = 0.7


def _uneven_seg_job():
    import torch.distributed as dist

    from test_model_fixtures import make_batch, tiny_config

    engine, model, *_ = _build(tiny_config(ce=CE_WEIGHT))
    rank = dist.get_rank()
    batch = make_batch(model, [2, 1, 0, 3] if rank == 0 else [0, 0, 0, 0], seed=rank)
    steps = []
    for _ in range(3):
        out = engine(**batch)
        engine.backward(out.loss)
        engine.step()
        steps.append({"loss": out.loss.item(), "weighted_ce": (CE_WEIGHT * out.terms["ce"]).item(), **{k: v.item() for k, v in out.terms.items()}})
    return steps


def test_rank_without_seg_does_not_hang_the_rank_with_seg(tmp_path):
    with_seg, without_seg = run_distributed(_uneven_seg_job, 2, timeout=TIMEOUT, workdir=tmp_path)
    assert len(with_seg) == len(without_seg) == 3
    for s in without_seg:
        assert s["loss"] == s["weighted_ce"] and s["bce"] == 0.0 and s["dice"] == 0.0
    for s in with_seg:
        assert s["bce"] > 0 and s["dice"] > 0 and s["loss"] > s["weighted_ce"]
    assert without_seg[-1]["ce"] < without_seg[0]["ce"]  # and it trains


# One 2-rank ZeRO-3 step must equal one single-process step on the mean of the two ranks' gradients:
# DeepSpeed averages the reduced gradients, clips them by their global norm and applies AdamW to the
# fp32 partitions. A wrong average, a norm computed per partition or a lost gradient would each break
# this. Weight decay is on and the clip threshold is below the gradient norm, so both are exercised.
EQUIV = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.05, "clip": 0.5}
EQUIV_COUNTS = ([2, 1, 0, 1], [1, 0, 3, 1])


def _equivalence_config(stage: int = 3) -> dict:
    cfg = ds_config()
    cfg["zero_optimization"]["stage"] = stage
    cfg["gradient_clipping"] = EQUIV["clip"]
    cfg["optimizer"]["params"] = {"lr": EQUIV["lr"], "betas": list(EQUIV["betas"]), "eps": EQUIV["eps"],
                                  "weight_decay": EQUIV["weight_decay"], "torch_adam": True}
    return cfg


def _equivalence_job(stage: int = 3):
    import torch.distributed as dist

    from test_model_fixtures import make_batch

    engine, model, *_ = _build(ds=_equivalence_config(stage))
    names = [n for n, _ in model.named_parameters()]
    start = dict(zip(names, _gathered(*model.parameters())))
    start.update({f"buffer:{n}": b.clone() for n, b in model.named_buffers()})
    rank = dist.get_rank()
    norms = []
    for step in range(2):
        out = engine(**make_batch(model, list(EQUIV_COUNTS[rank]), seed=10 * step + rank))
        engine.backward(out.loss)
        engine.step()
        norms.append(float(engine.get_global_grad_norm()))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    end = dict(zip((n for n, _ in trainable), _gathered(*(p for _, p in trainable))))
    return {"start": start, "end": end, "norms": norms}


def test_two_rank_zero3_steps_equal_single_process_steps_on_the_mean_gradient(tmp_path):
    _check_two_rank_steps_equal_single_process_steps(3, tmp_path)


def test_two_rank_zero2_steps_equal_single_process_steps_on_the_mean_gradient(tmp_path):
    """ZeRO-2 (train.zero_stage 2): replicated weights, partitioned gradients and optimizer states."""
    _check_two_rank_steps_equal_single_process_steps(2, tmp_path)


def _check_two_rank_steps_equal_single_process_steps(stage: int, tmp_path):
    from modeling import build_model
    from test_model_fixtures import make_batch, tiny_config, tiny_tokenizer

    r0, r1 = run_distributed(_equivalence_job, 2, args=(stage,), timeout=TIMEOUT, workdir=tmp_path)
    model = build_model(tiny_config(), tiny_tokenizer())
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(r0["start"][n])
        for n, b in model.named_buffers():
            b.copy_(r0["start"][f"buffer:{n}"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=EQUIV["lr"], betas=EQUIV["betas"], eps=EQUIV["eps"], weight_decay=EQUIV["weight_decay"])
    norms = []
    for step in range(2):
        opt.zero_grad()
        for rank in range(2):
            out = model(**make_batch(model, list(EQUIV_COUNTS[rank]), seed=10 * step + rank))
            (out.loss / 2).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(trainable, EQUIV["clip"])))
        opt.step()
    assert min(norms) > EQUIV["clip"]  # clipping was active
    assert r0["norms"] == pytest.approx(norms, rel=1e-5) and r1["norms"] == r0["norms"]
    moved = 0
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if n.endswith("k_proj.bias"):
            # Its true gradient is 0 (softmax ignores a per-query constant); AdamW turns the rounding
            # noise left in it into lr-sized steps of either sign, so it is not comparable.
            continue
        assert torch.allclose(r0["end"][n], p.detach(), rtol=1e-4, atol=1e-6), n
        moved += not torch.equal(r0["end"][n], r0["start"][n])
    assert moved > 50  # the comparison covered parameters that really changed


def _uneven_generation_job():
    import torch.distributed as dist

    from test_model_forward import Script
    from test_model_fixtures import make_batch

    engine, model, *_ = _build()
    seg, eos = model.seg_token_id, model.eos_token_id
    # rank 0 stops after 2 tokens, rank 1 after 6: without synced_gpus rank 1 would wait forever
    script = [[seg, eos]] if dist.get_rank() == 0 else [[5, seg, 5, 5, seg, eos]]
    batch = make_batch(model, [0], length=30, seed=dist.get_rank())
    model.llm.get_output_embeddings().register_forward_hook(Script(script))
    engine.eval()
    (pred,) = model.predict([batch["input_ids"][0, :24]], batch["clip_pixels"], batch["sam_pixels"], max_new_tokens=10, synced_gpus=True)
    return {"tokens": pred.token_ids.tolist(), "seg_count": pred.seg_count, "masks": tuple(pred.masks.shape)}


def test_predict_with_synced_gpus_survives_ranks_generating_different_lengths(tmp_path):
    fast, slow = run_distributed(_uneven_generation_job, 2, timeout=TIMEOUT, workdir=tmp_path)
    assert fast["seg_count"] == 1 and fast["masks"] == (1, 64, 64)
    assert slow["seg_count"] == 2 and slow["masks"] == (2, 64, 64) and len(slow["tokens"]) == 5


def _hang_on_rank_1():
    import time

    import torch.distributed as dist

    if dist.get_rank() == 1:
        time.sleep(60)
    dist.barrier()


def test_run_distributed_turns_a_hang_into_a_timeout(tmp_path):
    with pytest.raises(TimeoutError, match="did not finish within 8 s"):
        run_distributed(_hang_on_rank_1, 2, timeout=8, workdir=tmp_path)

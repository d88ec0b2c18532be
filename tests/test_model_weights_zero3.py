"""model.init_from under real ZeRO-3 (2 ranks, gloo, every parameter partitioned): a segcap run's
checkpoint (written by launcher/checkpoint.py after a training step), llava-hf and segment-anything
sources load into the partitioned model; rank 0 reads, both ranks hold the same gathered values."""

import pytest
import torch

from distributed import run_distributed

pytestmark = [pytest.mark.dist, pytest.mark.slow]  # 2 spawned ranks: 50-110 s a test on a loaded 2-core machine
TIMEOUT = 240


def _job(run_dir: str, llava_hf: str, sam_pth: str):
    import deepspeed
    import torch.distributed as dist
    from transformers.integrations import HfDeepSpeedConfig

    from launcher import checkpoint
    from launcher.dist import identity
    from modeling import build_model
    from modeling.config import InitSource
    from test_model_fixtures import make_batch, tiny_config, tiny_tokenizer
    from test_model_zero3 import ds_config

    def gathered(model, names):
        params = dict(model.named_parameters())
        with deepspeed.zero.GatheredParameters([params[n] for n in names]):
            return {n: params[n].detach().clone() for n in names}

    ds = ds_config()
    dschf = HfDeepSpeedConfig(ds)  # noqa: F841 (kept alive while building)
    trained = build_model(tiny_config(), tiny_tokenizer(), dschf=dschf)
    engine, *_ = deepspeed.initialize(model=trained, model_parameters=trained.trainable_parameters(), config=ds)
    out = engine(**make_batch(trained, [1, 2, 0, 1], seed=dist.get_rank()))
    engine.backward(out.loss)
    engine.step()
    checkpoint.save(engine, __import__("pathlib").Path(run_dir) / "checkpoints", 1, {"step": 1}, identity(), keep=1)
    names = [n for n, p in trained.named_parameters() if p.requires_grad]
    want = gathered(trained, names)

    cfg = tiny_config()
    cfg.init_from = [
        InitSource(path=sam_pth, take=["sam_encoder", "decoder"]),
        InitSource(path=llava_hf, take=["llm", "vision", "projector"]),
        InitSource(path=run_dir, take=["projector", "lora", "token_rows", "seg_mlp", "decoder"]),
    ]
    loaded = build_model(cfg, tiny_tokenizer(), dschf=dschf)
    partitioned = all(hasattr(p, "ds_id") for p in (
        loaded.llm.get_base_model().model.norm.weight, loaded.segmenter.sam.vision_encoder.pos_embed,
        loaded.vision.clip.embeddings.patch_embedding.weight if hasattr(loaded.vision.clip, "embeddings") else loaded.vision.clip.vision_model.embeddings.patch_embedding.weight,
    ))
    probe = [
        "segmenter.sam.vision_encoder.pos_embed",
        "segmenter.sam.shared_image_embedding.positional_embedding",
        "llm.base_model.model.model.layers.1.mlp.up_proj.base_layer.weight",
        "llm.base_model.model.model.embed_tokens.base.weight",
    ]
    got = gathered(loaded, names + probe)
    return {"want": want, "got": got, "partitioned": partitioned, "names": names}


def test_init_from_loads_every_source_kind_into_a_zero3_partitioned_model(tmp_path):
    from test_model_fixtures import WORDS, tiny_config
    from weights_fixtures import write_llava_hf, write_sam_pth

    sam = write_sam_pth(tmp_path / "sam.pth", tiny_config())
    (tmp_path / "llava").mkdir()
    hf = write_llava_hf(tmp_path / "llava", tiny_config(), vocab=len(WORDS))
    ranks = run_distributed(_job, 2, args=(str(tmp_path / "run"), str(tmp_path / "llava"), str(sam_pth := tmp_path / "sam.pth")),
                            timeout=TIMEOUT, workdir=tmp_path / "dist")
    assert sam_pth.is_file()
    for r in ranks:
        assert r["partitioned"]
        got, want = r["got"], r["want"]
        # the run's trained weights (projector, LoRA, new rows, [SEG] MLP, decoder) over LLaVA's projector
        assert any("lora_B" in n for n in r["names"]) and any(n.endswith(".rows") for n in r["names"])
        for n in r["names"]:
            assert torch.equal(got[n], want[n]), n
        assert torch.equal(got["segmenter.sam.vision_encoder.pos_embed"], sam["image_encoder.pos_embed"])
        assert torch.equal(got["segmenter.sam.shared_image_embedding.positional_embedding"],
                           sam["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"])
        assert torch.equal(got["llm.base_model.model.model.layers.1.mlp.up_proj.base_layer.weight"],
                           hf["model.language_model.layers.1.mlp.up_proj.weight"])
        v = len(WORDS)
        assert torch.equal(got["llm.base_model.model.model.embed_tokens.base.weight"][:v], hf["model.language_model.embed_tokens.weight"])
    for n in ranks[0]["got"]:
        assert torch.equal(ranks[0]["got"][n], ranks[1]["got"][n]), n

    # the run dir is read from the consolidated trainable/ copy; without it, from the ZeRO shards alike
    from modeling.config import InitSource
    from modeling.weights import open_source

    run = InitSource(path=str(tmp_path / "run"), take=["projector"])
    consolidated = open_source(run)
    for folder in (tmp_path / "run" / "checkpoints").glob("step_*/trainable"):
        folder.rename(folder.with_name("trainable_hidden"))
    shards = open_source(run)
    assert consolidated.shapes == shards.shapes and len(shards.shapes) == len(ranks[0]["names"])
    for n in shards.shapes:
        assert torch.equal(consolidated.read(n), shards.read(n)), n

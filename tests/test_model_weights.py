"""model.init_from: each source format written here in its real layout at the tiny sizes, loaded into
the modules it names (tensor equality); what is missing, extra or the wrong shape fails by name before
any weight changes; a missing model folder is a one-line error before anything starts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from modeling import build_model
from modeling.config import InitSource
from modeling.weights import InitFromError
from test_model_fixtures import WORDS, tiny_config, tiny_tokenizer
from weights_fixtures import llama_config, segment_anything_sam, write_llava_hf, write_llava_original, write_sam_pth

REPO = Path(__file__).resolve().parent.parent
V = len(WORDS)  # the tiny vocabulary; the four special tokens get ids V..V+3


def _build(*sources: InitSource):
    cfg = tiny_config()
    cfg.init_from = list(sources)
    return build_model(cfg, tiny_tokenizer())


@pytest.fixture(scope="module")
def llava_original(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava-v1.5-tiny")
    torch.manual_seed(11)
    cfg = tiny_config()
    state = write_llava_original(folder, LlamaForCausalLM(llama_config(cfg, V)), cfg.vision.hidden_size)
    return folder, state


def _base(model):
    return model.llm.get_base_model()


def test_llava_original_layout_gives_the_llm_and_the_projector(llava_original):
    folder, state = llava_original
    model = _build(InitSource(path=str(folder), take=["llm", "projector"]))
    proj = model.vision.projector
    assert torch.equal(proj[0].weight, state["model.mm_projector.0.weight"])
    assert torch.equal(proj[2].bias, state["model.mm_projector.2.bias"])
    llm = _base(model)
    q = llm.model.layers[1].self_attn.q_proj
    assert torch.equal(q.base_layer.weight, state["model.layers.1.self_attn.q_proj.weight"])  # under LoRA
    assert torch.equal(llm.model.norm.weight, state["model.norm.weight"])
    emb, head = llm.get_input_embeddings(), llm.get_output_embeddings()
    assert torch.equal(emb.base.weight[:V], state["model.embed_tokens.weight"])
    assert torch.equal(head.base.weight[:V], state["lm_head.weight"])
    # the new tokens' rows start from the mean of the loaded vocabulary, as add_special_tokens does
    mean = state["model.embed_tokens.weight"].mean(0)
    assert torch.allclose(emb.rows, mean.expand(4, -1), atol=1e-6)
    assert torch.allclose(emb.base.weight[V:], mean.expand(4, -1), atol=1e-6)
    assert torch.allclose(head.rows, state["lm_head.weight"].mean(0).expand(4, -1), atol=1e-6)


def test_llava_hf_layout_gives_llm_vision_tower_and_projector(tmp_path):
    # llava-hf pads its vocabulary (32064 rows for 32000 tokens): rows past the tokenizer's are dropped
    state = write_llava_hf(tmp_path, tiny_config(), vocab=V + 8)
    model = _build(InitSource(path=str(tmp_path), take=["llm", "vision", "projector"]))
    assert torch.equal(model.vision.projector[0].weight, state["model.multi_modal_projector.linear_1.weight"])
    assert torch.equal(model.vision.projector[2].bias, state["model.multi_modal_projector.linear_2.bias"])
    clip = getattr(model.vision.clip, "vision_model", model.vision.clip)  # transformers 4 | 5
    assert torch.equal(clip.encoder.layers[0].self_attn.k_proj.weight, state["model.vision_tower.encoder.layers.0.self_attn.k_proj.weight"])
    assert torch.equal(clip.embeddings.class_embedding, state["model.vision_tower.embeddings.class_embedding"])
    llm = _base(model)
    assert torch.equal(llm.model.layers[0].mlp.down_proj.weight, state["model.language_model.layers.0.mlp.down_proj.weight"])
    assert torch.equal(llm.get_input_embeddings().base.weight[:V], state["model.language_model.embed_tokens.weight"][:V])
    assert torch.equal(llm.get_output_embeddings().base.weight[:V], state["lm_head.weight"][:V])


def test_segment_anything_pth_maps_onto_the_sam_encoder_and_decoder(tmp_path):
    cfg = tiny_config()
    write_sam_pth(tmp_path / "sam_vit_tiny.pth", cfg)
    sa = segment_anything_sam(cfg)  # the same weights, in segment-anything's own modules
    model = _build(InitSource(path=str(tmp_path / "sam_vit_tiny.pth"), take=["sam_encoder", "decoder"]))
    sam = model.segmenter.sam
    assert torch.equal(sam.vision_encoder.layers[1].attn.rel_pos_h, sa.image_encoder.blocks[1].attn.rel_pos_h)
    assert torch.equal(sam.mask_decoder.output_hypernetworks_mlps[2].proj_out.weight, sa.mask_decoder.output_hypernetworks_mlps[2].layers[2].weight)
    assert torch.equal(sam.mask_decoder.iou_prediction_head.layers[0].weight, sa.mask_decoder.iou_prediction_head.layers[1].weight)
    assert torch.equal(sam.shared_image_embedding.positional_embedding, sa.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix)

    # and they compute what segment-anything computes: the image embedding, then the mask of one prompt
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, cfg.pixel_encoder.image_size, cfg.pixel_encoder.image_size, generator=g)
    queries = torch.randn(3, cfg.pixel_encoder.output_channels, generator=g)
    image_index = torch.tensor([0, 1, 1])
    with torch.no_grad():
        ours = model.segmenter.encode(pixels)
        theirs = sa.image_encoder(pixels)
        assert torch.allclose(ours, theirs, atol=1e-5)
        masks = model.segmenter.decode(ours, queries, image_index)
        dense = sa.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, *theirs.shape[-2:])
        expected = []
        for q, b in zip(queries, image_index):
            low, _ = sa.mask_decoder(theirs[b : b + 1], sa.prompt_encoder.get_dense_pe(), q[None, None], dense, multimask_output=False)
            expected.append(torch.nn.functional.interpolate(low, size=masks.shape[-2:], mode="bilinear", align_corners=False)[0, 0])
    assert torch.allclose(masks, torch.stack(expected), atol=1e-4)


def test_later_sources_overwrite_earlier_ones(llava_original, tmp_path):
    folder, _ = llava_original
    hf = write_llava_hf(tmp_path, tiny_config(), vocab=V)
    model = _build(InitSource(path=str(folder), take=["projector"]), InitSource(path=str(tmp_path), take=["projector"]))
    assert torch.equal(model.vision.projector[0].weight, hf["model.multi_modal_projector.linear_1.weight"])


def test_a_missing_key_fails_with_its_name_and_changes_nothing(tmp_path):
    torch.manual_seed(11)
    cfg = tiny_config()
    state = write_llava_original(tmp_path, LlamaForCausalLM(llama_config(cfg, V)), cfg.vision.hidden_size, safetensors=True)
    from safetensors.torch import load_file, save_file

    shard = next(tmp_path.glob("model-0000*-of-00002.safetensors"))
    for name in sorted(tmp_path.glob("model-0000*.safetensors")):
        tensors = load_file(str(name))
        if "model.mm_projector.2.bias" in tensors:
            shard = name
    tensors = load_file(str(shard))
    del tensors["model.mm_projector.2.bias"]
    save_file(tensors, str(shard))
    (tmp_path / "model.safetensors.index.json").write_text(
        (tmp_path / "model.safetensors.index.json").read_text().replace('"model.mm_projector.2.bias"', '"gone"')
    )
    with pytest.raises(InitFromError, match=r"model.init_from\[0\].*missing keys.*vision\.projector\.2\.bias"):
        _build(InitSource(path=str(tmp_path), take=["projector"]))
    assert "model.mm_projector.0.weight" in state


def test_a_wrong_shape_is_named_with_both_shapes(tmp_path):
    cfg = tiny_config()
    cfg.pixel_encoder.output_channels = 16  # the .pth is written at width 16, the model is built at 32
    cfg.pixel_encoder.mlp_dim = 128
    write_sam_pth(tmp_path / "sam.pth", cfg)
    with pytest.raises(InitFromError, match=r"shape mismatch: .*\[16.*\(model: \[32"):
        _build(InitSource(path=str(tmp_path / "sam.pth"), take=["sam_encoder"]))


def test_a_part_the_source_does_not_offer_is_refused(tmp_path):
    write_sam_pth(tmp_path / "sam.pth", tiny_config())
    with pytest.raises(InitFromError, match=r"take \['projector'\]: a sam source offers \['sam_encoder', 'decoder'\]"):
        _build(InitSource(path=str(tmp_path / "sam.pth"), take=["projector"]))


def test_an_unknown_key_in_the_source_is_an_error(tmp_path):
    cfg = tiny_config()
    state = segment_anything_sam(cfg).state_dict()
    state["mask_decoder.extra_head.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "sam.pth")
    with pytest.raises(InitFromError, match=r"unexpected keys .*mask_decoder\.extra_head\.weight"):
        _build(InitSource(path=str(tmp_path / "sam.pth"), take=["decoder"]))


def test_init_from_take_is_validated_with_the_config(tmp_path):
    from launcher.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"model.init_from\[0\].take=\['projecter'\]"):
        load_config("configs/train/tiny.yaml", [f"model.init_from=[{{path: {tmp_path}, take: [projecter]}}]"])
    with pytest.raises(ConfigError, match=r"model.init_from\[0\].kind='llava2'"):
        load_config("configs/train/tiny.yaml", [f"model.init_from=[{{path: {tmp_path}, kind: llava2, take: [llm]}}]"])


def test_a_missing_model_folder_is_one_line_naming_key_path_and_model_root(tmp_path):
    env = {**os.environ, "SEGCAP_MODEL_ROOT": str(tmp_path / "models"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", "train", "--config", "configs/train/stage2.yaml", f"train.output_dir={tmp_path}/run"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "[WARNING]" not in ln]
    assert len(lines) == 1, proc.stderr
    assert "model.llm.path" in lines[0] and f"{tmp_path}/models/" in lines[0] and "SEGCAP_MODEL_ROOT" in lines[0]
    assert not (tmp_path / "run").exists()  # nothing started


def test_sam_pth_loads_beside_the_multigranular_decoder(tmp_path):
    cfg = tiny_config()
    cfg.mask_decoder.kind = "multigranular"  # its decoder is segcap's own: the .pth gives SAM's modules only
    state = write_sam_pth(tmp_path / "sam.pth", cfg)
    cfg.init_from = [InitSource(path=str(tmp_path / "sam.pth"), take=["sam_encoder", "decoder"])]
    model = build_model(cfg, tiny_tokenizer())
    assert torch.equal(model.segmenter.sam.vision_encoder.pos_embed, state["image_encoder.pos_embed"])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A segcap run dir as training leaves it: config.yaml and a complete checkpoint holding the
    consolidated trainable state (trainable/model.safetensors by parameter name, as launcher/checkpoint.py
    writes it beside the ZeRO shards), for a tiny model whose trained weights are random numbers."""
    import json

    import yaml
    from safetensors.torch import save_file

    from launcher.config import load_config, to_dict
    from launcher.tokenizer import make_tokenizer

    run = tmp_path_factory.mktemp("run")
    cfg = load_config("configs/train/tiny.yaml", ["train.zero_stage=0", f"train.output_dir={run}"])
    model = build_model(cfg.model, make_tokenizer(cfg.model.llm))
    g = torch.Generator().manual_seed(5)
    trained = {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters() if p.requires_grad}
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    step = run / "checkpoints" / "step_00000004"
    (step / "trainable").mkdir(parents=True)
    save_file(trained, str(step / "trainable" / "model.safetensors"))
    (step / "COMPLETE").write_text(json.dumps({"step": 4, "world_size": 2}))
    return run, trained


def _tiny_run_model(*sources: InitSource, **llm):
    from launcher.config import load_config
    from launcher.tokenizer import make_tokenizer

    cfg = load_config("configs/train/tiny.yaml", [f"model.llm.{k}={v}" for k, v in llm.items()])
    cfg.model.init_from = list(sources)
    return build_model(cfg.model, make_tokenizer(cfg.model.llm))


def test_a_segcap_run_dir_gives_what_the_run_trained(run_dir):
    run, trained = run_dir
    model = _tiny_run_model(InitSource(path=str(run), take=["projector", "lora", "token_rows", "seg_mlp", "decoder"]))
    loaded = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert loaded.keys() == trained.keys()
    for n, p in loaded.items():
        assert torch.equal(p, trained[n]), n


def test_a_lora_of_another_rank_is_a_shape_mismatch_naming_the_weight(run_dir):
    run, _ = run_dir
    with pytest.raises(InitFromError, match=r"shape mismatch: llm\.model\.layers\.0\.mlp\.down_proj\.lora_A\.default\.weight \[8, 256\] \(model: \[4, 256\]\)"):
        _tiny_run_model(InitSource(path=str(run), take=["lora"]), **{"lora.r": 4})


def test_an_export_gives_every_part_back(run_dir, tmp_path):
    from safetensors.torch import load_file

    from launcher.export import export

    run, trained = run_dir
    out = export(run, tmp_path / "export")
    parts = ["llm", "vision", "projector", "seg_mlp", "sam_encoder", "decoder", "token_rows"]
    model = _tiny_run_model(InitSource(path=str(out), take=parts))
    llm_file, sam_file = load_file(str(out / "llm" / "model.safetensors")), load_file(str(out / "sam" / "model.safetensors"))
    base = model.llm.get_base_model()
    q = base.model.layers[0].self_attn.q_proj.base_layer.weight
    assert torch.equal(q, llm_file["model.layers.0.self_attn.q_proj.weight"])  # LoRA merged into it
    emb = base.get_input_embeddings()
    assert torch.equal(emb.rows, trained["llm.base_model.model.model.embed_tokens.rows"])
    assert torch.equal(emb.base.weight, llm_file["model.embed_tokens.weight"])
    for n in ("vision.projector.0.weight", "text_hidden_fcs.2.bias", "segmenter.sam.mask_decoder.transformer.layers.0.mlp.lin1.weight"):
        assert torch.equal(dict(model.named_parameters())[n], trained[n]), n
    assert torch.equal(model.segmenter.sam.vision_encoder.pos_embed, sam_file["vision_encoder.pos_embed"])

"""Real-format weight folders at the tiny model's sizes, for the model.init_from tests (importable by
spawned ranks): LLaVA-1.5 in its original layout (Llama shards holding model.mm_projector.*, .bin as
liuhaotian's releases) and as llava-hf's LlavaForConditionalGeneration, and a segment-anything .pth."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from functools import partial
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

from modeling.config import ModelConfig


def llama_config(cfg: ModelConfig, vocab: int) -> LlamaConfig:
    c = cfg.llm
    return LlamaConfig(
        vocab_size=vocab, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads, intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=False,
    )


def clip_config(cfg: ModelConfig) -> CLIPVisionConfig:
    v = cfg.vision
    return CLIPVisionConfig(image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.hidden_size,
                            num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads, intermediate_size=v.intermediate_size)


def projector_tensors(clip_hidden: int, llm_hidden: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "0.weight": torch.randn(llm_hidden, clip_hidden, generator=g),
        "0.bias": torch.randn(llm_hidden, generator=g),
        "2.weight": torch.randn(llm_hidden, llm_hidden, generator=g),
        "2.bias": torch.randn(llm_hidden, generator=g),
    }


def write_llava_original(folder: Path, llm: LlamaForCausalLM, clip_hidden: int, seed: int = 1, safetensors: bool = False) -> dict:
    """liuhaotian/llava-v1.5-* as released: config.json of model_type llava with the mm_* keys, the
    Llama weights and model.mm_projector.{0,2} in the same shards, a shard index. Returns the tensors."""
    # config.json written here: save_pretrained refuses a model read from GGUF (dequantised on load)
    config = {k: v for k, v in llm.config.to_dict().items() if k != "quantization_config"}
    state = {k: v.detach().clone().contiguous() for k, v in llm.state_dict().items()}
    if llm.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    proj = projector_tensors(clip_hidden, llm.config.hidden_size, seed)
    state.update({f"model.mm_projector.{k}": v for k, v in proj.items()})
    keys = sorted(state)
    half = len(keys) // 2
    shards = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        ext = "safetensors" if safetensors else "bin"
        name = f"model-0000{i + 1}-of-00002.{ext}" if safetensors else f"pytorch_model-0000{i + 1}-of-00002.bin"
        chunk = {k: state[k] for k in part}
        if safetensors:
            from safetensors.torch import save_file

            save_file(chunk, str(folder / name))
        else:
            torch.save(chunk, folder / name)
        shards.update({k: name for k in part})
    index = "model.safetensors.index.json" if safetensors else "pytorch_model.bin.index.json"
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": shards}))
    config.update(model_type="llava", architectures=["LlavaLlamaForCausalLM"], mm_hidden_size=clip_hidden,
                  mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_tower="openai/clip-vit-large-patch14-336",
                  image_aspect_ratio="pad", mm_use_im_start_end=False)
    (folder / "config.json").write_text(json.dumps(config))
    return state


def write_llava_hf(folder: Path, cfg: ModelConfig, vocab: int, seed: int = 2) -> dict:
    """llava-hf/llava-1.5-*-hf: LlavaForConditionalGeneration.save_pretrained. Returns its state dict."""
    torch.manual_seed(seed)
    config = LlavaConfig(text_config=llama_config(cfg, vocab), vision_config=clip_config(cfg), image_token_index=vocab - 1,
                         vision_feature_layer=cfg.vision.select_layer, projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(config)
    model.save_pretrained(folder)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def segment_anything_modeling() -> types.ModuleType:
    """segment_anything.modeling without the package's __init__, which imports its predictor and so
    torchvision (not installed: its wheels pin another torch)."""
    if "segment_anything.modeling" not in sys.modules:
        spec = importlib.util.find_spec("segment_anything")
        pkg = types.ModuleType("segment_anything")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules.setdefault("segment_anything", pkg)
    import segment_anything.modeling as sa

    return sa


def segment_anything_sam(cfg: ModelConfig, seed: int = 3):
    """segment-anything's own Sam, built as its build_sam.py builds vit_b/l/h, at segcap's sizes."""
    sa = segment_anything_modeling()
    enc, dec = cfg.pixel_encoder, cfg.mask_decoder
    width = enc.output_channels
    torch.manual_seed(seed)
    sam = sa.Sam(
        image_encoder=sa.ImageEncoderViT(
            depth=enc.num_layers, embed_dim=enc.hidden_size, img_size=enc.image_size, mlp_ratio=enc.mlp_dim / enc.hidden_size,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=enc.num_heads, patch_size=enc.patch_size,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=list(enc.global_attn_indexes),
            window_size=enc.window_size, out_chans=width,
        ),
        prompt_encoder=sa.PromptEncoder(
            embed_dim=width, image_embedding_size=(enc.image_size // enc.patch_size,) * 2,
            input_image_size=(enc.image_size,) * 2, mask_in_chans=16,
        ),
        mask_decoder=sa.MaskDecoder(
            num_multimask_outputs=3,
            transformer=sa.TwoWayTransformer(depth=dec.num_layers, embedding_dim=width, mlp_dim=dec.mlp_dim, num_heads=dec.num_heads),
            transformer_dim=width, iou_head_depth=3, iou_head_hidden_dim=width,
        ),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375],
    )
    # segment-anything initialises some parameters to zero (rel_pos, pos_embed): randomise every
    # tensor so that a weight copied to the wrong place cannot pass as equal.
    with torch.no_grad():
        for p in sam.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return sam.eval()


def write_sam_pth(path: Path, cfg: ModelConfig, seed: int = 3) -> dict:
    state = segment_anything_sam(cfg, seed).state_dict()
    torch.save(state, path)
    return state

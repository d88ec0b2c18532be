"""Typed model configuration (composed and validated by launcher/config.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

@dataclass
class LoRAConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    # Every projection: the tiny random LLM needs the capacity (on synthetic data, 1400 steps: CE 1.90
    # vs 2.23 and mask IoU 0.21 vs 0.13 with q/v only). The 13B recipe sets q_proj, v_proj as LISA does.
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class LLMConfig:
    # Local Hugging Face folder (Vicuna/Llama), or a folder holding `gguf_file`; None = random init
    # from the size fields below (the tiny CPU model).
    path: Optional[str] = None
    gguf_file: Optional[str] = None
    # "synthetic": the word-level tokenizer of the synthetic dataset; "llm": load from `path`;
    # anything else: a local tokenizer folder.
    tokenizer: str = "synthetic"
    chat_template: str = "vicuna_v1"  # vicuna_v1 | llama2 | llm (the tokenizer's own): datapipes/templates.py
    # The checkpoint's vocabulary (before the special tokens), for building it without weights
    # (`launcher count`); 0: the tokenizer's. Random-init models always take the tokenizer's.
    vocab_size: int = 0
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 256
    max_position_embeddings: int = 512
    # "lora": LoRA adapters + the new token rows train; "frozen": nothing in the LLM trains (stage 1);
    # "full": every LLM weight trains (for random-init tiny models, which have nothing to preserve).
    train_mode: str = "lora"
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    # "auto": flash_attention_2 when installed and on CUDA, else sdpa.
    attn_implementation: str = "auto"
    gradient_checkpointing: bool = False


@dataclass
class VisionConfig:
    """CLIP ViT vision tower (frozen) + 2-layer MLP projector into the LLM."""

    path: Optional[str] = None
    image_size: int = 64
    patch_size: int = 16
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    select_layer: int = -2  # penultimate layer's patch features, as LLaVA
    freeze: bool = True


@dataclass
class PixelEncoderConfig:
    """SAM ViT image encoder."""

    path: Optional[str] = None  # local Hugging Face SamModel folder (sam-vit-huge at scale)
    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    mlp_dim: int = 128
    output_channels: int = 32
    window_size: int = 4
    global_attn_indexes: list[int] = field(default_factory=lambda: [1])
    freeze: bool = True  # at tiny scale (random init) a config may let it train


@dataclass
class PixelDecoderConfig:
    """MVP-LM's pixel decoder (kind multigranular): a pyramid from the SAM embedding refined by
    multi-scale deformable attention encoder layers (kernels/msda)."""

    # Image strides of the pyramid levels, finest first, powers of two; one must be the SAM patch
    # size (the embedding's own stride), the others are made from it by transposed convolutions / max
    # pooling. A level at half the patch size, if any, is fused into the mask decoder's upscaling. The
    # 1024-px recipe: 8/16/32 around SAM ViT-H's 16 (MVP-LM, Mask2Former); the 64-px tiny model 4/8/16.
    strides: list[int] = field(default_factory=lambda: [4, 8, 16])
    num_layers: int = 2  # deformable encoder layers (Mask2Former: 6)
    num_heads: int = 4
    num_points: int = 2  # sampling points per head and level (Mask2Former: 4)
    ffn_dim: int = 128
    # kernels.msda backend: "auto" takes Triton on CUDA tensors and the reference on CPU.
    msda_backend: str = "auto"


@dataclass
class QueryConfig:
    """MVP-LM's dynamic queries: per LLM query (a [SEG], or the exists position), `num` decoder
    queries = base (MLP of the hidden state + a learned slot embedding) + residual (the top-`num`
    memory features most similar to the phrase/instruction embedding, weighted by that similarity)."""

    num: int = 4  # predictions per [SEG]: the most instances one [SEG] may stand for
    base: bool = True
    residual: bool = True


@dataclass
class MatchCostConfig:
    """Weights of the bipartite matching cost between one [SEG]'s predictions and its instances."""

    cls: float = 2.0
    bce: float = 5.0
    dice: float = 5.0
    box_l1: float = 5.0
    giou: float = 2.0


@dataclass
class MaskDecoderConfig:
    kind: str = "sam"  # "sam": SAM's decoder prompted by [SEG] (LISA); "multigranular": MVP-LM's decoder
    num_layers: int = 2  # two-way transformer (both kinds)
    num_heads: int = 4
    mlp_dim: int = 128
    train: bool = True
    # kind multigranular only:
    pixel_decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)
    queries: QueryConfig = field(default_factory=QueryConfig)
    match: MatchCostConfig = field(default_factory=MatchCostConfig)
    # Predictions whose objectness is below this are dropped at predict(); masks of a sample whose
    # exists probability is below it are emptied.
    score_threshold: float = 0.5


@dataclass
class LossConfig:
    ce: float = 1.0
    bce: float = 2.0
    dice: float = 0.5
    # kind multigranular only (the sam decoder has no such heads):
    # (DETR's 2 / 5 / 2 for cls / box_l1 / giou are what the 13B recipe uses; at the tiny scale, with a
    # random LLM learning its answers, they drowned the mask and CE terms: 800 synthetic steps reached
    # val cIoU 0.36 with 1 / 1 / 1 where the sam decoder reached 0.22)
    cls: float = 1.0  # objectness of each prediction: matched -> 1, unmatched -> no-object 0
    no_object: float = 0.1  # weight of the no-object targets inside cls (DETR's eos_coef)
    box_l1: float = 1.0  # L1 on normalised (cx, cy, w, h), summed over the 4
    giou: float = 1.0  # 1 - GIoU
    exists: float = 1.0  # BCE of "the instruction's target is in the image" (gRefCOCO empty targets)


# model.init_from vocabulary (modeling/weights.py): what a source is, and the parts of the model it can give.
INIT_KINDS = ("segcap", "export", "llava", "llava_hf", "sam")
INIT_PARTS = ("llm", "lora", "token_rows", "vision", "projector", "seg_mlp", "sam_encoder", "decoder")


@dataclass
class InitSource:
    """One entry of model.init_from (modeling/weights.py): weights copied into the built model."""

    path: str = ""  # a segcap run dir or export, a LLaVA-1.5 folder (either layout), a segment-anything .pth
    kind: str = "auto"  # auto (from what is at `path`) | segcap | export | llava | llava_hf | sam
    # Parts to copy: llm, lora, token_rows, vision, projector, seg_mlp, sam_encoder, decoder. Each must
    # be complete in the source (for a segcap run: every parameter of it that trains in this model).
    take: list[str] = field(default_factory=list)


@dataclass
class ModelConfig:
    name: str = "tiny"
    dtype: str = "float32"  # compute dtype of the LLM and towers: float32 | bfloat16 | float16
    init_seed: int = 0  # random init is a function of this seed only: frozen weights are rebuilt, not saved
    llm: LLMConfig = field(default_factory=LLMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    pixel_encoder: PixelEncoderConfig = field(default_factory=PixelEncoderConfig)
    mask_decoder: MaskDecoderConfig = field(default_factory=MaskDecoderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # Applied in order after the model is built (later entries overwrite earlier ones), e.g. SAM from
    # sam_vit_h_4b8939.pth, then the projector of stage 1's run.
    init_from: list[InitSource] = field(default_factory=list)

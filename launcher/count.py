"""`python -m launcher count`: parameters (all, trainable) and forward FLOPs of each part of a config's
model, built on the meta device from the config's size fields: no weights are read, so the 13B recipe
counts on a laptop. FLOPs come from torch.utils.flop_counter (matmuls, convolutions, attention) plus a
formula for the multi-scale deformable attention op (kernels/README.md: 8*D + 20 per sampled point)."""

from __future__ import annotations

import dataclasses

import torch

from launcher.config import RunConfig

TEXT_TOKENS = 64  # a referring sample's prompt + answer, besides the image tokens
_MSDA_REGISTERED = False


def _register_msda_flops() -> None:
    global _MSDA_REGISTERED
    if _MSDA_REGISTERED:
        return
    from torch.utils.flop_counter import register_flop_formula

    import kernels.msda  # noqa: F401  (defines torch.ops.segcap.*)

    @register_flop_formula(torch.ops.segcap.ms_deform_attn)
    def _msda(value, spatial_shapes, level_start_index, sampling_locations, *args, out_shape=None, **kwargs):
        n, lq, m, levels, points, _ = sampling_locations
        return n * lq * m * levels * points * (8 * value[-1] + 20)

    _MSDA_REGISTERED = True


def _standin_tokenizer(cfg) -> object:
    """The synthetic tokenizer, or one of the checkpoint's vocabulary size (only its length matters)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    if cfg.llm.tokenizer == "synthetic":
        from datapipes.synthetic import build_tokenizer

        return build_tokenizer()
    if not cfg.llm.vocab_size:
        raise ValueError("launcher count needs model.llm.vocab_size to build a pretrained LLM without its files")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, cfg.llm.vocab_size)}}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>")),
        unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>",
    )


def build_meta(cfg: RunConfig):
    """The config's SegCapModel on the meta device, every part from its size fields (paths dropped)."""
    from modeling import build_model

    m = dataclasses.replace(
        cfg.model,
        llm=dataclasses.replace(cfg.model.llm, path=None, gguf_file=None, gradient_checkpointing=False),
        vision=dataclasses.replace(cfg.model.vision, path=None),
        pixel_encoder=dataclasses.replace(cfg.model.pixel_encoder, path=None),
        init_from=[],
    )
    tokenizer = _standin_tokenizer(m)
    with torch.device("meta"):
        return build_model(m, tokenizer)


def _params(module: torch.nn.Module | None) -> tuple[int, int]:
    if module is None:
        return 0, 0
    ps = list(module.parameters())
    return sum(p.numel() for p in ps), sum(p.numel() for p in ps if p.requires_grad)


def _flops(fn) -> tuple[int, object]:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        out = fn()
    return counter.get_total_flops(), out


def count(cfg: RunConfig) -> str:
    """The table `launcher count` prints: per part, parameters and forward FLOPs of one sample."""
    from modeling.queries import find_positions

    _register_msda_flops()
    model = build_meta(cfg)
    meta = torch.device("meta")
    n_img = model.num_image_tokens
    seq = n_img + TEXT_TOKENS
    clip = torch.empty(1, 3, cfg.model.vision.image_size, cfg.model.vision.image_size, device=meta)
    sam = torch.empty(1, 3, model.mask_size, model.mask_size, device=meta)
    width = model.llm.config.hidden_size

    rows = []
    f_vis, feats = _flops(lambda: model.vision(clip))
    rows.append(("vision (CLIP + projector)", *_params(model.vision), f_vis))
    f_enc, emb = _flops(lambda: model.segmenter.encode(sam))
    rows.append(("pixel encoder (SAM ViT)", *_params(model.segmenter.sam.vision_encoder), f_enc))
    embeds = torch.empty(1, seq, width, device=meta, dtype=feats.dtype)
    # A ready 4D causal mask: transformers' own mask building reads tensor values, which meta tensors lack.
    mask = torch.ones(seq, seq, dtype=torch.bool, device=meta).tril()[None, None]
    f_llm, out = _flops(lambda: model.llm(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True, use_cache=False))
    rows.append(("LLM (+ LoRA, new token rows)", *_params(model.llm), f_llm))
    hidden = out.hidden_states[-1]

    # One [SEG] near the end of the answer, the answer starting TEXT_TOKENS // 2 tokens before the end.
    ids = torch.zeros(1, seq, dtype=torch.long)
    ids[0, 1 : 1 + n_img] = model.image_token_id
    ids[0, seq - 3] = model.seg_token_id
    seg = ids == model.seg_token_id
    if model.mg is not None:
        pos = find_positions(ids, seg, torch.tensor([seq - TEXT_TOKENS // 2]), model.token_ids)
        pos = dataclasses.replace(pos, b_idx=pos.b_idx.to(meta), t_idx=pos.t_idx.to(meta))
        mg = model.mg
        f_dec, _ = _flops(lambda: mg(hidden, pos, emb))
        f_pix, pix = _flops(lambda: mg.pixel_decoder(emb))
        f_q, _ = _flops(lambda: mg.queries(hidden, pos, pix.memory))
        rows.append(("  pixel decoder (deformable encoder)", *_params(mg.pixel_decoder), f_pix))
        rows.append(("  query generator", *_params(mg.queries), f_q))
        rest = [m for n, m in mg.named_children() if n not in ("pixel_decoder", "queries")]
        rest_params = [sum(v) for v in zip(*(_params(m) for m in rest))]
        rows.append(("  two-way mask decoder + heads", *rest_params, f_dec - f_pix - f_q))
        rows.insert(3, ("decoder (multigranular)", *_params(mg), f_dec))
        items = f"{pos.num_seg} [SEG] + 1 exists item, {cfg.model.mask_decoder.queries.num} queries each"
    else:
        b_idx, t_idx = seg.nonzero(as_tuple=True)
        q = hidden[b_idx.to(meta), t_idx.to(meta)]
        f_dec, _ = _flops(lambda: model.segmenter.decode(emb, model.text_hidden_fcs(q), b_idx.to(meta)))
        dec_params = [a + b for a, b in zip(_params(model.text_hidden_fcs), _params(model.segmenter.decoder))]
        rows.append(("decoder (sam: text_hidden_fcs + SAM mask decoder)", *dec_params, f_dec))
        items = "1 [SEG]"

    total, trainable = _params(model)
    forward = f_vis + f_enc + f_llm + f_dec
    lines = [
        f"model {cfg.model.name}: mask_decoder.kind={cfg.model.mask_decoder.kind}, dtype {cfg.model.dtype}",
        f"forward FLOPs of one sample: {n_img} image tokens + {TEXT_TOKENS} text tokens, {items}",
        f"{'part':<52}{'params':>16}{'trainable':>16}{'GFLOPs':>12}",
    ]
    for name, p, t, f in rows:
        lines.append(f"{name:<52}{p:>16,}{t:>16,}{f / 1e9:>12.2f}")
    lines.append(f"{'total':<52}{total:>16,}{trainable:>16,}{forward / 1e9:>12.3f}")
    frozen = (f_vis if cfg.model.vision.freeze else 0) + (f_enc if cfg.model.pixel_encoder.freeze else 0)
    lines.append(
        f"training step per sample ~ {(3 * (forward - frozen) + frozen) / 1e12:.4g} TFLOPs "
        "(forward + backward = 3x forward where gradients flow, 1x through the frozen encoders)"
    )
    return "\n".join(lines)

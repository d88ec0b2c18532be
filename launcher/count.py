"""`python -m launcher count`: parameters (all, trainable) and forward FLOPs of each part of a config's
model. The model is built with fake weights (launcher/fake_model.py: no files read, so the 13B recipe
counts on a laptop) and FLOPs come from one run of its own forward on a one-sample batch."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from launcher.config import RunConfig
from launcher.fake_model import TEXT_TOKENS, build_fake, profile_step

# Parts of SegCapModel whose forward FLOPs are reported, by FlopCounterMode's module path.
ROOT = "SegCapModel"


def _params(module: torch.nn.Module | None) -> tuple[int, int]:
    if module is None:
        return 0, 0
    ps = list(module.parameters())
    return sum(p.numel() for p in ps), sum(p.numel() for p in ps if p.requires_grad)


def _sum(*pairs: tuple[int, int]) -> tuple[int, int]:
    return sum(p[0] for p in pairs), sum(p[1] for p in pairs)


def count(cfg: RunConfig) -> str:
    """The table `launcher count` prints: per part, parameters and forward FLOPs of one sample."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    model = build_fake(cfg, mode, gradient_checkpointing=False)
    n_img = model.num_image_tokens
    prof = profile_step(model, mode, batch_size=1, seq_len=n_img + TEXT_TOKENS)
    flops = prof.flops_by_module

    def f(path: str) -> int:
        return flops.get(f"{ROOT}.{path}" if path else ROOT, 0)

    rows = [
        ("vision (CLIP + projector)", *_params(model.vision), f("vision")),
        ("pixel encoder (SAM ViT)", *_params(model.segmenter.sam.vision_encoder), f("segmenter.sam.vision_encoder")),
        ("LLM (+ LoRA, new token rows)", *_params(model.llm), f("llm")),
    ]
    # The decoder's share: everything the model's forward ran besides the three towers (its losses too).
    f_dec = f("") - sum(r[3] for r in rows)
    if cfg.model.mask_decoder.kind == "multigranular":
        mg = model.mg
        rows.append(("decoder (multigranular) + losses", *_params(mg), f_dec))
        f_pix, f_q = f("mg.pixel_decoder"), f("mg.queries")
        rows.append(("  pixel decoder (deformable encoder)", *_params(mg.pixel_decoder), f_pix))
        rows.append(("  query generator", *_params(mg.queries), f_q))
        rest = [m for n, m in mg.named_children() if n not in ("pixel_decoder", "queries")]
        rows.append(("  two-way mask decoder + heads + losses", *_sum(*(_params(m) for m in rest)), f_dec - f_pix - f_q))
        items = f"1 [SEG] + 1 exists item, {cfg.model.mask_decoder.queries.num} queries each"
    else:
        dec = _sum(_params(model.text_hidden_fcs), _params(model.segmenter.decoder))
        rows.append(("decoder (sam: text_hidden_fcs + SAM mask decoder) + losses", *dec, f_dec))
        items = "1 [SEG]"

    total, trainable = _params(model)
    lines = [
        f"model {cfg.model.name}: mask_decoder.kind={cfg.model.mask_decoder.kind}, dtype {cfg.model.dtype}",
        f"forward FLOPs of one sample (the model's forward on fake weights): {n_img} image tokens + {TEXT_TOKENS} text tokens, {items}",
        f"{'part':<60}{'params':>16}{'trainable':>16}{'GFLOPs':>12}",
    ]
    for name, p, t, fl in rows:
        lines.append(f"{name:<60}{p:>16,}{t:>16,}{fl / 1e9:>12.2f}")
    lines.append(f"{'total':<60}{total:>16,}{trainable:>16,}{prof.forward_flops / 1e9:>12.3f}")
    lines.append(
        f"training step per sample: {prof.train_flops / 1e12:.4g} TFLOPs (forward + backward as run, without "
        "gradient checkpointing; frozen towers run forward only)"
    )
    return "\n".join(lines)

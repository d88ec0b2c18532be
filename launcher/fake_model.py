"""The config's model with fake weights (FakeTensorMode: shapes and dtypes, no memory, no files) run on a
real-size batch, for `count` and `plan`: FLOPs from torch's FlopCounterMode and the bytes of live tensors
through forward and backward, both from the model's own forward (gradient checkpointing as configured)."""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from launcher.config import RunConfig

TEXT_TOKENS = 64  # a referring sample's prompt + answer, besides the image tokens
_MSDA_REGISTERED = False


def register_msda_flops() -> None:
    """FlopCounterMode's formula for the multi-scale deformable attention op (kernels/README.md: 8*D + 20
    per sampled point): it has no aten decomposition for the counter to see."""
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


def standin_tokenizer(cfg) -> object:
    """The synthetic tokenizer, or one of the checkpoint's vocabulary size (only its length matters)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    if cfg.llm.tokenizer == "synthetic":
        from datapipes.synthetic import build_tokenizer

        return build_tokenizer()
    if not cfg.llm.vocab_size:
        raise ValueError("counting a pretrained LLM without its files needs model.llm.vocab_size")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, cfg.llm.vocab_size)}}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>")),
        unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>",
    )


def build_meta(cfg: RunConfig, gradient_checkpointing: bool | None = None):
    """The config's SegCapModel on the meta device, every part from its size fields (paths dropped)."""
    from modeling import build_model

    ckpt = cfg.model.llm.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
    m = dataclasses.replace(
        cfg.model,
        llm=dataclasses.replace(cfg.model.llm, path=None, gguf_file=None, gradient_checkpointing=ckpt),
        vision=dataclasses.replace(cfg.model.vision, path=None),
        pixel_encoder=dataclasses.replace(cfg.model.pixel_encoder, path=None),
        init_from=[],  # no weights: shapes only
    )
    with torch.device("meta"):
        return build_model(m, standin_tokenizer(m))


def build_fake(cfg: RunConfig, mode: FakeTensorMode, gradient_checkpointing: bool | None = None):
    """build_meta, then every parameter and buffer swapped for a fake CPU tensor of its shape, so the
    forward runs with real integer inputs (ids, masks: data-dependent indexing works) and fake weights."""
    model = build_meta(cfg, gradient_checkpointing)
    swapped: dict[int, torch.Tensor] = {}  # shared tensors (SAM's positional embedding) stay shared

    def fake(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in swapped:
            new = torch.empty_like(t, device="cpu")
            swapped[id(t)] = torch.nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else new
        return swapped[id(t)]

    with mode:
        for module in model.modules():
            for table in (module._parameters, module._buffers):
                for name, t in list(table.items()):
                    if t is not None:
                        table[name] = fake(t)
    return model


def sample_batch(model, mode: FakeTensorMode | None, batch_size: int, seq_len: int, seg_per_sample: int = 1) -> dict:
    """A training batch of `batch_size` samples of `seq_len` tokens: <s>, the image tokens, text whose
    second half is the labelled answer holding `seg_per_sample` [SEG]s, each with a square mask. Integer
    inputs and masks are real; pixels are fake under `mode` (zeros without one)."""
    n_img, size = model.num_image_tokens, model.mask_size
    if seq_len < n_img + 4 + seg_per_sample:
        raise ValueError(f"sequence length {seq_len} leaves no room for text after {n_img} image tokens")
    ids = torch.full((batch_size, seq_len), 3, dtype=torch.long)  # any word id
    ids[:, 0] = 1
    ids[:, 1 : 1 + n_img] = model.image_token_id
    answer = 1 + n_img + (seq_len - 1 - n_img) // 2
    for k in range(seg_per_sample):
        ids[:, seq_len - 2 - k] = model.seg_token_id
    labels = ids.clone()
    labels[:, :answer] = -100
    mask = torch.zeros(seg_per_sample, size, size, dtype=torch.uint8)
    mask[:, size // 4 : size // 2, size // 4 : size // 2] = 1
    clip = model.cfg.vision.image_size
    with mode or contextlib.nullcontext():
        clip_pixels = torch.zeros(batch_size, 3, clip, clip)
        sam_pixels = torch.zeros(batch_size, 3, size, size)
    return {
        "input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
        "clip_pixels": clip_pixels, "sam_pixels": sam_pixels, "gt_masks": [mask.clone() for _ in range(batch_size)],
    }


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages that operators created and that are still alive: the peak over a region is
    what activations, temporaries and gradients take on top of the weights (works on fake tensors)."""

    def __init__(self) -> None:
        super().__init__()
        self._sizes: dict[int, int] = {}
        self.now = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.now -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self._sizes:  # views and in-place results share a counted storage
                    self._sizes[key] = storage.nbytes()
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(storage, self._free, key)
        return out


@dataclass
class StepProfile:
    batch_size: int
    seq_len: int
    forward_flops: int  # the model's forward
    train_flops: int  # forward + backward as run (with gradient checkpointing: the recomputed forward too)
    activation_bytes: int  # peak live bytes during forward + backward, less what stays alive at its end (gradients)
    flops_by_module: dict[str, int]  # forward FLOPs per top-level part


def profile_step(model, mode: FakeTensorMode, batch_size: int, seq_len: int) -> StepProfile:
    """One forward and backward of the fake model on a real-size batch (model in train mode)."""
    from torch.utils.flop_counter import FlopCounterMode

    register_msda_flops()
    model.train()
    batch = sample_batch(model, mode, batch_size, seq_len)
    fwd = FlopCounterMode(display=False)
    with fwd, torch.no_grad():
        model(**batch)
    by_module = {k: sum(v.values()) for k, v in fwd.get_flop_counts().items()}
    live, counter = LiveBytes(), FlopCounterMode(display=False)
    with counter, live:
        out = model(**batch)
        out.loss.backward()
        del out
    for p in model.parameters():
        p.grad = None
    return StepProfile(batch_size, seq_len, fwd.get_total_flops(), counter.get_total_flops(), live.peak - live.now, by_module)


@dataclass
class FlopModel:
    """Training FLOPs of a batch (forward + backward, no recompute): a part per sample (the image towers
    and the decoder) plus a part per token (the LLM, linear in tokens to first order)."""

    per_sample: float
    per_token: float

    def of(self, samples: int, tokens: int) -> float:
        return self.per_sample * samples + self.per_token * tokens


def flop_model(cfg: RunConfig) -> FlopModel:
    """From one fake forward + backward of a one-sample batch (the `count` sample), the LLM's share of
    it split off per token by its share of the forward FLOPs."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    model = build_fake(cfg, mode, gradient_checkpointing=False)
    seq = model.num_image_tokens + TEXT_TOKENS
    prof = profile_step(model, mode, batch_size=1, seq_len=seq)
    llm_share = prof.flops_by_module.get("SegCapModel.llm", 0) / max(prof.forward_flops, 1)
    return FlopModel(per_sample=prof.train_flops * (1 - llm_share), per_token=prof.train_flops * llm_share / seq)

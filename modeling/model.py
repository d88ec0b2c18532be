"""SegCapModel: CLIP features spliced into the LLM at the <image> positions; the last hidden state at
each [SEG] becomes, through text_hidden_fcs, the prompt of SAM's mask decoder for that sample's image.
forward() gives the training loss; predict() generates text greedily, then decodes its [SEG] masks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput as _HFModelOutput

from modeling.config import ModelConfig
from modeling.llm import IMAGE_TOKEN, SEG_TOKEN
from modeling.losses import causal_lm_ce, segcap_loss
from modeling.sam import SamSegmenter
from modeling.vision import VisionTower


@dataclass
class ModelOutput(_HFModelOutput):
    """A transformers ModelOutput (a dict underneath) so that DeepSpeed's ZeRO-3 hooks find the loss."""

    loss: torch.Tensor | None = None
    terms: dict[str, torch.Tensor] | None = None
    pred_masks: list[torch.Tensor] | None = None  # per sample (k_i, S, S) logits, in [SEG] order


@dataclass
class Prediction:
    text: str
    token_ids: torch.Tensor  # generated ids, up to (not including) EOS
    masks: torch.Tensor  # (k, S, S) bool, one per generated [SEG], in order
    seg_count: int


class SegCapModel(nn.Module):
    def __init__(self, cfg: ModelConfig, llm: nn.Module, vision: VisionTower, segmenter: SamSegmenter, tokenizer, token_ids: dict[str, int]):
        super().__init__()
        self.cfg = cfg
        self.llm = llm
        self.vision = vision
        self.segmenter = segmenter
        width = llm.config.hidden_size
        # MGLMM's psi: same structure as the image projector phi (Linear-GELU-Linear), into the decoder width.
        self.text_hidden_fcs = nn.Sequential(
            nn.Linear(width, width), nn.GELU(), nn.Linear(width, segmenter.hidden_size)
        ).to(vision.projector[0].weight.dtype)
        self.tokenizer = tokenizer
        self.image_token_id = token_ids[IMAGE_TOKEN]
        self.seg_token_id = token_ids[SEG_TOKEN]
        self.pad_token_id = tokenizer.pad_token_id
        self.eos_token_id = tokenizer.eos_token_id
        self.num_image_tokens = vision.num_image_tokens
        self.mask_size = segmenter.image_size

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Projector, text_hidden_fcs; new token rows and LoRA (train_mode lora); the mask decoder
        (mask_decoder.train); the SAM encoder only when not frozen. Flags are set by build_model."""
        return [p for p in self.parameters() if p.requires_grad]

    # ---- training
    def forward(self, input_ids, attention_mask, labels, clip_pixels, sam_pixels, gt_masks) -> ModelOutput:
        image_features = self.vision(clip_pixels)
        image_embeddings = self.segmenter.encode(sam_pixels)
        out = self.llm(
            inputs_embeds=self.embed(input_ids, image_features),
            attention_mask=attention_mask,
            output_hidden_states=True,
            use_cache=False,
        )
        ce = causal_lm_ce(out.logits, labels)
        seg = input_ids == self.seg_token_id
        counts = seg.sum(1).tolist()
        for b, (k, m) in enumerate(zip(counts, gt_masks)):
            if k != len(m):
                raise ValueError(f"sample {b}: {k} [SEG] tokens but {len(m)} masks")
        logits = self.decode_masks(out.hidden_states[-1], seg, image_embeddings)
        has_seg = sum(counts) > 0
        targets = torch.cat(list(gt_masks)).to(logits.device) if has_seg else None
        loss, terms = segcap_loss(ce, logits, targets, self.cfg.loss)
        pred = logits.detach() if has_seg else logits.detach()[:0]  # drop the dummy
        return ModelOutput(loss=loss, terms=terms, pred_masks=list(pred.split(counts)))

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the projected CLIP features written over the <image> positions.

        The loader expanded <image> to num_image_tokens copies, so a sample has either that many or none.
        """
        embeds = self.llm.get_input_embeddings()(input_ids)
        is_image = input_ids == self.image_token_id
        per_sample = is_image.sum(1)
        if ((per_sample != 0) & (per_sample != self.num_image_tokens)).any():
            raise ValueError(f"<image> count per sample {per_sample.tolist()}, expected 0 or {self.num_image_tokens}")
        with_image = image_features[per_sample > 0].to(embeds.dtype)
        embeds = embeds.masked_scatter(is_image.unsqueeze(-1), with_image)
        if not is_image.any():  # keep the projector in the graph (zero gradient) for ZeRO-3
            embeds = embeds + 0.0 * image_features.sum()
        return embeds

    def decode_masks(self, hidden: torch.Tensor, seg: torch.Tensor, image_embeddings: torch.Tensor) -> torch.Tensor:
        """Mask logits (N, S, S) for the N True positions of `seg` (B, T), in row-major order: the i-th
        [SEG] of sample b is the i-th query of sample b, decoded against sample b's image.

        With no [SEG] anywhere, one dummy query (the first hidden state, image 0) still runs the MLP
        and the decoder, so every rank calls the same modules; the caller gives it weight 0.
        """
        b_idx, t_idx = seg.nonzero(as_tuple=True)
        if len(b_idx) == 0:
            b_idx, t_idx = seg.new_zeros(1, dtype=torch.long), seg.new_zeros(1, dtype=torch.long)
        queries = self.text_hidden_fcs(hidden[b_idx, t_idx])
        return self.segmenter.decode(image_embeddings, queries, b_idx)

    # ---- inference
    @torch.no_grad()
    def predict(self, prompt_ids: list[torch.Tensor], clip_pixels, sam_pixels, max_new_tokens: int, synced_gpus: bool = False) -> list[Prediction]:
        """Greedy generation from each prompt (left-padded, image features spliced in), then one forward
        pass over prompt + generated ids whose hidden states at the generated [SEG] tokens are decoded.

        synced_gpus=True (ZeRO-3, several ranks): generate keeps every rank stepping until all are done,
        and the second pass and the decoder run on every rank even when a rank generated no [SEG].
        """
        device = clip_pixels.device
        image_features = self.vision(clip_pixels)
        image_embeddings = self.segmenter.encode(sam_pixels)
        prompts = [p.to(device) for p in prompt_ids]

        ids, mask = _pad(prompts, self.pad_token_id, left=True)
        generated = self.llm.generate(
            inputs_embeds=self.embed(ids, image_features),
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            synced_gpus=synced_gpus,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
            use_cache=True,
        )  # with inputs_embeds only, generate returns the new tokens alone
        answers = [_until_eos(g, self.eos_token_id) for g in generated]

        full = [torch.cat([p, a]) for p, a in zip(prompts, answers)]
        ids, mask = _pad(full, self.pad_token_id, left=False)
        out = self.llm(inputs_embeds=self.embed(ids, image_features), attention_mask=mask, output_hidden_states=True, use_cache=False)
        positions = torch.arange(ids.shape[1], device=device)
        starts = torch.tensor([len(p) for p in prompts], device=device)
        ends = starts + torch.tensor([len(a) for a in answers], device=device)
        seg = (ids == self.seg_token_id) & (positions >= starts[:, None]) & (positions < ends[:, None])
        logits = self.decode_masks(out.hidden_states[-1], seg, image_embeddings)
        counts = seg.sum(1).tolist()
        masks = (logits > 0) if sum(counts) else (logits > 0)[:0]  # drop the dummy
        return [
            Prediction(text=self.tokenizer.decode(a.tolist(), skip_special_tokens=False), token_ids=a.cpu(), masks=m, seg_count=k)
            for a, m, k in zip(answers, masks.split(counts), counts)
        ]


def _pad(seqs: list[torch.Tensor], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in seqs)
    ids = seqs[0].new_full((len(seqs), length), pad_id)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        span = slice(length - len(s), length) if left else slice(0, len(s))
        ids[i, span] = s
        mask[i, span] = 1
    return ids, mask


def _until_eos(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    stop = (tokens == eos_id).nonzero()
    return tokens[: int(stop[0])] if len(stop) else tokens

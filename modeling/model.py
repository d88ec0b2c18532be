"""SegCapModel: CLIP features spliced into the LLM at the <image> positions; the last hidden state at
each [SEG] becomes the query of the mask decoder (modeling/mask_decoder.py: "sam", LISA's prompt of SAM's
decoder, or "multigranular", MVP-LM's dynamic queries with boxes, set matching and "target exists").
forward() gives the training loss; predict() generates text greedily, then decodes its [SEG] masks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput as _HFModelOutput

from modeling.config import ModelConfig
from modeling.llm import IMAGE_TOKEN, SEG_TOKEN
from modeling.losses import causal_lm_ce
from modeling.mask_decoder import MaskDecoder, SegTargets, make_mask_decoder
from modeling.sam import SamSegmenter
from modeling.vision import VisionTower


@dataclass
class ModelOutput(_HFModelOutput):
    """A transformers ModelOutput (a dict underneath) so that DeepSpeed's ZeRO-3 hooks find the loss."""

    loss: torch.Tensor | None = None
    terms: dict[str, torch.Tensor] | None = None
    pred_masks: list[torch.Tensor] | None = None  # per sample (k_i, S, S) logits, in [SEG] order
    # multigranular only: per sample (k_i, 4) normalised cxcywh box of each [SEG]'s best prediction, and
    # (B,) exists logits
    pred_boxes: list[torch.Tensor] | None = None
    exists: torch.Tensor | None = None


@dataclass
class Prediction:
    text: str
    token_ids: torch.Tensor  # generated ids, up to (not including) EOS
    masks: torch.Tensor  # (k, S, S) bool, one per generated [SEG], in order
    seg_count: int
    # multigranular only: every prediction of every generated [SEG] as an xyxy box in pixels of the
    # S x S frame, its score (objectness x exists), and the sample's exists probability
    boxes: torch.Tensor | None = None
    box_scores: torch.Tensor | None = None
    exists: float | None = None


class SegCapModel(nn.Module):
    def __init__(self, cfg: ModelConfig, llm: nn.Module, vision: VisionTower, segmenter: SamSegmenter, tokenizer, token_ids: dict[str, int]):
        super().__init__()
        self.cfg = cfg
        self.llm = llm
        self.vision = vision
        self.segmenter = segmenter
        # The decoder's modules become children of this model under their own names (text_hidden_fcs.*
        # or mg.*: the state-dict keys of checkpoints); the other kind's attribute is None.
        dtype = vision.projector[0].weight.dtype
        self.mask_decoder: MaskDecoder = make_mask_decoder(cfg, segmenter, llm.config.hidden_size, dtype, dict(token_ids))
        for name, module in self.mask_decoder.parts().items():
            setattr(self, name, module)
        self.token_ids = dict(token_ids)
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
    def forward(
        self, input_ids, attention_mask, labels, clip_pixels, sam_pixels, gt_masks,
        gt_boxes=None, gt_owner=None, has_mask=None, gt_instance_masks=None,
    ) -> ModelOutput:
        """gt_masks: per sample (k_i, S, S), the target of each [SEG]. The instance-level targets
        (docs/INTERFACES.md, Batch) are optional: without them every [SEG] is one instance with a mask
        and its box is the mask's. The sam decoder trains on gt_masks, skipping [SEG]s whose instances
        lack a mask (box-only); the multigranular decoder matches its predictions to the instances."""
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
        targets = SegTargets(gt_masks, gt_boxes, gt_owner, has_mask, gt_instance_masks)
        dec = self.mask_decoder.loss(out.hidden_states[-1], image_embeddings, ce, input_ids, attention_mask, labels, seg, counts, targets)
        return ModelOutput(loss=dec.loss, terms=dec.terms, pred_masks=dec.pred_masks, pred_boxes=dec.pred_boxes, exists=dec.exists)

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the projected CLIP features written over the <image> positions.

        The loader expanded <image> to num_image_tokens copies, so a sample has either that many or none.
        """
        embeds = self.llm.get_input_embeddings()(input_ids)
        is_image = input_ids == self.image_token_id
        per_sample = is_image.sum(1)
        if ((per_sample != 0) & (per_sample != self.num_image_tokens)).any():
            raise ValueError(f"<image> count per sample {per_sample.tolist()}, expected 0 or {self.num_image_tokens}")
        with_image = image_features[(per_sample > 0).nonzero()[:, 0]].to(embeds.dtype)  # indices, not a bool mask: the plan's fake run
        embeds = embeds.masked_scatter(is_image.unsqueeze(-1), with_image)
        if not is_image.any():  # keep the projector in the graph (zero gradient) for ZeRO-3
            embeds = embeds + 0.0 * image_features.sum()
        return embeds

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
        decoded = self.mask_decoder.predict(ids, seg, starts, out.hidden_states[-1], image_embeddings)
        counts = seg.sum(1).tolist()
        return [
            Prediction(text=self.tokenizer.decode(a.tolist(), skip_special_tokens=False), token_ids=a.cpu(), seg_count=k, **d)
            for a, k, d in zip(answers, counts, decoded)
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

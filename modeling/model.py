"""SegCapModel: CLIP features spliced into the LLM at the <image> positions; the last hidden state at
each [SEG] becomes the query of the mask decoder for that sample's image. mask_decoder.kind "sam": through
text_hidden_fcs, the prompt of SAM's mask decoder (LISA). "multigranular": the dynamic queries of MVP-LM's
decoder (modeling/heads.py), with boxes, set matching and a per-sample "target exists" answer.
forward() gives the training loss; predict() generates text greedily, then decodes its [SEG] masks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput as _HFModelOutput

from modeling.config import ModelConfig
from modeling.heads import MultiGranularDecoder
from modeling.llm import IMAGE_TOKEN, SEG_TOKEN
from modeling.losses import InstanceTargets, causal_lm_ce, segcap_loss, set_prediction_loss
from modeling.matcher import cxcywh_to_xyxy, masks_to_boxes, xyxy_to_cxcywh
from modeling.queries import find_positions
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
        width = llm.config.hidden_size
        dtype = vision.projector[0].weight.dtype
        if cfg.mask_decoder.kind == "multigranular":
            patch = segmenter.sam.config.vision_config.patch_size
            self.text_hidden_fcs = None
            self.mg = MultiGranularDecoder(segmenter.hidden_size, patch, width, cfg.mask_decoder).to(dtype)
        else:
            # MGLMM's psi: same structure as the image projector phi (Linear-GELU-Linear), into the decoder width.
            self.text_hidden_fcs = nn.Sequential(
                nn.Linear(width, width), nn.GELU(), nn.Linear(width, segmenter.hidden_size)
            ).to(dtype)
            self.mg = None
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
        if self.mg is not None:
            targets = _instance_targets(gt_masks, gt_boxes, gt_owner, has_mask, gt_instance_masks, counts, self.mask_size)
            return self._forward_multigranular(input_ids, attention_mask, labels, seg, out.hidden_states[-1], image_embeddings, ce, targets, counts)
        logits = self.decode_masks(out.hidden_states[-1], seg, image_embeddings)
        has_seg = sum(counts) > 0
        targets = torch.cat(list(gt_masks)).to(logits.device) if has_seg else None
        keep = _seg_has_mask(has_mask, gt_owner, counts) if has_seg and has_mask is not None else None
        if keep is not None and not keep.all():  # box-only [SEG]s: no mask loss from the sam decoder
            keep = keep.to(logits.device)
            loss, terms = segcap_loss(ce, logits[keep], targets[keep], self.cfg.loss) if keep.any() else segcap_loss(ce, logits, None, self.cfg.loss)
            return ModelOutput(loss=loss + 0.0 * logits.sum(), terms=terms, pred_masks=list(logits.detach().split(counts)))
        loss, terms = segcap_loss(ce, logits, targets, self.cfg.loss)
        pred = logits.detach() if has_seg else logits.detach()[:0]  # drop the dummy
        return ModelOutput(loss=loss, terms=terms, pred_masks=list(pred.split(counts)))

    def _forward_multigranular(self, input_ids, attention_mask, labels, seg, hidden, image_embeddings, ce, targets, counts) -> ModelOutput:
        """Decoder items: every [SEG], then one exists item per sample at the end of its prompt (the
        position before the last assistant turn, which predict() finds at the end of the prompt)."""
        labelled = labels != -100
        run_start = labelled & ~torch.nn.functional.pad(labelled, (1, 0))[:, :-1]
        positions = torch.arange(labels.shape[1], device=labels.device)
        answer_start = torch.where(run_start, positions, -1).amax(1)
        answer_start = torch.where(answer_start >= 0, answer_start, attention_mask.sum(1))
        pos = find_positions(input_ids, seg, answer_start, self.token_ids)
        dec = self.mg(hidden, pos, image_embeddings)
        has_seg = torch.tensor([k > 0 for k in counts], device=dec.exists.device)
        targets = InstanceTargets(*(t.to(dec.masks.device) for t in (targets.masks, targets.boxes, targets.has_mask, targets.item)))
        loss, terms = set_prediction_loss(
            ce, dec, pos.num_seg, targets, has_seg, self.mask_size, self.cfg.loss, self.cfg.mask_decoder.match
        )
        n = pos.num_seg
        slot = dec.logits[:n].detach().argmax(1)  # each [SEG]'s most confident prediction
        item = torch.arange(n, device=slot.device)
        pred = self._upsample(dec.masks[item, slot].detach())
        return ModelOutput(
            loss=loss, terms=terms, pred_masks=list(pred.split(counts)),
            pred_boxes=list(dec.boxes[item, slot].detach().split(counts)), exists=dec.exists[n:].detach(),
        )

    def _upsample(self, low_res: torch.Tensor) -> torch.Tensor:
        """(N, h, w) mask logits -> (N, S, S), bilinear as the sam decoder's."""
        size = (self.mask_size, self.mask_size)
        return torch.nn.functional.interpolate(low_res[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]

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
        if self.mg is not None:
            return self._predict_multigranular(ids, seg, starts, out.hidden_states[-1], image_embeddings, answers)
        logits = self.decode_masks(out.hidden_states[-1], seg, image_embeddings)
        counts = seg.sum(1).tolist()
        masks = (logits > 0) if sum(counts) else (logits > 0)[:0]  # drop the dummy
        return [
            Prediction(text=self.tokenizer.decode(a.tolist(), skip_special_tokens=False), token_ids=a.cpu(), masks=m, seg_count=k)
            for a, m, k in zip(answers, masks.split(counts), counts)
        ]

    def _predict_multigranular(self, ids, seg, starts, hidden, image_embeddings, answers) -> list[Prediction]:
        """Per generated [SEG]: the union of its predictions with objectness above the threshold (at
        least its best one); every mask of a sample whose exists probability is not above the threshold
        is emptied (gRefCOCO: no target, no mask). Boxes: all predictions, scored objectness x exists."""
        pos = find_positions(ids, seg, starts, self.token_ids)
        dec = self.mg(hidden, pos, image_embeddings)
        n, thr = pos.num_seg, self.cfg.mask_decoder.score_threshold
        exists = dec.exists[n:].float().sigmoid()
        prob = dec.logits[:n].float().sigmoid()  # (n, num)
        keep = prob > thr
        keep[torch.arange(n), prob.argmax(1)] = True
        num = prob.shape[1]
        masks = (self._upsample(dec.masks[:n].flatten(0, 1)) > 0).view(n, num, self.mask_size, self.mask_size)
        masks = (masks & keep[:, :, None, None]).any(1)
        b_idx = pos.b_idx[:n]
        masks &= (exists[b_idx] > thr)[:, None, None]
        boxes = cxcywh_to_xyxy(dec.boxes[:n].float()).clamp(0, 1) * self.mask_size
        scores = prob * exists[b_idx][:, None]
        counts = seg.sum(1).tolist()
        return [
            Prediction(
                text=self.tokenizer.decode(a.tolist(), skip_special_tokens=False), token_ids=a.cpu(), masks=m, seg_count=k,
                boxes=bx.reshape(-1, 4).cpu(), box_scores=sc.reshape(-1).cpu(), exists=float(e),
            )
            for a, m, k, bx, sc, e in zip(answers, masks.split(counts), counts, boxes.split(counts), scores.split(counts), exists)
        ]


def _seg_has_mask(has_mask, gt_owner, counts) -> torch.Tensor:
    """(sum k_i,) bool: every instance of the [SEG] has a mask (so gt_masks holds its full target)."""
    flags = []
    for b, k in enumerate(counts):
        owner = gt_owner[b].cpu() if gt_owner is not None else torch.arange(k)
        masked = has_mask[b].cpu().bool()
        flags += [bool(masked[owner == i].all()) for i in range(k)]
    return torch.tensor(flags, dtype=torch.bool)


def _instance_targets(gt_masks, gt_boxes, gt_owner, has_mask, gt_instance_masks, counts, frame: int) -> InstanceTargets:
    """The batch's instances, flat, each tagged with its [SEG] item (row-major). Without the
    instance-level inputs every [SEG] is one instance: its mask, with the mask's tight box."""
    masks, boxes, flags, items = [], [], [], []
    first = 0
    for b, k in enumerate(counts):
        m = gt_instance_masks[b] if gt_instance_masks is not None else gt_masks[b]
        owner = gt_owner[b].cpu().long() if gt_owner is not None else torch.arange(len(m))
        masks.append(m)
        boxes.append(gt_boxes[b].float().cpu() if gt_boxes is not None else xyxy_to_cxcywh(masks_to_boxes(m)).cpu() / frame)
        flags.append(has_mask[b].cpu().bool() if has_mask is not None else torch.ones(len(m), dtype=torch.bool))
        items.append(owner + first)
        first += k
    return InstanceTargets(torch.cat(masks), torch.cat(boxes), torch.cat(flags), torch.cat(items))


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

"""The mask-decoder interface: what SegCapModel asks of its decoder (training loss, masks at inference,
which parameters train), with mask_decoder.kind "sam" (LISA: [SEG] -> text_hidden_fcs -> SAM's decoder)
and "multigranular" (MVP-LM: [SEG] -> dynamic queries -> modeling/heads.py) as its two implementations."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from modeling.config import MaskDecoderConfig, ModelConfig
from modeling.heads import MultiGranularDecoder
from modeling.losses import InstanceTargets, segcap_loss, set_prediction_loss
from modeling.matcher import cxcywh_to_xyxy, masks_to_boxes, xyxy_to_cxcywh
from modeling.queries import find_positions
from modeling.sam import SamSegmenter


@dataclass
class SegTargets:
    """A batch's mask targets (docs/INTERFACES.md, Batch): gt_masks, one per [SEG]; the instance-level
    fields are optional (without them every [SEG] is one instance with a mask)."""

    gt_masks: list[torch.Tensor]
    gt_boxes: list[torch.Tensor] | None = None
    gt_owner: list[torch.Tensor] | None = None
    has_mask: list[torch.Tensor] | None = None
    gt_instance_masks: list[torch.Tensor] | None = None


@dataclass
class DecodedBatch:
    """What a decoder adds to the model's output: the loss and its terms, per-sample mask logits in
    [SEG] order, and (multigranular) each [SEG]'s best box and the per-sample exists logits."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    pred_masks: list[torch.Tensor]
    pred_boxes: list[torch.Tensor] | None = None
    exists: torch.Tensor | None = None


class MaskDecoder(ABC):
    """Turns the LLM's last hidden states at [SEG] tokens into masks. Its modules are children of
    SegCapModel under their own names (`parts()`), so state-dict keys and ZeRO-3's hooks are those of
    the model; this object holds the decoding logic and references to them."""

    def __init__(self, segmenter: SamSegmenter, frame: int):
        self.segmenter = segmenter
        self.frame = frame  # the S x S frame that masks and targets live in

    @abstractmethod
    def parts(self) -> dict[str, nn.Module | None]:
        """Attribute name on SegCapModel -> module (None for the other kind's attribute)."""

    @abstractmethod
    def set_trainable(self, train: bool) -> None:
        """requires_grad for the decoder's parts; `train` is mask_decoder.train (the query MLP always trains)."""

    @abstractmethod
    def loss(self, hidden, image_embeddings, ce, input_ids, attention_mask, labels, seg, counts, targets: SegTargets) -> DecodedBatch:
        """hidden (B, T, w): the LLM's last layer; seg (B, T): the [SEG] positions; counts: [SEG]s per sample."""

    @abstractmethod
    def predict(self, ids, seg, starts, hidden, image_embeddings) -> list[dict]:
        """Per sample the Prediction fields the decoder owns (masks; boxes, box_scores, exists) for the
        generated [SEG]s marked by seg; starts (B,): where each sample's answer begins in ids."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.parts().values() if m is not None for p in m.parameters() if p.requires_grad]


class SamPromptDecoder(MaskDecoder):
    """kind "sam": each [SEG]'s hidden state through text_hidden_fcs (MGLMM's psi, Linear-GELU-Linear)
    is the one sparse prompt of SAM's mask decoder; trained with CE + BCE + Dice (segcap_loss)."""

    def __init__(self, segmenter: SamSegmenter, llm_width: int, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__(segmenter, segmenter.image_size)
        self.loss_weights = cfg.loss
        self.text_hidden_fcs = nn.Sequential(
            nn.Linear(llm_width, llm_width), nn.GELU(), nn.Linear(llm_width, segmenter.hidden_size)
        ).to(dtype)

    def parts(self) -> dict[str, nn.Module | None]:
        return {"text_hidden_fcs": self.text_hidden_fcs, "mg": None}

    def set_trainable(self, train: bool) -> None:
        self.text_hidden_fcs.requires_grad_(True)
        if train:
            decoder = self.segmenter.decoder
            decoder.requires_grad_(True)
            # Its output (mask quality) is unused here: it would never receive a gradient.
            decoder.iou_prediction_head.requires_grad_(False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return super().trainable_parameters() + [p for p in self.segmenter.decoder.parameters() if p.requires_grad]

    def decode(self, hidden: torch.Tensor, seg: torch.Tensor, image_embeddings: torch.Tensor) -> torch.Tensor:
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

    def loss(self, hidden, image_embeddings, ce, input_ids, attention_mask, labels, seg, counts, targets: SegTargets) -> DecodedBatch:
        """Skips [SEG]s whose instances lack a mask (box-only): the sam decoder has no box head."""
        logits = self.decode(hidden, seg, image_embeddings)
        has_seg = sum(counts) > 0
        gt = torch.cat(list(targets.gt_masks)).to(logits.device) if has_seg else None
        keep = _seg_has_mask(targets.has_mask, targets.gt_owner, counts) if has_seg and targets.has_mask is not None else None
        w = self.loss_weights
        if keep is not None and not keep.all():  # box-only [SEG]s: no mask loss from the sam decoder
            keep = keep.to(logits.device)
            loss, terms = segcap_loss(ce, logits[keep], gt[keep], w) if keep.any() else segcap_loss(ce, logits, None, w)
            return DecodedBatch(loss + 0.0 * logits.sum(), terms, list(logits.detach().split(counts)))
        loss, terms = segcap_loss(ce, logits, gt, w)
        pred = logits.detach() if has_seg else logits.detach()[:0]  # drop the dummy
        return DecodedBatch(loss, terms, list(pred.split(counts)))

    def predict(self, ids, seg, starts, hidden, image_embeddings) -> list[dict]:
        logits = self.decode(hidden, seg, image_embeddings)
        counts = seg.sum(1).tolist()
        masks = (logits > 0) if sum(counts) else (logits > 0)[:0]  # drop the dummy
        return [{"masks": m} for m in masks.split(counts)]


class MultiGranularPromptDecoder(MaskDecoder):
    """kind "multigranular": every [SEG] and one exists item per sample become dynamic queries of
    modules/heads.py's decoder (module `mg`), matched to the target instances (set_prediction_loss)."""

    def __init__(self, segmenter: SamSegmenter, llm_width: int, cfg: ModelConfig, dtype: torch.dtype, token_ids: dict[str, int]):
        super().__init__(segmenter, segmenter.image_size)
        self.cfg: MaskDecoderConfig = cfg.mask_decoder
        self.loss_weights = cfg.loss
        self.token_ids = token_ids
        patch = segmenter.sam.config.vision_config.patch_size
        self.mg = MultiGranularDecoder(segmenter.hidden_size, patch, llm_width, cfg.mask_decoder).to(dtype)

    def parts(self) -> dict[str, nn.Module | None]:
        return {"text_hidden_fcs": None, "mg": self.mg}

    def set_trainable(self, train: bool) -> None:
        # The query generator always trains (as text_hidden_fcs); the rest of the multi-granularity
        # decoder with mask_decoder.train. SAM's own mask decoder is not used by this kind.
        self.mg.queries.requires_grad_(True)
        if train:
            self.mg.requires_grad_(True)

    def loss(self, hidden, image_embeddings, ce, input_ids, attention_mask, labels, seg, counts, targets: SegTargets) -> DecodedBatch:
        """Decoder items: every [SEG], then one exists item per sample at the end of its prompt (the
        position before the last assistant turn, which predict() finds at the end of the prompt)."""
        t = targets
        instances = _instance_targets(t.gt_masks, t.gt_boxes, t.gt_owner, t.has_mask, t.gt_instance_masks, counts, self.frame)
        labelled = labels != -100
        run_start = labelled & ~F.pad(labelled, (1, 0))[:, :-1]
        positions = torch.arange(labels.shape[1], device=labels.device)
        answer_start = torch.where(run_start, positions, -1).amax(1)
        answer_start = torch.where(answer_start >= 0, answer_start, attention_mask.sum(1))
        pos = find_positions(input_ids, seg, answer_start, self.token_ids)
        dec = self.mg(hidden, pos, image_embeddings)
        has_seg = torch.tensor([k > 0 for k in counts], device=dec.exists.device)
        instances = InstanceTargets(*(x.to(dec.masks.device) for x in (instances.masks, instances.boxes, instances.has_mask, instances.item)))
        loss, terms = set_prediction_loss(
            ce, dec, pos.num_seg, instances, has_seg, self.frame, self.loss_weights, self.cfg.match
        )
        n = pos.num_seg
        slot = dec.logits[:n].detach().argmax(1)  # each [SEG]'s most confident prediction
        item = torch.arange(n, device=slot.device)
        pred = self._upsample(dec.masks[item, slot].detach())
        return DecodedBatch(
            loss, terms, list(pred.split(counts)),
            pred_boxes=list(dec.boxes[item, slot].detach().split(counts)), exists=dec.exists[n:].detach(),
        )

    def predict(self, ids, seg, starts, hidden, image_embeddings) -> list[dict]:
        """Per generated [SEG]: the union of its predictions with objectness above the threshold (at
        least its best one); every mask of a sample whose exists probability is not above the threshold
        is emptied (gRefCOCO: no target, no mask). Boxes: all predictions, scored objectness x exists."""
        pos = find_positions(ids, seg, starts, self.token_ids)
        dec = self.mg(hidden, pos, image_embeddings)
        n, thr, size = pos.num_seg, self.cfg.score_threshold, self.frame
        exists = dec.exists[n:].float().sigmoid()
        prob = dec.logits[:n].float().sigmoid()  # (n, num)
        keep = prob > thr
        keep[torch.arange(n), prob.argmax(1)] = True
        num = prob.shape[1]
        masks = (self._upsample(dec.masks[:n].flatten(0, 1)) > 0).view(n, num, size, size)
        masks = (masks & keep[:, :, None, None]).any(1)
        b_idx = pos.b_idx[:n]
        masks &= (exists[b_idx] > thr)[:, None, None]
        boxes = cxcywh_to_xyxy(dec.boxes[:n].float()).clamp(0, 1) * size
        scores = prob * exists[b_idx][:, None]
        counts = seg.sum(1).tolist()
        return [
            {"masks": m, "boxes": bx.reshape(-1, 4).cpu(), "box_scores": sc.reshape(-1).cpu(), "exists": float(e)}
            for m, bx, sc, e in zip(masks.split(counts), boxes.split(counts), scores.split(counts), exists)
        ]

    def _upsample(self, low_res: torch.Tensor) -> torch.Tensor:
        """(N, h, w) mask logits -> (N, S, S), bilinear as the sam decoder's."""
        size = (self.frame, self.frame)
        return F.interpolate(low_res[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def make_mask_decoder(cfg: ModelConfig, segmenter: SamSegmenter, llm_width: int, dtype: torch.dtype, token_ids: dict[str, int]) -> MaskDecoder:
    """The one place that reads mask_decoder.kind (launcher.config validates its choices)."""
    if cfg.mask_decoder.kind == "multigranular":
        return MultiGranularPromptDecoder(segmenter, llm_width, cfg, dtype, token_ids)
    return SamPromptDecoder(segmenter, llm_width, cfg, dtype)


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

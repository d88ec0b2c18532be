"""MVP-LM's dynamic query generation for the multi-granularity decoder.

Every LLM query position (a [SEG], or one "exists" position per sample) becomes `num` decoder queries:
base (an MLP of its last hidden state, plus a learned slot embedding per query) + residual (the top-`num`
multi-scale memory features of its image most similar to its phrase/instruction embedding, weighted by
that similarity so the instruction projection learns). Either part can be switched off (ablations).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from modeling.config import QueryConfig


@dataclass
class QueryPositions:
    """Decoder items of a batch: the [SEG] tokens in row-major order, then one exists item per sample."""

    b_idx: torch.Tensor  # (Q,) sample of each item
    samples: list[int]  # the same as a list (no device sync when reading it)
    t_idx: torch.Tensor  # (Q,) position whose hidden state is the item's query
    spans: list[tuple[int, int]]  # (Q,) [start, end) whose mean hidden state is the phrase/instruction embedding
    num_seg: int  # the first num_seg items are [SEG]s, the remaining B are the exists items


def find_positions(input_ids: torch.Tensor, seg: torch.Tensor, answer_start: torch.Tensor, ids: dict[str, int]) -> QueryPositions:
    """Query positions and embedding spans from the token ids; seg (B, T) marks the [SEG]s that are queries.

    answer_start (B,): index of the first answer token. The exists item's query is the hidden state just
    before it (the end of the prompt, "ASSISTANT:"): the same position in training and in predict(), and
    it has read the whole instruction but none of the answer. Its span is the instruction: the tokens
    after the last image token up to the answer. A [SEG]'s span is the phrase between the `<p>` and `</p>`
    that precede it (after the previous [SEG]); without one, the sample's instruction.
    """
    rows = input_ids.tolist()
    segs = seg.tolist()
    starts = answer_start.tolist()
    seg_b, seg_t, seg_spans, ex_t, ex_spans = [], [], [], [], []
    for b, (row, is_seg, a) in enumerate(zip(rows, segs, starts)):
        a = max(1, min(int(a), len(row)))
        images = [t for t in range(a) if row[t] == ids["<image>"]]
        instruction = (images[-1] + 1 if images and images[-1] + 1 < a else 0, a)
        ex_t.append(a - 1)
        ex_spans.append(instruction)
        last_seg, p_start, p_end = -1, -1, -1
        for t, tok in enumerate(row):
            if tok == ids["<p>"]:
                p_start = t
            elif tok == ids["</p>"]:
                p_end = t
            elif is_seg[t]:
                phrase = last_seg < p_start < p_end - 1
                seg_b.append(b)
                seg_t.append(t)
                seg_spans.append((p_start + 1, p_end) if phrase else instruction)
                last_seg = t
    n = len(seg_b)
    device = input_ids.device
    b_idx = torch.tensor(seg_b + list(range(len(rows))), dtype=torch.long, device=device)
    t_idx = torch.tensor(seg_t + ex_t, dtype=torch.long, device=device)
    return QueryPositions(b_idx, seg_b + list(range(len(rows))), t_idx, seg_spans + ex_spans, n)


class QueryGenerator(nn.Module):
    def __init__(self, llm_width: int, dim: int, cfg: QueryConfig):
        super().__init__()
        if not (cfg.base or cfg.residual):
            raise ValueError("mask_decoder.queries: base and residual cannot both be off")
        self.num = cfg.num
        self.slots = nn.Embedding(cfg.num, dim)  # tells the `num` queries of one position apart
        # MGLMM's psi (Linear-GELU-Linear), as the sam decoder's text_hidden_fcs
        self.base = nn.Sequential(nn.Linear(llm_width, llm_width), nn.GELU(), nn.Linear(llm_width, dim)) if cfg.base else None
        if cfg.residual:
            self.instruction = nn.Linear(llm_width, dim)  # phrase/instruction embedding -> memory space
            self.residual = nn.Linear(dim, dim)
        else:
            self.instruction = self.residual = None

    def forward(self, hidden: torch.Tensor, pos: QueryPositions, memory: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, w) last LLM layer, memory (B, S, d) -> queries (Q, num, d)."""
        q = len(pos.b_idx)
        slots = self.slots(torch.arange(self.num, device=hidden.device))
        queries = slots.unsqueeze(0).expand(q, -1, -1)
        if self.base is not None:
            queries = queries + self.base(hidden[pos.b_idx, pos.t_idx].to(slots.dtype)).unsqueeze(1)
        if self.residual is not None:
            spans = torch.stack([hidden[b, s:e].mean(0) for b, (s, e) in zip(pos.samples, pos.spans)])
            queries = queries + self._residual(self.instruction(spans.to(slots.dtype)), memory, pos.b_idx)
        return queries

    def _residual(self, embedding: torch.Tensor, memory: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """The top-num memory features of each item's own image by scaled dot product with its
        embedding, each times sigmoid(similarity) (the selection itself has no gradient)."""
        b, s, d = memory.shape
        flat = memory.reshape(b * s, d)
        sim = embedding @ flat.T / d**0.5  # (Q, B*S); other images' features are masked out
        own = torch.arange(b * s, device=memory.device) // s == image[:, None]
        top, idx = sim.masked_fill(~own, float("-inf")).topk(self.num, dim=1)
        return self.residual(flat[idx]) * top.sigmoid().unsqueeze(-1)

"""Typed data configuration (composed and validated by launcher/config.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

@dataclass
class SourceConfig:
    name: str = "synthetic"
    path: str = "data/synthetic/train"  # a folder with manifest.json and its tar shards
    weight: float = 1.0


@dataclass
class SyntheticConfig:
    """What `launcher demo` / `launcher data synth` write."""

    out_dir: str = "data/synthetic"
    num_train: int = 4000
    num_val: int = 200
    image_size: int = 64
    seed: int = 1234
    samples_per_shard: int = 500
    # task -> weight of each sample's task (datapipes/synthetic.py); a weight of 0 drops a task
    task_mix: dict[str, float] = field(
        default_factory=lambda: {
            "referring": 0.5,
            "multi_referring": 0.15,
            "empty_referring": 0.1,
            "panoptic_segcap": 0.15,
            "finegrained_segcap": 0.1,
        }
    )


@dataclass
class DataConfig:
    train: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    val: list[SourceConfig] = field(
        default_factory=lambda: [SourceConfig(name="synthetic_val", path="data/synthetic/val")]
    )
    batch_size: int = 8  # per rank, per micro-step
    eval_batch_size: int = 16
    num_workers: int = 1
    # Shards of one source each train reader slot reads at once, samples interleaved (each shard's own
    # samples come in a fresh permutation per visit). More mixes better; a resume scans that many shards' headers.
    open_shards: int = 2
    # Tokens, image placeholders included. A longer sample's answer is cut at a phrase boundary
    # (datapipes/text.py); one that no cut makes fit is skipped (reason too_long).
    max_length: int = 160
    # Train batches carry uint8 CLIP/SAM frames, normalised to float where Batch.model_inputs() runs
    # (on the GPU after batch.to(device)): 4x less to copy and no float work in the loader workers.
    normalize_on_device: bool = False
    # How an image becomes the square CLIP frame: "squash" (resized to the square), or "pad" (first padded
    # to a square with the CLIP mean colour, centred: LLaVA-1.5's preprocessing, which a projector taken
    # from LLaVA expects; configs/train/stage2_from_llava.yaml).
    clip_frame: str = "squash"
    max_bad_fraction: float = 0.01  # the run stops with an error above this rate of skipped samples
    bad_fraction_min_seen: int = 50  # ...checked once a worker has seen this many samples
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

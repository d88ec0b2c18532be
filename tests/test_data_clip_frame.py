"""The CLIP frame of a non-square image: squashed (segcap's default) or padded to a square with the CLIP
mean colour first (LLaVA-1.5's preprocessing, data.clip_frame=pad, for a projector taken from LLaVA)."""

import numpy as np
import pytest
import torch
from PIL import Image

from datapipes.collate import CLIP_MEAN, clip_frame
from launcher.config import ConfigError, load_config

RED = (200, 10, 10)


def test_pad_centres_a_wide_image_between_bands_of_the_clip_mean_colour():
    wide = Image.new("RGB", (40, 20), RED)
    frame = clip_frame(wide, 20, pad=True)  # 40x40 square, image at rows 10-29, then halved (bicubic)
    mean = torch.tensor([int(m * 255) for m in CLIP_MEAN], dtype=torch.uint8)
    assert frame.shape == (3, 20, 20) and frame.dtype == torch.uint8
    assert (frame[:, :3] == mean[:, None, None]).all() and (frame[:, 17:] == mean[:, None, None]).all()
    assert (frame[:, 7:13] == torch.tensor(RED, dtype=torch.uint8)[:, None, None]).all()  # edges blend


def test_pad_centres_a_tall_image_between_side_bands():
    tall = Image.new("RGB", (10, 30), RED)
    frame = clip_frame(tall, 30, pad=True)
    assert (frame[0, :, :10] == int(CLIP_MEAN[0] * 255)).all() and (frame[0, :, 10:20] == RED[0]).all()
    assert (frame[0, :, 20:] == int(CLIP_MEAN[0] * 255)).all()


def test_squash_is_the_default_and_fills_the_frame():
    frame = clip_frame(Image.new("RGB", (40, 20), RED), 20)
    assert (frame == torch.tensor(RED, dtype=torch.uint8)[:, None, None]).all()
    square = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    assert torch.equal(clip_frame(square, 16, pad=True), clip_frame(square, 16))  # a square is left as it is


def test_the_llava_stage2_config_pads_and_other_values_are_refused():
    assert load_config("configs/train/stage2_from_llava.yaml").data.clip_frame == "pad"
    assert load_config("configs/train/stage2.yaml").data.clip_frame == "squash"
    with pytest.raises(ConfigError, match=r"data.clip_frame='crop'.*\['squash', 'pad'\]"):
        load_config("configs/train/tiny.yaml", ["data.clip_frame=crop"])

"""Flow-GRPO's JPEG (in)compressibility rewards on known images: flat compresses better than noise,
the two rewards are the same measure with Flow-GRPO's scaling, float and uint8 inputs agree, and the
config registers both names."""

import io

import pytest
import torch
from PIL import Image

from tempflow_fast.rewards import REWARD_NAMES, RewardConfig, build_reward
from tempflow_fast.rewards.jpeg import jpeg_size_kb


def known_images():
    """(4, 3, 64, 48) float in [0, 1], exact multiples of 1/255: flat grey, a smooth ramp, stripes, noise."""
    g = torch.Generator().manual_seed(0)
    flat = torch.full((3, 64, 48), 128.0)
    ramp = torch.linspace(0, 255, 48).round().expand(3, 64, 48)
    stripes = (torch.arange(48) % 8 < 4).float().mul(255).expand(3, 64, 48)
    noise = torch.randint(0, 256, (3, 64, 48), generator=g).float()
    return torch.stack([flat, ramp, stripes, noise]) / 255


def test_sizes_are_pil_quality_95_jpeg_kilobytes():
    images = known_images()
    expected = []
    for array in (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy():
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="JPEG", quality=95)
        expected.append(len(buf.getvalue()) / 1000)
    assert jpeg_size_kb(images).tolist() == pytest.approx(expected, rel=1e-6)
    assert jpeg_size_kb(images, quality=50)[3] < jpeg_size_kb(images)[3]  # the quality is really used


def test_flat_compresses_better_than_noise_and_the_rewards_rank_accordingly():
    images, prompts = known_images(), ["a flat grey", "a ramp", "stripes", "noise"]
    incompressibility = build_reward(RewardConfig(name="jpeg_incompressibility"))
    compressibility = build_reward(RewardConfig(name="jpeg_compressibility"))
    up, down = incompressibility(images, prompts), compressibility(images, prompts)
    assert up.dtype == down.dtype == torch.float32 and up.shape == (4,)
    assert up[0] < up[1] < up[3] and up[2] < up[3]  # flat < ramp < noise; stripes < noise
    assert up[3] > 5 * up[0]
    assert down.argmax() == 0 and down.argmin() == 3
    torch.testing.assert_close(down, -up / 500)  # Flow-GRPO: compressibility = -incompressibility / 500
    assert incompressibility.name == "jpeg_incompressibility" and compressibility.name == "jpeg_compressibility"


def test_float_and_uint8_inputs_of_one_image_score_the_same():
    images = known_images()
    as_uint8 = (images * 255).round().to(torch.uint8)
    reward = build_reward(RewardConfig(name="jpeg_incompressibility"))
    assert reward.accepts_uint8  # the trainer hands uint8 images only to rewards that say so
    torch.testing.assert_close(reward(as_uint8, ["p"] * 4), reward(images, ["p"] * 4), rtol=0, atol=0)
    # floats off the uint8 grid round as Flow-GRPO rounds them: x·255 → nearest integer
    nudged = images + 0.3 / 255 * torch.sign(torch.randn(images.shape, generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(reward(nudged.clamp(0, 1), ["p"] * 4), reward(as_uint8, ["p"] * 4), rtol=0, atol=0)
    assert reward(images.double(), ["p"] * 4).dtype == torch.float32


def test_bad_inputs_are_clear_errors():
    reward = build_reward(RewardConfig(name="jpeg_compressibility"))
    with pytest.raises(ValueError, match=r"must be a \(B, 3, H, W\) tensor, got \(2, 1, 8, 8\)"):
        reward(torch.rand(2, 1, 8, 8), ["a", "b"])
    with pytest.raises(ValueError, match="float in \\[0, 1\\] or uint8 in 0..255, got dtype torch.int64"):
        reward(torch.zeros(1, 3, 8, 8, dtype=torch.long), ["a"])
    with pytest.raises(ValueError, match="prompts must be a list of 2 strings"):
        reward(torch.rand(2, 3, 8, 8), ["a"])


def test_registered_in_the_config_and_usable_in_a_composite():
    assert {"jpeg_compressibility", "jpeg_incompressibility"} <= set(REWARD_NAMES)
    with pytest.raises(ValueError, match="scale applies to"):
        RewardConfig(name="jpeg_compressibility", scale=2.0).validate()
    composite = build_reward(RewardConfig(name="composite", normalize="none", components=[
        RewardConfig(name="jpeg_incompressibility", weight=2.0), RewardConfig(name="jpeg_compressibility")]))
    images = known_images()
    up = jpeg_size_kb(images)
    torch.testing.assert_close(composite(images, ["p"] * 4), 2 * up - up / 500)

"""The tiny FLUX adapter: interface, packing, timestep convention, save/load round-trip."""

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel

from tempflow_fast.models.base import FlowModelAdapter, select_cond
from tempflow_fast.models.tiny_flux import TinyFluxAdapter, pack, unpack
from tempflow_fast.tasks.shapes.task import new_model
from tempflow_fast.tasks.shapes.render import render

PROMPTS = ["two red squares", "a blue square above a yellow square", "green squares"]


@pytest.fixture(scope="module")
def model():
    return new_model(seed=3)


def test_interface_and_shapes(model):
    assert isinstance(model, FlowModelAdapter)
    assert isinstance(model.module.transformer, FluxTransformer2DModel)
    assert model.latent_shape == (64, 12) and model.image_seq_len == 64
    # One module holds every trainable parameter (LoRA / EMA / full fine-tune act on it).
    names = {n.split(".")[0] for n, _ in model.module.named_parameters()}
    assert names == {"transformer", "text_encoder"}
    n_params = sum(p.numel() for p in model.module.parameters())
    assert 1.5e6 < n_params < 2.2e6
    cond = model.encode_prompts(PROMPTS)
    x = torch.randn(3, 64, 12, generator=torch.Generator().manual_seed(0))
    v = model.velocity(x, torch.tensor([1.0, 0.5, 0.1]), cond)
    assert v.shape == x.shape and torch.isfinite(v).all()
    # Rows are independent: the velocity of row 1 alone equals row 1 of the batch.
    v1 = model.velocity(x[1:2], torch.tensor([0.5]), select_cond(cond, torch.tensor([1])))
    torch.testing.assert_close(v1, v[1:2], rtol=1e-4, atol=1e-5)


def test_sigma_is_the_flux_timestep(model):
    # diffusers' Flux transformer scales `timestep` by 1000 itself: our σ must reach it unscaled.
    cond = model.encode_prompts(PROMPTS[:1])
    x = torch.randn(1, 64, 12, generator=torch.Generator().manual_seed(1))
    seen = {}

    def spy(module, args):
        seen["t"] = args[0].clone()

    handle = model.module.transformer.time_text_embed.register_forward_pre_hook(spy)
    try:
        model.velocity(x, torch.tensor([0.25]), cond)
    finally:
        handle.remove()
    torch.testing.assert_close(seen["t"], torch.tensor([250.0]))


def test_pack_roundtrip_and_decode(model):
    images = render(PROMPTS, np.random.default_rng(0))
    assert torch.equal(unpack(pack(images)), images)
    x = model.encode_images(images)
    assert x.shape == (3, 64, 12) and x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(model.decode(x), images)
    # Token 0 holds the top-left 2×2 patch, channel-major as FLUX's _pack_latents.
    torch.testing.assert_close(x[0, 0].view(3, 2, 2), images[0, :, :2, :2] * 2 - 1)


def test_save_load_roundtrip(model, tmp_path):
    with torch.no_grad():
        for p in model.module.parameters():  # move off the init so the test sees real weights
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    model.save_pretrained(tmp_path)
    loaded = TinyFluxAdapter.from_pretrained(tmp_path)
    cond = model.encode_prompts(PROMPTS)
    x = torch.randn(3, 64, 12, generator=torch.Generator().manual_seed(2))
    s = torch.tensor([0.9, 0.4, 0.05])
    assert torch.equal(model.velocity(x, s, cond), loaded.velocity(x, s, loaded.encode_prompts(PROMPTS)))
    assert loaded.vocab == model.vocab
    fresh = new_model(seed=4)
    assert not torch.equal(fresh.velocity(x, s, fresh.encode_prompts(PROMPTS)), model.velocity(x, s, cond))


def test_bad_input_raises(model, tmp_path):
    with pytest.raises(ValueError, match="'purple'"):
        model.encode_prompts(["a purple square"])
    with pytest.raises(ValueError, match="x must be"):
        model.velocity(torch.zeros(2, 16, 12), torch.zeros(2), model.encode_prompts(PROMPTS[:2]))
    with pytest.raises(ValueError, match="sigma"):
        model.velocity(torch.zeros(2, 64, 12), torch.zeros(3), model.encode_prompts(PROMPTS[:2]))
    with pytest.raises(ValueError, match="directory"):
        TinyFluxAdapter.from_pretrained(tmp_path / "nothing")

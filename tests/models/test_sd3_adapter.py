"""The SD3 adapter on a tiny random StableDiffusion3Pipeline folder: CFG in one batch, diffusers'
conventions, the dispatcher attention processor, rollout."""

import pytest
import torch

from tempflow_fast.models.attention import DispatchJointAttnProcessor, set_attention_backend
from tempflow_fast.models.base import FlowModelAdapter
from tempflow_fast.models.loading import load_adapter
from tempflow_fast.models.sd3 import SD3_LORA_TARGETS
from tempflow_fast.sampling.engine import rollout
from tempflow_fast.sampling.plans import Bifurcation
from tempflow_fast.sampling.schedules import flow_sigmas
from tempflow_fast.sampling.simple import sample
from tests.models.tiny_pipelines import RESOLUTION, TEXT_LEN, make_tiny_sd3_pipeline

PROMPTS = ["two red squares", "a blue circle above a cat"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "pipe")


def _load(folder, **kw):
    kw = {"dtype": "float32", "resolution": RESOLUTION, "max_sequence_length": TEXT_LEN, **kw}
    return load_adapter("sd3", str(folder), **kw)


@pytest.fixture(scope="module")
def model(folder):
    return _load(folder)


def _forward(model, x, sigma, embeds, pooled):
    return model.module(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=embeds,
                        pooled_projections=pooled, return_dict=False)[0]


def test_interface_and_shapes(model):
    assert isinstance(model, FlowModelAdapter)
    assert model.latent_shape == (4, 4, 4) and model.image_seq_len == 4
    cond = model.encode_prompts(PROMPTS)
    # 16 CLIP tokens (two CLIPs side by side, zero-padded to the T5 width) + 16 T5 tokens.
    assert cond["prompt_embeds"].shape == (2, 2 * TEXT_LEN, 32) and cond["pooled_projections"].shape == (2, 32)
    x = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    v = model.velocity(x, torch.tensor([0.9, 0.4]), cond)
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()


def test_cfg_one_batch_equals_two_forwards(model):
    cond = model.encode_prompts(PROMPTS)
    neg = model.encode_prompts(["", ""])
    x = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.7, 0.3])
    with torch.no_grad():
        v = model.velocity(x, sigma, cond)
        v_cond = _forward(model, x, sigma, cond["prompt_embeds"], cond["pooled_projections"])
        v_unc = _forward(model, x, sigma, neg["prompt_embeds"], neg["pooled_projections"])
    torch.testing.assert_close(v, v_unc + 4.5 * (v_cond - v_unc), atol=1e-5, rtol=1e-5)
    assert (v - v_cond).abs().max() > 1e-3  # guidance is really applied
    model.guidance_scale = 1.0  # g <= 1: a single conditional forward, as the pipeline does
    try:
        with torch.no_grad():
            torch.testing.assert_close(model.velocity(x, sigma, cond), v_cond, atol=1e-6, rtol=1e-6)
    finally:
        model.guidance_scale = 4.5


def test_sampling_matches_sd3_pipeline(model):
    """Same noise and schedule: our ODE sampler + decode reproduces the pipeline's CFG images."""
    lat = torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(2))
    ref = model.pipeline(PROMPTS[:1], height=RESOLUTION, width=RESOLUTION, num_inference_steps=3, guidance_scale=4.5,
                         max_sequence_length=TEXT_LEN, latents=lat, output_type="pt").images
    ours = model.decode(sample(model, model.encode_prompts(PROMPTS[:1]), lat, flow_sigmas(3, shift=3.0)))
    torch.testing.assert_close(ours, ref.float(), atol=1e-5, rtol=0)


def test_dispatch_processor_matches_joint_attention(folder):
    m = _load(folder)
    cond = m.encode_prompts(PROMPTS)
    x = torch.randn(2, *m.latent_shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = m.velocity(x, torch.tensor([0.6, 0.2]), cond)
        set_attention_backend(m.module, "native")
        after = m.velocity(x, torch.tensor([0.6, 0.2]), cond)
    procs = [mod.processor for mod in m.module.modules() if hasattr(mod, "processor")]
    assert procs and all(isinstance(p, DispatchJointAttnProcessor) for p in procs)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)


def test_decode_range(model):
    x = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(4))
    img = model.decode(x)
    assert img.shape == (2, 3, RESOLUTION, RESOLUTION) and img.min() >= 0 and img.max() <= 1
    cfg = model.vae.config
    raw = model.vae.decode(x / cfg.scaling_factor + cfg.shift_factor).sample
    torch.testing.assert_close(img, (raw / 2 + 0.5).clamp(0, 1))
    assert model.encode_images(img).shape == x.shape


def test_release_keeps_negative_prompt(folder):
    m = _load(folder)
    m.cache_prompts(PROMPTS)
    x = torch.randn(2, *m.latent_shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        v = m.velocity(x, torch.tensor([0.5, 0.5]), m.encode_prompts(PROMPTS))
        m.release_text_encoders()
        assert m.pipeline.text_encoder is None and m.pipeline.text_encoder_3 is None
        torch.testing.assert_close(m.velocity(x, torch.tensor([0.5, 0.5]), m.encode_prompts(PROMPTS)), v)
    with pytest.raises(ValueError, match="not cached"):
        m.encode_prompts(["a new prompt"])


def test_bifurcation_rollout_deterministic(model):
    plan = Bifurcation(num_steps=4, seeds_per_prompt=2, branches=2, bifurcation_steps=(0, 2), shift=3.0)
    a = rollout(model, PROMPTS, plan, seed=11)
    b = rollout(model, PROMPTS, plan, seed=11)
    assert a.images[1].shape == (16, 3, RESOLUTION, RESOLUTION) and a.states.latents.shape[1:] == (4, 4, 4)
    assert torch.isfinite(a.samples.old_log_prob).all()
    torch.testing.assert_close(a.images[1], b.images[1], atol=0, rtol=0)


def test_lora_targets_exist(folder):
    from peft import LoraConfig

    m = _load(folder)
    names = [n for n, _ in m.module.named_modules()]
    for t in SD3_LORA_TARGETS:
        assert any(n.endswith("." + t) for n in names), t
    m.module.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=list(SD3_LORA_TARGETS)))
    assert any("lora_A" in n for n, _ in m.module.named_parameters())


def test_save_pretrained_round_trip(folder, tmp_path):
    m = _load(folder)
    with torch.no_grad():
        for p in m.module.proj_out.parameters():
            p.add_(0.01)
    m.save_pretrained(tmp_path / "out")
    back = _load(tmp_path / "out")
    x = torch.randn(1, *m.latent_shape, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(back.velocity(x, torch.tensor([0.5]), back.encode_prompts(PROMPTS[:1])),
                                   m.velocity(x, torch.tensor([0.5]), m.encode_prompts(PROMPTS[:1])))

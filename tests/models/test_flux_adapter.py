"""The FLUX adapter on a tiny random FluxPipeline folder: diffusers' conventions, cache, rollout."""

import pytest
import torch

from tempflow_fast.models.base import FlowModelAdapter
from tempflow_fast.models.flux import FLUX_LORA_TARGETS, latent_image_ids, pack_latents, unpack_latents
from tempflow_fast.models.loading import load_adapter
from tempflow_fast.sampling.engine import rollout
from tempflow_fast.sampling.plans import Bifurcation
from tempflow_fast.sampling.schedules import flow_sigmas
from tempflow_fast.sampling.simple import sample
from tests.models.tiny_pipelines import RESOLUTION, TEXT_LEN, make_tiny_flux_pipeline

PROMPTS = ["two red squares", "a blue circle above a cat"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_flux_pipeline(tmp_path_factory.mktemp("flux") / "pipe")


def _load(folder, **kw):
    kw = {"dtype": "float32", "resolution": RESOLUTION, "max_sequence_length": TEXT_LEN, **kw}
    return load_adapter("flux", str(folder), **kw)


@pytest.fixture(scope="module")
def model(folder):
    return _load(folder)


def test_interface_and_shapes(model):
    assert isinstance(model, FlowModelAdapter)
    # 32 px / VAE factor 8 = 4×4 latent of 4 channels → 2×2 packed tokens of 16 channels.
    assert model.latent_shape == (4, 16) and model.image_seq_len == 4
    cond = model.encode_prompts(PROMPTS)
    assert cond["prompt_embeds"].shape == (2, TEXT_LEN, 32) and cond["pooled_projections"].shape == (2, 32)
    x = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    v = model.velocity(x, torch.tensor([0.9, 0.4]), cond)
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
    # Rows are independent: row 1 alone gives the same velocity as in the batch.
    v1 = model.velocity(x[1:], torch.tensor([0.4]), {k: t[1:] for k, t in cond.items()})
    torch.testing.assert_close(v1, v[1:], atol=1e-5, rtol=1e-5)


def test_packing_matches_pipeline(model):
    from diffusers import FluxPipeline

    lat = torch.randn(3, 4, 6, 8)
    torch.testing.assert_close(pack_latents(lat), FluxPipeline._pack_latents(lat, 3, 4, 6, 8), atol=0, rtol=0)
    torch.testing.assert_close(unpack_latents(pack_latents(lat), 6, 8), lat, atol=0, rtol=0)
    torch.testing.assert_close(latent_image_ids(6, 8), FluxPipeline._prepare_latent_image_ids(1, 3, 4, "cpu",
                                                                                                torch.float32))


def test_sampling_matches_flux_pipeline(model):
    """Same noise, same schedule: our ODE sampler + decode reproduces FluxPipeline's images, which
    pins the timestep convention (σ passed as t/1000), the guidance embedding, ids and VAE scaling."""
    lat = torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(1))
    ref = model.pipeline(PROMPTS[:1], height=RESOLUTION, width=RESOLUTION, num_inference_steps=3, guidance_scale=3.5,
                         max_sequence_length=TEXT_LEN, latents=lat, output_type="pt").images
    sigmas = flow_sigmas(3, image_seq_len=model.image_seq_len, dynamic_shift=True)
    ours = model.decode(sample(model, model.encode_prompts(PROMPTS[:1]), lat, sigmas))
    torch.testing.assert_close(ours, ref.float(), atol=1e-5, rtol=0)


def test_guidance_embedding_changes_velocity(model):
    cond = model.encode_prompts(PROMPTS[:1])
    x = torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(2))
    v_a = model.velocity(x, torch.tensor([0.5]), cond)
    model.guidance_scale = 1.0
    try:
        v_b = model.velocity(x, torch.tensor([0.5]), cond)
    finally:
        model.guidance_scale = 3.5
    assert (v_a - v_b).abs().max() > 1e-4


def test_decode_range_and_vae_convention(model):
    x = 0.3 * torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(3))
    img = model.decode(x)
    assert img.shape == (2, 3, RESOLUTION, RESOLUTION) and img.dtype == torch.float32
    assert img.min() >= 0 and img.max() <= 1
    cfg = model.vae.config
    raw = model.vae.decode(unpack_latents(x, 4, 4) / cfg.scaling_factor + cfg.shift_factor).sample
    torch.testing.assert_close(img, (raw / 2 + 0.5).clamp(0, 1))
    assert model.encode_images(img).shape == x.shape


def test_prompt_cache_and_release(folder):
    m = _load(folder)
    calls = []
    encode = m.cache._encode
    m.cache._encode = lambda p: calls.append(list(p)) or encode(p)
    first = m.encode_prompts(PROMPTS)
    again = m.encode_prompts(PROMPTS[::-1])
    assert calls == [PROMPTS]  # encoded once, then served from the cache in any order
    torch.testing.assert_close(again["prompt_embeds"], first["prompt_embeds"].flip(0))
    m.release_text_encoders()
    assert m.pipeline.text_encoder is None and m.pipeline.text_encoder_2 is None
    torch.testing.assert_close(m.encode_prompts(PROMPTS)["pooled_projections"], first["pooled_projections"])
    with pytest.raises(ValueError, match="not cached"):
        m.encode_prompts(["a new prompt"])


def test_bf16_weights_fp32_velocity(folder, model):
    m = _load(folder, dtype="bf16")
    assert m.module.dtype == torch.bfloat16 and next(m.vae.parameters()).dtype == torch.float32
    x = torch.randn(2, *m.latent_shape, generator=torch.Generator().manual_seed(4))
    v = m.velocity(x, torch.tensor([0.8, 0.2]), m.encode_prompts(PROMPTS))
    ref = model.velocity(x, torch.tensor([0.8, 0.2]), model.encode_prompts(PROMPTS))
    assert v.dtype == torch.float32
    assert (v - ref).abs().max() < 0.05 * ref.abs().max()


def test_bifurcation_rollout_deterministic(model):
    plan = Bifurcation(num_steps=4, seeds_per_prompt=2, branches=2, bifurcation_steps=(0, 2))
    a = rollout(model, PROMPTS, plan, seed=7)
    b = rollout(model, PROMPTS, plan, seed=7)
    assert a.images[1].shape == (2 * 2 * 2 * 2, 3, RESOLUTION, RESOLUTION)
    assert a.stats.total_nfe > 0 and torch.isfinite(a.samples.old_log_prob).all()
    torch.testing.assert_close(a.images[1], b.images[1], atol=0, rtol=0)
    torch.testing.assert_close(a.final_latents[1], b.final_latents[1], atol=0, rtol=0)


def test_lora_targets_exist(folder):
    from peft import LoraConfig

    m = _load(folder)
    names = [n for n, _ in m.module.named_modules()]
    for t in FLUX_LORA_TARGETS:
        assert any(n.endswith("." + t) for n in names), t
    m.module.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=list(FLUX_LORA_TARGETS)))
    assert any("lora_A" in n for n, _ in m.module.named_parameters())


def test_bad_inputs(model):
    cond = model.encode_prompts(PROMPTS)
    with pytest.raises(ValueError, match="x must be"):
        model.velocity(torch.zeros(2, 5, 16), torch.zeros(2), cond)
    with pytest.raises(ValueError, match="sigma must be"):
        model.velocity(torch.zeros(2, 4, 16), torch.zeros(3), cond)
    with pytest.raises(ValueError, match="cond batch"):
        model.velocity(torch.zeros(1, 4, 16), torch.zeros(1), cond)
    with pytest.raises(ValueError, match="single str"):
        model.encode_prompts("two red squares")


def test_save_pretrained_round_trip(folder, tmp_path):
    """Export writes a pipeline folder with `module` as the transformer (the trainer passes a
    LoRA-merged copy); the text encoders must still exist (offloaded is fine, released is not)."""
    m = _load(folder)
    with torch.no_grad():
        for p in m.module.proj_out.parameters():
            p.add_(0.01)  # a "trained" transformer differs from the source folder
    m.offload_text_encoders("cpu")
    m.save_pretrained(tmp_path / "out")
    back = _load(tmp_path / "out")
    x = torch.randn(1, *m.latent_shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(back.velocity(x, torch.tensor([0.5]), back.encode_prompts(PROMPTS[:1])),
                                   m.velocity(x, torch.tensor([0.5]), m.encode_prompts(PROMPTS[:1])))
    m.release_text_encoders()
    with pytest.raises(ValueError, match="text encoders were released"):
        m.save_pretrained(tmp_path / "again")

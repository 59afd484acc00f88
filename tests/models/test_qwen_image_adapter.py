"""The Qwen-Image adapter on a tiny random QwenImagePipeline folder: diffusers' conventions (timestep, true CFG
with its norm rescale, masked text padding, VAE scaling, Qwen-Image's schedule), cache, rollout, LoRA, export."""

import pytest
import torch

from tempflow_fast.models.base import FlowModelAdapter
from tempflow_fast.models.loading import MODEL_KINDS, load_adapter, lora_defaults
from tempflow_fast.models.qwen_image import QWEN_IMAGE_LORA_TARGETS
from tempflow_fast.sampling.engine import rollout
from tempflow_fast.sampling.plans import Bifurcation
from tempflow_fast.sampling.schedules import model_sigmas
from tempflow_fast.sampling.simple import sample
from tests.models.tiny_qwen_image import RESOLUTION, TEMPLATE_DROP, TEXT_LEN, make_tiny_qwen_image_pipeline

PROMPTS = ["a cat", "two red cars on a road"]  # shorter and longer than max_sequence_length: padding, truncation


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_qwen_image_pipeline(tmp_path_factory.mktemp("qwen") / "pipe")


def _load(folder, **kw):
    kw = {"dtype": "float32", "resolution": RESOLUTION, "max_sequence_length": TEXT_LEN, **kw}
    return load_adapter("qwen_image", str(folder), **kw)


@pytest.fixture(scope="module")
def model(folder):
    return _load(folder)


def test_registered_kind_and_defaults(model):
    assert "qwen_image" in MODEL_KINDS
    assert lora_defaults("qwen_image") == {"target_modules": list(QWEN_IMAGE_LORA_TARGETS), "rank": 64, "alpha": 128}
    assert isinstance(model, FlowModelAdapter)
    # 32 px / VAE factor 4 = 8×8 latent of 4 channels → 4×4 packed tokens of 16 channels
    assert model.latent_shape == (16, 16) and model.image_seq_len == 16
    assert model.text_seq_len == TEXT_LEN and model.cfg_batches == 2 and model.guidance_scale == 4.0
    assert model.compute_dtype == torch.float32 and model.negative_prompt == " "
    assert model.schedule.shift_terminal == 0.02 and model.schedule.max_shift == 0.9


def test_tokenizer_drops_exactly_the_template(model):
    tok, pipe = model.pipeline.tokenizer, model.pipeline
    tokens = tok.convert_ids_to_tokens(tok(pipe.prompt_template_encode.format("a cat"))["input_ids"])
    assert pipe.prompt_template_encode_start_idx == TEMPLATE_DROP
    assert tokens[TEMPLATE_DROP - 2:TEMPLATE_DROP] == ["user", "Ċ"] and tokens[TEMPLATE_DROP] == "a"


def test_prompts_padded_to_a_fixed_length_with_a_mask(model):
    cond = model.encode_prompts(PROMPTS)
    assert cond["prompt_embeds"].shape == (2, TEXT_LEN, 16) and cond["prompt_mask"].dtype == torch.bool
    tok, pipe = model.pipeline.tokenizer, model.pipeline
    lengths = [len(tok(pipe.prompt_template_encode.format(p))["input_ids"]) - TEMPLATE_DROP for p in PROMPTS]
    assert lengths[0] < TEXT_LEN < lengths[1]
    assert cond["prompt_mask"].sum(1).tolist() == [lengths[0], TEXT_LEN]
    assert not cond["prompt_mask"][0, lengths[0]:].any() and cond["prompt_embeds"][0, lengths[0]:].abs().sum() == 0
    embeds, mask = model.pipeline.encode_prompt(PROMPTS[:1], max_sequence_length=TEXT_LEN)
    assert mask is None and embeds.shape[1] == lengths[0]
    torch.testing.assert_close(cond["prompt_embeds"][:1, :lengths[0]], embeds, atol=1e-6, rtol=1e-6)  # batch of 1 vs 2


def test_rows_are_independent(model):
    cond = model.encode_prompts(PROMPTS)
    x = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    v = model.velocity(x, torch.tensor([0.9, 0.4]), cond)
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
    v1 = model.velocity(x[1:], torch.tensor([0.4]), {k: t[1:] for k, t in cond.items()})
    torch.testing.assert_close(v1, v[1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("true_cfg_scale", [4.0, 1.0])
def test_sampling_matches_qwen_image_pipeline(folder, true_cfg_scale):
    """Same noise, same schedule: our ODE sampler + decode reproduces QwenImagePipeline's images for a batch of
    prompts of different lengths (the pipeline pads to the longer, we to max_sequence_length), which pins the
    timestep convention, true CFG with its norm rescale and the negative prompt, the text mask, RoPE shapes, the
    schedule (dynamic shift, terminal stretch) and the VAE's latent scaling."""
    model = _load(folder, guidance_scale=true_cfg_scale)
    lat = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(1))
    ref = model.pipeline(PROMPTS, negative_prompt=" " if true_cfg_scale > 1 else None, true_cfg_scale=true_cfg_scale,
                         height=RESOLUTION, width=RESOLUTION, num_inference_steps=3, max_sequence_length=TEXT_LEN,
                         latents=lat.clone(), output_type="pt").images
    ours = model.decode(sample(model, model.encode_prompts(PROMPTS), lat, model_sigmas(model, 3)))
    torch.testing.assert_close(ours, ref.float(), atol=2e-5, rtol=0)


def test_true_cfg_rescales_to_the_conditional_norm(model):
    cond = model.encode_prompts(PROMPTS[:1])
    x = torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(2))
    guided = model.velocity(x, torch.tensor([0.5]), cond)
    model.guidance_scale = 1.0
    try:
        plain = model.velocity(x, torch.tensor([0.5]), cond)
    finally:
        model.guidance_scale = 4.0
    assert (guided - plain).abs().max() > 1e-4
    torch.testing.assert_close(guided.norm(dim=-1), plain.norm(dim=-1), atol=1e-5, rtol=1e-5)


def test_decode_and_encode_follow_the_vae_convention(model):
    x = 0.3 * torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(3))
    img = model.decode(x)
    assert img.shape == (2, 3, RESOLUTION, RESOLUTION) and img.dtype == torch.float32
    assert img.min() >= 0 and img.max() <= 1
    cfg = model.vae.config
    latents = model.pipeline._unpack_latents(x, RESOLUTION, RESOLUTION, model.pipeline.vae_scale_factor)
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
    raw = model.vae.decode(latents * std + mean).sample[:, :, 0]
    torch.testing.assert_close(img, (raw / 2 + 0.5).clamp(0, 1))
    assert model.encode_images(img).shape == x.shape


def test_prompt_cache_and_release(folder):
    m = _load(folder)
    first = m.encode_prompts(PROMPTS)
    m.release_text_encoders()
    assert m.pipeline.text_encoder is None
    torch.testing.assert_close(m.encode_prompts(PROMPTS)["prompt_embeds"], first["prompt_embeds"])
    x = torch.randn(2, *m.latent_shape, generator=torch.Generator().manual_seed(4))
    assert torch.isfinite(m.velocity(x, torch.tensor([0.7, 0.3]), first)).all()  # the negative prompt was kept
    with pytest.raises(ValueError, match="not cached"):
        m.encode_prompts(["a new prompt"])


def test_bf16_weights_fp32_velocity(folder, model):
    m = _load(folder, dtype="bf16")
    assert m.module.dtype == torch.bfloat16 and next(m.vae.parameters()).dtype == torch.float32
    x = torch.randn(2, *m.latent_shape, generator=torch.Generator().manual_seed(5))
    v = m.velocity(x, torch.tensor([0.8, 0.2]), m.encode_prompts(PROMPTS))
    ref = model.velocity(x, torch.tensor([0.8, 0.2]), model.encode_prompts(PROMPTS))
    assert v.dtype == torch.float32 and (v - ref).abs().max() < 0.05 * ref.abs().max()


def test_bifurcation_rollout_deterministic(model):
    plan = Bifurcation(num_steps=4, seeds_per_prompt=2, branches=2, bifurcation_steps=(0, 2))
    a = rollout(model, PROMPTS, plan, seed=7)
    b = rollout(model, PROMPTS, plan, seed=7)
    assert a.images[1].shape == (2 * 2 * 2 * 2, 3, RESOLUTION, RESOLUTION)
    assert a.stats.total_nfe > 0 and torch.isfinite(a.samples.old_log_prob).all()
    torch.testing.assert_close(a.images[1], b.images[1], atol=0, rtol=0)


def test_lora_targets_exist(folder):
    from peft import LoraConfig

    m = _load(folder)
    names = [n for n, _ in m.module.named_modules()]
    for t in QWEN_IMAGE_LORA_TARGETS:
        assert any(n.endswith("." + t) for n in names), t
    m.module.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=list(QWEN_IMAGE_LORA_TARGETS)))
    assert any("lora_A" in n for n, _ in m.module.named_parameters())


def test_bad_settings(folder, model):
    with pytest.raises(ValueError, match="resolution must be a positive multiple of 8"):
        _load(folder, resolution=36)
    with pytest.raises(ValueError, match="max_sequence_length must be in 1..1024"):
        _load(folder, max_sequence_length=2048)
    with pytest.raises(ValueError, match="x must be"):
        model.velocity(torch.zeros(2, 5, 16), torch.zeros(2), model.encode_prompts(PROMPTS))


def test_save_pretrained_round_trip(folder, tmp_path):
    m = _load(folder)
    with torch.no_grad():
        for p in m.module.proj_out.parameters():
            p.add_(0.01)
    m.offload_text_encoders("cpu")
    m.save_pretrained(tmp_path / "out")
    back = _load(tmp_path / "out")
    x = torch.randn(1, *m.latent_shape, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(back.velocity(x, torch.tensor([0.5]), back.encode_prompts(PROMPTS[:1])),
                                   m.velocity(x, torch.tensor([0.5]), m.encode_prompts(PROMPTS[:1])))


def test_a_pipeline_object_gets_the_adapter(folder):
    from diffusers import QwenImagePipeline

    from tempflow_fast.models.loading import adapter_for_pipeline
    from tempflow_fast.models.qwen_image import QwenImageAdapter

    pipe = QwenImagePipeline.from_pretrained(folder)
    m = adapter_for_pipeline(pipe, resolution=RESOLUTION, max_sequence_length=TEXT_LEN)
    assert isinstance(m, QwenImageAdapter) and m.module is pipe.transformer
    assert not any(p.requires_grad for p in pipe.text_encoder.parameters())


def test_attention_backends_without_masks_are_kept_off_qwen_image(model):
    import torch as _torch

    from tempflow_fast.config import load_config
    from tempflow_fast.models.attention import default_attention_backends, set_attention_backend
    from tempflow_fast.training.train_config import Config

    # the padded text needs a mask: flash kernels refuse one, so the default update backend on a GPU differs
    assert default_attention_backends("cuda", _torch.bfloat16, kind="qwen_image") == ("sdpa_efficient", "native")
    assert default_attention_backends("cuda", _torch.bfloat16, kind="flux") == ("sdpa_flash", "native")
    with pytest.raises(ValueError, match="takes no attention mask"):
        set_attention_backend(model.module, "sdpa_flash")
    for field in ("attention_backend", "rollout_attention_backend"):
        with pytest.raises(ValueError, match=f"'model.{field}': 'sdpa_flash' takes no attention mask"):
            load_config(Config, None, ["model.kind=qwen_image", f"model.{field}=sdpa_flash"])
    load_config(Config, None, ["model.kind=qwen_image", "model.attention_backend=sdpa_efficient"])
    load_config(Config, None, ["model.kind=flux", "model.attention_backend=sdpa_flash"])

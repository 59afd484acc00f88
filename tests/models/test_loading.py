"""load_adapter (kinds, errors, speed switches), attention-backend errors, and the dry-run estimates."""

import importlib.util

import pytest
import torch

from tempflow_fast.models.flux import FLUX_LORA_TARGETS
from tempflow_fast.models.loading import MODEL_KINDS, load_adapter, lora_defaults, resolve_dtype
from tempflow_fast.models.memory import dry_run_lines, estimate_for, estimate_memory, nfe_per_iteration, pipeline_spec
from tempflow_fast.tasks.shapes.task import new_model
from tempflow_fast.sampling.engine import rollout
from tempflow_fast.sampling.plans import Bifurcation, SingularSDE
from tests.models.tiny_pipelines import RESOLUTION, TEXT_LEN, make_tiny_flux_pipeline, make_tiny_sd3_pipeline


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return make_tiny_flux_pipeline(tmp_path_factory.mktemp("flux") / "pipe")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    new_model(seed=1).save_pretrained(path)
    return path


def _flux(flux_dir, **kw):
    return load_adapter("flux", str(flux_dir), dtype="float32", resolution=RESOLUTION,
                        max_sequence_length=TEXT_LEN, **kw)


def test_tiny_flux_kind_loads_by_path(tiny_dir):
    m = load_adapter("tiny_flux", str(tiny_dir))
    ref = new_model(seed=1)
    for (n, p), (_, q) in zip(m.module.named_parameters(), ref.module.named_parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0, msg=n)


def test_argument_errors(tiny_dir, flux_dir):
    with pytest.raises(ValueError, match="kind must be one of"):
        load_adapter("sdxl", str(flux_dir))
    with pytest.raises(ValueError, match="needs path"):
        load_adapter("flux", None)
    with pytest.raises(ValueError, match="fixed 16×16"):
        load_adapter("tiny_flux", str(tiny_dir), resolution=512)
    with pytest.raises(ValueError, match="float32 only"):
        load_adapter("tiny_flux", str(tiny_dir), dtype="bf16")
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("int8", torch.float32)
    with pytest.raises(ValueError, match="resolution must be a positive multiple of 16"):
        load_adapter("flux", str(flux_dir), dtype="float32", resolution=40)
    assert set(MODEL_KINDS) == {"tiny_flux", "flux", "sd3", "qwen_image"}


def test_attention_backend_errors(tiny_dir):
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        load_adapter("tiny_flux", str(tiny_dir), attention_backend="fastest")
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ValueError, match=r"'flash' is not available here: install flash-attn"):
            load_adapter("tiny_flux", str(tiny_dir), attention_backend="flash")
    if importlib.util.find_spec("xformers") is None:
        with pytest.raises(ValueError, match=r"'xformers' is not available here: install xformers"):
            load_adapter("tiny_flux", str(tiny_dir), attention_backend="xformers")


def test_gradient_checkpointing_same_gradients(flux_dir):
    plain, ckpt = _flux(flux_dir), _flux(flux_dir, gradient_checkpointing=True)
    assert ckpt.module.gradient_checkpointing and not plain.module.gradient_checkpointing
    x = torch.randn(2, *plain.latent_shape, generator=torch.Generator().manual_seed(0))
    grads = []
    for m in (plain, ckpt):
        m.module.train()
        m.velocity(x, torch.tensor([0.7, 0.2]), m.encode_prompts(["a", "b"])).square().mean().backward()
        grads.append(m.module.proj_out.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_compiled_blocks_with_lora_match_eager(flux_dir):
    """Regional compilation is lazy: LoRA attached after loading is traced into the compiled blocks."""
    from peft import LoraConfig

    eager = _flux(flux_dir)
    compiled = _flux(flux_dir, compile_blocks={"backend": "eager"}, attention_backend="native")
    for m in (eager, compiled):
        torch.manual_seed(0)
        m.module.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=list(FLUX_LORA_TARGETS),
                                        init_lora_weights="gaussian"))
    blocks = list(compiled.module.transformer_blocks) + list(compiled.module.single_transformer_blocks)
    assert all(b._compiled_call_impl is not None for b in blocks)
    x = torch.randn(2, *eager.latent_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = eager.velocity(x, torch.tensor([0.5, 0.1]), eager.encode_prompts(["a", "b"]))
        b = compiled.velocity(x, torch.tensor([0.5, 0.1]), compiled.encode_prompts(["a", "b"]))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_lora_defaults():
    flux, sd3 = lora_defaults("flux"), lora_defaults("sd3")
    assert flux["rank"] == 64 and flux["alpha"] == 128 and "ff.net.0.proj" in flux["target_modules"]
    assert sd3["rank"] == 32 and sd3["alpha"] == 64 and not any("ff" in t for t in sd3["target_modules"])
    with pytest.raises(ValueError, match="kind must be one of"):
        lora_defaults("sdxl")


def test_memory_counts_match_real_modules(flux_dir):
    """Parameter and LoRA counts from config + safetensors headers equal the loaded model's."""
    from peft import LoraConfig

    spec, parts = pipeline_spec("flux", str(flux_dir), resolution=RESOLUTION, max_sequence_length=TEXT_LEN)
    m = _flux(flux_dir)
    assert spec.params == sum(p.numel() for p in m.module.parameters())
    assert parts["vae"] == sum(p.numel() for p in m.vae.parameters())
    assert parts["text_encoder_2"] == sum(p.numel() for p in m.pipeline.text_encoder_2.parameters())
    assert (spec.image_tokens, spec.text_tokens) == (m.image_seq_len, TEXT_LEN)
    m.module.add_adapter(LoraConfig(r=3, lora_alpha=6, target_modules=list(FLUX_LORA_TARGETS)))
    lora = sum(p.numel() for n, p in m.module.named_parameters() if "lora_" in n)
    assert spec.lora_params(FLUX_LORA_TARGETS, 3) == lora

    est = estimate_memory(spec, dtype=torch.bfloat16, lora_rank=3, lora_targets=FLUX_LORA_TARGETS,
                          states_per_forward=4)
    assert est.weights == 2 * spec.params and est.lora == 4 * lora and est.optimizer == 8 * lora
    ckpt = estimate_memory(spec, dtype=torch.bfloat16, states_per_forward=4, gradient_checkpointing=True)
    full = estimate_memory(spec, dtype=torch.bfloat16, states_per_forward=4)
    # full fine-tune: fp32 master weights and gradients (the forward runs under bf16 autocast)
    assert full.weights == 4 * spec.params and full.gradients == 4 * spec.params and full.optimizer == 8 * spec.params
    assert ckpt.activations < full.activations
    assert any("total" in line and "MiB" in line for line in full.lines())
    with pytest.raises(ValueError, match="match no Linear"):
        estimate_memory(spec, lora_rank=2, lora_targets=["nothing_here"])


def test_sd3_estimate_counts_cfg_rows(tmp_path):
    folder = make_tiny_sd3_pipeline(tmp_path / "sd3")
    cfg = estimate_for("sd3", str(folder), resolution=RESOLUTION, max_sequence_length=TEXT_LEN, states_per_forward=3)
    no_cfg = estimate_for("sd3", str(folder), resolution=RESOLUTION, max_sequence_length=TEXT_LEN,
                          states_per_forward=3, guidance_scale=1.0)
    assert cfg.activations == 2 * no_cfg.activations
    with pytest.raises(ValueError, match="local pipeline folder"):
        estimate_for("sd3", str(tmp_path), resolution=RESOLUTION)


def test_nfe_per_iteration_matches_engine(flux_dir):
    m = _flux(flux_dir)
    for plan in (Bifurcation(num_steps=4, seeds_per_prompt=2, branches=2, bifurcation_steps=(0, 2)),
                 SingularSDE(num_steps=4, branches=2, sde_steps=(0, 1), granularities=(1, 2))):
        nfe = nfe_per_iteration(plan, 2, cfg_batches=2)
        measured = rollout(m, ["a", "b"], plan, seed=0).stats
        assert nfe["nfe_total"] == measured.total_nfe
        assert all(nfe[f"nfe/{k}"] == v for k, v in measured.nfe.items())
        assert nfe["transformer_rows"] == 2 * measured.total_nfe
    text = "\n".join(dry_run_lines(estimate_for("tiny_flux", None), nfe))
    assert f"{nfe['nfe_total']:,} rows" in text and "MiB" in text

"""The rollout's memory bounds at FLUX-1024 token counts (a stand-in adapter counts what each call gets), text
conditioning gathered per chunk, bounded uint8 decoding, and the ODE-segment code path against the per-step one."""

import pytest
import torch

from tempflow_fast.models.memory import GIB, default_decode_batch, default_max_rows_per_call
from tempflow_fast.sampling.engine import rollout
from tempflow_fast.sampling.plans import Bifurcation, SingularSDE
from tempflow_fast.sampling.runners import EagerRunner

FLUX_1024_LATENT = (4096, 64)  # 1024 px: 64×64 packed tokens × 64 channels


class StandIn:
    """An adapter at FLUX-1024's latent size whose velocity and decode record what they are given."""

    latent_shape = FLUX_1024_LATENT
    image_seq_len = FLUX_1024_LATENT[0]
    text_seq_len = 512

    def __init__(self, resolution=None, vae=None):
        self.module = torch.nn.Linear(1, 1)
        self.calls, self.cond_rows, self.decoded = [], [], []
        self.resolution, self.vae = resolution, vae

    def encode_prompts(self, prompts):
        return {"prompt_embeds": torch.arange(len(prompts), dtype=torch.float32)[:, None].expand(-1, 8).contiguous()}

    def velocity(self, x, sigma, cond):
        assert cond["prompt_embeds"].shape[0] == x.shape[0] == sigma.shape[0]
        self.calls.append(x.shape[0])
        return -0.5 * x

    def decode(self, x):
        self.decoded.append(x.shape[0])
        return torch.rand(x.shape[0], 3, 8, 8)


class CondRecorder(EagerRunner):
    """Records the batch of the conditioning the engine hands the runner."""

    def __call__(self, x, sigma, cond, rows=None):
        self.seen = getattr(self, "seen", []) + [next(iter(cond.values())).shape[0]]
        return super().__call__(x, sigma, cond, rows)


PLAN = Bifurcation(num_steps=16, seeds_per_prompt=4, branches=6, bifurcation_steps=(0, 6, 12), dynamic_shift=True)


def test_rows_per_call_bounded_at_flux_1024_token_counts():
    model = StandIn()
    unbounded = rollout(model, ["a", "b"], PLAN, seed=0, runner=EagerRunner(model))
    assert max(model.calls) > 64  # the old default: every live row in one call (144 rows here)
    model.calls.clear()
    runner = CondRecorder(model, max_rows=32)
    bounded = rollout(model, ["a", "b"], PLAN, seed=0, runner=runner)
    assert max(model.calls) <= 32 and sum(model.calls) == bounded.stats.total_nfe == unbounded.stats.total_nfe
    # text conditioning reaches the runner per prompt (2 rows) and is gathered per chunk, never per live row
    assert set(runner.seen) == {2}
    torch.testing.assert_close(bounded.final_latents[1], unbounded.final_latents[1])


def test_default_rows_per_call_from_the_memory_model():
    from diffusers import FluxTransformer2DModel

    from tempflow_fast.models.memory import known_pipeline

    facts = {k: v for k, v in known_pipeline("black-forest-labs/FLUX.1-dev")["transformer"].items()
             if k != "_class_name"}
    model = StandIn()
    with torch.device("meta"):
        model.module = FluxTransformer2DModel(**facts).to(torch.bfloat16)
    # 80 GB card, 25 GiB resident: ~100 rows fit, capped at 32 (throughput saturates long before)
    assert default_max_rows_per_call(model, resident_bytes=25 * GIB, device_memory=80 * GIB) == 32
    # 40 GiB card: (36 - 25) GiB / 0.45 GiB per row
    assert default_max_rows_per_call(model, resident_bytes=25 * GIB, device_memory=40 * GIB) == 24
    assert default_max_rows_per_call(model, resident_bytes=39 * GIB, device_memory=40 * GIB) == 1
    assert default_max_rows_per_call(StandIn()) is None  # no diffusers transformer: nothing to derive from


def test_decode_is_bounded_and_images_leave_the_device_as_uint8():
    vae = torch.nn.Conv2d(3, 3, 1)  # fp32 VAE weights
    model = StandIn(resolution=1024, vae=vae)
    assert default_decode_batch(model) == 1  # a 1024 px fp32 decode peaks ~4.8 GiB per image
    assert default_decode_batch(StandIn(resolution=512, vae=vae)) == 6
    assert default_decode_batch(StandIn()) == 256  # no VAE (the tiny model unpacks pixels)
    plan = Bifurcation(num_steps=4, seeds_per_prompt=2, branches=2, bifurcation_steps=(0,))
    res = rollout(model, ["a"], plan, seed=0, image_format="uint8_cpu")
    assert model.decoded and max(model.decoded) == 1 and sum(model.decoded) == res.stats.total_images
    assert res.images[1].dtype == torch.uint8 and res.images[1].device.type == "cpu"
    with pytest.raises(ValueError, match="image_format"):
        rollout(model, ["a"], plan, seed=0, image_format="png")


@pytest.mark.parametrize("plan", [
    Bifurcation(num_steps=6, seeds_per_prompt=2, branches=3, bifurcation_steps=(0, 2, 3)),
    SingularSDE(num_steps=6, branches=3, sde_steps=(0, 1), granularities=(1, 2)),
])
def test_ode_segments_match_the_per_step_path(tiny_model, plan):
    """The code path CUDA graphs replay (one call per segment), run eagerly: same images, NFE and log-probs."""
    a = rollout(tiny_model, ["a red square", "two blue squares"], plan, seed=3, runner=EagerRunner(tiny_model))
    seg = EagerRunner(tiny_model, buckets=(4, 16), segments=True)
    b = rollout(tiny_model, ["a red square", "two blue squares"], plan, seed=3, runner=seg)
    assert b.stats.nfe == a.stats.nfe
    for lam in a.final_latents:
        torch.testing.assert_close(b.final_latents[lam], a.final_latents[lam], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.trunk_latents, a.trunk_latents, rtol=1e-5, atol=1e-5)
    # SDE steps are never part of a segment (batch composition alone moves the last float bit)
    torch.testing.assert_close(b.samples.old_log_prob, a.samples.old_log_prob, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_segments_replay_equals_eager(tiny_model_cls):
    from tempflow_fast.sampling.runners import CudaGraphRunner

    model = tiny_model_cls()
    model.module.cuda()
    model.word_embedding.cuda()
    model.img_ids, model.txt_ids = model.img_ids.cuda(), model.txt_ids.cuda()
    plan = Bifurcation(num_steps=6, seeds_per_prompt=2, branches=3, bifurcation_steps=(0, 2, 3))
    graph = CudaGraphRunner(model, buckets=(4, 16))
    eager = EagerRunner(model, buckets=(4, 16), segments=True)
    a = rollout(model, ["a", "b"], plan, seed=0, runner=eager)
    b = rollout(model, ["a", "b"], plan, seed=0, runner=graph)
    c = rollout(model, ["a", "b"], plan, seed=0, runner=graph)  # pure replays
    assert any(k[0] == "segment" for k in graph._graphs)
    torch.testing.assert_close(b.final_latents[1], a.final_latents[1], rtol=1e-5, atol=1e-5)
    assert torch.equal(b.final_latents[1], c.final_latents[1])

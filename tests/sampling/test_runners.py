import pytest
import torch

from tempflow_fast.sampling.engine import rollout
from tempflow_fast.sampling.plans import Bifurcation
from tempflow_fast.sampling.runners import (CompiledRunner, CudaGraphRunner, EagerRunner, make_runner)

PROMPTS = ["a red square", "two blue squares"]
PLAN = Bifurcation(num_steps=4, seeds_per_prompt=2, branches=3)


def test_bucket_chunks():
    r = EagerRunner(object(), buckets=(16, 4))
    assert r.buckets == (4, 16)
    assert r._chunks(3) == [(0, 3, 4)]
    assert r._chunks(16) == [(0, 16, 16)]
    assert r._chunks(37) == [(0, 16, 16), (16, 32, 16), (32, 37, 16)]
    with pytest.raises(ValueError, match="buckets"):
        EagerRunner(object(), buckets=(0, 4))


def test_compiled_agrees_with_eager(tiny_model):
    # One bucket size: one Inductor compile, the cost of which dominates this test on a CPU.
    eager = rollout(tiny_model, PROMPTS, PLAN, seed=0, runner=EagerRunner(tiny_model, buckets=(16,)))
    compiled = rollout(tiny_model, PROMPTS, PLAN, seed=0, runner=CompiledRunner(tiny_model, buckets=(16,)))
    assert compiled.stats.nfe == eager.stats.nfe
    for lam in eager.images:
        torch.testing.assert_close(compiled.final_latents[lam], eager.final_latents[lam], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled.samples.old_log_prob, eager.samples.old_log_prob, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled.trunk_latents, eager.trunk_latents, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal / fallback")
def test_cuda_graph_refuses_cpu_model_and_falls_back_identically(tiny_model):
    with pytest.raises(ValueError, match="CUDA"):
        CudaGraphRunner(tiny_model, buckets=(8,))
    with pytest.warns(UserWarning, match="cuda_graph"):
        runner = make_runner("cuda_graph", tiny_model, buckets=(8,), fallback="eager")
    assert isinstance(runner, EagerRunner) and runner.buckets == (8,)
    a = rollout(tiny_model, PROMPTS, PLAN, seed=4, runner=runner)
    b = rollout(tiny_model, PROMPTS, PLAN, seed=4, runner=EagerRunner(tiny_model, buckets=(8,)))
    assert torch.equal(a.final_latents[1], b.final_latents[1])
    assert torch.equal(a.samples.old_log_prob, b.samples.old_log_prob)
    with pytest.raises(ValueError, match="runner kind"):
        make_runner("graphs", tiny_model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_matches_eager_on_gpu(tiny_model_cls):
    model = tiny_model_cls()
    model.module.cuda()
    model.word_embedding.cuda()
    model.img_ids, model.txt_ids = model.img_ids.cuda(), model.txt_ids.cuda()
    runner = CudaGraphRunner(model, buckets=(8, 32))
    a = rollout(model, PROMPTS, PLAN, seed=0, runner=runner)
    b = rollout(model, PROMPTS, PLAN, seed=0, runner=EagerRunner(model, buckets=(8, 32)))
    torch.testing.assert_close(a.final_latents[1], b.final_latents[1], rtol=1e-4, atol=1e-4)
    assert len(runner._graphs) <= 2

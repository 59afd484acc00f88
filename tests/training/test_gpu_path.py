"""The FLUX-1024 production path, checked on the CPU: fp32 master weights on a bf16 model, attention backends that
can train, compile without silent fallbacks, eval on the model's device, lazy bounded prompt encoding, checkpoint
loading onto the host, and the offline --dry-run of every GPU preset."""

import json
import logging
from pathlib import Path

import pytest
import torch

from tempflow_fast.training.cli import main as train_main
from tests.models.tiny_pipelines import RESOLUTION, TEXT_LEN, make_tiny_flux_pipeline

GPU_PRESETS = ["tempflow_flux1024_hpsv3", "tempflow_sd35m_geneval", "tempflow_sd35m_pickscore", "g2rpo_flux_hps_clip",
               "flow_grpo_sd35m", "official/tempflow_flux", "official/tempflow_sd35m_geneval",
               "official/tempflow_sd35m_pickscore", "official/flow_grpo_sd35m_geneval",
               "official/flow_grpo_sd35m_pickscore", "official/g2rpo_flux_hps_clip"]
PROMPTS = ["a photo of a cat", "a red car on a road", "two dogs playing", "a bowl of fruit"]


class Brightness:
    """A continuous reward that only knows float images."""

    def __call__(self, images, prompts):
        return images.float().mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return make_tiny_flux_pipeline(tmp_path_factory.mktemp("flux") / "flux")


def _trainer(tmp_path, flux_dir, *overrides, model=None):
    from tempflow_fast.config import load_config
    from tempflow_fast.training.train_config import Config
    from tempflow_fast.training.trainer import Trainer

    cfg = load_config(Config, None, [
        f"output_dir={tmp_path / 'run'}", "model.kind=flux", f"model.path={flux_dir}", "model.device=cpu",
        f"model.resolution={RESOLUTION}", f"model.max_sequence_length={TEXT_LEN}", "log.progress=false",
        "log.tensorboard=false", "train.iterations=2", "train.prompts_per_iteration=2", "sampling.num_steps=4",
        "tempflow.num_seeds=2", "tempflow.branches=2", *overrides])
    return Trainer(cfg, reward=Brightness(), train_prompts=PROMPTS, eval_fn=lambda m: None, model=model)


@pytest.mark.parametrize("lora", [False, True])
def test_fp32_master_weights_move_every_weight(tmp_path, flux_dir, lora):
    """bf16 model, lr 1e-5, 10 AdamW steps: with bf16 weights only ~15% of them change at all; fp32 masters move
    (nearly) every one, while the forward still computes in bf16."""
    trainer = _trainer(tmp_path, flux_dir, "model.dtype=bf16", "train.learning_rate=1e-5",
                       f"train.lora.enabled={str(lora).lower()}", "train.lora.rank=4", "train.lora.alpha=8",
                       "train.lora.target_modules=[to_q,to_k,to_v]")
    params = [p for _, p in trainer.named_params]
    assert params and all(p.dtype == torch.float32 for p in params)
    frozen = [p for p in trainer.model.module.parameters() if not p.requires_grad]
    assert all(p.dtype == torch.bfloat16 for p in frozen) and (lora or not frozen)
    assert trainer.model.dtype == torch.bfloat16
    before = [p.detach().clone() for p in params]
    m = trainer.model
    cond = m.encode_prompts(PROMPTS[:2])
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        x = torch.randn(2, *m.latent_shape, generator=gen)
        v = m.velocity(x, torch.tensor([0.7, 0.3]), cond)
        assert v.dtype == torch.float32
        trainer.optimizer.zero_grad()
        v.square().mean().backward()
        trainer.optimizer.step()
    moved = sum(int((p.detach() != b).sum()) for p, b in zip(params, before))
    total = sum(b.numel() for b in before)
    assert moved / total >= 0.99, f"only {moved / total:.1%} of the trainable weights moved"


def test_uint8_host_images_reach_a_float_only_reward_as_floats(tmp_path, flux_dir):
    trainer = _trainer(tmp_path, flux_dir, "model.dtype=float32", "train.lora.enabled=true", "train.lora.rank=2",
                       "train.lora.target_modules=[to_q]")
    assert trainer._image_format == "uint8_cpu"
    m = trainer.run_iteration(0)
    assert trainer._last_result.images[1].dtype == torch.uint8 and m["trained_samples"] > 0
    assert 0.0 < m["reward_mean"] < 1.0


def test_attention_backends_that_cannot_train_are_refused(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert train_main(["--set", "model.attention_backend=flash3", "--set", f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "model.attention_backend" in err and "no backward" in err and "rollout_attention_backend" in err
    assert train_main(["--set", "model.attention_backend=flash4", "--set", f"output_dir={out}"]) == 2
    assert "model.attention_backend" in capsys.readouterr().err
    # flash3 for the no-grad rollouts only is a valid config
    assert train_main(["--set", "model.rollout_attention_backend=flash3", "--print-config"]) == 0
    assert not (tmp_path / "r").exists()


def test_default_attention_backends():
    """CUDA in half precision: update on flash (cuDNN's SDPA backward faulted in FLUX on an H200), rollouts on
    torch's own pick (cuDNN's forward is the fastest there); elsewhere the transformer's default."""
    from tempflow_fast.models.attention import default_attention_backends

    assert default_attention_backends("cuda", torch.bfloat16) == ("sdpa_flash", "native")
    assert default_attention_backends("cuda:1", torch.float16) == ("sdpa_flash", "native")
    assert default_attention_backends("cuda", torch.float32) == (None, None)
    assert default_attention_backends("cpu", torch.bfloat16) == (None, None)


def test_rollout_attention_backend_is_used_for_rollouts_only(tmp_path, flux_dir, monkeypatch):
    import tempflow_fast.models.attention as attention

    seen = []
    monkeypatch.setattr(attention, "set_attention_backend", lambda t, name: seen.append(name))
    trainer = _trainer(tmp_path, flux_dir, "model.dtype=float32", "model.attention_backend=native",
                       "model.rollout_attention_backend=sdpa_efficient", "log.movement_states=0")
    seen.clear()  # loading may set the update backend once (when models.loading binds the patched function)
    trainer.run_iteration(0)
    assert seen == ["sdpa_efficient", "native"]
    # the velocity-movement probe runs as the rollouts do, before and after the update
    trainer = _trainer(tmp_path / "probe", flux_dir, "model.dtype=float32", "model.attention_backend=native",
                       "model.rollout_attention_backend=sdpa_efficient", "log.movement_states=1")
    seen.clear()
    trainer.run_iteration(0)
    assert seen == ["sdpa_efficient", "native"] * 3


def test_compile_blocks_never_hits_the_recompile_limit(tmp_path, flux_dir, monkeypatch):
    """Two iterations (rollout calls of several batch sizes, update micro-batches, gradient checkpointing) compile
    each block at most once per grad mode and batch-1 specialisation: never near dynamo's recompile limit (8)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    import tempflow_fast.models.loading as loading

    monkeypatch.setattr(loading, "COMPILE_DEFAULTS", {**loading.COMPILE_DEFAULTS, "backend": "eager"})
    torch._dynamo.reset()
    counters.clear()
    limit = []

    class Hits(logging.Handler):
        def emit(self, record):
            if "recompile_limit" in record.getMessage():
                limit.append(record.getMessage())

    handler = Hits()
    logging.getLogger("torch._dynamo").addHandler(handler)
    try:
        trainer = _trainer(tmp_path, flux_dir, "model.dtype=float32", "model.compile_blocks=true",
                           "model.gradient_checkpointing=true", "train.states_per_forward=3",
                           "sampling.buckets=[3,5]", "sampling.runner=compile")
        for it in range(2):
            trainer.run_iteration(it)
    finally:
        logging.getLogger("torch._dynamo").removeHandler(handler)
    assert not limit
    # 2 block types × (no-grad, grad; batch 1 specialises once); measured 5 here. A compile per batch size
    # (buckets 3 and 5, micro-batches of 3 and 1, ragged chunks) would make more than 8.
    assert counters["stats"]["unique_graphs"] <= 6


def test_eval_builds_noise_and_sigmas_on_the_models_device(tmp_path):
    """Everything the eval hands the model lives on the model's device (meta here: no CUDA needed to see it)."""
    from tempflow_fast.config import load_config
    from tempflow_fast.training.train_config import Config
    from tempflow_fast.tasks.reward_eval import mean_reward_eval

    class MetaModel:
        latent_shape, image_seq_len = (4, 3), 4
        module = torch.nn.Linear(2, 2, device="meta")

        def __init__(self):
            self.devices = set()

        def encode_prompts(self, prompts):
            return {"c": torch.zeros(len(prompts), 2, device="meta")}

        def velocity(self, x, sigma, cond):
            self.devices |= {x.device.type, sigma.device.type, cond["c"].device.type}
            return torch.zeros_like(x)

        def decode(self, x):
            self.devices.add(x.device.type)
            return torch.zeros(x.shape[0], 3, 2, 2, device=x.device)

    cfg = load_config(Config, None, ["eval.images_per_prompt=3", "eval.num_steps=2"])
    model = MetaModel()
    out = mean_reward_eval(model, ["a", "b"], lambda im, p: torch.ones(im.shape[0]), cfg, rows_per_call=4)
    assert model.devices == {"meta"} and out["overall"]["count"] == 6


def test_prompts_are_encoded_lazily_into_a_bounded_cache(tmp_path, flux_dir):
    trainer = _trainer(tmp_path, flux_dir, "model.dtype=float32", "model.text_encoders=offload",
                       "model.prompt_cache_size=3")
    cache = trainer.model.cache
    assert cache.encoded == 0 and len(cache) == 0  # nothing encoded at start
    assert next(trainer.model.pipeline.text_encoder_2.parameters()).device.type == "cpu"
    for it in range(2):
        trainer.run_iteration(it)
        assert len(cache) <= 3
    assert cache.encoded == len(set(trainer.prompts_for(0) + trainer.prompts_for(1)))


def test_prompt_cache_is_lru():
    from tempflow_fast.models.text_cache import PromptCache

    calls = []

    def encode(prompts):
        calls.extend(prompts)
        return {"e": torch.tensor([[float(len(p))] for p in prompts])}

    cache = PromptCache(encode, max_entries=2)
    cache.get(["a", "bb"], "cpu")
    cache.get(["a"], "cpu")            # touch "a"
    cache.get(["ccc"], "cpu")          # evicts "bb", the least recently used
    assert "a" in cache and "ccc" in cache and "bb" not in cache
    assert cache.get(["bb"], "cpu")["e"].item() == 2.0 and calls == ["a", "bb", "ccc", "bb"]
    with pytest.raises(ValueError, match="max_entries"):
        cache.get(["x", "y", "z"], "cpu")


def test_checkpoints_load_onto_the_host(tmp_path, monkeypatch):
    from tempflow_fast.training import checkpoint as ckpt

    path = ckpt.save_checkpoint(tmp_path, 1, model_state={"w": torch.ones(2)}, state={"iteration": 1},
                                config_yaml="x: 1\n", ema_state=None, keep_last=2)
    seen = {}
    real = torch.load

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    data = ckpt.load_checkpoint(path)
    assert seen.get("map_location") == "cpu" and data["model"]["w"].device.type == "cpu"


@pytest.mark.parametrize("preset", GPU_PRESETS)
def test_dry_run_of_every_gpu_preset_offline(preset, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert train_main(["--config", f"configs/{preset}.yaml", "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [int(l.split(":")[1]) for l in lines if l.startswith("max rows per transformer call:")]
    assert len(rows) == 1 and 1 <= rows[0] <= 64
    assert lines[-1].startswith("peak memory: ") and lines[-1].endswith(")")
    peak = float(lines[-1].split()[2])
    assert peak <= 80
    if preset == "tempflow_flux1024_hpsv3":
        assert rows[0] == 32 and "(rollout forward)" in lines[-1]


def test_dry_run_refuses_what_does_not_fit(capsys):
    preset = "configs/tempflow_flux1024_hpsv3.yaml"
    assert train_main(["--config", preset, "--dry-run", "--gpu-memory", "0"]) == 2
    assert "--gpu-memory" in capsys.readouterr().err
    assert train_main(["--config", preset, "--dry-run", "--gpu-memory", "24"]) == 2  # weights alone are 22 GiB
    err = capsys.readouterr().err
    assert "rollout forward" in err and "sampling.max_rows_per_call" in err
    assert train_main(["--config", preset, "--dry-run", "--set", "train.states_per_forward=64"]) == 2
    err = capsys.readouterr().err
    assert "(update forward+backward) exceeds --gpu-memory 80" in err and "train.states_per_forward" in err
    assert train_main(["--config", preset, "--dry-run", "--set", "sampling.buckets=[8,64]",
                       "--set", "sampling.max_rows_per_call=32"]) == 2
    assert "sampling.buckets" in capsys.readouterr().err
    assert train_main(["--config", preset, "--dry-run", "--set", "sampling.buckets=[8,64]"]) == 2
    assert "sampling.buckets" in capsys.readouterr().err

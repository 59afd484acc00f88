"""The mean-reward evaluation of continuous-reward tasks (a prompt file, JPEG compressibility) and the trainer's
probe set: Euler ODE samples from fixed noises, scored by a reward, averaged, with a 95% interval over images
(prompts held fixed: stats.mean_interval).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from tempflow_fast.tasks.stats import mean_interval

REWARD_EVAL_IMAGES_PER_PROMPT = 16  # eval.images_per_prompt when null for the mean-reward tasks


@torch.no_grad()
def reward_scores(model, prompts: Sequence[str], reward, cfg, *, images_per_prompt: int, seed: int,
                  rows_per_call: Optional[int] = None, decode_batch: Optional[int] = None,
                  image_format: str = "float", progress: bool = False,
                  desc: str = "held-out eval") -> Tuple[torch.Tensor, List[str], Dict[str, torch.Tensor]]:
    """(scores (P·n,), the prompt of each image, {component: raw scores} of a composite reward) of Euler ODE samples
    (cfg.eval.num_steps) of `prompts`, n = `images_per_prompt` each in prompt-major order, on the schedule the
    rollouts use (sampling.shift / dynamic_shift, or the model's own with schedule_from_model), as TempFlow's and
    Flow-GRPO's code evaluate (`eval`: ODE with sample.eval_num_steps, mean reward per key).

    Noise comes from a CPU generator seeded with `seed` (the same images on every device) and moves to the model's
    device with the schedule; at most `rows_per_call` images sample together and `decode_batch` decode together."""
    from tempflow_fast.models.memory import default_decode_batch
    from tempflow_fast.sampling.engine import decode_images
    from tempflow_fast.sampling.schedules import model_sigmas
    from tempflow_fast.sampling.simple import initial_noise, sample

    smp = cfg.sampling
    device = next(model.module.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    own = smp.schedule_from_model
    sigmas = model_sigmas(model, cfg.eval.num_steps, None if own else smp.shift,
                          None if own else smp.dynamic_shift)  # host values; `sample` puts them on x's device
    per_image = [p for p in prompts for _ in range(images_per_prompt)]
    step = min(16, rows_per_call or 16)
    scores, components = [], {}
    was = model.module.training
    model.module.eval()
    from tqdm.auto import tqdm

    bar = tqdm(total=len(per_image), desc=desc, unit="img", disable=not progress, leave=False)
    try:
        for i in range(0, len(per_image), step):
            chunk = per_image[i:i + step]
            noise = initial_noise(model, len(chunk), gen).to(device)
            x = sample(model, model.encode_prompts(chunk), noise, sigmas)
            images = decode_images(model, x, decode_batch or default_decode_batch(model), image_format)
            scores.append(reward(images, chunk).float().cpu())
            for name, raw in getattr(reward, "last_components", {}).items():
                components.setdefault(name, []).append(raw.float().cpu())
            bar.update(len(chunk))
    finally:
        bar.close()
        model.module.train(was)
    return torch.cat(scores), per_image, {name: torch.cat(raw) for name, raw in components.items()}


def mean_reward_eval(model, prompts: Sequence[str], reward, cfg, *, images_per_prompt: Optional[int] = None,
                     rows_per_call: Optional[int] = None, decode_batch: Optional[int] = None,
                     image_format: str = "float", progress: bool = False) -> Dict:
    """{"overall": {"accuracy": mean reward, "count", "ci95"}, "reward/<name>": the same of each composite
    component's raw scores} of `reward_scores` with cfg.eval.seed and `images_per_prompt` (None:
    cfg.eval.images_per_prompt, or REWARD_EVAL_IMAGES_PER_PROMPT when that is null too)."""
    n = images_per_prompt or cfg.eval.images_per_prompt or REWARD_EVAL_IMAGES_PER_PROMPT
    scores, per_image, components = reward_scores(
        model, prompts, reward, cfg, images_per_prompt=n, seed=cfg.eval.seed, rows_per_call=rows_per_call,
        decode_batch=decode_batch, image_format=image_format, progress=progress)
    out = {"overall": mean_row(scores, per_image)}
    for name, raw in components.items():
        out[f"reward/{name}"] = mean_row(raw, per_image)
    return out


def mean_row(scores: torch.Tensor, per_image: Sequence[str]) -> Dict:
    """An eval table row of per-image scores: mean as "accuracy" (the key every table row has), its interval."""
    mean, low, high = mean_interval(scores, per_image)
    return {"accuracy": mean, "correct": 0, "count": int(scores.numel()), "ci95": [low, high]}


def task_reward_eval(task, model, run) -> Dict:
    """`mean_reward_eval` of a task's held-out prompts as its trainer runs it (`run`: tasks/base.EvalRun), at
    cfg.eval.images_per_prompt or the task's default_images_per_prompt."""
    return mean_reward_eval(model, task.eval_prompts(), run.reward, task.cfg,
                            images_per_prompt=task.cfg.eval.images_per_prompt or task.default_images_per_prompt,
                            rows_per_call=run.rows_per_call, decode_batch=run.decode_batch,
                            image_format=run.image_format, progress=run.progress)

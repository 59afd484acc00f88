"""The small tiny-FLUX settings shared by the distributed test and its worker processes (a plain module:
the workers import it by path, outside pytest)."""

SMALL = dict(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=32)


class BrightnessReward:
    """A continuous reward, so every group has spread and every sample is trained."""

    def __call__(self, images, prompts):
        return images.mean(dim=(1, 2, 3)).float()


def no_eval(model):
    return {"overall": {"accuracy": 0.0}}


def small_overrides(method, out, *extra):
    return [
        f"method={method}", f"output_dir={out}", "train.iterations=2", "train.prompts_per_iteration=2",
        "log.progress=false", "log.tensorboard=false", "sampling.num_steps=4",
        "tempflow.num_seeds=2", "tempflow.branches=3", "flow_grpo.group_size=4", "stepwise.group_size=3",
        "train.learning_rate=1e-3", "train.clip_range=0.2", *extra,
    ]

"""Tasks: what a run trains on and how it is measured (the seam in tasks/base.py). `build_task(cfg)` is the one the
config names (`data.task`, or derived: Config.task_name); the trainer imports only this and tasks/base.py."""

from __future__ import annotations

TASKS = {
    "shapes": ("tempflow_fast.tasks.shapes.task", "ShapesTask"),
    "compressibility": ("tempflow_fast.tasks.compressibility", "CompressibilityTask"),
    "prompts": ("tempflow_fast.tasks.prompt_file", "PromptFileTask"),
}


def build_task(cfg):
    """The Task (tasks/base.py) of a training config: cfg.task_name() among TASKS, built from cfg."""
    import importlib

    name = cfg.task_name()
    if name not in TASKS:
        raise ValueError(f"config field 'data.task': must be one of {sorted(TASKS)}, got {name!r}")
    module, cls = TASKS[name]
    return getattr(importlib.import_module(module), cls)(cfg)

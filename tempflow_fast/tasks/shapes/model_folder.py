"""The tiny-FLUX weights `eval` and `sample` read from `model.path`.

`model.path` may name
- nothing (null): the model shipped in the package;
- a model folder (`tiny_flux.safetensors` + `tiny_flux_config.json`: `pretrain-shapes` checkpoints, a training
  run's `final/`);
- a training checkpoint (`<output_dir>/checkpoints/iter-N/`, training/checkpoint.py): its trainable weights
  go onto the run's base model (the checkpoint's config.yaml names it). A full fine-tune's hold every
  weight; a LoRA run's hold adapter weights, which are attached with the run's `train.lora` settings and
  merged. The EMA weights are used when the run kept them, as the trainer's eval and final export do;
- a training run's output_dir: its `final/` model when the run finished, else its newest complete checkpoint.

Anything else is a ValueError saying what the folder lacks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Union

import torch

from tempflow_fast.models import tiny_flux
from tempflow_fast.training import checkpoint as ckpt

ACCEPTED = (f"a model folder ({tiny_flux.WEIGHTS_NAME} + {tiny_flux.CONFIG_NAME}), a training checkpoint "
            f"(<output_dir>/checkpoints/iter-N with {ckpt.COMPLETE}) or a training run's output_dir")


def _is_model_folder(folder: Path) -> bool:
    return (folder / tiny_flux.WEIGHTS_NAME).is_file() and (folder / tiny_flux.CONFIG_NAME).is_file()


def resolve(path: Optional[Union[str, Path]], field: str = "model.path") -> Optional[Path]:
    """The model folder or checkpoint folder `path` stands for (None: the shipped model); errors name `field`."""
    if path in (None, ""):
        return None
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{field} {str(path)!r}: no such folder; give {ACCEPTED}")
    if _is_model_folder(folder) or (folder / ckpt.COMPLETE).is_file():
        return folder
    if _is_model_folder(folder / "final"):
        return folder / "final"
    newest = ckpt.latest_checkpoint(folder / "checkpoints")
    if newest is not None:
        return newest
    raise ValueError(f"{field} {str(path)!r}: holds no model; give {ACCEPTED}")


def load_model(path: Optional[Union[str, Path]], device: Union[str, torch.device] = "cpu",
               report: Callable[[str], None] = print, field: str = "model.path") -> tiny_flux.TinyFluxAdapter:
    """The tiny FLUX `path` names (see the module docstring); `report` hears which weights were read, errors
    name `field`."""
    folder = resolve(path, field)
    if folder is None:
        return tiny_flux.load_shipped(device)
    if _is_model_folder(folder):
        if str(folder) != str(path):
            report(f"[tempflow-fast] model: {folder}")
        return tiny_flux.TinyFluxAdapter.from_pretrained(folder, device)
    return _from_checkpoint(folder, device, report, field)


def _from_checkpoint(folder: Path, device, report, field: str) -> tiny_flux.TinyFluxAdapter:
    data = ckpt.load_checkpoint(folder)
    run = data["config"]
    model_cfg = run.get("model") or {}
    kind = model_cfg.get("kind", "tiny_flux")
    if kind != "tiny_flux":
        raise ValueError(f"{field} {str(folder)!r}: a checkpoint of a model.kind={kind} run; eval and sample "
                         f"read the tiny shapes model only")
    base_path = model_cfg.get("path")
    try:
        model = tiny_flux.load(base_path)
    except ValueError as err:
        raise ValueError(f"{field} {str(folder)!r}: the run's base model (its model.path {base_path!r}) does "
                         f"not load: {err}") from None
    weights, which = (data["ema"], "EMA") if data["ema"] is not None else (data["model"], "trained")
    lora = (run.get("train") or {}).get("lora") or {}
    target = getattr(model.module, "transformer", model.module)
    if lora.get("enabled"):
        from peft import LoraConfig

        target.add_adapter(LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"],
                                      target_modules=list(lora["target_modules"])))
    params = dict(model.module.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise ValueError(f"{field} {str(folder)!r}: weight {unknown[0]!r} of the checkpoint is not a parameter "
                         f"of the run's base model {base_path or 'shipped'!r}")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    if lora.get("enabled"):
        target.fuse_lora()
        target.unload_lora()
    report(f"[tempflow-fast] model: checkpoint {folder} (iteration {data['state']['iteration']}, {which} "
           f"weights{', LoRA merged' if lora.get('enabled') else ''}) on base {base_path or 'shipped'}")
    model.module.to(device)
    return model

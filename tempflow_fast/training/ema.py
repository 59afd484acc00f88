"""Exponential moving average of the trainable parameters (fp32 shadow copies).

As Flow-GRPO's and TempFlow's code (flow_grpo/ema.py: EMAModuleWrapper, built with decay 0.9 and
update_step_interval 8 in scripts/train_sd3.py / train_flux_pr.py: main): after optimizer step n (the number of
steps taken so far) the shadow moves when (n + 1) % update_every == 0, with decay min((1 + n) / (10 + n), decay)
when `warmup` is on. The step count is the trainer's checkpointed `optimizer_steps`, so a resumed run updates
the EMA at the same steps with the same decays.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

import torch


class EMA:
    def __init__(self, named_params: Iterable[Tuple[str, torch.nn.Parameter]], decay: float, *,
                 update_every: int = 1, warmup: bool = False):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        if update_every < 1:
            raise ValueError(f"ema update_every must be >= 1, got {update_every}")
        self.decay, self.update_every, self.warmup = decay, update_every, warmup
        self.params = dict(named_params)
        self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}

    def decay_at(self, step: int) -> float:
        """The decay of an update after optimizer step `step`: min((1 + n) / (10 + n), decay) with warm-up."""
        return min((1 + step) / (10 + step), self.decay) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, step: Optional[int] = None) -> bool:
        """Move the shadow toward the live weights after optimizer step `step` when it is due (always when
        `step` is None, with the plain decay); returns whether it moved."""
        if step is not None and (step + 1) % self.update_every != 0:
            return False
        decay = self.decay if step is None else self.decay_at(step)
        for n, p in self.params.items():
            self.shadow[n].lerp_(p.detach().float(), 1.0 - decay)
        return True

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise ValueError(f"EMA state is missing {len(missing)} parameters, e.g. {missing[0]!r}")
        for n in self.shadow:
            self.shadow[n].copy_(state[n])

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange live and shadow weights (call twice to restore): evaluate with the EMA weights."""
        for n, p in self.params.items():
            live = p.detach().float().clone()
            p.copy_(self.shadow[n].to(p.dtype))
            self.shadow[n].copy_(live)

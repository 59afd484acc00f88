"""Exponential moving average of the trainable parameters (fp32 shadow copies)."""

from __future__ import annotations

from typing import Dict, Iterable, Tuple

import torch


class EMA:
    def __init__(self, named_params: Iterable[Tuple[str, torch.nn.Parameter]], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.params = dict(named_params)
        self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for n, p in self.params.items():
            self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)

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

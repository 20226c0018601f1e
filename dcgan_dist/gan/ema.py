"""Exponential moving average of the generator's weights (as in StyleGAN/BigGAN evaluation).

Kept on rank 0 only: all ranks hold identical G weights, so one copy is enough. Samples and evaluation use it
when train.ema_decay > 0. Buffers (batch-norm running statistics) are copied, not averaged.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dcgan_dist.gan.models import unwrap


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        source = unwrap(model)
        for ema_p, p in zip(self.model.parameters(), source.parameters()):
            ema_p.lerp_(p.detach(), 1.0 - self.decay)
        for ema_b, b in zip(self.model.buffers(), source.buffers()):
            ema_b.copy_(b)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)

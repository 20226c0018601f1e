"""The DCGAN algorithm: one training step, the same in every launcher.

Local mode passes plain modules; distributed mode passes DDP-wrapped ones with synchronised batch norm.
Nothing here knows which: the step is pure PyTorch.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or similar) wrapper, else the module itself."""
    return getattr(module, "module", module)


@contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Parameters need no gradients inside the block (restored after)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def train_step(
    G: nn.Module,
    D: nn.Module,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    real: torch.Tensor,
    z: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """One GAN step: update D on a real and a fake batch, then G with the non-saturating loss.

    real: images in [-1, 1]; z: latent vectors (same batch size). Returns detached scalar tensors
    (no host sync here; the caller reads them only when it logs).
    """
    ones = torch.ones(real.shape[0], device=real.device)
    zeros = torch.zeros(z.shape[0], device=real.device)

    # Discriminator: maximise log D(x) + log(1 - D(G(z))). Real and fake go through D as separate batches,
    # so batch norm statistics are never mixed across the two (DCGAN paper, sec. 4).
    fake = G(z)
    logits_real = D(real)
    logits_fake = D(fake.detach())
    loss_d = F.binary_cross_entropy_with_logits(logits_real, ones) + F.binary_cross_entropy_with_logits(logits_fake, zeros)
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()

    # Generator: maximise log D(G(z)) (the non-saturating loss). D's weights are frozen and D is called
    # unwrapped: gradients flow through D into G only, and DDP does not all-reduce D gradients nobody uses.
    with frozen(unwrap(D)) as d_plain:
        logits_gen = d_plain(fake)
    loss_g = F.binary_cross_entropy_with_logits(logits_gen, ones)
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    opt_g.step()

    return {
        "loss_d": loss_d.detach(),
        "loss_g": loss_g.detach(),
        "d_real": torch.sigmoid(logits_real.detach()).mean(),  # D's mean 'real' score on real images
        "d_fake": torch.sigmoid(logits_fake.detach()).mean(),  # ... on fakes, before D's update
        "d_fake_after": torch.sigmoid(logits_gen.detach()).mean(),  # ... on the same fakes, after D's update
    }


def make_optimizers(G: nn.Module, D: nn.Module, optim_cfg) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    betas = (optim_cfg.beta1, optim_cfg.beta2)
    return (
        torch.optim.Adam(G.parameters(), lr=optim_cfg.lr, betas=betas),
        torch.optim.Adam(D.parameters(), lr=optim_cfg.lr, betas=betas),
    )

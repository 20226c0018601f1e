"""The DCGAN algorithm: one training step, the same in every launcher.

Local mode passes plain modules; distributed mode passes DDP-wrapped ones with synchronised batch norm.
Nothing here knows which: the step is pure PyTorch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from dcgan_dist.gan.models import unwrap
from dcgan_dist.gan.precision import FP32, Precision


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
    precision: Precision = FP32,
) -> dict[str, torch.Tensor]:
    """One GAN step: update D on a real and a fake batch, then G with the non-saturating loss.

    real: images in [-1, 1]; z: latent vectors (same batch size). Returns detached scalar tensors
    (no host sync here; the caller reads them only when it logs).
    """
    ones = torch.ones(real.shape[0], device=real.device)
    zeros = torch.zeros(z.shape[0], device=real.device)

    # Discriminator: maximise log D(x) + log(1 - D(G(z))). Real and fake go through D as separate batches,
    # so batch norm statistics are never mixed across the two (DCGAN paper, sec. 4).
    with precision.autocast():
        fake = G(z)
        logits_real = D(real).float()
        logits_fake = D(fake.detach()).float()
    loss_d = F.binary_cross_entropy_with_logits(logits_real, ones) + F.binary_cross_entropy_with_logits(
        logits_fake, zeros
    )
    opt_d.zero_grad(set_to_none=True)
    precision.backward_and_step(loss_d, opt_d, "d")

    # Generator: maximise log D(G(z)) (the non-saturating loss). D's weights are frozen and D is called
    # unwrapped: gradients flow through D into G only, and DDP does not all-reduce D gradients nobody uses.
    with frozen(unwrap(D)) as d_plain, precision.autocast():
        logits_gen = d_plain(fake).float()
    loss_g = F.binary_cross_entropy_with_logits(logits_gen, ones)
    opt_g.zero_grad(set_to_none=True)
    precision.backward_and_step(loss_g, opt_g, "g")

    return {
        "loss_d": loss_d.detach(),
        "loss_g": loss_g.detach(),
        "d_real": torch.sigmoid(logits_real.detach()).mean(),  # D's mean 'real' score on real images
        "d_fake": torch.sigmoid(logits_fake.detach()).mean(),  # ... on fakes, before D's update
        "d_fake_after": torch.sigmoid(logits_gen.detach()).mean(),  # ... on the same fakes, after D's update
    }


def set_hyperparameters(optimizers, optim_cfg) -> None:
    """The settings' learning rate and betas on every parameter group (a restored optimizer state carries the
    values it was saved with)."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"], group["betas"] = optim_cfg.lr, (optim_cfg.beta1, optim_cfg.beta2)


def make_optimizers(
    G: nn.Module, D: nn.Module, optim_cfg, fused: bool = False
) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """Adam for each network; fused=True uses the single-kernel implementation (what CUDA devices get)."""
    betas = (optim_cfg.beta1, optim_cfg.beta2)
    kwargs = {"lr": optim_cfg.lr, "betas": betas, **({"fused": True} if fused else {})}
    return torch.optim.Adam(G.parameters(), **kwargs), torch.optim.Adam(D.parameters(), **kwargs)

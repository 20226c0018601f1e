"""The GAN algorithm: one training step, the same in every launcher; the optimisers and their rates per step.

Local mode passes plain modules; distributed mode passes DDP-wrapped ones with synchronised batch norm.
Nothing here knows which: the step is pure PyTorch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from dcgan_dist.gan.models import unwrap
from dcgan_dist.gan.objectives import BCE, Objective
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
    objective: Objective = BCE,
    labels: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """One GAN step: update D on a real and a fake batch, then G, with `objective`'s losses (default: DCGAN's
    cross-entropy, G's loss non-saturating).

    real: images in [-1, 1]; z: latent vectors (same batch size); labels: the real images' classes (int64, a
    conditional model only), which the fakes are drawn for too. Returns detached scalar tensors (no host sync
    here; the caller reads them only when it logs): the losses and D's scores (objectives.py says what they mean).
    """
    # Discriminator first. Real and fake go through D as separate batches, so batch norm statistics are never
    # mixed across the two (DCGAN paper, sec. 4).
    with precision.autocast():
        fake = G(z, labels)
        logits_real = D(real, labels).float()
        logits_fake = D(fake.detach(), labels).float()
    loss_d = objective.d_loss(logits_real, logits_fake)
    opt_d.zero_grad(set_to_none=True)
    precision.backward_and_step(loss_d, opt_d, "d")

    # Generator. D's weights are frozen and D is called unwrapped: gradients flow through D into G only, and DDP
    # does not all-reduce D gradients nobody uses.
    with frozen(unwrap(D)) as d_plain, precision.autocast():
        logits_gen = d_plain(fake, labels).float()
    loss_g = objective.g_loss(logits_gen)
    opt_g.zero_grad(set_to_none=True)
    precision.backward_and_step(loss_g, opt_g, "g")

    return {
        "loss_d": loss_d.detach(),
        "loss_g": loss_g.detach(),
        "d_real": objective.score(logits_real.detach()),  # D's 'real' score on real images
        "d_fake": objective.score(logits_fake.detach()),  # ... on fakes, before D's update
        "d_fake_after": objective.score(logits_gen.detach()),  # ... on the same fakes, after D's update
    }


def hyperparameters(optim_cfg) -> dict[str, tuple[float, tuple[float, float]]]:
    """{"g": (lr, betas), "d": (lr, betas)}: each network's own settings, else the shared optim.lr/beta1/beta2."""

    def own(value: float | None, shared: float) -> float:
        return shared if value is None else value

    o = optim_cfg
    return {
        "g": (own(o.lr_g, o.lr), (own(o.beta1_g, o.beta1), own(o.beta2_g, o.beta2))),
        "d": (own(o.lr_d, o.lr), (own(o.beta1_d, o.beta1), own(o.beta2_d, o.beta2))),
    }


def lr_factor(schedule: str, step: int, max_steps: int, decay_steps: int = 0) -> float:
    """The learning rates' multiplier for the update of step `step` + 1 (`step` updates done before it, 0-based):
    a pure function of the step, so a resumed, resized or PBT-perturbed run needs no scheduler state.

    constant: 1. linear: 1, then down to zero over the last `decay_steps` steps (0: all `max_steps`):
    min(1, (max_steps - step) / decay_steps), so the last update (step max_steps - 1) has 1/decay_steps of the
    rate and a run longer than decay_steps starts at less than 1. cosine: (1 + cos(pi * step / max_steps)) / 2.
    """
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        span = decay_steps or max_steps
        return max(0.0, min(1.0, (max_steps - step) / span))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step, max_steps) / max_steps))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}")


def learning_rates(optim_cfg, step: int, max_steps: int) -> tuple[float, float]:
    """(G's, D's) learning rate for the update after `step` steps."""
    factor = lr_factor(optim_cfg.schedule, step, max_steps, optim_cfg.decay_steps)
    rates = hyperparameters(optim_cfg)
    return rates["g"][0] * factor, rates["d"][0] * factor


def set_learning_rates(opt_g, opt_d, optim_cfg, step: int, max_steps: int) -> None:
    """The scheduled rates for the update after `step` steps on every parameter group (before every step: a float
    per group, no scheduler state)."""
    for optimizer, lr in zip((opt_g, opt_d), learning_rates(optim_cfg, step, max_steps)):
        for group in optimizer.param_groups:
            group["lr"] = lr


def set_hyperparameters(opt_g, opt_d, optim_cfg, step: int, max_steps: int) -> None:
    """The settings' betas and scheduled rates (at `step`) on G's and D's optimisers, at the start: a restored
    optimiser state carries the values it was saved with, the run uses this command line's."""
    for optimizer, (_, betas) in zip((opt_g, opt_d), hyperparameters(optim_cfg).values()):
        for group in optimizer.param_groups:
            group["betas"] = betas
    set_learning_rates(opt_g, opt_d, optim_cfg, step, max_steps)


def make_optimizers(
    G: nn.Module, D: nn.Module, optim_cfg, fused: bool = False
) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """Adam for each network with its own rate and betas; fused=True uses the single-kernel implementation (what
    CUDA devices get). The rates are those of step 0 of the schedule: set_hyperparameters sets each step's."""
    settings = hyperparameters(optim_cfg)
    extra = {"fused": True} if fused else {}
    opt_g = torch.optim.Adam(G.parameters(), lr=settings["g"][0], betas=settings["g"][1], **extra)
    opt_d = torch.optim.Adam(D.parameters(), lr=settings["d"][0], betas=settings["d"][1], **extra)
    return opt_g, opt_d

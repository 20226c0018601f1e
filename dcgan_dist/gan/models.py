"""DCGAN generator and discriminator (Radford, Metz & Chintala 2015, arXiv:1511.06434).

Generator: z (nz x 1 x 1) -> transposed conv to base x base -> strided transposed convs doubling the size and
halving the width (BatchNorm + ReLU) -> transposed conv to `channels` with Tanh.
Discriminator: the mirror image with strided convs, LeakyReLU(0.2), BatchNorm on every layer but the first, and a
final conv to one logit per image. No fully connected hidden layers, no pooling.

Sizes: 64 (the classic faces model: 4->8->16->32->64), 32, 128, and 28 for MNIST-like data (7->14->28).
Also here: the helpers that look through wrappers (DDP, torch.compile) and draw images from a generator.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast

import torch
from torch import nn

SUPPORTED_SIZES = (28, 32, 64, 128)


def _layout(image_size: int) -> tuple[int, int]:
    """(base spatial size, number of stride-2 upsamplings) for an image size."""
    if image_size not in SUPPORTED_SIZES:
        raise ValueError(f"image_size must be one of {SUPPORTED_SIZES}, got {image_size}")
    base = 7 if image_size == 28 else 4
    return base, int(math.log2(image_size // base))


class Generator(nn.Module):
    def __init__(self, nz: int = 100, ngf: int = 64, channels: int = 3, image_size: int = 64):
        super().__init__()
        base, n_up = _layout(image_size)
        self.nz = nz
        width = ngf * 2 ** (n_up - 1)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(nz, width, base, 1, 0, bias=False),  # project z to base x base
            nn.BatchNorm2d(width),
            nn.ReLU(True),
        ]
        for _ in range(n_up - 1):
            layers += [
                nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(width // 2),
                nn.ReLU(True),
            ]
            width //= 2
        layers += [nn.ConvTranspose2d(width, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() == 2:
            z = z[:, :, None, None]
        return self.net(z)


class Discriminator(nn.Module):
    """Returns one logit per image (use BCE-with-logits; sigmoid(logit) is the 'real' probability)."""

    def __init__(self, ndf: int = 64, channels: int = 3, image_size: int = 64):
        super().__init__()
        base, n_up = _layout(image_size)
        width = ndf
        layers: list[nn.Module] = [
            nn.Conv2d(channels, width, 4, 2, 1, bias=False),  # no BatchNorm on the input layer (paper, sec. 3)
            nn.LeakyReLU(0.2, inplace=True),
        ]
        for _ in range(n_up - 1):
            layers += [
                nn.Conv2d(width, width * 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(width * 2),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            width *= 2
        layers.append(nn.Conv2d(width, 1, base, 1, 0, bias=False))  # base x base -> one logit
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten()


def init_weights(module: nn.Module) -> None:
    """DCGAN init: conv weights N(0, 0.02); BatchNorm weight N(1, 0.02), bias 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def build_models(model_cfg, seed: int = 0) -> tuple[Generator, Discriminator]:
    """G and D from a ModelSection, initialised deterministically from `seed` (same weights on every rank)."""
    # Construction draws from the global RNG too (torch's default init), so fork it: the caller's stream is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        g = Generator(model_cfg.nz, model_cfg.ngf, model_cfg.channels, model_cfg.image_size)
        d = Discriminator(model_cfg.ndf, model_cfg.channels, model_cfg.image_size)
        g.apply(init_weights)
        d.apply(init_weights)
    return g, d


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        inner = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
        if inner is None:
            return module
        module = inner


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """The plain module in eval mode inside the block (running batch-norm statistics: no cross-rank
    collective, no state change), its previous mode restored after."""
    model = unwrap(module)
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def generate(
    G: nn.Module, num: int, seed: int = 0, device: str | torch.device = "cpu", batch: int = 256
) -> torch.Tensor:
    """`num` images in [-1, 1] on the CPU from G as it is (call it in eval mode for samples); the same seed gives
    the same latent vectors."""
    nz = cast(Generator, unwrap(G)).nz  # a Generator, possibly inside DDP / torch.compile wrappers
    z = torch.randn(num, nz, 1, 1, generator=torch.Generator().manual_seed(seed))
    return torch.cat([G(z[i : i + batch].to(device)).cpu() for i in range(0, num, batch)])

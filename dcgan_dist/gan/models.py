"""DCGAN generator and discriminator (Radford, Metz & Chintala 2015, arXiv:1511.06434).

Generator: z (nz x 1 x 1) -> transposed conv to base x base -> strided transposed convs doubling the size and
halving the width (BatchNorm + ReLU) -> transposed conv to `channels` with Tanh.
Discriminator: the mirror image with strided convs, LeakyReLU(0.2), BatchNorm on every layer but the first, and a
final conv to one logit per image. No fully connected hidden layers, no pooling.

Sizes: 64 (the classic faces model: 4->8->16->32->64), 32, 128, and 28 for MNIST-like data (7->14->28).

Class-conditional (num_classes > 0; model.conditional):
- G takes z concatenated with the one-hot class. Not a learned embedding: G's first layer is linear in its input,
  so the one-hot columns give every class its own learned base x base feature map; a learned embedding in front
  of the same layer would be a lower-rank version of that, one more module and one more initialisation.
- D is a projection discriminator (Miyato & Koyama 2018, arXiv:1802.05637): logit = last_conv(h) +
  <embed(y), sum-pooled h>, h the features before the last conv. Not label channels on the input: those cost
  num_classes extra channels at full resolution and reach the first convolution only, the paper measured the
  projection better than concatenation, and the conv trunk (its BatchNorm layers, synchronised or not) stays
  exactly the unconditional one.
num_classes=0 builds exactly today's modules, parameters and initialisation order (bit-identical weights).
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


def _labels_for(
    module: nn.Module, labels: torch.Tensor | None, batch: int, default: torch.device | None = None
) -> torch.Tensor | None:
    """The labels a conditional module uses (None: unconditional). Without labels: classes 0, 1, 2, ... in turn
    on the `default` device (G: a grid of every class), or an error (D: no score without the class)."""
    num_classes = getattr(module, "num_classes", 0)
    if not num_classes:
        return None
    if labels is None and default is not None:
        return torch.arange(batch, device=default) % num_classes
    if labels is None:
        raise ValueError(f"{type(module).__name__} is class-conditional ({num_classes} classes): pass labels")
    if labels.shape != (batch,):
        raise ValueError(f"labels of shape {tuple(labels.shape)} for a batch of {batch}")
    return labels


class Generator(nn.Module):
    def __init__(self, nz: int = 100, ngf: int = 64, channels: int = 3, image_size: int = 64, num_classes: int = 0):
        super().__init__()
        base, n_up = _layout(image_size)
        self.nz, self.num_classes = nz, num_classes
        width = ngf * 2 ** (n_up - 1)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(nz + num_classes, width, base, 1, 0, bias=False),  # project z (+ class) to base x base
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

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if z.dim() == 2:
            z = z[:, :, None, None]
        labels = _labels_for(self, labels, z.shape[0], default=z.device)  # None: classes in turn
        if labels is not None:
            onehot = nn.functional.one_hot(labels, self.num_classes).to(z.dtype)[:, :, None, None]
            z = torch.cat([z, onehot.expand(-1, -1, *z.shape[2:])], dim=1)
        return self.net(z)


class Discriminator(nn.Module):
    """Returns one logit per image (what it means is the objective's: gan/objectives.py)."""

    def __init__(self, ndf: int = 64, channels: int = 3, image_size: int = 64, num_classes: int = 0):
        super().__init__()
        self.num_classes = num_classes
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
        if num_classes:  # the projection: one vector per class, against the pooled last features
            self.embed = nn.Embedding(num_classes, width)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        labels = _labels_for(self, labels, x.shape[0])
        if labels is None:
            return self.net(x).flatten()
        h = self.net[:-1](x)
        projection = (self.embed(labels) * h.sum(dim=(2, 3))).sum(dim=1)
        return self.net[-1](h).flatten() + projection.to(h.dtype)


def init_weights(module: nn.Module) -> None:
    """DCGAN init: conv weights N(0, 0.02); BatchNorm weight N(1, 0.02), bias 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):  # the projection discriminator's class vectors (small, like the convs)
        nn.init.normal_(module.weight, 0.0, 0.02)


def num_classes(model_cfg) -> int:
    """The classes a ModelSection's networks are conditioned on; 0: unconditional."""
    if not model_cfg.conditional:
        return 0
    if model_cfg.num_classes < 1:
        raise ValueError("model.conditional=true needs model.num_classes (filled in from labelled shards)")
    return model_cfg.num_classes


def build_models(model_cfg, seed: int = 0) -> tuple[Generator, Discriminator]:
    """G and D from a ModelSection, initialised deterministically from `seed` (same weights on every rank): the one
    builder of the Trainer, checkpoint loading, bench, the GPU report and the equivalence check."""
    m, classes = model_cfg, num_classes(model_cfg)
    # Construction draws from the global RNG too (torch's default init), so fork it: the caller's stream is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        g = Generator(m.nz, m.ngf, m.channels, m.image_size, num_classes=classes)
        d = Discriminator(m.ndf, m.channels, m.image_size, num_classes=classes)
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
    G: nn.Module,
    num: int,
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch: int = 256,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """`num` images in [-1, 1] on the CPU from G as it is (call it in eval mode for samples); the same seed gives
    the same latent vectors, whatever the labels (style held, class changed). labels: int64 (num,), for a
    conditional G; None: classes 0, 1, 2, ... in turn (an unconditional G takes none)."""
    plain = cast(Generator, unwrap(G))  # a Generator, possibly inside DDP / torch.compile wrappers
    z = torch.randn(num, plain.nz, 1, 1, generator=torch.Generator().manual_seed(seed))
    if labels is None and plain.num_classes:
        labels = torch.arange(num) % plain.num_classes

    def part(i: int) -> torch.Tensor:
        y = None if labels is None else labels[i : i + batch].to(device)
        return G(z[i : i + batch].to(device), y).cpu()

    return torch.cat([part(i) for i in range(0, num, batch)])

"""Latent-space tools from the DCGAN paper (Radford et al. 2015, sec. 6): walks between latent vectors and, for a
class-conditional generator, the same noise drawn as every class (style held, class changed).

    z = latents(nz, 1, seed=3)                    # seed 3's latent vector: the one `generate(G, 1, seed=3)` uses
    walk = slerp_walk(latents(nz, 1, 3)[0], latents(nz, 1, 9)[0], steps=8)   # 8 vectors, both ends included
    images = draw(G, walk, labels=None)

A seed's latent vector is the one `generate(G, 1, seed)` draws (torch draws a longer tensor's first values
differently, so not the first of `generate(G, num, seed)`): the first image of a walk from seed A is
`generate(G, 1, seed=A)`'s image (`sample sample.num=1 sample.seed=A`), its last one seed B's.
"""

from __future__ import annotations

import torch
from torch import nn

from dcgan_dist.gan.models import unwrap


def latents(nz: int, num: int, seed: int) -> torch.Tensor:
    """The `num` latent vectors (num x nz x 1 x 1) that `generate(G, num, seed)` feeds G (the same draw)."""
    return torch.randn(num, nz, 1, 1, generator=torch.Generator().manual_seed(seed))


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation from a (t=0) to b (t=1) (White 2016, "Sampling Generative Networks"): stays at the
    norm Gaussian latents have, where a straight line would pass through the low-norm middle. Exactly a at t=0
    and b at t=1; a straight line when a and b are (anti)parallel."""
    if t == 0:
        return a.clone()
    if t == 1:
        return b.clone()
    fa, fb = a.flatten().double(), b.flatten().double()
    cos = torch.dot(fa, fb) / (fa.norm() * fb.norm()).clamp_min(1e-12)
    omega = torch.arccos(cos.clamp(-1.0, 1.0))
    if omega.sin().abs() < 1e-6:
        mixed = (1 - t) * fa + t * fb
    else:
        mixed = (torch.sin((1 - t) * omega) * fa + torch.sin(t * omega) * fb) / torch.sin(omega)
    return mixed.to(a.dtype).reshape(a.shape)


def slerp_walk(a: torch.Tensor, b: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` latent vectors (steps x ...) from a to b, evenly spaced in angle, both ends included."""
    if steps < 2:
        raise ValueError(f"a walk needs at least 2 steps (its two ends), got {steps}")
    return torch.stack([slerp(a, b, i / (steps - 1)) for i in range(steps)])


@torch.no_grad()
def draw(
    G: nn.Module,
    z: torch.Tensor,
    labels: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
    batch: int = 256,
) -> torch.Tensor:
    """G's images (in [-1, 1], on the CPU) of given latent vectors, with a label per vector for a conditional G
    (labels: int64 (N,), or None). Call it with G in eval mode for samples."""
    model = unwrap(G)
    out = []
    for i in range(0, z.shape[0], batch):
        part = z[i : i + batch].to(device)
        if labels is None:
            out.append(model(part).cpu())
        else:
            out.append(model(part, labels=labels[i : i + batch].to(device)).cpu())
    return torch.cat(out)

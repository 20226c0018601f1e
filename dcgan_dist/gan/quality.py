"""Sample-quality metrics: multi-scale sliced Wasserstein distance (needs no network) and FID (needs Inception).

SWD follows Karras et al., "Progressive Growing of GANs" (ICLR 2018), appendix D: build a Laplacian pyramid of
every image; at each level take random 7x7 neighbourhoods (128 per image), normalise each set of descriptors
per colour channel, and compare the two sets' distributions by the sliced Wasserstein distance (mean over
random unit directions of the 1-D Wasserstein-1 distance between the sorted projections). Reported x 1e3, per
level (finest first) and averaged, as in the paper. Small numbers mean the local image statistics match at
every scale. Images are compared as uint8 values (generated ones rounded as a saved PNG would be), like the
reference code.

FID (Heusel et al. 2017) is computed when the InceptionV3 weights used by torch-fidelity are available on this
machine; nothing is ever downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dcgan_dist.config import EvalSection
from dcgan_dist.data.images import to_uint8

NHOOD_SIZE = 7
MIN_LEVEL_SIZE = 16  # coarsest pyramid level, as in the paper
DEFAULT_INCEPTION_WEIGHTS = EvalSection.inception_weights  # the setting eval.inception_weights


def _gaussian_kernel(channels: int) -> torch.Tensor:
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    k = torch.outer(k, k) / 256.0
    return k.expand(channels, 1, 5, 5).contiguous()


def _pyr_down(x: torch.Tensor) -> torch.Tensor:
    k = _gaussian_kernel(x.shape[1]).to(x)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k, stride=2, groups=x.shape[1])


def _pyr_up(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    n, c, h, w = x.shape
    up = x.new_zeros(n, c, h * 2, w * 2)
    up[:, :, ::2, ::2] = x * 4
    up = up[:, :, : size[0], : size[1]]
    k = _gaussian_kernel(c).to(x)
    return F.conv2d(F.pad(up, (2, 2, 2, 2), mode="reflect"), k, groups=c)


def laplacian_pyramid(images: torch.Tensor, min_size: int = MIN_LEVEL_SIZE) -> list[torch.Tensor]:
    """Finest level first; the last level is the low-pass residual."""
    levels, current = [], images
    while current.shape[-1] // 2 >= min_size:
        down = _pyr_down(current)
        levels.append(current - _pyr_up(down, current.shape[-2:]))
        current = down
    levels.append(current)
    return levels


def _descriptors(level: torch.Tensor, per_image: int, gen: torch.Generator) -> torch.Tensor:
    """Random NHOOD_SIZE x NHOOD_SIZE neighbourhoods, per_image of them per image -> [N * per_image, C * 49]."""
    n, c, h, w = level.shape
    half = NHOOD_SIZE // 2
    ys = torch.randint(half, h - half, (n, per_image), generator=gen)
    xs = torch.randint(half, w - half, (n, per_image), generator=gen)
    patches = level.unfold(2, NHOOD_SIZE, 1).unfold(3, NHOOD_SIZE, 1)  # n, c, h-6, w-6, 7, 7 (a view)
    img = torch.arange(n)[:, None].expand(n, per_image)
    picked = patches[img, :, ys - half, xs - half]  # n, per_image, c, 7, 7
    return picked.reshape(n * per_image, c, NHOOD_SIZE, NHOOD_SIZE)


def _normalise(desc: torch.Tensor) -> torch.Tensor:
    desc = desc - desc.mean(dim=(0, 2, 3), keepdim=True)
    desc = desc / desc.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-8)
    return desc.reshape(desc.shape[0], -1)


def sliced_wasserstein(
    a: torch.Tensor, b: torch.Tensor, repeats: int, dirs_per_repeat: int, gen: torch.Generator
) -> float:
    results = []
    for _ in range(repeats):
        dirs = torch.randn(a.shape[1], dirs_per_repeat, generator=gen, dtype=a.dtype)
        dirs = dirs / dirs.norm(dim=0, keepdim=True)
        # Projections as [directions, samples], sorted along samples (numpy's sort is several times faster here).
        pa = np.sort((a @ dirs).T.contiguous().numpy(), axis=1)
        pb = np.sort((b @ dirs).T.contiguous().numpy(), axis=1)
        results.append(float(np.abs(pa - pb).mean()))
    return float(np.mean(results))


@dataclass
class SWDResult:
    per_level: list[float]  # finest level first, x 1e3
    resolutions: list[int]

    @property
    def mean(self) -> float:
        return float(np.mean(self.per_level))

    def as_dict(self) -> dict:
        return {"swd": self.mean, "swd_levels": {str(r): v for r, v in zip(self.resolutions, self.per_level)}}


def swd(
    real: torch.Tensor,
    fake: torch.Tensor,
    nhoods_per_image: int = 128,
    repeats: int = 4,
    dirs_per_repeat: int = 128,
    seed: int = 0,
    batch: int = 512,
) -> SWDResult:
    """Multi-scale SWD between two image sets (N x C x H x W; uint8 or [-1, 1] floats; same size and shape)."""
    if real.shape[1:] != fake.shape[1:]:
        raise ValueError(f"image shapes differ: {tuple(real.shape[1:])} vs {tuple(fake.shape[1:])}")
    gen = torch.Generator().manual_seed(seed)
    descs: list[list[list[torch.Tensor]]] = [[], []]
    resolutions: list[int] = []
    for which, images in enumerate((real, fake)):
        for start in range(0, images.shape[0], batch):
            pyramid = laplacian_pyramid(to_uint8(images[start : start + batch]).float())
            if not resolutions:
                resolutions = [lvl.shape[-1] for lvl in pyramid]
            if not descs[which]:
                descs[which] = [[] for _ in pyramid]
            for i, level in enumerate(pyramid):
                descs[which][i].append(_descriptors(level, nhoods_per_image, gen))
    per_level = []
    for i in range(len(resolutions)):
        a = _normalise(torch.cat(descs[0][i]))
        b = _normalise(torch.cat(descs[1][i]))
        n = min(a.shape[0], b.shape[0])  # equal counts: sorted projections are compared element by element
        per_level.append(sliced_wasserstein(a[:n], b[:n], repeats, dirs_per_repeat, gen) * 1e3)
    return SWDResult(per_level, resolutions)


def swd_per_class(
    real: torch.Tensor, fake: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str], **kw
) -> dict[str, float | None]:
    """The SWD (mean over levels, x 1e3) of each class, by name: the real images labelled k against the generated
    images drawn as class k, `labels` being both sets' (the generated set drawn with the real set's labels). None
    for a class with no image. kw: swd's (nhoods_per_image, seed, ...)."""
    result: dict[str, float | None] = {}
    for k, name in enumerate(class_names):
        real_k, fake_k = real[labels == k], fake[labels == k]
        result[str(name)] = swd(real_k, fake_k, **kw).mean if len(real_k) else None
    return result


# --- FID ----------------------------------------------------------------------------------------------------


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)); the trace of the root from the eigenvalues of S1 S2."""
    diff = mu1 - mu2
    eig = np.linalg.eigvals(sigma1 @ sigma2)
    tr_sqrt = np.sqrt(np.clip(eig.real, 0, None)).sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_sqrt)


def _stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features.mean(0), np.cov(features, rowvar=False)


def inception_extractor(weights: str | None, device: str | torch.device = "cpu"):
    """torch-fidelity's InceptionV3 (the TF-FID port) from local weights; (extractor, None) or (None, reason)."""
    path = Path(os.path.expanduser(weights or DEFAULT_INCEPTION_WEIGHTS))
    if not path.is_file():
        how = (
            "eval.inception_weights=PATH"
            if path == Path(os.path.expanduser(DEFAULT_INCEPTION_WEIGHTS))
            else "a readable file"
        )
        return None, f"Inception weights not found at {path}; pass {how} (pt_inception-2015-12-05 from torch-fidelity)"
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except Exception as exc:  # noqa: BLE001 - not installed, or torchvision missing
        return None, f"torch-fidelity is not importable ({type(exc).__name__}: {exc}); pip install torch-fidelity"
    try:
        model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    except Exception as exc:  # noqa: BLE001
        return None, f"cannot load Inception weights from {path}: {exc}"
    return model.to(device).eval(), None


@torch.no_grad()
def inception_features(
    extractor, images: torch.Tensor, device: str | torch.device = "cpu", batch: int = 128
) -> np.ndarray:
    feats = []
    for start in range(0, images.shape[0], batch):
        x = to_uint8(images[start : start + batch])
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        feats.append(extractor(x.to(device))[0].double().cpu().numpy())
    return np.concatenate(feats)


def fid(
    real: torch.Tensor, fake: torch.Tensor, weights: str | None = None, device: str | torch.device = "cpu"
) -> tuple[float | None, str | None]:
    """(FID, None), or (None, reason) when Inception is not available here."""
    extractor, reason = inception_extractor(weights, device)
    if extractor is None:
        return None, reason
    mu_r, s_r = _stats(inception_features(extractor, real, device))
    mu_f, s_f = _stats(inception_features(extractor, fake, device))
    return frechet_distance(mu_r, s_r, mu_f, s_f), None

"""The GAN objectives: what D and G minimise, from D's logits, and the scores a step reports.

`gan.loss` names one (`objective(name)`); train_step calls it. Each objective gives
- d_loss(logits_real, logits_fake): D's loss on a real and a fake batch (logits before D's update);
- g_loss(logits_gen): G's loss on the fakes as the updated D sees them;
- score(logits): one number in [0, 1] per batch, how "real" D finds it: the step's d_real, d_fake and d_fake_after.
  bce: the mean sigmoid probability (D's own reading of its logit). hinge and ls have no probability: the fraction
  of the batch D puts on the real side of its decision boundary (hinge: logit > 0; ls: output > 1/2, the midpoint
  of its targets 0 and 1). For every objective 1 = all judged real, 0 = all judged fake, so the metrics read alike.

Adding a loss: a subclass here with `@register("name")`, and the name in config.LOSSES (gan.loss's allowed values;
config.py cannot import this layer, tests/unit/test_recipes.py keeps the two lists equal).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


class Objective:
    name = ""

    def d_loss(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def g_loss(self, logits_gen: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<objective {self.name}>"


OBJECTIVES: dict[str, Objective] = {}


def register(name: str) -> Callable[[type[Objective]], type[Objective]]:
    def add(cls: type[Objective]) -> type[Objective]:
        cls.name = name
        OBJECTIVES[name] = cls()
        return cls

    return add


def objective(name: str) -> Objective:
    """The objective `gan.loss` names."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown GAN objective {name!r}; one of {', '.join(OBJECTIVES)}") from None


@register("bce")
class NonSaturatingBCE(Objective):
    """DCGAN (Goodfellow et al. 2014, sec. 3; Radford et al. 2015): D maximises log D(x) + log(1 - D(G(z))), G
    maximises log D(G(z)) (the non-saturating loss), as binary cross-entropy on logits."""

    def d_loss(self, logits_real, logits_fake):
        ones, zeros = torch.ones_like(logits_real), torch.zeros_like(logits_fake)
        return F.binary_cross_entropy_with_logits(logits_real, ones) + F.binary_cross_entropy_with_logits(
            logits_fake, zeros
        )

    def g_loss(self, logits_gen):
        return F.binary_cross_entropy_with_logits(logits_gen, torch.ones_like(logits_gen))

    def score(self, logits):
        return torch.sigmoid(logits).mean()


@register("hinge")
class Hinge(Objective):
    """Hinge loss (Lim & Ye 2017; Miyato et al. 2018, SAGAN, BigGAN): D minimises E[relu(1 - D(x))] +
    E[relu(1 + D(G(z)))], G minimises -E[D(G(z))]."""

    def d_loss(self, logits_real, logits_fake):
        return F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean()

    def g_loss(self, logits_gen):
        return -logits_gen.mean()

    def score(self, logits):
        return (logits > 0).float().mean()


@register("ls")
class LeastSquares(Objective):
    """Least squares (Mao et al. 2017, LSGAN, targets a=0, b=c=1): D minimises 1/2 E[(D(x) - 1)^2] +
    1/2 E[D(G(z))^2], G minimises 1/2 E[(D(G(z)) - 1)^2]; D's output is used as it is (no sigmoid)."""

    def d_loss(self, logits_real, logits_fake):
        return 0.5 * (logits_real - 1).square().mean() + 0.5 * logits_fake.square().mean()

    def g_loss(self, logits_gen):
        return 0.5 * (logits_gen - 1).square().mean()

    def score(self, logits):
        return (logits > 0.5).float().mean()


BCE = OBJECTIVES["bce"]

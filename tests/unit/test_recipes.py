"""The recipe seam in-process: the objectives' losses against their formulas written out again here, the
learning-rate schedules' values, the separate G/D optimiser settings, PBT's perturbed keys."""

import copy
import math

import pytest
import torch

from dcgan_dist.config import LOSSES, ModelSection, OptimSection, allowed_values, build_config
from dcgan_dist.gan.models import build_models
from dcgan_dist.gan.objectives import OBJECTIVES, objective
from dcgan_dist.gan.step import learning_rates, lr_factor, make_optimizers, set_hyperparameters, train_step
from dcgan_dist.training.trainer import lower_rates

REAL = torch.tensor([2.0, -1.0, 0.25, 0.0, 3.5])
FAKE = torch.tensor([-3.0, 0.5, 1.5, -0.2])


def log_sigmoid(x: float) -> float:  # log(1 / (1 + e^-x)), written out
    return -math.log1p(math.exp(-x))


def mean(values) -> float:
    return sum(values) / len(values)


# The losses from their papers' formulas, one number at a time (no torch loss functions).
FORMULAS = {
    "bce": (
        lambda r, f: -mean([log_sigmoid(x) for x in r]) - mean([math.log(1 - 1 / (1 + math.exp(-x))) for x in f]),
        lambda f: -mean([log_sigmoid(x) for x in f]),
        lambda x: mean([1 / (1 + math.exp(-v)) for v in x]),
    ),
    "hinge": (
        lambda r, f: mean([max(0.0, 1 - x) for x in r]) + mean([max(0.0, 1 + x) for x in f]),
        lambda f: -mean(f),
        lambda x: mean([1.0 if v > 0 else 0.0 for v in x]),
    ),
    "ls": (
        lambda r, f: 0.5 * mean([(x - 1) ** 2 for x in r]) + 0.5 * mean([x**2 for x in f]),
        lambda f: 0.5 * mean([(x - 1) ** 2 for x in f]),
        lambda x: mean([1.0 if v > 0.5 else 0.0 for v in x]),
    ),
}


def test_the_registry_is_gan_loss_allowed_values():
    assert tuple(OBJECTIVES) == LOSSES == allowed_values("gan.loss")
    assert build_config("debug").gan.loss == "bce"  # the default recipe


@pytest.mark.parametrize("name", LOSSES)
def test_losses_and_scores_are_the_formulas(name):
    d_loss, g_loss, score = FORMULAS[name]
    obj = objective(name)
    r, f = REAL.tolist(), FAKE.tolist()
    assert obj.d_loss(REAL, FAKE).item() == pytest.approx(d_loss(r, f), rel=1e-6)
    assert obj.g_loss(FAKE).item() == pytest.approx(g_loss(f), rel=1e-6)
    assert obj.score(REAL).item() == pytest.approx(score(r), rel=1e-6)
    assert 0 <= obj.score(FAKE).item() <= 1


def test_an_unknown_objective_names_the_choices():
    with pytest.raises(ValueError, match="bce, hinge, ls"):
        objective("wasserstein")


MODEL = ModelSection(image_size=32, channels=3, nz=16, ngf=8, ndf=8)


@pytest.mark.parametrize("name", LOSSES)
def test_train_step_uses_the_objective(name):
    """train_step's loss_d is the objective's D loss of D before its update; the same keys for every objective."""
    G, D = build_models(MODEL, seed=1)
    opt_g, opt_d = make_optimizers(G, D, OptimSection())
    gen = torch.Generator().manual_seed(2)
    real, z = torch.rand(4, 3, 32, 32, generator=gen) * 2 - 1, torch.randn(4, 16, 1, 1, generator=gen)
    G0, D0 = copy.deepcopy(G), copy.deepcopy(D)
    out = train_step(G, D, opt_g, opt_d, real, z, objective=objective(name))
    with torch.no_grad():
        want = objective(name).d_loss(D0(real), D0(G0(z)))
    assert set(out) == {"loss_d", "loss_g", "d_real", "d_fake", "d_fake_after"}
    assert out["loss_d"].item() == pytest.approx(want.item(), rel=1e-5)
    assert all(torch.isfinite(v) for v in out.values())


# --- learning-rate schedules -------------------------------------------------------------------------------------


def test_constant_is_one_everywhere():
    assert [lr_factor("constant", s, 10) for s in (0, 5, 9, 10)] == [1.0] * 4


def test_linear_decays_to_zero_over_the_last_decay_steps():
    assert [lr_factor("linear", s, 10, 4) for s in (0, 5, 6, 7, 8, 9, 10)] == [1, 1, 1, 0.75, 0.5, 0.25, 0]
    # decay_steps=0: over the whole run; the first step has the full rate, the last one 1/max_steps of it.
    assert lr_factor("linear", 0, 10) == 1.0 and lr_factor("linear", 9, 10) == pytest.approx(0.1)
    # decay_steps longer than the run: it starts part of the way down the ramp.
    assert lr_factor("linear", 0, 10, 20) == 0.5 and lr_factor("linear", 9, 10, 20) == pytest.approx(0.05)


def test_cosine_is_half_a_cosine_over_max_steps():
    assert lr_factor("cosine", 0, 100) == 1.0
    assert lr_factor("cosine", 50, 100) == pytest.approx(0.5)
    assert lr_factor("cosine", 99, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.99)))
    assert lr_factor("cosine", 100, 100) == pytest.approx(0.0, abs=1e-12)
    values = [lr_factor("cosine", s, 100) for s in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_separate_rates_and_betas_default_to_the_shared_ones():
    shared = OptimSection(lr=3e-4, beta1=0.4, beta2=0.99)
    assert learning_rates(shared, 0, 10) == (3e-4, 3e-4)
    own = OptimSection(lr=3e-4, lr_d=1e-3, beta1_g=0.0, beta2_d=0.9, schedule="linear", decay_steps=4)
    assert learning_rates(own, 8, 10) == pytest.approx((1.5e-4, 5e-4))
    G, D = build_models(MODEL)
    opt_g, opt_d = make_optimizers(G, D, own)
    assert opt_g.param_groups[0]["lr"] == 3e-4 and opt_d.param_groups[0]["lr"] == 1e-3
    assert opt_g.param_groups[0]["betas"] == (0.0, 0.999) and opt_d.param_groups[0]["betas"] == (0.5, 0.9)
    for group in opt_g.param_groups + opt_d.param_groups:  # what a checkpoint of other settings restored
        group["lr"], group["betas"] = 1.0, (0.1, 0.2)
    set_hyperparameters(opt_g, opt_d, own, step=9, max_steps=10)
    lrs = opt_g.param_groups[0]["lr"], opt_d.param_groups[0]["lr"]
    assert lrs == pytest.approx((0.75e-4, 2.5e-4))
    assert opt_g.param_groups[0]["betas"] == (0.0, 0.999) and opt_d.param_groups[0]["betas"] == (0.5, 0.9)


def test_the_divergence_hint_names_the_keys_that_set_the_rates():
    assert lower_rates(OptimSection(lr=2e-4)) == "lower optim.lr (now 0.0002)"
    assert lower_rates(OptimSection(lr=2e-4, lr_d=1e-3)) == "lower optim.lr_g and optim.lr_d (now 0.0002 and 0.001)"


def test_pbt_perturbs_the_searched_g_and_d_rates():
    pytest.importorskip("ray.tune")
    from dcgan_dist.launch.sweep import parse_search, scheduler

    cfg = build_config("debug", ["train.eval_every=10"])
    searches = [parse_search(f"optim.{k}=loguniform(1e-4,1e-3)", cfg) for k in ("lr_g", "lr_d")]
    pbt = scheduler("pbt", cfg, searches)
    assert set(pbt._hyperparam_mutations) == {"optim.lr_g", "optim.lr_d"}

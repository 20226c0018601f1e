"""The GAN step on tiny tensors: what one call of train_step computes and changes (in-process, milliseconds)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from dcgan_dist.config import ModelSection, OptimSection
from dcgan_dist.gan.models import build_models
from dcgan_dist.gan.step import make_optimizers, train_step

MODEL = ModelSection(image_size=32, channels=3, nz=16, ngf=8, ndf=8)
BATCH = 4


def setup(seed: int = 0):
    G, D = build_models(MODEL, seed=seed)
    opt_g, opt_d = make_optimizers(G, D, OptimSection())
    gen = torch.Generator().manual_seed(seed + 100)
    real = torch.rand(BATCH, 3, 32, 32, generator=gen) * 2 - 1
    z = torch.randn(BATCH, MODEL.nz, 1, 1, generator=gen)
    return G, D, opt_g, opt_d, real, z


def params(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.named_parameters()}


def changed(before: dict, after: dict) -> list[str]:
    return [k for k in before if not torch.equal(before[k], after[k])]


def test_losses_are_those_of_the_dcgan_objective():
    """loss_d: BCE of D (before its update) on real=1 and G(z)=0; loss_g: BCE of the updated D on G(z)=1;
    computed here again from copies of the networks."""
    G, D, opt_g, opt_d, real, z = setup()
    G0, D0 = copy.deepcopy(G), copy.deepcopy(D)
    d_after_its_update = {}
    opt_d.register_step_post_hook(lambda opt, args, kwargs: d_after_its_update.update(D.state_dict()))

    out = train_step(G, D, opt_g, opt_d, real, z)

    with torch.no_grad():
        fake = G0(z)
        ones, zeros = torch.ones(BATCH), torch.zeros(BATCH)
        want_d = F.binary_cross_entropy_with_logits(D0(real), ones) + F.binary_cross_entropy_with_logits(
            D0(fake), zeros
        )
        D1 = copy.deepcopy(D0)
        D1.load_state_dict({k: v.clone() for k, v in d_after_its_update.items()})
        want_g = F.binary_cross_entropy_with_logits(D1(fake), ones)
    assert set(out) == {"loss_d", "loss_g", "d_real", "d_fake", "d_fake_after"}
    assert all(torch.isfinite(v) and v.dim() == 0 and not v.requires_grad for v in out.values())
    assert out["loss_d"].item() == pytest.approx(want_d.item(), rel=1e-5)
    assert out["loss_g"].item() == pytest.approx(want_g.item(), rel=1e-5)
    assert 0 < out["d_real"].item() < 1 and 0 < out["d_fake"].item() < 1


def test_both_networks_learn():
    G, D, opt_g, opt_d, real, z = setup()
    g0, d0 = params(G), params(D)
    train_step(G, D, opt_g, opt_d, real, z)
    # Adam's first step moves every parameter with a non-zero gradient by about lr.
    assert changed(g0, params(G)) == list(g0)
    assert changed(d0, params(D)) == list(d0)


def test_d_update_leaves_g_alone_and_g_update_leaves_d_alone():
    """At D's optimizer step G is untouched and holds no gradient (the fakes are detached); G's step then
    changes G only: D's parameters after the whole step are those of D's own update."""
    G, D, opt_g, opt_d, real, z = setup()
    g0 = params(G)
    seen = {}

    def grads(net):
        return [None if p.grad is None else p.grad.clone() for p in net.parameters()]

    def at_d_step(opt, args, kwargs):
        seen.update(g_at_d_step=params(G), g_grads_at_d_step=grads(G), d_grads_at_d_step=grads(D))

    opt_d.register_step_pre_hook(at_d_step)
    opt_d.register_step_post_hook(lambda opt, args, kwargs: seen.update(d_after_d_step=params(D)))
    opt_g.register_step_pre_hook(lambda opt, args, kwargs: seen.update(d_grads_at_g_step=grads(D)))

    train_step(G, D, opt_g, opt_d, real, z)

    assert changed(g0, seen["g_at_d_step"]) == []
    assert all(g is None for g in seen["g_grads_at_d_step"])
    assert changed(seen["d_after_d_step"], params(D)) == []
    # D is frozen for G's loss: G's backward adds nothing to D's gradients.
    assert all(g is not None for g in seen["d_grads_at_d_step"])
    assert all(torch.equal(a, b) for a, b in zip(seen["d_grads_at_d_step"], seen["d_grads_at_g_step"]))
    assert all(p.requires_grad for p in D.parameters())  # unfrozen again after the step


def test_deterministic_for_a_seed():
    runs = []
    for _ in range(2):
        G, D, opt_g, opt_d, real, z = setup(seed=7)
        outs = [train_step(G, D, opt_g, opt_d, real, z) for _ in range(3)]
        runs.append((outs, params(G), params(D)))
    (outs_a, g_a, d_a), (outs_b, g_b, d_b) = runs
    for a, b in zip(outs_a, outs_b):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert changed(g_a, g_b) == [] and changed(d_a, d_b) == []
    G, D, opt_g, opt_d, real, z = setup(seed=8)  # another seed: other weights, other losses
    assert train_step(G, D, opt_g, opt_d, real, z)["loss_d"] != outs_a[0]["loss_d"]

import pytest
import torch
from torch import nn

from dcgan_dist.config import build_config
from dcgan_dist.gan.models import Discriminator, Generator, build_models, init_weights


@pytest.mark.parametrize("size", [28, 32, 64, 128])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes(size, channels):
    G = Generator(nz=10, ngf=4, channels=channels, image_size=size)
    D = Discriminator(ndf=4, channels=channels, image_size=size)
    images = G(torch.randn(5, 10, 1, 1))
    assert images.shape == (5, channels, size, size)
    assert images.min() >= -1 and images.max() <= 1  # Tanh output
    assert D(images).shape == (5,)  # one logit per image
    assert G(torch.randn(5, 10)).shape == images.shape  # flat latents are accepted too


def test_unsupported_size_is_rejected():
    with pytest.raises(ValueError, match="image_size"):
        Generator(image_size=48)


def test_classic_64_layout():
    """The DCGAN-64 of the paper / PyTorch example: 4->8->16->32->64 with widths 8,4,2,1 x ngf."""
    G = Generator(nz=100, ngf=64, channels=3, image_size=64)
    convs = [m for m in G.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [c.out_channels for c in convs] == [512, 256, 128, 64, 3]
    assert isinstance(list(G.modules())[-1], nn.Tanh)
    D = Discriminator(ndf=64, channels=3, image_size=64)
    layers = list(D.net)
    assert isinstance(layers[0], nn.Conv2d) and isinstance(layers[1], nn.LeakyReLU)  # no BN on the first layer
    assert all(m.negative_slope == 0.2 for m in D.modules() if isinstance(m, nn.LeakyReLU))
    assert [m.out_channels for m in D.modules() if isinstance(m, nn.Conv2d)] == [64, 128, 256, 512, 1]
    assert not any(isinstance(m, nn.Linear) for m in D.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in D.modules()) == 3
    # Parameter counts of the PyTorch DCGAN faces example (3.58M G, 2.77M D).
    assert sum(p.numel() for p in G.parameters()) == 3576704
    assert sum(p.numel() for p in D.parameters()) == 2765568


def test_init_statistics():
    cfg = build_config(None, [])
    G, D = build_models(cfg.model, seed=1)
    for module in (G, D):
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.weight.numel() > 10000:
                assert abs(m.weight.mean().item()) < 2e-3
                assert m.weight.std().item() == pytest.approx(0.02, rel=0.05)
            if isinstance(m, nn.BatchNorm2d):
                assert m.weight.mean().item() == pytest.approx(1.0, abs=0.01)
                assert m.weight.std().item() == pytest.approx(0.02, rel=0.3)
                assert torch.count_nonzero(m.bias) == 0


def test_build_models_is_deterministic_per_seed():
    cfg = build_config(None, ["model.ngf=8", "model.ndf=8"])
    (g1, d1), (g2, d2), (g3, _) = build_models(cfg.model, 5), build_models(cfg.model, 5), build_models(cfg.model, 6)
    assert all(torch.equal(a, b) for a, b in zip(g1.state_dict().values(), g2.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(d1.state_dict().values(), d2.state_dict().values()))
    assert not torch.equal(g1.net[0].weight, g3.net[0].weight)


def test_init_weights_leaves_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    build_models(build_config(None, ["model.ngf=4", "model.ndf=4"]).model, seed=9)
    assert torch.equal(torch.rand(3), expected)
    m = nn.Conv2d(3, 3, 3)
    init_weights(m)
    assert torch.count_nonzero(m.bias) == 0

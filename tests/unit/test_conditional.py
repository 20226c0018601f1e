"""Class-conditional models in-process: what G and D do with labels, train_step with labels, and the Trainer's side
of labelled shards (the classes read from dataset.json; unlabelled shards refused before any run file).

Labelled shards are real: synthetic faces labelled by skin tone (light, medium, dark) in dataset.json and .cls
members; unlabelled ones are the same faces without labels."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from dcgan_dist.config import ConfigError, ModelSection, OptimSection, build_config
from dcgan_dist.data import shards as shard_sets
from dcgan_dist.data import write_synthetic_shards
from dcgan_dist.gan.models import build_models, generate
from dcgan_dist.gan.objectives import objective
from dcgan_dist.gan.step import make_optimizers, train_step
from dcgan_dist.training import checkpoint as ckpt
from dcgan_dist.training import trainer as trainer_lib

K = 3
MODEL = ModelSection(image_size=32, channels=3, nz=16, ngf=8, ndf=8, conditional=True, num_classes=K)


def test_unconditional_settings_build_the_unconditional_models():
    """model.num_classes is ignored without model.conditional: the default models, whatever the shards say."""
    g0, d0 = build_models(replace(MODEL, conditional=False, num_classes=0), seed=3)
    g1, d1 = build_models(replace(MODEL, conditional=False), seed=3)
    for a, b in ((g0, g1), (d0, d1)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert "embed.weight" not in d0.state_dict()


def test_a_conditional_model_without_classes_is_refused():
    with pytest.raises(ValueError, match="model.num_classes"):
        build_models(replace(MODEL, num_classes=0))


def test_g_takes_the_one_hot_class_with_z():
    G, _ = build_models(MODEL, seed=0)
    assert G.net[0].in_channels == MODEL.nz + K
    z = torch.randn(2, MODEL.nz, 1, 1)
    G.eval()
    assert torch.equal(G(z), G(z, torch.tensor([0, 1])))  # without labels: the classes in turn
    a, b = G(z, torch.tensor([0, 0])), G(z, torch.tensor([1, 1]))
    assert not torch.allclose(a, b)
    assert torch.equal(G(z, torch.tensor([0, 1]))[1], b[1])  # a row's class only changes that row


def test_generate_draws_the_same_latents_whatever_the_labels():
    """Style held, class changed: with the class columns of G's first layer zeroed, the class cannot matter, so
    equal images mean equal latent vectors."""
    G, _ = build_models(MODEL, seed=0)
    G.eval()
    with torch.no_grad():
        G.net[0].weight[MODEL.nz :] = 0
    zeros, twos = torch.zeros(5, dtype=torch.long), torch.full((5,), 2)
    assert torch.equal(generate(G, 5, seed=4, labels=zeros), generate(G, 5, seed=4, labels=twos))
    assert torch.equal(generate(G, 5, seed=4), generate(G, 5, seed=4, labels=torch.arange(5) % K))  # default


def test_d_is_a_projection_discriminator():
    """D(x, y) - D(x, y') = <embed(y) - embed(y'), h summed over positions>, h the input of D's last conv."""
    _, D = build_models(MODEL, seed=0)
    D.eval()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    seen = {}
    with pytest.raises(ValueError, match="pass labels"):
        D(x)
    D.net[-1].register_forward_hook(lambda mod, args, out: seen.update(h=args[0]))
    y, y2 = torch.tensor([0, 1, 2, 0]), torch.tensor([1, 1, 0, 2])
    with torch.no_grad():
        diff = D(x, y) - D(x, y2)
        pooled = seen["h"].sum(dim=(2, 3))
        want = ((D.embed.weight[y] - D.embed.weight[y2]) * pooled).sum(dim=1)
    assert torch.allclose(diff, want, atol=1e-5)
    assert D.embed.weight.std().item() == pytest.approx(0.02, rel=0.3)  # initialised like the convs


@pytest.mark.parametrize("loss", ["bce", "hinge", "ls"])
def test_train_step_draws_the_fakes_for_the_real_labels(loss):
    G, D = build_models(MODEL, seed=1)
    opt_g, opt_d = make_optimizers(G, D, OptimSection())
    called = []
    G.register_forward_pre_hook(lambda mod, args: called.append(args[1].clone()))
    real, z, labels = torch.rand(4, 3, 32, 32) * 2 - 1, torch.randn(4, 16, 1, 1), torch.tensor([2, 0, 1, 2])
    embed0 = D.embed.weight.detach().clone()
    out = train_step(G, D, opt_g, opt_d, real, z, objective=objective(loss), labels=labels)
    assert all(torch.isfinite(v) for v in out.values())
    assert len(called) == 1 and torch.equal(called[0], labels)
    assert not torch.equal(D.embed.weight, embed0)  # the projection learns


# --- the Trainer and labelled shards -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "faces"
    write_synthetic_shards(out, 128, shard_size=64, size=32, seed=3, processes=1, progress=False)
    return out


def settings(shards, run_dir, *more: str):
    return build_config(
        "debug",
        [
            "model.image_size=32",
            "model.nz=16",
            "model.ngf=8",
            "model.ndf=8",
            "train.batch_size=8",
            "train.num_threads=1",
            "train.device=cpu",
            "train.precision=fp32",
            "train.channels_last=false",
            "train.eval_every=0",
            "train.ema_decay=0",
            "train.sample_every=0",
            "train.log_every=1",
            "data.num_workers=0",
            "data.shuffle_buffer=16",
            "wandb.mode=disabled",
            "model.conditional=true",
            f"data.shards={shards}",
            f"run.dir={run_dir}",
            *more,
        ],
    )


def test_a_conditional_model_refuses_unlabelled_shards_before_any_run_file(shards, tmp_path):
    assert shard_sets.read_classes(str(shards)) is None
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError) as error:
        trainer_lib.check_settings(settings(shards, run_dir))
    message = str(error.value)
    assert "\n" not in message and "model.conditional=true" in message and "no class labels" in message
    with pytest.raises(ConfigError):
        trainer_lib.Trainer(settings(shards, run_dir))
    assert not run_dir.exists() or not any(run_dir.iterdir())


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    out = tmp_path_factory.mktemp("labelled") / "faces"
    write_synthetic_shards(out, 128, shard_size=64, size=32, seed=3, processes=1, progress=False, labels="skin")
    return out


def test_the_trainer_trains_a_conditional_model_on_labelled_shards(tmp_path, labelled):
    run_dir = tmp_path / "run"
    result = trainer_lib.Trainer(settings(labelled, run_dir, "train.max_steps=4", "gan.loss=hinge")).fit()
    assert result.step == 4
    written = build_config(str(run_dir / "config.yaml"))
    assert (written.model.num_classes, written.model.class_names) == (3, ["light", "medium", "dark"])
    G, state, _ = ckpt.load_generator(run_dir)  # sample/evaluate: the model from the checkpoint's settings
    assert G.num_classes == 3 and state["step"] == 4 and "embed.weight" in state["D"]
    assert generate(G, 6, seed=1).shape == (6, 3, 32, 32)


def test_a_conditional_run_resumes_bit_exactly(tmp_path, labelled):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    more = ["train.checkpoint_every=3", "train.max_steps=6", "optim.schedule=cosine", "optim.lr_d=4e-4"]
    trainer_lib.Trainer(settings(labelled, straight, *more)).fit()

    def crash(step, env, images, labels=None):
        if step == 5:  # after the checkpoint of step 3: steps 4 and 5 are trained again
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError, match="crash"):
        trainer_lib.Trainer(settings(labelled, resumed, *more), hooks=[crash]).fit()
    assert trainer_lib.Trainer(settings(labelled, resumed, *more)).fit().step == 6
    a, b = (ckpt.load(d / "checkpoints" / "step_0000006.pt") for d in (straight, resumed))
    for net in ("G", "D"):
        assert all(torch.equal(v, b[net][k]) for k, v in a[net].items()), net
    assert all(torch.equal(v, b["opt_d"]["state"][0][k]) for k, v in a["opt_d"]["state"][0].items())

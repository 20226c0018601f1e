"""SWD behaves like a distance on controlled cases; evaluate, EMA and best-checkpoint tracking work end to end."""

import functools
import json

import numpy as np
import pytest
import torch

from dcgan_dist.config import build_config
from dcgan_dist.data import ImageBatches
from dcgan_dist.gan.quality import frechet_distance, laplacian_pyramid
from dcgan_dist.gan.quality import swd as quality_swd
from dcgan_dist.training import checkpoint as ckpt
from dcgan_dist.training.metrics import read_metrics
from dcgan_dist.training.trainer import Trainer

from .conftest import TINY, run_cli


@pytest.fixture(scope="module")
def faces(tiny_shards):
    return next(ImageBatches(str(tiny_shards), 512, seed=0))[0]  # the whole set, uint8


def test_pyramid_reconstructs_the_image():
    x = torch.rand(2, 3, 32, 32) * 255
    levels = laplacian_pyramid(x)
    assert [lvl.shape[-1] for lvl in levels] == [32, 16]
    from dcgan_dist.gan.quality import _pyr_up

    assert torch.allclose(levels[0] + _pyr_up(levels[1], (32, 32)), x, atol=1e-3)


def test_swd_identical_different_and_approaching(faces):
    # One repeat of 128 random directions (evaluation uses 4): a quarter of the work, the same margins here.
    swd = functools.partial(quality_swd, repeats=1)
    noise = torch.randint(0, 256, faces.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    same = swd(faces, faces).mean
    different = swd(faces, noise).mean
    assert different > 100 and same < 0.05 * different  # same set: only patch-sampling noise remains
    # Images that move from noise towards the data get monotonically closer.
    values = []
    for t in (0.0, 0.5, 0.8, 0.95, 1.0):
        mix = ((1 - t) * noise.float() + t * faces.float()).round().to(torch.uint8)
        values.append(swd(faces, mix, seed=1).mean)
    assert all(a > b for a, b in zip(values, values[1:])), values
    # Blurred faces (wrong fine detail) are far at the finest level, closer at coarse ones.
    blurred = torch.nn.functional.avg_pool2d(faces.float(), 2).repeat_interleave(2, -1).repeat_interleave(2, -2)
    levels = swd(faces, blurred.round().to(torch.uint8)).per_level
    assert levels[0] > 3 * levels[-1]


def test_frechet_distance_of_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 4))
    sigma = a @ a.T + np.eye(4)
    assert frechet_distance(np.zeros(4), sigma, np.zeros(4), sigma) == pytest.approx(0, abs=1e-8)
    # Diagonal covariances: sum of (mu diff)^2 + (sqrt(s1) - sqrt(s2))^2.
    s1, s2 = np.diag([1.0, 4.0]), np.diag([9.0, 1.0])
    assert frechet_distance(np.array([0.0, 1.0]), s1, np.array([2.0, 1.0]), s2) == pytest.approx(4 + 4 + 1)


@pytest.fixture(scope="module")
def trained_run(tiny_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("quality")
    cfg = build_config(
        "debug",
        [
            *TINY,
            f"data.shards={tiny_shards}",
            f"run.dir={run_dir}",
            "model.ngf=16",
            "model.ndf=16",
            "train.batch_size=32",
            "train.max_steps=120",
            "train.ema_decay=0.95",
            "train.eval_every=30",
            "eval.num=128",
            "eval.nhoods_per_image=16",
            "train.checkpoint_every=60",
            "train.sample_every=60",
            "train.log_every=30",
        ],
    )
    return run_dir, Trainer(cfg).fit()


def test_best_checkpoint_tracks_the_best_swd(trained_run):
    run_dir, _ = trained_run
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if "swd" in r]
    assert [r["step"] for r in evals] == [30, 60, 90, 120]
    best = min(evals, key=lambda r: r["swd"])
    state = ckpt.load(run_dir / "checkpoints" / "best.pt")
    assert state["step"] == best["step"] and state["best"]["swd"] == pytest.approx(best["swd"])
    assert ckpt.load(run_dir / "checkpoints" / "step_0000120.pt")["best"]["swd"] == pytest.approx(best["swd"])
    # The best checkpoint holds the weights of that step; `sample` and `evaluate` read it like any other.
    assert set(state) >= {"G", "D", "ema", "config"} and "opt_g" not in state
    assert (run_dir / "progress.gif").is_file()


def test_ema_weights_differ_from_raw(trained_run):
    run_dir, _ = trained_run
    state = ckpt.load(run_dir / "checkpoints" / "step_0000120.pt")
    diffs = [
        (state["ema"][k].float() - v.float()).abs().max().item() for k, v in state["G"].items() if k.endswith("weight")
    ]
    assert max(diffs) > 1e-4


def test_evaluate_without_inception_prints_null_fid(trained_run, tiny_shards, tmp_path):
    run_dir, _ = trained_run
    proc = run_cli(
        "-m",
        "dcgan_dist.evaluate",
        "--checkpoint",
        str(run_dir),
        "eval.num=128",
        "eval.nhoods_per_image=16",
        "eval.untrained=true",
        f"eval.inception_weights={tmp_path / 'none.pth'}",
        check=True,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["fid"] is None and "not found" in result["fid_reason"]
    assert result["weights"] == "ema" and result["step"] == 120
    assert set(result["swd_levels"]) == {"32", "16"}
    # Trained beats untrained; real-vs-real is the floor.
    assert result["swd_real_vs_real"] < result["swd"] < result["swd_untrained"]


def test_progress_gif_on_demand(trained_run, tmp_path):
    run_dir, _ = trained_run
    out = tmp_path / "p.gif"
    run_cli("-m", "dcgan_dist.sample", "--progress", str(run_dir), "--out", str(out), check=True)
    from PIL import Image

    with Image.open(out) as gif:
        assert gif.n_frames == 2  # steps 60 and 120

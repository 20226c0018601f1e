"""The GPU-path options (train.precision, channels_last, compile) run correctly on CPU."""

import math

import pytest

from dcgan_dist import checkpoint as ckpt
from dcgan_dist.config import build_config
from dcgan_dist.metrics import read_metrics
from dcgan_dist.trainer import Trainer

from .conftest import TINY


def run(tmp_path, tiny_shards, *overrides, steps=8):
    cfg = build_config("debug", [*TINY, f"data.shards={tiny_shards}", f"run.dir={tmp_path}", f"train.max_steps={steps}",
                                 "train.log_every=4", "train.sample_every=0", "train.checkpoint_every=0", *overrides])
    Trainer(cfg).fit()
    return read_metrics(tmp_path / "metrics.jsonl")


@pytest.mark.parametrize("options", [
    ["train.precision=bf16"],
    ["train.precision=fp16"],
    ["train.channels_last=true"],
])
def test_options_train_with_finite_losses(tmp_path, tiny_shards, options):
    records = run(tmp_path, tiny_shards, *options)
    assert [r["step"] for r in records] == [4, 8]
    assert all(math.isfinite(r["loss_d"]) and math.isfinite(r["loss_g"]) for r in records)


def test_channels_last_matches_the_plain_step(tmp_path, tiny_shards):
    """Same math in another memory layout: the losses agree to float32 rounding."""
    plain = run(tmp_path / "a", tiny_shards, steps=4)
    fast = run(tmp_path / "b", tiny_shards, "train.channels_last=true", steps=4)
    assert fast[0]["loss_d"] == pytest.approx(plain[0]["loss_d"], rel=1e-3)
    assert fast[0]["loss_g"] == pytest.approx(plain[0]["loss_g"], rel=1e-3)


@pytest.mark.slow
def test_compile(tmp_path, tiny_shards):
    records = run(tmp_path, tiny_shards, "train.compile=true", steps=4)
    assert math.isfinite(records[-1]["loss_d"])


def test_fp16_scaler_state_is_checkpointed(tmp_path, tiny_shards):
    cfg = build_config("debug", [*TINY, f"data.shards={tiny_shards}", f"run.dir={tmp_path}", "train.max_steps=3",
                                 "train.precision=fp16", "train.sample_every=0"])
    Trainer(cfg).fit()
    state = ckpt.load(tmp_path / "checkpoints" / "step_0000003.pt")
    assert set(state["precision"]) == {"d", "g"} and state["precision"]["d"]["scale"] > 0

"""The speed options (train.precision, channels_last, compile) run correctly on CPU, and "auto" resolves to
what the device runs fast, once, recorded in the run."""

import math
from pathlib import Path

import pytest
import torch

from dcgan_dist.config import build_config, from_yaml
from dcgan_dist.gan import precision as precision_lib
from dcgan_dist.gan.precision import Precision, resolve
from dcgan_dist.training import checkpoint as ckpt
from dcgan_dist.training.metrics import read_metrics
from dcgan_dist.training.trainer import Trainer

from .conftest import TINY

CPU = torch.device("cpu")


def run(tmp_path, tiny_shards, *overrides, steps=8):
    cfg = build_config(
        "debug",
        [
            *TINY,
            f"data.shards={tiny_shards}",
            f"run.dir={tmp_path}",
            f"train.max_steps={steps}",
            "train.log_every=4",
            "train.sample_every=0",
            "train.checkpoint_every=0",
            *overrides,
        ],
    )
    Trainer(cfg).fit()
    return read_metrics(tmp_path / "metrics.jsonl")


@pytest.mark.parametrize(
    "options",
    [
        ["train.precision=bf16"],
        ["train.precision=fp16"],
        ["train.channels_last=true"],
    ],
)
def test_options_train_with_finite_losses(tmp_path, tiny_shards, options):
    records = run(tmp_path, tiny_shards, *options)
    assert [r["step"] for r in records] == [4, 8]
    assert all(math.isfinite(r["loss_d"]) and math.isfinite(r["loss_g"]) for r in records)


def test_channels_last_matches_the_plain_step(tmp_path, tiny_shards):
    """Same math in another memory layout: the losses agree to float32 rounding."""
    plain = run(tmp_path / "a", tiny_shards, "train.precision=fp32", "train.channels_last=false", steps=4)
    fast = run(tmp_path / "b", tiny_shards, "train.precision=fp32", "train.channels_last=true", steps=4)
    assert fast[0]["loss_d"] == pytest.approx(plain[0]["loss_d"], rel=1e-3)
    assert fast[0]["loss_g"] == pytest.approx(plain[0]["loss_g"], rel=1e-3)


@pytest.mark.slow
def test_compile(tmp_path, tiny_shards):
    records = run(tmp_path, tiny_shards, "train.compile=true", steps=4)
    assert math.isfinite(records[-1]["loss_d"])


def test_fp16_scaler_state_is_checkpointed(tmp_path, tiny_shards):
    cfg = build_config(
        "debug",
        [
            *TINY,
            f"data.shards={tiny_shards}",
            f"run.dir={tmp_path}",
            "train.max_steps=3",
            "train.precision=fp16",
            "train.sample_every=0",
        ],
    )
    Trainer(cfg).fit()
    state = ckpt.load(tmp_path / "checkpoints" / "step_0000003.pt")
    assert set(state["precision"]) == {"d", "g"} and state["precision"]["d"]["scale"] > 0


@pytest.mark.parametrize(
    "flags, onednn, expected",
    [
        ({"avx2", "fma", "avx512f", "avx512_bf16"}, True, ("bf16", True)),
        ({"avx2", "fma", "amx_tile", "amx_bf16", "avx512f"}, True, ("bf16", True)),
        ({"avx2", "fma", "avx512f", "avx512_bf16"}, False, ("fp32", True)),  # oneDNN would not use it: fp32
        ({"avx2", "fma"}, True, ("fp32", False)),  # no bf16 unit, no AVX-512: as before
        (set(), True, ("fp32", False)),  # no /proc/cpuinfo (not Linux)
    ],
)
def test_auto_resolves_from_the_cpu_flags(monkeypatch, flags, onednn, expected):
    monkeypatch.setattr(precision_lib, "cpu_flags", lambda: flags)
    monkeypatch.setattr(precision_lib, "_onednn_bf16", lambda: onednn)
    speed = resolve("auto", "auto", CPU)
    assert (speed.precision, speed.channels_last) == expected
    assert f"precision=auto -> {expected[0]}" in speed.reason and "channels_last=auto -> " in speed.reason


def test_concrete_settings_are_kept():
    assert resolve("fp16", False, CPU) == precision_lib.Speed("fp16", False, "precision=fp16; channels_last=false")
    assert resolve("fp32", True, CPU).channels_last is True


def test_unresolved_precision_is_refused():
    with pytest.raises(ValueError, match="not resolved"):
        Precision("auto")


def _flags_from_proc_cpuinfo() -> set[str]:
    """The test's own reading of /proc/cpuinfo (x86: the first "flags" line)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return set()
    return next((set(line.partition(":")[2].split()) for line in lines if line.startswith("flags")), set())


def test_this_machine_resolves_auto_to_what_its_flags_say():
    """Not mocked: the detection on the machine the tests run on agrees with /proc/cpuinfo, read here, and the rule
    from the data sheets: bf16 when the CPU has a bf16 unit (AVX512-BF16 or AMX-BF16) and oneDNN runs bf16 on it,
    which on x86 needs AVX-512 core (F, BW, VL, DQ); anything else (no such flags, another architecture) fp32."""
    flags = _flags_from_proc_cpuinfo()
    unit = bool(flags & {"avx512_bf16", "amx_bf16"})
    avx512_core = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
    expected = "bf16" if unit and avx512_core and torch.backends.mkldnn.is_available() else "fp32"
    assert resolve("auto", "auto", CPU).precision == expected


def test_a_run_prints_and_records_what_auto_resolved_to(tmp_path, tiny_shards, capsys):
    cfg = build_config(
        "debug",
        [*TINY, f"data.shards={tiny_shards}", f"run.dir={tmp_path}", "train.max_steps=2", "train.sample_every=0"],
    )
    assert (cfg.train.precision, cfg.train.channels_last) == ("auto", "auto")  # the defaults
    expected = resolve("auto", "auto", CPU)
    Trainer(cfg).fit()
    assert f"Speed: {expected.reason}" in capsys.readouterr().out
    recorded = from_yaml((tmp_path / "config.yaml").read_text()).train
    assert (recorded.precision, recorded.channels_last) == (expected.precision, expected.channels_last)
    state = ckpt.load(tmp_path / "checkpoints" / "step_0000002.pt")
    assert state["config"]["train"]["precision"] == expected.precision
    assert state["config"]["train"]["channels_last"] is expected.channels_last


def test_fp16_run_resumes_in_bf16_without_its_scalers(tmp_path, tiny_shards):
    """Only fp16 has precision state: a resume in another precision drops it and trains on."""
    base = [*TINY, f"data.shards={tiny_shards}", f"run.dir={tmp_path}", "train.sample_every=0"]
    Trainer(build_config("debug", [*base, "train.max_steps=2", "train.precision=fp16"])).fit()
    result = Trainer(build_config("debug", [*base, "train.max_steps=4", "train.precision=bf16"])).fit()
    assert result.step == 4 and math.isfinite(result.metrics["loss_d"])
    state = ckpt.load(tmp_path / "checkpoints" / "step_0000004.pt")
    assert state["precision"] == {} and state["config"]["train"]["precision"] == "bf16"

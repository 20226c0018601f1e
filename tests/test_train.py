"""Real training runs on tiny models: outputs, kill + resume equivalence, learning, sampling."""

import signal

import pytest
import torch
import torch.nn.functional as F

from dcgan_dist import checkpoint as ckpt
from dcgan_dist.config import build_config
from dcgan_dist.data import ImageBatches, normalise
from dcgan_dist.loop import train
from dcgan_dist.models import build_models
from dcgan_dist.reporting import read_metrics
from dcgan_dist.sample import generate, load_generator

from .conftest import TINY, run_cli

METRIC_KEYS = {"step", "loss_d", "loss_g", "d_real", "d_fake", "images_per_s"}


def test_cli_run_writes_checkpoints_samples_metrics_and_resumes(tmp_path, tiny_shards):
    run_dir = tmp_path / "run"
    args = ["-m", "dcgan_dist.train", "--config", "debug", *TINY, f"data.shards={tiny_shards}", f"run.dir={run_dir}",
            "train.max_steps=6", "train.checkpoint_every=3", "train.sample_every=2", "train.log_every=2"]
    proc = run_cli(*args, check=True)
    assert "Done: step 6" in proc.stdout
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_0000003.pt", "step_0000006.pt"]
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [f"step_000000{i}.png" for i in (2, 4, 6)]
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4, 6]
    assert all(METRIC_KEYS <= set(r) and r["images_per_s"] > 0 for r in records)
    assert build_config(str(run_dir / "config.yaml"), []).train.max_steps == 6  # the resolved config, reloadable
    state = ckpt.load(run_dir / "checkpoints" / "step_0000006.pt")
    assert {"generator", "discriminator", "opt_g", "opt_d", "step", "ranks", "config"} <= set(state)
    assert {"data", "rng"} <= set(state["ranks"][0])  # per-rank stream position and RNG states

    # The same command again: nothing left to do. A higher max_steps: resumes from step 6.
    proc = run_cli(*args, check=True)
    assert "Already trained to step 6" in proc.stdout
    proc = run_cli(*args, "train.max_steps=8", check=True)
    assert "Resuming from" in proc.stdout and "step_0000006.pt" in proc.stdout and "Done: step 8" in proc.stdout

    # A different model in the same run dir is refused with the differing keys named.
    proc = run_cli(*args, "train.max_steps=10", "model.ngf=16")
    assert proc.returncode != 0 and "model.ngf: 8 -> 16" in proc.stderr

    # Sampling from the run.
    out = tmp_path / "grid.png"
    proc = run_cli("-m", "dcgan_dist.sample", "--checkpoint", str(run_dir), "--num", "16", "--out", str(out), check=True)
    assert out.is_file() and "from step 8" in proc.stdout


def test_killed_run_resumes_to_the_same_parameters(tmp_path, tiny_shards):
    """SIGKILL mid-run, rerun the same command: bit-exact equal to an uninterrupted run (CPU, tolerance 0)."""
    common = ["-m", "dcgan_dist.train", "--config", "debug", *TINY, f"data.shards={tiny_shards}",
              "data.num_workers=2", "train.max_steps=12", "train.checkpoint_every=5", "train.sample_every=0",
              "train.log_every=1", "train.ema_decay=0.9"]
    whole = run_cli(*common, f"run.dir={tmp_path / 'whole'}", check=True)
    assert "Done: step 12" in whole.stdout

    crashed_dir = tmp_path / "crashed"
    crash = run_cli(*common, f"run.dir={crashed_dir}", "fault.crash_at_step=7")
    assert crash.returncode == -signal.SIGKILL, crash.stderr  # really killed, after step 7
    assert [s for s, _ in ckpt.list_checkpoints(crashed_dir / "checkpoints")] == [5]
    resumed = run_cli(*common, f"run.dir={crashed_dir}", "fault.crash_at_step=7", check=True)
    assert "step_0000005.pt (step 5)" in resumed.stdout and "Done: step 12" in resumed.stdout

    a = ckpt.load(tmp_path / "whole" / "checkpoints" / "step_0000012.pt")
    b = ckpt.load(crashed_dir / "checkpoints" / "step_0000012.pt")
    for part in ("generator", "discriminator", "generator_ema"):  # the EMA is restored on resume too
        for name, tensor in a[part].items():
            assert torch.equal(tensor, b[part][name]), f"{part}.{name} differs after resume"
    for part in ("opt_g", "opt_d"):
        for key, st in a[part]["state"].items():
            for name in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(st[name], b[part]["state"][key][name])
    assert torch.equal(a["ranks"][0]["rng"]["noise"], b["ranks"][0]["rng"]["noise"])
    # metrics.jsonl shows the recovery: steps 6-7 logged twice (before the kill and after the resume).
    steps = [r["step"] for r in read_metrics(crashed_dir / "metrics.jsonl")]
    assert steps == list(range(1, 8)) + list(range(6, 13))


def _layout_gap(G, real: torch.Tensor) -> float:
    """How far G's samples are from the data in coarse layout: mean and spread of 4x4 block colours."""
    fake = generate(G, real.shape[0], seed=123)
    f, r = F.avg_pool2d(fake, 8), F.avg_pool2d(real, 8)
    return ((f.mean(0) - r.mean(0)).abs().mean() + (f.std(0) - r.std(0)).abs().mean()).item()


def test_both_networks_learn_on_synthetic_faces(tmp_path, tiny_shards):
    cfg = build_config("debug", [*TINY, f"data.shards={tiny_shards}", f"run.dir={tmp_path}", "model.ngf=16",
                                 "model.ndf=16", "train.batch_size=32", "train.max_steps=300",
                                 "train.checkpoint_every=0", "train.sample_every=0", "train.log_every=10"])
    G0, _ = build_models(cfg.model, seed=cfg.run.seed)
    result = train(cfg)
    records = read_metrics(tmp_path / "metrics.jsonl")
    # D learns: it separates real from fake early on (steps 10-50) ...
    assert all(r["d_real"] > r["d_fake"] + 0.1 for r in records[:5])
    # ... and its loss falls from the chance value 2*log(2) = 1.39.
    assert records[0]["loss_d"] > 1.0 and sum(r["loss_d"] for r in records[-10:]) / 10 < 0.8
    # G learns: the coarse colour layout of its samples moves towards the data's (seeded, 1 thread: deterministic;
    # measured 0.45 -> 0.39 here). Issue-level quality (SWD) is measured by the evaluate command.
    real = normalise(next(ImageBatches(str(tiny_shards), 256, seed=9)), "cpu")
    G, _, _ = load_generator(result.checkpoint)
    before, after = _layout_gap(G0.eval(), real), _layout_gap(G, real)
    assert after < 0.9 * before, (before, after)


def test_no_arguments_uses_the_quickstart_preset():
    from dcgan_dist.train import parse

    cfg = parse([])
    assert cfg.run.name == "debug" and cfg.dist.launcher == "local"


@pytest.mark.slow
def test_debug_preset_end_to_end(tmp_path):
    """The README's run command, as is (minus the output folder): ~1.5 minutes on 2 cores."""
    proc = run_cli("-m", "dcgan_dist.train", "--config", "configs/debug.yaml", f"run.dir={tmp_path}",
                   f"data.cache_dir={tmp_path / 'cache'}", timeout=900, check=True)
    assert "Done: step 1500" in proc.stdout
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert records[-1]["d_real"] > records[-1]["d_fake"]

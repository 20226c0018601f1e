"""Sweeps for real: `python -m dcgan_dist.tune` on the session's local Ray cluster, every trial a 2-worker Ray Train
run (gloo, synchronised batch norm) of a tiny model, scored by the in-training SWD."""

import sys

import pytest
import torch

from dcgan_dist.training import checkpoint as ckpt
from dcgan_dist.training.metrics import read_metrics

from .conftest import TINY, extra_ray_node, read_result, run_cli, run_with_env

# slow: each sweep is several multi-worker Ray Train runs (~1.5-2 min each on 2 cores).
pytestmark = pytest.mark.slow

pytest.importorskip("ray")


def sweep_args(shards, run_dir, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "dcgan_dist.tune",
        "--config",
        "debug",
        *TINY,
        "dist.num_workers=2",
        f"data.shards={shards}",
        f"run.dir={run_dir}",
        f"run.name={run_dir.name}",
        "train.max_steps=8",
        "train.eval_every=2",
        "eval.num=32",
        "eval.nhoods_per_image=4",
        "train.sample_every=0",
        "train.log_every=2",
        "wandb.mode=offline",
        *extra,
    ]


def trials(run_dir) -> list[dict]:
    """The sweep's trials as its result.json records them, best SWD first."""
    result = read_result(run_dir)
    assert result["command"] == "tune"
    return result["trials"]


def test_an_asha_sweep_stops_trials_early_and_its_best_checkpoint_samples(ray_cluster, tiny_shards, tmp_path):
    """2 trials x 2 workers, one after the other (deterministic decisions): ASHA compares them at step 4 and stops
    the worse (lr 0.002: SWD ~260 at step 4 against ~254 for lr 0.0002 here); the table's best SWD is the lowest any
    trial's own metrics.jsonl records; the best checkpoint samples."""
    run_dir = tmp_path / "asha"
    proc = run_with_env(
        sweep_args(
            tiny_shards,
            run_dir,
            "--search",
            "optim.lr=grid(0.0002,0.002)",
            "tune.trials=1",
            "tune.scheduler=asha",
            "tune.concurrent=1",
        ),
        ray_cluster,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    rows = trials(run_dir)
    assert len(rows) == 2 and {r["params"]["optim.lr"] for r in rows} == {0.0002, 0.002}
    steps = {r["trial"]: r["steps"] for r in rows}
    by_lr = {r["params"]["optim.lr"]: r["steps"] for r in rows}
    assert by_lr[0.0002] == 8 and by_lr[0.002] < 8, by_lr  # trained to the end / stopped early
    # Each trial's own record (its run in <run.dir>/trials/<trial>), up to the step Tune last heard of.
    lowest = min(
        r["swd"]
        for trial, last in steps.items()
        for r in read_metrics(run_dir / "trials" / trial / "metrics.jsonl")
        if "swd" in r and r["step"] <= last
    )
    assert rows[0]["best_swd"] == pytest.approx(lowest, abs=1e-4)
    best = read_result(run_dir)["best_checkpoint"]
    state = ckpt.load_checkpoint(best)[1]
    assert state["config"]["optim"]["lr"] == pytest.approx(rows[0]["params"]["optim.lr"], rel=1e-3)
    sample = run_cli(
        "-m", "dcgan_dist.sample", "--checkpoint", best, "sample.num=4", "--out", str(tmp_path / "s.png"), check=True
    )
    assert (tmp_path / "s.png").is_file(), sample.stdout


@pytest.fixture
def room_for_two_trials(ray_cluster):
    with extra_ray_node(ray_cluster, 2):
        yield


def test_a_pbt_sweep_continues_the_worse_trial_from_the_better_ones_weights(
    ray_cluster, room_for_two_trials, tiny_shards, tmp_path
):
    """2 trials side by side; at step 4 (PBT, synchronous) the worse continues from the better one's checkpoint with
    a perturbed learning rate."""
    run_dir = tmp_path / "pbt"
    proc = run_with_env(
        sweep_args(
            tiny_shards, run_dir, "--search", "optim.lr=loguniform(1e-4,1e-3)", "tune.trials=2", "tune.scheduler=pbt"
        ),
        ray_cluster,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert read_result(run_dir)["side_by_side"] == 2
    # The exploits, as result.json records them: a trial continued from the other trial's checkpoint of step 4.
    moves = read_result(run_dir)["exploits"]
    assert moves and all(m["trial"] != m["from_trial"] for m in moves), moves
    to, source = moves[0]["trial"], moves[0]["from_trial"]
    path = run_dir / "trials" / to / "start" / f"{moves[0]['train_run']}.pt"  # the copy it started from
    copied = ckpt.load(path)
    assert copied["step"] == 4
    # Tune's copy holds the source trial's weights at step 4, as its own Ray Train run saved them.
    saved = list((run_dir / "trials" / source / "ray").glob(f"{source}*/step_0000004/state.pt"))
    assert saved and all(torch.equal(v, ckpt.load(saved[0])["G"][k]) for k, v in copied["G"].items())
    # The trial that took them trained on from step 4 to the end with a perturbed learning rate.
    runs = list((run_dir / "trials" / to / "ray").glob(f"{to}-from-*/step_0000008/state.pt"))
    assert runs, sorted(str(p) for p in (run_dir / "trials" / to).rglob("state.pt"))
    final = ckpt.load(runs[-1])["config"]["optim"]["lr"]
    assert final != pytest.approx(copied["config"]["optim"]["lr"])

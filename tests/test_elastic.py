"""Elastic training on a real local Ray cluster: the session's two one-CPU nodes plus a third one that this module
starts (and one test takes away). Tiny models on CPU/gloo; the shards are tagged images, so that what every
rank trained on at every step can be counted (tests/step_hooks.py --record)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dcgan_dist.training import checkpoint as ckpt
from dcgan_dist.training.metrics import read_metrics

from .conftest import ROOT, TINY, cluster_cpus, extra_ray_node, read_result, run_with_env
from .test_data import LABEL_CLASSES, tagged_images, write

# slow: a third Ray node joins and is lost (~2 min with its teardown); tests/unit covers the resize ledger.
pytestmark = pytest.mark.slow

pytest.importorskip("ray")

NUM_SAMPLES, SHARD_SIZE = 96, 12  # shard k holds tags 12k .. 12k+11
BATCH = 4


@pytest.fixture(scope="module")
def tagged_shards(tmp_path_factory) -> Path:
    # Labelled (image i: label i % 5): a resize deals (image, label) pairs, and each record is checked.
    return write(
        tmp_path_factory.mktemp("tagged") / "shards", tagged_images(NUM_SAMPLES, size=32), SHARD_SIZE, labelled=True
    )


@pytest.fixture(scope="module")
def third_node(ray_cluster):
    """One more one-CPU Ray node; calling it loses the node."""
    with extra_ray_node(ray_cluster, 1) as lose:
        yield lose


def train_args(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        str(ROOT / "tests" / "step_hooks.py"),
        "--record",
        str(run_dir / "trained"),
        "--config",
        "debug",
        *TINY,
        f"train.batch_size={BATCH}",
        "data.shuffle_buffer=8",
        "dist.launcher=ray",
        f"data.shards={shards}",
        f"run.dir={run_dir}",
        f"run.name={run_dir.name}",
        "train.sample_every=0",
        "train.log_every=1",
        *extra,
    ]


def trained(run_dir: Path) -> list[dict]:
    """Every rank's records, in the order they were written: {"step", "world", "tags", "rank"}."""
    records = []
    for path in sorted((run_dir / "trained").glob("rank*.jsonl")):
        rank = int(path.stem[4:])
        records += [{**json.loads(line), "rank": rank} for line in path.read_text().splitlines()]
    return records


def assert_each_sample_once_per_pass(before: list[int], after: dict[int, list[int]], world: int) -> None:
    """`before`: every tag trained up to the checkpoint; `after`: each new rank's tags since, in order. The pass
    in progress ends with every sample exactly once; each rank then starts a new pass over its own shards."""
    assert len(set(before)) == len(before) < NUM_SAMPLES
    shards = list(range(NUM_SAMPLES // SHARD_SIZE))
    finished = list(before)
    for rank, tags in after.items():
        mine = {t for t in range(NUM_SAMPLES) if t // SHARD_SIZE in shards[rank::world]}
        left = mine - set(before)
        assert set(tags) <= mine, f"rank {rank} read another rank's shards"
        assert len(tags) >= len(left), f"rank {rank} did not get to the end of the pass"
        assert sorted(tags[: len(left)]) == sorted(left), f"rank {rank}: the rest of the pass is not what was left"
        next_pass = tags[len(left) : len(left) + len(mine)]
        assert len(set(next_pass)) == len(next_pass)
        finished += tags[: len(left)]
    assert sorted(finished) == list(range(NUM_SAMPLES))


def test_a_checkpoint_from_2_workers_resumed_with_3_trains_each_sample_of_the_pass_once(
    ray_cluster, third_node, tagged_shards, tmp_path
):
    run_dir = tmp_path / "grown"
    first = run_with_env(
        [sys.executable, *train_args(tagged_shards, run_dir, "dist.num_workers=2", "train.max_steps=4")], ray_cluster
    )
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    before = [t for r in trained(run_dir) for t in r["tags"]]  # 2 workers x 4 steps x 4 images

    # 9 more steps x 4 images: at least the 36 samples of the largest new rank's three shards.
    second = run_with_env(
        [sys.executable, *train_args(tagged_shards, run_dir, "dist.num_workers=3", "train.max_steps=13")], ray_cluster
    )
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    result = read_result(run_dir)  # the resume, as the run records it
    assert result["start_step"] == 4 and ckpt.load(result["resumed_from"])["step"] == 4
    records = trained(run_dir)
    # Every sample came with its own label, before the resize and after it.
    assert all(r["labels"] == [t % len(LABEL_CLASSES) for t in r["tags"]] for r in records)
    assert sorted((r["world"], r["step"]) for r in records if r["rank"] == 2) == [(3, s) for s in range(5, 14)]
    after = {rank: [t for r in records if r["rank"] == rank and r["step"] > 4 for t in r["tags"]] for rank in range(3)}
    assert_each_sample_once_per_pass(before, after, world=3)
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in metrics] == list(range(1, 14))
    assert [r["workers"] for r in metrics] == [2] * 4 + [3] * 9
    assert metrics[-1]["images"] == 2 * 4 * BATCH + 3 * 9 * BATCH  # the global batch changed with the workers


def test_an_elastic_run_that_loses_a_node_goes_on_with_fewer_workers(ray_cluster, third_node, tagged_shards, tmp_path):
    """dist.num_workers=3 dist.min_workers=2 on three one-CPU nodes: three workers start; the third node is lost
    after the step-3 checkpoint; Ray Train restarts the group with the two workers there is room for, from that
    checkpoint, and the run finishes, each sample of the pass still trained exactly once."""
    run_dir, go = tmp_path / "shrunk", tmp_path / "go"
    driver = subprocess.Popen(
        [
            sys.executable,
            *train_args(
                tagged_shards,
                run_dir,
                "--pause-after=4",  # rank 0 waits after step 4 (step-3 checkpoint stored) until `go` exists
                f"--until={go}",
                "dist.num_workers=3",
                "dist.min_workers=2",
                "train.max_steps=16",
                "train.checkpoint_every=3",
                "dist.max_failures=2",
            ),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # Until Ray notices the node is gone, a restart may still wait for three workers:
        # for this long (Ray's default: 60 s).
        env={**ray_cluster, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15"},
    )
    deadline = time.monotonic() + 240
    metrics = run_dir / "metrics.jsonl"
    while not Path(f"{go}.paused").exists():
        assert driver.poll() is None and time.monotonic() < deadline, driver.communicate()[0][-4000:]
        time.sleep(0.1)
    third_node()
    # Rank 0 goes on only once the head has seen the node gone: released earlier, the group could finish the run
    # before its worker there noticed that its raylet was killed. The restarted group passes step 4.
    while cluster_cpus(ray_cluster) > 2:
        assert driver.poll() is None and time.monotonic() < deadline, driver.communicate()[0][-4000:]
        time.sleep(0.5)
    go.touch()
    out = driver.communicate(timeout=400)[0]
    (run_dir / "driver.log").write_text(out)
    assert driver.returncode == 0, out[-4000:]

    # The restarted group's start, from result.json (the last start of the workers): the checkpoint it resumed from.
    result = read_result(run_dir)
    resumed = [result["start_step"]]
    # (that checkpoint itself is gone by the end: train.keep_checkpoints keeps the newest three)
    assert resumed[0] >= 3 and Path(result["resumed_from"]).parent.name == f"step_{resumed[0]:07d}", out[-4000:]
    records = trained(run_dir)
    assert {r["world"] for r in records if r["step"] <= 3} == {3}
    for rank in range(2):  # after the restart: two workers, from the step after the checkpoint to the end
        assert [r["step"] for r in records if r["world"] == 2 and r["rank"] == rank] == list(range(resumed[0] + 1, 17))
    # What counts: the 3-worker steps the checkpoint kept, then the 2-worker steps after it.
    before = [t for r in records if r["world"] == 3 and r["step"] <= resumed[0] for t in r["tags"]]
    after = {
        rank: [t for r in records if r["world"] == 2 and r["rank"] == rank for t in r["tags"]] for rank in range(2)
    }
    assert_each_sample_once_per_pass(before, after, world=2)
    steps = read_metrics(metrics)
    assert [r["step"] for r in steps] == list(range(1, 17))  # each step once: the lost ones were trained again
    assert steps[0]["workers"] == 3 and steps[-1]["workers"] == 2
    assert result["step"] == 16 and ckpt.load(result["checkpoint"])["step"] == 16

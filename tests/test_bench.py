"""The bench command runs and reports its figures as a JSON last line (no timing assertions: machines are noisy)."""

import json

from .conftest import TINY, run_cli


def test_local_bench_with_baseline(tiny_shards):
    proc = run_cli("-m", "dcgan_dist.bench", "--config", "debug", *TINY, f"data.shards={tiny_shards}",
                   "--steps", "3", "--warmup", "1", "--baseline", "--checkpoint", f"run.dir={tiny_shards.parent / 'bench'}",
                   check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("train_images_per_s", "data_images_per_s", "data_images_per_cpu_s", "baseline_images_per_s",
                "vs_baseline", "checkpoint_mib", "checkpoint_write_s"):
        assert result[key] > 0, key
    assert result["batch_size"] == 16 and result["ngf"] == 8 and result["threads"] == 1
    assert result["device"].startswith("cpu")


def test_bench_can_time_the_loader_alone(tiny_shards):
    proc = run_cli("-m", "dcgan_dist.bench", "--config", "debug", *TINY, f"data.shards={tiny_shards}",
                   "--steps", "2", "--warmup", "1", "--data-only", check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["data_images_per_s"] > 0 and result["data_images_per_cpu_s"] > 0
    assert "train_images_per_s" not in result

import json
import subprocess
import sys

import pytest

from dcgan_dist.config import build_config
from dcgan_dist.distributed.ray_launcher import FORWARDED_ENV, worker_runtime_env
from dcgan_dist.runtime import keep_freed_memory

# Allocate a step's worth of large activations, touch them, free them; count the page faults per round.
# (mallopt is process-wide, so each setting gets a fresh interpreter.)
CHURN = """
import json, resource, sys, torch
from dcgan_dist.config import build_config
from dcgan_dist.distributed.ray_launcher import FORWARDED_ENV, worker_runtime_env
from dcgan_dist.runtime import configure_process
configure_process(build_config("default", ["train.keep_freed_memory=" + sys.argv[1]]).train)
def round_():
    blocks = [torch.empty(1 << 21).fill_(1.0) for _ in range(4)]  # 4 x 8 MiB
    del blocks
for _ in range(3):
    round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    round_()
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10))
"""


def _faults_per_round(keep: bool) -> float:
    out = subprocess.run([sys.executable, "-c", CHURN, str(keep).lower()], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused_instead_of_faulted_back():
    if not keep_freed_memory():  # also applies it here; harmless for the test process
        pytest.skip("not glibc: the allocator setting does not apply")
    pages = 4 * (8 << 20) // 4096
    returned, kept = _faults_per_round(False), _faults_per_round(True)
    # glibc's defaults hand the 32 MiB back after every round, so every page faults again; kept, none do.
    assert returned > pages / 2, returned
    assert kept < pages / 50, kept


def test_the_setting_is_on_by_default_and_can_be_turned_off():
    assert build_config("default", []).train.keep_freed_memory is True
    assert build_config("default", ["train.keep_freed_memory=false"]).train.keep_freed_memory is False


def test_ray_cpu_workers_start_with_one_malloc_arena(monkeypatch):
    for key in FORWARDED_ENV:
        monkeypatch.delenv(key, raising=False)
    assert worker_runtime_env(build_config("default", ["train.keep_freed_memory=false"])) is None
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert worker_runtime_env(build_config("default", []))["env_vars"] == {"WANDB_MODE": "offline", "MALLOC_ARENA_MAX": "1"}
    # GPU workers keep glibc's default arenas (their host side allocates little; other threads may allocate a lot).
    assert worker_runtime_env(build_config("default", ["dist.use_gpu=true"]))["env_vars"] == {"WANDB_MODE": "offline"}

import json
import subprocess
import sys

import pytest

from dcgan_dist.config import build_config
from dcgan_dist.distributed.ray_launcher import FORWARDED_ENV, worker_runtime_env
from dcgan_dist.runtime import keep_freed_memory

# Allocate `count` blocks of `size` bytes through glibc (as torch's CPU allocator does), touch them, free them;
# page faults in the median round (the heap may still grow once). mallopt is process-wide: a fresh
# interpreter per setting.
CHURN = """
import ctypes, json, resource, sys
from dcgan_dist.config import build_config
from dcgan_dist.runtime import configure_process
configure_process(build_config("default", ["train.keep_freed_memory=" + sys.argv[1]]).train)
size, count = int(sys.argv[2]), int(sys.argv[3])
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
def round_():
    blocks = [libc.malloc(size) for _ in range(count)]
    for b in blocks:
        ctypes.memset(b, 1, size)
    for b in blocks:
        libc.free(b)
for _ in range(3):
    round_()
faults = []
for _ in range(11):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    round_()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(sorted(faults)[5]))
"""


def _faults_per_round(keep: bool, size: int, count: int) -> int:
    args = [sys.executable, "-c", CHURN, str(keep).lower(), str(size), str(count)]
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused_instead_of_faulted_back():
    if not keep_freed_memory():  # also applies it here; harmless for the test process
        pytest.skip("not glibc: the allocator setting does not apply")
    pages = (32 << 20) // 4096
    # 32 MiB in 100 KiB blocks: glibc's defaults serve them from the heap and trim the freed top back to the
    # OS, so every page faults again next round; kept, none do.
    assert _faults_per_round(False, 100 << 10, 320) > pages / 2
    assert _faults_per_round(True, 100 << 10, 320) < pages / 50
    # 32 MiB in 8 MiB blocks (activation-sized): kept on the heap too, instead of mapped and unmapped.
    assert _faults_per_round(True, 8 << 20, 4) < pages / 50


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

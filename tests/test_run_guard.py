"""A run's own guard rails, on real processes and files: one run at a time in a run directory (a lock the kernel
frees when its run is killed; a renewed lease in an object store), a step's metrics record stored before its
checkpoint, non-finite settings and losses, and inputs refused before any work (the device, memory, run.name,
run.dir) in one line, exit 2, with no run file left."""

import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from dcgan_dist.config import ConfigError, build_config, flat_settings
from dcgan_dist.storage.filesystem import RunStorage
from dcgan_dist.storage.runlock import LOCK_FILE, RunLock, run_lock
from dcgan_dist.training.memory_estimate import check_memory, training_bytes
from dcgan_dist.training.metrics import NonFiniteLoss, read_metrics
from dcgan_dist.training.trainer import Trainer

from .conftest import ROOT, TINY, run_cli


def train_args(tiny_shards, run_dir, *overrides):
    return ["--config", "debug", *TINY, f"data.shards={tiny_shards}", f"run.dir={run_dir}", *overrides]


def one_error_line(proc, code: int) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code and 1 <= len(lines) <= 2, (proc.returncode, proc.stderr[-3000:])
    assert lines[-1].startswith("error: "), lines
    return lines[-1]


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- inputs refused before any work ----------------------------------------------------------------------------------

# One of each kind through the command line; the rest of each class in-process below.
BAD_INPUTS = {
    "a non-finite float": ("optim.lr=nan", "'optim.lr'"),
    "a model too large for memory": ("model.ngf=100000", "model.ngf=100000"),
    "a control character in run.name": ("run.name=a\x01b", "run.name"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_a_bad_setting_is_one_line_exit_2_and_no_run_file(tmp_path, tiny_shards, case):
    setting, named = BAD_INPUTS[case]
    run_dir = tmp_path / "run"
    line = one_error_line(run_cli("-m", "dcgan_dist.train", *train_args(tiny_shards, run_dir, setting)), 2)
    assert named in line, line
    assert not run_dir.exists()


def float_settings() -> list[str]:
    return [key for key, value in flat_settings(build_config("debug")) if isinstance(value, float)]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_setting_must_be_finite(value):
    assert len(float_settings()) >= 5
    for key in float_settings():
        with pytest.raises(ConfigError, match=f"'{key}' is {value}; it must be a finite number"):
            build_config("debug", [f"{key}={value}"])


@pytest.mark.parametrize("name", ["..", ".", "a/b", "a\nb", "a b", "x" * 129, "", "a\x7fb"])
def test_run_name_is_a_plain_name(name):
    with pytest.raises(ConfigError, match="run.name"):
        build_config("debug", [f"run.name={name}"])


def test_memory_needed_grows_with_the_batch_and_is_checked_against_the_device():
    one, small, huge = (build_config("debug", [f"train.batch_size={b}"]) for b in (1, 64, 100000000))
    need_one, need_small, need_huge = (
        sum(size for size, *_ in training_bytes(cfg, "fp32")) for cfg in (one, small, huge)
    )
    per_image = (need_small - need_one) / 63
    assert per_image >= 3 * 32 * 32 * 5 and need_huge == need_one + per_image * (100000000 - 1)  # linear in the batch
    assert training_bytes(small, "bf16")[1][0] < training_bytes(small, "fp32")[1][0]  # activations in 2 bytes
    check_memory(small, torch.device("cpu"), "fp32")  # the quick start fits
    with pytest.raises(
        ConfigError, match="^train.batch_size=100000000: training needs at least .*; lower train.batch_size$"
    ):
        check_memory(huge, torch.device("cpu"), "fp32")
    with pytest.raises(ConfigError, match="^eval.num=100000000 .*; lower eval.num or eval.nhoods_per_image$"):
        check_memory(build_config("debug", ["train.eval_every=10", "eval.num=100000000"]), torch.device("cpu"), "fp32")
    check_memory(build_config("debug", ["train.eval_every=0", "eval.num=100000000"]), torch.device("cpu"), "fp32")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_train_device_cuda_without_a_gpu_is_one_line_before_any_run_file(tmp_path, tiny_shards):
    run_dir = tmp_path / "run"
    line = one_error_line(run_cli("-m", "dcgan_dist.train", *train_args(tiny_shards, run_dir, "train.device=cuda")), 2)
    assert "train.device=cuda" in line, line
    assert not run_dir.exists()


def test_run_name_cannot_leave_runs(tmp_path, tiny_shards):
    """run.dir defaults to runs/<run.name>: a name with a path in it would write outside runs/."""
    cwd = tmp_path / "a" / "b"
    cwd.mkdir(parents=True)
    args = [a for a in train_args(tiny_shards, "unused") if not a.startswith("run.dir=")]
    line = one_error_line(run_cli("-m", "dcgan_dist.train", *args, "run.name=../../x", cwd=cwd), 2)
    assert "run.name" in line, line
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b"]  # nothing made, anywhere below tmp_path


def test_the_file_system_root_is_no_run_dir(tiny_shards):
    before = {p: p.exists() for p in (Path("/config.yaml"), Path("/metrics.jsonl"), Path("/checkpoints"))}
    line = one_error_line(run_cli("-m", "dcgan_dist.train", *train_args(tiny_shards, "/")), 2)
    assert line.startswith("error: run.dir=/: "), line
    assert {p: p.exists() for p in before} == before


def test_system_folders_and_home_are_no_run_dir(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    (tmp_path / "to-etc").symlink_to("/etc")
    for where in ["/etc", "/usr/local/x", "/proc/x", "/tmp", "~", str(home), str(tmp_path / "to-etc" / "x")]:
        with pytest.raises(ConfigError, match="is a system folder"):
            build_config("debug", [f"run.dir={where}" if where != "~" else "run.dir='~'"])
    for fine in [str(home / "runs" / "x"), str(tmp_path / "run"), "runs/x", "s3://bucket/runs/x"]:
        build_config("debug", [f"run.dir={fine}"])


# -- one run at a time in a run directory ----------------------------------------------------------------------------


def wait_for(condition, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_second_run_is_refused_while_the_first_runs_and_a_killed_runs_lock_is_taken_over(tmp_path, tiny_shards):
    run_dir = tmp_path / "run"
    # A loader process: forked from the run, it outlives a SIGKILL of it by seconds, and must not keep the lock.
    args = train_args(
        tiny_shards,
        run_dir,
        "train.max_steps=40",
        "train.checkpoint_every=2",
        "train.log_every=2",
        "data.num_workers=1",
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    # The first run waits after step 3 (its step-2 checkpoint stored) for a file that never comes: it is still
    # running when the second starts, and is killed then.
    go = tmp_path / "never"
    first = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "step_hooks.py"), "--pause-after", "3", "--until", str(go), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: Path(f"{go}.paused").exists(), first)
        assert (run_dir / "checkpoints" / "step_0000002.pt").exists()
        second = run_cli("-m", "dcgan_dist.train", *args)
        assert first.poll() is None  # the refusal happened while the first run held the directory
        line = one_error_line(second, 2)
        assert f"pid {first.pid} " in line and "in use" in line, line
        first.send_signal(signal.SIGKILL)  # no chance to release anything: the kernel drops its lock
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    third = run_cli("-m", "dcgan_dist.train", *args, timeout=120)
    assert third.returncode == 0, third.stderr[-3000:]
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == list(range(2, 41, 2))
    assert not (run_dir / LOCK_FILE).exists()  # a run that ends removes its lock file


def test_under_ray_the_driver_holds_the_run_dir_for_the_whole_job(tmp_path, tiny_shards, monkeypatch):
    """The driver takes the lock before it launches and holds it until the job ends (the workers, and Ray Train's
    restarts of them, never lock); a second command meanwhile is refused before it connects to any cluster. No Ray
    cluster is started here: the launch is replaced by one that looks at the lock."""
    from dcgan_dist.cli import train
    from dcgan_dist.launch import ray_train as ray_launcher

    run_dir = tmp_path / "run"
    args = train_args(tiny_shards, run_dir, "dist.launcher=ray", "train.max_steps=4")
    seen = {}

    # The second command cannot import Ray: were it not refused, it fails here instead of starting a cluster.
    no_ray = tmp_path / "no-ray" / "ray"
    no_ray.mkdir(parents=True)
    (no_ray / "__init__.py").write_text("raise ImportError('Ray is blocked in this test')\n")
    # Nor does it find a cluster that another test has running (an unset RAY_ADDRESS looks for one).
    nowhere = str(tmp_path / "no-cluster")
    env = {
        **os.environ,
        "PYTHONPATH": f"{no_ray.parent}{os.pathsep}{ROOT}",
        "RAY_TMPDIR": nowhere,
        "RAY_CLUSTER_DIR": nowhere,
    }
    env.pop("RAY_ADDRESS", None)

    def launch(cfg, argv, hooks, outcome=None):
        seen["holder"] = json.loads((run_dir / LOCK_FILE).read_text())  # reading it leaves the lock held
        seen["second"] = subprocess.run(
            [sys.executable, "-m", "dcgan_dist.train", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        return 0

    monkeypatch.setattr(ray_launcher, "launch", launch)
    # No cluster is joined either: not one another test has running (the cluster script's, found by an unset
    # RAY_ADDRESS), whose token this process may not have.
    monkeypatch.setattr(train, "cluster_address", lambda **kwargs: None)
    assert train.main(args) == 0
    assert seen["holder"]["pid"] == os.getpid()
    line = one_error_line(seen["second"], 2)
    assert f"pid {os.getpid()} " in line, line
    assert not (run_dir / LOCK_FILE).exists()


def test_one_process_cannot_hold_a_run_dir_twice_and_the_lock_file_goes_with_the_run(tmp_path):
    with run_lock(str(tmp_path / "run")):
        holder = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(ConfigError, match="in use"):
            RunLock(str(tmp_path / "run")).acquire()
    assert list((tmp_path / "run").iterdir()) == []
    with run_lock(str(tmp_path / "run")):  # free again
        pass


# -- a step's metrics record is stored before its checkpoint -----------------------------------------------------------


def test_a_kill_right_after_a_checkpoint_loses_no_metrics_record(tmp_path, tiny_shards):
    run_dir = tmp_path / "run"
    args = train_args(tiny_shards, run_dir, "train.max_steps=8", "train.checkpoint_every=4", "train.log_every=2")
    killed = run_cli(
        str(ROOT / "tests" / "step_hooks.py"),
        "--kill-after-checkpoint",
        "4",
        "--marker",
        str(tmp_path / "killed"),
        *args,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (run_dir / "checkpoints" / "step_0000004.pt").exists()
    resumed = run_cli("-m", "dcgan_dist.train", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [2, 4, 6, 8]


# -- non-finite losses -----------------------------------------------------------------------------------------------


def test_diverging_losses_stop_with_one_line_exit_1_and_the_last_good_checkpoint(tmp_path, tiny_shards):
    """Six good steps (checkpoints at 3 and 6), then the same run with a learning rate that diverges at once: it
    stops at the next check, before a checkpoint at step 9 could store non-finite weights, naming step 7; the same
    run with a sane learning rate again resumes from step 6 and finishes."""
    run_dir = tmp_path / "run"
    common = ["train.checkpoint_every=3", "train.log_every=10"]
    assert (
        run_cli("-m", "dcgan_dist.train", *train_args(tiny_shards, run_dir, *common, "train.max_steps=6")).returncode
        == 0
    )
    checkpoints = run_dir / "checkpoints"
    kept = files_under(checkpoints)
    diverged = run_cli(
        "-m", "dcgan_dist.train", *train_args(tiny_shards, run_dir, *common, "train.max_steps=20", "optim.lr=1e30")
    )
    line = one_error_line(diverged, 1)
    assert "non-finite at step 7 " in line and "optim.lr" in line and str(checkpoints / "step_0000006.pt") in line, line
    assert files_under(checkpoints) == kept  # no checkpoint of step 9, the good ones untouched
    state = torch.load(checkpoints / "step_0000006.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["G"].values() if t.is_floating_point())
    resumed = run_cli("-m", "dcgan_dist.train", *train_args(tiny_shards, run_dir, *common, "train.max_steps=20"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [6, 10, 20]
    assert all(math.isfinite(r["loss_d"]) and math.isfinite(r["loss_g"]) for r in records)


def test_weights_that_became_non_finite_are_never_checkpointed(tmp_path, tiny_shards):
    """A step's losses are computed before its updates: weights made non-finite by the last update of a checkpoint
    step are caught by looking at them before the save (here poisoned right after step 4's update)."""
    cfg = build_config(
        "debug",
        train_args(
            tiny_shards, tmp_path / "run", "train.max_steps=10", "train.checkpoint_every=2", "train.log_every=10"
        )[2:],
    )
    threads = torch.get_num_threads()
    trainer = Trainer(cfg)

    def poison(step, env, images, labels=None):
        if step == 4:
            with torch.no_grad():
                next(trainer.G.parameters()).fill_(float("inf"))

    trainer.hooks.append(poison)
    try:
        with pytest.raises(NonFiniteLoss) as failure:
            trainer.fit()
    finally:
        torch.set_num_threads(threads)
    assert failure.value.step == 4 and "weights" in str(failure.value)
    assert failure.value.checkpoint == str(tmp_path / "run" / "checkpoints" / "step_0000002.pt")
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_0000002.pt"]


# -- the lease in an object store -------------------------------------------------------------------------------------

HOLD_LEASE = """
import sys, time
from dcgan_dist.errors import RunError
from dcgan_dist.storage.runlock import RunLock
lock = RunLock(sys.argv[1], lease_s=float(sys.argv[2]), confirm_s=0.5).acquire()
print("held", flush=True)
while True:  # what the training loop does every step
    try:
        lock.check(0)
    except RunError as exc:
        print(exc, flush=True)
        sys.exit(1)
    time.sleep(0.05)
"""


@pytest.mark.slow  # 3 s of its own, but run alone it starts and stops SeaweedFS (~30 s); the full suite does anyway
def test_an_object_store_lease_refuses_a_second_run_and_a_stalled_runs_lease_is_taken_over(s3_env, tmp_path):
    """A holds the lease (renewed every 0.5 s, stale after 2 s): B is refused, naming A. A stalls (SIGSTOP) past
    the lease: B takes it over. A wakes up (SIGCONT): its heartbeat finds the lease is B's and A stops. C holds a
    60 s lease and is SIGKILLed: on the same machine it is known gone, and its lease is taken over at once."""
    location = f"s3://dcgan-test/lease-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    a = subprocess.Popen(
        [sys.executable, "-c", HOLD_LEASE, location, "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    b = None
    try:
        assert a.stdout.readline().strip() == "held", a.communicate(timeout=30)
        with pytest.raises(ConfigError, match=f"pid {a.pid} "):
            RunLock(location, lease_s=2.0, confirm_s=0.5).acquire()
        a.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 30
        while b is None:
            try:
                b = RunLock(location, lease_s=2.0, confirm_s=0.5).acquire()
            except ConfigError:  # refused while A's lease is fresh
                assert time.monotonic() < deadline, "the stale lease was never taken over"
                time.sleep(0.2)
        a.send_signal(signal.SIGCONT)
        out, err = a.communicate(timeout=30)
        assert a.returncode == 1 and "taken over" in out, (out, err[-3000:])
        assert b.lost is None
    finally:
        if a.poll() is None:
            a.send_signal(signal.SIGCONT)
            a.kill()
            a.wait()
        if b is not None:
            b.release()
    assert not RunStorage(location).exists(LOCK_FILE)  # released: removed
    # A holder SIGKILLed on this machine is known gone: its fresh lease is taken over at once.
    c = subprocess.Popen([sys.executable, "-c", HOLD_LEASE, location, "60"], env=env, stdout=subprocess.PIPE, text=True)
    assert c.stdout.readline().strip() == "held"
    c.kill()
    c.wait()
    RunLock(location, lease_s=60.0, confirm_s=0.5).acquire().release()

"""Ray Train for real: `ray job submit` on a two-node local cluster, worker-crash recovery, rerun resume.

All tests share one two-node cluster (session fixture); each training job runs two tiny workers on CPU/gloo.
"""

import collections
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dcgan_dist.training import checkpoint as ckpt
from dcgan_dist.training.metrics import read_metrics

from .conftest import (
    ROOT,
    TINY,
    assert_same_training_state,
    assert_sample_and_evaluate_read,
    read_result,
    run_with_env,
)
from .wandb_offline import history

pytest.importorskip("ray")


def ray_train_args(tiny_shards, run_dir, *extra):
    return [
        "--config",
        "configs/debug.yaml",
        *TINY,
        "dist.launcher=ray",
        "dist.num_workers=2",
        f"data.shards={tiny_shards}",
        f"run.dir={run_dir}",
        "train.sample_every=0",
        "train.ema_decay=0.9",
        *extra,
    ]


def final_checkpoint(run_dir: Path) -> Path:
    """The final checkpoint the run's result.json names (the driver writes it)."""
    result = read_result(run_dir)
    assert result["command"] == "train" and result["launcher"] == "ray" and result["stop_reason"] == "max_steps"
    assert ckpt.load(result["checkpoint"])["step"] == result["step"]
    return Path(result["checkpoint"])


def worker_nodes(run_dir: Path) -> dict[int, str]:
    """Each worker's Ray node, from the run's result.json."""
    return {w["rank"]: w["node_id"] for w in read_result(run_dir)["workers"]}


ANSI = re.compile(r"\x1b\[[0-9;]*m")
# A log record at error level: Ray's C++ format ("[2026-12-07 11:16:27,063 E 913 952] core_worker.cc:...") or
# Python logging's ("2026-12-07 11:16:27,063\tERROR file.py:...").
ERROR_LEVEL = re.compile(r"\d{4}-\d\d-\d\d [\d:,.]+\s+(E \d+ \d+\]|ERROR\b)")


def assert_clean_job_log(log: str) -> None:
    """A successful job's log (`ray job submit`'s output): each line of the Ray processes once (not forwarded twice,
    not collapsed by Ray's '[repeated Nx across cluster]'), no error-level line, and our driver's final checkpoint
    line after the last line Ray forwarded."""
    lines = [ANSI.sub("", line) for line in log.splitlines()]
    forwarded = [i for i, line in enumerate(lines) if re.match(r"\((RayTrainWorker|TrainController) pid=\d+\)", line)]
    counts = collections.Counter(lines[i] for i in forwarded)
    assert forwarded and max(counts.values()) == 1, [line for line, n in counts.items() if n > 1]
    assert not [line for line in lines if "repeated" in line and "across cluster" in line]
    assert not [line for line in lines if ERROR_LEVEL.search(line)]
    final = [i for i, line in enumerate(lines) if line.startswith("Final checkpoint (step ")]
    assert final and final[-1] > forwarded[-1]


def test_job_submit_on_two_nodes(ray_cluster, tiny_shards, tmp_path):
    """The README's command: `ray job submit --working-dir . -- python -m dcgan_dist.train ...`."""
    env = {**ray_cluster, "RAY_ADDRESS": ray_cluster["RAY_JOB_ADDRESS"]}
    run_dir = tmp_path / "job"
    proc = run_with_env(
        [
            "ray",
            "job",
            "submit",
            "--working-dir",
            ".",
            "--",
            "python",
            "-m",
            "dcgan_dist.train",
            *ray_train_args(
                tiny_shards,
                run_dir,
                "train.max_steps=6",
                "train.checkpoint_every=3",
                "train.log_every=3",
                "train.sample_every=3",
                "wandb.mode=offline",
                "train.eval_every=3",
                "eval.num=32",
                "eval.nhoods_per_image=4",
            ),
        ],
        env,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert_clean_job_log(proc.stdout)
    nodes = worker_nodes(run_dir)
    assert set(nodes) == {0, 1} and nodes[0] != nodes[1], nodes  # the two workers ran on different Ray nodes
    path = final_checkpoint(run_dir)
    assert path.is_file() and ckpt.load(path)["step"] == 6
    # The best checkpoint goes to the run's Ray storage beside the step checkpoints, not to rank 0's disk.
    best = ckpt.load(path.parent.parent / ckpt.BEST_FILE)
    evals = {r["step"]: r["swd"] for r in read_metrics(run_dir / "metrics.jsonl")}
    assert best["best"]["swd"] == pytest.approx(min(evals.values())) and best["step"] == min(evals, key=evals.get)
    assert not (run_dir / "checkpoints").exists()
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [3, 6]
    # W&B (offline): exactly one run, written by rank 0, whose history matches metrics.jsonl, with images.
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    rows = history(next(runs[0].glob("run-*.wandb")))
    assert [row["_step"] for row in rows] == [3, 6]
    for row, record in zip(rows, records):
        for key in (
            "loss_d",
            "loss_g",
            "d_real",
            "d_fake",
            "images_per_s",
            "lr_g",
            "step_time_s/rank0",
            "step_time_s/rank1",
        ):
            assert row[key] == pytest.approx(record[key]), key
        assert row["samples/_type"] == "image-file"
    assert len(list((runs[0] / "files" / "media" / "images").glob("samples_*.png"))) == 2
    assert list((runs[0] / "files" / "media" / "videos").glob("progress_*.gif"))  # the progress animation
    # sample and evaluate read the Ray checkpoint directory and the run directory as this command leaves it.
    for source in (path.parent, run_dir):
        assert_sample_and_evaluate_read(source, 6, tmp_path)


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, tiny_shards, tmp_path_factory):
    """A 2-worker run of 12 steps, checkpoint every 5: the reference for recovery and resume."""
    run_dir = tmp_path_factory.mktemp("ray") / "whole"
    proc = run_with_env(
        [
            sys.executable,
            "-m",
            "dcgan_dist.train",
            *ray_train_args(
                tiny_shards,
                run_dir,
                "train.max_steps=12",
                "train.checkpoint_every=5",
                "train.log_every=1",
                "run.name=whole",
            ),
        ],
        ray_cluster,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return run_dir, final_checkpoint(run_dir)


def test_a_preempted_and_a_crashed_worker_restart_from_their_checkpoints_and_the_run_ends_as_if_uninterrupted(
    ray_cluster, tiny_shards, tmp_path, uninterrupted
):
    """SIGTERM to rank 1's worker process after step 3 (a preempted pod): both ranks agree to stop after the same
    step and checkpoint it, and Ray restarts the workers from that checkpoint. (Python runs the handler in the
    worker's main thread, which Ray wakes every few ms: the training thread may finish a step more before it sees
    the request.) Then rank 1 is SIGKILLed after step 7: Ray restarts both workers from the step-5 checkpoint. The
    run ends at step 12, each step logged once, with the same weights as a run that was never disturbed."""
    run_dir = tmp_path / "disturbed"
    proc = run_with_env(
        [
            sys.executable,
            str(ROOT / "tests" / "step_hooks.py"),
            *("--signal=TERM", "--after=3", "--rank=1"),
            *("--signal=KILL", "--after=7", "--rank=1"),
            *ray_train_args(
                tiny_shards,
                run_dir,
                "train.max_steps=12",
                "train.checkpoint_every=5",
                "train.log_every=1",
                "run.name=disturbed",
                "dist.max_failures=3",
            ),
        ],
        ray_cluster,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert (run_dir / ".signalled_after_step_3").is_file() and (run_dir / ".signalled_after_step_7").is_file()
    resumed = sorted({int(s) for s in re.findall(r"Resuming from \S+ \(step (\d+)\)", out)})  # (Ray may echo lines)
    assert len(resumed) == 2 and resumed[0] in (3, 4) and resumed[1] == 5, out[-4000:]
    # Steps 6-7 were trained again (less than checkpoint_every lost); metrics.jsonl holds each step once.
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == list(range(1, 13))
    assert_same_training_state(ckpt.load(uninterrupted[1]), ckpt.load(final_checkpoint(run_dir)))


@pytest.mark.slow  # 70 s; locally test_train stops on SIGTERM/Ctrl-C after the same step and resumes exactly
def test_ctrl_c_and_ray_job_stop_stop_every_worker_with_a_checkpoint_and_the_rerun_resumes_exactly(
    ray_cluster, tiny_shards, tmp_path, uninterrupted
):
    """Ctrl-C to the driver (which runs fit() off its main thread, so that Ray Train's own SIGINT handler does not
    abort the run), then, resumed as a job, `ray job stop` (SIGTERM to the driver): each time the workers stop after
    the same step (the one rank 0 waits at for the request) with a checkpoint, the driver ends with the stop line
    (exit 130 for Ctrl-C), and the rerun ends bit-identical to an uninterrupted run, every step logged once."""
    run_dir = tmp_path / "interrupted"
    args = ray_train_args(
        tiny_shards,
        run_dir,
        "train.max_steps=12",
        "train.checkpoint_every=5",
        "train.log_every=1",
        "run.name=interrupted",
    )
    ready = tmp_path / "at-step-3"  # rank 0 waits there for the stop request
    driver = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "step_hooks.py"), "--stop-after=3", f"--ready={ready}", *args],
        cwd=ROOT,
        env=ray_cluster,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_file(ready, driver)
    driver.send_signal(signal.SIGINT)
    stdout, stderr = driver.communicate(timeout=300)
    assert driver.returncode == 130, (stdout + stderr)[-4000:]
    assert assert_stopped_with_a_checkpoint(stderr, "SIGINT", run_dir) == 3

    # The same run resumed as a job, stopped with `ray job stop` after step 6.
    env = {**ray_cluster, "RAY_ADDRESS": ray_cluster["RAY_JOB_ADDRESS"]}
    ready = tmp_path / "at-step-6"
    hooks = ["python", "tests/step_hooks.py", "--stop-after=6", f"--ready={ready}"]
    submit = run_with_env(["ray", "job", "submit", "--no-wait", "--working-dir", ".", "--", *hooks, *args], env)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    job_id = re.search(r"raysubmit_\w+", submit.stdout + submit.stderr).group(0)
    wait_for_file(ready)
    assert run_with_env(["ray", "job", "stop", job_id], env).returncode == 0
    log = run_with_env(["ray", "job", "logs", job_id], env).stdout
    assert assert_stopped_with_a_checkpoint(log, "SIGTERM", run_dir) == 6
    assert read_result(run_dir)["start_step"] == 3, log[-3000:]  # the job resumed from the Ctrl-C's checkpoint

    proc = run_with_env([sys.executable, "-m", "dcgan_dist.train", *args], ray_cluster)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert_same_training_state(ckpt.load(uninterrupted[1]), ckpt.load(final_checkpoint(run_dir)))
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == list(range(1, 13))


def wait_for_file(path: Path, process=None, timeout: float = 240) -> None:
    """Until `path` exists (tests/step_hooks.py --ready: the run is waiting for its stop request)."""
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline and (process is None or process.poll() is None), "the run did not get there"
        time.sleep(0.1)


def assert_stopped_with_a_checkpoint(log: str, signal_name: str, run_dir: Path) -> int:
    """result.json says the run stopped on that signal with a checkpoint of its last step, and metrics.jsonl ends
    at it; returns the step."""
    result = read_result(run_dir)
    assert result["stop_reason"] == "signal" and result["signal"] == signal_name, (result, log[-3000:])
    step = result["step"]
    assert 1 <= step < 12 and ckpt.load(result["checkpoint"])["step"] == step
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == list(range(1, step + 1))
    return step


@pytest.mark.slow  # in the default run the preempted/crashed workers restart from checkpoints, bit-identical end
def test_rerun_with_the_same_name_resumes(ray_cluster, tiny_shards, uninterrupted):
    run_dir, _ = uninterrupted
    proc = run_with_env(
        [
            sys.executable,
            "-m",
            "dcgan_dist.train",
            *ray_train_args(
                tiny_shards,
                run_dir,
                "train.max_steps=15",
                "train.checkpoint_every=5",
                "train.log_every=1",
                "run.name=whole",
            ),
        ],
        ray_cluster,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert ckpt.load(final_checkpoint(run_dir))["step"] == 15
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")]
    assert steps == list(range(1, 16))
    # Another model cannot resume this run: one line and exit 2, not dist.max_failures futile restarts.
    proc = run_with_env(
        [
            sys.executable,
            "-m",
            "dcgan_dist.train",
            *ray_train_args(
                tiny_shards, run_dir, "train.max_steps=20", "train.checkpoint_every=5", "run.name=whole", "model.ngf=16"
            ),
        ],
        ray_cluster,
    )
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model.ngf: 8 -> 16" in errors[0]
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == steps  # nothing was trained


@pytest.mark.slow  # four timed phases of N Ray workers; bench itself runs locally in the default run
def test_bench_on_ray_reports_scaling(ray_cluster, tiny_shards, tmp_path):
    proc = run_with_env(
        [
            sys.executable,
            "-m",
            "dcgan_dist.bench",
            "--config",
            "debug",
            *(a for a in TINY if not a.startswith("wandb.")),  # bench logs nothing to W&B
            "dist.launcher=ray",
            "dist.num_workers=2",
            f"data.shards={tiny_shards}",
            f"run.dir={tmp_path}",
            "bench.steps=3",
            "bench.warmup=1",
            "bench.measure=step",
        ],
        ray_cluster,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in (
        "train_images_per_s",
        "single_worker_images_per_s",
        "independent_images_per_s",
        "ddp_without_sync_bn_images_per_s",
        "speedup",
        "comm_efficiency",
    ):
        assert result[key] > 0, key
    breakdown = result["step_breakdown"]
    assert set(breakdown) == {"compute_s", "data_wait_s", "grad_allreduce_s", "bn_sync_s", "step_s"}
    assert 0 < breakdown["compute_s"] < breakdown["step_s"]


def test_a_driver_the_cluster_does_not_let_in_ends_in_one_line(ray_cluster, tiny_shards, tmp_path):
    """A live cluster with token authentication and a driver with another token: one line (what to export), exit
    2, in seconds, no run file; ray.init would retry for many minutes, logging every try."""
    wrong = tmp_path / "wrong_token"
    wrong.write_text("0" * 64)
    env = {**ray_cluster, "RAY_ADDRESS": "127.0.0.1:6379", "RAY_AUTH_TOKEN_PATH": str(wrong)}
    run_dir = tmp_path / "run"
    started = time.monotonic()
    proc = run_with_env([sys.executable, "-m", "dcgan_dist.train", *ray_train_args(tiny_shards, run_dir)], env, 120)
    assert proc.returncode == 2 and time.monotonic() - started < 30, proc.stdout + proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith("error: ") and "127.0.0.1:6379" in line and "RAY_AUTH_MODE=token" in line
    assert not run_dir.exists()

"""Issue 28, the first hour: help that pastes, dead ends that point somewhere, outputs that stay out of the
current directory, and a CPU that says how long a run will take."""

from __future__ import annotations

import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from dcgan_dist.data.synth import available_cpus

from .conftest import ROOT, TINY, run_cli

HELPS = [
    ["dcgan_dist.train"],
    ["dcgan_dist.bench"],
    ["dcgan_dist.sample"],
    ["dcgan_dist.evaluate"],
    ["dcgan_dist.data"],
    ["dcgan_dist.data", "synth"],
    ["dcgan_dist.data", "convert"],
    ["dcgan_dist.data", "inspect"],
    ["dcgan_dist.tune"],
]


def example_lines(help_text: str) -> list[str]:
    """The command lines a help text shows, from `python -m` on (usage lines are not examples)."""
    return [
        line[line.index("python -m") :]
        for line in help_text.splitlines()
        if "python -m" in line and not line.lstrip().startswith("usage:")
    ]


def bash_syntax_error(lines: list[str]) -> str:
    proc = subprocess.run(["bash", "-n"], input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=30)
    return proc.stderr if proc.returncode else ""


def help_text(module: list[str], capsys) -> str:
    """`python -m <module> --help`, run in this process (argparse prints it and exits 0): what a user reads."""
    main = importlib.import_module(module[0] if module[0] != "dcgan_dist.data" else "dcgan_dist.data.__main__").main
    with pytest.raises(SystemExit) as stop:
        code = main([*module[1:], "--help"])
        raise SystemExit(code)
    assert stop.value.code in (0, None)
    return capsys.readouterr().out


def test_every_help_example_pastes_into_bash(capsys):
    helps = {" ".join(module): help_text(module, capsys) for module in HELPS}
    # The check itself can fail: the unquoted example that tune's help used to show is a bash syntax error.
    assert bash_syntax_error(["python -m dcgan_dist.tune --search optim.lr=loguniform(1e-4,1e-3)"])
    examples = {name: example_lines(text) for name, text in helps.items()}
    for name in (
        "dcgan_dist.train",
        "dcgan_dist.bench",
        "dcgan_dist.sample",
        "dcgan_dist.evaluate",
        "dcgan_dist.data",
        "dcgan_dist.tune",
    ):
        assert examples[name], f"{name} --help shows no example"
    for name, lines in examples.items():
        assert not bash_syntax_error(lines), (name, lines, bash_syntax_error(lines))
    tune = helps["dcgan_dist.tune"]
    summary = tune.split("\n\n")[1].strip()
    assert summary.startswith("Hyper-parameter sweeps") and tune.count(summary) == 1, tune
    usage = tune.split("\n\n")[0]
    assert "--config FILE" in usage and "key=value" in usage, usage


def images(folder: Path, n: int = 3, suffix: str = ".jpg") -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (40, 40), (10 * i, 80, 160)).save(folder / f"face{i}{suffix}")
    return folder


@pytest.mark.parametrize("spec", ["folder", "glob", "one file", "nested folder"])
def test_images_given_as_shards_point_at_data_convert(tmp_path, spec):
    work = tmp_path / "work"
    source = images(
        work / "photos" / "all" if spec == "nested folder" else work / "photos",
        suffix=".png" if spec == "one file" else ".jpg",
    )
    given = {"folder": "photos", "glob": "photos/*.jpg", "one file": "photos/face0.png", "nested folder": "photos"}[
        spec
    ]
    proc = run_cli(
        "-m",
        "dcgan_dist.train",
        "--config",
        "debug",
        *TINY,
        f"data.shards={given}",
        "run.dir=run",
        cwd=work,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad checksum" not in lines[0] and "BufferedReader" not in lines[0], proc.stderr
    assert not (work / "run").exists()
    # The command the line ends with converts the images, as pasted, into shards of the model's size.
    command = lines[0][lines[0].index("python -m dcgan_dist.data convert") :]
    converted = subprocess.run(
        command,
        shell=True,
        cwd=work,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        executable="/bin/bash",
    )
    assert converted.returncode == 0, converted.stderr
    out = work / re.search(r"--out (\S+)", command).group(1)
    info = json.loads((out / "dataset.json").read_text())
    assert info["num_samples"] == 3  # one file given: its folder is converted
    assert info["image_size"] == 32  # TINY's model.image_size
    assert source.is_dir()


def test_a_glob_of_files_that_are_not_tars_is_one_line(tmp_path):
    data = tmp_path / "notes"
    data.mkdir()
    for name in ("a.dat", "b.dat"):
        (data / name).write_bytes(b"not a tar file\n" * 40)
    proc = run_cli(
        "-m",
        "dcgan_dist.train",
        "--config",
        "debug",
        *TINY,
        f"data.shards={data}/*.dat",
        f"run.dir={tmp_path / 'run'}",
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a tar file" in lines[0] and "BufferedReader" not in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_glob_of_shards_and_images_names_the_images(tmp_path, tiny_shards):
    data = tmp_path / "faces"
    data.mkdir()
    for shard in sorted(tiny_shards.glob("*.tar"))[:2]:
        (data / shard.name).write_bytes(shard.read_bytes())
    Image.new("RGB", (8, 8)).save(data / "preview.png")  # what `data inspect` leaves beside the shards
    proc = run_cli(
        "-m",
        "dcgan_dist.train",
        "--config",
        "debug",
        *TINY,
        f"data.shards={data}/*",
        f"run.dir={tmp_path / 'run'}",
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "preview.png" in lines[0] and lines[0].endswith(f"{data}/*.tar"), proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_shards):
    """A short tiny run started from an empty working directory: (its process, run dir, working dir)."""
    base = tmp_path_factory.mktemp("tiny")
    work, run_dir = base / "work", base / "run"
    work.mkdir()
    proc = run_cli(
        "-m",
        "dcgan_dist.train",
        "--config",
        "debug",
        *TINY,
        f"data.shards={tiny_shards}",
        f"run.dir={run_dir}",
        "train.max_steps=40",
        "train.log_every=10",
        "train.sample_every=20",
        "train.checkpoint_every=20",
        cwd=work,
        timeout=120,
        check=True,
    )
    return proc, run_dir, work


def test_every_progress_line_has_an_eta_and_a_cpu_run_writes_its_estimate(tiny_run):
    proc, run_dir, _ = tiny_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "images_per_s" in r]
    assert [r["step"] for r in logged] == [10, 20, 30, 40]
    assert all(r["eta_s"] >= 0 for r in logged) and logged[-1]["eta_s"] == 0 and logged[0]["eta_s"] > 0
    # Not a terminal (as in CI or nohup): one plain line per logged step, each with its ETA.
    progress = [line for line in proc.stdout.splitlines() if re.match(r"step\s+\d+/40\s", line)]
    assert len(progress) == 4 and all(re.search(r"\beta \d", line) for line in progress), proc.stdout
    estimate = json.loads((run_dir / "estimate.json").read_text())
    assert estimate["device"] == "cpu" and estimate["max_steps"] == 40 and estimate["images_per_s"] > 0
    assert estimate["long"] is False
    assert estimate["estimated_total_s"] == pytest.approx(40 * estimate["global_batch"] / estimate["images_per_s"])


def test_sample_and_inspect_write_beside_the_run_not_into_the_cwd(tiny_run, tiny_shards, tmp_path):
    _, run_dir, work = tiny_run
    sample = run_cli(
        "-m",
        "dcgan_dist.sample",
        "--checkpoint",
        str(run_dir),
        "sample.num=4",
        "sample.seed=5",
        cwd=work,
        timeout=120,
        check=True,
    )
    grid = run_dir / "samples" / "grid_step40_seed5.png"
    assert grid.is_file() and str(grid) in sample.stdout
    checkpoint = run_dir / "checkpoints" / "step_0000020.pt"
    run_cli(
        "-m", "dcgan_dist.sample", "--checkpoint", str(checkpoint), "sample.num=4", cwd=work, timeout=120, check=True
    )
    assert (run_dir / "samples" / "grid_step20_seed0.png").is_file()
    (run_dir / "progress.gif").unlink()
    run_cli("-m", "dcgan_dist.sample", "--progress", str(run_dir), cwd=work, timeout=120, check=True)
    assert (run_dir / "progress.gif").is_file()
    # inspect: a glob's preview goes into the glob's folder (a copy of the shards: the fixture's stay as they are).
    shards = tmp_path / "shards"
    shards.mkdir()
    for shard in sorted(tiny_shards.glob("*.tar"))[:2]:
        (shards / shard.name).write_bytes(shard.read_bytes())
    inspect = run_cli("-m", "dcgan_dist.data", "inspect", f"{shards}/*.tar", cwd=work, timeout=120)
    assert (shards / "preview.png").is_file(), inspect.stdout + inspect.stderr
    assert inspect.stdout.splitlines()[0] == f"preview:  {shards / 'preview.png'} (written after the count)"
    assert sorted(p.name for p in work.iterdir()) == []  # nothing ever landed in the working directory


def test_a_gpu_preset_on_a_cpu_estimates_its_time_within_30_s(tmp_path):
    """The default preset as it is (only a small synthetic set, in tmp): estimate.json says it would take long,
    within the run's first 30 s; SIGTERM then stops it with a checkpoint."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dcgan_dist.train",
            "--config",
            "default",
            "data.synth_num=512",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"run.dir={run_dir}",
            "wandb.mode=disabled",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        estimate_file = run_dir / "estimate.json"
        # 30 s from the command's start (the promise) on an idle machine; a loaded one gets some slack.
        while not estimate_file.is_file():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() - started < 30 * max(1.0, os.getloadavg()[0] / available_cpus()), (
                "no estimate within 30 s"
            )
            time.sleep(0.2)  # polling for the file; nothing is ordered by this wait
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    # The embedded set was drawn first (this run's own cache dir): it says how long that took.
    assert re.search(r"^Generated 512 faces in [\d.]+ s", stdout, re.M), stdout
    estimate = json.loads(estimate_file.read_text())
    assert estimate["long"] is True and estimate["max_steps"] == 10000 and estimate["global_batch"] == 128
    assert estimate["estimated_total_s"] == pytest.approx(10000 * 128 / estimate["images_per_s"])
    warnings = json.loads((run_dir / "result.json").read_text())["warnings"]  # the warning as data, not its line
    assert [w["kind"] for w in warnings] == ["cpu_estimate"] and "--config debug" in warnings[0]["suggestion"], warnings
    assert warnings[0]["estimated_total_s"] == estimate["estimated_total_s"]
    # The preset's 4 loader workers are more than this machine's CPUs: lowered once, and torch does not warn.
    assert "This DataLoader will create" not in stderr, stderr
    if available_cpus() < 4:
        assert sum("data.num_workers=4" in line for line in (stdout + stderr).splitlines()) == 1, stdout + stderr
    # The stop came before any sample grid: the summary names no samples folder.
    assert not (run_dir / "samples").exists()
    assert re.search(r"samples:\s+none yet", stdout), stdout


def test_settings_meant_for_a_gpu_warn_on_a_cpu_in_the_run_result(tmp_path, tiny_shards):
    """train.meant_for=gpu (the default preset) on a CPU: the estimate becomes a warning of the result, as data
    (TrainResult.warnings, which the result file carries), even for a run of a few steps."""
    import dataclasses

    from dcgan_dist.config import build_config
    from dcgan_dist.training.trainer import Trainer

    small = [*TINY, f"data.shards={tiny_shards}", "train.max_steps=4", "train.log_every=2", "train.sample_every=0"]
    gpu = Trainer(build_config("default", [*small, f"run.dir={tmp_path / 'gpu'}", "train.device=cpu"])).fit()
    [warning] = gpu.warnings
    assert warning["kind"] == "cpu_estimate" and warning["meant_for"] == "gpu" and warning["max_steps"] == 4
    assert warning["estimated_total_s"] == pytest.approx(4 * 16 / warning["images_per_s"])
    assert json.loads(json.dumps(dataclasses.asdict(gpu)))["warnings"] == [warning]
    assert json.loads((tmp_path / "gpu" / "estimate.json").read_text())["meant_for"] == "gpu"
    # The same short run with settings for any device: an estimate file, no warning.
    any_device = Trainer(
        build_config("default", [*small, f"run.dir={tmp_path / 'any'}", "train.device=cpu", "train.meant_for=any"])
    ).fit()
    assert any_device.warnings == [] and (tmp_path / "any" / "estimate.json").is_file()


def free_local_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["host:port", "stale address file", "job server"])
def test_a_ray_address_that_does_not_answer_ends_in_one_line_within_30_s(tmp_path, tiny_shards, case):
    """dist.launcher=ray (and tune) with a named cluster that is not there: one line naming what was found, exit 2,
    in seconds, no run file; `ray.init` would wait for it for minutes. No Ray process starts here."""
    port = free_local_port()
    ray_tmp = tmp_path / "raytmp"  # Ray's temp dir for this command alone: its ray_current_cluster, not the machine's
    (ray_tmp / "ray").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # RAY_GCS_PORT: where a job server's cluster would have its GCS (the default 6379 may be a test cluster's).
    env.update(PYTHONPATH=str(ROOT), RAY_TMPDIR=str(ray_tmp), RAY_GCS_PORT=str(port))
    named = {"host:port": f"127.0.0.1:{port}", "job server": f"http://127.0.0.1:{free_local_port()}"}
    if case in named:
        env["RAY_ADDRESS"] = named[case]
    else:  # `ray start` recorded it; the cluster was killed (not `ray stop`ped)
        (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}")
    run_dir = tmp_path / "run"
    commands = [
        ["dcgan_dist.train", "--config", "debug", *TINY, f"data.shards={tiny_shards}", "dist.launcher=ray"],
        ["dcgan_dist.tune", "--config", "debug", *TINY, f"data.shards={tiny_shards}", "train.eval_every=2"]
        + ["--search", "optim.lr=loguniform(1e-4,1e-3)"],
    ]
    for command in commands[1:] if case == "job server" else commands[:1]:  # the issue's: tune with the job server
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", *command, f"run.dir={run_dir}"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        took = time.monotonic() - started
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert took < 30, took
        [line] = proc.stderr.splitlines()
        assert line.startswith("error: ")
        if case == "stale address file":
            assert str(ray_tmp / "ray" / "ray_current_cluster") in line and f"127.0.0.1:{port}" in line
        else:
            assert env["RAY_ADDRESS"] in line
        assert not run_dir.exists()


def test_evaluate_shows_a_line_per_stage(tiny_run, tiny_shards):
    """evaluate's stages (real images, generation, SWD, the baseline, FID) each a line on stderr as it finishes,
    numbered k/N; stdout stays the JSON line alone."""
    _, run_dir, work = tiny_run
    proc = run_cli(
        "-m",
        "dcgan_dist.evaluate",
        "--checkpoint",
        str(run_dir),
        "--shards",
        str(tiny_shards),
        "eval.num=32",
        "eval.nhoods_per_image=4",
        cwd=work,
        timeout=180,
        check=True,
    )
    stages = [tuple(map(int, m)) for m in re.findall(r"^\[(\d+)/(\d+)\] ", proc.stderr, re.M)]
    total = stages[-1][1]
    assert stages == [(k, total) for k in range(1, total + 1)] and total >= 4, proc.stderr
    assert json.loads(proc.stdout)["num"] == 32

"""Where results go: the default sinks' TensorBoard events (read back with TensorBoard's own reader), MLflow against
a real tracking server, constant-cost metrics in an object store, and result.json / --json."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dcgan_dist.storage.filesystem import RunStorage
from dcgan_dist.training.metrics import read_metrics
from dcgan_dist.training.sinks.base import SinkContext
from dcgan_dist.training.sinks.jsonl import JsonlSink

from .conftest import ROOT, TINY, read_result, run_cli


def train_args(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "--config",
        "debug",
        *TINY,
        f"data.shards={shards}",
        f"run.dir={run_dir}",
        "train.checkpoint_every=5",
        "train.sample_every=4",
        "train.log_every=1",
        *extra,
    ]


def tensorboard_events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def test_default_sinks_leave_tensorboard_events_that_match_metrics_jsonl_after_a_kill_and_resume(tmp_path, tiny_shards):
    """The default sinks (console, metrics.jsonl, W&B (disabled here), TensorBoard): SIGKILL after step 7 (checkpoint
    at 5), the same command again. TensorBoard's own reader shows every step once, with metrics.jsonl's values, and
    the sample grids as images; result.json (and --json) says where the run resumed from."""
    pytest.importorskip("tensorboard", reason="tensorboard is a dependency: pip install -e .")
    run_dir = tmp_path / "run"
    args = train_args(tiny_shards, run_dir, "train.max_steps=12")
    killed = run_cli(str(ROOT / "tests" / "step_hooks.py"), "--signal=KILL", "--after=7", *args)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run_cli("-m", "dcgan_dist.train", *args, "--json", check=True)

    result = read_result(run_dir)
    assert json.loads(resumed.stdout) == result  # --json: the result alone on stdout
    assert result["command"] == "train" and result["step"] == 12 and result["stop_reason"] == "max_steps"
    assert result["start_step"] == 5 and result["resumed_from"] == str(run_dir / "checkpoints" / "step_0000005.pt")
    assert result["checkpoint"] == str(run_dir / "checkpoints" / "step_0000012.pt") and result["signal"] is None

    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 13))
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per session
    events = tensorboard_events(run_dir / "tensorboard")
    for key in ("loss_d", "loss_g", "d_real", "lr_g", "images_per_s", "step_time_s/rank0"):
        scalars = events.Scalars(key)
        assert [e.step for e in scalars] == list(range(1, 13)), key  # the killed session's 6-7 purged
        assert [e.value for e in scalars] == pytest.approx([r[key] for r in records], rel=1e-5), key
    assert [e.step for e in events.Images("samples")] == [4, 8, 12]
    assert "config/text_summary" in events.Tags()["tensors"]  # the resolved config, as text


def wandb_ending(run_dir: Path) -> list[tuple[list[int], bool]]:
    """Each W&B session of a run (offline, oldest first): its exit codes and whether it was marked preempting."""
    from .wandb_offline import records

    sessions = []
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        kinds = [(r.WhichOneof("record_type"), r) for r in records(next(folder.glob("run-*.wandb")))]
        sessions.append(([r.exit.exit_code for k, r in kinds if k == "exit"], any(k == "preempting" for k, _ in kinds)))
    return sessions


def test_wandb_run_states_follow_how_the_run_ended(tmp_path, tiny_shards):
    """W&B (offline, its own record log read back): a diverged run exits 1 (failed); a run stopped by SIGTERM after
    a step is marked preempting and exits 0, and its resume (the same W&B run) exits 0, not preempting."""
    sinks = ("log.sinks=[console,jsonl,wandb]", "wandb.mode=offline")
    diverged_dir = tmp_path / "diverged"
    diverged = run_cli("-m", "dcgan_dist.train", *train_args(tiny_shards, diverged_dir, *sinks, "optim.lr=1e30"))
    assert diverged.returncode == 1, diverged.stderr[-2000:]
    assert wandb_ending(diverged_dir) == [([1], False)]

    run_dir = tmp_path / "stopped"
    args = train_args(tiny_shards, run_dir, *sinks, "train.max_steps=4")
    stopped = run_cli(str(ROOT / "tests" / "step_hooks.py"), "--signal=TERM", "--after=2", *args)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    assert read_result(run_dir)["stop_reason"] == "signal"
    run_cli("-m", "dcgan_dist.train", *args, check=True)
    assert wandb_ending(run_dir) == [([0], True), ([0], False)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on a free port: SQLite backend, artifacts served by the server itself."""
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install -e '.[mlflow]'): MLflow test skipped")
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(root / "server.log", "w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(
                        f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}"
                    ) from None
                time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # its own session: the server and its workers
        try:
            server.wait(timeout=3)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


@pytest.mark.slow  # ~2 min here: the server's start and MLflow's import in each training process
def test_mlflow_sink_logs_params_every_step_and_grids_to_a_real_server_and_a_resume_continues_its_run(
    mlflow_server, tmp_path, tiny_shards, monkeypatch
):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "sinks-test")
    run_dir = tmp_path / "run"
    args = train_args(tiny_shards, run_dir, "log.sinks=[console,jsonl,mlflow]", "run.name=tracked")
    run_cli("-m", "dcgan_dist.train", *args, "train.max_steps=4", check=True)
    run_cli("-m", "dcgan_dist.train", *args, "train.max_steps=8", check=True)  # resumes from step 4
    assert not (run_dir / "tensorboard").exists()  # not chosen

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("sinks-test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]  # the resume continued the same MLflow run
    run = runs[0]
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "4" and run.data.params["model.ngf"] == "8"  # the first settings
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 9))
    for key in ("loss_d", "loss_g", "images_per_s"):
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == list(range(1, 9)), key
        assert [m.value for m in history] == pytest.approx([r[key] for r in records], rel=1e-6), key
    result = read_result(run_dir)
    assert run.data.tags["final_checkpoint"] == result["checkpoint"] == str(run_dir / "checkpoints" / "step_0000008.pt")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert artifacts == {"samples/step_0000004.png", "samples/step_0000008.png"}
    assert "progress.gif" in {a.path for a in client.list_artifacts(run.info.run_id)}
    grid = Path(client.download_artifacts(run.info.run_id, "samples/step_0000008.png", str(tmp_path)))
    assert grid.read_bytes() == (run_dir / "samples" / "step_0000008.png").read_bytes()


@pytest.mark.slow  # the MLflow server (shared with the test above) and three training processes
def test_mlflow_run_states_follow_how_the_run_ended(mlflow_server, tmp_path, tiny_shards, monkeypatch):
    """A diverged run is FAILED; a run stopped by SIGTERM after a step is KILLED, and its resume continues the same
    MLflow run to FINISHED."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "run-states")
    client = MlflowClient(mlflow_server)

    def states() -> dict[str, list[str]]:
        experiment = client.get_experiment_by_name("run-states")
        found: dict[str, list[str]] = {}
        for run in client.search_runs([experiment.experiment_id]):
            found.setdefault(run.info.run_name, []).append(run.info.status)
        return found

    sinks = "log.sinks=[console,jsonl,mlflow]"
    diverged = run_cli(
        "-m", "dcgan_dist.train", *train_args(tiny_shards, tmp_path / "d", sinks, "run.name=diverged", "optim.lr=1e30")
    )
    assert diverged.returncode == 1, diverged.stderr[-2000:]
    assert states() == {"diverged": ["FAILED"]}
    args = train_args(tiny_shards, tmp_path / "s", sinks, "run.name=stopped", "train.max_steps=4")
    stopped = run_cli(str(ROOT / "tests" / "step_hooks.py"), "--signal=TERM", "--after=2", *args)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    assert states() == {"diverged": ["FAILED"], "stopped": ["KILLED"]}
    run_cli("-m", "dcgan_dist.train", *args, check=True)
    assert states() == {"diverged": ["FAILED"], "stopped": ["FINISHED"]}  # one MLflow run, resumed


def test_metrics_in_an_object_store_cost_the_same_per_log_step_and_read_back_as_one_stream(s3_env, monkeypatch):
    """metrics.jsonl in s3:// as numbered segments: the bytes uploaded for 200 log steps are ~10x those for 20 (a
    whole-file rewrite would be ~100x); read back as one stream; a resume drops what is past its checkpoint."""
    uploaded = {"bytes": 0}
    write = RunStorage.write

    def counting_write(self, name, data):
        uploaded["bytes"] += len(data)
        return write(self, name, data)

    monkeypatch.setattr(RunStorage, "write", counting_write)

    def log(location: str, steps: int) -> int:
        uploaded["bytes"] = 0
        sink = JsonlSink(SinkContext(None, RunStorage(location), Path("/nonexistent"), print))
        sink.start(0)
        for step in range(1, steps + 1):
            sink.scalars({"step": step, "loss_d": 1.0 / step, "loss_g": 0.5, "images_per_s": 123.456})
        return uploaded["bytes"]

    short, long = log("s3://dcgan-test/segments/short", 20), log("s3://dcgan-test/segments/long", 200)
    assert 8 < long / short < 13, (short, long)
    assert [r["step"] for r in read_metrics("s3://dcgan-test/segments/long")] == list(range(1, 201))

    # A resume from step 137: the records after it are dropped, the new ones follow, each step once.
    sink = JsonlSink(SinkContext(None, RunStorage("s3://dcgan-test/segments/long"), Path("/nonexistent"), print))
    sink.start(137)
    for step in range(138, 151):
        sink.scalars({"step": step, "resumed": True})
    records = read_metrics("s3://dcgan-test/segments/long")
    assert [r["step"] for r in records] == list(range(1, 151))
    assert all(r.get("resumed") for r in records if r["step"] > 137)


def test_tensorboard_events_of_a_run_in_an_object_store_are_uploaded_into_its_tensorboard_folder(s3_env, tmp_path):
    """With run.dir=s3://... the events are written on this machine and uploaded at the end; a resumed session's
    file purges the steps it logs again, as on a disk."""
    pytest.importorskip("tensorboard", reason="tensorboard is a dependency: pip install -e .")
    from PIL import Image

    from dcgan_dist.config import build_config
    from dcgan_dist.training.sinks.tensorboard import TensorBoardSink

    cfg = build_config(None, [])
    storage = RunStorage("s3://dcgan-test/tensorboard-run")
    for session, (start, end) in enumerate(((0, 7), (5, 9))):  # the second resumes from step 5
        sink = TensorBoardSink(SinkContext(cfg, storage, tmp_path / f"local{session}", print))
        sink.start(start)
        for step in range(start + 1, end + 1):
            sink.scalars({"step": step, "loss_d": step + 0.5 * session})
        sink.image("samples", Image.new("RGB", (8, 8)), end)
        sink.close(end, None, "finished")
        time.sleep(1.1)  # event files are named by the second they were opened in
    names = [name for name, _ in storage.list("tensorboard")]
    assert len(names) == 2 and all(name.startswith("events.out.tfevents.") for name in names), names
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in names:
        (copy / name).write_bytes(storage.read(f"tensorboard/{name}"))
    events = tensorboard_events(copy)
    assert [(e.step, e.value) for e in events.Scalars("loss_d")] == [(s, s + 0.5 * (s > 5)) for s in range(1, 10)]
    assert [e.step for e in events.Images("samples")] == [9]  # step 7's purged with the rest past 5


def test_tensorboard_events_of_a_run_in_an_object_store_are_there_before_it_ends(s3_env, tmp_path, monkeypatch):
    """A run killed outright (no close) has left its events in the bucket up to its last sample grid, and up to a
    log step once UPLOAD_EVERY_S has passed since the last upload."""
    pytest.importorskip("tensorboard", reason="tensorboard is a dependency: pip install -e .")
    from PIL import Image

    from dcgan_dist.config import build_config
    from dcgan_dist.training.sinks import tensorboard

    storage = RunStorage("s3://dcgan-test/tensorboard-killed")
    sink = tensorboard.TensorBoardSink(SinkContext(build_config(None, []), storage, tmp_path / "local", print))
    sink.start(0)
    for step in range(1, 5):
        sink.scalars({"step": step, "loss_d": float(step)})
    sink.image("samples", Image.new("RGB", (8, 8)), 4)
    sink.scalars({"step": 5, "loss_d": 5.0})  # not uploaded yet
    monkeypatch.setattr(tensorboard, "UPLOAD_EVERY_S", 0.0)
    sink.scalars({"step": 6, "loss_d": 6.0})  # due: uploaded with steps 5 and 6

    def in_the_bucket():
        copy = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        copy.mkdir()
        for name, _ in storage.list("tensorboard"):
            (copy / name).write_bytes(storage.read(f"tensorboard/{name}"))
        return tensorboard_events(copy)

    events = in_the_bucket()  # and the session is never closed
    assert [e.step for e in events.Scalars("loss_d")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in events.Images("samples")] == [4]


def test_tensorboard_gets_swd_per_class_as_a_scalar_per_class(tmp_path):
    """A record's nested dict (swd_per_class: {class: value}, conditional runs) becomes swd_per_class/<class>."""
    pytest.importorskip("tensorboard", reason="tensorboard is a dependency: pip install -e .")
    from dcgan_dist.config import build_config
    from dcgan_dist.training.sinks.tensorboard import TensorBoardSink

    run_dir = tmp_path / "run"
    sink = TensorBoardSink(SinkContext(build_config(None, []), RunStorage(str(run_dir)), run_dir, print))
    sink.start(0)
    sink.scalars({"step": 4, "swd": 0.5, "swd_per_class": {"red": 0.25, "blue": 0.75}, "resumed": True})
    sink.close(4, None, "finished")
    events = tensorboard_events(run_dir / "tensorboard")
    assert sorted(events.Tags()["scalars"]) == ["swd", "swd_per_class/blue", "swd_per_class/red"]
    assert [(e.step, e.value) for e in events.Scalars("swd_per_class/red")] == [(4, 0.25)]

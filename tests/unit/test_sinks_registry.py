"""The sinks' registry and settings, metrics.jsonl's reader and local appends (no processes, no training)."""

import pytest

from dcgan_dist.config import ConfigError, build_config
from dcgan_dist.storage.filesystem import AppendLog, RunStorage
from dcgan_dist.training import sinks
from dcgan_dist.training.metrics import parse_metrics, read_metrics
from dcgan_dist.training.sinks.base import Sink, SinkContext
from dcgan_dist.training.trainer import check_settings


def test_every_file_in_the_sinks_folder_is_a_sink_by_its_name():
    assert sinks.available() == ["console", "jsonl", "mlflow", "tensorboard", "wandb"]
    for name in ("console", "jsonl", "wandb"):
        assert issubclass(sinks.sink_class(name), Sink)
    with pytest.raises(ValueError, match="'nope' is no sink; the sinks: console, jsonl"):
        sinks.sink_class("nope")


def test_log_sinks_is_a_list_setting_checked_against_the_sinks():
    assert build_config(None, []).log.sinks == ["console", "jsonl", "wandb", "tensorboard"]
    assert build_config(None, ["log.sinks=[console,mlflow]"]).log.sinks == ["console", "mlflow"]
    with pytest.raises(ConfigError, match=r"'log.sinks' expects a list, e.g. log.sinks=\[console,jsonl,wandb"):
        build_config(None, ["log.sinks=console"])
    cfg = build_config(None, ["log.sinks=[console,tensorbord]", "data.synth_num=64"])
    with pytest.raises(ConfigError, match="'tensorbord' is no sink"):
        check_settings(cfg, check_run_dir=False)


def test_a_sink_whose_library_is_missing_is_refused_before_the_run_with_the_install_command(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "mlflow" else find_spec(name))
    cfg = build_config(None, ["log.sinks=[console,mlflow]"])
    with pytest.raises(
        ConfigError, match=r"log.sinks has mlflow, but mlflow is not installed: pip install -e \"\.\[mlflow\]\""
    ):
        check_settings(cfg, check_run_dir=False)


def test_a_later_record_of_an_earlier_step_replaces_what_followed_it():
    text = "".join(f'{{"step": {s}}}\n' for s in (1, 2, 3, 4, 3, 4, 5)) + '{"step": 6, "cut sh'
    assert [r["step"] for r in parse_metrics(text)] == [1, 2, 3, 4, 5]


def test_metrics_jsonl_on_a_disk_is_appended_to_and_read_from_the_file_or_the_run_dir(tmp_path):
    log = AppendLog(RunStorage(str(tmp_path)), "metrics.jsonl")
    for step in (1, 2):
        log.append(f'{{"step": {step}}}\n'.encode())
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
    assert not (tmp_path / "metrics.jsonl.segments").exists()
    assert read_metrics(tmp_path) == read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1}, {"step": 2}]


def test_the_jsonl_sink_drops_the_records_past_the_checkpoint_it_resumes_from(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(f'{{"step": {s}}}\n' for s in range(1, 8)) + '{"step": 8, "x')
    sink = sinks.make(["jsonl"], SinkContext(None, RunStorage(str(tmp_path)), tmp_path, print))["jsonl"]
    sink.start(5)
    sink.scalars({"step": 6, "again": True})
    assert read_metrics(tmp_path) == [*({"step": s} for s in range(1, 6)), {"step": 6, "again": True}]

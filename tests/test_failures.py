"""What real clusters do to a run, on real processes and files: bad settings and data end in one line and exit 2
with nothing written, a checkpoint crafted to run code runs nothing, a full disk leaves the last checkpoint
intact. (Graceful stops are in test_train.py and test_ray.py.)"""

import os
import resource
import shutil

import pytest
import torch

from dcgan_dist.config import build_config, to_dict
from dcgan_dist.data import write_synthetic_shards
from dcgan_dist.training import checkpoint as ckpt

from .conftest import TINY, run_cli


@pytest.fixture(scope="module")
def shards64(tmp_path_factory):
    """Shards of 64x64 faces: the wrong size for the tiny 32x32 model."""
    out = tmp_path_factory.mktemp("shards") / "faces64"
    write_synthetic_shards(out, 8, shard_size=4, size=64, seed=1, processes=1, progress=False)
    return out


def train(*overrides, **kwargs):
    return run_cli("-m", "dcgan_dist.train", "--config", "debug", *TINY, "train.max_steps=4", *overrides, **kwargs)


def bad_data_cases(tmp_path, shards64):
    (tmp_path / "empty").mkdir()
    no_info = tmp_path / "faces64-no-dataset-json"
    shutil.copytree(shards64, no_info)
    (no_info / "dataset.json").unlink()
    return {
        "missing": (f"data.shards={tmp_path / 'nowhere'}", "does not exist"),
        "empty": (f"data.shards={tmp_path / 'empty'}", "no .tar shards"),
        "unreadable URL": (f"data.shards=pipe:cat {tmp_path / 'nowhere.tar'}", "first shard"),
        "wrong size (dataset.json)": (f"data.shards={shards64}", "model.image_size=64"),
        "wrong size (first sample)": (f"data.shards={no_info}", "model.image_size=64"),
    }


@pytest.mark.parametrize(
    "case", ["missing", "empty", "unreadable URL", "wrong size (dataset.json)", "wrong size (first sample)"]
)
def test_bad_data_is_one_line_and_exit_2_before_any_run_file(tmp_path, shards64, case):
    setting, words = bad_data_cases(tmp_path, shards64)[case]
    run_dir = tmp_path / "run"
    proc = train(setting, f"run.dir={run_dir}", "wandb.mode=offline")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and 1 <= len(lines) <= 2, proc.stderr
    assert lines[-1].startswith("error: data.shards=") and words in lines[-1], lines
    assert not run_dir.exists()  # no run files, no W&B run


@pytest.mark.parametrize("where", ["under /proc", "under a file"])
def test_a_run_dir_that_cannot_be_written_is_named(tmp_path, tiny_shards, where):
    (tmp_path / "a-file").write_text("")
    run_dir = "/proc/dcgan-run" if where == "under /proc" else str(tmp_path / "a-file" / "run")
    proc = train(f"data.shards={tiny_shards}", f"run.dir={run_dir}")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: run.dir={run_dir}: "), proc.stderr


def test_too_few_shards_for_the_workers_is_refused_before_ray_starts(tmp_path, shards64):
    """Two shards cannot feed three workers: said by the driver, before it connects to any Ray cluster."""
    run_dir = tmp_path / "run"
    proc = train(
        f"data.shards={shards64}",
        "model.image_size=64",
        "dist.launcher=ray",
        "dist.num_workers=3",
        f"run.dir={run_dir}",
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "cannot feed 3 workers" in lines[0], proc.stderr


class RunsCode:
    """Unpickling this runs `touch marker` (pickle's __reduce__): what a booby-trapped .pt file does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def booby_trapped_checkpoint(path, marker, step: int = 2):
    state = {
        "format_version": ckpt.FORMAT_VERSION,
        "step": step,
        "config": to_dict(build_config("debug", TINY)),
        "G": RunsCode(marker),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def test_a_checkpoint_crafted_to_run_code_runs_nothing(tmp_path):
    marker = tmp_path / "code-ran"
    evil = booby_trapped_checkpoint(tmp_path / "evil.pt", marker)
    torch.load(evil, weights_only=False)  # the control: unpickled the unsafe way, it does run its command
    assert marker.exists()
    marker.unlink()
    run_dir = tmp_path / "run"
    booby_trapped_checkpoint(run_dir / "checkpoints" / "step_0000002.pt", marker)
    before = sorted((p.relative_to(run_dir), p.read_bytes()) for p in run_dir.rglob("*") if p.is_file())
    for command in (
        ("-m", "dcgan_dist.sample", "--checkpoint", str(evil), "--out", str(tmp_path / "s.png")),
        ("-m", "dcgan_dist.evaluate", "--checkpoint", str(evil)),
        ("-m", "dcgan_dist.train", "--config", "debug", *TINY, f"run.dir={run_dir}"),
    ):  # resume
        proc = run_cli(*command)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and "not a readable dcgan_dist checkpoint" in lines[0], (
            proc.stderr
        )
        assert not marker.exists(), command
    after = sorted((p.relative_to(run_dir), p.read_bytes()) for p in run_dir.rglob("*") if p.is_file())
    assert after == before  # the refused resume left the run directory exactly as it was


def test_a_full_disk_while_checkpointing_keeps_the_last_checkpoint(tmp_path, tiny_shards):
    """The resumed run may write files of at most 100 kB (RLIMIT_FSIZE, as a full disk would refuse them): its
    step-6 checkpoint (~0.5 MB) fails; step 3's stays whole and loadable, no partial file is left, one line."""
    run_dir = tmp_path / "run"
    common = [f"data.shards={tiny_shards}", f"run.dir={run_dir}", "train.checkpoint_every=3", "train.sample_every=3"]
    train(*common, "train.max_steps=3", check=True)
    intact = (run_dir / "checkpoints" / "step_0000003.pt").read_bytes()

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    proc = train(*common, "train.max_steps=9", preexec_fn=limit_file_size)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and lines[-1].startswith("error: cannot write checkpoint "), proc.stderr
    assert "step_0000006.pt" in lines[-1] and "MiB free there" in lines[-1] and "step_0000003.pt" in lines[-1]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_0000003.pt"]
    assert (run_dir / "checkpoints" / "step_0000003.pt").read_bytes() == intact
    assert ckpt.load(run_dir / "checkpoints" / "step_0000003.pt")["step"] == 3

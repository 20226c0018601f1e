"""Finding and loading checkpoints: every location a run leaves them in, the newest readable one, and files
that are not checkpoints (refused without running anything)."""

import os

import pytest
import torch

from dcgan_dist.config import build_config, to_dict, to_yaml
from dcgan_dist.training import checkpoint as ckpt


def fake_state(step: int) -> dict:
    return {"format_version": ckpt.FORMAT_VERSION, "step": step, "config": to_dict(build_config("debug", []))}


def write_text(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def write(path, step: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(fake_state(step), path)
    return path


def test_every_layout_finds_the_newest(tmp_path):
    # A local run directory: <run.dir>/checkpoints/step_*.pt (best.pt is not a step checkpoint).
    local = tmp_path / "local"
    for step in (5, 10):
        write(local / "checkpoints" / f"step_{step:07d}.pt", step)
    write(local / "checkpoints" / "best.pt", 7)
    assert ckpt.load_checkpoint(local)[1]["step"] == 10
    assert ckpt.load_checkpoint(local / "checkpoints")[1]["step"] == 10
    assert ckpt.load_checkpoint(local / "checkpoints" / "best.pt")[1]["step"] == 7

    # A Ray run directory as the README's example leaves it: config.yaml names the run, Ray Train's storage
    # holds step_*/state.pt beside its own snapshot file.
    ray_run = tmp_path / "ray-run"
    write_text(
        ray_run / "config.yaml",
        to_yaml(build_config("debug", ["run.name=faces", "dist.launcher=ray", f"run.dir={ray_run}"])),
    )
    experiment = ray_run / "ray" / "faces"
    for step in (3, 6):
        write(experiment / f"step_{step:07d}" / ckpt.STATE_FILE, step)
    (experiment / "checkpoint_manager_snapshot.json").write_text("{}")
    assert ckpt.load_checkpoint(ray_run)[1]["step"] == 6
    assert ckpt.load_checkpoint(experiment)[1]["step"] == 6
    assert ckpt.load_checkpoint(experiment / "step_0000003")[1]["step"] == 3  # a Ray checkpoint directory

    # dist.storage_path elsewhere: the run's config.yaml says where.
    elsewhere = tmp_path / "storage"
    other = tmp_path / "other-run"
    write_text(other / "config.yaml", to_yaml(build_config("debug", ["run.name=x", f"dist.storage_path={elsewhere}"])))
    write(elsewhere / "x" / "step_0000009" / ckpt.STATE_FILE, 9)
    assert ckpt.load_checkpoint(other)[1]["step"] == 9

    (tmp_path / "empty").mkdir()
    with pytest.raises(ckpt.CheckpointError, match="no checkpoints"):
        ckpt.load_checkpoint(tmp_path / "empty")
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "nowhere")


def test_an_unreadable_newest_checkpoint_falls_back_to_the_one_before(tmp_path):
    folder = tmp_path / "checkpoints"
    write(folder / "step_0000005.pt", 5)
    newest = write(folder / "step_0000010.pt", 10)
    newest.write_bytes(newest.read_bytes()[:100])  # a full disk, a crash mid-copy
    warnings = []
    path, state = ckpt.load_checkpoint(folder, warn=warnings.append)
    assert state["step"] == 5 and path.endswith("/step_0000005.pt")
    assert len(warnings) == 1 and "step_0000010.pt" in warnings[0]


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_files_that_are_not_checkpoints_are_refused_without_running_code(tmp_path):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({**fake_state(1), "payload": RunsCode(marker)}, evil)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load(evil)
    assert "\n" not in str(err.value) and not marker.exists()
    (tmp_path / "text.pt").write_text("not a checkpoint")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    torch.save({**fake_state(1), "format_version": 1}, tmp_path / "old.pt")
    for name, words in (
        ("text.pt", "not a readable"),
        ("other.pt", "not a dcgan_dist checkpoint"),
        ("old.pt", "format 1"),
    ):
        with pytest.raises(ckpt.CheckpointError, match=words):
            ckpt.load(tmp_path / name)

"""Checkpoints and run directories are untrusted data: nothing read from them runs a command or chooses a place,
a checkpoint that does not fit is refused in one line (a resume passes over it for the one before), and sample
and evaluate refuse arguments that cannot work in one line. Every bad checkpoint here is a real checkpoint of a
tiny run, edited and saved again."""

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from dcgan_dist.config import build_config, to_yaml
from dcgan_dist.training import checkpoint as ckpt

from .conftest import TINY, assert_same_training_state, read_result, run_cli


def train_args(shards: Path, run_dir: Path, max_steps: int) -> list[str]:
    return [
        "-m",
        "dcgan_dist.train",
        "--config",
        "debug",
        *TINY,
        f"data.shards={shards}",
        f"run.dir={run_dir}",
        f"train.max_steps={max_steps}",
        "train.checkpoint_every=2",
        "train.sample_every=2",
        "train.log_every=1",
        "train.ema_decay=0.9",
    ]


@pytest.fixture(scope="module")
def run6(tmp_path_factory, tiny_shards) -> Path:
    """A tiny run trained to step 6: checkpoints at steps 2, 4 and 6."""
    run_dir = tmp_path_factory.mktemp("trust") / "run"
    run_cli(*train_args(tiny_shards, run_dir, 6), check=True)
    return run_dir


def edited(source: Path, target: Path, edit) -> Path:
    """A copy of a real checkpoint with `edit(state)` applied, saved as torch.save does."""
    state = torch.load(source, weights_only=True)
    edit(state)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, target)
    return target


def snapshot(folder: Path) -> list[tuple[str, bytes]]:
    """Every file's name and bytes (and every other entry's name: a pipe is not read)."""
    return sorted((str(p.relative_to(folder)), p.read_bytes() if p.is_file() else b"") for p in folder.rglob("*"))


def error_line(proc) -> str:
    """The one line a refused command prints (asserting that it is one line, exit 2)."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (proc.returncode, proc.stderr)
    return lines[0]


def run_each(commands: list[list[str]], timeout: float = 60) -> list:
    """run_cli of every command, four at a time (each is a short, separate process)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda args: run_cli(*args, timeout=timeout), commands))


def set_setting(section: str, key: str, value):
    def edit(state):
        state["config"][section][key] = value

    return edit


def test_a_checkpoint_names_no_command_and_no_place(run6, tmp_path, tiny_shards):
    """evaluate without --shards: a checkpoint's data.shards is used only when plain; pipe: (alone, '::'-joined,
    in a brace pattern) and URLs are refused in one line and nothing runs; its data.cache_dir is never used."""
    newest = run6 / "checkpoints" / "step_0000006.pt"
    marker = tmp_path / "command-ran"
    first_shard = sorted(tiny_shards.glob("*.tar"))[0]
    fifo = tmp_path / "fifo.tar"  # a plain path, but reading it would wait for a writer forever
    os.mkfifo(fifo)
    commands = []
    for i, shards in enumerate(
        [
            f"pipe:touch {marker}; cat {first_shard}",
            f"{tiny_shards}::pipe:touch {marker}; cat {first_shard}",
            f"{{pipe:touch {marker}; cat {first_shard},{first_shard}}}",
            "http://127.0.0.1:9/shard.tar",
            str(fifo),
        ]
    ):
        evil = edited(newest, tmp_path / f"evil{i}.pt", set_setting("data", "shards", shards))
        commands.append(
            ["-m", "dcgan_dist.evaluate", "--checkpoint", str(evil), "eval.num=16", "eval.nhoods_per_image=2"]
        )
    # The command line's --shards is the user's own choice: the same checkpoint evaluates on it.
    commands.append(
        [
            "-m",
            "dcgan_dist.evaluate",
            "--checkpoint",
            str(tmp_path / "evil0.pt"),
            "--shards",
            str(tiny_shards),
            "eval.num=16",
            "eval.nhoods_per_image=2",
            "eval.baseline=false",
        ]
    )

    # Synthetic faces (data.shards empty): generated where the command line says, never in the checkpoint's cache_dir.
    def synthetic_elsewhere(state):
        state["config"]["data"].update(shards="", cache_dir=str(tmp_path / "chosen-by-checkpoint"), synth_num=64)

    synthetic = edited(newest, tmp_path / "synthetic.pt", synthetic_elsewhere)
    mine = tmp_path / "my-cache"
    commands.append(
        [
            "-m",
            "dcgan_dist.evaluate",
            "--checkpoint",
            str(synthetic),
            f"data.cache_dir={mine}",
            "eval.num=16",
            "eval.nhoods_per_image=2",
            "eval.baseline=false",
        ]
    )

    *refused, on_given_shards, on_synthetic = run_each(commands, timeout=120)
    for args, proc in zip(commands, refused):
        assert "give the real images with --shards" in error_line(proc), args
    assert not marker.exists()
    assert on_given_shards.returncode == 0 and '"step": 6' in on_given_shards.stdout, on_given_shards.stderr
    assert on_synthetic.returncode == 0, on_synthetic.stderr
    assert not (tmp_path / "chosen-by-checkpoint").exists()
    assert [p.name for p in mine.iterdir() if p.is_dir()] == ["synth-faces-32px-rgb-n64-seed0"]


def test_a_run_directory_config_yaml_names_no_other_place(tmp_path, run6):
    """A run directory's config.yaml names where Ray kept its checkpoints: followed for a plain path or s3://, not
    for another scheme or a run.name that climbs out of the folder; the line says so."""
    real = run6 / "checkpoints" / "step_0000004.pt"
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(real, tmp_path / "elsewhere" / "step_0000004.pt")  # where a config.yaml below points
    for i, overrides in enumerate(
        [
            [f"dist.storage_path=file://{tmp_path}", "run.name=elsewhere"],
            [f"dist.storage_path={tmp_path}/sub", "run.name=../elsewhere"],
        ]
    ):
        run_dir = tmp_path / f"run{i}"
        (tmp_path / "sub").mkdir(exist_ok=True)
        run_dir.mkdir()
        # Written as another program might: a command line would not accept that run.name.
        plain = [o.replace("run.name=../elsewhere", "run.name=PLACEHOLDER") for o in overrides]
        (run_dir / "config.yaml").write_text(
            to_yaml(build_config("debug", plain)).replace("PLACEHOLDER", "../elsewhere")
        )
        line = error_line(
            run_cli(
                "-m", "dcgan_dist.sample", "--checkpoint", str(run_dir), "--out", str(tmp_path / "s.png"), timeout=60
            )
        )
        assert "was not looked at" in line and "give the checkpoint itself" in line, line
        assert not (tmp_path / "s.png").exists()
    # The plain path is followed (the README's dist.storage_path case).
    run_dir = tmp_path / "plain"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(
        to_yaml(build_config("debug", [f"dist.storage_path={tmp_path}", "run.name=elsewhere"]))
    )
    assert ckpt.load_checkpoint(run_dir)[1]["step"] == 4


def bad_shape(part: str):
    def edit(state):
        state[part][next(iter(state[part]))] = torch.zeros(3, 3)

    return edit


def no_opt_d(state):
    del state["opt_d"]


def bad_rng(state):
    state["ranks"][0]["rng"]["noise"] = torch.zeros(5, dtype=torch.uint8)


def bad_optimizer_shape(state):
    state["opt_g"]["state"][0]["exp_avg"] = torch.zeros(2, 2)


def odd_wandb_id(state):
    state["metrics"]["sinks"]["wandb"]["run_id"] = "../../elsewhere"  # the W&B sink's state


MISFITS = {
    "a G tensor of another shape": bad_shape("G"),
    "no opt_d": no_opt_d,
    "a bad RNG state": bad_rng,
    "an Adam moment of another shape": bad_optimizer_shape,
}


def test_resume_passes_over_checkpoints_that_do_not_fit(run6, tmp_path, tiny_shards):
    """The newest checkpoint does not fit (each way in MISFITS): the resume says so in a line, continues from step
    4, and ends with the same weights as a run resumed from step 4 with nothing newer there."""
    reference = tmp_path / "reference"
    shutil.copytree(run6, reference)
    (reference / "checkpoints" / "step_0000006.pt").unlink()
    run_dirs = {case: tmp_path / case.replace(" ", "-") for case in MISFITS}
    for case, edit in MISFITS.items():
        shutil.copytree(run6, run_dirs[case])
        newest = run_dirs[case] / "checkpoints" / "step_0000006.pt"
        edited(newest, newest, edit)
    # A run directory's sample grids are read back for progress.gif at the end: one that is not an image costs
    # the animation (a line says so), not the run.
    (run_dirs["no opt_d"] / "samples" / "step_0000001.png").write_bytes(b"not a png")
    (run_dirs["no opt_d"] / "progress.gif").unlink()
    runs = run_each([train_args(tiny_shards, run_dir, 8) for run_dir in [reference, *run_dirs.values()]], timeout=180)
    assert runs[0].returncode == 0, runs[0].stderr[-2000:]
    expected = ckpt.load(reference / "checkpoints" / "step_0000008.pt")
    for (case, run_dir), proc in zip(run_dirs.items(), runs[1:]):
        assert proc.returncode == 0, (case, proc.stderr[-2000:])
        assert "step_0000006.pt does not fit this run" in proc.stdout, (case, proc.stdout)
        result = read_result(run_dir)
        assert result["resumed_from"] == str(run_dir / "checkpoints" / "step_0000004.pt"), case
        assert result["start_step"] == 4 and result["step"] == 8, case
        assert_same_training_state(ckpt.load(run_dir / "checkpoints" / "step_0000008.pt"), expected)
    assert "warning: no progress animation" in runs[2].stdout and not (run_dirs["no opt_d"] / "progress.gif").exists()


def test_a_checkpoint_does_not_choose_the_optimiser(run6, tmp_path, tiny_shards):
    """Adam's group settings in a checkpoint (maximize, weight decay, eps, lr) are not the run's to take: a resume
    from a checkpoint that carries others ends bit-identical to one from the same checkpoint as it was saved."""

    def other_algorithm(state):
        for optimizer in ("opt_g", "opt_d"):
            for group in state[optimizer]["param_groups"]:
                group.update(maximize=True, weight_decay=100.0, eps=1.0, lr=10.0)

    plain, crafted = tmp_path / "plain", tmp_path / "crafted"
    shutil.copytree(run6, plain)
    shutil.copytree(run6, crafted)
    newest = crafted / "checkpoints" / "step_0000006.pt"
    edited(newest, newest, other_algorithm)
    for proc in run_each([train_args(tiny_shards, run_dir, 8) for run_dir in (plain, crafted)], timeout=180):
        assert proc.returncode == 0, proc.stderr[-2000:]
    for run_dir in (plain, crafted):  # both resumed from step 6's checkpoint (result.json, not the console)
        result = read_result(run_dir)
        assert result["start_step"] == 6 and result["resumed_from"].endswith("step_0000006.pt"), result
    assert_same_training_state(
        ckpt.load(crafted / "checkpoints" / "step_0000008.pt"), ckpt.load(plain / "checkpoints" / "step_0000008.pt")
    )


def test_resume_when_no_checkpoint_fits_is_refused_leaving_the_run_as_it_was(run6, tmp_path, tiny_shards):
    run_dir = tmp_path / "run"
    shutil.copytree(run6, run_dir)
    for checkpoint, edit in zip(
        sorted((run_dir / "checkpoints").glob("step_*.pt")), (bad_optimizer_shape, odd_wandb_id, bad_rng)
    ):
        edited(checkpoint, checkpoint, edit)
    os.mkfifo(run_dir / "checkpoints" / "step_0000008.pt")  # the newest: a pipe, which no one will ever write
    before = snapshot(run_dir)
    line = error_line(run_cli(*train_args(tiny_shards, run_dir, 10), timeout=120))
    assert "step_0000002.pt does not fit this run" in line and "none of the 4 checkpoints" in line, line
    assert snapshot(run_dir) == before  # config.yaml, metrics.jsonl, samples and checkpoints byte for byte


def test_sample_and_evaluate_refuse_a_generator_that_does_not_fit(run6, tmp_path):
    """A checkpoint file whose generator does not fit its settings: one line, exit 2, no output. model.ngf=10**7
    with the real (small) tensors is refused from the shapes alone, without allocating the 40 GB model."""
    newest = run6 / "checkpoints" / "step_0000006.pt"  # with EMA weights: what sample and evaluate use by default

    def missing_ema_tensor(state):
        del state["ema"][next(iter(state["ema"]))]

    cases = {
        "shape": bad_shape("ema"),
        "missing": missing_ema_tensor,
        "huge": set_setting("model", "ngf", 10**7),
        "invalid": set_setting("model", "image_size", 33),
    }
    commands = [
        [
            "-m",
            "dcgan_dist.sample",
            "--checkpoint",
            str(edited(newest, tmp_path / f"{name}.pt", edit)),
            "--out",
            str(tmp_path / f"{name}.png"),
        ]
        for name, edit in cases.items()
    ]
    raw_g = edited(newest, tmp_path / "raw.pt", bad_shape("G"))
    commands.append(["-m", "dcgan_dist.evaluate", "--checkpoint", str(raw_g), "eval.weights=raw"])
    for args, proc in zip(commands, run_each(commands)):
        line = error_line(proc)
        assert args[3] in line and ("does not fit its model settings" in line or "cannot use" in line), line
    assert not list(tmp_path.glob("*.png"))


def test_sample_and_evaluate_refuse_arguments_that_cannot_work(run6, tmp_path):
    """Root can write almost anywhere: a file where a folder should be, /proc, and a folder as --out are places
    it cannot write a file. Each is one line, exit 2, and no file is left."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    checkpoint = str(run6 / "checkpoints" / "step_0000006.pt")
    sample = ["-m", "dcgan_dist.sample", "--checkpoint", checkpoint]
    evaluate = ["-m", "dcgan_dist.evaluate", "--checkpoint", checkpoint, "eval.nhoods_per_image=2"]
    cases = [
        (sample + ["sample.num=0", "--out", str(tmp_path / "zero.png")], "sample.num"),
        (sample + ["--out", str(blocker / "grid.png")], "cannot write --out"),
        (sample + ["--out", "/proc/grid.png"], "cannot write --out"),
        (sample + ["--out", str(tmp_path)], "--out"),
        (["-m", "dcgan_dist.sample", "--progress", str(run6), "--out", str(blocker / "p.gif")], "cannot write --out"),
        (evaluate + ["eval.num=0"], "eval.num"),
        (evaluate + ["--shards", str(tmp_path / "no-such-shards")], "--shards"),
        (["-m", "dcgan_dist.evaluate", "--checkpoint", str(tmp_path / "no-such.pt")], "does not exist"),
    ]
    if not torch.cuda.is_available():
        cases.append((evaluate + ["train.device=cuda"], "train.device=cuda"))
    for (args, words), proc in zip(cases, run_each([args for args, _ in cases])):
        assert words in error_line(proc), (args, proc.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"] and blocker.read_text() == ""


def test_a_sweep_trial_copies_a_start_checkpoint_only_from_the_sweep_and_only_a_checkpoint(run6, tmp_path):
    """tune's trial start copy: a checkpoint path that Tune's (resumable, so untrusted) state hands over is followed
    only inside <run.dir>/tune, and what is copied must be a checkpoint."""
    from dcgan_dist.launch.sweep import copy_start
    from dcgan_dist.storage.filesystem import RunStorage
    from dcgan_dist.training.checkpoint import CheckpointError

    root = tmp_path / "sweep"
    good = root / "tune" / "run_trial_a_00000_0" / "checkpoint_000001"
    good.mkdir(parents=True)
    shutil.copy(run6 / "checkpoints" / "step_0000004.pt", good / ckpt.STATE_FILE)
    trial = RunStorage(str(root / "trials" / "b"))
    copied = copy_start(str(good), str(root), trial, "start/x.pt")
    assert ckpt.load(copied)["step"] == 4

    outside = tmp_path / "outside" / "checkpoint_000001"
    outside.mkdir(parents=True)
    shutil.copy(good / ckpt.STATE_FILE, outside / ckpt.STATE_FILE)
    not_a_checkpoint = root / "tune" / "run_trial_c" / "checkpoint_000001"
    not_a_checkpoint.mkdir(parents=True)
    (not_a_checkpoint / ckpt.STATE_FILE).write_bytes(b"not a checkpoint")
    for path, words in (
        (outside, "outside the sweep's storage"),
        (root / "tune" / ".." / ".." / "outside" / "checkpoint_000001", "outside the sweep's storage"),
        (not_a_checkpoint, "not a readable dcgan_dist checkpoint"),
    ):
        with pytest.raises(CheckpointError, match=words) as error:
            copy_start(str(path), str(root), trial, "start/y.pt")
        assert "\n" not in str(error.value)
    assert not (root / "trials" / "b" / "start" / "y.pt").exists()


def test_resume_with_the_store_gone_is_the_stores_error_not_a_misfit():
    """A checkpoint the object store did not deliver says nothing about whether it fits: the resume stops with the
    store's one line (RunError, exit 1) and never falls back to an older checkpoint, which would lose the newer
    steps silently."""
    from dcgan_dist.distributed.env import DistEnv
    from dcgan_dist.errors import RunError
    from dcgan_dist.storage.filesystem import StoreUnreachable
    from dcgan_dist.training.schedule import Schedule

    tried = []

    class StoreGone:
        def newest_first(self):
            def unreachable():
                tried.append("step_0000006.pt")
                raise StoreUnreachable(
                    "the object store at http://127.0.0.1:1 did not answer for 5 s (reading "
                    "s3://b/runs/x/checkpoints/step_0000006.pt)"
                )

            def older():
                tried.append("step_0000003.pt")
                return {}

            yield "s3://b/runs/x/checkpoints/step_0000006.pt", unreachable
            yield "s3://b/runs/x/checkpoints/step_0000003.pt", older

    manager = ckpt.CheckpointManager(
        StoreGone(), DistEnv(device=torch.device("cpu")), {}, {}, {}, Schedule(1, last=6), say=lambda line: None
    )
    with pytest.raises(RunError, match=r"^the object store at .* did not answer") as raised:
        manager.restore()
    assert not isinstance(raised.value, ckpt.CheckpointError) and tried == ["step_0000006.pt"]

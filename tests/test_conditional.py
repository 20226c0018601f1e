"""Class-conditional training end to end (issue 26): a tiny conditional model learns labelled shards whose classes
are visually distinct (a red, a green, a blue background under random grey blobs), its samples of class k are
nearest to real class k's mean image while an unconditional control's are not; `sample` draws one class, one row
per class and latent walks whose images are read back and checked; evaluate reports SWD per class; a conditional
model refuses unlabelled shards before any run file."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcgan_dist.cli.sample import main as sample_main
from dcgan_dist.data import ShardWriter
from dcgan_dist.data.images import to_uint8
from dcgan_dist.gan.latent import draw, latents, slerp, slerp_walk
from dcgan_dist.gan.models import generate
from dcgan_dist.training.checkpoint import load_generator

from .conftest import TINY, run_cli

CLASSES = ["red", "green", "blue"]
SIZE, PER_CLASS, SHARD_SIZE = 32, 96, 48
PAD = 2  # make_grid's padding between images


def coloured_images(per_class: int, seed: int = 0) -> tuple[list[np.ndarray], list[int]]:
    """per_class images of each class, interleaved: class k's background is colour channel k (bright), with a few
    random grey blobs over it (so the images within a class differ)."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(per_class * len(CLASSES)):
        k = i % len(CLASSES)
        a = np.full((SIZE, SIZE, 3), 30, np.uint8)
        a[:, :, k] = rng.integers(170, 230)
        for _ in range(rng.integers(1, 4)):
            y, x, r = rng.integers(4, SIZE - 4), rng.integers(4, SIZE - 4), rng.integers(2, 6)
            a[max(0, y - r) : y + r, max(0, x - r) : x + r] = rng.integers(60, 200)
        images.append(a)
        labels.append(k)
    return images, labels


def write_labelled(out: Path, images: list[np.ndarray], labels: list[int]) -> Path:
    with ShardWriter(out, shard_size=SHARD_SIZE, classes=CLASSES) as writer:
        for image, label in zip(images, labels):
            writer.write(image, label=label)
        writer.close()
    return out


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """The labelled shards, and each class's mean real image (3 x C x H x W, float in [0, 255])."""
    images, labels = coloured_images(PER_CLASS)
    out = write_labelled(tmp_path_factory.mktemp("labelled") / "colours", images, labels)
    stack, tags = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float(), torch.tensor(labels)
    means = torch.stack([stack[tags == k].mean(0) for k in range(len(CLASSES))])
    return out, means


STEPS = 150


def train(shards: Path, run_dir: Path, *extra: str) -> None:
    run_cli(
        "-m",
        "dcgan_dist.train",
        "--config",
        "debug",
        *TINY,
        "train.batch_size=32",
        f"train.max_steps={STEPS}",
        f"train.checkpoint_every={STEPS}",
        "train.sample_every=0",
        "train.log_every=50",
        "optim.lr=0.001",
        f"data.shards={shards}",
        f"run.dir={run_dir}",
        *extra,
        check=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def conditional_run(labelled, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("cond") / "run"
    train(
        labelled[0],
        run_dir,
        "model.conditional=true",
        f"train.sample_every={STEPS}",
        f"train.eval_every={STEPS}",
        "eval.num=96",
        "eval.nhoods_per_image=8",
    )
    return run_dir


def nearest_class_accuracy(images: torch.Tensor, labels: torch.Tensor, means: torch.Tensor) -> float:
    """The fraction of images (float in [-1, 1]) whose nearest real class mean (L2, in pixels) is their label's."""
    pixels = to_uint8(images).float()
    dist = ((pixels[:, None] - means[None]) ** 2).flatten(2).sum(-1)  # N x classes
    return float((dist.argmin(1) == labels).float().mean())


def class_samples(run_dir: Path, num_per_class: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    G, _, _ = load_generator(str(run_dir), "cpu", "raw")
    labels = torch.arange(len(CLASSES)).repeat_interleave(num_per_class)
    return generate(G, len(labels), seed=11, labels=labels), labels


def test_a_conditional_model_draws_the_class_asked_for_and_an_unconditional_one_does_not(
    labelled, conditional_run, tmp_path
):
    shards, means = labelled
    config = (conditional_run / "config.yaml").read_text()
    assert "conditional: true" in config and "- red" in config  # the classes are recorded with the run
    images, labels = class_samples(conditional_run)
    conditional = nearest_class_accuracy(images, labels, means)
    print(f"nearest-class-mean accuracy: conditional {conditional:.2f}")
    assert conditional >= 0.9, f"only {conditional:.0%} of the conditional samples look like their class"

    control_dir = tmp_path / "control"
    train(shards, control_dir, "model.conditional=false")
    G, _, _ = load_generator(str(control_dir), "cpu", "raw")
    # It has no label to be given: the same images stand for every class.
    same = generate(G, 32, seed=11)
    unconditional = nearest_class_accuracy(same.repeat(3, 1, 1, 1), labels, means)
    assert unconditional <= 0.5, f"{unconditional:.0%}: the control passes a check it should fail"


def read_cells(path: Path, rows: int, cols: int) -> torch.Tensor:
    """A grid image read back: rows x cols x C x H x W uint8."""
    grid = np.asarray(Image.open(path).convert("RGB"))
    cells = [
        [grid[PAD + r * (SIZE + PAD) :][:SIZE, PAD + c * (SIZE + PAD) :][:, :SIZE] for c in range(cols)]
        for r in range(rows)
    ]
    return torch.from_numpy(np.array(cells)).permute(0, 1, 4, 2, 3)


def test_sample_draws_a_class_a_row_per_class_and_latent_walks(conditional_run, tmp_path, capsys):
    G, _, _ = load_generator(str(conditional_run), "cpu", "auto")
    ckpt = ["-m", "dcgan_dist.sample", "--checkpoint", str(conditional_run)]

    # One class, by name: the file in the run's samples/ folder is named after it.
    proc = run_cli(*ckpt, "sample.label=green", "sample.num=6", "sample.nrow=6", "sample.seed=4", check=True)
    out = conditional_run / "samples" / f"grid_step{STEPS}_seed4_green.png"
    assert str(out) in proc.stdout
    want = to_uint8(generate(G, 6, seed=4, labels=torch.full((6,), 1)))
    assert torch.equal(read_cells(out, 1, 6)[0], want)

    # No label: one row per class, the same latent vectors in every row; a row is generate(..., labels=k).
    grid = tmp_path / "classes.png"
    assert sample_main([*ckpt[2:], "sample.nrow=5", "sample.seed=2", "--out", str(grid)]) == 0  # in-process
    cells = read_cells(grid, len(CLASSES), 5)
    for k in range(len(CLASSES)):
        assert torch.equal(cells[k], to_uint8(generate(G, 5, seed=2, labels=torch.full((5,), k))))

    # A walk from seed 3 to seed 9, one row per class: its ends are the plain samples of seeds 3 and 9.
    walk = tmp_path / "walk.png"
    assert sample_main([*ckpt[2:], "sample.interpolate=3,9", "sample.steps=6", "--out", str(walk)]) == 0
    cells = read_cells(walk, len(CLASSES), 6).int()
    for k in range(len(CLASSES)):
        label = torch.full((1,), k)
        ends = [to_uint8(generate(G, 1, seed=s, labels=label))[0].int() for s in (3, 9)]
        # One image in a batch of 6 or alone: the same up to float rounding (one level of 255).
        assert (cells[k, 0] - ends[0]).abs().max() <= 1 and (cells[k, -1] - ends[1]).abs().max() <= 1
        middle = to_uint8(draw(G, slerp_walk(latents(16, 1, 3)[0], latents(16, 1, 9)[0], 6), torch.full((6,), k)))
        assert (cells[k].int() - middle.int()).abs().max() <= 1
    assert not torch.equal(cells[0, 2], cells[0, 3])  # it moves

    # Unknown classes, bad walks and former flags: one line, exit 2, no file (in-process: the same main).
    for bad in (["sample.label=purple"], ["sample.label=3"], ["sample.interpolate=3"], ["--label", "7"]):
        capsys.readouterr()
        assert sample_main([*ckpt[2:], *bad, "--out", str(tmp_path / "no.png")]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / "no.png").exists(), err
        assert "0 red, 1 green, 2 blue" in err if bad[0].startswith("sample.label") else "sample." in err


def test_sample_label_on_an_unconditional_model_is_refused(tiny_shards, tmp_path, capsys):
    run_dir = tmp_path / "plain"
    run_cli(
        "-m", "dcgan_dist.train", "--config", "debug", *TINY, "train.max_steps=1", f"data.shards={tiny_shards}",
        f"run.dir={run_dir}", check=True,
    )  # fmt: skip
    assert sample_main(["--checkpoint", str(run_dir), "sample.label=1"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "unconditional" in err and "sample.label" in err
    assert not list((run_dir / "samples").glob("grid_*"))
    # Its walk: one row, its ends the plain samples of the two seeds.
    assert sample_main(["--checkpoint", str(run_dir), "sample.interpolate=5,6", "sample.steps=3"]) == 0
    walk = read_cells(run_dir / "samples" / "walk_step1_seed5-6.png", 1, 3)[0].int()
    G, _, _ = load_generator(str(run_dir), "cpu", "auto")
    assert (walk[0] - to_uint8(generate(G, 1, seed=5))[0].int()).abs().max() <= 1
    assert (walk[2] - to_uint8(generate(G, 1, seed=6))[0].int()).abs().max() <= 1


def test_slerp_keeps_the_ends_and_the_norm():
    a, b = latents(64, 1, 3)[0], latents(64, 1, 9)[0]
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    middle = slerp(a, b, 0.5)
    assert abs(middle.norm() - (a.norm() + b.norm()) / 2) < 0.1 * a.norm()  # a straight line's middle: ~0.7x
    assert torch.equal(latents(64, 1, 3), latents(64, 1, 3))


def test_evaluate_reports_swd_per_class(labelled, conditional_run):
    proc = run_cli(
        "-m",
        "dcgan_dist.evaluate",
        "--checkpoint",
        str(conditional_run),
        "eval.num=96",
        "eval.nhoods_per_image=8",
        "eval.baseline=false",
        check=True,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    per_class = result["swd_per_class"]
    assert sorted(per_class) == sorted(CLASSES)
    assert all(isinstance(v, float) and v > 0 for v in per_class.values())
    assert result["swd"] > 0
    # The in-training tracker records the same per-class values at its evaluations.
    records = [json.loads(line) for line in (conditional_run / "metrics.jsonl").read_text().splitlines()]
    tracked = [r for r in records if "swd" in r]
    assert tracked and sorted(tracked[-1]["swd_per_class"]) == sorted(CLASSES)


def test_the_training_grid_has_a_row_per_class(conditional_run):
    grid = Image.open(conditional_run / "samples" / f"step_{STEPS:07d}.png")
    assert grid.size == (PAD + 8 * (SIZE + PAD), PAD + len(CLASSES) * (SIZE + PAD))  # 8 columns, a row per class


def test_a_conditional_model_refuses_unlabelled_shards_before_any_run_file(tiny_shards, tmp_path):
    run_dir = tmp_path / "refused"
    proc = run_cli(
        "-m",
        "dcgan_dist.train",
        "--config",
        "debug",
        *TINY,
        "model.conditional=true",
        f"data.shards={tiny_shards}",
        f"run.dir={run_dir}",
        "train.max_steps=2",
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and "label" in proc.stderr
    assert not run_dir.exists() or not any(run_dir.iterdir())
    # The embedded synthetic faces (data.shards empty) are unlabelled: refused before they are drawn.
    proc = run_cli("-m", "dcgan_dist.train", "--config", "mnist", "train.max_steps=1", f"run.dir={run_dir}")
    assert proc.returncode == 2 and "label" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not run_dir.exists() or not any(run_dir.iterdir())

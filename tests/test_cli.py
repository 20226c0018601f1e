"""One command-line grammar: every command takes --config + key=value on the same schema, refuses a misspelt key
with the same line, reads its options from the schema's sections, and its --help shows the schema's descriptions."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from dcgan_dist import config
from dcgan_dist.config import build_config
from tests.conftest import TINY, run_cli

COMMANDS = ["train", "sample", "evaluate", "bench", "tune"]


def one_error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (proc.returncode, proc.stderr)
    return lines[0]


def words(text: str) -> str:
    return " ".join(text.split())


def doc(section: type, name: str) -> str:
    """The description of a setting, as the schema declares it (its field's metadata)."""
    return next(f for f in dataclasses.fields(section) if f.name == name).metadata["doc"]


@pytest.mark.parametrize("bad", ["trian.max_steps=3", "train.max_step=3", "eval.nmu=3"])
def test_every_command_refuses_a_misspelt_key_with_the_same_line(bad, tmp_path):
    procs = [run_cli("-m", f"dcgan_dist.{command}", bad, f"run.dir={tmp_path / command}") for command in COMMANDS]
    lines = {command: one_error_line(proc) for command, proc in zip(COMMANDS, procs)}
    assert len(set(lines.values())) == 1, lines
    named = re.search(r"'([^']+)'", next(iter(lines.values()))).group(1)  # the first part of the key that is wrong
    assert bad.split("=")[0].startswith(named) and named.split(".")[-1] not in ("train", "max_steps", "eval")
    assert list(tmp_path.iterdir()) == []  # refused before any work: no run folder


def test_a_bad_config_file_and_a_bad_value_are_the_same_line_everywhere(tmp_path):
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text("sample:\n  nmu: 3\n")
    for args in (["--config", str(bad_file)], ["sample.num=0"], ["bench.measure=everything"]):
        lines = {one_error_line(run_cli("-m", f"dcgan_dist.{c}", *args)) for c in COMMANDS}
        assert len(lines) == 1, (args, lines)


def test_former_flags_are_one_line_naming_the_setting():
    cases = [
        ("sample", ["--num", "4"], "sample.num="),
        ("evaluate", ["--checkpoint", "x.pt", "--nhoods-per-image", "4"], "eval.nhoods_per_image="),
        ("evaluate", ["--checkpoint", "x.pt", "--no-baseline"], "eval.baseline=false"),
        ("bench", ["--steps", "3"], "bench.steps="),
        ("bench", ["--data-only"], "bench.measure=loader"),
        ("tune", ["--trials", "2"], "tune.trials="),
    ]
    for command, args, setting in cases:
        assert setting in one_error_line(run_cli("-m", f"dcgan_dist.{command}", *args)), (command, args)


def test_tune_refuses_a_bad_command_line_without_ray():
    """A sweep's command line is checked before Ray is even imported (so before any connection to a cluster)."""
    script = (
        "import sys; from dcgan_dist.cli import tune\n"
        "codes = [tune.main(['trian.max_steps=3']), tune.main(['tune.scheduler=hyperband']),"
        " tune.main(['--trials', '2'])]\n"
        "print(codes, 'ray' in sys.modules)"
    )
    proc = run_cli("-c", script)
    assert proc.stdout.split() == ["[2,", "2,", "2]", "False"], proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 3


def test_help_shows_each_settings_value_allowed_values_and_the_schemas_description():
    expected = {
        "train": [("train.num_threads", config.TrainSection), ("data.num_samples", config.DataSection)],
        "sample": [("sample.nrow", config.SampleSection), ("sample.weights", config.SampleSection)],
        "evaluate": [("eval.nhoods_per_image", config.EvalSection), ("eval.inception_weights", config.EvalSection)],
        "bench": [("bench.measure", config.BenchSection), ("bench.warmup", config.BenchSection)],
        "tune": [("tune.scheduler", config.TuneSection), ("tune.concurrent", config.TuneSection)],
    }
    for command, keys in expected.items():
        proc = run_cli("-m", f"dcgan_dist.{command}", "--help", "sample.num=7", "tune.trials=3", "bench.steps=9")
        assert proc.returncode == 0, proc.stderr
        text = words(proc.stdout)
        for key, section in keys:
            assert words(doc(section, key.split(".")[1])) in text, (command, key)
        cfg = build_config("debug", ["sample.num=7", "tune.trials=3", "bench.steps=9"])
        for key, value in [("sample.num", 7), ("tune.trials", 3), ("bench.steps", 9)]:
            if key.split(".")[0] == command:
                assert f"{key}={value} " in text and getattr(getattr(cfg, command), key.split(".")[1]) == value
    # Allowed values of a Literal setting, as the schema's type says.
    text = words(run_cli("-m", "dcgan_dist.sample", "--help").stdout)
    assert "sample.weights=auto (auto | ema | raw)" in text


def test_every_setting_and_section_has_a_description():
    for section in dataclasses.fields(config.Config):
        assert section.metadata["doc"], section.name
        for f in dataclasses.fields(section.default_factory):
            assert f.metadata.get("doc", "").strip(), f"{section.name}.{f.name}"


@pytest.fixture(scope="module")
def run2(tiny_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    run_cli(
        "-m",
        "dcgan_dist.train",
        "--config",
        "debug",
        *TINY,
        f"data.shards={tiny_shards}",
        f"run.dir={run_dir}",
        "train.max_steps=2",
        "train.sample_every=0",
        check=True,
    )
    return run_dir


def test_evaluate_without_options_uses_the_eval_settings(run2, tiny_shards, tmp_path):
    """No options: the eval.* settings of the default preset (what --help shows), not a default of its own; a file
    and an override set them as for training; eval.inception_weights is where FID's weights are looked for."""
    base = build_config("debug").eval
    proc = run_cli("-m", "dcgan_dist.evaluate", "--checkpoint", str(run2), "--shards", str(tiny_shards), check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (result["num"], result["nhoods_per_image"], result["seed"]) == (base.num, base.nhoods_per_image, base.seed)
    assert result["swd_real_vs_real"] is not None and "swd_untrained" not in result  # eval.baseline, eval.untrained

    settings = tmp_path / "eval.yaml"
    settings.write_text("eval:\n  num: 48\n  nhoods_per_image: 8\n  seed: 5\n  baseline: false\n")
    weights = tmp_path / "no-inception.pth"
    proc = run_cli(
        "-m",
        "dcgan_dist.evaluate",
        "--checkpoint",
        str(run2),
        "--shards",
        str(tiny_shards),
        "--config",
        str(settings),
        "eval.num=32",
        "eval.untrained=true",
        f"eval.inception_weights={weights}",
        check=True,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (result["num"], result["nhoods_per_image"], result["seed"]) == (32, 8, 5)
    assert result["swd_real_vs_real"] is None and result["swd_untrained"] is not None
    assert result["fid"] is None and str(weights) in result["fid_reason"]


def test_sample_reads_the_sample_settings(run2, tmp_path):
    from PIL import Image

    out = tmp_path / "grid.png"
    run_cli(
        "-m",
        "dcgan_dist.sample",
        "--checkpoint",
        str(run2),
        "--out",
        str(out),
        "sample.num=6",
        "sample.nrow=2",
        check=True,
    )
    with Image.open(out) as grid:
        width, height = grid.size
    side = build_config("debug", TINY).model.image_size
    # 2 px of padding around every image: 2 columns and 3 rows (a square grid of 6 would be 3 x 2).
    assert (width, height) == (2 * (side + 2) + 2, 3 * (side + 2) + 2)

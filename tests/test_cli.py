"""One command-line grammar: every command takes --config + key=value on the same schema, refuses a misspelt key
with the same line, reads its options from the schema's sections, and its --help shows the schema's descriptions."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import json
import re
import shlex
from concurrent.futures import ThreadPoolExecutor

import pytest

from dcgan_dist import config
from dcgan_dist.config import build_config
from tests.conftest import ROOT, TINY, run_cli

COMMANDS = ["train", "sample", "evaluate", "bench", "tune"]
CLI = ROOT / "dcgan_dist" / "cli"


def run_main(command: str, args: list[str], capsys) -> tuple[int, str, str]:
    """The command's main, as `python -m dcgan_dist.<command>` runs it, in this process: (exit code, out, err)."""
    main = importlib.import_module(f"dcgan_dist.cli.{command}").main
    capsys.readouterr()
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's refusals (one line, see cli.args.OneLineParser)
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    return lines[0]


def words(text: str) -> str:
    return " ".join(text.split())


def doc(section: type, name: str) -> str:
    """The description of a setting, as the schema declares it (its field's metadata)."""
    return next(f for f in dataclasses.fields(section) if f.name == name).metadata["doc"]


def test_a_misspelt_key_is_exit_2_and_one_line_through_python_m(tmp_path):
    """Through `python -m` (the exit code a shell sees): two commands, the same line (all five: below, in-process)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = list(
            pool.map(
                lambda c: run_cli("-m", f"dcgan_dist.{c}", "trian.max_steps=3", f"run.dir={tmp_path}"), COMMANDS[:2]
            )
        )
    lines = {one_error_line(proc.returncode, proc.stderr) for proc in procs}
    assert len(lines) == 1 and "'trian'" in lines.pop()
    assert list(tmp_path.iterdir()) == []  # refused before any work


@pytest.mark.parametrize(
    "args",
    [
        ["trian.max_steps=3"],
        ["train.max_step=3"],
        ["eval.nmu=3"],
        ["sample.num=0"],
        ["bench.measure=everything"],
        ["tune.trials=1.5"],
        ["--config", "no-such-preset"],
        ["--config", "{bad_file}"],
    ],
)
def test_a_bad_setting_is_the_same_line_in_every_command(args, tmp_path, capsys):
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text("sample:\n  nmu: 3\n")
    args = [a.replace("{bad_file}", str(bad_file)) for a in args]
    lines = {c: one_error_line(*run_main(c, [*args, f"run.dir={tmp_path / 'run'}"], capsys)[::2]) for c in COMMANDS}
    assert len(set(lines.values())) == 1, lines
    assert not (tmp_path / "run").exists()


def test_former_flags_are_one_line_naming_the_setting(capsys):
    cases = [
        ("sample", ["--num", "4"], "sample.num="),
        ("evaluate", ["--checkpoint", "x.pt", "--nhoods-per-image", "4"], "eval.nhoods_per_image="),
        ("evaluate", ["--checkpoint", "x.pt", "--no-baseline"], "eval.baseline=false"),
        ("bench", ["--steps", "3"], "bench.steps="),
        ("bench", ["--data-only"], "bench.measure=loader"),
        ("tune", ["--trials", "2"], "tune.trials="),
    ]
    for command, args, setting in cases:
        code, _, err = run_main(command, args, capsys)
        assert setting in one_error_line(code, err), (command, args)


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


def test_help_shows_each_settings_value_allowed_values_and_the_schemas_description(capsys):
    expected = {
        "train": [("train.num_threads", config.TrainSection), ("data.num_samples", config.DataSection)],
        "sample": [("sample.nrow", config.SampleSection), ("sample.weights", config.SampleSection)],
        "evaluate": [("eval.nhoods_per_image", config.EvalSection), ("eval.inception_weights", config.EvalSection)],
        "bench": [("bench.measure", config.BenchSection), ("bench.warmup", config.BenchSection)],
        "tune": [("tune.scheduler", config.TuneSection), ("tune.concurrent", config.TuneSection)],
    }
    given = ["sample.num=7", "tune.trials=3", "bench.steps=9", "train.num_threads=2"]
    cfg = build_config("debug", given)
    for command, keys in expected.items():
        # The settings of the command line that this command uses (another command's are refused: see below).
        mine = [k for k in given if k.split(".")[0] == command or (k.startswith("train.") and command != "sample")]
        mine = [k for k in mine if command != "evaluate"]
        code, out, err = run_main(command, ["--help", *mine], capsys)
        assert code == 0, err
        text = words(out)
        for key, section in keys:
            assert words(doc(section, key.split(".")[1])) in text, (command, key)
        for key in mine:  # the value this command line gives
            section, name = key.split("=")[0].split(".")
            assert f"{key} " in text and str(getattr(getattr(cfg, section), name)) == key.split("=")[1]
    # Allowed values of a Literal setting, as the schema's type says; bounds as the field declares them.
    text = words(run_main("sample", ["--help"], capsys)[1])
    assert "sample.weights=auto (auto | ema | raw)" in text and "sample.num=64 (at least 1, below 10001)" in text


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
    settings = tmp_path / "eval.yaml"
    settings.write_text("eval:\n  num: 48\n  nhoods_per_image: 8\n  seed: 5\n  baseline: false\n")
    weights = tmp_path / "no-inception.pth"
    evaluate = ["-m", "dcgan_dist.evaluate", "--checkpoint", str(run2), "--shards", str(tiny_shards)]
    commands = [
        evaluate,
        [
            *evaluate,
            "--config",
            str(settings),
            "eval.num=32",
            "eval.untrained=true",
            f"eval.inception_weights={weights}",
        ],
    ]
    with ThreadPoolExecutor(max_workers=2) as pool:
        plain, configured = [
            json.loads(p.stdout.strip().splitlines()[-1])
            for p in pool.map(lambda args: run_cli(*args, check=True), commands)
        ]
    assert (plain["num"], plain["nhoods_per_image"], plain["seed"]) == (base.num, base.nhoods_per_image, base.seed)
    assert plain["swd_real_vs_real"] is not None and "swd_untrained" not in plain  # eval.baseline, eval.untrained
    assert (configured["num"], configured["nhoods_per_image"], configured["seed"]) == (32, 8, 5)
    assert configured["swd_real_vs_real"] is None and configured["swd_untrained"] is not None
    assert configured["fid"] is None and str(weights) in configured["fid_reason"]


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


def documented_command_lines() -> list[tuple[str, str, list[str]]]:
    """(file, command, arguments) of every `python -m dcgan_dist.<command>` line that the docs' bash blocks and
    inline code, and the commands' own help texts show (continuation lines joined; not those with placeholders
    such as `...`, `<run>` or `[optional]`)."""
    texts = {
        str(p.relative_to(ROOT)): p.read_text()
        for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), ROOT / "k8s" / "README.md"]
    }
    texts.update({f"cli/{p.name}": ast.get_docstring(ast.parse(p.read_text())) or "" for p in CLI.glob("*.py")})
    found = []
    for name, text in texts.items():
        text = text.replace("\\\n", " ")  # continuation lines
        if name.endswith(".md"):  # bash blocks: a line each; inline code: up to its closing backtick
            fences = re.findall(r"```bash\n(.*?)```", text, re.S)
            inline = re.sub(r"```.*?```", "", text, flags=re.S)
            text = "\n".join(
                [*fences, *(m.replace("\n", " ") for m in re.findall(r"(?<!see )python -m [^`]*", inline))]
            )
        for match in re.finditer(r"(?<!see )python -m dcgan_dist\.(train|sample|evaluate|bench|tune)\b([^`\n]*)", text):
            args = match.group(2).split(" #")[0].split("&&")[0].split("|")[0]
            if any(mark in args for mark in ("...", "<", "[", "FILE", "RUN_DIR")):
                continue
            found.append((name, match.group(1), shlex.split(args)))
    return found


def test_the_documented_command_lines_parse(capsys):
    """What the README and docs show works as pasted: each command line's flags and settings are accepted (--help
    stops it after the checks)."""
    lines = documented_command_lines()
    assert {command for _, command, _ in lines} >= {"train", "sample", "evaluate", "bench", "tune"}
    for name, command, args in lines:
        code, _, err = run_main(command, [*args, "--help"], capsys)
        assert code == 0, (name, command, args, err)


def test_bench_report_compile_takes_true_and_false_as_a_command_line_writes_them(capsys):
    """yes/no are booleans to YAML: the setting takes what they read as (auto | true | false), shown so by --help."""
    assert config.from_args(["bench.report_compile=true"])[0].bench.report_compile is True
    assert config.from_args(["bench.report_compile=no"])[0].bench.report_compile is False
    assert config.from_args([])[0].bench.report_compile == "auto"
    code, out, _ = run_main("bench", ["--help"], capsys)
    assert code == 0 and "bench.report_compile=auto    (auto | true | false)" in out


def test_gpu_report_into_a_folder_is_refused_before_any_measurement(tmp_path, capsys, monkeypatch):
    from dcgan_dist.perf import gpu_report

    def measured(*args, **kwargs):
        raise AssertionError("the report ran")

    monkeypatch.setattr(gpu_report, "write_report", measured)
    line = one_error_line(*run_main("bench", ["--gpu-report", str(tmp_path)], capsys)[::2])
    assert "--gpu-report" in line and str(tmp_path) in line
    assert list(tmp_path.iterdir()) == []


def test_run_seed_is_bounded_so_that_every_seed_derived_from_it_works():
    import torch

    from dcgan_dist.data.loader import slot_seed

    for bad in ("-1", str(config.SEED_LIMIT - config.RUN_SEED_ROOM), str(2**64)):
        with pytest.raises(config.ConfigError, match="run.seed"):
            config.from_args([f"run.seed={bad}"])
    top = config.from_args([f"run.seed={config.SEED_LIMIT - config.RUN_SEED_ROOM - 1}"])[0].run.seed
    slot_seed(top, 3, 7)  # the data order and the noise stream
    torch.Generator().manual_seed(top + 1_000_003 + 64)  # the in-training SWD's offset, bench's ranks


@pytest.mark.parametrize(
    "command, args, expected",
    [
        ("sample", ["--checkpoint", "x.pt", "bench.steps=3"], "bench.steps is not a setting of sample"),
        ("sample", ["--checkpoint", "x.pt", "model.ngf=8"], "the checkpoint decides the model"),
        ("evaluate", ["--checkpoint", "x.pt", "sample.num=5"], "sample.num is not a setting of evaluate"),
        ("evaluate", ["--checkpoint", "x.pt", "model.image_size=32"], "the checkpoint decides the model"),
        ("bench", ["tune.trials=2"], "tune.trials is not a setting of bench"),
        ("train", ["sample.num=5"], "sample.num is not a setting of train"),
        ("train", ["eval.weights=raw"], "eval.weights is not a setting of train"),
    ],
)
def test_a_setting_of_another_command_is_refused_not_ignored(command, args, expected, tmp_path, capsys):
    line = one_error_line(*run_main(command, args, capsys)[::2])
    assert expected in line and f"python -m dcgan_dist.{command} --help" in line, line


def test_each_command_accepts_the_settings_it_lists(capsys):
    """train and tune take every training setting (tune passes them to its trials); a command's --help lists them."""
    from dcgan_dist.cli import bench, evaluate, sample, train, tune

    for command, listed in [
        (tune.COMMAND, tune.COMMAND.settings),
        (bench.COMMAND, bench.COMMAND.settings),
        (sample.COMMAND, sample.COMMAND.settings),
        (evaluate.COMMAND, evaluate.COMMAND.settings),
    ]:
        cfg = config.from_args([])[0]
        overrides = [f"{k}={config.show(v)}" for k, v in config.flat_settings(cfg) if k in config.setting_keys(listed)]
        assert not isinstance(command.parse(overrides), int), command.parser.prog
    assert set(config.setting_keys(train.SETTINGS)) <= set(config.setting_keys(tune.COMMAND.settings))
    trained = [f"{k}=1" for k in ("train.max_steps", "optim.lr", "eval.num", "dist.num_workers")] + [
        "wandb.mode=offline"
    ]
    code, _, err = run_main("train", [*trained, "eval.num=16", "--help"], capsys)
    assert code == 0, err


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--check"], "error: unknown option '--check' (see python -m dcgan_dist.{command} --help)"),
        (["--config="], "error: --config is empty"),
        (["--config", "debug", "--config=default"], "error: --config is given twice (debug, default)"),
        (["--config", "{tmp}"], "is a directory"),
        (["run.name="], "error: config key 'run.name' is empty"),
        (["train.max_steps="], "error: config key 'train.max_steps' is empty"),
        (["train.channels_last=maybe"], "one of auto, true, false"),
        (["sample.num=10000000"], "config key 'sample.num' is 10000000"),
    ],
)
def test_bad_command_lines_are_one_line_in_every_command(args, expected, tmp_path, capsys):
    for command in COMMANDS:
        given = [a.replace("{tmp}", str(tmp_path)) for a in args]
        line = one_error_line(*run_main(command, given, capsys)[::2])
        assert expected.replace("{command}", command) in line, (command, line)


def test_evaluate_refuses_empty_shards(capsys):
    line = one_error_line(*run_main("evaluate", ["--checkpoint", "x.pt", "--shards="], capsys)[::2])
    assert "--shards" in line and "empty" in line


@pytest.mark.parametrize(
    "args, expected",
    [
        (["synth", "--out", "{tmp}/x", "--num", "-5"], "--num: -5"),
        (["synth", "--out", "", "--num", "4"], "--out: an empty folder name"),
        (["synth", "--out", "{tmp}/x", "--size", "48"], "--size: invalid choice: 48"),
        (["synth", "--out", "{tmp}/x", "--processes", "-3"], "--processes: -3"),
        (["convert", "--src", "{tmp}", "--out", "{tmp}/x", "--limit", "-1"], "--limit: -1"),
    ],
)
def test_data_tools_refuse_bad_values_in_one_line(args, expected, tmp_path, capsys):
    from dcgan_dist.cli import data

    given = [a.replace("{tmp}", str(tmp_path)) for a in args]
    try:
        code = data.main(given)
    except SystemExit as exc:
        code = exc.code
    line = one_error_line(code, capsys.readouterr().err)
    assert expected in line, line
    assert list(tmp_path.iterdir()) == []


def test_evaluate_warns_when_it_asks_for_more_real_images_than_there_are(run2, tiny_shards):
    """512 images in tiny_shards: 256 per half for the real-vs-real baseline; 300 reuses some (a warning line)."""
    proc = run_cli(
        "-m",
        "dcgan_dist.evaluate",
        "--checkpoint",
        str(run2),
        "--shards",
        str(tiny_shards),
        "eval.num=300",
        "eval.nhoods_per_image=2",
        check=True,
    )
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "eval.num=300" in warnings[0] and "256 real images" in warnings[0], proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["num"] == 300


def test_a_gpu_report_that_cannot_be_written_is_one_line(tmp_path, capsys, monkeypatch):
    from dcgan_dist.perf import gpu_report

    out = tmp_path / "read-only" / "report.md"

    def refused(*args, **kwargs):  # the measurements done, the file refused (what write_report raises then)
        raise gpu_report.ReportWriteError(PermissionError(13, "Permission denied", str(out)))

    monkeypatch.setattr(gpu_report, "write_report", refused)
    line = one_error_line(*run_main("bench", ["--gpu-report", str(out)], capsys)[::2])
    assert line.startswith(f"error: cannot write --gpu-report {out} (Permission denied")

import pytest
from omegaconf import OmegaConf

from dcgan_dist.config import ConfigError, build_config, from_dict, resolve_config_path, split_args, to_dict

from .conftest import run_cli


@pytest.mark.parametrize("preset", ["default", "debug", "mnist"])
def test_presets_load(preset):
    cfg = build_config(preset, [])
    assert cfg.run.dir == f"runs/{cfg.run.name}"  # interpolation resolved
    assert resolve_config_path(preset).name == f"{preset}.yaml"


def test_defaults_are_the_classic_dcgan():
    cfg = build_config("default", [])
    assert (cfg.model.image_size, cfg.model.nz, cfg.model.ngf, cfg.model.ndf) == (64, 100, 64, 64)
    assert (cfg.optim.lr, cfg.optim.beta1, cfg.optim.beta2, cfg.train.batch_size) == (2e-4, 0.5, 0.999, 128)
    mnist = build_config("mnist", [])
    assert (mnist.model.image_size, mnist.model.channels) == (28, 1)


def test_overrides_win_and_round_trip():
    cfg = build_config("debug", ["train.max_steps=7", "optim.lr=1e-3", "train.device=cuda", "run.name=x"])
    assert cfg.train.max_steps == 7 and cfg.optim.lr == 1e-3 and cfg.train.device == "cuda" and cfg.run.dir == "runs/x"
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "override, words",
    [
        (["train.bach_size=3"], ["'train.bach_size'", "batch_size"]),
        (["nope.key=1"], ["'nope'", "train"]),
        (["train.max_steps=abc"], ["'train.max_steps'", "int"]),
        (["dist.launcher=slurm"], ["'dist.launcher'", "local, ray"]),
        (["model.image_size=48"], ["'model.image_size'", "28, 32, 64, 128"]),
        (["train.batch_size=0"], ["'train.batch_size'", "at least 1"]),
        (["optim.beta1=1.0"], ["'optim.beta1'", "below 1"]),
        (["optim.lr=0"], ["'optim.lr'", "above 0"]),
        (["train.precision=fp8"], ["'train.precision'", "fp32, bf16, fp16"]),
        (["dist.num_workers=2"], ["'dist.num_workers'", "dist.launcher=ray"]),
        (["dist.launcher=ray", "dist.num_workers=2", "dist.min_workers=3"], ["'dist.min_workers'", "dist.num_workers"]),
        (["dist.launcher=local", "dist.min_workers=2"], ["'dist.min_workers'", "more than dist.num_workers"]),
        (["train=1"], ["'train'", "section"]),
        (["train.max_steps"], ["key=value"]),
    ],
)
def test_bad_settings_name_the_key(override, words):
    with pytest.raises(ConfigError) as err:
        build_config("debug", override)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_bad_key_in_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  max_step: 3\n")
    with pytest.raises(ConfigError, match="'train.max_step'.*max_steps"):
        build_config(str(path), [])


def test_missing_config_file_offers_the_presets():
    with pytest.raises(ConfigError) as err:
        build_config("nosuch", [])
    assert str(err.value).endswith("(presets: debug, default, mnist)")


def test_split_args():
    assert split_args(["a.b=1", "--config", "x.yaml", "c.d=2"]) == ("x.yaml", ["a.b=1", "c.d=2"])
    with pytest.raises(ConfigError, match="unknown option"):
        split_args(["--bogus"])


@pytest.mark.parametrize(
    "override, key",
    [("train.bach_size=3", "train.bach_size"), ("train.max_steps=ten", "train.max_steps")],
)
def test_cli_exits_2_before_any_work(tmp_path, override, key):
    run_dir = tmp_path / "run"
    proc = run_cli("-m", "dcgan_dist.train", "--config", "debug", f"run.dir={run_dir}", override)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and f"'{key}'" in lines[0]
    assert not run_dir.exists()  # nothing was started


def test_saved_config_reloads(tmp_path):
    from dcgan_dist.config import from_yaml, to_yaml

    cfg = build_config("debug", ["train.max_steps=3"])
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    assert from_yaml(to_yaml(cfg)) == cfg
    again = build_config(str(tmp_path / "config.yaml"), [])
    assert again == cfg
    assert OmegaConf.load(tmp_path / "config.yaml").train.max_steps == 3

"""The README's commands are the ones CI and users run."""

import re

from dcgan_dist.config import build_config

from .conftest import ROOT


def readme_setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("## Set-up", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.strip().splitlines()]


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    run_cmd, test_cmd = readme_setup_commands()
    assert run_cmd.endswith("python -m dcgan_dist.train") and "torch==2.13.0" in run_cmd
    assert "pytest" in test_cmd
    assert test_cmd in (ROOT / ".ci" / "run").read_text()


def test_readme_config_keys_exist():
    text = (ROOT / "README.md").read_text()
    for key in set(re.findall(r"`((?:run|data|model|train|optim|dist|wandb)\.[a-z_]+)`", text)):
        section, name = key.split(".")
        assert hasattr(getattr(build_config(None, []), section), name), key

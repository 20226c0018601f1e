"""The README's commands are the ones CI and users run."""

import re

import pytest

from dcgan_dist.config import build_config

from .conftest import ROOT, TINY

# The model and loader of the tests' tiny settings (TINY without its train.* and wandb.* choices).
TINY_MODEL = [s for s in TINY if not s.startswith("train.eval_every")]


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
    # Every setting the README names in code, alone (`gan.loss`) or with a value (`log.sinks=[console,jsonl]`).
    sections = "run|data|model|train|optim|dist|wandb|gan|log|sample|eval|tune|bench"
    for key in set(re.findall(rf"`((?:{sections})\.[a-z_]+)(?:=[^`\s]*)?`", text)):
        section, name = key.split(".")
        assert hasattr(getattr(build_config(None, []), section), name), key


def bash_block(text: str, heading: str) -> list[str]:
    """The command lines of the first ```bash block after `heading`, continuation lines joined, comment-only
    lines left out."""
    block = text.split(heading, 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    joined = block.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def tiny(command: str, shards: str) -> str:
    """A README command with tiny settings appended where it takes settings (later key=value win), its trailing
    comment dropped; other commands as written."""
    command = re.sub(r"\s+#\s.*$", "", command)
    common = [*TINY_MODEL, f"data.shards={shards}", "train.max_steps=4", "train.log_every=2"]
    if "python -m dcgan_dist.train" in command:
        return " ".join([command, *common, "train.eval_every=0", "train.checkpoint_every=2", "train.sample_every=0"])
    if "python -m dcgan_dist.tune" in command:
        sweep = ["train.eval_every=2", "eval.num=32", "eval.nhoods_per_image=4", "tune.trials=2"]
        return " ".join([command, *common, *sweep])
    return command


@pytest.mark.slow  # ~6 min: a two-node cluster, a job, a driver, two sweeps on 2 cores
def test_readme_ray_section_then_its_sweeps_in_one_shell(tmp_path, tiny_shards):
    """The README's Ray section as written (pip install left out), in one bash, then the Sweeps section's commands
    in the same shell: every command succeeds (the section leaves no stale RAY_ADDRESS behind) and leaves its
    results. Tiny settings are appended to the training and sweep commands; the README's own ports."""
    import os
    import shutil
    import socket
    import subprocess
    import tempfile

    for port in (6379, 8265):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                pytest.skip(f"a Ray cluster runs on the README's port {port} (another test's?): run this test alone")
    text = (ROOT / "README.md").read_text()
    commands = [c for c in bash_block(text, "### Ray: a local two-node cluster") if not c.startswith("pip install")]
    commands += bash_block(text, "### Sweeps: Ray Tune over multi-worker trials")
    assert any("ray job submit" in c for c in commands) and sum("dcgan_dist.tune" in c for c in commands) == 2
    assert any(c.startswith("python -m dcgan_dist.train") and "dist.launcher=ray" in c for c in commands)
    work = tmp_path / "work"  # the checkout as the commands see it: the scripts and presets they name
    work.mkdir()
    (work / "cluster").symlink_to(ROOT / "cluster")
    shutil.copytree(ROOT / "configs", work / "configs")
    script = ["set -u"]
    for i, command in enumerate(commands):
        script += [tiny(command, str(tiny_shards)), f'echo "### rc {i} $?"']
    cluster_dir = tempfile.mkdtemp(prefix="rd-", dir="/tmp")  # short: Ray's sockets live there
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(tmp_path / "home"), PYTHONPATH=str(ROOT), RAY_CLUSTER_DIR=cluster_dir, PYTHONUNBUFFERED="1")
    try:
        proc = subprocess.run(
            ["bash", "-c", "\n".join(script)], cwd=work, env=env, capture_output=True, text=True, timeout=1500
        )
    finally:
        subprocess.run(["bash", str(ROOT / "cluster" / "ray-cluster.sh"), "stop"], env=env, capture_output=True)
        shutil.rmtree(cluster_dir, ignore_errors=True)
    codes = [int(rc) for rc in re.findall(r"^### rc \d+ (\d+)$", proc.stdout, re.M)]
    assert codes == [0] * len(commands), (codes, commands, proc.stdout[-6000:], proc.stderr[-6000:])
    assert (work / "runs" / "ray-debug" / "ray" / "debug" / "step_0000004" / "state.pt").is_file()
    assert (work / "runs" / "ray-driver" / "ray" / "debug" / "step_0000004" / "state.pt").is_file()
    for sweep in ("debug", "pbt"):  # each sweep's run.dir: runs/<run.name>, a run per trial
        assert len(list((work / "runs" / sweep / "trials").glob("*/metrics.jsonl"))) == 2, sweep

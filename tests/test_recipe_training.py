"""Each objective and learning-rate schedule trains the tiny debug preset without a non-finite number and resumes
bit-exactly after SIGKILL; the class-conditional models pass the N x B == 1 x NB synchronised-BN check.

(The default recipe, bce with a constant rate, is test_train.py's kill-and-resume test and
unit/test_default_recipe.py's bit-identical weights.)"""

import math
import signal

import pytest

from dcgan_dist.perf.equivalence import Spec, run
from dcgan_dist.training import checkpoint as ckpt
from dcgan_dist.training.metrics import read_metrics
from tests.conftest import ROOT, assert_same_training_state, run_cli
from tests.test_sync_bn import FLOAT64_TOLERANCE
from tests.test_train import resume_args

RECIPES = [
    pytest.param(["gan.loss=hinge", "optim.schedule=linear", "optim.decay_steps=8", "optim.lr_d=4e-4"], id="hinge"),
    pytest.param(["gan.loss=ls", "optim.schedule=cosine", "optim.beta1_g=0.0"], id="ls", marks=pytest.mark.slow),
    pytest.param(["optim.schedule=cosine", "optim.lr_g=1e-4"], id="bce-cosine", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("recipe", RECIPES)
def test_each_recipe_trains_and_resumes_bit_exactly_after_sigkill(tmp_path, tiny_shards, recipe):
    args = [*resume_args(tiny_shards), *recipe]
    straight = tmp_path / "straight"
    run_cli("-m", "dcgan_dist.train", *args, f"run.dir={straight}", check=True)
    records = read_metrics(straight / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 13))
    assert all(math.isfinite(r[k]) for r in records for k in ("loss_d", "loss_g", "d_real", "d_fake"))
    assert all(0 <= r[k] <= 1 for r in records for k in ("d_real", "d_fake"))
    lr_d = [r["lr_d"] for r in records]
    if "optim.schedule=linear" in recipe or "optim.schedule=cosine" in recipe:  # the rates fall over the run
        assert lr_d[-1] < lr_d[0] and all(a >= b for a, b in zip(lr_d, lr_d[1:]))

    crashed = tmp_path / "crashed"
    kill = [str(ROOT / "tests" / "step_hooks.py"), "--signal=KILL", "--after=7", *args, f"run.dir={crashed}"]
    assert run_cli(*kill).returncode == -signal.SIGKILL
    run_cli(*kill, check=True)  # resumes from the checkpoint of step 5
    final = ckpt.load(straight / "checkpoints" / "step_0000012.pt")
    assert_same_training_state(final, ckpt.load(crashed / "checkpoints" / "step_0000012.pt"))
    assert [r["lr_d"] for r in read_metrics(crashed / "metrics.jsonl")] == lr_d  # no scheduler state to lose


LOSSES = [
    pytest.param("bce", id="bce"),
    pytest.param("hinge", id="hinge", marks=pytest.mark.slow),
    pytest.param("ls", id="ls", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("loss", LOSSES)
def test_conditional_two_workers_equal_one_worker_with_the_global_batch(loss):
    diffs = run(Spec(world_size=2, batch=4, steps=3, dtype="float64", num_classes=3, loss=loss))["max_abs_diff"]
    assert max(v for k, v in diffs.items() if not k.endswith("rank_disagreement")) < FLOAT64_TOLERANCE, diffs
    assert diffs["G_rank_disagreement"] == 0.0 and diffs["D_rank_disagreement"] == 0.0


@pytest.mark.parametrize("loss", ["hinge", "ls"])
def test_unconditional_two_workers_equal_one_worker_with_the_global_batch(loss):
    """The other objectives' N x B == 1 x NB equivalence on the unconditional models (bce: tests/test_sync_bn.py)."""
    diffs = run(Spec(world_size=2, batch=4, steps=3, dtype="float64", loss=loss))["max_abs_diff"]
    assert max(v for k, v in diffs.items() if not k.endswith("rank_disagreement")) < FLOAT64_TOLERANCE, diffs
    assert diffs["G_rank_disagreement"] == 0.0 and diffs["D_rank_disagreement"] == 0.0


def test_conditional_without_sync_the_runs_differ():
    diffs = run(Spec(world_size=2, batch=4, steps=3, dtype="float64", num_classes=3, sync_bn=False))["max_abs_diff"]
    assert diffs["G_forward"] > 1e-3 and diffs["D_forward"] > 1e-3, diffs

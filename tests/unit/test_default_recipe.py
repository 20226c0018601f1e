"""The default recipe (DCGAN, non-saturating BCE, one constant learning rate, unconditional models) trains to the
weights it trained to before the recipe seam existed: a tiny debug-like model, a fixed seed, fixed synthetic
shards, 50 steps in this process on the CPU in fp32, bit-identical to tests/fixtures/default_recipe.json.

The fixture was recorded on main before issue 26 changed anything (commit c633092) by running this file as a
script: `PYTHONPATH=$PWD python tests/unit/test_default_recipe.py` (it rewrites the fixture: do that only on a
tree whose default recipe is known good). It holds the sha256 of every tensor of G's and D's state dicts, a few
values for a readable difference, and the sha256 of the images trained on (so that a change of the synthetic data
is told apart from a change of the recipe).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

from dcgan_dist.config import build_config
from dcgan_dist.data import write_synthetic_shards
from dcgan_dist.training.trainer import Trainer

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "default_recipe.json"
STEPS = 50
SETTINGS = [
    "model.image_size=32",
    "model.nz=16",
    "model.ngf=8",
    "model.ndf=8",
    "train.batch_size=16",
    "train.num_threads=1",
    "train.device=cpu",
    "train.precision=fp32",
    "train.channels_last=false",
    f"train.max_steps={STEPS}",
    "train.checkpoint_every=0",
    "train.sample_every=0",
    "train.log_every=10",
    "train.eval_every=0",
    "train.ema_decay=0",
    "data.num_workers=0",
    "data.shuffle_buffer=64",
    "wandb.mode=disabled",
    "run.seed=5",
]


def sha(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def train_default_recipe(tmp: Path, overrides: tuple[str, ...] = ()) -> dict:
    """Train the fixture's run in `tmp`; returns what the fixture records."""
    shards = tmp / "shards"
    write_synthetic_shards(shards, 256, shard_size=64, size=32, seed=3, processes=1, progress=False)
    cfg = build_config("debug", [*SETTINGS, f"data.shards={shards}", f"run.dir={tmp / 'run'}", *overrides])
    data = hashlib.sha256()

    def record(step, env, images, labels=None) -> None:
        data.update(images.contiguous().numpy().tobytes())

    trainer = Trainer(cfg, hooks=[record])
    result = trainer.fit()
    assert result.step == STEPS
    nets = {"G": trainer.G.state_dict(), "D": trainer.D.state_dict()}
    return {
        "torch": torch.__version__,
        "steps": STEPS,
        "data_sha256": data.hexdigest(),
        "tensors": {f"{net}.{k}": sha(v) for net, state in nets.items() for k, v in state.items()},
        "values": {
            f"{net}.{k}": [float(x) for x in v.flatten()[:3]]
            for net, state in nets.items()
            for k, v in list(state.items())[:2]
        },
    }


def test_default_recipe_trains_bit_identical_weights(tmp_path):
    want = json.loads(FIXTURE.read_text())
    if want["torch"] != torch.__version__:
        pytest.skip(f"the fixture was recorded with torch {want['torch']}, this is {torch.__version__}")
    got = train_default_recipe(tmp_path)
    assert got["data_sha256"] == want["data_sha256"], "the synthetic shards or the data order changed, not the recipe"
    assert got["values"] == want["values"]
    assert got["tensors"] == want["tensors"]


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        recorded = train_default_recipe(Path(tmp))
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    FIXTURE.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
    print(f"wrote {FIXTURE} ({len(recorded['tensors'])} tensors)", file=sys.stderr)

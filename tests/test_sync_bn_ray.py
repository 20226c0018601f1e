"""dist.sync_bn=node under Ray: workers on different Ray nodes form groups of one (README: node groups by
Ray's node id), so the run trains exactly like dist.sync_bn=off; global differs (so the check can fail)."""

import sys

import pytest
import torch

from dcgan_dist.training import checkpoint as ckpt

from .conftest import assert_same_training_state, run_with_env
from .test_ray import final_checkpoint, ray_train_args, worker_nodes

pytest.importorskip("ray")


@pytest.mark.slow  # three Ray runs of two workers
def test_node_groups_on_two_ray_nodes_train_like_off(ray_cluster, tiny_shards, tmp_path):
    states, nodes = {}, {}
    for mode in ("node", "off", "global"):
        proc = run_with_env(
            [
                sys.executable,
                "-m",
                "dcgan_dist.train",
                *ray_train_args(
                    tiny_shards, tmp_path / mode, "train.max_steps=3", f"dist.sync_bn={mode}", f"run.name=sbn-{mode}"
                ),
            ],
            ray_cluster,
        )
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        nodes[mode] = worker_nodes(tmp_path / mode)
        states[mode] = ckpt.load(final_checkpoint(tmp_path / mode))
    assert nodes["node"][0] != nodes["node"][1], nodes  # one worker per Ray node
    assert_same_training_state(states["node"], states["off"])
    assert not all(torch.equal(v, states["global"]["D"][k]) for k, v in states["off"]["D"].items())

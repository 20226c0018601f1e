"""What a training step sends (perf/collectives.py), counted with real gloo workers, and the test bed check."""

import json
import os
import shutil

import pytest

from dcgan_dist.config import ModelSection
from dcgan_dist.gan.models import build_models
from dcgan_dist.perf.collectives import StepSpec, count
from dcgan_dist.perf.netns_check import available


def _params(width: int) -> int:
    G, D = build_models(ModelSection(64, 3, 8, width, width))
    return sum(p.numel() for net in (G, D) for p in net.parameters())


def test_global_sync_bn_is_26_collectives_a_step_and_node_groups_of_one_none():
    """DCGAN-64: G has 4 BN layers (forward + backward), D 3 called three times (real, fake, G's step) forward
    and backward: 8 + 18 = 26. DDP all-reduces every parameter's gradient once per step (float32)."""
    spec = StepSpec(mode="global", world_size=2, ranks_per_node=1, image_size=64, width=4, nz=8, batch=2)
    glob = count(spec)["summary"]
    assert glob["bn_calls"] == 26, glob
    assert glob["per_step"]["all_gather"]["calls"] == 13 and glob["per_step"]["all_reduce"]["calls"] == 13, glob
    assert glob["per_step"]["ddp_bucket"]["bytes"] == 4 * _params(4), glob
    spec.mode = "node"  # one worker per node: every group has one rank, nothing to synchronise
    node = count(spec)["summary"]
    assert node["bn_calls"] == 0 and node["per_step"]["ddp_bucket"] == glob["per_step"]["ddp_bucket"], node


@pytest.mark.slow
@pytest.mark.skipif(bool(available()), reason=f"network-namespace check: {available() or 'available'}")
@pytest.mark.skipif(shutil.which("ip") is None or os.geteuid() != 0, reason="needs root and ip netns")
def test_netns_bandwidth_term_matches_a_tbf_limited_link(tmp_path):
    """Two namespaces, the link limited to 100 Mbit by tbf: a 16 MB all-reduce and the replay of a step's
    collectives take what bytes / rate predicts, within 30 %."""
    from dcgan_dist.perf.netns_check import main

    out = tmp_path / "netns.json"
    assert main(["--rates", "none,100mbit", "--width", "16", "--reps", "2", "--out", str(out)]) == 0
    model = json.loads(out.read_text())["model"]["100mbit"]
    assert 0.7 < model["bandwidth_measured_s"] / model["bandwidth_predicted_s"] < 1.3, model
    assert 0.7 < model["replay_off_measured_s"] / model["replay_off_predicted_s"] < 1.3, model

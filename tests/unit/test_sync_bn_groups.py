"""dist.sync_bn: its spellings, the group-size check, and how ranks are grouped (no processes)."""

import pytest

from dcgan_dist.config import ConfigError, build_config, from_yaml, to_yaml
from dcgan_dist.distributed.groups import partition


@pytest.mark.parametrize(
    "value, mode",
    [("true", "global"), ("false", "off"), ("global", "global"), ("node", "node"), ("off", "off"), ("2", "2")],
)
def test_spellings(value, mode):
    cfg = build_config("debug", [f"dist.sync_bn={value}", "dist.launcher=ray", "dist.num_workers=4"])
    assert cfg.dist.sync_bn == mode
    assert from_yaml(to_yaml(cfg)).dist.sync_bn == mode  # a run's stored config reads back the same


def test_an_old_config_with_a_boolean_reads_as_global_or_off():
    cfg = build_config("debug", [])
    text = to_yaml(cfg).replace("sync_bn: global", "sync_bn: false")
    assert "sync_bn: false" in text and from_yaml(text).dist.sync_bn == "off"


@pytest.mark.parametrize("value", ["3", "everything", "0"])
def test_a_group_size_must_divide_the_workers(value):
    with pytest.raises(ConfigError) as err:
        build_config("debug", [f"dist.sync_bn={value}", "dist.launcher=ray", "dist.num_workers=4"])
    message = str(err.value)
    assert "dist.sync_bn" in message and "\n" not in message, message


def test_partitions():
    assert partition("global", 4) == [[0, 1, 2, 3]]
    assert partition("off", 4) == []
    assert partition("2", 4) == [[0, 1], [2, 3]]
    assert partition("4", 6) == [[0, 1, 2, 3], [4, 5]]  # an elastic group at a size 4 does not divide
    # Node: by node, in order of each node's first rank, whatever order ranks were placed in.
    assert partition("node", 5, ["b", "a", "b", "a", "c"]) == [[0, 2], [1, 3], [4]]

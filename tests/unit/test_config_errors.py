"""Config errors, in-process: one line that names the key (the CLIs turn ConfigError into exit 2)."""

import pytest

from dcgan_dist.config import ConfigError, build_config


def error_of(*overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        build_config("debug", list(overrides))
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "override, key, suggestion",
    [
        ("train.bach_size=3", "train.bach_size", "batch_size"),
        ("optim.learning_rate=1e-3", "optim.learning_rate", "lr"),
        ("modle.nz=3", "modle", "model"),
    ],
)
def test_misspelt_key(override, key, suggestion):
    message = error_of(override)
    assert f"'{key}'" in message and suggestion in message


@pytest.mark.parametrize(
    "override, bound",
    [
        ("train.batch_size=0", "at least 1"),
        ("optim.beta1=1.5", "below 1"),
        ("optim.lr=-1e-4", "above 0"),
        ("model.image_size=48", "28, 32, 64, 128"),
    ],
)
def test_out_of_range(override, bound):
    message = error_of(override)
    assert f"'{override.split('=')[0]}'" in message and bound in message


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", ".nan"])
def test_non_finite(value):
    message = error_of(f"optim.lr={value}")
    assert "'optim.lr'" in message and "finite" in message


def test_in_range_values_are_kept():
    cfg = build_config("debug", ["train.batch_size=1", "optim.beta1=0", "optim.lr=1e-6", "model.image_size=28"])
    assert (cfg.train.batch_size, cfg.optim.beta1, cfg.optim.lr, cfg.model.image_size) == (1, 0.0, 1e-6, 28)

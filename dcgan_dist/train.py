"""Train a DCGAN.

    python -m dcgan_dist.train                                  # quick start: the debug preset on this machine
    python -m dcgan_dist.train --config configs/default.yaml    # the classic 64x64 faces model
    python -m dcgan_dist.train --config debug train.max_steps=2000 run.dir=runs/longer

`--config FILE` (a path, or a preset name from configs/) then any number of `key=value` overrides.
Rerunning with the same run.dir resumes from its newest checkpoint.
"""

from __future__ import annotations

import sys

from .config import Config, ConfigError, build_config, split_args, to_yaml

QUICKSTART_PRESET = "debug"


def usage() -> str:
    return (
        __doc__.strip()
        + "\n\nSettings (section.key=default):\n"
        + "\n".join(f"  {line}" for line in _flatten(to_yaml(Config())))
    )


def _flatten(yaml_text: str) -> list[str]:
    out, section = [], ""
    for line in yaml_text.splitlines():
        if not line.startswith(" "):
            section = line.rstrip(":")
        else:
            key, _, value = line.strip().partition(":")
            out.append(f"{section}.{key}={value.strip()}")
    return out


def parse(argv: list[str]) -> Config:
    config_file, overrides = split_args(argv)
    if config_file is None and not overrides:
        print(f"No --config given: using the '{QUICKSTART_PRESET}' preset (configs/{QUICKSTART_PRESET}.yaml), "
              "a small model that trains on a laptop CPU in minutes. "
              "The classic 64x64 model: --config configs/default.yaml", flush=True)
        config_file = QUICKSTART_PRESET
    return build_config(config_file, overrides)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(usage())
        return 0
    try:
        cfg = parse(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if cfg.dist.launcher == "ray":
        from .distributed.ray_launcher import launch  # imported late: config errors answer fast, Ray is optional

        return launch(cfg)
    from .loop import train

    result = train(cfg)
    return 0 if result.step >= cfg.train.max_steps else 1


if __name__ == "__main__":
    sys.exit(main())

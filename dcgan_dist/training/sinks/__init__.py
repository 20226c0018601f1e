"""Metric sinks: where a run's step records and images go. One file per sink, named as in `log.sinks`.

Each module here (other than base) holds one `Sink` subclass, `SINK`. Adding a sink is a new file in this
folder plus its name in the setting `log.sinks`; nothing else refers to the sinks by name.
"""

from __future__ import annotations

import importlib
import pkgutil

from dcgan_dist.training.sinks.base import Sink, SinkContext

__all__ = ["Sink", "SinkContext", "available", "make", "sink_class"]


def available() -> list[str]:
    """The names log.sinks accepts: this folder's modules."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base" and not m.name.startswith("_"))


def sink_class(name: str) -> type[Sink]:
    """The class of sink `name`; ValueError for a name no module here has. The modules import their libraries
    only when a sink starts: `SINK.library` names the one it needs (checked before a run)."""
    if name not in available():
        raise ValueError(f"'{name}' is no sink; the sinks: {', '.join(available())}")
    return importlib.import_module(f"{__name__}.{name}").SINK


def make(names: list[str], ctx: SinkContext) -> dict[str, Sink]:
    return {name: sink_class(name)(ctx) for name in names}

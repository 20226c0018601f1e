"""What the sample and evaluate commands share: a bad argument is one line (argparse's own errors print the usage
first, several lines), and the argument types that check what can work (counts, seeds, the device)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

import torch

SEED_LIMIT = 2**63 - 1  # torch.Generator.manual_seed takes at most 64 bits


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def whole_number(low: int, high: int | None = None):
    """An argparse type: an int in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            bounds = f"at least {low}" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"{value} cannot work; give a number {bounds}")
        return value

    return parse


def device(text: str) -> torch.device:
    """An argparse type: a device this machine has (cpu, cuda, cuda:N)."""
    try:
        chosen = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu or cuda (cuda:N)") from None
    if chosen.type == "cpu":
        return chosen
    if chosen.type != "cuda":
        raise argparse.ArgumentTypeError(f"{text}: only cpu and cuda devices are supported")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA device; use --device cpu")
    if chosen.index is not None and chosen.index >= count:
        raise argparse.ArgumentTypeError(f"{text}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return chosen


def output_file(text: str) -> str:
    """An argparse type: the name of a file to write (not a folder)."""
    if not text or Path(text).name in ("", ".", "..") or Path(text).expanduser().is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a file name (a folder?); give one such as grid.png")
    return text


def write_error(option: str, path: str, exc: OSError) -> str:
    """The one line for an output that could not be written."""
    where = (
        f": {exc.filename}"
        if exc.filename and str(exc.filename) != str(path) and not str(exc.filename).endswith(".tmp")
        else ""
    )
    return f"error: cannot write {option} {path} ({exc.strerror or exc}{where}); choose another path"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"

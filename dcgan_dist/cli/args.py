"""The one command-line grammar every command shares:

    python -m dcgan_dist.<command> [its flags] [--config FILE] [key=value ...] [--help]

Settings (counts, seeds, steps, the device...) are keys of the schema (dcgan_dist/config.py): `--config FILE`
(a path or a preset name; default: the debug preset) then `key=value` overrides, checked by the same code for
every command, so a misspelt key is the same one line and exit 2 everywhere. A command's own flags are only for
what is not a setting (--checkpoint, --out, --shards...). `--help` lists the command's flags, then each setting
it uses with the value the command line gives it, what the schema allows, and the schema's description.
A bad argument is one line (argparse's own errors print the usage first, several lines)."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NoReturn

from dcgan_dist.config import Config, ConfigError, describe, from_args, limits_text, setting_keys, show, split_args


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


SETTINGS_USAGE = "[--config FILE] [key=value ...]"
# The settings a training run reads (train, and every trial of tune): not the eval.* ones only the evaluate command
# uses, nor sample.*, bench.*, tune.*.
TRAINING_SETTINGS = (
    *("run", "data", "model", "gan", "train", "optim"),
    *("eval.num", "eval.nhoods_per_image", "dist", "wandb", "log"),
)
HELP_WIDTH = 110


def settings_help(cfg: Config, base: str, selection: Sequence[str] | None = None) -> str:
    """The settings a command uses, each with its value, what it accepts and its description (from the schema)."""
    lines = [f"Settings ({SETTINGS_USAGE}; the values with --config {base} and the overrides given):"]
    for key in setting_keys(None if selection is None else list(selection)):
        section, _, name = key.partition(".")
        accepts = limits_text(key)
        lines.append(f"  {key}={show(getattr(getattr(cfg, section), name))}" + (f"    ({accepts})" if accepts else ""))
        lines += textwrap.wrap(describe(key), width=HELP_WIDTH, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def check_overrides(overrides: Sequence[str], settings: Sequence[str] | None, prog: str) -> None:
    """Refuse (ConfigError) an override of a setting the command does not use: another command's section is not
    silently ignored. A key the schema does not have is left to the schema's own error; model.* of a command that
    reads a checkpoint (it does not list model) is the checkpoint's."""
    if settings is None:
        return
    used = set(setting_keys(list(settings)))
    for item in overrides:
        key = item.partition("=")[0]
        if key in used or key not in setting_keys():
            continue
        command = prog.rpartition(".")[2]
        if key.startswith("model."):
            raise ConfigError(
                f"{key} is not a setting of {command}: the checkpoint decides the model (see {prog} --help)"
            )
        raise ConfigError(f"{key} is not a setting of {command}; its settings: see {prog} --help")


def exit_code(exc: BaseException) -> int | None:
    """The exit code of an error a command ends with (errors.py): a failure of the run -> 1 (RunError, a checkpoint
    that could not be written); bad input, found before work changed anything -> 2 (ConfigError, StoreError,
    CheckpointError); None: none of them (a bug: its traceback is shown)."""
    from dcgan_dist.errors import RunError  # here: the command's own imports decide how long --help takes
    from dcgan_dist.storage.filesystem import StoreError
    from dcgan_dist.training.checkpoint import CheckpointError, CheckpointWriteError

    if isinstance(exc, RunError | CheckpointWriteError):
        return 1
    if isinstance(exc, ConfigError | StoreError | CheckpointError):
        return 2
    return None


def one_line_errors(main: Callable[..., int]) -> Callable[..., int]:
    """A command's main whose errors (exit_code) end it as one line on stderr with their exit code: the mapping
    once, for every command, rather than an except clause per error in each."""

    @functools.wraps(main)
    def command(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except Exception as exc:
            code = exit_code(exc)
            if code is None:
                raise
            print(f"error: {exc}", file=sys.stderr)
            return code

    return command


class Command:
    """A command's flags (argparse, for what is not a setting) and its settings (the schema)."""

    def __init__(
        self,
        prog: str,
        doc: str,
        settings: Sequence[str] | None,
        moved: dict[str, str] | None = None,
        fixed: Sequence[str] = (),
    ):
        """settings: the sections and keys its --help lists (None: all); moved: former flags -> what to write now
        (a one-line error says so); fixed: overrides the command always applies (after the user's)."""
        self.settings, self.moved, self.fixed = settings, moved or {}, list(fixed)
        self.parser = OneLineParser(
            prog=prog,
            description=doc.strip(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
            add_help=False,
            allow_abbrev=False,
        )

    def parse(self, argv: list[str] | None) -> tuple[argparse.Namespace, Config, str] | int:
        """(flags, settings, the preset or file they started from), or an exit code: 0 after --help, 2 after
        a bad argument or setting (one line on stderr)."""
        argv = sys.argv[1:] if argv is None else list(argv)
        wants_help = any(a in ("-h", "--help") for a in argv)
        args, rest = self.parser.parse_known_args([a for a in argv if a not in ("-h", "--help")])
        try:
            for arg in rest:
                flag = arg.split("=", 1)[0]
                if flag in self.moved:
                    raise ConfigError(
                        f"{flag} is a setting now: write {self.moved[flag]} (see {self.parser.prog} --help)"
                    )
            config_file, overrides = split_args(rest, self.parser.prog)
            cfg, base = from_args([*(["--config", config_file] if config_file else []), *overrides, *self.fixed])
            check_overrides(overrides, self.settings, self.parser.prog)  # good settings, but of another command
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if wants_help:
            self.parser.epilog = settings_help(cfg, base, self.settings)
            self.parser.usage = f"{self.parser.prog} {self._flags_usage()} {SETTINGS_USAGE}"
            print(self.parser.format_help())
            return 0
        return args, cfg, base

    def _flags_usage(self) -> str:
        return " ".join(
            f"[{a.option_strings[0]}" + ("" if a.nargs == 0 else f" {a.metavar or a.dest.upper()}") + "]"
            for a in self.parser._actions
        )


def output_file(text: str) -> str:
    """An argparse type: the name of a file to write (not a folder)."""
    if not text or Path(text).name in ("", ".", "..") or Path(text).expanduser().is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a file name (a folder?); give one such as grid.png")
    return text


def _integer(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give {least} or more") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{value} is too small; give {least} or more")
    return value


def whole_number(text: str) -> int:
    """An argparse type: an integer, 0 or more."""
    return _integer(text, 0)


def positive_number(text: str) -> int:
    """An argparse type: an integer, 1 or more."""
    return _integer(text, 1)


def output_folder(text: str) -> str:
    """An argparse type: the name of a folder to write into (not empty: never the current directory by accident)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty folder name; give one such as data/faces")
    if Path(text).expanduser().is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is a file; give a folder")
    return text


def not_empty(text: str) -> str:
    """An argparse type: a value that is not empty (an empty one would silently mean the default)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty; give a value, or leave the option out for its default")
    return text


def write_error(option: str, path: str, exc: OSError) -> str:
    """The one line for an output that could not be written."""
    where = (
        f": {exc.filename}"
        if exc.filename and str(exc.filename) != str(path) and not str(exc.filename).endswith(".tmp")
        else ""
    )
    return f"error: cannot write {option} {path} ({exc.strerror or exc}{where}); choose another path"


JSON_FLAG = "--json"
JSON_HELP = "print the command's result as one JSON object on stdout (everything else goes to stderr)"


def take_flag(argv: Sequence[str], flag: str) -> tuple[list[str], bool]:
    """argv without `flag`, and whether it was there."""
    rest = [a for a in argv if a != flag]
    return rest, len(rest) < len(argv)


@contextlib.contextmanager
def json_stdout(enabled: bool) -> Iterator[None]:
    """With --json: stdout is for the result alone, so the command's other lines go to stderr meanwhile."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def print_result(result: dict) -> None:
    """The result object, one line on stdout (called outside json_stdout)."""
    print(json.dumps(result, default=str), flush=True)

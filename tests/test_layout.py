"""The package's layout contract: the import layers (lint-imports, shown to fail on an upward import), no import
cycle, a package root of entry shims and shared helpers only, and every documented `python -m` command present."""

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the TOML reader import-linter itself depends on there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "dcgan_dist"

# `python -m dcgan_dist.<command>` entry points: each a shim that hands over to dcgan_dist.cli.<command>.
SHIMS = {"train", "sample", "evaluate", "bench", "tune"}
# Small helpers shared by several layers, kept in the root (README "Architecture" says why).
SHARED = {"config", "errors", "files", "stopping"}
LAYER_PACKAGES = {"cli", "perf", "launch", "training", "gan", "data", "storage", "distributed"}

# Every import cycle among the modules of the package on sys.path, as JSON: lists of module names. grimp (the
# import graph import-linter builds) counts every import, also those inside functions.
FIND_CYCLES = """
import json, grimp
graph = grimp.build_graph("dcgan_dist")
index, low, stack, on_stack, cycles = {}, {}, [], set(), []
def visit(module):
    index[module] = low[module] = len(index)
    stack.append(module)
    on_stack.add(module)
    for other in sorted(graph.find_modules_directly_imported_by(module)):
        if other not in index:
            visit(other)
            low[module] = min(low[module], low[other])
        elif other in on_stack:
            low[module] = min(low[module], index[other])
    if low[module] == index[module]:
        component = []
        while True:
            other = stack.pop()
            on_stack.discard(other)
            component.append(other)
            if other == module:
                break
        if len(component) > 1:
            cycles.append(sorted(component))
for module in sorted(graph.modules):
    if module not in index:
        visit(module)
print(json.dumps(cycles))
"""


def _env(pythonpath: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(pythonpath)}


def _lint_imports(where: Path) -> subprocess.CompletedProcess:
    """lint-imports with where/pyproject.toml's contracts, on the dcgan_dist package in `where`."""
    return subprocess.run(
        [shutil.which("lint-imports") or "lint-imports", "--no-cache", "--no-logo", str(where / "pyproject.toml")],
        cwd=where,
        env=_env(where),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _cycles(where: Path) -> list[list[str]]:
    done = subprocess.run(
        [sys.executable, "-c", FIND_CYCLES], cwd=where, env=_env(where), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _copy(tmp_path: Path) -> Path:
    """The package and its import contracts in a folder of their own."""
    shutil.copytree(PACKAGE, tmp_path / "dcgan_dist", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _append(module: Path, line: str) -> None:
    module.write_text(module.read_text() + f"\n{line}\n")


def _layers() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["type"] == "layers"]
    return contract["layers"]


def test_import_layers_are_kept():
    done = _lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_an_upward_import_breaks_the_layers(tmp_path):
    copy = _copy(tmp_path)
    assert _lint_imports(copy).returncode == 0  # the copy as it is passes
    # data sits below training: data importing the schedule is an import upward.
    _append(copy / "dcgan_dist/data/shards.py", "from dcgan_dist.training.schedule import Schedule  # noqa")
    done = _lint_imports(copy)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "dcgan_dist.data.shards -> dcgan_dist.training.schedule" in done.stdout


def test_every_package_and_root_module_is_in_a_layer():
    named = {part.strip().removeprefix("dcgan_dist.") for layer in _layers() for part in layer.split("|")}
    on_disk = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    on_disk |= {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert on_disk <= named, f"not in any layer of [tool.importlinter]: {sorted(on_disk - named)}"


def test_no_import_cycle():
    assert _cycles(ROOT) == []


def test_a_cycle_within_a_layer_is_found(tmp_path):
    copy = _copy(tmp_path)
    # shards imports images; images importing shards back (inside a function, a late import) closes a cycle.
    _append(copy / "dcgan_dist/data/images.py", "def _late():\n    from dcgan_dist.data import shards  # noqa")
    assert _cycles(copy) == [["dcgan_dist.data.images", "dcgan_dist.data.shards"]]


def test_the_package_root_holds_shims_and_shared_helpers_only():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert modules == SHIMS | SHARED | {"__init__"}
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert packages == LAYER_PACKAGES
    assert all((PACKAGE / name / "__init__.py").is_file() for name in packages)


@pytest.mark.parametrize("command", sorted(SHIMS))
def test_an_entry_shim_only_hands_over_to_its_command(command):
    source = (PACKAGE / f"{command}.py").read_text()
    assert len(source.splitlines()) <= 12
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert imported - {"sys"} == {f"dcgan_dist.cli.{command}"}
    assert (PACKAGE / "cli" / f"{command}.py").is_file()


def _runs_as_main(path: Path) -> bool:
    """The module has an `if __name__ == "__main__":` block."""
    for node in ast.parse(path.read_text()).body:
        test = node.test if isinstance(node, ast.If) else None
        if (
            isinstance(test, ast.Compare)
            and isinstance(test.left, ast.Name)
            and test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators)
        ):
            return True
    return False


def test_every_documented_command_exists():
    named = re.findall(r"python -m (dcgan_dist[\w.<>]*)", (ROOT / "README.md").read_text())
    documented = {name.rstrip(".") for name in named if "<" not in name}  # not a placeholder: <command>
    assert {"dcgan_dist.train", "dcgan_dist.sample", "dcgan_dist.evaluate", "dcgan_dist.data"} <= documented
    missing = []
    for name in sorted(documented):
        path = ROOT.joinpath(*name.split("."))
        # `python -m` runs a module, or a package's __main__ (which runs as __main__ whatever it holds).
        if path.is_dir() and (path / "__main__.py").is_file():
            continue
        if not (path.with_suffix(".py").is_file() and _runs_as_main(path.with_suffix(".py"))):
            missing.append(name)
    assert not missing, f"README documents `python -m` for modules that do not run as commands: {missing}"

"""Hyper-parameter sweeps behind `python -m dcgan_dist.tune` (its --help is the user's guide): Ray Tune over trials
that are each a full multi-worker Ray Train run, scored by the in-training SWD; ASHA, PBT or FIFO; the sweep's state
in <run.dir>/tune and each trial's run in <run.dir>/trials/<trial>, so rerunning the command resumes it."""

from __future__ import annotations

import ast
import math
import posixpath
import queue
import re
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.tune
from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining
from ray.util.queue import Queue

from dcgan_dist.config import Config, ConfigError, from_dict, to_dict
from dcgan_dist.launch import ray_train as ray_launcher
from dcgan_dist.storage.filesystem import S3, RunStorage, filesystem, is_remote, write_result
from dcgan_dist.training.checkpoint import STATE_FILE, CheckpointError, one_line, parse

METRIC = "swd"
SPACES = ("loguniform", "uniform", "randint", "choice", "grid")


@dataclass
class Search:
    key: str
    space: str
    values: list[Any]

    def domain(self):
        """The Ray Tune search space."""
        if self.space == "loguniform":
            return ray.tune.loguniform(*self.values)
        if self.space == "uniform":
            return ray.tune.uniform(*self.values)
        if self.space == "randint":
            return ray.tune.randint(*self.values)
        if self.space == "choice":
            return ray.tune.choice(self.values)
        return ray.tune.grid_search(self.values)

    def mutation(self):
        """What PBT draws a new value from when it perturbs this key (grids and choices: the listed values)."""
        return self.values if self.space in ("choice", "grid") else self.domain()


def parse_search(item: str, base: Config) -> Search:
    """`KEY=SPACE(args)`, checked against the schema: every value must be a valid setting of KEY."""
    key, sep, spec = item.partition("=")
    match = re.fullmatch(r"\s*(\w+)\s*\((.*)\)\s*", spec)
    if not sep or not match or match.group(1) not in SPACES:
        raise ConfigError(
            f"--search {item!r}: expected KEY=SPACE(args), SPACE one of {', '.join(SPACES)}, "
            "e.g. optim.lr=loguniform(1e-4,1e-3)"
        )
    space, args = match.groups()
    try:
        values = list(ast.literal_eval(f"[{args}]"))
    except (ValueError, SyntaxError):
        raise ConfigError(
            f"--search {item!r}: cannot read the arguments ({args}); use numbers or quoted strings"
        ) from None
    if space in ("loguniform", "uniform", "randint"):
        if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values) or values[0] >= values[1]:
            raise ConfigError(f"--search {item!r}: {space} takes two numbers, low < high")
        if space == "loguniform" and values[0] <= 0:
            raise ConfigError(f"--search {item!r}: loguniform needs a low bound above 0")
        probes = values if space != "randint" else [values[0], values[1] - 1]
    elif not values:
        raise ConfigError(f"--search {item!r}: {space} needs at least one value")
    else:
        probes = values
    for value in probes:  # the schema's types and bounds, with the key's real name in the message
        apply(base, {key: value})
    return Search(key, space, values)


def apply(base: Config, params: dict[str, Any]) -> Config:
    """The base settings with a trial's values ({"optim.lr": 3e-4, ...}), validated like any override."""
    tree = to_dict(base)
    for key, value in params.items():
        section, _, name = key.partition(".")
        if not name:
            raise ConfigError(f"'{key}' is not a setting: use section.key (e.g. optim.lr)")
        tree.setdefault(section, {})[name] = value
    return from_dict(tree)


class ToTune(ray.train.UserCallback):
    """In Ray Train's controller: every report of the trial's run (rank 0's metrics, and the checkpoint when there
    is one) goes to the trial's queue, where the trial function hands it to Tune."""

    def __init__(self, reports: Queue, scheme: str):
        self.reports, self.scheme = reports, scheme

    def after_report(self, run_context, metrics, checkpoint) -> None:
        self.reports.put(
            {"metrics": metrics[0], "checkpoint": f"{self.scheme}{checkpoint.path}" if checkpoint else None}
        )


def copy_start(path: str, root: str, trial_storage: RunStorage, name: str) -> str:
    """The checkpoint a trial continues from (Tune's, at `path`), copied into the trial's own folder at once: Tune
    may delete another trial's checkpoint as it goes on. The path comes from Tune's state, which a resumed sweep
    reads back from <root>/tune, so it is followed only inside that folder; and the copy must be a readable
    checkpoint (torch.load(weights_only=True)) before it is written. Nothing of its settings is used: the trial's
    places and data come from the command line and its searched values, and resuming from it checks that it fits
    the trial's model and parts (CheckpointManager.restore). Raises CheckpointError."""
    tune_dir = f"{root}/tune".removeprefix(S3)
    if not posixpath.normpath(path).startswith(f"{tune_dir}/"):
        raise CheckpointError(
            f"Tune handed this trial a checkpoint outside the sweep's storage ({path}, not in "
            f"{tune_dir}); it is not read: rerun the sweep in a new run.dir"
        )
    location = f"{S3 if is_remote(root) else ''}{posixpath.normpath(path)}"
    try:
        data = RunStorage(location).read(STATE_FILE)
    except OSError as exc:
        raise CheckpointError(f"cannot read the checkpoint {location}/{STATE_FILE} ({one_line(exc, 200)})") from None
    parse(data, f"{location}/{STATE_FILE}")
    return trial_storage.write(name, data)


def run_trial(params: dict[str, Any], base: dict[str, Any], root: str) -> None:
    """One trial (in a Ray Tune trial actor): a Ray Train run of the base settings with `params`, its reports
    passed on to Tune with a copy of each checkpoint, from which PBT or a resumed sweep continues."""
    context = ray.tune.get_context()
    trial = context.get_trial_id()
    start = ray.tune.get_checkpoint()
    start_from, run_name, parent = None, trial, trial
    if start is not None:  # PBT's exploit (another trial's weights), or this trial's own after a pause or a resume
        # A Train run of its own: the run it continues may have checkpoints past this one (or be another trial's).
        run_name = f"{trial}-from-{zlib.crc32(start.path.encode()):08x}"
        owner = re.search(r"/run_trial_([0-9a-f]+_\d+)_", start.path)
        parent = owner.group(1) if owner else "?"
        start_from = copy_start(start.path, root, RunStorage(f"{root}/trials/{trial}"), f"start/{run_name}.pt")
        whose = "its own" if parent == trial else f"trial {parent}'s"
        print(
            f"trial {trial} continues from {whose} checkpoint {start.path}/{STATE_FILE} (copied to {start_from}) with "
            + ", ".join(f"{k}={_short(v)}" for k, v in params.items()),
            flush=True,
        )
    settings = from_dict(base)
    cfg = apply(
        settings,
        {
            **params,
            "run.name": run_name,
            "run.dir": f"{root}/trials/{trial}",
            "dist.storage_path": "",
            "wandb.group": settings.run.name,
        },
    )
    cfg = ray_launcher.worker_config(cfg)
    reports = Queue(actor_options={"num_cpus": 0})
    trainer = ray_launcher.torch_trainer(
        cfg, callbacks=[ToTune(reports, "s3://" if is_remote(root) else "")], start_from=start_from
    )
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - raised again in the trial's thread
            outcome["error"] = exc

    fitting = threading.Thread(target=fit, name="dcgan-trial-fit", daemon=True)
    fitting.start()
    best = math.inf
    while fitting.is_alive() or not reports.empty():
        try:
            item = reports.get(timeout=0.5)
        except queue.Empty:  # ray.util.queue raises the standard library's Empty
            continue
        metrics = {k: v for k, v in item["metrics"].items() if isinstance(v, (int, float))}
        if METRIC not in metrics:
            continue  # a checkpoint without an evaluation (the last step off the evaluation grid): nothing to score
        best = min(best, metrics[METRIC])
        # PBT's clock: the step, except that the last report (nothing follows it) starts no perturbation round.
        metrics.update(
            best_swd=best,
            train_run=run_name,
            weights_from=parent,
            pbt_step=min(metrics["step"], cfg.train.max_steps - 1),
        )
        _report(metrics, item["checkpoint"])
    fitting.join()
    if "error" in outcome:
        raise outcome["error"]
    info = outcome["result"].return_value or {}
    if "error" in info:
        raise RuntimeError(info["error"])


def _report(metrics: dict, checkpoint: str | None) -> None:
    """To Tune, with a copy of the Train checkpoint's state.pt when there is one (Tune persists it into the sweep's
    storage before `report` returns)."""
    if checkpoint is None:
        ray.tune.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="dcgan-tune-") as directory:
        (Path(directory) / STATE_FILE).write_bytes(RunStorage(checkpoint).read(STATE_FILE))
        ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(directory))


def scheduler(name: str, cfg: Config, searches: list[Search]):
    interval = cfg.train.eval_every
    if name == "asha":
        # A trial is judged against the others at 2, 4, 8... evaluations; the worse half stops there.
        return ASHAScheduler(time_attr="step", max_t=cfg.train.max_steps, grace_period=2 * interval, reduction_factor=2)
    if name == "pbt":
        # The searched optim.* keys: optim.lr_g and optim.lr_d each network's rate (Ray's DCGAN example), optim.lr both
        # at once. The rates are a function of the step and the settings alone: a perturbed trial needs no scheduler
        # state, its Trainer sets the new rates at the start.
        mutations = {s.key: s.mutation() for s in searches if s.key.startswith("optim.")}
        if not mutations:
            raise ConfigError(
                "tune.scheduler=pbt perturbs learning rates: search at least one optim.* key "
                "(e.g. --search 'optim.lr_g=loguniform(1e-4,1e-3)' --search 'optim.lr_d=loguniform(1e-4,1e-3)', "
                "or optim.lr for both)"
            )
        # Every second evaluation the trials wait for each other (synch: the same decisions whatever the timing),
        # and the lower half continues from a trial of the upper half's checkpoint with its optim.* perturbed.
        return PopulationBasedTraining(
            time_attr="pbt_step",
            perturbation_interval=2 * interval,
            synch=True,
            hyperparam_mutations=mutations,
            quantile_fraction=0.5,
            resample_probability=0.25,
        )
    return None


# A trial's own process only waits for its Ray Train run: it reserves some memory (Ray's logical "memory" resource)
# rather than a CPU, so that the workers can have every CPU.
TRIAL_DRIVER_RESOURCES: dict[str, float] = {"memory": 256 * 2**20}


def checkpoints_kept(scheduler_name: str):
    """Which of a trial's checkpoints Tune keeps: the two best by SWD; with PBT the newest four (PBT copies a
    trial's newest, and the trial may report again before the copy is read)."""
    if scheduler_name == "pbt":
        return ray.tune.CheckpointConfig(num_to_keep=4)
    return ray.tune.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=METRIC, checkpoint_score_order="min")


def concurrency(cfg: Config, limit: int = 0) -> int:
    """How many trials fit on the cluster side by side (at most `limit`, when given)."""
    resources = ray.cluster_resources()
    per_trial_cpus = cfg.dist.num_workers * cfg.dist.cpus_per_worker
    fits = int(resources.get("CPU", 0) // per_trial_cpus)
    if cfg.train.device == "cuda":
        fits = min(fits, int(resources.get("GPU", 0) // cfg.dist.num_workers))
    if fits == 0:
        raise ConfigError(
            f"a trial needs {per_trial_cpus:g} CPU(s) (dist.num_workers x dist.cpus_per_worker)"
            + (" and a GPU per worker" if cfg.train.device == "cuda" else "")
            + f" but the cluster has {resources.get('CPU', 0):g} CPU(s), {resources.get('GPU', 0):g} GPU(s): "
            "use fewer workers per trial or a larger cluster"
        )
    return min(fits, limit) if limit else fits


def results_table(results, searches: list[Search]) -> tuple[str, Any, int]:
    """The trials as a table, best SWD first; the best result; how many trials continued from another trial's
    checkpoint (PBT's exploit steps: a trial's reports then come from more than one Train run)."""
    rows, exploits = [], 0
    for result in results:
        frame = result.metrics_dataframe
        scored = frame is not None and METRIC in frame
        runs = frame["train_run"].nunique() if scored and "train_run" in frame else 1
        if scored and "weights_from" in frame:  # Train runs that started from another trial's weights
            trial = result.metrics.get("trial_id")
            exploits += frame.loc[frame["weights_from"] != trial, "train_run"].nunique()
        rows.append(
            (
                float(frame[METRIC].min()) if scored else math.inf,
                result,
                int(frame["step"].max()) if scored else None,
                runs,
            )
        )
    rows.sort(key=lambda row: row[0])
    header = ["trial", *(s.key for s in searches), "best swd", "steps", "runs", "status"]
    lines = [header] + [
        [
            str((result.metrics or {}).get("trial_id", Path(result.path).name)),
            *(_short((result.config or {}).get(s.key)) for s in searches),
            "-" if swd == math.inf else f"{swd:.4f}",
            "-" if steps is None else str(steps),
            str(runs),
            "error" if result.error else "done",
        ]
        for swd, result, steps, runs in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)
    best = rows[0][1] if rows and rows[0][0] < math.inf else None
    return text, best, exploits


def trial_records(results, searches: list[Search]) -> tuple[list[dict], list[dict]]:
    """Each trial as data (its parameters, best SWD, steps, Train runs, status), best first; and PBT's exploit
    events (a trial continued from another trial's checkpoint: which, from which, at which step)."""
    trials: list[dict[str, Any]] = []
    exploits: list[dict[str, Any]] = []
    for result in results:
        frame = result.metrics_dataframe
        scored = frame is not None and METRIC in frame
        trial = str((result.metrics or {}).get("trial_id", Path(result.path).name))
        if scored and "weights_from" in frame and "train_run" in frame:
            for run, rows in frame.groupby("train_run", sort=False):
                source = str(rows["weights_from"].iloc[0])
                if source != trial:
                    exploits.append(
                        {"trial": trial, "from_trial": source, "train_run": str(run), "step": int(rows["step"].min())}
                    )
        trials.append(
            {
                "trial": trial,
                "params": {s.key: (result.config or {}).get(s.key) for s in searches},
                "best_swd": float(frame[METRIC].min()) if scored else None,
                "steps": int(frame["step"].max()) if scored else None,
                "train_runs": int(frame["train_run"].nunique()) if scored and "train_run" in frame else 1,
                "status": "error" if result.error else "done",
            }
        )
    trials.sort(key=lambda t: math.inf if t["best_swd"] is None else t["best_swd"])
    return trials, exploits


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def sweep(
    base: Config,
    searches: list[Search],
    trials: int,
    scheduler_name: str,
    chosen,
    limit: int = 0,
    outcome: dict | None = None,
) -> int:
    """Run the sweep; prints its table and best checkpoint, and writes <run.dir>/result.json (also into
    `outcome`): each trial's parameters, best SWD and steps, PBT's exploit events, the best checkpoint."""
    remote = is_remote(base.run.dir)
    root = base.run.dir.rstrip("/") if remote else str(Path(base.run.dir).expanduser().resolve())
    ray_launcher.connect()
    base = ray_launcher.worker_config(apply(base, {"run.dir": root}))
    try:
        side_by_side = concurrency(base, limit)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    fs, tune_path = filesystem(f"{root}/tune")  # Tune's state: <root>/tune
    experiment = f"{root}/tune"
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(run_trial, base=to_dict(base), root=root), TRIAL_DRIVER_RESOURCES
    )
    if ray.tune.Tuner.can_restore(tune_path, storage_filesystem=fs):
        print(f"Resuming the sweep in {experiment}", flush=True)
        tuner = ray.tune.Tuner.restore(
            tune_path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs
        )
    else:
        tuner = ray.tune.Tuner(
            trainable,
            param_space={s.key: s.domain() for s in searches},
            tune_config=ray.tune.TuneConfig(
                metric=METRIC, mode="min", num_samples=trials, scheduler=chosen, max_concurrent_trials=side_by_side
            ),
            run_config=ray.tune.RunConfig(
                name="tune",
                storage_path=str(Path(tune_path).parent),
                storage_filesystem=fs,
                checkpoint_config=checkpoints_kept(scheduler_name),
                failure_config=ray.tune.FailureConfig(max_failures=base.dist.max_failures),
                verbose=1,
            ),
        )
    print(
        f"Sweep {base.run.name}: {trials} trial(s) x {base.dist.num_workers} worker(s), scheduler {scheduler_name}, "
        f"{side_by_side} side by side; storage {experiment}",
        flush=True,
    )
    started = time.perf_counter()
    grid = tuner.fit()
    results = [grid[i] for i in range(len(grid))]  # a ResultGrid is a sequence (__len__, __getitem__)
    seconds = time.perf_counter() - started
    ray_launcher.settle()  # the summary below comes after the last line Ray forwards
    table, best, exploits = results_table(results, searches)
    print(f"\nSweep done in {seconds:.0f} s:\n{table}", flush=True)
    steps = [int(r.metrics.get("step", 0)) for r in results if r.metrics]
    if scheduler_name == "asha":
        full = base.train.max_steps * len(steps)
        stopped = sum(1 for s in steps if s < base.train.max_steps)
        print(
            f"ASHA stopped {stopped} of {len(steps)} trial(s) early: {sum(steps)} of {full} steps trained "
            f"({100 * (1 - sum(steps) / max(full, 1)):.0f} % saved)"
        )
    if scheduler_name == "pbt":
        print(
            f"PBT: {exploits} exploit step(s) (a trial continued from a better trial's checkpoint, optim.* perturbed)"
        )
    unfinished = [
        r
        for r in results
        if not r.error and int((r.metrics or {}).get("step", 0)) < base.train.max_steps and scheduler_name != "asha"
    ]
    if unfinished:
        print(f"{len(unfinished)} trial(s) did not finish (interrupted?): rerun the same command to resume the sweep")
    records, exploit_events = trial_records(results, searches)
    checkpoint = best.get_best_checkpoint(METRIC, "min") if best is not None else None
    result = {
        "command": "tune",
        "run_dir": root,
        "scheduler": scheduler_name,
        "side_by_side": side_by_side,
        "seconds": seconds,
        "trials": records,
        "exploits": exploit_events,
        "best": records[0] if best is not None else None,
        "best_checkpoint": f"{'s3://' if remote else ''}{checkpoint.path}" if checkpoint else None,
        "unfinished": len(unfinished),
    }
    if outcome is not None:
        outcome.update(result)
    write_result(root, result)
    if best is None:
        print("error: no trial reported an SWD", file=sys.stderr)
        return 1
    where = f"{'s3://' if remote else ''}{checkpoint.path}" if checkpoint else "(none kept)"
    params = ", ".join(f"{s.key}={_short(best.config.get(s.key))}" for s in searches)
    print(
        f"Best trial: {params}, swd {best.metrics_dataframe[METRIC].min():.4f}\nBest checkpoint: {where}\n"
        f"  python -m dcgan_dist.sample --checkpoint {where}"
    )
    return 0 if not any(r.error for r in results) else 1

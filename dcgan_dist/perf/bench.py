"""The timing harness behind `python -m dcgan_dist.bench` (its --help says what each figure means): the loader
alone, the training step side by side with the minimal PyTorch-example loop (time_side_by_side), FLOPs per image
(FlopCounterMode) and the device's peak for MFU, checkpoint writes, and the scaling of N Ray workers (bench_ray).
The GPU report (perf/gpu_report.py) uses the same loops and timing."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dcgan_dist.config import Config, ConfigError, from_dict, to_dict
from dcgan_dist.data import normalise, resolve_data
from dcgan_dist.distributed.env import DistEnv
from dcgan_dist.gan.models import build_models
from dcgan_dist.gan.objectives import objective
from dcgan_dist.gan.precision import pick_device, resolved
from dcgan_dist.gan.step import make_optimizers, train_step
from dcgan_dist.storage.filesystem import RunStorage
from dcgan_dist.training.checkpoint import to_bytes
from dcgan_dist.training.trainer import (
    NoiseRNG,
    build_networks,
    distribute,
    make_loader,
    resolve_speed,
    with_classes,
)


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- what a step costs, and what the device could do -----------------------------------------------------------

# Dense (no sparsity) peak TFLOP/s from NVIDIA's data sheets, per kind of arithmetic; matched in this order
# against torch.cuda.get_device_name() (more specific names first). fp32 is the CUDA cores; tf32/bf16/fp16 the
# tensor cores. A GPU without an entry for a kind (T4 and V100: no tf32, no bf16) has no peak for it.
GPU_PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5}),
    ("H200", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}),  # SXM
    ("H100 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5}),
    ("H100 PCIe", {"fp32": 51.0, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0}),
    ("H100", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}),  # SXM
    ("A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}),
    ("L40S", {"fp32": 91.6, "tf32": 183.0, "bf16": 362.1, "fp16": 362.1}),
    ("L4", {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0}),
    ("A10G", {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "fp16": 125.0}),  # the A10's sheet; AWS publishes none
    ("A10", {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "fp16": 125.0}),
    ("T4", {"fp32": 8.1, "fp16": 65.0}),
    ("V100", {"fp32": 15.7, "fp16": 125.0}),  # SXM2; PCIe: 14 / 112
]


def _arithmetic(device: torch.device, precision: str) -> str:
    """The kind of arithmetic the convolutions run in: fp32 steps on CUDA use TF32 tensor cores when cuDNN
    allows it (torch's default for convolutions)."""
    if precision != "fp32":
        return precision
    return "tf32" if device.type == "cuda" and torch.backends.cudnn.allow_tf32 else "fp32"


def cpu_peak(threads: int, precision: str) -> tuple[float | None, str]:
    """An estimate of a CPU's peak FLOP/s: cores used x clock x FLOPs per cycle per core from its flags."""
    from dcgan_dist.gan.precision import cpu_flags

    flags = cpu_flags()
    mhz = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                mhz = float(line.split(":", 1)[1])
                break
    except (OSError, ValueError):
        pass
    if not mhz or not flags:
        return None, "unknown (no clock or flags in /proc/cpuinfo)"
    # fp32 FLOPs per cycle with two FMA units: 2 x lanes x 2 (a multiply and an add).
    if "avx512f" in flags:
        per_cycle, unit = 64, "AVX-512 2x16-lane FMA"
    elif "avx2" in flags and "fma" in flags:
        per_cycle, unit = 32, "AVX2 2x8-lane FMA"
    else:
        per_cycle, unit = 16, "SSE/AVX without FMA"
    if precision == "bf16" and "amx_bf16" in flags:
        per_cycle, unit = 1024, "AMX-BF16 tile unit"
    elif precision == "bf16" and "avx512_bf16" in flags:
        per_cycle, unit = 128, "AVX512-BF16 dot products, 2 units"
    peak = threads * mhz * 1e6 * per_cycle
    return peak, (
        f"estimate: {threads} core{'s' if threads != 1 else ''} x {mhz / 1000:.2f} GHz "
        "(/proc/cpuinfo; boost clock unknown) x "
        f"{per_cycle} {precision} FLOPs/cycle ({unit})"
    )


def device_peak(device: torch.device, precision: str, threads: int | None = None) -> tuple[float | None, str]:
    """(the device's peak FLOP/s for this precision, or None; where the figure comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        kind = _arithmetic(device, precision)
        for key, peaks in GPU_PEAK_TFLOPS:
            if key in name:
                if kind not in peaks:
                    return None, f"unknown: {key} has no {kind} tensor-core peak"
                return peaks[kind] * 1e12, f"{key} data sheet, dense {kind}"
        return None, f"unknown: {name} is not in bench.GPU_PEAK_TFLOPS"
    if device.type == "cpu":
        return cpu_peak(threads or torch.get_num_threads(), precision)
    return None, f"unknown for {device.type}"


def count_flops(step, batch_size: int) -> float:
    """FLOPs per image of one call of `step` (a training step: forward and backward of G and D), counted by
    torch's FlopCounterMode (convolutions and matrix products, the arithmetic that matters for MFU)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / batch_size


def step_flops_per_image(cfg: Config, minimal: bool = False) -> float:
    """FLOPs per image of one training step of this model (our train_step, or the minimal loop's), counted
    once on the CPU in eager fp32 with a small batch: the count is the same in every precision, layout and
    compiled form, and proportional to the batch."""
    small = replace(
        cfg,
        train=replace(
            cfg.train, batch_size=min(cfg.train.batch_size, 4), precision="fp32", channels_last=False, compile=False
        ),
    )
    cpu = torch.device("cpu")
    loop = MinimalLoop(small, cpu) if minimal else TrainLoop(small, DistEnv(device=cpu), shards=None)
    return count_flops(loop.step, small.train.batch_size)


def mfu(images_per_s: float, flops_per_image: float, peak: float | None) -> float | None:
    return images_per_s * flops_per_image / peak if peak else None


# --- the loops that are timed ----------------------------------------------------------------------------------


WARM_PASS_S = 5.0  # measure_data's longest wait for the loader's first pass to end


def measure_data(cfg: Config, env: DistEnv, shards: str, steps: int, warmup: int) -> dict[str, float]:
    """The real loader, timed twice: data_images_per_s and data_images_per_cpu_s (images per CPU-second of this
    process), its uint8 batches as it hands them over (host memory), what a loader must keep up with; then
    data_normalised_images_per_s, those batches to normalised tensors on the device (on a CPU the float
    conversion, ~4x the bytes, costs more than raw shards' loading); with data.cache=device also
    data_cached_images_per_s, the uint8 batches of the passes drawn from the cache (already on the device).
    The CPU-second figure is the loader's cost per core when it runs in this process (data.num_workers=0),
    whatever else the machine is doing."""
    batches = make_loader(cfg, env, shards)
    result: dict[str, float] = {}
    try:
        # Past every slot's first pass first (for up to WARM_PASS_S): the first pass parses the tars and faults the
        # mapped shards into this process (~5x a later pass's cost per raw batch), once per process, not the steady
        # state. Not with data.cache=device/auto: the cache takes over there, and its figure is measured below.
        started, past_first = time.perf_counter(), set[int]()
        while (
            batches.cache is None
            and len(past_first) < batches.num_slots
            and time.perf_counter() - started < WARM_PASS_S
        ):
            next(batches)
            if int(batches.last_ids[:, 0].max(initial=0)) >= 1:
                past_first.add(batches.last_slot)
        for normalised in (False, True):
            for i in range(warmup + steps):
                if i == warmup:
                    sync_device(env.device)
                    started, cpu_started = time.perf_counter(), time.process_time()
                images = next(batches)[0]
                if normalised:
                    normalise(images, env.device, bool(cfg.train.channels_last))
            sync_device(env.device)
            images_done = steps * cfg.train.batch_size
            if normalised:
                result["data_normalised_images_per_s"] = images_done / (time.perf_counter() - started)
            else:
                result["data_images_per_s"] = images_done / (time.perf_counter() - started)
                result["data_images_per_cpu_s"] = images_done / (time.process_time() - cpu_started)
        if batches.cache is not None:  # data.cache=device: then the later passes, drawn from the cache
            while not batches.cache.active:
                next(batches)
            for i in range(warmup + steps):
                if i == warmup:
                    sync_device(env.device)
                    started = time.perf_counter()
                next(batches)
            sync_device(env.device)
            result["data_cached_images_per_s"] = steps * cfg.train.batch_size / (time.perf_counter() - started)
        return result
    finally:
        batches.close()


def measure_checkpoint(cfg: Config, device: torch.device) -> dict:
    """Writing one full checkpoint (G, D, both Adam states after a step) to run.dir, a local folder or a bucket,
    as the local launcher does; the file is removed again."""
    G, D, opt_g, opt_d, precision = build_networks(cfg, device)
    m = cfg.model
    real = torch.rand(cfg.train.batch_size, m.channels, m.image_size, m.image_size, device=device) * 2 - 1
    z, labels = torch.randn(real.shape[0], m.nz, 1, 1, device=device), any_labels(cfg, real.shape[0], device)
    train_step(G, D, opt_g, opt_d, real, z, precision, objective(cfg.gan.loss), labels)
    state = {"G": G.state_dict(), "D": D.state_dict(), "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict()}
    storage = RunStorage(cfg.run.dir)
    started = time.perf_counter()
    data = to_bytes(state)
    storage.write(".bench-checkpoint.pt", data)
    seconds = time.perf_counter() - started
    storage.delete(".bench-checkpoint.pt")
    return {"checkpoint_mib": len(data) / 2**20, "checkpoint_write_s": seconds}


def labelled_data(cfg: Config) -> tuple[Config, str]:
    """(cfg with a conditional model's num_classes/class_names from the shards, the shard spec): what the Trainer
    fills in before it builds the models (with_classes). ConfigError (one line, exit 2): a conditional model
    without labelled shards; the embedded synthetic faces (data.shards empty) are refused before they are drawn."""
    if cfg.model.conditional and not cfg.data.shards:
        raise ConfigError(
            "model.conditional=true needs labelled shards, and data.shards is empty (the embedded "
            "synthetic faces, unlabelled): give data.shards (data convert/synth with labels)"
        )
    shards = resolve_data(cfg.data, cfg.model)[0]
    return with_classes(cfg, shards), shards


def any_labels(cfg: Config, batch: int, device: torch.device) -> torch.Tensor | None:
    """Stand-in labels (classes in turn) for a conditional model's step without a loader; None: unconditional."""
    return torch.arange(batch, device=device) % cfg.model.num_classes if cfg.model.conditional else None


class TrainLoop:
    """The real training step as `env` runs it (world 1: no DDP, no synchronisation): what the Trainer runs,
    without its parts. cfg: resolved (precision.resolved).

    shards: batches from the real loader; None: one random batch held on the device (the step alone).
    data_env: whose slice of the shards to read (so that independent workers still read apart). fused: Adam's
    implementation (None: what the Trainer picks). compile_mode: torch.compile G and D in this mode
    ("reduce-overhead": with CUDA graphs) instead of as train.compile says.
    """

    def __init__(
        self,
        cfg: Config,
        env: DistEnv,
        shards: str | None,
        data_env: DistEnv | None = None,
        fused: bool | None = None,
        compile_mode: str | None = None,
    ):
        self.cfg, self.device = cfg, env.device
        self.G, self.D, self.opt_g, self.opt_d, self.precision = build_networks(cfg, env.device)
        if fused is not None:
            self.opt_g, self.opt_d = make_optimizers(self.G, self.D, cfg.optim, fused=fused)
        if compile_mode is not None:
            cfg = replace(cfg, train=replace(cfg.train, compile=False))
        self.G, self.D = distribute(self.G, self.D, cfg, env)
        if compile_mode is not None:
            self.G, self.D = torch.compile(self.G, mode=compile_mode), torch.compile(self.D, mode=compile_mode)
        self.cuda_graphs = compile_mode == "reduce-overhead"
        m = cfg.model
        self.batches = make_loader(cfg, data_env or env, shards) if shards is not None else None
        self.fixed = (
            None
            if shards is not None
            else normalise(
                torch.randint(
                    0, 256, (cfg.train.batch_size, m.channels, m.image_size, m.image_size), dtype=torch.uint8
                ),
                env.device,
                bool(cfg.train.channels_last),
            )
        )
        self.noise = NoiseRNG(env.device, cfg.run.seed + (data_env or env).rank)
        self.objective, self.labels = objective(cfg.gan.loss), any_labels(cfg, cfg.train.batch_size, env.device)
        self.data_wait = 0.0

    def step(self) -> None:
        fetch = time.perf_counter()
        if self.batches is None:
            assert self.fixed is not None  # the stand-in batch when there are no shards
            real, labels = self.fixed, self.labels
        else:
            images, labels = next(self.batches)
            real = normalise(images, self.device, bool(self.cfg.train.channels_last))
            if self.labels is None or labels is None:
                labels = None
            else:
                labels = labels.to(self.device, non_blocking=True)
        self.data_wait += time.perf_counter() - fetch
        if self.cuda_graphs:  # a new iteration: the graphs' outputs of the previous one may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        train_step(
            self.G,
            self.D,
            self.opt_g,
            self.opt_d,
            real,
            self.noise.latents(real.shape[0], self.cfg.model.nz),
            self.precision,
            self.objective,
            labels,
        )

    def close(self) -> None:
        if self.batches is not None:
            self.batches.close()


class MinimalLoop:
    """The minimal DCGAN loop of PyTorch's example, always in fp32 and the default memory layout, on random
    in-memory tensors: "the plain tutorial loop" that the training step is compared with, whatever
    train.precision and train.channels_last say. Same architecture and batch."""

    def __init__(self, cfg: Config, device: torch.device):
        m = cfg.model
        G, D = build_models(replace(m, conditional=False), seed=0)  # the tutorial's: unconditional
        self.G, self.D, self.device, self.nz = G.to(device), D.to(device), device, m.nz
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=2e-4, betas=(0.5, 0.999))
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=2e-4, betas=(0.5, 0.999))
        b = cfg.train.batch_size
        self.real = torch.rand(b, m.channels, m.image_size, m.image_size, device=device) * 2 - 1
        self.ones, self.zeros = torch.ones(b, device=device), torch.zeros(b, device=device)

    def step(self) -> None:
        G, D, b = self.G, self.D, self.real.shape[0]
        fake = G(torch.randn(b, self.nz, 1, 1, device=self.device))
        D.zero_grad()
        loss_d = F.binary_cross_entropy_with_logits(D(self.real), self.ones) + F.binary_cross_entropy_with_logits(
            D(fake.detach()), self.zeros
        )
        loss_d.backward()
        self.opt_d.step()
        G.zero_grad()
        loss_g = F.binary_cross_entropy_with_logits(D(fake), self.ones)
        loss_g.backward()
        self.opt_g.step()

    def close(self) -> None:
        pass


def time_side_by_side(
    loops: dict, batch_size: int, device: torch.device, steps: int, warmup: int, rounds: int | None = None
) -> dict[str, float]:
    """images/s of each loop (name -> object with .step()), timed side by side: `rounds` rounds (default: one
    step each on a CPU, 5 on a GPU, whose steps are too short to time alone) in which every loop runs its share
    of the steps, in an order rotated every round; the rate is from the median round. On a shared machine whose
    load comes and goes (other processes, clocks), every loop sees the same conditions, and a burst of load
    during a few rounds does not move the median."""
    for loop in loops.values():
        for _ in range(warmup):
            loop.step()
    rounds = min(rounds or (steps if device.type == "cpu" else 5), steps)
    per_round = steps // rounds
    seconds: dict[str, list[float]] = {name: [] for name in loops}
    names = list(loops)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync_device(device)
            started = time.perf_counter()
            for _ in range(per_round):
                loops[name].step()
            sync_device(device)
            seconds[name].append(time.perf_counter() - started)
    return {name: per_round * batch_size / statistics.median(times) for name, times in seconds.items()}


def measure_train(
    cfg: Config, env: DistEnv, shards: str, steps: int, warmup: int, data_env: DistEnv | None = None
) -> dict:
    """The real training step as `env` runs it (world 1: no DDP, no synchronisation), on batches from the real
    loader; data_env: whose slice of the shards to read (so that independent workers still read apart)."""
    loop = TrainLoop(cfg, env, shards, data_env)
    try:
        for _ in range(warmup):
            loop.step()
        sync_device(env.device)
        started, loop.data_wait = time.perf_counter(), 0.0
        for _ in range(steps):
            loop.step()
        sync_device(env.device)
        seconds = time.perf_counter() - started
    finally:
        loop.close()
    return {
        "images_per_s": steps * cfg.train.batch_size / seconds,
        "step_s": seconds / steps,
        "data_wait_s": loop.data_wait / steps,
    }


# --- Ray -----------------------------------------------------------------------------------------------------


def _ray_bench_worker(config: dict) -> dict:
    from dcgan_dist.launch.ray_train import worker_env

    steps, warmup = config.pop("_steps"), config.pop("_warmup")
    cfg = from_dict(config)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    env = worker_env(cfg)
    cfg, _ = resolve_speed(cfg, env)  # "auto" for the workers' device, as the Trainer does
    alone = DistEnv(rank=0, world_size=1, device=env.device)
    shards = resolve_data(cfg.data, cfg.model)[0] if env.is_main else None
    shards = env.gather_objects(shards)[0]  # rank 0 generates the synthetic set once; the others reuse it
    cfg = with_classes(cfg, shards)  # a conditional model's classes (run_bench checked the shards carry them)
    out: dict[str, Any] = {}
    # One after the other; the barriers keep every worker's run b (and a) side by side.
    out["c"] = measure_train(cfg, alone, shards, steps, warmup, data_env=env) if env.is_main else None
    env.barrier()
    out["a_nosync"] = measure_train(replace(cfg, dist=replace(cfg.dist, sync_bn="off")), env, shards, steps, warmup)
    out["b"] = measure_train(cfg, alone, shards, steps, warmup, data_env=env)
    env.barrier()
    out["a"] = measure_train(cfg, env, shards, steps, warmup)
    for name in ("a_nosync", "b", "a"):  # rates add up over workers; times are averaged
        totals = {k: sum(env.gather_scalars(v)) for k, v in out[name].items()}
        out[name] = {k: v if k == "images_per_s" else v / env.world_size for k, v in totals.items()}
    return out


def bench_ray(cfg: Config, steps: int, warmup: int) -> dict:
    from dcgan_dist.launch.ray_train import (  # Ray Train's RunConfig and TorchTrainer, as ray_train types them
        RunConfig,
        TorchTrainer,
        connect,
        resolve_device,
        scaling_config,
        worker_runtime_env,
    )

    connect()
    cfg = replace(cfg, train=replace(cfg.train, device=resolve_device(cfg)))
    config = {**to_dict(cfg), "_steps": steps, "_warmup": warmup}
    trainer = TorchTrainer(
        _ray_bench_worker,
        train_loop_config=config,
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(
            name=f"bench-{int(time.time())}",
            storage_path=str((Path(cfg.run.dir) / "bench").resolve()),
            worker_runtime_env=worker_runtime_env(),
        ),
    )
    # fit() returns Train v2's Result; Ray annotates it with the name ray.train.Result, which a type checker reads
    # as v1's (no return_value): see the Train v2 note in launch/ray_train.py.
    r = trainer.fit().return_value  # type: ignore[attr-defined]
    a, b, a_nosync, c = (r[k]["images_per_s"] for k in ("a", "b", "a_nosync", "c"))
    breakdown = {
        "compute_s": r["b"]["step_s"] - r["b"]["data_wait_s"],
        "data_wait_s": r["a"]["data_wait_s"],
        "grad_allreduce_s": r["a_nosync"]["step_s"] - r["b"]["step_s"],
        "bn_sync_s": r["a"]["step_s"] - r["a_nosync"]["step_s"],
        "step_s": r["a"]["step_s"],
    }
    return {
        "worker_device": cfg.train.device,
        "train_images_per_s": a,
        "single_worker_images_per_s": c,
        "independent_images_per_s": b,
        "ddp_without_sync_bn_images_per_s": a_nosync,
        "speedup": a / c,
        "comm_efficiency": a / b,
        "step_breakdown": breakdown,
    }


def format_mfu(value: float | None) -> str:
    return f"{value * 100:.3g} %" if value is not None else "unknown"


Row = tuple[str, float, str]  # a line of the table: what was measured, images/s, MFU as text


def run_bench(setting: Config, say: Callable[[str], None] = print) -> tuple[dict, list[Row], str]:
    """The bench command's measurements on this machine (the local launcher) or its Ray workers (dist.launcher=ray),
    as the bench.* settings ask: (the JSON line's dict, the table's rows, run.dir). say: told the speed settings
    resolved, before the measurements. Raises ConfigError (a conditional model without labelled shards), RunError
    (bad data, an object store that stopped answering) and StoreError."""
    bench = setting.bench
    if setting.train.num_threads:
        torch.set_num_threads(setting.train.num_threads)
    threads = torch.get_num_threads()
    device = pick_device(setting.train.device if setting.dist.launcher == "local" else "cpu")
    cfg, speed = resolved(setting, device)  # for this process's device; Ray workers resolve for theirs
    say(f"Speed: {speed.reason}")
    m = cfg.model
    result: dict = {
        "launcher": cfg.dist.launcher,
        "batch_size": cfg.train.batch_size,
        "image_size": m.image_size,
        "ngf": m.ngf,
        "ndf": m.ndf,
        "precision_setting": setting.train.precision,
        "precision": cfg.train.precision,
        "channels_last": cfg.train.channels_last,
        "compile": cfg.train.compile,
        "threads": threads,
        "dist_workers": cfg.dist.num_workers,
        "loader_workers": cfg.data.num_workers,
        "steps": bench.steps,
    }
    result["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({threads} threads)"
    cfg, shards = labelled_data(cfg)
    env = DistEnv(device=device)
    rows: list[Row] = []
    if bench.measure != "step":
        data = measure_data(cfg, env, shards, bench.steps * 2, bench.warmup)
        result["data_images_per_s"] = data["data_images_per_s"]
        rows.append(("loader alone (shards -> uint8 batches)", result["data_images_per_s"], ""))
        if cfg.data.num_workers == 0:  # else the loader's processes do the work, and their CPU time is not counted
            result["data_images_per_cpu_s"] = data["data_images_per_cpu_s"]
            rows.append(("loader alone, per CPU-second of this process", result["data_images_per_cpu_s"], ""))
        result["data_normalised_images_per_s"] = data["data_normalised_images_per_s"]
        rows.append(
            ("loader + normalise (shards -> float tensors on the device)", data["data_normalised_images_per_s"], "")
        )
        if "data_cached_images_per_s" in data:
            result["data_cached_images_per_s"] = data["data_cached_images_per_s"]
            rows.append(("data.cache=device, later passes (uint8 batches)", data["data_cached_images_per_s"], ""))
    if bench.checkpoint:
        result.update(measure_checkpoint(cfg, device))
    if bench.measure == "loader":
        pass  # the loader's figure above is all that was asked for
    elif cfg.dist.launcher == "ray":
        result.update(bench_ray(setting, bench.steps, bench.warmup))
        n = cfg.dist.num_workers
        rows += [
            ("c: 1 worker", result["single_worker_images_per_s"], ""),
            (f"b: {n} workers, no communication", result["independent_images_per_s"], ""),
            (f"a-nosync: {n} workers, DDP, per-worker BN", result["ddp_without_sync_bn_images_per_s"], ""),
            (f"a: {n} workers, DDP + synchronised BN", result["train_images_per_s"], ""),
        ]
    else:
        peak, peak_source = device_peak(device, cfg.train.precision, threads)
        result.update({"flops_per_image": step_flops_per_image(cfg), "peak_flops": peak, "peak_source": peak_source})
        loops: dict[str, TrainLoop | MinimalLoop] = {"train": TrainLoop(cfg, env, shards)}
        if bench.baseline:
            loops["baseline"] = MinimalLoop(cfg, device)
        try:
            rates = time_side_by_side(loops, cfg.train.batch_size, device, bench.steps, bench.warmup)
        finally:
            for loop in loops.values():
                loop.close()
        result["train_images_per_s"] = rates["train"]
        result["mfu"] = mfu(rates["train"], result["flops_per_image"], peak)
        rows.append(
            (
                f"training step ({cfg.train.precision}"
                + (", channels_last" if cfg.train.channels_last else "")
                + (", compiled" if cfg.train.compile else "")
                + ", real loader)",
                rates["train"],
                format_mfu(result["mfu"]),
            )
        )
        if bench.baseline:
            base_peak, base_source = device_peak(device, "fp32", threads)
            result.update(
                {
                    "baseline_images_per_s": rates["baseline"],
                    "vs_baseline": rates["train"] / rates["baseline"],
                    "baseline_flops_per_image": step_flops_per_image(cfg, minimal=True),
                    "baseline_peak_flops": base_peak,
                    "baseline_peak_source": base_source,
                }
            )
            result["baseline_mfu"] = mfu(rates["baseline"], result["baseline_flops_per_image"], base_peak)
            rows.append(
                ("baseline: minimal fp32 loop, random tensors", rates["baseline"], format_mfu(result["baseline_mfu"]))
            )
    return result, rows, cfg.run.dir


def bench_table(result: dict, rows: list[Row], run_dir: str) -> list[str]:
    """The bench command's table and summary lines, from run_bench()'s result."""
    lines: list[str] = []
    lines.append(f"\n{'':2}{'measurement':<56}{'images/s':>10}{'MFU':>10}")
    for name, value, mfu_text in rows:
        lines.append(f"  {name:<56}{value:>10.1f}{mfu_text:>10}")
    if "vs_baseline" in result:
        lines.append(f"  training step / minimal fp32 loop (side by side): {result['vs_baseline']:.3f}")
    if "flops_per_image" in result:
        lines.append(
            f"  FLOPs per image and step (FlopCounterMode, G+D forward+backward): "
            f"{result['flops_per_image'] / 1e9:.3f} G"
            + (
                f"; minimal loop {result['baseline_flops_per_image'] / 1e9:.3f} G"
                if "baseline_flops_per_image" in result
                else ""
            )
        )
        lines.append(
            f"  peak: {result['peak_flops'] / 1e12:.3f} TFLOP/s ({result['peak_source']})"
            if result["peak_flops"]
            else f"  peak: {result['peak_source']}"
        )
    if "checkpoint_write_s" in result:
        lines.append(
            f"  checkpoint, {result['checkpoint_mib']:.1f} MiB to {run_dir}: {result['checkpoint_write_s']:.2f} s"
        )
    if "speedup" in result:
        lines.append(f"  speedup a/c: {result['speedup']:.3f}   comm_efficiency a/b: {result['comm_efficiency']:.3f}")
        lines.append(
            "  per step: " + ", ".join(f"{k[:-2]} {v * 1000:.1f} ms" for k, v in result["step_breakdown"].items())
        )
    return lines

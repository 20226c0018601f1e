"""One command, one Markdown report of what the hardware at hand does with DCGAN.

    python -m dcgan_dist.bench --gpu-report docs/gpu-report.md [--config default] [key=value ...] [bench.steps=50]

Sized to finish in under 10 minutes on one GPU with the default preset (compilation included). It runs:

1. the training step, side by side in rotating rounds (bench.time_side_by_side), on one batch held on the
   device, so that the rows compare the step itself: the fp32 minimal loop of PyTorch's example, our fp32
   step (foreach Adam), + fused Adam, bf16 + channels_last, + torch.compile, + CUDA graphs (torch.compile
   mode "reduce-overhead"), each with images/s, the ratio to the minimal loop and MFU; then our fastest eager
   setting on batches from the real loader, which shows whether the loader keeps up;
2. the loader alone (shards -> normalised tensors on the device): images/s, and per loader process;
3. the synchronised batch-norm equivalence (2 ranks x B against 1 rank x 2B, float64, G and D): on CUDA with
   torch.nn.SyncBatchNorm, over NCCL with two GPUs, else over gloo with CUDA tensors on GPU 0 (NCCL refuses
   two ranks on one device); on CPU with CrossProcessBatchNorm over gloo;
4. the cost of dist.sync_bn global, node and off: ms per step with a GPU per rank (NCCL; one GPU: skipped,
   saying why), or 2 gloo ranks on a CPU;
5. the SWD after a short run of the same model in fp32 and in bf16 (the real Trainer, same steps and seed);
6. feeding the fastest step that ran: the same synthetic faces (bench.report_feed_images) as PNG and as raw
   shards, each loader's uint8 batches in one process and per CPU-second, the loader processes each needs to keep
   up with that step; data.cache=device's batches drawn on the device; and our bf16 step trained from the cache.

On a CPU it does what applies and says, row by row, what it skipped and why: CUDA graphs need CUDA, and
compilation (minutes on a small CPU) runs only with bench.report_compile=true. A row that fails records its error
and the report goes on. The last line printed is one JSON object with everything in the report.
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from dcgan_dist.config import Config
from dcgan_dist.data.synth import write_synthetic_shards
from dcgan_dist.distributed.env import DistEnv
from dcgan_dist.gan.precision import native_bf16, pick_device, resolved
from dcgan_dist.perf import bench, equivalence
from dcgan_dist.perf.collectives import StepSpec, time_modes
from dcgan_dist.training.trainer import Trainer

FAST_STEP = "our step, bf16 + channels_last"  # the eager setting the real-loader and device-cache rows train with


def fast_setting(cfg: Config) -> Config:
    """FAST_STEP's setting: bf16 + channels_last, eager."""
    return replace(cfg, train=replace(cfg.train, precision="bf16", channels_last=True, compile=False))


SYNC_BN_TOLERANCE = 1e-9  # float64: differences are rounding (~1e-15 measured on CPU); a real mismatch is >1e-3


@dataclass
class Row:
    name: str
    images_per_s: float | None = None
    vs_minimal: float | None = None
    mfu: float | None = None
    note: str = ""  # how it ran; or "skipped: why" / "failed: error"

    @property
    def ran(self) -> bool:
        return self.images_per_s is not None


@dataclass
class Report:
    machine: dict = field(default_factory=dict)
    setup: dict = field(default_factory=dict)
    steps: list[Row] = field(default_factory=list)
    loader: dict = field(default_factory=dict)
    sync_bn: dict = field(default_factory=dict)
    sync_bn_cost: dict = field(default_factory=dict)
    swd: dict = field(default_factory=dict)
    feeding: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "machine": self.machine,
            "setup": self.setup,
            "steps": [r.__dict__ for r in self.steps],
            "loader": self.loader,
            "sync_bn": self.sync_bn,
            "sync_bn_cost": self.sync_bn_cost,
            "swd": self.swd,
            "feeding": self.feeding,
        }


def _error(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def machine(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {cpu}",
        "cpu": f"{cpu}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda or "none (CPU build)",
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none",
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device"] += f" ({props.total_memory / 2**30:.0f} GiB, compute capability {props.major}.{props.minor})"
    return info


def fused_adam_support(device: torch.device) -> str:
    """'' when fused Adam runs on `device`, else why not."""
    try:
        p = torch.nn.Parameter(torch.zeros(4, device=device))
        opt = torch.optim.Adam([p], fused=True)
        p.grad = torch.ones_like(p)
        opt.step()
        return ""
    except (RuntimeError, ValueError) as exc:
        return f"fused Adam does not run on {device.type} ({_error(exc)})"


def _cudagraph_skips() -> int:
    """How often inductor fell back from CUDA graphs (it logs why with TORCH_LOGS=perf_hints)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["inductor"].get("cudagraph_skips", 0))


def training_steps(
    cfg: Config,
    device: torch.device,
    shards: str,
    steps: int,
    warmup: int,
    compile: bool,
    threads: int,
    flops: dict[str, float],
) -> list[Row]:
    """The rows of the training-step table (cfg: the report's model and batch, any precision; flops: per image
    of one step, "ours" and "minimal")."""
    env = DistEnv(device=device)
    fp32 = replace(cfg, train=replace(cfg.train, precision="fp32", channels_last=False, compile=False))
    fast = fast_setting(cfg)
    fused_missing = fused_adam_support(device)
    fused = not fused_missing
    fused_note = "fused Adam" if fused else "foreach Adam (" + fused_missing + ")"
    bf16_native, bf16_why = native_bf16(device)
    # name -> (what builds the loop, cfg for MFU's peak, note) or (None, None, reason skipped)
    plan: dict[str, tuple] = {
        "minimal loop (PyTorch example), fp32": (lambda: bench.MinimalLoop(cfg, device), fp32, "NCHW, foreach Adam"),
        "our step, fp32": (lambda: bench.TrainLoop(fp32, env, None, fused=False), fp32, "foreach Adam"),
    }
    if fused:
        plan["our step, fp32 + fused Adam"] = (lambda: bench.TrainLoop(fp32, env, None, fused=True), fp32, "fused Adam")
    else:
        plan["our step, fp32 + fused Adam"] = (None, None, f"skipped: {fused_missing}")
    plan[FAST_STEP] = (
        lambda: bench.TrainLoop(fast, env, None, fused=fused),
        fast,
        f"{fused_note}; {bf16_why}" + ("" if bf16_native else " (emulated: slow)"),
    )
    if compile:
        plan["+ torch.compile"] = (
            lambda: bench.TrainLoop(fast, env, None, fused=fused, compile_mode="default"),
            fast,
            "mode default; compilation in the warm-up",
        )
    else:
        plan["+ torch.compile"] = (
            None,
            None,
            "skipped: compilation takes minutes on a small CPU; bench.report_compile=true to include it",
        )
    if device.type != "cuda":
        plan["+ CUDA graphs (compile mode reduce-overhead)"] = (None, None, "skipped: CUDA graphs need a CUDA device")
    elif not compile:
        plan["+ CUDA graphs (compile mode reduce-overhead)"] = (
            None,
            None,
            "skipped: needs torch.compile (bench.report_compile)",
        )
    else:
        plan["+ CUDA graphs (compile mode reduce-overhead)"] = (
            lambda: bench.TrainLoop(fast, env, None, fused=fused, compile_mode="reduce-overhead"),
            fast,
            "",
        )

    rows = {name: Row(name, note=note) for name, (_, _, note) in plan.items()}
    loops = {}
    for name, (build, _, _) in plan.items():
        if build is None:
            continue
        try:
            loops[name] = build()
        except Exception as exc:  # noqa: BLE001 - a row that cannot be built says why; the others run
            rows[name].note = f"failed: {_error(exc)}"
    # Warm-up (compilation included) loop by loop, so that one that fails is dropped and the others run.
    for name, loop in list(loops.items()):
        try:
            for _ in range(warmup):
                loop.step()
            bench.sync_device(device)
        except Exception as exc:  # noqa: BLE001
            rows[name].note = f"failed: {_error(exc)}"
            del loops[name]
    skips_before = _cudagraph_skips()
    rates = bench.time_side_by_side(loops, cfg.train.batch_size, device, steps, warmup=0) if loops else {}
    minimal_name = "minimal loop (PyTorch example), fp32"
    for name, rate in rates.items():
        row, row_cfg = rows[name], plan[name][1]
        peak, _ = bench.device_peak(device, row_cfg.train.precision, threads)
        row.images_per_s = rate
        row.vs_minimal = rate / rates[minimal_name] if minimal_name in rates else None
        row.mfu = bench.mfu(rate, flops["minimal" if name == minimal_name else "ours"], peak)
    graphs = "+ CUDA graphs (compile mode reduce-overhead)"
    if graphs in rates:
        skipped = _cudagraph_skips() - skips_before
        rows[graphs].note = (
            f"inductor fell back from CUDA graphs {skipped} time(s) (TORCH_LOGS=perf_hints says why)"
            if skipped
            else "CUDA graphs replayed (no inductor fallbacks counted)"
        )

    # Our fastest eager setting on batches from the real loader: does the loader keep up with the step?
    n = cfg.data.num_workers
    loader_row = Row(f"{FAST_STEP}, real loader ({n} loader process{'es' if n != 1 else ''})")
    try:
        loop = bench.TrainLoop(fast, env, shards, fused=fused)
        try:
            rate = bench.time_side_by_side({"loader": loop}, cfg.train.batch_size, device, steps, warmup)["loader"]
        finally:
            loop.close()
        loader_row.images_per_s = rate
        loader_row.vs_minimal = rate / rates[minimal_name] if minimal_name in rates else None
        loader_row.mfu = bench.mfu(rate, flops["ours"], bench.device_peak(device, "bf16", threads)[0])
        loader_row.note = f"waiting for data {loop.data_wait / (steps + warmup) * 1e3:.1f} ms of each step"
    except Exception as exc:  # noqa: BLE001
        loader_row.note = f"failed: {_error(exc)}"
    return [rows[name] for name in plan] + [loader_row]


def loader_rate(cfg: Config, device: torch.device, shards: str, steps: int, warmup: int) -> dict:
    try:
        rate = bench.measure_data(cfg, DistEnv(device=device), shards, steps, warmup)["data_normalised_images_per_s"]
    except Exception as exc:  # noqa: BLE001
        return {"note": f"failed: {_error(exc)}"}
    processes = max(cfg.data.num_workers, 1)
    return {
        "images_per_s": rate,
        "loader_processes": cfg.data.num_workers,
        "per_process": rate / processes,
        "image_size": cfg.model.image_size,
        "channels": cfg.model.channels,
    }


def sync_bn_check(device: torch.device) -> dict:
    """2 ranks x 4 against 1 rank x 8, float64, 3 Adam steps of a narrow G and D."""
    spec = equivalence.Spec(world_size=2, device=device.type, dtype="float64")
    try:
        result = equivalence.run(spec)
    except Exception as exc:  # noqa: BLE001
        return {"note": f"failed: {_error(exc)}", "passed": False}
    largest = max(result["max_abs_diff"].values())
    backend = result["backend"]
    how = {
        "nccl": "torch.nn.SyncBatchNorm over NCCL, one GPU per rank",
        "gloo": (
            "torch.nn.SyncBatchNorm over gloo with CUDA tensors, both ranks on GPU 0 (NCCL refuses two "
            "ranks on one device)"
        )
        if device.type == "cuda"
        else "CrossProcessBatchNorm over gloo (CPU)",
    }[backend]
    return {
        "backend": backend,
        "how": how,
        "largest_difference": largest,
        "tolerance": SYNC_BN_TOLERANCE,
        "passed": largest < SYNC_BN_TOLERANCE,
        "max_abs_diff": result["max_abs_diff"],
    }


def sync_bn_cost(cfg: Config, device: torch.device, rounds: int = 3) -> dict:
    """ms per training step with dist.sync_bn global, node and off (and groups of half the ranks with 4 or more),
    every rank on its own GPU (NCCL, torch.nn.SyncBatchNorm), or 2 gloo ranks on a CPU; timed side by side.
    One GPU: nothing to synchronise across, the rows say why they did not run."""
    modes = ["global", "node", "off"]
    if device.type == "cuda":
        world = min(torch.cuda.device_count(), 8)
        if world < 2:
            return {
                "note": "skipped: one GPU. Synchronised BN across ranks needs a GPU per rank (NCCL refuses two ranks "
                "on one device), so global, node and off cannot be compared here; on one GPU they are the same "
                "step. perf/collectives.py count and docs/performance.md give the collectives and the model.",
                "modes": modes,
            }
        how = f"{world} ranks, one GPU each, NCCL, torch.nn.SyncBatchNorm; all on this node, so node = global"
    else:
        world = 2
        how = "2 ranks on this CPU, gloo, CrossProcessBatchNorm; one machine, so node = global"
    if world >= 4:
        modes.insert(2, str(world // 2))
    m = cfg.model
    spec = StepSpec(
        world_size=world,
        ranks_per_node=0,  # the host name: every rank here is on one node
        image_size=m.image_size,
        width=m.ngf,
        nz=m.nz,
        batch=cfg.train.batch_size,
        warmup=2,
        steps=2 if device.type == "cpu" else 20,
        device=device.type,
    )
    try:
        step_s = time_modes(spec, modes, rounds)
    except Exception as exc:  # noqa: BLE001
        return {"note": f"failed: {_error(exc)}", "modes": modes}
    return {
        "how": how,
        "world_size": world,
        "batch_per_rank": spec.batch,
        "step_ms": {k: v * 1e3 for k, v in step_s.items()},
    }


def swd_after_training(cfg: Config, shards: str, steps: int) -> dict:
    """The SWD of the same model after `steps` steps in fp32 and in bf16 (the real Trainer, same seed and data)."""
    out: dict = {"steps": steps, "eval_num": cfg.eval.num}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "bf16"):
            run_cfg = replace(
                cfg,
                run=replace(cfg.run, dir=str(Path(tmp) / precision), name=f"report-{precision}"),
                data=replace(cfg.data, shards=shards),
                # ema_decay=0: the SWD of the generator itself (an EMA over a short run mostly averages its start).
                train=replace(
                    cfg.train,
                    precision=precision,
                    channels_last="auto",
                    compile=False,
                    max_steps=steps,
                    eval_every=steps,
                    sample_every=0,
                    checkpoint_every=0,
                    log_every=max(1, steps // 4),
                    ema_decay=0.0,
                ),
                wandb=replace(cfg.wandb, mode="disabled"),
            )
            try:
                result = Trainer(run_cfg).fit()
                out[precision] = result.metrics.get("swd")
                out[f"{precision}_seconds"] = result.seconds
            except Exception as exc:  # noqa: BLE001
                out[precision], out[f"{precision}_note"] = None, f"failed: {_error(exc)}"
    if out.get("fp32") and out.get("bf16"):
        out["bf16_vs_fp32"] = out["bf16"] / out["fp32"]
    return out


def fastest_step(rows: list[Row]) -> Row | None:
    """The fastest step on a batch held on the device (the rows before the real loader's): what a loader must
    keep up with."""
    held = [r for r in rows if r.ran and "real loader" not in r.name]
    return max(held, key=lambda r: r.images_per_s or 0.0, default=None)


def feeding(cfg: Config, device: torch.device, rows: list[Row], images: int, steps: int, warmup: int) -> dict:
    """Section 6: `images` synthetic faces of the model's size, written as PNG and as raw shards; for each, the
    loader alone in this process (uint8 batches, as it hands them over; per CPU-second: one loader process's
    capacity) and the loader processes needed to keep up with the fastest step in `rows`; then the raw set with
    data.cache=device (batches drawn where the images are cached) and our bf16 step trained from that cache."""
    m = cfg.model
    fast = fastest_step(rows)
    out: dict = {"images": images, "image_size": m.image_size, "channels": m.channels}
    if fast is not None:
        out["step"], out["step_images_per_s"] = fast.name, fast.images_per_s
    # The loader alone needs no labels or model: an unconditional model reads any set.
    base = replace(
        cfg,
        model=replace(m, conditional=False, num_classes=0, class_names=[]),
        data=replace(cfg.data, num_workers=0, cache="off"),
    )
    env = DistEnv(device=device)
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("png", "raw"):
            where = str(Path(tmp) / fmt)
            try:
                # shards of images/16: the drawing runs in up to 16 processes
                write_synthetic_shards(
                    where, images, max(images // 16, 16), m.image_size, channels=m.channels, fmt=fmt, progress=False
                )
                rates = bench.measure_data(
                    replace(base, data=replace(base.data, shards=where)), env, where, steps, warmup
                )
            except Exception as exc:  # noqa: BLE001 - the row says why; the others run
                out[fmt] = {"note": f"failed: {_error(exc)}"}
                continue
            per_cpu = rates["data_images_per_cpu_s"]
            out[fmt] = {"images_per_s": rates["data_images_per_s"], "per_cpu_s": per_cpu}
            if fast is not None and fast.images_per_s and per_cpu > 0:
                out[fmt]["processes_needed"] = math.ceil(fast.images_per_s / per_cpu)
        raw = str(Path(tmp) / "raw")
        if "images_per_s" in out["raw"]:
            cached = replace(base, data=replace(base.data, shards=raw, cache="device"))
            # A conditional model's step needs labels these faces do not have: its unconditional twin trains here.
            step_cfg = cached if m.conditional else replace(cfg, data=cached.data)
            out["cache"] = _cache_rows(cached, step_cfg, env, raw, steps, warmup, None if m.conditional else rows)
        else:
            out["cache"] = {"note": "skipped: the raw shards could not be measured"}
    return out


def _cache_rows(
    loader_cfg: Config, step_cfg: Config, env: DistEnv, shards: str, steps: int, warmup: int, rows: list[Row] | None
) -> dict:
    """data.cache=device on the raw set: its batches drawn on the device, and our bf16 step trained from them
    (rows: the step rows to compare with, None: not the same model)."""
    try:
        rates = bench.measure_data(loader_cfg, env, shards, steps, warmup)
    except Exception as exc:  # noqa: BLE001
        return {"note": f"failed: {_error(exc)}"}
    if "data_cached_images_per_s" not in rates:
        return {"note": "skipped: the raw set does not fit in half the free memory of the device (not cached)"}
    out: dict = {"images_per_s": rates["data_cached_images_per_s"]}
    fast = fast_setting(step_cfg)
    alone = next((r.images_per_s for r in rows or [] if r.name == FAST_STEP and r.ran), None)
    try:
        loop = bench.TrainLoop(fast, env, shards, fused=not fused_adam_support(env.device))
        try:
            assert loop.batches is not None and loop.batches.cache is not None  # it fitted above
            while not loop.batches.cache.active:  # past the streamed first pass, untrained
                next(loop.batches)
            rate = bench.time_side_by_side({"cache": loop}, fast.train.batch_size, env.device, steps, warmup)["cache"]
        finally:
            loop.close()
    except Exception as exc:  # noqa: BLE001
        out["step_note"] = f"failed: {_error(exc)}"
        return out
    out["step_images_per_s"] = rate
    out["step_vs_alone"] = rate / alone if alone else None
    if rows is None:
        out["step_model"] = "the model's unconditional twin: these faces have no labels"
    out["step_data_wait_ms"] = loop.data_wait / (steps + warmup) * 1e3
    return out


def _num(value: float | None, fmt: str) -> str:
    return format(value, fmt) if value is not None else "-"


def to_markdown(report: Report) -> str:
    m, s = report.machine, report.setup
    lines = [
        "# GPU report: DCGAN training speed, synchronised batch norm, bf16 quality",
        "",
        f"Written by `{s['command']}` on {m['date']}. Every figure on this page comes from that one command.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *(f"| {key} | {m[key]} |" for key in ("device", "cpu", "torch", "cuda", "cudnn", "python")),
        "",
        "## Training step",
        "",
        f"{s['model']}, batch {s['batch_size']}, {s['steps']} timed steps after {s['warmup']} warm-up steps per row, "
        "the rows timed side by side in rotating rounds (median round), on one batch held on the device "
        "(the step alone), "
        "except the last row. MFU: images/s x FLOPs per image of one training step (FlopCounterMode over G and D "
        f"forward and backward: {s['flops_per_image'] / 1e9:.3f} GFLOPs for our step, "
        f"{s['minimal_flops_per_image'] / 1e9:.3f} for the minimal loop, which also computes D's unused gradients "
        "in G's update) over the device's peak for the row's arithmetic: "
        + "; ".join(f"{k}: {v}" for k, v in s["peaks"].items())
        + ".",
        "",
        "| step | images/s | vs fp32 minimal loop | MFU | notes |",
        "|---|---|---|---|---|",
    ]
    for r in report.steps:
        lines.append(
            f"| {r.name} | {_num(r.images_per_s, '.1f')} | {_num(r.vs_minimal, '.2f')} | "
            f"{bench.format_mfu(r.mfu) if r.ran else '-'} | {r.note} |"
        )
    ld = report.loader
    lines += ["", "## Loader", ""]
    if "images_per_s" in ld:
        lines.append(
            f"Shards -> normalised tensors on the device, {ld['image_size']}x{ld['image_size']}x{ld['channels']}: "
            f"**{ld['images_per_s']:.0f} images/s** with {ld['loader_processes']} loader process(es) "
            f"({ld['per_process']:.0f} per process; 0 processes: decoding in the training process)."
        )
    else:
        lines.append(ld["note"])
    sb = report.sync_bn
    lines += ["", "## Synchronised batch norm: 2 ranks x 4 against 1 rank x 8", ""]
    if "backend" in sb:
        lines += [
            f"{sb['how']}. float64, 3 Adam steps, G and D: largest difference of outputs, gradients, running "
            f"statistics and parameters **{sb['largest_difference']:.2e}** (tolerance {sb['tolerance']:.0e}): "
            f"**{'passed' if sb['passed'] else 'FAILED'}**.",
            "",
            "| quantity | largest absolute difference |",
            "|---|---|",
            *(f"| {k} | {v:.2e} |" for k, v in sb["max_abs_diff"].items()),
        ]
    else:
        lines.append(sb["note"])
    sc = report.sync_bn_cost
    lines += ["", "## Synchronised batch norm: cost of global, node and off", ""]
    if "step_ms" in sc:
        off = sc["step_ms"].get("off")
        lines += [
            f"{sc['how']}; batch {sc['batch_per_rank']} per rank, ms per training step (median of side-by-side "
            "rounds). Across nodes, node keeps the BN collectives inside each node (docs/performance.md).",
            "",
            "| dist.sync_bn | ms per step | vs off |",
            "|---|---|---|",
            *(
                f"| {k} | {v:.2f} | {v / off:.2f} |" if off else f"| {k} | {v:.2f} | - |"
                for k, v in sc["step_ms"].items()
            ),
        ]
    else:
        lines.append(sc["note"])
    sw = report.swd
    lines += [
        "",
        f"## Quality: SWD after {sw['steps']} steps, fp32 against bf16",
        "",
        f"The same model, seed and data trained by the real Trainer (no EMA), the SWD x1e3 of train.eval_every "
        f"on {sw['eval_num']} images; lower is better.",
        "",
        "| precision | SWD | training time |",
        "|---|---|---|",
    ]
    for precision in ("fp32", "bf16"):
        note = sw.get(f"{precision}_note", "")
        lines.append(
            f"| {precision} | {_num(sw.get(precision), '.2f')}{' ' + note if note else ''} | "
            f"{_num(sw.get(f'{precision}_seconds'), '.1f')} s |"
        )
    if "bf16_vs_fp32" in sw:
        lines += ["", f"bf16 / fp32: {sw['bf16_vs_fp32']:.3f}."]
    lines += _feeding_markdown(report.feeding)
    skipped = [f"- {r.name}: {r.note}" for r in report.steps if r.note.startswith(("skipped", "failed"))]
    lines += ["", "## Skipped or failed", "", *(skipped or ["Nothing."]), ""]
    return "\n".join(lines)


def _feeding_markdown(fd: dict) -> list[str]:
    size = f"{fd['image_size']}x{fd['image_size']}x{fd['channels']}"
    step = (
        f"the fastest step above ({fd['step']}: {fd['step_images_per_s']:.0f} images/s)"
        if "step" in fd
        else "no step (none ran)"
    )
    lines = [
        "",
        "## Feeding the step: loader processes, raw shards, the device cache",
        "",
        f"{fd['images']} synthetic faces ({size}) written as PNG and as raw shards; the loader alone in one process "
        "(`data.num_workers=0`), its uint8 batches as it hands them over (the step's process copies them to the "
        f"device; on CUDA the loader also pins each batch, one more copy, counted here), timed past its first "
        f"pass; processes needed: {step} over one process's images per CPU-second, rounded up (loader processes "
        "also pass their batches through shared memory, which this does not count).",
        "",
        "| data | loader images/s, one process | per CPU-second | loader processes to keep up |",
        "|---|---|---|---|",
    ]
    for fmt, name in (("png", "PNG shards"), ("raw", "raw shards")):
        row = fd.get(fmt, {})
        if "images_per_s" in row:
            lines.append(
                f"| {name} | {row['images_per_s']:.0f} | {row['per_cpu_s']:.0f} | {row.get('processes_needed', '-')} |"
            )
        else:
            lines.append(f"| {name} | - | - | - ({row.get('note', 'not run')}) |")
    cache = fd.get("cache", {})
    if "images_per_s" in cache:
        lines.append(
            f"| raw, `data.cache=device`, later passes (drawn on the device) | {cache['images_per_s']:.0f} | - | "
            "0 after the first pass |"
        )
        lines.append("")
        if "step_images_per_s" in cache:
            versus = (
                f" ({cache['step_vs_alone']:.2f} of the same step on one batch held on the device)"
                if cache.get("step_vs_alone")
                else ""
            )
            twin = f" ({cache['step_model']})" if "step_model" in cache else ""
            lines.append(
                f"{FAST_STEP}{twin}, trained from the device cache: **{cache['step_images_per_s']:.1f} images/s**"
                f"{versus}, "
                f"waiting for data {cache['step_data_wait_ms']:.2f} ms of each step."
            )
        else:
            lines.append(f"{FAST_STEP}, trained from the device cache: {cache.get('step_note', 'not run')}.")
    else:
        lines.append(f"| raw, `data.cache=device` | - | - | - ({cache.get('note', 'not run')}) |")
    return lines


class ReportWriteError(Exception):
    """The report was measured but its file could not be written (the OSError in `.error`)."""

    def __init__(self, error: OSError):
        super().__init__(str(error))
        self.error = error


def write_report(
    setting: Config,
    out: str,
    steps: int = 20,
    warmup: int = 5,
    compile: bool | str = "auto",
    swd_steps: int | None = None,
    command: str = "",
    feed_images: int = 4096,
) -> Report:
    """Run everything and write the Markdown report to `out` (setting: the report's model, batch, data;
    command: the command line, for the report's first line)."""
    if setting.train.num_threads:
        torch.set_num_threads(setting.train.num_threads)
    threads = torch.get_num_threads()
    device = pick_device(setting.train.device)
    cfg, speed = resolved(setting, device)
    use_compile = compile is True or (compile == "auto" and device.type == "cuda")
    swd_steps = swd_steps if swd_steps is not None else (600 if device.type == "cuda" else 200)
    cfg, shards = bench.labelled_data(cfg)
    m = cfg.model
    report = Report(machine=machine(device))
    report.setup = {
        "command": command or f"python -m dcgan_dist.bench --gpu-report {out}",
        "model": f"DCGAN {m.image_size}x{m.image_size}x{m.channels}, nz={m.nz}, ngf={m.ngf}, ndf={m.ndf}",
        "batch_size": cfg.train.batch_size,
        "steps": steps,
        "warmup": warmup,
        "device_type": device.type,
        "auto_resolves_to": speed.reason,
        "compile": use_compile,
        "flops_per_image": bench.step_flops_per_image(cfg),
        "minimal_flops_per_image": bench.step_flops_per_image(cfg, minimal=True),
        "peaks": {kind: bench.device_peak(device, kind, threads)[1] for kind in ("fp32", "bf16")},
    }
    say = print
    say(f"GPU report on {report.machine['device']}: {speed.reason}")
    started = time.perf_counter()
    flops = {"ours": report.setup["flops_per_image"], "minimal": report.setup["minimal_flops_per_image"]}
    report.steps = training_steps(cfg, device, shards, steps, warmup, use_compile, threads, flops)
    say(f"  training step rows: {time.perf_counter() - started:.0f} s")
    report.loader = loader_rate(cfg, device, shards, steps * 2, warmup)
    report.sync_bn = sync_bn_check(device)
    report.sync_bn_cost = sync_bn_cost(cfg, device)
    say(f"  loader and sync-BN check: {time.perf_counter() - started:.0f} s")
    report.swd = swd_after_training(cfg, shards, swd_steps)
    say(f"  SWD runs: {time.perf_counter() - started:.0f} s")
    report.feeding = feeding(cfg, device, report.steps, feed_images, steps * 2, warmup)
    say(f"  feeding rows: {time.perf_counter() - started:.0f} s")
    path = Path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(to_markdown(report))
    except OSError as exc:  # the report's own file, told apart from a failure while measuring
        raise ReportWriteError(exc) from exc
    say(f"wrote {path}")
    print(json.dumps(report.as_dict()))
    return report

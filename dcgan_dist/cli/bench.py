"""Measure training speed: the loader, the full training step, the scaling of N Ray workers; the GPU report.

    python -m dcgan_dist.bench --config debug bench.steps=20 bench.warmup=5 bench.baseline=true
    python -m dcgan_dist.bench --config default bench.measure=loader data.num_workers=2
    python -m dcgan_dist.bench --gpu-report docs/gpu-report.md --config default   # see gpu_report.py

Local launcher: data_images_per_s (shards -> normalised tensors on the device, the real loader; with
data.num_workers=0 also data_images_per_cpu_s, the same per CPU-second: the loader's cost per core) and
train_images_per_s (the real training step on batches from that loader: what the Trainer runs, without its
parts, in the precision and layout that train.precision/channels_last resolve to, printed first).
bench.baseline=true also times the minimal DCGAN loop of PyTorch's example on in-memory random tensors, always
fp32 and NCHW (the plain tutorial loop, whatever the settings say), side by side with the training step
(alternating steps, the median of each: see time_side_by_side), and reports the ratio.
MFU: the images/s times the FLOPs per image of one step (counted with
torch's FlopCounterMode over G and D forward and backward), over the device's peak: a data-sheet figure for
known GPUs (GPU_PEAK_TFLOPS), an estimate from cores x clock x FLOPs/cycle for a CPU.

Ray launcher (dist.launcher=ray, dist.num_workers=N): the same N Ray workers time, one after the other,
  c: rank 0 alone (1 worker; the others wait),
  a-nosync: N workers with DDP but per-worker batch norm,
  b: all N each running the identical step with no communication (the machine's contention ceiling),
  a: N workers training together (DDP gradient all-reduce + synchronised batch norm).
speedup = a/c and comm_efficiency = a/b, with the cost per step: compute and data wait (from b), gradient
all-reduce (a-nosync - b) and batch-norm synchronisation (a - a-nosync).

The last line printed is one JSON object with the figures, MFU, the device, batch size, widths and threads.
What is measured and for how long: the bench.* settings below; the model, batch, data, precision and launcher:
the training settings, as for dcgan_dist.train.
"""

from __future__ import annotations

import json
import sys

import torch

from dcgan_dist.cli import args as cli
from dcgan_dist.data import resolve_data
from dcgan_dist.distributed.env import DistEnv
from dcgan_dist.errors import RunError
from dcgan_dist.gan.precision import pick_device, resolved
from dcgan_dist.perf.bench import (
    MinimalLoop,
    TrainLoop,
    bench_ray,
    device_peak,
    format_mfu,
    measure_checkpoint,
    measure_data,
    mfu,
    step_flops_per_image,
    time_side_by_side,
)
from dcgan_dist.storage.filesystem import StoreError


def main(argv: list[str] | None = None) -> int:
    """The command; its failures end in one line like training's: bad data or an object store that stopped
    answering (RunError, exit 1), a bucket or keys that do not work (StoreError, exit 2)."""
    try:
        return _bench(argv)
    except RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


COMMAND = cli.Command(
    "python -m dcgan_dist.bench",
    __doc__,
    settings=["bench", "run", "data", "model", "train", "optim", "eval.num", "eval.nhoods_per_image", "dist"],
    moved={
        "--steps": "bench.steps=N",
        "--warmup": "bench.warmup=N",
        "--baseline": "bench.baseline=true",
        "--skip-data": "bench.measure=step",
        "--data-only": "bench.measure=loader",
        "--checkpoint": "bench.checkpoint=true",
        "--report-compile": "bench.report_compile=auto|true|false",
        "--report-swd-steps": "bench.report_swd_steps=N",
    },
)
COMMAND.parser.add_argument(
    "--gpu-report",
    metavar="FILE.md",
    type=cli.output_file,
    help="instead: the one-command report (fp32 loop to CUDA graphs, loader, MFU, sync-BN check, "
    "SWD fp32 vs bf16) written to FILE.md; see dcgan_dist/perf/gpu_report.py",
)


def _bench(argv: list[str] | None) -> int:
    parsed = COMMAND.parse(argv)
    if isinstance(parsed, int):
        return parsed
    args, setting, _ = parsed
    bench = setting.bench
    if args.gpu_report:
        from dcgan_dist.perf.gpu_report import ReportWriteError, write_report

        try:
            write_report(
                setting,
                args.gpu_report,
                steps=bench.steps,
                warmup=bench.warmup,
                compile=bench.report_compile,
                swd_steps=bench.report_swd_steps or None,
                command=" ".join(["python -m dcgan_dist.bench", *(sys.argv[1:] if argv is None else argv)]),
            )
        except ReportWriteError as exc:
            print(cli.write_error("--gpu-report", args.gpu_report, exc.error), file=sys.stderr)
            return 2
        return 0
    if setting.train.num_threads:
        torch.set_num_threads(setting.train.num_threads)
    threads = torch.get_num_threads()
    device = pick_device(setting.train.device if setting.dist.launcher == "local" else "cpu")
    cfg, speed = resolved(setting, device)  # for this process's device; Ray workers resolve for theirs
    print(f"Speed: {speed.reason}")
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
    shards = resolve_data(cfg.data, cfg.model)[0]
    env = DistEnv(device=device)
    rows = []  # (name, images/s, MFU as text)
    if bench.measure != "step":
        result["data_images_per_s"], per_cpu_s = measure_data(cfg, env, shards, bench.steps * 2, bench.warmup)
        rows.append(("loader alone (shards -> normalised tensors)", result["data_images_per_s"], ""))
        if cfg.data.num_workers == 0:  # else the loader's processes do the work, and their CPU time is not counted
            result["data_images_per_cpu_s"] = per_cpu_s
            rows.append(("loader alone, per CPU-second of this process", per_cpu_s, ""))
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

    print(f"\n{'':2}{'measurement':<56}{'images/s':>10}{'MFU':>10}")
    for name, value, mfu_text in rows:
        print(f"  {name:<56}{value:>10.1f}{mfu_text:>10}")
    if "vs_baseline" in result:
        print(f"  training step / minimal fp32 loop (side by side): {result['vs_baseline']:.3f}")
    if "flops_per_image" in result:
        print(
            f"  FLOPs per image and step (FlopCounterMode, G+D forward+backward): "
            f"{result['flops_per_image'] / 1e9:.3f} G"
            + (
                f"; minimal loop {result['baseline_flops_per_image'] / 1e9:.3f} G"
                if "baseline_flops_per_image" in result
                else ""
            )
        )
        print(
            f"  peak: {result['peak_flops'] / 1e12:.3f} TFLOP/s ({result['peak_source']})"
            if result["peak_flops"]
            else f"  peak: {result['peak_source']}"
        )
    if "checkpoint_write_s" in result:
        print(
            f"  checkpoint, {result['checkpoint_mib']:.1f} MiB to {cfg.run.dir}: {result['checkpoint_write_s']:.2f} s"
        )
    if "speedup" in result:
        print(f"  speedup a/c: {result['speedup']:.3f}   comm_efficiency a/b: {result['comm_efficiency']:.3f}")
        print("  per step: " + ", ".join(f"{k[:-2]} {v * 1000:.1f} ms" for k, v in result["step_breakdown"].items()))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Measure training speed: the loader, the full training step, the scaling of N Ray workers; the GPU report.

    python -m dcgan_dist.bench --config debug bench.steps=20 bench.warmup=5 bench.baseline=true
    python -m dcgan_dist.bench --config default bench.measure=loader data.num_workers=2
    python -m dcgan_dist.bench --gpu-report docs/gpu-report.md --config default   # see gpu_report.py

Local launcher: data_images_per_s (shards -> the uint8 batches the real loader hands over; with
data.num_workers=0 also data_images_per_cpu_s, the same per CPU-second: the loader's cost per core),
data_normalised_images_per_s (those batches on to normalised float tensors on the device) and
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

from dcgan_dist.cli import args as cli
from dcgan_dist.errors import RunError
from dcgan_dist.perf.bench import bench_table, run_bench
from dcgan_dist.storage.filesystem import StoreError


@cli.one_line_errors  # what the except clauses below leave: one line, its exit code (cli/args.py)
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
    settings=["bench", "run", "data", "model", "gan", "train", "optim", "eval.num", "eval.nhoods_per_image", "dist"],
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
                feed_images=bench.report_feed_images,
                command=" ".join(["python -m dcgan_dist.bench", *(sys.argv[1:] if argv is None else argv)]),
            )
        except ReportWriteError as exc:
            print(cli.write_error("--gpu-report", args.gpu_report, exc.error), file=sys.stderr)
            return 2
        return 0
    result, rows, run_dir = run_bench(setting, say=print)
    for line in bench_table(result, rows, run_dir):
        print(line)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

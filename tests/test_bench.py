"""The bench command runs and reports its figures as a JSON last line (no timing assertions: machines are noisy),
and its FLOP count is that of the training step."""

import json

import pytest
import torch
from torch import nn

from dcgan_dist.config import build_config
from dcgan_dist.gan.models import build_models
from dcgan_dist.gan.precision import resolve
from dcgan_dist.perf import bench

from .conftest import TINY, run_cli


def test_local_bench_with_baseline(tiny_shards):
    proc = run_cli(
        "-m",
        "dcgan_dist.bench",
        "--config",
        "debug",
        *(a for a in TINY if not a.startswith("wandb.")),  # bench logs nothing to W&B
        f"data.shards={tiny_shards}",
        "bench.steps=3",
        "bench.warmup=1",
        "bench.baseline=true",
        "bench.checkpoint=true",
        f"run.dir={tiny_shards.parent / 'bench'}",
        check=True,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in (
        "train_images_per_s",
        "data_images_per_s",
        "data_images_per_cpu_s",
        "baseline_images_per_s",
        "vs_baseline",
        "checkpoint_mib",
        "checkpoint_write_s",
        "flops_per_image",
        "baseline_flops_per_image",
        "mfu",
        "baseline_mfu",
    ):
        assert result[key] > 0, key
    assert result["batch_size"] == 16 and result["ngf"] == 8 and result["threads"] == 1
    assert result["device"].startswith("cpu")
    # "auto" is resolved, printed and reported; the baseline is the fp32 loop whatever the training step runs.
    speed = resolve("auto", "auto", torch.device("cpu"))
    assert result["precision_setting"] == "auto" and result["precision"] == speed.precision
    assert result["channels_last"] is speed.channels_last
    assert f"Speed: {speed.reason}" in proc.stdout
    assert "fp32" in result["baseline_peak_source"] and "estimate" in result["peak_source"]
    # The minimal loop also computes D's weight gradients in G's update, which our step leaves out.
    assert result["baseline_flops_per_image"] > result["flops_per_image"]


def _conv_flops(model: nn.Module, x: torch.Tensor) -> list[float]:
    """Forward FLOPs per image of each convolution (2 x multiply-adds), in order, from the layer shapes."""
    flops = []

    def hook(layer, inputs, output):
        w = layer.weight.shape  # Conv2d: out, in, k, k; ConvTranspose2d: in, out, k, k
        positions = (
            inputs[0].shape[2] * inputs[0].shape[3]
            if isinstance(layer, nn.ConvTranspose2d)
            else output.shape[2] * output.shape[3]
        )  # each input pixel scatters / each output pixel gathers
        flops.append(2.0 * w.numel() * positions)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    with torch.no_grad():
        model(x[:1])
    for h in handles:
        h.remove()
    return flops


@pytest.mark.parametrize("image_size, width", [(32, 8), (64, 4)])
def test_flop_count_is_forward_and_backward_of_the_training_step(image_size, width):
    """Every convolution's backward costs its forward once for the weight gradient and once for the input
    gradient. Our step: G forward, D forward three times (real, fake for D, fake for G), D's update computes
    weight and input gradients for two batches (no input gradient for D's first layer: its inputs need none),
    G's update the input gradients of D (frozen: no weight gradients) and weight and input gradients of G
    (none for z). So per image: G 3f - f_g1, D 8f - 2 f_d1; the minimal loop adds D's weight gradients once more."""
    cfg = build_config(
        "debug", [f"model.image_size={image_size}", f"model.ngf={width}", f"model.ndf={width}", "model.nz=16"]
    )
    G, D = build_models(cfg.model)
    g = _conv_flops(G, torch.randn(1, 16, 1, 1))
    d = _conv_flops(D, torch.randn(1, 3, image_size, image_size))
    ours = 3 * sum(g) - g[0] + 8 * sum(d) - 2 * d[0]
    assert bench.step_flops_per_image(cfg) == pytest.approx(ours, rel=1e-9)
    assert bench.step_flops_per_image(cfg, minimal=True) == pytest.approx(ours + sum(d), rel=1e-9)


def test_device_peaks():
    h100 = dict(bench.GPU_PEAK_TFLOPS)["H100"]
    assert h100["bf16"] > h100["tf32"] > h100["fp32"]
    assert "bf16" not in dict(bench.GPU_PEAK_TFLOPS)["T4"]  # no native bf16: no peak rather than a wrong one
    # Names are matched most specific first: "H100 PCIe" before "H100", "A10G" before "A10".
    names = [name for name, _ in bench.GPU_PEAK_TFLOPS]
    assert names.index("H100 PCIe") < names.index("H100") and names.index("A10G") < names.index("A10")
    assert bench.device_peak(torch.device("cpu"), "fp32", threads=2) == bench.cpu_peak(2, "fp32")
    assert bench.mfu(100.0, 1e9, 1e12) == pytest.approx(0.1) and bench.mfu(100.0, 1e9, None) is None


AVX512_BF16 = "processor\t: 0\ncpu MHz\t\t: 2000.000\nflags\t\t: fpu sse avx2 fma avx512f avx512_bf16\n"
AVX2 = "processor\t: 0\ncpu MHz\t\t: 3000.000\nflags\t\t: fpu sse avx2 fma\n"


@pytest.mark.parametrize(
    "cpuinfo, threads, precision, peak, unit",
    [
        (AVX512_BF16, 2, "fp32", 2 * 2.0e9 * 64, "64 fp32 FLOPs/cycle (AVX-512 2x16-lane FMA)"),
        (AVX512_BF16, 1, "bf16", 1 * 2.0e9 * 128, "128 bf16 FLOPs/cycle (AVX512-BF16 dot products, 2 units)"),
        (AVX2, 4, "fp32", 4 * 3.0e9 * 32, "32 fp32 FLOPs/cycle (AVX2 2x8-lane FMA)"),
        (AVX2, 4, "bf16", 4 * 3.0e9 * 32, "32 bf16 FLOPs/cycle (AVX2 2x8-lane FMA)"),  # no bf16 unit
        (AVX2.replace("cpu MHz\t\t: 3000.000\n", ""), 4, "fp32", None, "unknown (no clock or flags in /proc/cpuinfo)"),
        (None, 4, "fp32", None, "unknown (no clock or flags in /proc/cpuinfo)"),  # no /proc/cpuinfo at all
    ],
)
def test_cpu_peak_from_the_cpuinfo(monkeypatch, tmp_path, cpuinfo, threads, precision, peak, unit):
    """The CPU estimate from a given /proc/cpuinfo: threads x clock x FLOPs per cycle of its widest unit."""
    import pathlib

    from dcgan_dist.gan import precision as precision_lib

    fake = tmp_path / "cpuinfo"
    if cpuinfo is not None:
        fake.write_text(cpuinfo)
    for module in (bench, precision_lib):  # both read /proc/cpuinfo
        monkeypatch.setattr(
            module, "Path", lambda p, *rest: pathlib.Path(fake if str(p) == "/proc/cpuinfo" else p, *rest)
        )
    got, source = bench.cpu_peak(threads, precision)
    assert got == pytest.approx(peak) if peak is not None else got is None
    assert source.endswith(unit) if peak is not None else source == unit


def test_bench_can_time_the_loader_alone(tiny_shards):
    proc = run_cli(
        "-m",
        "dcgan_dist.bench",
        "--config",
        "debug",
        *(a for a in TINY if not a.startswith("wandb.")),  # bench logs nothing to W&B
        f"data.shards={tiny_shards}",
        "bench.steps=2",
        "bench.warmup=1",
        "bench.measure=loader",
        check=True,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["data_images_per_s"] > 0 and result["data_images_per_cpu_s"] > 0
    assert result["data_normalised_images_per_s"] > 0
    assert "train_images_per_s" not in result


def test_bench_of_a_conditional_model(tmp_path):
    """A conditional model's classes come from the shards, as in training; without labelled shards: one line, exit 2."""
    from .test_conditional import coloured_images, write_labelled

    images, labels = coloured_images(6)
    shards = write_labelled(tmp_path / "colours", images, labels)
    common = ["-m", "dcgan_dist.bench", "--config", "debug", *(a for a in TINY if not a.startswith("wandb."))]
    steps = ["bench.steps=2", "bench.warmup=1", "train.batch_size=6", f"run.dir={tmp_path / 'bench'}"]
    proc = run_cli(*common, "model.conditional=true", f"data.shards={shards}", *steps, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["train_images_per_s"] > 0 and result["flops_per_image"] > 0
    proc = run_cli("-m", "dcgan_dist.bench", "--config", "mnist", *steps)  # data.shards="": the unlabelled faces
    assert proc.returncode == 2 and "label" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1

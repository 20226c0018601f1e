"""What one training process needs in memory, estimated from the layer shapes before anything is allocated, against
what its device has free: a model or batch that cannot fit is refused in one line (ConfigError, exit 2) instead of
failing in an allocation after the run directory was made.

The estimate is what training surely holds at its peak, a lower bound (allocator overhead, the autocast weight
copies and backward's temporaries come on top):
- G and D's parameters in fp32 with their gradients and both Adam moments (16 bytes each), plus the EMA copy of G;
- the activations autograd keeps for backward, per image: G's forward, and D's forward twice (D's step holds D on
  the real and on the fake batch at once), in the autocast dtype (4 bytes in fp32, 2 in bf16/fp16);
- the batch itself: uint8 from the loader and the float copy the step reads;
- on the host, the loader's uint8 batches: 4 prefetched per loader process, plus the one being collected and its
  stacked copy;
- with train.eval_every, the SWD's images and descriptors (on the host).
Shapes come from running G and D on the "meta" device: the real modules, no memory.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from dcgan_dist.config import Config, ConfigError
from dcgan_dist.gan.models import build_models
from dcgan_dist.gan.quality import MIN_LEVEL_SIZE

GIB = 2**30


def _size(n: float) -> str:
    return f"{n / GIB:,.1f} GiB" if n >= GIB / 10 else f"{n / 2**20:,.0f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e6:,.2f}M" if n < 1e9 else f"{n:.3g}"


def _kept_activations(module: nn.Module, example: torch.Tensor) -> int:
    """Elements per image of the outputs of `module`'s layers on `example` (a batch of one, on the meta device);
    in-place activations reuse their input's memory and are not counted."""
    total = 0

    def count(layer, inputs, output) -> None:
        nonlocal total
        if not getattr(layer, "inplace", False):
            total += output.numel()

    handles = [m.register_forward_hook(count) for m in module.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            module(example)
    finally:
        for handle in handles:
            handle.remove()
    return total


def training_bytes(cfg: Config, precision: str) -> list[tuple[int, str, str]]:
    """What one training process needs at least, in parts: (bytes, what in words, the settings that size it).
    precision: fp32, bf16, fp16."""
    m = cfg.model
    try:
        with torch.device("meta"):
            G, D = build_models(replace(m, conditional=False))  # a conditional model's label inputs: negligible
            g_params = sum(p.numel() for p in G.parameters())
            d_params = sum(p.numel() for p in D.parameters())
            g_act = _kept_activations(G, torch.empty(1, m.nz, 1, 1))
            d_act = _kept_activations(D, torch.empty(1, m.channels, m.image_size, m.image_size))
    except (RuntimeError, OverflowError) as exc:  # sizes past what torch can describe
        raise ConfigError(
            f"model.ngf={m.ngf}, model.ndf={m.ndf}, model.nz={m.nz}: a model of that size cannot be "
            f"built ({str(exc).splitlines()[0][:120]})"
        ) from None
    ema = g_params * 4 if cfg.train.ema_decay > 0 else 0
    weights = (g_params + d_params) * 16 + ema
    per_image = (g_act + 2 * d_act) * (4 if precision == "fp32" else 2) + m.channels * m.image_size**2 * 5
    return [
        (
            weights,
            f"G {_count(g_params)} and D {_count(d_params)} parameters with Adam",
            f"model.ngf={m.ngf} model.ndf={m.ndf}",
        ),
        (
            per_image * cfg.train.batch_size,
            f"the activations of a batch of {cfg.train.batch_size}",
            f"train.batch_size={cfg.train.batch_size}",
        ),
    ]


def evaluation_bytes(cfg: Config) -> int:
    """Host memory of the in-training SWD (train.eval_every; rank 0): eval.num real (uint8) and generated (float)
    images, and both sets' 7x7 neighbourhood descriptors at every pyramid level, held until they are compared."""
    if not cfg.train.eval_every:
        return 0
    m, e = cfg.model, cfg.eval
    levels, size = 1, int(m.image_size)
    while size // 2 >= MIN_LEVEL_SIZE:
        levels, size = levels + 1, size // 2
    images = e.num * m.channels * m.image_size**2 * (1 + 4)
    return images + 2 * levels * e.num * e.nhoods_per_image * 7 * 7 * m.channels * 4


def _cgroup_free() -> int | None:
    """Bytes this process's cgroup (a container, a Kubernetes pod) may still allocate, when it has a limit."""
    # The usage counts the page cache (the shards just read, say), which the kernel reclaims before it kills:
    # the inactive file pages are subtracted, as the kubelet does for its own eviction decisions.
    for folder, limit_name, usage_name, cache_key in (
        ("/sys/fs/cgroup", "memory.max", "memory.current", "inactive_file"),  # cgroup v2
        ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
    ):  # v1
        try:
            limit = Path(folder, limit_name).read_text().strip()
            usage = int(Path(folder, usage_name).read_text().strip())
        except (OSError, ValueError):
            continue
        if not (limit.isdigit() and int(limit) < 2**60):  # "max" or v1's huge number: no limit
            continue
        try:
            stat = dict(line.split() for line in Path(folder, "memory.stat").read_text().splitlines() if " " in line)
            usage -= min(int(stat.get(cache_key, 0)), usage)
        except (OSError, ValueError):
            pass
        return max(int(limit) - usage, 0)
    return None


def available_bytes(device: torch.device) -> tuple[int, str] | None:
    """(bytes free for a new process on `device`, where that number comes from); None when it cannot be told."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return free, f"{torch.cuda.get_device_name(device)} has {_size(free)} free of {_size(total)}"
    if device.type != "cpu":
        return None
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        free = int(meminfo["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    where = f"this machine has {_size(free)} available"
    cgroup = _cgroup_free()
    if cgroup is not None and cgroup < free:
        free, where = cgroup, f"this container's memory limit leaves {_size(cgroup)}"
    return free, where


def loader_bytes(cfg: Config) -> int:
    """Host memory of the loader's uint8 batches: DataLoader prefetches 2 per loader process by default and pins
    or copies each (4 in all), plus the batch being collected and its stacked copy."""
    m = cfg.model
    return cfg.train.batch_size * m.channels * m.image_size**2 * (4 * cfg.data.num_workers + 2)


def check_memory(cfg: Config, device: torch.device, precision: str) -> None:
    """ConfigError when a training process of `cfg` cannot fit in what `device` (and the host) has free."""
    parts = training_bytes(cfg, precision)
    host = [
        (
            evaluation_bytes(cfg),
            "the SWD's images and descriptors",
            f"eval.num={cfg.eval.num} eval.nhoods_per_image={cfg.eval.nhoods_per_image}",
        ),
        (
            loader_bytes(cfg),
            "the loader's batches",
            f"train.batch_size={cfg.train.batch_size} data.num_workers={cfg.data.num_workers}",
        ),
    ]
    if device.type == "cpu":
        parts += host
    else:  # the evaluation's images and descriptors and the loader's batches are on the host
        _refuse_if_larger(host, torch.device("cpu"))
    _refuse_if_larger(parts, device)


def _refuse_if_larger(parts: list[tuple[int, str, str]], device: torch.device) -> None:
    need = sum(size for size, _, _ in parts)
    available = available_bytes(device)
    if available is None or need <= available[0]:
        return
    largest = max(parts)[2]
    what = ", ".join(f"{words}: {_size(size)}" for size, words, _ in parts if size)
    raise ConfigError(
        f"{largest}: training needs at least {_size(need)} on {device.type} ({what}) but "
        f"{available[1]}; lower {' or '.join(setting.split('=')[0] for setting in largest.split())}"
    )

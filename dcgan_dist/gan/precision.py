"""Which device a process trains on, in which precision (fp32, or autocast to bf16/fp16), in which memory layout.

`train.precision=auto` and `train.channels_last=auto` (the defaults) are resolved here, once, by `resolve`:

- precision: bf16 autocast where the device computes bf16 natively (CUDA devices whose
  `torch.cuda.is_bf16_supported(including_emulation=False)`, i.e. Ampere and newer; CPUs with AVX512-BF16 or
  AMX-BF16 that oneDNN uses), fp32 elsewhere (bf16 emulated in fp32 is slower than fp32 itself). Never fp16:
  it needs gradient scaling and has to be asked for.
- channels_last: NHWC where convolutions have fast NHWC kernels: CUDA devices with tensor cores (compute
  capability 7.0 and newer) and AVX-512 CPUs with oneDNN (mkldnn); the default NCHW elsewhere.

The result is a `Speed` with the concrete values and the reason, which the Trainer prints at start-up and
writes into the run's config.yaml and checkpoints (what was used, not "auto").
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dcgan_dist.config import ConfigError

if TYPE_CHECKING:
    from dcgan_dist.config import Config


def pick_device(setting: str) -> torch.device:
    """train.device for one process: auto (CUDA when there is one, else CPU), cpu or cuda."""
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            why = (
                f"this torch ({torch.__version__}) is built without CUDA"
                if torch.version.cuda is None
                else "no CUDA device is visible (driver, CUDA_VISIBLE_DEVICES)"
            )
            raise ConfigError(f"train.device=cuda but {why}; use train.device=auto or cpu")
        return torch.device("cuda")
    return torch.device("cpu")


def cpu_flags() -> set[str]:
    """The CPU feature flags the kernel reports (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def _onednn_bf16() -> bool:
    """oneDNN (mkldnn) is built in and says this CPU runs its bf16 kernels."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # an internal op: absent from some builds
        return False


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """(whether `device` computes bf16 natively, why in words)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        # including_emulation=False: pre-Ampere GPUs "support" bf16 by emulating it, slower than fp32.
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{name} computes bf16 natively"
        return False, f"{name} has no native bf16"
    if device.type == "cpu":
        native = sorted(cpu_flags() & {"avx512_bf16", "amx_bf16"})
        if not native:
            return False, "this CPU has neither AVX512-BF16 nor AMX-BF16"
        if not _onednn_bf16():
            return False, f"this CPU has {'/'.join(native)} but torch's oneDNN does not use it"
        return True, f"this CPU has {'/'.join(native)}"
    return False, f"device type {device.type} is not known to run bf16 fast"


def fast_channels_last(device: torch.device) -> tuple[bool, str]:
    """(whether convolutions are faster in NHWC on `device`, why)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 7:
            return True, f"tensor cores (compute capability {major}.{minor})"
        return False, f"no tensor cores (compute capability {major}.{minor})"
    if device.type == "cpu":
        # Measured faster on an AVX-512 CPU (docs/performance.md); other CPUs keep the layout nobody measured.
        if "avx512f" in cpu_flags() and torch.backends.mkldnn.is_available():
            return True, "oneDNN convolutions on an AVX-512 CPU"
        return False, "not measured faster on CPUs without AVX-512"
    return False, f"no NHWC convolution kernels known for {device.type}"


@dataclass(frozen=True)
class Speed:
    """The concrete precision and layout a process trains with, and why (one line for the start-up output)."""

    precision: str  # fp32, bf16, fp16
    channels_last: bool
    reason: str


def resolve(precision: str, channels_last: bool | str, device: torch.device) -> Speed:
    """train.precision and train.channels_last ("auto" or a concrete value) for `device`."""
    why = []
    if precision == "auto":
        fast, because = native_bf16(device)
        precision = "bf16" if fast else "fp32"
        why.append(f"precision=auto -> {precision} ({because})")
    else:
        why.append(f"precision={precision}")
    if channels_last == "auto":
        channels_last, because = fast_channels_last(device)
        why.append(f"channels_last=auto -> {str(channels_last).lower()} ({because})")
    else:
        why.append(f"channels_last={str(channels_last).lower()}")
    return Speed(precision, bool(channels_last), "; ".join(why))


def resolved(cfg, device: torch.device) -> tuple[Config, Speed]:
    """`cfg` (a Config) with train.precision and train.channels_last made concrete for `device`, and the Speed."""
    speed = resolve(cfg.train.precision, cfg.train.channels_last, device)
    return replace(cfg, train=replace(cfg.train, precision=speed.precision, channels_last=speed.channels_last)), speed


class Precision:
    """fp32, or autocast to bf16/fp16 (fp16 with one gradient scaler per network, checkpointed)."""

    DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

    def __init__(self, name: str = "fp32", device_type: str = "cpu"):
        if name not in self.DTYPES:
            raise ValueError(f"precision {name!r} is not resolved to one of {', '.join(self.DTYPES)} (see resolve())")
        self.name, self.device_type, self.dtype = name, device_type, self.DTYPES[name]
        self.scalers = None
        if name == "fp16":
            self.scalers = {"d": torch.amp.GradScaler(device_type), "g": torch.amp.GradScaler(device_type)}

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype) if self.dtype is not None else nullcontext()

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, which: str) -> None:
        if self.scalers is None:
            loss.backward()
            optimizer.step()
            return
        scaler = self.scalers[which]
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def state_dict(self) -> dict:
        # Only fp16 has state (its loss scales). A run resumed in another precision starts without it: a
        # checkpoint's fp16 scales are ignored under bf16/fp32, and fp16 after bf16/fp32 starts new scalers.
        return {k: v.state_dict() for k, v in (self.scalers or {}).items()}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            if self.scalers and k in self.scalers:
                self.scalers[k].load_state_dict(v)


FP32 = Precision()

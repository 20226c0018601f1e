"""Which device a process trains on, and in which precision: fp32, or autocast to bf16/fp16."""

from __future__ import annotations

from contextlib import nullcontext

import torch


def pick_device(setting: str) -> torch.device:
    """train.device for one process: auto (CUDA when there is one, else CPU), cpu or cuda."""
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is visible")
        return torch.device("cuda")
    return torch.device("cpu")


class Precision:
    """fp32, or autocast to bf16/fp16 (fp16 with one gradient scaler per network, checkpointed)."""

    DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

    def __init__(self, name: str = "fp32", device_type: str = "cpu"):
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
        return {k: v.state_dict() for k, v in (self.scalers or {}).items()}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            if self.scalers and k in self.scalers:
                self.scalers[k].load_state_dict(v)


FP32 = Precision()

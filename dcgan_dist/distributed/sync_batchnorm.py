"""Batch norm with statistics over the global batch of all workers, for CPU workers.

`torch.nn.SyncBatchNorm` runs only on CUDA (DDP refuses it on CPU modules), so for CPU/gloo workers this
module does the same job: in training mode each rank computes its per-channel count, mean and (biased)
variance, one all-gather shares them, and every rank combines them into the global mean and variance.
Combining means and variances with counts (Chan et al.) rather than raw sums and sums of squares keeps
float32 accurate when activations have a large mean. The backward pass is that of batch norm over the
global batch, with one more collective for two per-channel sums (as torch's SyncBatchNorm does on CUDA).
Running statistics are updated from the global values, hence identical on every rank. In eval mode it is
plain batch norm with the running statistics: no communication.

Every training-mode call is a collective: all ranks must call it the same number of times, in the same order.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .shm import active_transport


def _gather_rows(local: np.ndarray, group) -> np.ndarray:
    """[world, n]: every rank's `local` vector, in rank order. Through shared memory when the ranks share this
    host (see shm.py), else the process group's backend (gloo)."""
    shm = active_transport(group)
    if shm is not None:
        return shm.gather_rows(local)
    tensor = torch.from_numpy(local)
    rows = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, tensor, group=group)
    return torch.stack(rows).numpy()


def _global_stats(gathered: np.ndarray, channels: int) -> tuple[float, np.ndarray, np.ndarray]:
    """Global count, mean and biased variance from rows of (count, mean[C], variance[C]), one per rank."""
    counts, means, variances = gathered[:, :1], gathered[:, 1 : 1 + channels], gathered[:, 1 + channels :]
    total = counts.sum()
    mean = (counts * means).sum(0) / total
    var = (counts * (variances + (means - mean) ** 2)).sum(0) / total
    return float(total), mean, var


def _local_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance, in two passes (mean, then mean squared deviation: accurate for any
    mean). On CPU this is about twice as fast as torch's batch-norm statistics kernel for NCHW activations."""
    dims = [0] + list(range(2, x.dim()))
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).square_().mean(dims)
    return mean.flatten(), var


_NUMPY_DTYPE = {torch.float32: np.float32, torch.float64: np.float64}


class SyncBatchNormFunction(torch.autograd.Function):
    """Batch norm over the global batch with plain blocking collectives, for CPU workers.

    Forward: one all-gather of (count, mean, variance) per rank, combined with counts; the normalisation is
    torch's fused kernel with the global statistics. Backward: this rank's per-channel sums of dy and
    dy * x_hat (torch's batch-norm backward kernel, sums only), one all-gather of them, then
    dx = invstd * w * (dy - mean_global(dy) - x_hat * mean_global(dy * x_hat)) in two elementwise passes.
    The weight and bias gradients are this rank's sums; DDP averages them like any parameter gradient.
    The per-channel arithmetic between the kernels runs in NumPy: a few microseconds per call instead of
    tens for each small torch op, which added up to ~5 % of a CPU GAN step (26 calls).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, group):
        channels = x.shape[1]
        # Statistics in at least float32 (a count of 10^5 or a large mean would not survive in half precision).
        xs = x if x.dtype in (torch.float32, torch.float64) else x.float()
        mean_local, var_local = _local_stats(xs)
        local = np.empty(1 + 2 * channels, dtype=_NUMPY_DTYPE[xs.dtype])
        local[0], local[1 : 1 + channels], local[1 + channels :] = xs.numel() // channels, mean_local.numpy(), var_local.numpy()
        total, mean_np, var_np = _global_stats(_gather_rows(local, group), channels)
        mean, var = torch.from_numpy(mean_np), torch.from_numpy(var_np)
        y = F.batch_norm(xs, mean, var, weight, bias, False, 0.0, eps)  # torch's fused kernel, global statistics
        ctx.save_for_backward(xs, weight)
        ctx.mean, ctx.invstd = mean, torch.from_numpy(1.0 / np.sqrt(var_np + eps))  # NumPy-backed: .numpy() is free
        ctx.total, ctx.eps, ctx.group, ctx.in_dtype = total, eps, group, x.dtype
        unbiased = torch.from_numpy(var_np * (total / max(total - 1.0, 1.0)))
        ctx.mark_non_differentiable(mean, unbiased)
        return y.to(x.dtype), mean, unbiased

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        xs, weight = ctx.saved_tensors
        dy = dy.to(xs.dtype).contiguous()
        w = weight if weight is not None else torch.ones_like(ctx.mean)
        # This rank's per-channel sums of dy and dy * x_hat (x_hat with the global statistics): one pass.
        _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy, xs, w, None, None, ctx.mean, ctx.invstd, True, ctx.eps, [False, True, True]
        )
        # Summed over ranks via an all-gather: for small tensors gloo's all-gather is about twice as fast as its
        # all-reduce, and summing the rows in rank order gives every rank the same bits.
        channels = sum_dy.shape[0]
        sums = _gather_rows(np.concatenate([sum_dy.numpy(), sum_dy_xhat.numpy()]), ctx.group).sum(0)
        mean_dy, mean_dy_xhat = sums[:channels] / ctx.total, sums[channels:] / ctx.total
        # dx = invstd * w * (dy - mean(dy) - x_hat * mean(dy * x_hat)), means over the global batch, written
        # per channel as dy * scale + x * coef_x + offset (x_hat = (x - mean) * invstd): two passes.
        invstd = ctx.invstd.numpy()
        scale = invstd * w.detach().numpy()
        coef_x = -scale * mean_dy_xhat * invstd
        offset = -scale * mean_dy - coef_x * ctx.mean.numpy()
        shape = [1, -1] + [1] * (xs.dim() - 2)
        dx = torch.addcmul(torch.from_numpy(offset).view(shape), xs, torch.from_numpy(coef_x).view(shape))
        dx.addcmul_(dy, torch.from_numpy(scale).view(shape))
        if weight is None:
            return dx.to(ctx.in_dtype), None, None, None, None
        return dx.to(ctx.in_dtype), sum_dy_xhat, sum_dy, None, None


class CrossProcessBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Drop-in for BatchNorm{1,2,3}d whose training statistics span all ranks of `process_group`."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _group_size(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training or self._group_size() == 1:
            return F.batch_norm(
                x,
                self.running_mean if not self.training or self.track_running_stats else None,
                self.running_var if not self.training or self.track_running_stats else None,
                self.weight, self.bias, self.training or not self.track_running_stats,
                self.momentum if self.momentum is not None else 0.0, self.eps,
            )
        if x.device.type != "cpu":
            raise RuntimeError(f"CrossProcessBatchNorm synchronises CPU workers; for {x.device.type} tensors use "
                               f"torch.nn.SyncBatchNorm (convert_sync_batchnorm(module, '{x.device.type}') picks it)")
        group = self.process_group or dist.group.WORLD
        out, mean, unbiased_var = SyncBatchNormFunction.apply(x, self.weight, self.bias, self.eps, group)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), momentum)
        return out


def convert_sync_batchnorm(module: nn.Module, device_type: str = "cpu", process_group=None) -> nn.Module:
    """Replace every BatchNorm layer with a synchronised one, keeping parameters and running stats.

    CUDA: torch's own `nn.SyncBatchNorm`. Other devices (CPU/gloo): `CrossProcessBatchNorm`.
    """
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    converted = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CrossProcessBatchNorm):
        converted = CrossProcessBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats, process_group
        )
        if module.affine:
            with torch.no_grad():
                converted.weight = module.weight
                converted.bias = module.bias
        if module.track_running_stats:
            converted.running_mean = module.running_mean
            converted.running_var = module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
    for name, child in module.named_children():
        converted.add_module(name, convert_sync_batchnorm(child, device_type, process_group))
    return converted

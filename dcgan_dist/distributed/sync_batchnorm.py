"""Batch norm with statistics over the global batch of all workers, for CPU workers.

`torch.nn.SyncBatchNorm` runs only on CUDA (DDP refuses it on CPU modules), so for CPU/gloo workers this
module does the same job with the process group's collectives: in training mode each rank computes its
per-channel count, mean and (biased) variance, one all-gather shares them, and every rank combines them into
the global mean and variance. Combining means and variances with counts (Chan et al.) rather than raw sums and
sums of squares keeps float32 accurate when activations have a large mean. The backward pass is that of batch
norm over the global batch, with one all-reduce of two per-channel sums (as torch's SyncBatchNorm does on
CUDA). Running statistics are updated from the global values, hence identical on every rank. In eval mode it
is plain batch norm with the running statistics: no communication.

Every training-mode call is a collective: all ranks must call it the same number of times, in the same order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


def _channel_dims(x: torch.Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def _per_channel(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-channel vector shaped to broadcast against x (N x C x ...)."""
    return t.view([1, -1] + [1] * (x.dim() - 2))


class SyncBatchNormFunction(torch.autograd.Function):
    """Batch norm over the global batch: forward all-gathers (count, mean, variance) per rank, backward
    all-reduces the per-channel sums of dy and dy * x_hat. The weight and bias gradients are this rank's sums;
    DDP averages them like any parameter gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, group):
        # Statistics in at least float32 (a count of 10^5 or a large mean would not survive in half precision).
        xs = x if x.dtype in (torch.float32, torch.float64) else x.float()
        dims = _channel_dims(xs)
        mean_local = xs.mean(dims)
        var_local = (xs - _per_channel(mean_local, xs)).square().mean(dims)  # two passes: accurate for any mean
        count = torch.full((1,), xs.numel() // xs.shape[1], dtype=xs.dtype)
        rows = [torch.empty(1 + 2 * xs.shape[1], dtype=xs.dtype) for _ in range(dist.get_world_size(group))]
        dist.all_gather(rows, torch.cat([count, mean_local, var_local]), group=group)
        gathered = torch.stack(rows)
        counts, means, variances = gathered[:, :1], gathered[:, 1 : 1 + xs.shape[1]], gathered[:, 1 + xs.shape[1] :]
        total = counts.sum()
        mean = (counts * means).sum(0) / total
        var = (counts * (variances + (means - mean) ** 2)).sum(0) / total
        invstd = torch.rsqrt(var + eps)
        y = F.batch_norm(xs, mean, var, weight, bias, False, 0.0, eps)  # torch's kernel with the global statistics
        ctx.save_for_backward(xs, weight, mean, invstd)
        ctx.total, ctx.group, ctx.in_dtype = total, group, x.dtype
        unbiased = var * (total / (total - 1).clamp_min(1))
        ctx.mark_non_differentiable(mean, unbiased)
        return y.to(x.dtype), mean, unbiased

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _dmean, _dvar):
        xs, weight, mean, invstd = ctx.saved_tensors
        dy = dy.to(xs.dtype)
        dims = _channel_dims(xs)
        x_hat = (xs - _per_channel(mean, xs)) * _per_channel(invstd, xs)
        sum_dy, sum_dy_xhat = dy.sum(dims), (dy * x_hat).sum(dims)
        sums = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(sums, group=ctx.group)
        mean_dy, mean_dy_xhat = sums.chunk(2)
        mean_dy, mean_dy_xhat = mean_dy / ctx.total, mean_dy_xhat / ctx.total
        # dx = w * invstd * (dy - mean(dy) - x_hat * mean(dy * x_hat)), means over the global batch.
        scale = invstd if weight is None else invstd * weight
        dx = _per_channel(scale, xs) * (dy - _per_channel(mean_dy, xs) - x_hat * _per_channel(mean_dy_xhat, xs))
        if weight is None:
            return dx.to(ctx.in_dtype), None, None, None, None
        return dx.to(ctx.in_dtype), sum_dy_xhat, sum_dy, None, None


class CrossProcessBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Drop-in for BatchNorm{1,2,3}d whose training statistics span all ranks of `process_group`."""

    def __init__(
        self,
        num_features,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        process_group=None,
        device=None,
        dtype=None,
    ):
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
                self.weight,
                self.bias,
                self.training or not self.track_running_stats,
                self.momentum if self.momentum is not None else 0.0,
                self.eps,
            )
        if x.device.type != "cpu":
            raise RuntimeError(
                f"CrossProcessBatchNorm synchronises CPU workers; for {x.device.type} tensors use "
                f"torch.nn.SyncBatchNorm (convert_sync_batchnorm(module, '{x.device.type}') picks it)"
            )
        group = self.process_group or dist.group.WORLD
        out, mean, unbiased_var = SyncBatchNormFunction.apply(x, self.weight, self.bias, self.eps, group)
        if self.track_running_stats:
            # Buffers that exist whenever track_running_stats is set (torch types them as optional).
            count, running_mean, running_var = self.num_batches_tracked, self.running_mean, self.running_var
            assert count is not None and running_mean is not None and running_var is not None
            with torch.no_grad():
                count.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(count)
                running_mean.lerp_(mean.to(running_mean.dtype), momentum)
                running_var.lerp_(unbiased_var.to(running_var.dtype), momentum)
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

"""Batch norm with statistics over the global batch of all workers, on any device.

`torch.nn.SyncBatchNorm` runs only on CUDA (DDP refuses it on CPU modules), so for CPU/gloo workers this
module does the same job: in training mode each rank computes its per-channel count, mean and (biased)
variance, one differentiable all-gather shares them, and every rank combines them into the global mean and
variance. Combining means and variances with counts (Chan et al.) rather than raw sums and sums of squares
keeps float32 accurate when activations have a large mean. The all-gather's backward (an all-reduce of the
gradient with respect to the gathered statistics, each rank keeping its own row) returns every rank's
gradient contribution to the statistics' owners, so the backward pass is that of batch
norm over the global batch. Running statistics are updated from the global values, hence identical on
every rank. In eval mode it is plain batch norm with the running statistics: no communication.

Every training-mode call is a collective: all ranks must call it the same number of times, in the same order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class AllGatherRows(torch.autograd.Function):
    """Differentiable all-gather of one small vector per rank -> [world, n].

    Plain blocking collectives (all supported by gloo and NCCL); the gradient of rank r's row is the sum over
    ranks of their gradients for that row.
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor, group) -> torch.Tensor:
        ctx.group, ctx.rank = group, dist.get_rank(group)
        rows = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(rows, local.contiguous(), group=group)
        return torch.stack(rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank], None


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
        world = self._group_size()
        if not self.training or world == 1:
            return F.batch_norm(
                x,
                self.running_mean if not self.training or self.track_running_stats else None,
                self.running_var if not self.training or self.track_running_stats else None,
                self.weight, self.bias, self.training or not self.track_running_stats,
                self.momentum if self.momentum is not None else 0.0, self.eps,
            )

        channels = x.shape[1]
        reduce_dims = [0, *range(2, x.dim())]
        count = x.numel() // channels
        # Statistics in at least float32 (a count of 10^5 or a large mean would not survive in half precision).
        stats_x = x if x.dtype in (torch.float32, torch.float64) else x.float()
        var_local, mean_local = torch.var_mean(stats_x, dim=reduce_dims, correction=0)
        local = torch.cat([stats_x.new_full((1,), float(count)), mean_local, var_local])  # [1 + 2C]
        gathered = AllGatherRows.apply(local, self.process_group)  # [world, 1 + 2C]
        counts, means, vars_ = gathered[:, :1], gathered[:, 1 : 1 + channels], gathered[:, 1 + channels :]
        total = counts.sum()
        mean = (counts * means).sum(0) / total
        var = (counts * (vars_ + (means - mean) ** 2)).sum(0) / total  # biased, over the global batch

        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (total / (total - 1).clamp(min=1))
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), momentum)

        shape = [1, channels] + [1] * (x.dim() - 2)
        out = (stats_x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)


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

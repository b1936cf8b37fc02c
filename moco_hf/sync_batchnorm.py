"""BatchNorm synchronised across processes: MoCo v3 normalises over the global batch ("BN synced across devices",
as in SimCLR and BYOL), in the heads and, for ResNets, in the backbone.

`convert_sync_batchnorm(model, device)` is what `pretrain.py` applies when several processes train a model without a
queue. On CUDA it is timm's converter (torch's `nn.SyncBatchNorm`, and timm's `SyncBatchNormAct` for its
`BatchNormAct2d`, whose activation torch's converter would drop). torch's `SyncBatchNorm` refuses CPU tensors, so on
CPU (gloo: tests, CPU runs) the plain BatchNorms become [`CPUSyncBatchNorm`]: the same statistics from differentiable
all-reduces. State-dict keys and values do not change either way; a saved model loads as plain BatchNorm.
"""

from __future__ import annotations

import timm.layers
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import nn


class CPUSyncBatchNorm(nn.SyncBatchNorm):
    """`nn.SyncBatchNorm` for CPU processes (gloo), where torch's only runs on GPUs.

    In train mode with several processes: mean and biased variance over every process's batch (two all-reduces of
    per-channel sums, in fp32 or wider), the output normalised with them, the running statistics updated with the
    global mean and unbiased variance, as `nn.SyncBatchNorm`. The all-reduces are differentiable
    (`torch.distributed.nn.functional.all_reduce`: backward all-reduces the gradients), so each process's input gets
    the gradient of the sum of all processes' losses through the shared statistics, as from torch's SyncBatchNorm
    backward. Otherwise it is plain `F.batch_norm`. Every process must call it the same number of times, in the
    same order (as any collective).
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        factor = 0.0
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        group = self.process_group or dist.group.WORLD
        synced = self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
        if not synced:
            batch_stats = self.training or self.running_mean is None
            track = not self.training or self.track_running_stats
            return F.batch_norm(input, self.running_mean if track else None, self.running_var if track else None,
                                self.weight, self.bias, batch_stats, factor, self.eps)

        channels = input.shape[1]
        shape = [1, channels] + [1] * (input.dim() - 2)  # broadcasts a per-channel value over N x C x ...
        dims = [0, *range(2, input.dim())]
        x = input.to(torch.promote_types(input.dtype, torch.float32))
        count = torch.tensor([x.numel() // channels], dtype=x.dtype, device=x.device)
        dist.all_reduce(count, group=group)  # values per channel over all processes
        mean = dist_fn.all_reduce(x.sum(dims), group=group) / count  # C
        centered = x - mean.view(shape)
        var = dist_fn.all_reduce(centered.square().sum(dims), group=group) / count  # C, biased
        out = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                unbiased = var * (count / (count - 1))
                self.running_mean.mul_(1 - factor).add_(mean.detach().to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        return out.to(input.dtype)


def _convert_cpu(module: nn.Module) -> nn.Module:
    """Every `nn.BatchNorm1d/2d/3d` of `module` as a [`CPUSyncBatchNorm`] sharing its tensors (same state dict)."""
    if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        converted = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                     module.track_running_stats, device="meta")
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        converted.running_mean, converted.running_var = module.running_mean, module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        return converted.train(module.training)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CPUSyncBatchNorm):
        raise ValueError(
            f"{type(module).__name__} cannot be synchronised across CPU processes (only plain BatchNorm can); train "
            "this backbone on GPUs, or in one process"
        )
    for name, child in module.named_children():
        module.add_module(name, _convert_cpu(child))
    return module


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` with every BatchNorm synchronised across the processes of the default group: timm's converter on
    accelerators, [`CPUSyncBatchNorm`] on CPU. Returns the module (a new one if `module` itself is a BatchNorm)."""
    if device.type == "cpu":
        return _convert_cpu(module)
    return timm.layers.convert_sync_batchnorm(module)


__all__ = ["CPUSyncBatchNorm", "convert_sync_batchnorm"]

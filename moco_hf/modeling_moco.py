"""MoCo: Momentum Contrast for unsupervised visual representation learning.

He et al., 2019, "Momentum Contrast for Unsupervised Visual Representation Learning" (MoCo v1),
Chen et al., 2020, "Improved Baselines with Momentum Contrastive Learning" (MoCo v2) and Chen, Xie and He, 2021,
"An Empirical Study of Training Self-Supervised Vision Transformers" (MoCo v3: no queue, a prediction head), over
any timm backbone.

This file depends only on torch, timm and transformers (plus the configuration file beside it), so
`save_pretrained` can ship it with the weights for `trust_remote_code=True` loading.
"""

import functools
import inspect
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.utils import ModelOutput

from .configuration_moco import MoCoConfig


@dataclass
class MoCoModelOutput(ModelOutput):
    """Output of [`MoCoModel`].

    Args:
        loss: InfoNCE loss (train mode with a key view, or any mode when `key_pixel_values` is given); without a
            queue, MoCo v3's `ctr` (see `labels`).
        logits: `[q.k+, q.queue] / tau`, N x (1+K), the positive in column 0 (fp32). With the symmetric
            loss, the two directions are stacked: 2N x (1+K). Without a queue (MoCo v3), `q k^T / tau` against the
            keys of the global batch, N x (world * N), the positive in column `labels`; 2N x (world * N) symmetric.
        last_hidden_state: the query backbone's unpooled features (`forward_features`).
        pooler_output: the query backbone's pooled features, N x num_features.
        query_embeddings: L2-normalised query projections q, N x embed_dim.
        key_embeddings: L2-normalised keys k of this process's batch, N x embed_dim (no gradient).
        hidden_states: with `output_hidden_states`, the query backbone's intermediate features, from timm's
            `forward_intermediates`: per stage for CNNs (N x C_i x H_i x W_i; for ResNets the stem, then each of the 4
            stages), per block for ViTs (N x L x D tokens, prefix tokens first, as in `last_hidden_state`).
        attentions: with `output_attentions`, the softmax weights of each attention block of the query backbone,
            N x heads x L x L (backbones with timm's attention modules: ViT, DeiT, ...).
        labels: without a queue (MoCo v3), the column of each row's positive key in `logits`: rank x N + i for row
            i of process `rank` ("labels offset by rank", as every process holds the whole key batch). None with a
            queue, where the positive is column 0.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    query_embeddings: torch.FloatTensor | None = None
    key_embeddings: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    labels: torch.LongTensor | None = None


# What every folder written by `save_pretrained` maps, so that each Auto class loads it with `trust_remote_code=True`
# (the code files are copied beside config.json).
AUTO_MAP = {
    "AutoConfig": "configuration_moco.MoCoConfig",
    "AutoModel": "modeling_moco.MoCoModel",
    "AutoModelForImageClassification": "modeling_moco.MoCoForImageClassification",
}


# ---------------------------------------------------------------------------------------------------------
# Pure pieces of the algorithm, each unit-tested on its own.
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def momentum_update(key_params: list[torch.Tensor], query_params: list[torch.Tensor], momentum: float) -> None:
    """theta_k <- m * theta_k + (1 - m) * theta_q, as one fused multi-tensor op (no per-parameter loop)."""
    if momentum == 1.0:
        return
    torch._foreach_lerp_(key_params, query_params, 1.0 - momentum)


@torch.no_grad()
def enqueue(queue: torch.Tensor, queue_ptr: torch.Tensor, keys: torch.Tensor) -> None:
    """Write `keys` into the FIFO `queue` at `queue_ptr`, wrapping around its end, and advance the pointer.

    Everything stays on the device: no `.item()`, so no host synchronisation.
    queue: K x C, queue_ptr: (1,) long, keys: n x C with n <= K.
    """
    n, size = keys.shape[0], queue.shape[0]
    if n > size:
        raise ValueError(
            f"cannot enqueue {n} keys into a queue of {size}: queue_size must be at least the global batch size"
        )
    index = (queue_ptr + torch.arange(n, device=queue.device)) % size  # n
    queue.index_copy_(0, index, keys.to(queue.dtype))
    queue_ptr.copy_((queue_ptr + n) % size)


def info_nce_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float) -> torch.Tensor:
    """Logits [q.k+, q.queue] / tau with the positive in column 0, computed in fp32 (or wider: a float64 model keeps
    float64).

    q: N x C (with grad), k: N x C (no grad), queue: K x C; all L2-normalised. Returns N x (1+K).
    """
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(device_type=q.device.type, enabled=False):
        q = q.to(dtype)
        l_pos = (q * k.to(dtype)).sum(dim=1, keepdim=True)  # N x 1
        l_neg = q @ _snapshot(queue).to(dtype).T  # N x K
        return torch.cat([l_pos, l_neg], dim=1) / tau  # N x (1+K)


@torch.compiler.disable
def _snapshot(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of the queue for autograd to keep: the queue is updated in place later in the same step.

    Taken outside any compiled graph: inside one, inductor's partitioner drops the clone and re-reads the queue in
    the backward pass, after the enqueue has overwritten it, which silently gives wrong gradients
    (pytorch/pytorch#197039).
    """
    return tensor.detach().clone()


def info_nce_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with the positive key at index 0 of every row."""
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, labels)


def in_batch_logits(q: torch.Tensor, keys: torch.Tensor, tau: float) -> torch.Tensor:
    """MoCo v3's logits `q k^T / tau` against the keys of the global batch, computed in fp32 (or wider: a float64
    model keeps float64).

    q: N x C (with grad), keys: M x C (no grad; M = world x N, every process's keys in rank order); both
    L2-normalised. Returns N x M.
    """
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(device_type=q.device.type, enabled=False):
        return q.to(dtype) @ keys.to(dtype).T / tau  # N x M


def in_batch_labels(n: int, rank: int, device: torch.device) -> torch.Tensor:
    """The column of each query's positive key: rank x n + i for query i of process `rank`, whose keys sit at rows
    rank x n .. rank x n + n - 1 of the gathered key batch."""
    return torch.arange(n, device=device) + rank * n  # n


def ctr_loss(logits: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """MoCo v3's contrastive loss, `ctr(q, k) = 2 tau * CrossEntropy(q k^T / tau, labels)` (Algorithm 1): the factor
    2 tau makes the loss scale less sensitive to tau. logits: N x M (`in_batch_logits`), labels: N."""
    return 2 * tau * F.cross_entropy(logits, labels)


def sincos_position_embedding(grid_size: tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """MoCo v3's fixed 2-D sin-cos position embedding of a grid of patches: (H*W) x dim, the patch at row y and column
    x getting [sin(y w), cos(y w), sin(x w), cos(x w)] with w_i = temperature^(-i / (dim / 4)), i < dim / 4 (timm's
    `build_sincos2d_pos_embed` with the sines and cosines of each coordinate side by side)."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    return timm.layers.build_sincos2d_pos_embed(list(grid_size), dim, temperature, interleave_sin_cos=True)


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every process along dim 0 (rank order). No gradient flows back."""
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


# ---------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------


def _split_batch_norm_ops(
    input: torch.Tensor, num_splits: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split batch norm as plain autograd ops, the formulation used under `torch.compile` (Inductor fuses it).
    Returns (output in the input's dtype and memory format, per-split mean, per-split biased var: g x 1 x C x 1 x 1)."""
    n, g = input.shape[0], num_splits
    # A view also for channels_last inputs; statistics in fp32 under autocast, as the fused kernels do.
    x = input.unflatten(0, (g, n // g)).to(torch.promote_types(input.dtype, torch.float32))  # g x N/g x C x H x W
    var, mean = torch.var_mean(x, dim=(1, 3, 4), correction=0, keepdim=True)  # g x 1 x C x 1 x 1
    scale = torch.rsqrt(var + eps)  # g x 1 x C x 1 x 1
    if weight is not None:
        scale = scale * weight.view(1, 1, -1, 1, 1)
    shift = -mean * scale if bias is None else bias.view(1, 1, -1, 1, 1) - mean * scale
    # (x - mean) / sqrt(var + eps) * weight + bias, as one pass over x: x * scale + shift.
    output = torch.addcmul(shift, x, scale).flatten(0, 1)  # N x C x H x W, in the input's memory format
    return output.to(input.dtype), mean, var


class _SplitBatchNormFn(torch.autograd.Function):
    """Split batch norm with a hand-written backward, for eager mode: saves for backward only the input in its own
    dtype, the fp32 per-split mean and invstd (g x C) and the weight, as `nn.BatchNorm2d` does, where the plain ops of
    [`_split_batch_norm_ops`] make autograd keep an fp32 copy of the input (and more) under bf16 autocast.
    Returns (output: N x C x H x W in the input's dtype and memory format, mean, var); mean and var are not
    differentiable. The output is written into a tensor of its own, not a view: a following in-place op (timm's
    `ReLU(inplace=True)`) then stays a plain in-place op for autograd."""

    @staticmethod
    def forward(ctx, input, weight, bias, num_splits: int, eps: float):
        n, g = input.shape[0], num_splits
        # fp32 (or wider) statistics; the upcast copy is freed when forward returns.
        x = input.unflatten(0, (g, n // g)).to(torch.promote_types(input.dtype, torch.float32))  # g x N/g x C x H x W
        var, mean = torch.var_mean(x, dim=(1, 3, 4), correction=0, keepdim=True)  # g x 1 x C x 1 x 1
        invstd = torch.rsqrt(var + eps)  # g x 1 x C x 1 x 1
        scale = invstd if weight is None else invstd * weight.view(1, 1, -1, 1, 1)
        shift = -mean * scale if bias is None else bias.view(1, 1, -1, 1, 1) - mean * scale
        output = torch.empty_like(input)  # N x C x H x W, the input's dtype and memory format
        torch.addcmul(shift, x, scale, out=output.unflatten(0, (g, n // g)))  # fp32 maths, cast on store
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.num_splits, ctx.bias_dtype = g, None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, var)
        return output, mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output, _grad_mean, _grad_var):
        input, weight, mean, invstd = ctx.saved_tensors
        n, g = input.shape[0], ctx.num_splits
        dtype = mean.dtype
        # fp32 temporaries, updated in place where possible (they are input-sized)
        xhat = (input.unflatten(0, (g, n // g)).to(dtype) - mean).mul_(invstd)  # g x N/g x C x H x W
        dout = grad_output.unflatten(0, (g, n // g)).to(dtype)  # g x N/g x C x H x W
        sum_dout = dout.sum(dim=(1, 3, 4), keepdim=True)  # g x 1 x C x 1 x 1
        sum_dout_xhat = (dout * xhat).sum(dim=(1, 3, 4), keepdim=True)  # g x 1 x C x 1 x 1

        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # With dy = dout * weight: invstd * (dy - mean_split(dy) - xhat * mean_split(dy * xhat)), per split.
            per_split = xhat.shape[1] * xhat.shape[3] * xhat.shape[4]  # values per channel in one split
            scale = invstd if weight is None else invstd * weight.view(1, 1, -1, 1, 1)  # g x 1 x C x 1 x 1
            grad = (dout - sum_dout / per_split).sub_(xhat.mul_(sum_dout_xhat / per_split)).mul_(scale)
            grad_input = grad.flatten(0, 1).to(input.dtype)  # N x C x H x W
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = sum_dout_xhat.sum(0).view(-1).to(weight.dtype)  # C
        if ctx.needs_input_grad[2]:
            grad_bias = sum_dout.sum(0).view(-1).to(ctx.bias_dtype)  # C
        return grad_input, grad_weight, grad_bias, None, None


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that normalises each of `num_splits` equal chunks of the batch with that chunk's own statistics,
    in one pass over the batch: what `num_splits` GPUs with a chunk each would compute.

    The official MoCo CIFAR-10 demo's `SplitBatchNorm` "simulate[s] multi-gpu behavior of BatchNorm in one gpu" this
    way. As there, each chunk updates its own copy of the running statistics with the momentum and the copies are
    averaged: running = (1 - m) * running + m * mean over chunks of the chunk's statistic (its unbiased variance
    for `running_var`); `num_batches_tracked` counts forward passes, and `momentum=None` is the cumulative average,
    as in `nn.BatchNorm2d`. The chunks are contiguous, as `x.chunk(num_splits)` (the demo interleaves them; the same
    up to a permutation of the batch).

    Splits in train mode (or without running statistics) while `num_splits` > 1; otherwise it is exactly
    `nn.BatchNorm2d`, so in eval mode it uses the running statistics of the whole module. Parameters, buffers and
    state-dict keys are those of `nn.BatchNorm2d`.

    In eager mode the split path is an autograd Function with its own backward, for memory: autograd then keeps only
    the input in its own dtype and fp32 per-split mean and invstd, as `nn.BatchNorm2d`, not an fp32 copy of each
    bf16 input (twice its bytes) and other intermediates. Under `torch.compile` it is plain ops, which Inductor fuses.
    """

    def __init__(self, num_features: int, num_splits: int = 1, **kwargs):
        super().__init__(num_features, **kwargs)
        if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
            raise ValueError(f"num_splits must be a positive integer, got {num_splits!r}")
        self.num_splits = num_splits

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        batch_stats = self.training or self.running_mean is None
        if self.num_splits == 1 or not batch_stats:
            return super().forward(input)
        self._check_input_dim(input)
        n, g = input.shape[0], self.num_splits
        if n % g:
            raise ValueError(f"split BatchNorm: the batch N={n} must be divisible by bn_splits={g}")
        per_split = n // g * input.shape[2] * input.shape[3]  # values per channel in one split
        if per_split == 1:
            raise ValueError(
                f"split BatchNorm needs more than 1 value per channel in each split, got input {tuple(input.shape)} "
                f"in {g} splits"
            )

        if torch.compiler.is_compiling():
            output, mean, var = _split_batch_norm_ops(input, g, self.weight, self.bias, self.eps)
        else:
            output, mean, var = _SplitBatchNormFn.apply(input, self.weight, self.bias, g, self.eps)

        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            # Cumulative average with momentum=None (a tensor, so no host synchronisation).
            factor = 1.0 / self.num_batches_tracked if self.momentum is None else self.momentum
            split_var = var.detach() * (per_split / (per_split - 1))  # unbiased, as BatchNorm's running_var
            self.running_mean.mul_(1 - factor).add_(mean.detach().mean(0).view(-1) * factor)
            self.running_var.mul_(1 - factor).add_(split_var.mean(0).view(-1) * factor)
        return output


def convert_split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every `nn.BatchNorm2d` in `module` (exactly that type: not subclasses such as timm's `BatchNormAct2d`)
    by a [`SplitBatchNorm2d`] with `num_splits` that shares its parameters and buffers, in the manner of
    `nn.SyncBatchNorm.convert_sync_batchnorm`. State-dict keys and values do not change. Returns the module (a new one
    if `module` itself is an `nn.BatchNorm2d`)."""
    if type(module) is nn.BatchNorm2d:
        converted = SplitBatchNorm2d(
            module.num_features,
            num_splits,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
            device="meta",  # replaced just below by the module's own tensors
        )
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        converted.running_mean, converted.running_var = module.running_mean, module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        if hasattr(module, "qconfig"):
            converted.qconfig = module.qconfig
        return converted
    for name, child in module.named_children():
        module.add_module(name, convert_split_batchnorm(child, num_splits))
    return module


def _splits_in_one_pass(module: nn.Module) -> bool:
    """Whether every BatchNorm of `module` is a plain `nn.BatchNorm2d` (or already split), so that per-split
    statistics need only [`SplitBatchNorm2d`]."""
    return all(
        type(m) in (nn.BatchNorm2d, SplitBatchNorm2d)
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    )


def _mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, batchnorm: bool, last_bn: bool) -> nn.Sequential:
    """`num_layers` linear layers with ReLU between them; with `batchnorm`, a BatchNorm before each ReLU and the
    linear layers without bias (the BatchNorm after each makes it redundant), and with `last_bn` a BatchNorm without
    affine parameters after the last layer. Module indices: linear, [BN,] ReLU, linear, ..., [BN]."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        last = i == num_layers - 1
        layers.append(nn.Linear(in_dim if i == 0 else hidden_dim, out_dim if last else hidden_dim, bias=not batchnorm))
        if not last:
            if batchnorm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
        elif last_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


class MoCoProjectionHead(nn.Module):
    """Projection from pooled backbone features to the contrastive embedding space.

    v1: "The output of the last layer is a 128-D vector ... from a fc layer" (single linear layer).
    v2: "we replace the fc head in MoCo with a 2-layer MLP head (hidden layer 2048-d, with ReLU)".
    v3 (`num_layers` 3 for ViTs, 2 for ResNet-50; `batchnorm`): "The projection head is a 3-layer MLP ... The hidden
    layers of both MLPs are 4096-d and are with ReLU; the output layers of both MLPs are 256-d, without ReLU. In MoCo
    v3, all layers in both MLPs have BN, following SimCLR" (the last one's without affine parameters, as released).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None, mlp: bool = True,
                 num_layers: int = 2, batchnorm: bool = False):
        super().__init__()
        if mlp:
            self.layers = _mlp(in_dim, hidden_dim or in_dim, out_dim, num_layers, batchnorm, last_bn=batchnorm)
        else:
            self.layers = nn.Sequential(nn.Linear(in_dim, out_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)  # N x out_dim


class MoCoPredictionHead(nn.Module):
    """MoCo v3's prediction head, on the query side only: "f_q, a backbone, a projection head and an extra prediction
    head" where "f_k ... has the backbone and projection head, but not the prediction head". "The prediction head is
    a 2-layer MLP": linear (no bias), BN, ReLU, linear (no bias), dim -> hidden_dim -> dim; `last_bn` adds a
    BatchNorm without affine parameters at the end (the released ViTs have it, the released ResNet-50s do not).
    """

    def __init__(self, dim: int, hidden_dim: int, last_bn: bool = False):
        super().__init__()
        self.layers = _mlp(dim, hidden_dim, dim, 2, batchnorm=True, last_bn=last_bn)

    def forward(self, projections: torch.Tensor) -> torch.Tensor:
        return self.layers(projections)  # N x dim


def create_backbone(config: MoCoConfig) -> nn.Module:
    """The timm model named by the config, without classifier: `model(x)` returns pooled features."""
    return timm.create_model(config.backbone, pretrained=False, num_classes=0, **(config.backbone_kwargs or {}))


def _check_vit_settings(backbone: nn.Module, config: MoCoConfig) -> None:
    """`freeze_patch_embed` and `sincos_pos_embed` need a ViT's patch embedding (and position embedding over its
    patch grid): a clear error for other backbones."""
    patch_embed = getattr(backbone, "patch_embed", None)
    if config.freeze_patch_embed and not isinstance(getattr(patch_embed, "proj", None), nn.Module):
        raise ValueError(
            f"freeze_patch_embed=True needs a backbone with a patch projection (timm's patch_embed.proj, as in "
            f"vit_*); {config.backbone!r} has none: set freeze_patch_embed=False"
        )
    if config.sincos_pos_embed:
        pos_embed, grid = getattr(backbone, "pos_embed", None), getattr(patch_embed, "grid_size", None)
        prefix = 0 if getattr(backbone, "no_embed_class", False) else getattr(backbone, "num_prefix_tokens", 0)
        if not isinstance(pos_embed, torch.Tensor) or grid is None or pos_embed.shape[-2] != prefix + math.prod(grid):
            raise ValueError(
                f"sincos_pos_embed=True needs a ViT whose pos_embed covers its patch grid (timm's vit_*); "
                f"{config.backbone!r} has none: set sincos_pos_embed=False"
            )


@torch.no_grad()
def _fill_sincos_pos_embed(backbone: nn.Module) -> None:
    """Write the fixed 2-D sin-cos position embedding into a timm ViT's `pos_embed` (zeros for the class token), as
    MoCo v3's ViTs. Tensors on the meta device (inside `from_pretrained`) are left for the checkpoint to fill."""
    pos_embed = backbone.pos_embed  # 1 x (prefix + H*W) x D
    if pos_embed.device.type == "meta":
        return
    patches = sincos_position_embedding(tuple(backbone.patch_embed.grid_size), pos_embed.shape[-1])  # H*W x D
    prefix = pos_embed.shape[-2] - patches.shape[0]
    values = torch.cat([patches.new_zeros(prefix, patches.shape[1]), patches])  # (prefix + H*W) x D
    pos_embed.copy_(values.view_as(pos_embed))


def _mark_initialised(module: nn.Module) -> None:
    """Flag tensors that already hold their intended values so transformers' init leaves them alone.

    timm initialises its models in their constructors; transformers' `post_init` would otherwise overwrite that
    with its generic scheme. On the meta device (inside `from_pretrained`) nothing is flagged, so tensors that the
    checkpoint does not provide still get initialised by `_init_weights`.
    """
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.device.type != "meta":
            tensor._is_hf_initialized = True


# ---------------------------------------------------------------------------------------------------------
# Hidden states, attentions and gradient checkpointing of a timm backbone
# ---------------------------------------------------------------------------------------------------------


def _intermediates_kwargs(backbone: nn.Module) -> dict | None:
    """Keyword arguments of timm's `forward_intermediates` that give hidden states as transformers' models do, or None
    where the backbone has no `forward_intermediates`: feature maps for CNNs (timm's default, NCHW), tokens for models
    with prefix tokens (ViTs: `output_fmt="NLC"`, with the class token)."""
    forward_intermediates = getattr(backbone, "forward_intermediates", None)
    if forward_intermediates is None:
        return None
    params = inspect.signature(forward_intermediates).parameters
    if "return_prefix_tokens" in params and "output_fmt" in params:
        return {"output_fmt": "NLC", "return_prefix_tokens": True}
    return {}


def _attention_modules(backbone: nn.Module) -> list[nn.Module]:
    """timm's attention modules that can give their weights: a `fused_attn` switch, and off it the softmax weights
    pass through the `attn_drop` dropout (timm's `Attention`: ViT, DeiT, ...)."""
    return [m for m in backbone.modules() if hasattr(m, "fused_attn") and isinstance(getattr(m, "attn_drop", None), nn.Dropout)]


@contextmanager
def _recorded_attentions(modules: list[nn.Module]) -> Iterator[list[torch.Tensor]]:
    """Within the block, `modules` run their unfused path (`fused_attn = False`: scaled_dot_product_attention returns
    no weights) and the list yielded collects each one's softmax weights (after attention dropout, as transformers'
    models return them), N x heads x L x L, in call order."""
    weights = []
    fused = [m.fused_attn for m in modules]
    handles = [m.attn_drop.register_forward_hook(lambda _m, _i, out: weights.append(out)) for m in modules]
    try:
        for m in modules:
            m.fused_attn = False
        yield weights
    finally:
        for m, was_fused in zip(modules, fused):
            m.fused_attn = was_fused
        for handle in handles:
            handle.remove()


class _BackwardMark(torch.autograd.Function):
    """The identity on `tensors`, whose backward first calls `hook()`: marks a point of the backward pass."""

    @staticmethod
    def forward(ctx, hook: Callable[[], None], *tensors: torch.Tensor):
        ctx.hook = hook
        ctx.set_materialize_grads(False)
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        ctx.hook()
        return (None, *grads)


@torch.compiler.disable
def _mark_backward(hook: Callable[[], None], *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`tensors` as they are, with `hook()` called in the backward pass when their gradients arrive. Outside compiled
    graphs, whose backward would not run a Python hook."""
    return _BackwardMark.apply(hook, *tensors)


def _check_checkpoint_options(gradient_checkpointing_func: Callable, every_n_layers: int) -> None:
    """timm's blocks call `torch.utils.checkpoint.checkpoint` themselves, at every block, with timm's `use_reentrant`
    (`timm.layers.set_reentrant_ckpt`, default False): transformers' options for it cannot be applied, so they are an
    error rather than ignored."""
    use_reentrant = timm.layers.use_reentrant_ckpt()
    if every_n_layers != 1:
        raise ValueError(
            f"every_n_layers={every_n_layers}: timm checkpoints every block of the backbone; use every_n_layers=1"
        )
    func = gradient_checkpointing_func
    plain = func is torch_checkpoint
    partial = isinstance(func, functools.partial) and func.func is torch_checkpoint and not func.args
    if not (plain or (partial and func.keywords in ({}, {"use_reentrant": use_reentrant}))):
        raise ValueError(
            "timm's backbone calls torch.utils.checkpoint itself (use_reentrant="
            f"{use_reentrant}, set by timm.layers.set_reentrant_ckpt), so activation_checkpointing_kwargs other than "
            f"{{'use_reentrant': {use_reentrant}}} and offload=True cannot be applied; enable it without them"
        )


# ---------------------------------------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------------------------------------


class MoCoBackbone(nn.Module):
    """A timm backbone (`.backbone`, without classifier): the query encoder of [`MoCoForImageClassification`], and the
    base of [`MoCoEncoder`] (which adds the projection head), laid out alike so checkpoint keys match.

    `forward(pixel_values)` returns (features: `forward_features`, pooled: N x num_features, hidden_states or None,
    attentions or None); see [`MoCoModelOutput`] for the hidden states and attentions.

    Gradient checkpointing (`gradient_checkpointing`, set through the model's `gradient_checkpointing_enable()`) is
    timm's `set_grad_checkpointing`: timm recomputes each block's forward in the backward pass. For a BatchNorm in
    train mode that recomputation would update the running statistics a second time, and a split BatchNorm would run
    with the split count of that moment rather than the forward's. So in train mode the backbone's backward is
    bracketed: a mark on its outputs, reached before any recomputation, sets the split count of the forward; one on its
    input, reached after the last recomputation, sets the running statistics back to what the last forward left and
    the split count back to 1. Gradients are those of the run without checkpointing, and so are the statistics. (The
    input mark makes the first layer compute a gradient for its input as well, e.g. N x 3 x H x W; only where the
    backbone has BatchNorms.)
    """

    def __init__(self, config: MoCoConfig):
        super().__init__()
        self.backbone = create_backbone(config)
        _mark_initialised(self.backbone)
        self.backbone_name = config.backbone
        _check_vit_settings(self.backbone, config)
        if config.sincos_pos_embed:
            _fill_sincos_pos_embed(self.backbone)
        self.split_bn = False
        self.gradient_checkpointing = False
        self._intermediates = _intermediates_kwargs(self.backbone)
        self._bn_state: list[torch.Tensor] | None = None  # running statistics as the last forward left them

    def __call__(self, *args, **kwargs):
        """`nn.Module.__call__`; with gradient checkpointing in train mode, then keeps the BatchNorm running statistics
        that the call left, for the backward pass to restore after timm's recomputation."""
        if not (self.gradient_checkpointing and self.training and self._batch_norms()):
            return super().__call__(*args, **kwargs)
        try:
            return super().__call__(*args, **kwargs)
        finally:
            self._bn_state = [t.detach().clone() for t in self._bn_buffers()]

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | list[int] = False,
                output_attentions: bool = False):
        features, hidden_states, attentions = self._run_backbone(pixel_values, 1, output_hidden_states, output_attentions)
        pooled = self.backbone.forward_head(features, pre_logits=True)  # N x num_features
        return features, pooled, hidden_states, attentions

    # -- the backbone's forward -----------------------------------------------------------------------------

    def _run_backbone(self, pixel_values: torch.Tensor, splits: int, output_hidden_states: bool | list[int],
                      output_attentions: bool):
        """(features, hidden_states or None, attentions or None) of the backbone, bracketed for the backward pass
        under gradient checkpointing (see the class docstring)."""
        recomputed = self.gradient_checkpointing and torch.is_grad_enabled()
        if output_attentions and recomputed:
            raise ValueError(
                "output_attentions=True with gradient checkpointing in a forward that records gradients: timm would "
                "recompute the blocks with fused attention, which gives no weights; call it under torch.no_grad() or "
                "after gradient_checkpointing_disable()"
            )
        bracket = recomputed and self.training and bool(self._batch_norms())
        if bracket:
            # A leaf that requires grad, so the mark's backward runs even where pixel_values needs no gradient.
            anchor = torch.empty(0, device=pixel_values.device, requires_grad=True)
            pixel_values, _ = _mark_backward(self._after_recomputation, pixel_values, anchor)
        features, hidden_states, attentions = self._backbone_features(
            pixel_values, output_hidden_states, output_attentions
        )
        if bracket and self.split_bn and splits > 1:
            features, *hidden = _mark_backward(functools.partial(self._set_bn_splits, splits), features,
                                               *(hidden_states or ()))
            hidden_states = tuple(hidden) if hidden_states is not None else None
        return features, hidden_states, attentions

    def _backbone_features(self, pixel_values: torch.Tensor, output_hidden_states: bool | list[int],
                           output_attentions: bool):
        if output_attentions:
            modules = _attention_modules(self.backbone)
            if not modules:
                raise ValueError(
                    f"output_attentions=True: backbone {self.backbone_name!r} has no attention blocks that give their "
                    "weights (timm's Attention, as in vit_* and deit_*); use such a backbone, or "
                    "output_hidden_states=True for the features of each stage"
                )
            with _recorded_attentions(modules) as weights:
                features, hidden_states, _ = self._backbone_features(pixel_values, output_hidden_states, False)
            return features, hidden_states, tuple(weights)
        if not output_hidden_states:
            return self.backbone.forward_features(pixel_values), None, None
        if self._intermediates is None:
            raise ValueError(
                f"output_hidden_states=True needs timm's forward_intermediates, which backbone {self.backbone_name!r} "
                "does not have; use a backbone that has it (ResNets, ConvNeXts, ViTs, ...) or output_hidden_states=False"
            )
        kwargs = dict(self._intermediates)
        if not isinstance(output_hidden_states, bool):  # indices of the stages or blocks, as timm's `indices`
            kwargs["indices"] = list(output_hidden_states)
        features, intermediates = self.backbone.forward_intermediates(pixel_values, **kwargs)
        # Token models give (tokens, prefix tokens) per block: N x L x D with the prefix first, as forward_features.
        hidden_states = tuple(torch.cat([h[1], h[0]], dim=1) if isinstance(h, tuple) else h for h in intermediates)
        return features, hidden_states, None

    # -- BatchNorm state ------------------------------------------------------------------------------------

    def _batch_norms(self) -> list[nn.modules.batchnorm._BatchNorm]:
        """The backbone's BatchNorms with running statistics, found once."""
        if getattr(self, "_batch_norm_cache", None) is None:
            self._batch_norm_cache = [
                m
                for m in self.backbone.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None
            ]
        return self._batch_norm_cache

    def _bn_buffers(self) -> list[torch.Tensor]:
        return [t for m in self._batch_norms() for t in (m.running_mean, m.running_var, m.num_batches_tracked)]

    def _split_bns(self) -> list[SplitBatchNorm2d]:
        """The split BatchNorms, found once (this runs twice per encoder call)."""
        if getattr(self, "_split_bn_cache", None) is None:
            self._split_bn_cache = [m for m in self.modules() if isinstance(m, SplitBatchNorm2d)]
        return self._split_bn_cache

    def _set_bn_splits(self, splits: int) -> None:
        for module in self._split_bns():
            module.num_splits = splits

    @torch.no_grad()
    def _after_recomputation(self) -> None:
        """Undo what timm's recomputation did to the BatchNorms: running statistics back to the last forward's.

        Written through `.data`, as BatchNorm's own update, which leaves autograd's version counters alone: a
        BatchNorm whose backward is still to run (another forward of this encoder in the same step) saved its running
        statistics for backward, and a version change would fail that backward (in train mode it does not read
        their values)."""
        self._set_bn_splits(1)
        if self._bn_state is not None:
            torch._foreach_copy_([t.data for t in self._bn_buffers()], self._bn_state)


class MoCoEncoder(MoCoBackbone):
    """f_q or f_k: timm backbone (`.backbone`) followed by the projection head (`.head`).

    `forward(pixel_values)` returns the unnormalised projection, N x embed_dim; `forward_all` also the backbone's
    unpooled and pooled features, its hidden states and attentions (None unless asked for).

    Split BatchNorm (`config.bn_splits` > 1): when every BatchNorm of the encoder is a plain `nn.BatchNorm2d`, they
    become [`SplitBatchNorm2d`] (same parameters, buffers and state-dict keys; `split_bn` is then `True`), and a call
    with `splits` > 1 runs the encoder once on the whole batch, each BatchNorm normalising every chunk with its own
    statistics. Otherwise (timm's `BatchNormAct2d`, `BatchNorm1d`, ...) the encoder runs once per chunk, as the
    fallback.
    """

    def __init__(self, config: MoCoConfig):
        super().__init__(config)
        self.head = MoCoProjectionHead(
            self.backbone.num_features, config.embed_dim, config.mlp_hidden_dim, mlp=config.mlp_head,
            num_layers=config.mlp_layers, batchnorm=config.mlp_bn,
        )
        # At rest the split BatchNorms have one split (plain BatchNorm); `__call__` sets `splits` for one call.
        self.split_bn = config.bn_splits > 1 and _splits_in_one_pass(self)
        if self.split_bn:
            convert_split_batchnorm(self, 1)

    def __call__(self, pixel_values: torch.Tensor, splits: int = 1, *args, **kwargs):
        """`nn.Module.__call__` with the split BatchNorms set to `splits` for this call only.

        Set here, outside `forward`, so that `encoder.compile()` traces a forward that only reads the split count:
        one graph per split count, no graph break on the attribute writes. The encoder's modules outside a call
        (`get_backbone()`) behave as plain BatchNorm."""
        if not self.split_bn:
            return super().__call__(pixel_values, splits, *args, **kwargs)
        self._set_bn_splits(splits)
        try:
            return super().__call__(pixel_values, splits, *args, **kwargs)
        finally:
            self._set_bn_splits(1)

    def forward_all(self, pixel_values: torch.Tensor, splits: int = 1, output_hidden_states: bool | list[int] = False,
                    output_attentions: bool = False):
        """(unpooled features, pooled features, projection, hidden states, attentions). `splits` > 1: in train mode
        BatchNorm normalises each of that many chunks of the batch on its own, as it would on that many devices.

        Goes through `__call__`, so hooks and `encoder.compile()` apply to it as to `encoder(x)`."""
        return self(pixel_values, splits, True, output_hidden_states, output_attentions)

    def forward(self, pixel_values: torch.Tensor, splits: int = 1, return_features: bool = False,
                output_hidden_states: bool | list[int] = False, output_attentions: bool = False):
        if splits > 1 and not self.split_bn and pixel_values.shape[0] > 1:
            parts = [self._encode(chunk, 1, output_hidden_states, output_attentions) for chunk in pixel_values.chunk(splits)]
            outputs = tuple(_cat_batches(field) for field in zip(*parts))
        else:
            outputs = self._encode(pixel_values, splits, output_hidden_states, output_attentions)
        return outputs if return_features else outputs[2]

    def _encode(self, pixel_values: torch.Tensor, splits: int, output_hidden_states: bool | list[int],
                output_attentions: bool):
        features, hidden_states, attentions = self._run_backbone(
            pixel_values, splits, output_hidden_states, output_attentions
        )
        pooled = self.backbone.forward_head(features, pre_logits=True)  # N x num_features
        return features, pooled, self.head(pooled), hidden_states, attentions  # ..., N x embed_dim, ...


def _cat_batches(parts: tuple):
    """The per-chunk values of one output joined along the batch: tensors, tuples of tensors, or None."""
    if parts[0] is None:
        return None
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(chunks, dim=0) for chunks in zip(*parts))
    return torch.cat(parts, dim=0)


class MoCoPreTrainedModel(PreTrainedModel):
    """Common plumbing of [`MoCoModel`] and [`MoCoForImageClassification`].

    - `save_pretrained` writes the code files and the complete `auto_map` ([`AUTO_MAP`]): either Auto class loads
      the folder with `trust_remote_code=True`, without moco_hf installed.
    - Gradient checkpointing of the query encoder's backbone (timm's `set_grad_checkpointing`) through transformers'
      `activation_checkpointing_enable()` (or its alias `gradient_checkpointing_enable()`, deprecated in transformers
      5), or `MoCoConfig(gradient_checkpointing=True)` at construction. The key encoder never is: it runs without
      gradients. Not saved: transformers treats it as a setting of the run.
    - `device_map`: "auto" keeps each encoder whole (`_no_split_modules`: a timm block split across devices would
      add tensors of two devices). A map of your own names `query_encoder`, `key_encoder` and the buffers `queue` and
      `queue_ptr` (accelerate warns that these two are not submodules; they are placed all the same). The training
      step needs all of them on one device.
    """

    config_class = MoCoConfig
    base_model_prefix = "moco"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["MoCoEncoder", "MoCoBackbone"]
    # The losses are means over the batch, not sums for transformers' Trainer to divide by `num_items_in_batch`.
    accepts_loss_kwargs = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Initialise only what is not already set, through transformers' guarded helpers.

        Layers get PyTorch's default initialisation (the official MoCo head uses it); timm backbones built
        outside `from_pretrained` keep timm's own initialisation (see `_mark_initialised`); tensors loaded from
        a checkpoint are never touched.
        """
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                fan_in = module.weight[0].numel()
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
            if getattr(module, "weight", None) is not None:
                init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
            if getattr(module, "running_mean", None) is not None:
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif not isinstance(module, MoCoPreTrainedModel):
            # Loose parameters of a backbone (ViT class token, position embeddings, layer scales, ...).
            for param in module.parameters(recurse=False):
                init.trunc_normal_(param, std=0.02)
        if hasattr(module, "init_non_persistent_buffers"):
            module.init_non_persistent_buffers()

    def _freeze(self) -> None:
        """Turn off gradients of the parameters that are never trained (overridden by subclasses)."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, then re-freeze: transformers re-creates every loaded parameter with
        `requires_grad=True`, which would hand the key encoder (or a frozen backbone) to optimisers and to DDP."""
        loaded = super().from_pretrained(*args, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded)._freeze()
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, with the complete `auto_map` in config.json (transformers maps only the
        class being saved), so `AutoModel` and `AutoModelForImageClassification` both load the folder with
        `trust_remote_code=True`."""
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **AUTO_MAP}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _set_gradient_checkpointing(
        self, enable: bool = True, gradient_checkpointing_func: Callable = torch_checkpoint, every_n_layers: int = 1
    ) -> None:
        """Gradient checkpointing of the query encoder's backbone, by timm's `set_grad_checkpointing` (timm calls
        `torch.utils.checkpoint` at each block; see [`MoCoBackbone`] for what keeps BatchNorm exact). Called by
        transformers' `activation_checkpointing_enable()` / `_disable()`."""
        if enable:
            _check_checkpoint_options(gradient_checkpointing_func, every_n_layers)
        encoder = self.query_encoder
        try:
            encoder.backbone.set_grad_checkpointing(enable)
        except (AssertionError, NotImplementedError) as e:
            raise ValueError(
                f"backbone {self.config.backbone!r} does not support gradient checkpointing in timm ({e}); "
                "train it without gradient checkpointing"
            ) from e
        encoder.gradient_checkpointing = enable

    def _output_options(
        self, output_hidden_states: bool | list[int] | None, output_attentions: bool | None, return_dict: bool | None
    ) -> tuple[bool | list[int], bool, bool]:
        """The forward's options, the config's where not given (as transformers' models)."""
        config = self.config
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        return_dict = config.return_dict if return_dict is None else return_dict
        if not isinstance(output_hidden_states, (bool, list, tuple)) or (
            isinstance(output_hidden_states, (list, tuple)) and not all(isinstance(i, int) for i in output_hidden_states)
        ):
            raise ValueError(
                f"output_hidden_states must be a bool or a list of stage/block indices, got {output_hidden_states!r}"
            )
        return output_hidden_states, bool(output_attentions), return_dict is not False


class MoCoModel(MoCoPreTrainedModel):
    """MoCo pretraining model: query encoder, momentum key encoder and queue of negative keys (v1, v2), or query
    encoder with a prediction head and momentum key encoder, without a queue (v3).

    In train mode with both views, `forward` is one step of Algorithm 1 of the paper: momentum update of the key
    encoder, keys (no gradient, shuffled BN), logits [q.k+, q.queue]/tau, InfoNCE loss, enqueue of the keys.
    With `queue_size=0` it is one step of MoCo v3's Algorithm 1: momentum update, each view through the query
    encoder and the prediction head in its own forward (BatchNorm statistics per view), then through the key
    encoder, keys gathered from every process, `ctr(q1, k2) + ctr(q2, k1)` (`symmetric=True`; `ctr(q1, k2)`
    otherwise). In eval mode it changes no state. With only `pixel_values` it encodes the queries: no momentum update,
    no enqueue (in train mode the query encoder's BatchNorm running statistics still move, as in any forward).
    """

    _keys_to_ignore_on_load_missing = [r"^key_encoder\.", r"^queue$", r"^queue_ptr$"]
    _auto_class = "AutoModel"  # save_pretrained copies the code files (see AUTO_MAP)

    def __init__(self, config: MoCoConfig):
        super().__init__(config)
        self.query_encoder = MoCoEncoder(config)
        self.key_encoder = MoCoEncoder(config)
        if config.predictor_hidden_dim:
            self.predictor = MoCoPredictionHead(config.embed_dim, config.predictor_hidden_dim, config.predictor_last_bn)
        else:
            self.predictor = None
        self._freeze()
        if config.queue_size:
            self.register_buffer("queue", torch.empty(config.queue_size, config.embed_dim))  # K x C, rows unit norm
            self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        else:  # MoCo v3: the negatives are the batch's keys; nothing in the state dict
            self.queue = self.queue_ptr = None
        self.post_init()
        self._copy_query_to_key()

    # -- state ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _copy_query_to_key(self) -> None:
        """f_k starts as a copy of f_q."""
        key_state = self.key_encoder.state_dict(keep_vars=True)
        for name, tensor in self.query_encoder.state_dict(keep_vars=True).items():
            if tensor.device.type != "meta":
                key_state[name].copy_(tensor)

    def _freeze(self) -> None:
        """The key encoder never gets gradients; with MoCo v3's ViT settings neither do the query backbone's patch
        projection (`freeze_patch_embed`) and position embedding (`sincos_pos_embed`)."""
        self.key_encoder.requires_grad_(False)
        backbone = self.query_encoder.backbone
        if self.config.freeze_patch_embed:
            backbone.patch_embed.proj.requires_grad_(False)
        if self.config.sincos_pos_embed:
            backbone.pos_embed.requires_grad_(False)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Reached for the model itself only while the queue or its pointer still needs values (fresh model, or a
        # checkpoint without them): transformers skips custom-code modules whose own tensors are all loaded.
        super()._init_weights(module)
        if module is self and self.queue is not None:
            queue = torch.randn(self.queue.shape, device=self.queue.device, dtype=torch.float32)
            init.copy_(self.queue, F.normalize(queue, dim=1).to(self.queue.dtype))
            init.zeros_(self.queue_ptr)

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """transformers' initialisation of everything not yet set, then: a key encoder that the checkpoint does not
        provide (e.g. a cleaned release) restarts as a copy of the query encoder, as at the start of training."""
        key_tensors = self.key_encoder.state_dict(keep_vars=True).values()
        key_given = any(getattr(t, "_is_hf_initialized", False) for t in key_tensors)
        super().initialize_weights()
        if not key_given:
            self._copy_query_to_key()

    def reset_queue(self) -> None:
        """Fill the queue with fresh random unit vectors and rewind the pointer."""
        if self.queue is None:
            raise ValueError("this model has no queue (queue_size=0, MoCo v3): there is nothing to reset")
        with torch.no_grad():
            self.queue.copy_(F.normalize(torch.randn_like(self.queue, dtype=torch.float32), dim=1))
            self.queue_ptr.zero_()

    def get_backbone(self) -> nn.Module:
        """The query encoder's timm backbone (the part kept after pretraining)."""
        return self.query_encoder.backbone

    def no_weight_decay(self) -> set[str]:
        """Names of parameters that take no weight decay beside biases and norm weights: the backbone's own list (a
        ViT's class token and position embedding), as timm's optimiser factory reads it
        (`timm.optim.create_optimizer_v2(model, ...)`)."""
        names = getattr(self.query_encoder.backbone, "no_weight_decay", lambda: ())()
        return {f"query_encoder.backbone.{name}" for name in names}

    # -- algorithm pieces ---------------------------------------------------------------------------------

    @torch.no_grad()
    def momentum_update_key_encoder(self, momentum: float | None = None) -> None:
        """theta_k <- m * theta_k + (1 - m) * theta_q with m = `momentum`, or the config's when None."""
        m = self.config.momentum if momentum is None else momentum
        momentum_update(list(self.key_encoder.parameters()), list(self.query_encoder.parameters()), m)

    @torch.no_grad()
    def _keys(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised keys for this process's batch (N x C) and for the global batch in rank order (world*N x C).

        Shuffle BN: across processes, the global key batch is permuted before the key encoder and restored after
        (official implementation); in one process with `bn_splits` > 1 the batch is permuted before being cut into
        the BN chunks. With `bn_splits` == 1 in one process a permutation would not change BN statistics.
        """
        splits = self.config.bn_splits
        if _is_distributed():
            world, rank = dist.get_world_size(), dist.get_rank()
            if self.config.shuffle_bn:
                images = all_gather_cat(pixel_values)  # world*N x 3 x H x W
                perm = torch.randperm(images.shape[0], device=images.device)
                dist.broadcast(perm, src=0)
                mine = perm.view(world, -1)[rank]
                k = F.normalize(self.key_encoder(images[mine], splits), dim=1)  # N x C
                k_shuffled = all_gather_cat(k)  # world*N x C, in permuted order
                k_all = torch.empty_like(k_shuffled)
                k_all[perm] = k_shuffled  # unshuffle
            else:
                k_all = all_gather_cat(F.normalize(self.key_encoder(pixel_values, splits), dim=1))
            k_local = k_all.view(world, -1, k_all.shape[1])[rank]
            return k_local, k_all
        if self.config.shuffle_bn and splits > 1 and self.training:
            perm = torch.randperm(pixel_values.shape[0], device=pixel_values.device)
            k = self.key_encoder(pixel_values[perm], splits)
            k = k[torch.argsort(perm)]
        else:
            k = self.key_encoder(pixel_values, splits)
        k = F.normalize(k, dim=1)
        return k, k

    def _queries(
        self,
        pixel_values: torch.Tensor,
        splits: int = 1,
        output_hidden_states: bool | list[int] = False,
        output_attentions: bool = False,
    ):
        """(features, pooled, q, hidden_states, attentions) of the query encoder, q through the prediction head where
        there is one, L2-normalised (N x C)."""
        features, pooled, q, hidden_states, attentions = self.query_encoder.forward_all(
            pixel_values, splits, output_hidden_states, output_attentions
        )
        if self.predictor is not None:
            q = self.predictor(q)  # N x C
        return features, pooled, F.normalize(q, dim=1), hidden_states, attentions

    def _contrast(
        self,
        view_q: torch.Tensor,
        view_k: torch.Tensor,
        output_hidden_states: bool | list[int] = False,
        output_attentions: bool = False,
    ):
        """Query forward, keys and logits for one direction (queries from view_q, keys from view_k)."""
        features, pooled, q, hidden_states, attentions = self._queries(
            view_q, self.config.bn_splits, output_hidden_states, output_attentions
        )  # q: N x C
        k, k_all = self._keys(view_k)  # N x C, world*N x C
        logits = info_nce_logits(q, k, self.queue, self.config.tau)  # N x (1+K)
        return features, pooled, q, k, k_all, logits, hidden_states, attentions

    def _in_batch_step(
        self,
        view_1: torch.Tensor,
        view_2: torch.Tensor,
        output_hidden_states: bool | list[int] = False,
        output_attentions: bool = False,
    ) -> MoCoModelOutput:
        """MoCo v3's Algorithm 1 after the momentum update, without a queue:

            q1, q2 = f_q(x1), f_q(x2)  # queries: [N, C] each
            k1, k2 = f_k(x1), f_k(x2)  # keys: [N, C] each
            loss = ctr(q1, k2) + ctr(q2, k1)  # symmetrized

        Each call of an encoder is one forward of one view, so BatchNorm normalises each view with its own
        statistics. The keys of every process are gathered; the logits of this process's queries against all of them
        put the positives at `in_batch_labels` (rank offset). Without `symmetric`: q1, k2 and `ctr(q1, k2)` only.
        """
        tau, symmetric = self.config.tau, self.config.symmetric
        features, pooled, q1, hidden_states, attentions = self._queries(
            view_1, 1, output_hidden_states, output_attentions
        )  # q1: N x C
        q2 = self._queries(view_2)[2] if symmetric else None  # N x C
        k1_all = self._keys(view_1)[1] if symmetric else None  # world*N x C
        k2, k2_all = self._keys(view_2)  # N x C, world*N x C
        rank = dist.get_rank() if _is_distributed() else 0
        labels = in_batch_labels(q1.shape[0], rank, q1.device)  # N
        logits = in_batch_logits(q1, k2_all, tau)  # N x world*N
        loss = ctr_loss(logits, labels, tau)
        if symmetric:
            logits_21 = in_batch_logits(q2, k1_all, tau)  # N x world*N
            loss = loss + ctr_loss(logits_21, labels, tau)
            logits = torch.cat([logits, logits_21], dim=0)  # 2N x world*N
            labels = torch.cat([labels, labels], dim=0)  # 2N
        return MoCoModelOutput(
            loss=loss,
            logits=logits,
            last_hidden_state=features,
            pooler_output=pooled,
            query_embeddings=q1,
            key_embeddings=k2,
            hidden_states=hidden_states,
            attentions=attentions,
            labels=labels,
        )

    # -- forward ------------------------------------------------------------------------------------------

    def forward(
        self,
        pixel_values: torch.Tensor,
        key_pixel_values: torch.Tensor | None = None,
        output_hidden_states: bool | list[int] | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        momentum: float | None = None,
    ) -> MoCoModelOutput | tuple:
        """One step of Algorithm 1 (train mode, both views), the contrastive loss without any update (eval mode, both
        views), or the query features (one view).

        `output_hidden_states` (a bool, or indices of stages/blocks as timm's `indices`) and `output_attentions` add
        the query backbone's hidden states and attention weights (see [`MoCoModelOutput`]); unset, the config's.
        `return_dict=False` returns `to_tuple()` of the output: its fields in order, without the `None`s.
        `momentum`: m of this step's key-encoder update (a schedule's value, as MoCo v3's cosine rise to 1);
        the config's `momentum` when None.
        """
        output_hidden_states, output_attentions, return_dict = self._output_options(
            output_hidden_states, output_attentions, return_dict
        )
        _check_images(pixel_values, "pixel_values")
        if momentum is not None and not (isinstance(momentum, (int, float)) and 0.0 <= momentum <= 1.0):
            raise ValueError(f"momentum must be a number in [0, 1] (MoCo v3 rises from 0.99 to 1), got {momentum!r}")
        if key_pixel_values is None:
            features, pooled, q, hidden_states, attentions = self._queries(
                pixel_values, 1, output_hidden_states, output_attentions
            )
            output = MoCoModelOutput(
                last_hidden_state=features,
                pooler_output=pooled,
                query_embeddings=q,
                hidden_states=hidden_states,
                attentions=attentions,
            )
            return output if return_dict else output.to_tuple()

        _check_images(key_pixel_values, "key_pixel_values")
        if key_pixel_values.shape != pixel_values.shape:
            raise ValueError(
                f"pixel_values {tuple(pixel_values.shape)} and key_pixel_values {tuple(key_pixel_values.shape)} "
                "must have the same shape: they are two augmented views of the same images"
            )
        global_batch = pixel_values.shape[0] * (dist.get_world_size() if _is_distributed() else 1)
        enqueued = global_batch * (2 if self.config.symmetric else 1)
        if self.queue is not None and enqueued > self.config.queue_size:
            raise ValueError(
                f"queue_size={self.config.queue_size} is smaller than the {enqueued} keys enqueued per step "
                f"(global batch {global_batch}{' x 2 views' if self.config.symmetric else ''}); "
                "use a queue at least that large (the paper uses 65536 for batch 256)"
            )

        update = self.training
        if update:
            self.momentum_update_key_encoder(momentum)

        if self.queue is None:
            output = self._in_batch_step(pixel_values, key_pixel_values, output_hidden_states, output_attentions)
            return output if return_dict else output.to_tuple()

        features, pooled, q, k, k_all, logits, hidden_states, attentions = self._contrast(
            pixel_values, key_pixel_values, output_hidden_states, output_attentions
        )
        loss = info_nce_loss(logits)
        if self.config.symmetric:
            # Official CIFAR demo: loss_12 + loss_21, then enqueue the keys of both views (view 1 first).
            _, _, _, k1, k1_all, logits_21, _, _ = self._contrast(key_pixel_values, pixel_values)
            loss = loss + info_nce_loss(logits_21)
            logits = torch.cat([logits, logits_21], dim=0)  # 2N x (1+K)
            k_all = torch.cat([k1_all, k_all], dim=0)
        if update:
            enqueue(self.queue, self.queue_ptr, k_all)

        output = MoCoModelOutput(
            loss=loss,
            logits=logits,
            last_hidden_state=features,
            pooler_output=pooled,
            query_embeddings=q,
            key_embeddings=k,
            hidden_states=hidden_states,
            attentions=attentions,
        )
        return output if return_dict else output.to_tuple()


class MoCoForImageClassification(MoCoPreTrainedModel):
    """The query backbone of a MoCo checkpoint with a fresh linear classifier on its pooled features.

    `MoCoForImageClassification.from_pretrained(moco_checkpoint, num_labels=N)` keeps the query backbone and drops
    the key encoder, queue, projection head and prediction head. With `freeze_backbone=True` the backbone gets no gradient and stays
    in eval mode (the linear evaluation protocol), so its BatchNorm statistics do not move.
    """

    _keys_to_ignore_on_load_unexpected = [
        r"^key_encoder\.", r"^queue$", r"^queue_ptr$", r"^query_encoder\.head\.", r"^predictor\."
    ]
    _keys_to_ignore_on_load_missing = [r"^classifier\."]
    _auto_class = "AutoModelForImageClassification"  # save_pretrained copies the code files (see AUTO_MAP)

    def __init__(self, config: MoCoConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.query_encoder = MoCoBackbone(config)
        num_features = self.query_encoder.backbone.num_features
        self.classifier = nn.Linear(num_features, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self._freeze()
        self.post_init()

    def _freeze(self) -> None:
        if self.config.freeze_backbone:
            self.query_encoder.requires_grad_(False)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # On the classifier itself: transformers never calls this for the model, which has no tensors of its own.
        if module is getattr(self, "classifier", None) and isinstance(module, nn.Linear):
            init.normal_(module.weight, std=self.config.initializer_range)
            init.zeros_(module.bias)
        else:
            super()._init_weights(module)

    def get_backbone(self) -> nn.Module:
        return self.query_encoder.backbone

    @torch.no_grad()
    def reset_classifier(self) -> None:
        """A fresh classifier, N(0, initializer_range) weights and zero bias, even where the checkpoint held one
        of the same shape (a linear-evaluation or fine-tuned folder): fine-tuning starts from the backbone only."""
        if isinstance(self.classifier, nn.Linear):
            nn.init.normal_(self.classifier.weight, std=self.config.initializer_range)
            nn.init.zeros_(self.classifier.bias)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.config.freeze_backbone:
            self.query_encoder.eval()
        return self

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | list[int] | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> ImageClassifierOutput | tuple:
        """Logits N x num_labels, and with `labels` the loss (cross-entropy; MSE for one label; BCE for multi-hot
        labels). `output_hidden_states` / `output_attentions` as in [`MoCoModel.forward`]."""
        output_hidden_states, output_attentions, return_dict = self._output_options(
            output_hidden_states, output_attentions, return_dict
        )
        _check_images(pixel_values, "pixel_values")
        with torch.no_grad() if self.config.freeze_backbone else nullcontext():
            _, pooled, hidden_states, attentions = self.query_encoder(
                pixel_values, output_hidden_states, output_attentions
            )
        logits = self.classifier(pooled)  # N x num_labels

        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            if self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            elif labels.dim() == logits.dim() and labels.shape == logits.shape:
                loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
            else:
                loss = F.cross_entropy(logits.float().view(-1, self.num_labels), labels.view(-1))
        output = ImageClassifierOutput(loss=loss, logits=logits, hidden_states=hidden_states, attentions=attentions)
        return output if return_dict else output.to_tuple()


def _check_images(pixel_values, name: str) -> None:
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise ValueError(f"{name} must be a float tensor of shape (batch, channels, height, width), got {shape}")
    if not pixel_values.is_floating_point():
        raise ValueError(f"{name} must be a float tensor (normalised images), got dtype {pixel_values.dtype}")


__all__ = [
    "MoCoModelOutput",
    "SplitBatchNorm2d",
    "convert_split_batchnorm",
    "MoCoProjectionHead",
    "MoCoPredictionHead",
    "MoCoEncoder",
    "MoCoPreTrainedModel",
    "MoCoModel",
    "MoCoForImageClassification",
    "momentum_update",
    "enqueue",
    "info_nce_logits",
    "info_nce_loss",
    "in_batch_logits",
    "in_batch_labels",
    "ctr_loss",
    "sincos_position_embedding",
]

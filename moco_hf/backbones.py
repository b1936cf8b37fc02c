"""Small-image ResNets registered with timm, for 32x32 inputs (CIFAR-10, the embedded digits demo).

The official MoCo CIFAR-10 demo uses torchvision's ResNet-18 with "the first 3x3 conv and no max pool"
instead of the ImageNet 7x7 stride-2 stem and max-pool, so that a 32 px image keeps its resolution in the
first stage. Importing this module registers:

- `cifar_resnet18`: that network (BasicBlock, [2, 2, 2, 2], widths 64-512, 11.2 M parameters).
- `cifar_resnet10_slim`: BasicBlock, [1, 1, 1, 1], widths 16-128, for quick CPU runs.

They are ordinary timm models (`timm.create_model("cifar_resnet18", num_classes=0)`), built from timm's
`ResNet` class, so all of timm's API (`forward_features`, `forward_head`, `reset_classifier`, ...) works, and they
take timm's factory arguments as any timm model does (`device="meta"`, `dtype=torch.bfloat16`).
This file ships next to the modeling code so `trust_remote_code` loading can build them too. Registration is
idempotent: another copy of this file (transformers imports a folder's remote code as separate modules for its
configuration and its modeling file, and again for each folder) keeps the first registration and warns nothing.
"""

from collections.abc import Callable

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, is_model, model_entrypoint, register_model
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

SMALL_IMAGE_RESNETS = ("cifar_resnet18", "cifar_resnet10_slim")  # what importing this module registers
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class SmallImageResNet(ResNet):
    """timm ResNet whose stem is one 3x3 stride-1 conv (width `channels[0]`) and no max-pool."""

    def __init__(
        self,
        block=BasicBlock,
        layers=(2, 2, 2, 2),
        channels=(64, 128, 256, 512),
        in_chans: int = 3,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs,
    ):
        dd = {"device": device, "dtype": dtype}  # timm's factory arguments, for every module built here too
        super().__init__(block=block, layers=list(layers), channels=tuple(channels), in_chans=in_chans, **dd, **kwargs)
        stem_width = self.bn1.num_features
        self.conv1 = nn.Conv2d(in_chans, stem_width, kernel_size=3, stride=1, padding=1, bias=False, **dd)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.maxpool = nn.Identity()
        # The stem no longer downsamples: stage reductions are 1, 2, 4, 8.
        for info, reduction in zip(self.feature_info, (1, 1, 2, 4, 8)):
            info["reduction"] = reduction


def _cfg() -> dict:
    return {
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (4, 4),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR10_MEAN,
        "std": CIFAR10_STD,
        "first_conv": "conv1",
        "classifier": "fc",
    }


# No weights of their own (a MoCo checkpoint, or its timm export, provides them): with `pretrained=True`, timm's
# builder loads the file or folder given as `pretrained_cfg_overlay=dict(file=...)` or `local-dir:`.
default_cfgs = generate_default_cfgs({"cifar_resnet18": _cfg(), "cifar_resnet10_slim": _cfg()})


def _create(name: str, pretrained: bool, **kwargs) -> SmallImageResNet:
    return build_model_with_cfg(SmallImageResNet, name, pretrained, **kwargs)


def _register_once(fn: Callable[..., SmallImageResNet]) -> Callable[..., SmallImageResNet]:
    """timm's `register_model`, unless a copy of this file registered the name already: timm would overwrite it and
    warn "Overwriting cifar_resnet18 in registry". A same-named model from anywhere else is still overwritten, with
    timm's warning."""
    fn._moco_hf_small_image_resnet = True
    name = fn.__name__
    if is_model(name) and getattr(model_entrypoint(name), "_moco_hf_small_image_resnet", False):
        return fn
    return register_model(fn)


@_register_once
def cifar_resnet18(pretrained: bool = False, **kwargs) -> SmallImageResNet:
    """ResNet-18 with a 3x3 stride-1 stem and no max-pool (official MoCo CIFAR-10 demo)."""
    return _create("cifar_resnet18", pretrained, layers=(2, 2, 2, 2), channels=(64, 128, 256, 512), **kwargs)


@_register_once
def cifar_resnet10_slim(pretrained: bool = False, **kwargs) -> SmallImageResNet:
    """One BasicBlock per stage, widths 16/32/64/128: a small-image ResNet that trains in minutes on a CPU."""
    return _create("cifar_resnet10_slim", pretrained, layers=(1, 1, 1, 1), channels=(16, 32, 64, 128), **kwargs)

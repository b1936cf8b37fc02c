"""The CPU augmentation path, one PIL image at a time (in DataLoader workers), as the official MoCo code does:
`TwoViewTransform` (two views of a recipe of `presets`, each with its view's preset, parameters drawn from an explicit
generator so an epoch replays exactly), `EvalTransform` (resize, center crop, normalise: the kNN monitor and evaluation) and
`TrainTransform` (the supervised training transform of linear evaluation and fine-tuning).
"""

from __future__ import annotations

import math

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision.transforms.v2 import functional as TF

from .presets import AugmentPreset, get_view_presets

SOLARIZE_THRESHOLD = 128  # of 255: PIL's ImageOps.solarize default, as BYOL and MoCo v3


def sample_resized_crop(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], generator: torch.Generator
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop, torchvision's RandomResizedCrop algorithm with an explicit generator:
    up to 10 tries of area ~ U(scale) * H * W and log-aspect ~ U(log ratio), then the central crop fallback."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u = torch.rand(4, generator=generator).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u[2] * (height - h + 1)), height - h)
            left = min(int(u[3] * (width - w + 1)), width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class TwoViewTransform:
    """Two independently augmented views of one PIL image, as normalised float tensors (3 x size x size): view 1 with
    the recipe's first preset, view 2 with its second (the same preset for v1, v2 and cifar; MoCo v3's asymmetric
    pair for v3)."""

    def __init__(self, preset: str | AugmentPreset | tuple[AugmentPreset, AugmentPreset], size: int, mean, std,
                 crop_min_scale: float | None = None):
        self.presets = get_view_presets(preset, crop_min_scale)
        self.size = int(size)
        self.mean = list(mean)
        self.std = list(std)

    @property
    def preset(self) -> AugmentPreset:
        """View 1's preset (the only one of a symmetric recipe)."""
        return self.presets[0]

    def view(self, image: Image.Image, g: torch.Generator, preset: AugmentPreset | None = None) -> torch.Tensor:
        """One view of `image` with `preset` (default: view 1's)."""
        p = preset or self.presets[0]
        top, left, h, w = sample_resized_crop(image.height, image.width, p.crop_scale, (3 / 4, 4 / 3), g)
        image = image.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + w, top + h))
        # one draw per random op: jitter, grayscale, blur, flip (and solarize, only for presets that have it, so that
        # the other recipes draw exactly as before it existed)
        u = torch.rand(5 if p.solarize_prob > 0 else 4, generator=g).tolist()
        if p.grayscale_first and u[1] < p.grayscale_prob:
            image = image.convert("L").convert("RGB")
        if u[0] < p.jitter_prob:
            image = self._jitter(image, g)
        if not p.grayscale_first and u[1] < p.grayscale_prob:
            image = image.convert("L").convert("RGB")
        if u[2] < p.blur_prob:
            sigma = p.blur_sigma[0] + (p.blur_sigma[1] - p.blur_sigma[0]) * torch.rand(1, generator=g).item()
            image = image.filter(ImageFilter.GaussianBlur(radius=sigma))  # as the official v2 code
        if p.solarize_prob > 0 and u[4] < p.solarize_prob:
            image = ImageOps.solarize(image, SOLARIZE_THRESHOLD)  # 255 - x where x >= 128
        if u[3] < p.flip_prob:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        tensor = TF.to_dtype(TF.pil_to_tensor(image), torch.float32, scale=True)
        return TF.normalize(tensor, self.mean, self.std)

    def _jitter(self, image: Image.Image, g: torch.Generator) -> Image.Image:
        """ColorJitter: factors drawn uniformly, the four ops in a random order (torchvision semantics)."""
        b, c, s, h = self.preset.jitter
        order = torch.randperm(4, generator=g).tolist()
        u = torch.rand(4, generator=g).tolist()
        for op in order:
            if op == 0 and b > 0:
                image = TF.adjust_brightness(image, max(0.0, 1 - b) + 2 * b * u[0])
            elif op == 1 and c > 0:
                image = TF.adjust_contrast(image, max(0.0, 1 - c) + 2 * c * u[1])
            elif op == 2 and s > 0:
                image = TF.adjust_saturation(image, max(0.0, 1 - s) + 2 * s * u[2])
            elif op == 3 and h > 0:
                image = TF.adjust_hue(image, -h + 2 * h * u[3])
        return image

    def __call__(self, image: Image.Image, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view(image, g, self.presets[0]), self.view(image, g, self.presets[1])


def interpolation_mode(name: str) -> TF.InterpolationMode:
    """torchvision's mode for a timm / PIL interpolation name (nearest, bicubic; anything else bilinear)."""
    return TF.InterpolationMode(name if name in ("nearest", "bicubic") else "bilinear")


class EvalTransform:
    """Resize the shorter side to size / crop_pct, center crop `size`, normalise (kNN monitor and evaluation)."""

    def __init__(self, size: int, mean, std, crop_pct: float = 1.0, interpolation: str = "bilinear"):
        self.size, self.mean, self.std = int(size), list(mean), list(std)
        self.resize = int(math.floor(size / crop_pct))
        self.interpolation = interpolation_mode(interpolation)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = TF.center_crop(TF.resize(image, self.resize, interpolation=self.interpolation), self.size)
        return TF.normalize(TF.to_dtype(TF.pil_to_tensor(image), torch.float32, scale=True), self.mean, self.std)


class TrainTransform:
    """RandomResizedCrop(size, scale=(crop_min_scale, 1)) + horizontal flip + normalise (PIL image -> 3 x S x S):
    the training transform of the official linear classification and of standard supervised training."""

    def __init__(self, size: int, mean, std, crop_min_scale: float = 0.08, flip_prob: float = 0.5,
                 interpolation: str = "bilinear"):
        from torchvision.transforms import v2

        mode = interpolation_mode(interpolation)
        self.transform = v2.Compose([
            v2.RandomResizedCrop(int(size), scale=(float(crop_min_scale), 1.0), interpolation=mode, antialias=True),
            v2.RandomHorizontalFlip(flip_prob),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ])

    def __call__(self, image) -> torch.Tensor:
        return self.transform(image)


__all__ = ["SOLARIZE_THRESHOLD", "EvalTransform", "TrainTransform", "TwoViewTransform", "interpolation_mode",
           "sample_resized_crop"]

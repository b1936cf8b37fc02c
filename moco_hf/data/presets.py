"""The augmentation recipes of the papers, as data: both augmentation paths build from them (`transforms` one PIL
image at a time in DataLoader workers, `gpu_augment` whole batches on the device), so the two cannot drift apart.

- v1 (He et al. 2019, Sec. 4.1): "a 224x224-pixel crop is taken from a randomly resized image, and then undergoes
  random color jittering, random horizontal flip, and random grayscale conversion" (the official code puts the
  grayscale before the jitter).
- v2 (Chen et al. 2020): v1 plus "the blur augmentation", a stronger colour distortion applied with p=0.8.
- cifar: the official CIFAR-10 demo's recipe: v2 without the blur, crops of 8-100 % of the image.
- digits: the embedded demo's: crops of 40-100 % and brightness / contrast only; digits are not flipped.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AugmentPreset:
    """One MoCo augmentation pipeline. Each random op is applied with its probability."""

    crop_scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop area fraction
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5  # Gaussian blur, sigma ~ U(0.1, 2.0)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    flip_prob: float = 0.5
    grayscale_first: bool = False  # v1 converts to grayscale before the jitter (official code order)


PRESETS = {
    # MoCo v1 (He et al. 2019, Sec. 4.1): "a 224x224-pixel crop is taken from a randomly resized image, and then
    # undergoes random color jittering, random horizontal flip, and random grayscale conversion".
    "v1": AugmentPreset(jitter=(0.4, 0.4, 0.4, 0.4), jitter_prob=1.0, blur_prob=0.0, grayscale_first=True),
    # MoCo v2 (Chen et al. 2020): v1 + blur augmentation, jitter applied with p=0.8.
    "v2": AugmentPreset(),
    # Official CIFAR-10 demo: RandomResizedCrop(32) (torchvision's default scale 0.08-1), jitter p=0.8,
    # grayscale 0.2, flip; no blur.
    "cifar": AugmentPreset(crop_scale=(0.08, 1.0), blur_prob=0.0),
    # The embedded digits: grey images of digits that a mirror or a colour change would not preserve or would not
    # touch: crops (which also shift and rescale the digit) and brightness / contrast changes only.
    "digits": AugmentPreset(crop_scale=(0.4, 1.0), jitter=(0.4, 0.4, 0.0, 0.0), grayscale_prob=0.0, blur_prob=0.0,
                            flip_prob=0.0),
}


def get_preset(preset: str | AugmentPreset, crop_min_scale: float | None = None) -> AugmentPreset:
    """The preset named `preset` (or `preset` itself), with the crop's lower area bound replaced by `crop_min_scale`
    when given."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown augmentation {preset!r}; choose one of {sorted(PRESETS)}")
        preset = PRESETS[preset]
    if crop_min_scale is not None:
        preset = AugmentPreset(**{**preset.__dict__, "crop_scale": (float(crop_min_scale), 1.0)})
    return preset


__all__ = ["PRESETS", "AugmentPreset", "get_preset"]

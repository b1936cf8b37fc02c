"""The augmentation recipes of the papers, as data: both augmentation paths build from them (`transforms` one PIL
image at a time in DataLoader workers, `gpu_augment` whole batches on the device), so the two cannot drift apart.

- v1 (He et al. 2019, Sec. 4.1): "a 224x224-pixel crop is taken from a randomly resized image, and then undergoes
  random color jittering, random horizontal flip, and random grayscale conversion" (the official code puts the
  grayscale before the jitter).
- v2 (Chen et al. 2020): v1 plus "the blur augmentation", a stronger colour distortion applied with p=0.8.
- cifar: the official CIFAR-10 demo's recipe: v2 without the blur, crops of 8-100 % of the image.
- digits: the embedded demo's: crops of 40-100 % and brightness / contrast only; digits are not flipped.
- v3 (Chen, Xie and He 2021, after BYOL): asymmetric views. Both: crops of 8-100 %, colour jitter (0.4, 0.4, 0.2,
  0.1) with p 0.8, grayscale 0.2, flip; view 1 always blurred and never solarized, view 2 blurred with p 0.1 and
  solarized with p 0.2.
- v3_cifar: v3 without the blur, for 32 px images (as cifar is v2 without it; solo-learn's MoCo v3 CIFAR recipe too).

Symmetric recipes use one preset for both views; `VIEW_PRESETS` holds the pair of each recipe.
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
    solarize_prob: float = 0.0  # invert the pixels at or above 128 of 255 (PIL's ImageOps.solarize), after the blur


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

# MoCo v3 follows BYOL's augmentation: jitter (0.4, 0.4, 0.2, 0.1) with p 0.8 (saturation 0.2); grayscale 0.2;
# blur always on view 1 and with p 0.1 on view 2; solarize with p 0.2 on view 2 only; crops of 8-100 %.
_V3_VIEW_1 = AugmentPreset(crop_scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), blur_prob=1.0)
_V3_VIEW_2 = AugmentPreset(crop_scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), blur_prob=0.1, solarize_prob=0.2)

# (view 1, view 2) of every recipe: the query view and the key view of `MoCoModel(pixel_values, key_pixel_values)`.
VIEW_PRESETS: dict[str, tuple[AugmentPreset, AugmentPreset]] = {
    **{name: (preset, preset) for name, preset in PRESETS.items()},
    "v3": (_V3_VIEW_1, _V3_VIEW_2),
    "v3_cifar": (AugmentPreset(**{**_V3_VIEW_1.__dict__, "blur_prob": 0.0}),
                 AugmentPreset(**{**_V3_VIEW_2.__dict__, "blur_prob": 0.0})),
}
CIFAR_RECIPES = ("cifar", "v3_cifar")  # 32 px recipes: `MoCoGPUAugment` defaults to 32 px and CIFAR-10 statistics


def get_preset(preset: str | AugmentPreset, crop_min_scale: float | None = None) -> AugmentPreset:
    """The preset named `preset` (or `preset` itself), with the crop's lower area bound replaced by `crop_min_scale`
    when given. A recipe with two different views (v3) names view 1's."""
    if isinstance(preset, str):
        preset = get_view_presets(preset)[0]
    if crop_min_scale is not None:
        preset = AugmentPreset(**{**preset.__dict__, "crop_scale": (float(crop_min_scale), 1.0)})
    return preset


def get_view_presets(recipe: str | AugmentPreset | tuple[AugmentPreset, AugmentPreset],
                     crop_min_scale: float | None = None) -> tuple[AugmentPreset, AugmentPreset]:
    """(view 1, view 2) of the recipe named `recipe` (a preset alone serves both views), each with the crop's lower
    area bound replaced by `crop_min_scale` when given."""
    if isinstance(recipe, str):
        if recipe not in VIEW_PRESETS:
            raise ValueError(f"unknown augmentation {recipe!r}; choose one of {sorted(VIEW_PRESETS)}")
        recipe = VIEW_PRESETS[recipe]
    views = (recipe, recipe) if isinstance(recipe, AugmentPreset) else tuple(recipe)
    if len(views) != 2 or not all(isinstance(view, AugmentPreset) for view in views):
        raise ValueError(f"expected a recipe name, an AugmentPreset or a pair of them, got {recipe!r}")
    return tuple(get_preset(view, crop_min_scale) for view in views)


__all__ = ["CIFAR_RECIPES", "PRESETS", "VIEW_PRESETS", "AugmentPreset", "get_preset", "get_view_presets"]

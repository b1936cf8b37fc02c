"""Batched MoCo v1/v2/v3 augmentation that runs on the batch's device (CUDA in training, CPU in tests).

The CPU path (`transforms.py`) follows the official MoCo code: one PIL image at a time in dataloader workers. Here the
same recipe runs on a whole batch with plain torch ops, every random parameter drawn per sample:

    images (N x 3 x H x W uint8, or a list of 3 x H_i x W_i uint8, e.g. from `decode_jpegs(..., device="cuda")`)
      -> RandomResizedCrop    torchvision's sampler (10 tries, then a central crop), one uint8 gather of the 4
                              bilinear taps (`crop_taps`), then the blend in float32 (`blend_taps`)
      -> colour ops           per preset: ColorJitter (per-sample random order), RandomGrayscale, GaussianBlur,
                              RandomSolarize (v3's view 2)
      -> RandomHorizontalFlip
      -> Normalize            float N x 3 x S x S, optionally channels_last / bf16

Everything after the gather can run as one `torch.compile`d function (`MoCoGPUAugment(..., compile=True)`): the
eager ops each make a pass over the batch, where inductor fuses them into a few kernels. 256 images of 500 x 375 to
two bf16 channels_last 224 px v2 views, one H100 (torch 2.11, `benchmarks/bench_augment.py`): 35.0 ms before
the compiled path existed, 22.7 ms eager, 7.7 ms compiled. The random draws are one `torch.rand` per view on a
`torch.Generator` (eager, no host sync); the parameters are plain functions of those draws (`from_uniforms`), and
with `compile=True` they and the gather's indices are compiled too, so a view costs about 5 eager ops and 3
compiled calls on the host instead of about 150 ops (what matters at 32 px, where the kernels are tiny).

MoCo v1 (He et al., 2019, Sec. 4.1): "a 224x224-pixel crop is taken from a randomly resized image, and then
undergoes random color jittering, random horizontal flip, and random grayscale conversion" (the official code puts
the grayscale before the jitter). MoCo v2 (Chen et al., 2020): v1 plus "the blur augmentation", a stronger
colour distortion applied with p=0.8, as in SimCLR. MoCo v3 (Chen, Xie and He, 2021): BYOL's asymmetric views, each
view with its own preset (`presets.VIEW_PRESETS`): blur always on view 1, with p 0.1 on view 2, solarize on view 2.

Every op is a frozen dataclass with `sample(...)` (the random parameters, one row per sample, drawn from a
`torch.Generator` on the batch's device; `from_uniforms(u)` computes them from `num_uniforms` U[0, 1) draws per
sample) and `apply(images, params)` (deterministic), so each can be checked
against `torchvision.transforms.v2.functional` on fixed parameters. `MoCoGPUAugment` composes them for a preset.

Usage:
    augment = MoCoGPUAugment("v2", generator=torch.Generator("cuda").manual_seed(0), dtype=torch.bfloat16,
                             channels_last=True, compile=True)
    decoded = decode.decode_jpegs(list_of_jpeg_bytes, device="cuda")   # nvJPEG, one batched call
    view_q, view_k = augment.two_views(decoded.images)              # 2 x (N x 3 x 224 x 224)
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .presets import CIFAR_RECIPES, VIEW_PRESETS, AugmentPreset, get_preset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# the statistics used by the official MoCo CIFAR-10 demo notebook
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)

# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale
_LUMA = (0.2989, 0.587, 0.114)

BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


def _per_sample(values: Tensor) -> Tensor:
    """N -> N x 1 x 1 x 1, to broadcast one value per sample over an N x C x H x W batch."""
    return values.reshape(-1, 1, 1, 1)


def _check_probability(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {p}")


def _uniforms(n: int, k: int, device, generator: torch.Generator | None) -> Tensor:
    """N x k independent U[0, 1) draws (float64): every random parameter of an op is a function of its own k.

    Drawing them in one call and computing the parameters with plain tensor maths (`from_uniforms`) keeps the
    sampling to a few kernels, or one compiled function, instead of a launch per draw.
    """
    return torch.rand(n, k, generator=generator, device=device, dtype=torch.float64)


def _scaled(u: Tensor, low: float, high: float) -> Tensor:
    """U[0, 1) -> U[low, high), in float32."""
    return (u * (high - low) + low).float()


# --------------------------------------------------------------------------------------------------------------------
# Images of any sizes, laid out for one gather
# --------------------------------------------------------------------------------------------------------------------


class PackedImages(NamedTuple):
    """A batch of 3-channel images of any sizes, flattened for one gather.

    Pixel (c, y, x) of image n is `pixels[c, offsets[n] + y * widths[n] + x]`.
    """

    pixels: Tensor  # 3 x sum(H_n * W_n), uint8 (0..255) or float (0..1)
    offsets: Tensor  # N, int64
    heights: Tensor  # N, int64
    widths: Tensor  # N, int64

    @property
    def device(self) -> torch.device:
        return self.pixels.device

    def __len__(self) -> int:
        return self.offsets.numel()


ImageBatch = Tensor | Sequence[Tensor] | PackedImages


def pack_images(images: ImageBatch) -> PackedImages:
    """Lay out an N x 3 x H x W batch, or a list of 3 x H_n x W_n images, as `PackedImages` (one copy, uint8)."""
    if isinstance(images, PackedImages):
        return images
    if isinstance(images, Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected an N x 3 x H x W batch, got shape {tuple(images.shape)}")
        n, _, h, w = images.shape
        pixels = images.transpose(0, 1).reshape(3, -1)  # 3 x N*H*W
        offsets = torch.arange(n, device=images.device) * (h * w)
        heights = torch.full((n,), h, device=images.device, dtype=torch.long)
        widths = torch.full((n,), w, device=images.device, dtype=torch.long)
        return PackedImages(pixels, offsets, heights, widths)
    images = list(images)
    if not images:
        raise ValueError("expected at least one image")
    for image in images:
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected 3 x H x W images, got shape {tuple(image.shape)}")
        if image.device != images[0].device or image.dtype != images[0].dtype:
            raise ValueError("all images must share one device and dtype")
    device = images[0].device
    sizes = torch.tensor([[image.shape[1], image.shape[2]] for image in images], dtype=torch.long)
    areas = sizes[:, 0] * sizes[:, 1]
    offsets = torch.cumsum(areas, 0) - areas
    pixels = torch.cat([image.reshape(3, -1) for image in images], dim=1)  # 3 x sum(H*W)
    if device.type == "cuda":  # a pinned, non-blocking copy does not wait for the GPU's queued work
        sizes, offsets = (t.pin_memory().to(device, non_blocking=True) for t in (sizes, offsets))
    else:
        sizes, offsets = sizes.to(device), offsets.to(device)
    return PackedImages(pixels, offsets, sizes[:, 0].contiguous(), sizes[:, 1].contiguous())


# --------------------------------------------------------------------------------------------------------------------
# RandomResizedCrop
# --------------------------------------------------------------------------------------------------------------------


def _bilinear_taps(in_sizes: Tensor, out_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Source indices and weights of `F.interpolate(mode="bilinear", align_corners=False)` along one axis.

    Same arithmetic as ATen's `compute_source_index_and_lambda`: src = (dst + 0.5) * in / out - 0.5, clamped to
    [0, in - 1]. Returns i0, i1 (N x out, int64, within the crop) and w0, w1 (N x out, float32).
    """
    in_sizes = in_sizes.unsqueeze(1)  # N x 1
    scale = in_sizes.float() / out_size
    dst = torch.arange(out_size, device=in_sizes.device, dtype=torch.float32).add_(0.5)
    src = (scale * dst).sub_(0.5).clamp_(min=0.0)  # N x out
    i0 = torch.minimum(src.floor().long(), in_sizes - 1)
    w1 = (src - i0).clamp_(0.0, 1.0)
    i1 = i0 + (i0 < in_sizes - 1).long()
    return i0, i1, 1.0 - w1, w1


class CropTaps(NamedTuple):
    """A resized crop before its bilinear blend: the 4 source pixels of every output pixel, and their weights.

    Output pixel (c, n, y, x) is `(p[0] * wx[0] + p[1] * wx[1]) * wy[0] + (p[2] * wx[0] + p[3] * wx[1]) * wy[1]`,
    with p = `pixels[:, c, n, y, x]`, wy = `row_weights[:, n, y, 0]`, wx = `col_weights[:, n, 0, x]` (`blend_taps`).
    """

    pixels: Tensor  # 4 x 3 x N x S x S, taps (y0, x0), (y0, x1), (y1, x0), (y1, x1); uint8 or float, as the images
    row_weights: Tensor  # 2 x N x S x 1 float32: weights of rows y0, y1, divided by 255 for uint8 pixels
    col_weights: Tensor  # 2 x N x 1 x S float32: weights of columns x0, x1


def tap_index(boxes: Tensor, offsets: Tensor, widths: Tensor, size: int, index_dtype: torch.dtype,
              scale_weights: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Where `crop_taps` gathers from, and the blend weights: (flat index 4*N*S*S, row weights 2 x N x S x 1,
    column weights 2 x N x 1 x S). Fixed shapes for a given N and S, so it compiles once (`MoCoGPUAugment`)."""
    top, left, height, width = boxes.long().unbind(1)
    y0, y1, wy0, wy1 = _bilinear_taps(height, size)  # N x S
    x0, x1, wx0, wx1 = _bilinear_taps(width, size)
    widths = widths[:, None]  # N x 1
    rows = offsets[:, None] + (top[:, None] + torch.stack([y0, y1])) * widths  # 2 x N x S: row starts
    cols = left[:, None] + torch.stack([x0, x1])  # 2 x N x S
    rows, cols = rows.to(index_dtype), cols.to(index_dtype)
    index = rows[:, None, :, :, None] + cols[None, :, :, None, :]  # 2 x 2 x N x S x S: (y0, x0), (y0, x1), ...
    if scale_weights:  # uint8 pixels: fold the / 255 into the row weights
        wy0, wy1 = wy0 / 255.0, wy1 / 255.0
    return index.reshape(-1), torch.stack([wy0, wy1])[..., None], torch.stack([wx0, wx1])[:, :, None, :]


def crop_taps(images: ImageBatch, boxes: Tensor, size: int, index_fn=tap_index) -> CropTaps:
    """Gather the bilinear taps of `resized_crop(images, boxes, size)`: one `index_select` for all 4 taps.

    The gather copies pixels in their own dtype (uint8: a quarter of float32's bytes); the index is int32 when the
    packed pixels allow it (half of int64's 4 x N x S x S entries). `index_fn`: `tap_index`, or a compiled copy.
    """
    packed = pack_images(images)
    n = len(packed)
    if boxes.shape != (n, 4):
        raise ValueError(f"expected boxes of shape ({n}, 4), got {tuple(boxes.shape)}")
    index_dtype = torch.int32 if packed.pixels.shape[1] < 2**31 else torch.long
    index, row_weights, col_weights = index_fn(boxes.to(packed.device), packed.offsets, packed.widths, size,
                                               index_dtype, not packed.pixels.is_floating_point())
    pixels = packed.pixels.index_select(1, index).view(3, 4, n, size, size).transpose(0, 1)
    return CropTaps(pixels, row_weights, col_weights)


def blend_taps(taps: CropTaps) -> Tensor:
    """The bilinear blend of `crop_taps`, in float32: N x 3 x S x S in [0, 1] (a view of a 3 x N x S x S tensor)."""
    p, (wy0, wy1), (wx0, wx1) = taps
    top = torch.addcmul(p[0] * wx0, p[1], wx1)  # 3 x N x S x S float32, from uint8 taps without a float copy
    bottom = torch.addcmul(p[2] * wx0, p[3], wx1)
    return torch.addcmul(top.mul_(wy0), bottom, wy1).transpose(0, 1)


def resized_crop(images: ImageBatch, boxes: Tensor, size: int) -> Tensor:
    """Crop `boxes` (N x 4: top, left, height, width) out of each image and resize to size x size, bilinearly.

    Equals `F.resized_crop(image, top, left, height, width, [size, size], antialias=False)` on each image converted
    to float in [0, 1]; one gather over the whole batch, whatever the image sizes. No antialiasing: a shrunk crop is
    still sampled at 2 x 2 source pixels per output pixel, where PIL's bilinear filter widens with the shrink factor.

    Returns:
        N x 3 x size x size float32 in [0, 1].
    """
    return blend_taps(crop_taps(images, boxes, size)).contiguous()


@dataclass(frozen=True)
class RandomResizedCrop:
    """Random area and aspect-ratio crop, resized to size x size (torchvision's `RandomResizedCrop` sampler).

    Args:
        size: output side in pixels (224 for ImageNet, 32 for CIFAR).
        scale: range of the crop's area as a fraction of the image's area; MoCo uses (0.2, 1.0).
        ratio: range of the crop's aspect ratio (width / height), sampled log-uniformly; default (3/4, 4/3).
    """

    size: int
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    num_tries = 10  # torchvision's, before falling back to a central crop

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")
        if not 0.0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must satisfy 0 < scale[0] <= scale[1], got {self.scale}")
        if not 0.0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < ratio[0] <= ratio[1], got {self.ratio}")

    @property
    def num_uniforms(self) -> int:
        return 2 * self.num_tries + 2  # area and aspect per try, then top and left

    def sample(self, heights: Tensor, widths: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Crop boxes for images of the given sizes (N each): N x 4 int64 (top, left, height, width)."""
        return self.from_uniforms(_uniforms(heights.numel(), self.num_uniforms, heights.device, generator),
                                  heights, widths)

    def from_uniforms(self, u: Tensor, heights: Tensor, widths: Tensor) -> Tensor:
        """The boxes for N x `num_uniforms` U[0, 1) draws.

        torchvision's algorithm, all tries at once: up to 10 tries of area ~ U(scale) * H * W and
        log(aspect) ~ U(log ratio); the first try whose rounded box fits is kept, at a uniform position;
        if none fits, the largest central crop with the aspect ratio clamped into `ratio`.
        """
        tries = self.num_tries
        img_h, img_w = heights.double().unsqueeze(1), widths.double().unsqueeze(1)  # N x 1
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        area = img_h * img_w * (u[:, :tries] * (self.scale[1] - self.scale[0]) + self.scale[0])  # N x tries
        aspect = torch.exp(u[:, tries: 2 * tries] * (log_hi - log_lo) + log_lo)
        crop_w = torch.sqrt(area * aspect).round()  # N x tries; round half to even, like Python's round
        crop_h = torch.sqrt(area / aspect).round()
        fits = (crop_w > 0) & (crop_w <= img_w) & (crop_h > 0) & (crop_h <= img_h)  # N x tries
        first = fits.byte().argmax(dim=1, keepdim=True)  # the first try that fits (argmax returns the first max)
        crop_w, crop_h = crop_w.gather(1, first), crop_h.gather(1, first)  # N x 1
        u_top, u_left = u[:, 2 * tries: 2 * tries + 1], u[:, 2 * tries + 1: 2 * tries + 2]  # N x 1 each
        top = (u_top * (img_h - crop_h + 1)).floor()  # ~ randint(0, H - h + 1)
        left = (u_left * (img_w - crop_w + 1)).floor()

        # fallback: central crop, aspect ratio clamped into `ratio`
        in_ratio = img_w / img_h
        too_tall, too_wide = in_ratio < self.ratio[0], in_ratio > self.ratio[1]
        fallback_w = torch.where(too_wide, (img_h * self.ratio[1]).round(), img_w)
        fallback_h = torch.where(too_tall, (img_w / self.ratio[0]).round(), img_h)
        fallback_top = ((img_h - fallback_h) / 2).floor()
        fallback_left = ((img_w - fallback_w) / 2).floor()

        found = fits.any(dim=1, keepdim=True)
        boxes = torch.cat(
            [
                torch.where(found, top, fallback_top),
                torch.where(found, left, fallback_left),
                torch.where(found, crop_h, fallback_h),
                torch.where(found, crop_w, fallback_w),
            ],
            dim=1,
        )
        return boxes.long()  # N x 4

    def apply(self, images: ImageBatch, boxes: Tensor) -> Tensor:
        return resized_crop(images, boxes, self.size)


# --------------------------------------------------------------------------------------------------------------------
# Horizontal flip
# --------------------------------------------------------------------------------------------------------------------


def hflip(images: Tensor, flip: Tensor) -> Tensor:
    """Mirror left-right the samples where `flip` (N bools) is True."""
    return torch.where(_per_sample(flip), images.flip(-1), images)


@dataclass(frozen=True)
class _RandomApply:
    """An op applied to each sample with probability p: its parameters are N bools, one U[0, 1) draw each."""

    p: float = 0.5

    def __post_init__(self):
        _check_probability("p", self.p)

    num_uniforms = 1

    def sample(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        return self.from_uniforms(_uniforms(n, 1, device, generator))

    def from_uniforms(self, u: Tensor) -> Tensor:
        return u[:, 0] < self.p  # N bools: the `torch.rand(1) < p` test of torchvision's Random* ops


@dataclass(frozen=True)
class RandomHorizontalFlip(_RandomApply):
    """Mirror each sample left-right with probability p."""

    p: float = 0.5

    def apply(self, images: Tensor, flip: Tensor) -> Tensor:
        return hflip(images, flip)


# --------------------------------------------------------------------------------------------------------------------
# Colour: the math of torchvision.transforms.v2.functional on float images in [0, 1], with one factor per sample
# --------------------------------------------------------------------------------------------------------------------


def rgb_to_grayscale(images: Tensor) -> Tensor:
    """ITU-R 601-2 luma: N x 3 x H x W -> N x 1 x H x W (as `F.rgb_to_grayscale` on float images)."""
    r, g, b = images.unbind(dim=-3)
    return r.mul(_LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2]).unsqueeze(-3)


def _blend(images: Tensor, other: Tensor, ratio: Tensor) -> Tensor:
    """ratio * images + (1 - ratio) * other, clamped to [0, 1]; `ratio` has one value per sample."""
    ratio = _per_sample(ratio)
    return (images * ratio).add_(other * (1.0 - ratio)).clamp_(0.0, 1.0)


def adjust_brightness(images: Tensor, factor: Tensor) -> Tensor:
    return images.mul(_per_sample(factor)).clamp_(0.0, 1.0)


def adjust_contrast(images: Tensor, factor: Tensor) -> Tensor:
    mean = rgb_to_grayscale(images).mean(dim=(-3, -2, -1), keepdim=True)  # N x 1 x 1 x 1
    return _blend(images, mean, factor)


def adjust_saturation(images: Tensor, factor: Tensor) -> Tensor:
    return _blend(images, rgb_to_grayscale(images), factor)


def adjust_hue(images: Tensor, factor: Tensor) -> Tensor:
    """Rotate the hue of each sample by `factor` (N values in [-0.5, 0.5]) turns.

    torchvision's RGB -> HSV -> RGB round trip (itself after Pillow's, in float rather than PIL's uint8), in closed
    form: V = max and the chroma C = max - min are kept, and with the hue in sixths H' = 6 * hue + 6 * factor
    (mod 6), channel n (R, G, B = 5, 3, 1) becomes V - C * clamp(min(k, 4 - k), 0, 1), k = (n + H') mod 6.
    No gather and no int64 index planes; within 2e-6 of torchvision's round trip.
    """
    r, g, b = images.unbind(dim=-3)  # N x H x W each
    minc, maxc = torch.aminmax(images, dim=-3)
    chroma = maxc - minc
    safe_chroma = torch.where(chroma == 0, torch.ones_like(chroma), chroma)  # grey pixels: C = 0, any hue will do
    hue6 = torch.where(
        maxc == r,
        (g - b) / safe_chroma,
        torch.where(maxc == g, (b - r) / safe_chroma + 2.0, (r - g) / safe_chroma + 4.0),
    )  # in [-1, 5)
    hue6 = hue6.add_(6.0 * factor.reshape(-1, 1, 1)).unsqueeze(-3)  # N x 1 x H x W
    channel = torch.arange(5.0, 0.0, -2.0, device=images.device).view(3, 1, 1)  # R, G, B = 5, 3, 1
    k = (hue6 + channel).remainder_(6.0)  # N x 3 x H x W
    weight = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return maxc.unsqueeze(-3) - chroma.unsqueeze(-3) * weight


class ColorJitterParams(NamedTuple):
    """Per-sample parameters of `ColorJitter`."""

    apply: Tensor  # N bools: whether the jitter is applied at all (RandomApply)
    order: Tensor  # N x 4 int64: each row a permutation of BRIGHTNESS, CONTRAST, SATURATION, HUE
    factors: Tensor  # N x 4 float32: brightness, contrast, saturation, hue factors


def _jitter_blend(images: Tensor, op: Tensor, active: Tensor, factors: Tensor) -> Tensor:
    """One step of the jitter: per sample, `blend(x, other, factor)` for `op` in BRIGHTNESS, CONTRAST, SATURATION
    (other = 0, the grey mean, the grey image), or the identity (ratio 1) where `active` is False."""
    gray = rgb_to_grayscale(images)  # N x 1 x H x W
    mean = gray.mean(dim=(-3, -2, -1), keepdim=True)  # N x 1 x 1 x 1
    other = torch.where(_per_sample(op == SATURATION), gray, torch.where(_per_sample(op == CONTRAST), mean, 0.0))
    ratio = torch.where(active, factors.gather(1, op.clamp(max=SATURATION)[:, None]).squeeze(1), 1.0)  # N
    ratio = _per_sample(ratio)
    return torch.addcmul(other * (1.0 - ratio), images, ratio).clamp_(0.0, 1.0)


def color_jitter(images: Tensor, params: ColorJitterParams, with_hue: bool = True) -> Tensor:
    """The four colour ops in each sample's own order, on the samples where `params.apply`.

    Brightness, contrast and saturation are all `blend(x, other, factor)` with other = 0, the grey mean or the grey
    image, so each step is one blend with a per-sample `other` (ratio 1, an exact identity, for a sample whose step
    it is not), and the hue rotation is applied by mask to the samples whose step it is. No host sync.

    Eagerly, where every op is a pass over the batch, the hue (~20 passes) is computed once: each sample's steps
    are laid out on 3 blend slots before one shared hue step and 3 after it (a sample whose hue comes at step h
    fills the last h slots before it and the first 3 - h after). Compiled, the hue costs arithmetic but no memory
    pass, and each blend needs a pass (the contrast's mean), so the 4 steps run as they come with the hue fused
    into each. `with_hue=False` (a jitter whose hue range is 0) skips the hue.
    """
    apply, order, factors = params
    if not with_hue or torch.compiler.is_compiling():
        for step in range(4):
            op = order[:, step]  # N
            images = _jitter_blend(images, op, apply & (op != HUE), factors)
            if with_hue:
                images = torch.where(_per_sample(apply & (op == HUE)), adjust_hue(images, factors[:, HUE]), images)
        return images
    hue_step = (order == HUE).int().argmax(dim=1)  # N, in 0..3
    for offset in (-3, -2, -1, 1, 2, 3):  # steps relative to the hue's
        if offset == 1:
            images = torch.where(_per_sample(apply), adjust_hue(images, factors[:, HUE]), images)
        step = hue_step + offset  # N; out of 0..3: an empty slot
        op = order.gather(1, step.clamp(0, 3)[:, None]).squeeze(1)
        images = _jitter_blend(images, op, apply & (step >= 0) & (step <= 3), factors)
    return images


@dataclass(frozen=True)
class ColorJitter:
    """torchvision's `RandomApply([ColorJitter(brightness, contrast, saturation, hue)], p)`, per sample.

    Args:
        brightness: factor ~ U(max(0, 1 - brightness), 1 + brightness); 0.4 in MoCo v1 and v2.
        contrast: factor ~ U(max(0, 1 - contrast), 1 + contrast); 0.4.
        saturation: factor ~ U(max(0, 1 - saturation), 1 + saturation); 0.4.
        hue: hue shift ~ U(-hue, hue) turns, in [0, 0.5]; 0.4 in v1, 0.1 in v2.
        p: probability of applying the jitter; 1.0 in v1, 0.8 in v2.
    """

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    p: float = 0.8

    def __post_init__(self):
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue}")
        _check_probability("p", self.p)

    num_uniforms = 9  # apply, 4 for the order, 4 factors

    def sample(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> ColorJitterParams:
        return self.from_uniforms(_uniforms(n, self.num_uniforms, device, generator))

    def from_uniforms(self, u: Tensor) -> ColorJitterParams:
        apply = u[:, 0] < self.p
        order = u[:, 1:5].argsort(dim=1)  # uniform random permutations
        factors = torch.stack(
            [
                _scaled(u[:, 5], max(0.0, 1.0 - self.brightness), 1.0 + self.brightness),
                _scaled(u[:, 6], max(0.0, 1.0 - self.contrast), 1.0 + self.contrast),
                _scaled(u[:, 7], max(0.0, 1.0 - self.saturation), 1.0 + self.saturation),
                _scaled(u[:, 8], -self.hue, self.hue),
            ],
            dim=1,
        )  # N x 4
        return ColorJitterParams(apply, order, factors)

    def apply(self, images: Tensor, params: ColorJitterParams) -> Tensor:
        return color_jitter(images, params, with_hue=self.hue > 0)


# --------------------------------------------------------------------------------------------------------------------
# Grayscale
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RandomGrayscale(_RandomApply):
    """Replace each sample by its luma, replicated to 3 channels, with probability p (0.2 in MoCo)."""

    p: float = 0.2

    def apply(self, images: Tensor, grayscale: Tensor) -> Tensor:
        return torch.where(_per_sample(grayscale), rgb_to_grayscale(images).expand_as(images), images)


# --------------------------------------------------------------------------------------------------------------------
# Gaussian blur
# --------------------------------------------------------------------------------------------------------------------


def default_blur_kernel_size(size: int) -> int:
    """The odd kernel side closest below 10% of the image side (SimCLR's rule): 23 for 224, 3 for 32."""
    return max(3, int(0.1 * size) // 2 * 2 + 1)


def gaussian_kernels(sigma: Tensor, kernel_size: int) -> Tensor:
    """One normalised 1-D Gaussian per sample (N sigmas -> N x kernel_size), as torchvision builds it."""
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    x = torch.linspace(-lim, lim, steps=kernel_size, device=sigma.device, dtype=torch.float32)
    return torch.softmax(-(x / sigma.float()[:, None]).pow(2), dim=1)  # exp(-d^2 / (2 sigma^2)), normalised


def gaussian_blur(images: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Blur each sample with its own isotropic Gaussian (N sigmas), reflect padding, as `F.gaussian_blur`."""
    if kernel_size % 2 != 1:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    return separable_blur(images, gaussian_kernels(sigma, kernel_size))


def separable_blur(images: Tensor, kernels: Tensor) -> Tensor:
    """Convolve each sample along rows then columns with its own odd 1-D kernel (N x k), reflect padding.

    Eagerly a grouped (depthwise) convolution per pass, N * 3 groups; compiled, a sum of k shifted slices per pass,
    which inductor fuses into one kernel with the ops around it (a convolution is an external kernel, and makes
    inductor lay the whole graph out channels-last).
    """
    n, c, h, w = images.shape
    kernel_size = kernels.shape[1]
    pad = kernel_size // 2
    if torch.compiler.is_compiling():
        taps = kernels.view(n, 1, 1, 1, kernel_size).unbind(-1)  # k x (N x 1 x 1 x 1)
        x = F.pad(images, [pad, pad, 0, 0], mode="reflect")  # N x C x H x W+2p
        x = sum(x[..., i : i + w] * tap for i, tap in enumerate(taps))  # N x C x H x W
        x = F.pad(x, [0, 0, pad, pad], mode="reflect")  # N x C x H+2p x W
        return sum(x[..., i : i + h, :] * tap for i, tap in enumerate(taps))
    kernels = kernels.repeat_interleave(c, dim=0)  # N*C x k
    x = F.pad(images, [pad, pad, pad, pad], mode="reflect").reshape(1, n * c, h + 2 * pad, w + 2 * pad)
    x = F.conv2d(x, kernels.view(n * c, 1, 1, kernel_size), groups=n * c)  # 1 x N*C x H+2p x W
    x = F.conv2d(x, kernels.view(n * c, 1, kernel_size, 1), groups=n * c)  # 1 x N*C x H x W
    return x.view(n, c, h, w)


class GaussianBlurParams(NamedTuple):
    apply: Tensor  # N bools
    sigma: Tensor  # N float32
    # N x kernel_size: the Gaussians of `sigma`, built when sampling, so that a compiled `apply` loads them rather
    # than recomputing exponentials at every pixel (inductor inlines such cheap pointwise ops); None: from sigma
    kernels: Tensor | None = None


@dataclass(frozen=True)
class GaussianBlur:
    """MoCo v2's blur: with probability p, a Gaussian of standard deviation sigma ~ U(sigma range).

    The official code blurs with PIL's `GaussianBlur(radius=sigma)`, where the radius *is* the standard deviation
    and the filter is not truncated. torchvision's kernel is used here instead (same sigma, truncated at
    `kernel_size`, default 10% of the crop: 23 taps for 224, i.e. >= 5.5 sigma each side for sigma <= 2, so the
    truncation is invisible), because it is an exact convolution that `F.gaussian_blur` can check, whereas PIL
    approximates the Gaussian with three box blurs on uint8.

    Args:
        kernel_size: odd kernel side in pixels; `default_blur_kernel_size(size)`.
        sigma: range of the standard deviation in pixels; (0.1, 2.0) as in MoCo v2 / SimCLR.
        p: probability of blurring a sample; 0.5 in MoCo v2.
    """

    kernel_size: int
    sigma: tuple[float, float] = (0.1, 2.0)
    p: float = 0.5

    def __post_init__(self):
        if self.kernel_size < 1 or self.kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd and positive, got {self.kernel_size}")
        if not 0.0 < self.sigma[0] <= self.sigma[1]:
            raise ValueError(f"sigma must satisfy 0 < sigma[0] <= sigma[1], got {self.sigma}")
        _check_probability("p", self.p)

    num_uniforms = 2

    def sample(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> GaussianBlurParams:
        return self.from_uniforms(_uniforms(n, 2, device, generator))

    def from_uniforms(self, u: Tensor) -> GaussianBlurParams:
        sigma = _scaled(u[:, 1], *self.sigma)
        return GaussianBlurParams(u[:, 0] < self.p, sigma, gaussian_kernels(sigma, self.kernel_size))

    def apply(self, images: Tensor, params: GaussianBlurParams) -> Tensor:
        kernels = params.kernels if params.kernels is not None else gaussian_kernels(params.sigma, self.kernel_size)
        return torch.where(_per_sample(params.apply), separable_blur(images, kernels), images)


# --------------------------------------------------------------------------------------------------------------------
# Solarize
# --------------------------------------------------------------------------------------------------------------------


# PIL's `ImageOps.solarize` inverts the 8-bit levels at or above 128 (BYOL, MoCo v3); on float images in [0, 1]
SOLARIZE_THRESHOLD = 128 / 255


def solarize(images: Tensor, apply: Tensor, threshold: float = SOLARIZE_THRESHOLD) -> Tensor:
    """1 - x where x >= threshold, on the samples where `apply` (N bools): `F.solarize` on float images."""
    return torch.where(_per_sample(apply) & (images >= threshold), 1.0 - images, images)


@dataclass(frozen=True)
class RandomSolarize(_RandomApply):
    """Solarize each sample with probability p (0.2 on MoCo v3's view 2): the pixels at or above `threshold`
    (128 of 255, PIL's default) inverted, channel by channel."""

    p: float = 0.2
    threshold: float = SOLARIZE_THRESHOLD

    def apply(self, images: Tensor, params: Tensor) -> Tensor:
        return solarize(images, params, self.threshold)


# --------------------------------------------------------------------------------------------------------------------
# Normalize
# --------------------------------------------------------------------------------------------------------------------


def normalize(images: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> Tensor:
    """(images - mean) / std per channel, as `F.normalize`."""
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return images.sub(mean).div_(std)


def _normalize_to(images: Tensor, scale: Tensor, shift: Tensor, dtype: torch.dtype, channels_last: bool) -> Tensor:
    """images * scale + shift per channel (scale = 1 / std, shift = -mean / std), in `dtype` and layout.

    Eagerly one pass, written straight into the output (float32 maths, cast on store); compiled, fused with the ops
    before it.
    """
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if torch.compiler.is_compiling():
        return (images * scale + shift).to(dtype=dtype, memory_format=memory_format)
    out = torch.empty(images.shape, dtype=dtype, device=images.device, memory_format=memory_format)
    return torch.addcmul(shift, images, scale, out=out)


# --------------------------------------------------------------------------------------------------------------------
# The MoCo pipelines
# --------------------------------------------------------------------------------------------------------------------


def build_ops(preset: str | AugmentPreset, size: int) -> tuple:
    """The ops after the crop, in the order of the official recipe for `preset` (a name of `presets.PRESETS`, view 1
    of a two-view recipe, or an `AugmentPreset`): the jitter and the grayscale (v1: grayscale first), the blur and the
    solarize where the preset has them, the flip last."""
    p = get_preset(preset)
    jitter, grey = ColorJitter(*p.jitter, p=p.jitter_prob), RandomGrayscale(p.grayscale_prob)
    ops = [grey, jitter] if p.grayscale_first else [jitter, grey]
    if p.blur_prob > 0:
        ops.append(GaussianBlur(default_blur_kernel_size(size), p.blur_sigma, p=p.blur_prob))
    if p.solarize_prob > 0:
        ops.append(RandomSolarize(p.solarize_prob))
    ops.append(RandomHorizontalFlip(p.flip_prob))
    return tuple(ops)


class AugmentParams(NamedTuple):
    """Every random parameter of one view: the crop boxes, then one entry per op of `MoCoGPUAugment.ops`."""

    boxes: Tensor  # N x 4 int64: top, left, height, width
    ops: tuple


class MoCoGPUAugment:
    """MoCo's two-view augmentation on a whole batch, on the batch's device.

    Args:
        preset: "v1" (crop, grayscale 0.2, jitter 0.4/0.4/0.4/0.4, flip), "v2" (crop, jitter 0.4/0.4/0.4/0.1
            with p=0.8, grayscale 0.2, blur sigma 0.1-2 with p=0.5, flip) or "cifar" (v2 without the blur);
            v1 and v2 crop with scale (0.2, 1), cifar with torchvision's default (0.08, 1) as the official demo.
            "v3": view 1 crop (0.08, 1), jitter 0.4/0.4/0.2/0.1 with p=0.8, grayscale 0.2, blur with p=1, flip;
            view 2 the same with blur p=0.1 and solarize p=0.2 (`two_views`, or `view=1`); "v3_cifar" without blur.
        size: output side in pixels; default 224, or 32 for "cifar" and "v3_cifar".
        mean: per-channel normalisation mean; default ImageNet's, or CIFAR-10's for the 32 px recipes.
        std: per-channel normalisation std; default ImageNet's, or CIFAR-10's for the 32 px recipes.
        generator: source of every random draw; must live on the batches' device. Default: torch's global RNG.
        dtype: output dtype; default float32 (all the maths runs in float32).
        channels_last: return channels_last tensors; default False.
        crop_scale: RandomResizedCrop area range; default per preset (see above).
        compile: run everything after the crop's gather (the bilinear blend, the colour ops, blur, flip, normalize
            and the dtype / layout conversion) as one `torch.compile(dynamic=False, fullgraph=True)` function of
            the gathered taps and the parameter tensors: about 20 fused kernels per view where eager runs about
            180 ops, some 60 of them passes over the whole batch. The random draws stay eager. The first call per
            batch shape compiles (15-20 s on an H100); a new shape compiles again. Default False.
    """

    def __init__(
        self,
        preset: str = "v2",
        size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        crop_scale: tuple[float, float] | None = None,
        compile: bool = False,
    ):
        cifar = preset in CIFAR_RECIPES
        if preset not in VIEW_PRESETS:
            raise ValueError(f"preset must be one of {tuple(VIEW_PRESETS)}, got {preset!r}")
        self.preset = preset
        self.size = size if size is not None else (32 if cifar else 224)
        views = VIEW_PRESETS[preset]
        self.crop = RandomResizedCrop(self.size, scale=tuple(crop_scale or views[0].crop_scale))
        # the ops of view 1 and view 2 (the same tuple for the symmetric recipes); `ops` is view 1's
        self.view_ops = tuple(build_ops(view, self.size) for view in views)
        self.ops = self.view_ops[0]
        self._asymmetric = self.view_ops[0] != self.view_ops[1]
        self.mean = tuple(mean if mean is not None else (CIFAR10_MEAN if cifar else IMAGENET_MEAN))
        self.std = tuple(std if std is not None else (CIFAR10_STD if cifar else IMAGENET_STD))
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std must have 3 values, std > 0; got {self.mean}, {self.std}")
        self.generator = generator
        self.dtype = dtype
        self.channels_last = channels_last
        self.compile = compile
        self._scale_shift: dict[torch.device, tuple[Tensor, Tensor]] = {}  # no host-to-device copy per batch
        self._num_uniforms = tuple(self.crop.num_uniforms + sum(op.num_uniforms for op in ops) for ops in self.view_ops)
        self._params, self._tap_index, self._augment_taps = self._params_eager, tap_index, self._augment_taps_eager
        if compile:  # bound methods: dynamo guards on the ops, dtype and layout they read off `self`
            self._params = torch.compile(self._params_eager, dynamic=False, fullgraph=True)
            self._tap_index = torch.compile(tap_index, dynamic=False, fullgraph=True)
            self._augment_taps = torch.compile(self._augment_taps_eager, dynamic=False, fullgraph=True)

    def __repr__(self) -> str:
        ops = ", ".join(repr(op) for op in (self.crop, *self.ops))
        key_ops = f", key_ops=[{', '.join(repr(op) for op in self.view_ops[1])}]" if self._asymmetric else ""
        return (
            f"MoCoGPUAugment(preset={self.preset!r}, ops=[{ops}]{key_ops}, mean={self.mean}, std={self.std}, "
            f"compile={self.compile})"
        )

    def _view_index(self, view: int) -> int:
        """0 or 1; always 0 for a symmetric recipe, so that one compiled graph serves both views."""
        if view not in (0, 1):
            raise ValueError(f"view must be 0 (view 1, the query's) or 1 (view 2, the key's), got {view!r}")
        return view if self._asymmetric else 0

    def _generator(self, device: torch.device, generator: torch.Generator | None) -> torch.Generator | None:
        generator = generator if generator is not None else self.generator
        if generator is not None and generator.device.type != device.type:
            raise ValueError(f"the generator is on {generator.device}, the images on {device}")
        return generator

    def sample(self, images: ImageBatch, generator: torch.Generator | None = None, view: int = 0) -> AugmentParams:
        """Draw every random parameter of one view of `images` (`view` 0: view 1's ops, 1: view 2's)."""
        packed = pack_images(images)
        n, device = len(packed), packed.device
        generator = self._generator(device, generator)
        index = self._view_index(view)
        return self._params(_uniforms(n, self._num_uniforms[index], device, generator), packed.heights,
                            packed.widths, index)

    def _params_eager(self, u: Tensor, heights: Tensor, widths: Tensor, view: int = 0) -> AugmentParams:
        """Every parameter of one view from N x `_num_uniforms[view]` draws: the crop's columns first, then each
        op's."""
        start = self.crop.num_uniforms
        boxes = self.crop.from_uniforms(u[:, :start], heights, widths)
        params = []
        for op in self.view_ops[view]:
            params.append(op.from_uniforms(u[:, start: start + op.num_uniforms]))
            start += op.num_uniforms
        return AugmentParams(boxes, tuple(params))

    @torch.no_grad()
    def apply(self, images: ImageBatch, params: AugmentParams, view: int = 0) -> Tensor:
        """The view of `images` for fixed `params` (drawn for the same `view`): N x 3 x size x size, normalised, in
        `dtype`."""
        # the gather stays eager (its input's size varies per batch); its indices have fixed shapes
        taps = crop_taps(images, params.boxes, self.size, index_fn=self._tap_index)
        device = taps.pixels.device
        if device not in self._scale_shift:
            mean, std = (torch.tensor(v, dtype=torch.float64).view(3, 1, 1) for v in (self.mean, self.std))
            self._scale_shift[device] = ((1.0 / std).float().to(device), (-mean / std).float().to(device))
        return self._augment_taps(taps, params.ops, *self._scale_shift[device], self._view_index(view))

    def _augment_taps_eager(self, taps: CropTaps, op_params: tuple, scale: Tensor, shift: Tensor,
                            view: int = 0) -> Tensor:
        """Everything after the gather: blend, the view's ops in order, normalize, dtype and layout."""
        x = blend_taps(taps)  # N x 3 x S x S float32 in [0, 1]
        for op, p in zip(self.view_ops[view], op_params):
            x = op.apply(x, p)
        return _normalize_to(x, scale, shift, self.dtype, self.channels_last)

    def __call__(self, images: ImageBatch, generator: torch.Generator | None = None, view: int = 0) -> Tensor:
        packed = pack_images(images)
        return self.apply(packed, self.sample(packed, generator, view), view)

    def two_views(self, images: ImageBatch, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Two independently augmented views (query, key) of the same images, view 1's ops then view 2's (the same
        for the symmetric recipes); the images are packed once."""
        packed = pack_images(images)
        return self(packed, generator, 0), self(packed, generator, 1)


__doc__ = (__doc__ or "") + """
Differences from the official PIL pipeline, measured on matplotlib's grace_hopper.jpg (600 x 512) with the same
parameters on both sides, in 8-bit levels (|ours * 255 - PIL|):

- Everything runs in float32 from the crop on; PIL rounds to uint8 after every op. Brightness, contrast,
  saturation (factors 0.6, 1.4) and grayscale: mean 0.2-0.4, max 1.2 (PIL's rounding).
- Hue: PIL goes through HSV with 8-bit channels (hue in 256 steps); here HSV is float, as in torchvision's tensor
  path. Shifts -0.4..0.4: mean 0.25-0.6, 99th percentile 2-5, max 14 (dark, weakly saturated pixels).
- Resize: bilinear without antialiasing (4 taps per output pixel, = F.resized_crop(antialias=False)); PIL's
  bilinear filter widens with the shrink factor. Upscaled crops: mean 0.3, max 1 (rounding). Shrunk 1.34x: mean 1.2,
  p99 8, max 47; shrunk 2.7x (the whole image to 224): mean 3.7, p99 33, max 93 (aliasing on edges and fine
  texture). torchvision's antialias=True path is within 1 level of PIL, but has no batched form over boxes of
  different sizes. This is the largest difference, and it grows with the source resolution.
- Blur: torchvision's truncated Gaussian (23 taps at 224, reflect padding) versus PIL's box-blur approximation
  (radius = sigma, edge padding): mean 0.4-0.65 for sigma 0.5-2, interior max 5, up to 29 in the outer 12 pixels.
- Whole v2 view (32 views, same parameters): median per-view mean difference 1.8 levels, worst view 4.3 levels;
  dominated by the resize.
- The crop sampler, the flip, the order and ranges of the jitter, and every probability follow torchvision
  (in distribution; the random streams differ).
"""

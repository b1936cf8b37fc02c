"""moco_hf.data.gpu_augment against torchvision: each op on fixed parameters, each sampler in distribution."""

import io
import itertools
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import RandomResizedCrop as TorchvisionRandomResizedCrop

from _tolerance import tolerance

from moco_hf.data import decode as D
from moco_hf.data import gpu_augment as G

TV_COLOR_OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)  # BRIGHTNESS..HUE


def smooth_images(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """n x 3 x height x width uint8: upsampled colour noise, so every op (hue sectors, blur, crop) has work to do."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 6, 7, generator=g)
    noise = torch.rand(n, 3, height, width, generator=g) * 0.15
    x = torch.nn.functional.interpolate(low, size=(height, width), mode="bilinear", align_corners=False) + noise
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def pixel_tol(terms: int, depth: int, scale: float = 1.0) -> dict:
    """Tolerance between two float32 implementations of an image op (tests/_tolerance.py): pixels in [0, 1] (times
    `scale`: 4.5 after normalising with std 0.22, a crop's source coordinates up to 50), `terms` in the longest sum
    (a blur's taps, a mean over the image), `depth` arithmetic operations chained per pixel."""
    return tolerance(torch.float32, terms=terms, depth=depth, scale=scale)


def as_float(images: torch.Tensor) -> torch.Tensor:
    return TF.to_dtype(images, torch.float32, scale=True)


def per_sample(fn, images, *args):
    """Reference: a torchvision functional applied one sample at a time with python-float parameters."""
    return torch.stack([fn(images[i], *(float(a[i]) for a in args)) for i in range(images.shape[0])])


# ---------------------------------------------------------------------------------------------------------------------
# Each op on fixed parameters
# ---------------------------------------------------------------------------------------------------------------------


# Each op: (the longest sum, the chained operations per pixel). Contrast blends with the mean grey level of the
# 20 x 24 image; saturation with the pixel's grey (3 weighted channels); hue goes to HSV and back (about 40 operations,
# a closed form here, torchvision's round trip there).
@pytest.mark.parametrize(
    "ours, reference, factors, terms, depth",
    [
        (G.adjust_brightness, TF.adjust_brightness, [0.0, 0.6, 1.0, 1.4, 2.0], 1, 3),
        (G.adjust_contrast, TF.adjust_contrast, [0.0, 0.6, 1.0, 1.4, 2.0], 20 * 24, 8),
        (G.adjust_saturation, TF.adjust_saturation, [0.0, 0.6, 1.0, 1.4, 2.0], 3, 6),
        (G.adjust_hue, TF.adjust_hue, [-0.5, -0.1, 0.0, 0.25, 0.5], 3, 40),
    ],
)
def test_color_ops_match_torchvision(ours, reference, factors, terms, depth):
    images = as_float(smooth_images(len(factors), 20, 24))
    factors = torch.tensor(factors)
    torch.testing.assert_close(ours(images, factors), per_sample(reference, images, factors),
                               **pixel_tol(terms, depth))


def test_hue_handles_grey_and_saturated_pixels():
    # grey pixels (max == min) and pure primaries sit on the branches of the HSV conversion
    pixels = torch.tensor(
        [[0, 0, 0], [1, 1, 1], [0.5, 0.5, 0.5], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0.2, 0.9, 0.9]]
    )  # 8 x RGB
    images = pixels.T.reshape(1, 3, 2, 4).repeat(3, 1, 1, 1)
    factors = torch.tensor([-0.3, 0.1, 0.45])
    out = G.adjust_hue(images, factors)
    torch.testing.assert_close(out, per_sample(TF.adjust_hue, images, factors), **pixel_tol(3, 40))
    assert torch.equal(out[:, :, 0, :3], images[:, :, 0, :3])  # greys stay grey


def test_grayscale_flip_normalize_match_torchvision():
    images = as_float(smooth_images(4, 16, 18))
    mask = torch.tensor([True, False, True, False])
    grey = G.RandomGrayscale().apply(images, mask)
    torch.testing.assert_close(grey[mask], TF.rgb_to_grayscale(images[mask], num_output_channels=3), atol=0, rtol=0)
    assert torch.equal(grey[~mask], images[~mask])
    flipped = G.RandomHorizontalFlip().apply(images, mask)
    assert torch.equal(flipped[mask], TF.horizontal_flip(images[mask]))
    assert torch.equal(flipped[~mask], images[~mask])
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    torch.testing.assert_close(G.normalize(images, mean, std), TF.normalize(images, mean, std),
                               **pixel_tol(1, 2, scale=4.5))


@pytest.mark.parametrize("kernel_size", [3, 7, 23])
def test_gaussian_blur_matches_torchvision(kernel_size):
    images = as_float(smooth_images(4, 24, 28))
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    out = G.gaussian_blur(images, sigma, kernel_size)
    reference = torch.stack(
        [TF.gaussian_blur(image, [kernel_size] * 2, [float(s)] * 2) for image, s in zip(images, sigma)]
    )
    # two passes of k taps here; torchvision convolves once with the k x k outer product
    torch.testing.assert_close(out, reference, **pixel_tol(kernel_size**2, 4))
    params = G.GaussianBlurParams(torch.tensor([True, False, True, False]), sigma)
    blurred = G.GaussianBlur(kernel_size).apply(images, params)
    assert torch.equal(blurred[1], images[1]) and torch.equal(blurred[0], out[0])


def test_default_blur_kernel_size():
    assert G.default_blur_kernel_size(224) == 23  # SimCLR / torchvision's MoCo v2 kernel
    assert G.default_blur_kernel_size(32) == 3
    assert all(G.default_blur_kernel_size(s) % 2 == 1 for s in range(8, 300))


BOXES = [
    [0, 0, 40, 50],  # the whole image (shrink)
    [5, 7, 10, 12],  # a small crop (upscale, edge taps clamp inside the crop)
    [3, 2, 37, 30],  # a tall crop
    [30, 38, 10, 12],  # at the bottom-right corner
    [0, 0, 16, 16],  # the output size: a copy
]


def test_resized_crop_matches_torchvision_without_antialias():
    images = smooth_images(len(BOXES), 40, 50)
    boxes = torch.tensor(BOXES)
    out = G.resized_crop(images, boxes, 16)
    reference = torch.stack(
        [TF.resized_crop(as_float(images[i]), *box, [16, 16], antialias=False) for i, box in enumerate(BOXES)]
    )
    assert out.shape == (len(BOXES), 3, 16, 16) and out.dtype == torch.float32
    # the same taps and weights as F.interpolate; only the rounding of the source coordinates (up to 50) and of
    # the 4-tap blend differs
    torch.testing.assert_close(out, reference, **pixel_tol(4, 6, scale=50))
    torch.testing.assert_close(out[4], as_float(images[4, :, :16, :16]), **pixel_tol(4, 6))
    # antialiasing (PIL's behaviour) only matters for the shrunk crop, and only in the fine texture
    antialiased = TF.resized_crop(as_float(images[0]), *BOXES[0], [16, 16], antialias=True)
    assert (out[0] - antialiased).abs().mean() < 0.05


def test_resized_crop_on_a_list_of_sizes_and_on_float_input():
    images = [smooth_images(1, 30 + 7 * i, 45 - 5 * i, seed=i)[0] for i in range(4)]
    boxes = torch.tensor([[0, 0, 30, 45], [5, 7, 10, 12], [3, 2, 20, 20], [0, 0, 51, 30]])
    out = G.resized_crop(images, boxes, 16)
    reference = torch.stack(
        [TF.resized_crop(as_float(img), *box, [16, 16], antialias=False) for img, box in zip(images, boxes.tolist())]
    )
    torch.testing.assert_close(out, reference, **pixel_tol(4, 6, scale=51))
    torch.testing.assert_close(G.resized_crop([as_float(img) for img in images], boxes, 16), out, **pixel_tol(4, 6))


def test_pack_images_rejects_bad_input():
    with pytest.raises(ValueError):
        G.pack_images(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError):
        G.pack_images([torch.zeros(3, 8, 8, dtype=torch.uint8), torch.zeros(3, 8, 8)])
    with pytest.raises(ValueError):
        G.pack_images([])


# The four colour ops one after the other: the longest sum is contrast's mean over a 12 x 14 image.
JITTER_TOL = pixel_tol(12 * 14, 4 * 40)


def reference_color_jitter(images: torch.Tensor, params: G.ColorJitterParams) -> torch.Tensor:
    out = []
    for i, image in enumerate(images):
        if params.apply[i]:
            for op in params.order[i].tolist():
                image = TV_COLOR_OPS[op](image, float(params.factors[i, op]))
        out.append(image)
    return torch.stack(out)


def test_color_jitter_follows_each_samples_order():
    n = 24
    images = as_float(smooth_images(n, 12, 14))
    orders = torch.tensor(list(itertools.permutations(range(4))))  # all 24 orders, one per sample
    factors = torch.tensor([[1.4, 0.6, 1.3, 0.1]]).repeat(n, 1)
    apply = torch.arange(n) % 5 != 0
    params = G.ColorJitterParams(apply, orders, factors)
    out = G.color_jitter(images, params)
    torch.testing.assert_close(out, reference_color_jitter(images, params), **JITTER_TOL)
    assert torch.equal(out[~apply], images[~apply])
    assert len({tuple(o.flatten().tolist()) for o in out[apply].round(decimals=4)}) == int(apply.sum())


def test_compiled_color_jitter_follows_each_samples_order():
    # compiled, the jitter runs its 4 steps in order with the hue fused into each (eagerly: 3 + hue + 3 slots)
    n = 24
    images = as_float(smooth_images(n, 12, 14))
    params = G.ColorJitterParams(
        torch.arange(n) % 5 != 0,
        torch.tensor(list(itertools.permutations(range(4)))),
        torch.tensor([[1.4, 0.6, 1.3, 0.1]]).repeat(n, 1),
    )
    # aot_eager: the compiled code path (torch.compiler.is_compiling) in one graph, without inductor's C++ build on
    # a CPU (tens of seconds on a cold cache); inductor's own kernels are checked by the compiled-augmentation test
    out = torch.compile(G.color_jitter, dynamic=False, fullgraph=True, backend="aot_eager")(images, params)
    torch.testing.assert_close(out, reference_color_jitter(images, params), **JITTER_TOL)


def test_color_jitter_without_hue():
    n = 24
    images = as_float(smooth_images(n, 12, 14))
    orders = torch.tensor(list(itertools.permutations(range(4))))
    factors = torch.tensor([[0.7, 1.3, 0.6, 0.0]]).repeat(n, 1)  # hue range 0: torchvision never rotates the hue
    apply = torch.arange(n) % 3 != 0
    params = G.ColorJitterParams(apply, orders, factors)
    out = G.color_jitter(images, params, with_hue=False)
    torch.testing.assert_close(out, reference_color_jitter(images, params), **JITTER_TOL)
    assert torch.equal(out[~apply], images[~apply])


def test_crop_taps_gather_uint8_and_blend_to_resized_crop():
    images = smooth_images(len(BOXES), 40, 50)
    boxes = torch.tensor(BOXES)
    taps = G.crop_taps(images, boxes, 16)
    assert taps.pixels.shape == (4, 3, len(BOXES), 16, 16) and taps.pixels.dtype == torch.uint8
    assert taps.row_weights.shape == (2, len(BOXES), 16, 1) and taps.col_weights.shape == (2, len(BOXES), 1, 16)
    # each output pixel's weights sum to 1 (/ 255 for uint8 pixels)
    torch.testing.assert_close(taps.row_weights.sum(0) * 255, torch.ones(len(BOXES), 16, 1), **pixel_tol(2, 4))
    torch.testing.assert_close(taps.col_weights.sum(0), torch.ones(len(BOXES), 1, 16), **pixel_tol(2, 4))
    assert torch.equal(G.blend_taps(taps), G.resized_crop(images, boxes, 16))


# ---------------------------------------------------------------------------------------------------------------------
# Samplers, in distribution
# ---------------------------------------------------------------------------------------------------------------------


def torchvision_boxes(height: int, width: int, count: int, scale=(0.2, 1.0)) -> torch.Tensor:
    image = torch.empty(3, height, width)
    return torch.tensor(
        [TorchvisionRandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3]) for _ in range(count)]
    )


def sample_boxes(height: int, width: int, count: int, scale=(0.2, 1.0), seed: int = 0) -> torch.Tensor:
    crop = G.RandomResizedCrop(8, scale=scale)
    sizes = torch.full((count,), height), torch.full((count,), width)
    return crop.sample(*sizes, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("height, width", [(60, 100), (32, 32), (100, 40)])
def test_resized_crop_sampler_matches_torchvision_in_distribution(height, width):
    ours, theirs = sample_boxes(height, width, 20000), torchvision_boxes(height, width, 3000)
    top, left, h, w = ours.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    assert (h > 0).all() and (w > 0).all()
    for boxes in (ours, theirs):
        area = boxes[:, 2] * boxes[:, 3] / (height * width)
        # a sampled box of area >= 0.2 (up to integer rounding), or the central fallback
        assert area.min() > 0.2 * (1 - 2 / min(height, width)) - 1e-6 and area.max() <= 1
    area_ours, area_theirs = (b[:, 2] * b[:, 3] / (height * width) for b in (ours, theirs))
    log_ratio_ours, log_ratio_theirs = ((b[:, 3] / b[:, 2]).log() for b in (ours, theirs))
    assert abs(area_ours.mean() - area_theirs.mean()) < 0.02  # std 0.23: ~5 standard errors
    assert abs(log_ratio_ours.mean() - log_ratio_theirs.mean()) < 0.03
    assert abs(log_ratio_ours.std() - log_ratio_theirs.std()) < 0.03
    assert log_ratio_ours.abs().max() <= math.log(4 / 3) + 2 / min(height, width)
    # uniform position: the crop centre sits at the image centre on average
    centre = torch.stack([(top + h / 2) / height, (left + w / 2) / width])
    assert (centre.mean(dim=1) - 0.5).abs().max() < 0.01


def test_resized_crop_sampler_falls_back_like_torchvision():
    # 100 x 40 (aspect 0.4): about 1 in 10 draws has no fitting try in 10; the rest are sampled
    fallback = [23, 0, 53, 40]  # torchvision's central crop: w = 40, h = round(40 / (3/4))
    theirs = torchvision_boxes(100, 40, 3000)
    ours = sample_boxes(100, 40, 20000)
    rate_theirs = (theirs == torch.tensor(fallback)).all(1).float().mean()
    rate_ours = (ours == torch.tensor(fallback)).all(1).float().mean()
    assert 0.03 < rate_theirs < 0.3 and abs(rate_ours - rate_theirs) < 0.03
    # no try can fit: always the central crop, exactly torchvision's
    for height, width, scale in [(200, 20, (0.2, 1.0)), (20, 200, (0.2, 1.0)), (50, 60, (1.5, 2.0))]:
        expected = torchvision_boxes(height, width, 1, scale)[0]
        assert (sample_boxes(height, width, 50, scale) == expected).all()


def test_resized_crop_sampler_handles_mixed_sizes():
    heights = torch.tensor([32, 500, 375, 20, 640])
    widths = torch.tensor([32, 375, 500, 200, 480])
    boxes = G.RandomResizedCrop(224).sample(heights.repeat(200), widths.repeat(200), torch.Generator().manual_seed(1))
    top, left, h, w = boxes.T
    assert (top + h <= heights.repeat(200)).all() and (left + w <= widths.repeat(200)).all()
    assert (h >= 1).all() and (w >= 1).all()


def test_probabilities_and_ranges():
    n, g = 20000, torch.Generator().manual_seed(0)
    assert abs(G.RandomHorizontalFlip(0.5).sample(n, "cpu", g).float().mean() - 0.5) < 0.015
    assert abs(G.RandomGrayscale(0.2).sample(n, "cpu", g).float().mean() - 0.2) < 0.015

    blur = G.GaussianBlur(23, (0.1, 2.0), p=0.5).sample(n, "cpu", g)
    assert abs(blur.apply.float().mean() - 0.5) < 0.015
    assert blur.sigma.min() >= 0.1 and blur.sigma.max() <= 2.0 and abs(blur.sigma.mean() - 1.05) < 0.02

    jitter = G.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8).sample(n, "cpu", g)
    assert abs(jitter.apply.float().mean() - 0.8) < 0.015
    lows, highs = torch.tensor([0.6, 0.6, 0.6, -0.1]), torch.tensor([1.4, 1.4, 1.4, 0.1])
    assert (jitter.factors >= lows).all() and (jitter.factors <= highs).all()
    assert (jitter.factors.mean(0) - (lows + highs) / 2).abs().max() < 0.01
    assert (G.ColorJitter(0.4, 0.4, 0.4, 0.4, p=1.0).sample(100, "cpu", g).apply).all()


def test_jitter_order_is_a_uniform_per_sample_permutation():
    n = 12000
    order = G.ColorJitter().sample(n, "cpu", torch.Generator().manual_seed(0)).order
    assert torch.equal(order.sort(dim=1).values, torch.arange(4).expand(n, 4))
    counts = torch.unique(order, dim=0, return_counts=True)[1]
    assert len(counts) == 24 and (counts / n - 1 / 24).abs().max() < 0.01
    for op in range(4):  # each op equally often at each step
        assert ((order == op).float().mean(0) - 0.25).abs().max() < 0.02


def test_invalid_parameters_raise():
    with pytest.raises(ValueError):
        G.ColorJitter(hue=0.6)
    with pytest.raises(ValueError):
        G.RandomGrayscale(p=1.5)
    with pytest.raises(ValueError):
        G.GaussianBlur(kernel_size=4)
    with pytest.raises(ValueError):
        G.RandomResizedCrop(224, scale=(0.5, 0.2))
    with pytest.raises(ValueError):
        G.MoCoGPUAugment("v4")


# ---------------------------------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------------------------------


def reference_view(augment: G.MoCoGPUAugment, image: torch.Tensor, params: G.AugmentParams, i: int) -> torch.Tensor:
    """One view through torchvision's functionals, in the preset's order, with the sampled parameters."""
    x = TF.resized_crop(as_float(image), *params.boxes[i].tolist(), [augment.size] * 2, antialias=False)
    for op, p in zip(augment.ops, params.ops):
        if isinstance(op, G.ColorJitter):
            x = reference_color_jitter(x[None], G.ColorJitterParams(*(t[i : i + 1] for t in p)))[0]
        elif isinstance(op, G.RandomGrayscale) and p[i]:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        elif isinstance(op, G.GaussianBlur) and p.apply[i]:
            x = TF.gaussian_blur(x, [op.kernel_size] * 2, [float(p.sigma[i])] * 2)
        elif isinstance(op, G.RandomHorizontalFlip) and p[i]:
            x = TF.horizontal_flip(x)
    return TF.normalize(x, augment.mean, augment.std)


@pytest.mark.parametrize("preset, size", [("v1", 24), ("v2", 40), ("cifar", 32)])
def test_pipeline_matches_torchvision_on_sampled_parameters(preset, size):
    augment = G.MoCoGPUAugment(preset, size=size)
    images = [smooth_images(1, 36 + 3 * i, 50 - 2 * i, seed=i)[0] for i in range(16)]
    params = augment.sample(images, torch.Generator().manual_seed(0))
    out = augment.apply(images, params)
    reference = torch.stack([reference_view(augment, image, params, i) for i, image in enumerate(images)])
    # crop (coordinates up to 50), the jitter (contrast's mean over size x size), blur, normalise (std 0.22)
    torch.testing.assert_close(out, reference, **pixel_tol(size * size, 6 + 4 * 40 + 4 + 2, scale=50 * 4.5))


def test_presets():
    v1, v2, cifar = (G.MoCoGPUAugment(p) for p in ("v1", "v2", "cifar"))
    assert [type(op) for op in v1.ops] == [G.RandomGrayscale, G.ColorJitter, G.RandomHorizontalFlip]
    assert v1.ops[1] == G.ColorJitter(0.4, 0.4, 0.4, 0.4, p=1.0)
    assert [type(op) for op in v2.ops] == [G.ColorJitter, G.RandomGrayscale, G.GaussianBlur, G.RandomHorizontalFlip]
    assert v2.ops[0] == G.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8) and v2.ops[2].kernel_size == 23
    assert [type(op) for op in cifar.ops] == [G.ColorJitter, G.RandomGrayscale, G.RandomHorizontalFlip]
    assert (v1.size, v2.size, cifar.size) == (224, 224, 32) and v1.crop.scale == v2.crop.scale == (0.2, 1.0)
    assert cifar.crop.scale == (0.08, 1.0)  # torchvision default, as the official CIFAR demo
    assert cifar.mean == G.CIFAR10_MEAN and v2.std == G.IMAGENET_STD


def test_output_shape_dtype_layout_and_normalisation():
    images = smooth_images(6, 40, 48)
    augment = G.MoCoGPUAugment("v2", size=32, dtype=torch.bfloat16, channels_last=True)
    out = augment(images, torch.Generator().manual_seed(0))
    assert out.shape == (6, 3, 32, 32) and out.dtype == torch.bfloat16
    assert out.is_contiguous(memory_format=torch.channels_last)
    # normalised: every value maps back into [0, 1]
    mean, std = torch.tensor(augment.mean).view(3, 1, 1), torch.tensor(augment.std).view(3, 1, 1)
    pixels = out.float() * std + mean
    assert pixels.min() > -0.01 and pixels.max() < 1.01
    assert G.MoCoGPUAugment("cifar")(images).dtype == torch.float32


def test_two_views_are_independent_and_reproducible():
    images = smooth_images(8, 40, 48)
    augment = G.MoCoGPUAugment("v2", size=32)
    q, k = augment.two_views(images, torch.Generator().manual_seed(0))
    assert q.shape == k.shape == (8, 3, 32, 32)
    assert ((q - k).abs().flatten(1).amax(1) > 0.1).all()  # every sample's two views differ
    q2, k2 = augment.two_views(images, torch.Generator().manual_seed(0))
    assert torch.equal(q, q2) and torch.equal(k, k2)
    seeded = G.MoCoGPUAugment("v2", size=32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(seeded(images), q)
    assert not torch.equal(augment(images, torch.Generator().manual_seed(1)), q)


@pytest.mark.parametrize(
    "preset, dtype, channels_last, device",
    [
        # one CPU case (inductor's C++ build takes tens of seconds on a cold cache); v1 differs from v2 in the
        # parameters only, which the eager tests cover
        ("v2", torch.bfloat16, True, "cpu"),
        pytest.param(
            "v2", torch.bfloat16, True, "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")
        ),
    ],
)
def test_compiled_matches_eager_without_recompiling(preset, dtype, channels_last, device):
    torch._dynamo.reset()
    images = [smooth_images(1, 40, 52, seed=i)[0].to(device) for i in range(4)]
    eager = G.MoCoGPUAugment(preset, size=32, channels_last=channels_last)  # float32, the reference
    compiled = G.MoCoGPUAugment(preset, size=32, dtype=dtype, channels_last=channels_last, compile=True)
    generator = torch.Generator(device).manual_seed(0)
    for call in range(2):  # new parameters on the second call: the same graph, no recompilation
        state = generator.get_state()
        params = eager.sample(images, generator)
        generator.set_state(state)
        with torch._dynamo.config.patch(error_on_recompile=call > 0):
            compiled_params = compiled.sample(images, generator)  # the same draws, through the compiled maths
            out = compiled.apply(images, params)
        assert torch.equal(compiled_params.boxes, params.boxes)
        for ours, theirs in zip(compiled_params.ops, params.ops):
            for a, b in zip(*((p,) if isinstance(p, torch.Tensor) else p for p in (ours, theirs))):
                # parameters from the same uniforms: a few operations each (crop sizes scale with the image, 52)
                torch.testing.assert_close(a, b, **pixel_tol(2, 8, scale=52))
        assert out.shape == (4, 3, 32, 32) and out.dtype == dtype and out.device.type == device
        assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        # float32 maths on both sides, fused or not, then one rounding to the output dtype (bfloat16: 2^-8 relative)
        float32 = pixel_tol(32 * 32, 6 + 4 * 40 + 4 + 2, scale=52 * 4.5)
        rtol = float32["rtol"] + (2**-8 if dtype == torch.bfloat16 else 0.0)
        torch.testing.assert_close(out.float(), eager.apply(images, params), atol=float32["atol"], rtol=rtol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_on_the_same_parameters():
    images = [smooth_images(1, 300 + 10 * i, 400 - 20 * i, seed=i)[0] for i in range(8)]
    augment = G.MoCoGPUAugment("v2")
    params = augment.sample([im.cuda() for im in images], torch.Generator("cuda").manual_seed(0))
    out = augment.apply([im.cuda() for im in images], params)
    cpu_params = G.AugmentParams(params.boxes.cpu(), tuple(_to_cpu(p) for p in params.ops))
    # v2 at 224 px from images up to 400 px: the longest sum is the contrast mean over the 224 x 224 view
    torch.testing.assert_close(out.cpu(), augment.apply(images, cpu_params),
                               **pixel_tol(224 * 224, 6 + 4 * 40 + 4 + 2, scale=400 * 4.5))
    with pytest.raises(ValueError):
        augment(images, torch.Generator("cuda"))


def _to_cpu(params):
    return params.cpu() if isinstance(params, torch.Tensor) else type(params)(*(t.cpu() for t in params))


# ---------------------------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def pil_decode(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)


def test_decode_jpegs_skips_corrupt_data_and_converts_to_rgb():
    reference = smooth_images(1, 30, 40)[0]
    rgb = Image.fromarray(reference.permute(1, 2, 0).numpy())
    grey = rgb.convert("L")
    data = [
        encode(rgb),
        b"\xff\xd8\xff\xe0 definitely not a jpeg",
        encode(grey),
        encode(rgb.convert("CMYK")),
        b"",
        encode(rgb, "PNG"),
    ]
    decoded = D.decode_jpegs(data, device="cpu")
    assert decoded.num_failed == 2 and decoded.kept == [0, 2, 3, 5]
    assert all(image.shape == (3, 30, 40) and image.dtype == torch.uint8 for image in decoded.images)
    grey_decoded = decoded.images[1]
    assert torch.equal(grey_decoded[0], grey_decoded[1]) and torch.equal(grey_decoded[0], grey_decoded[2])
    for image, blob in zip(decoded.images, [data[i] for i in decoded.kept]):  # as PIL decodes and converts them
        assert torch.equal(image, pil_decode(blob))
    assert torch.equal(decoded.images[3], reference)  # PNG: lossless
    # a uint8 tensor of bytes works too, and an all-corrupt batch returns nothing rather than raising
    assert D.decode_jpegs([torch.frombuffer(bytearray(data[0]), dtype=torch.uint8)]).num_failed == 0
    assert D.decode_jpegs([b"junk", b"\x00" * 10]) == D.DecodedImages([], 2, [])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvJPEG)")
def test_decode_jpegs_on_cuda():
    rgb = Image.fromarray(smooth_images(1, 30, 40)[0].permute(1, 2, 0).numpy())
    data = [encode(rgb), b"not a jpeg", encode(rgb.convert("L")), encode(rgb.convert("CMYK")), encode(rgb, "PNG")]
    decoded = D.decode_jpegs(data, device="cuda")
    assert decoded.num_failed == 1 and decoded.kept == [0, 2, 3, 4]
    assert all(image.is_cuda and image.shape == (3, 30, 40) for image in decoded.images)
    assert G.MoCoGPUAugment("v2")(decoded.images).is_cuda

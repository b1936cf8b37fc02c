"""Data for MoCo pretraining: HF Datasets sources, streamed and split across processes, and two-view augmentation.

Sources (all end up as a `datasets.IterableDataset` of raw, undecoded images):
- a Hub dataset by name (`load_dataset(name, streaming=True)`),
- a local folder (`train_dir`): an image folder (`class/xxx.jpg`, optionally under `train/`, `test/` ...),
  parquet files or webdataset `.tar` shards,
- the embedded default: scikit-learn's bundled handwritten digits, written once as an image folder.

Images are decoded by us, not by `datasets`, so that a corrupt or truncated file is skipped and counted
instead of ending the run. Every image is converted to RGB (grayscale, RGBA, palette and CMYK included).

Augmentation follows the papers' pipelines (`PRESETS`), with parameters drawn from an explicit
`torch.Generator` seeded from (seed, epoch, rank, worker), so a run is reproducible and can be resumed
exactly by replaying the data position.
"""

from __future__ import annotations

import glob
import io
import logging
import math
import multiprocessing
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageFile, ImageFilter
from torchvision.transforms.v2 import functional as TF

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


# ---------------------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------------------


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
}


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
    """Two independently augmented views of one PIL image, as normalised float tensors (3 x size x size)."""

    def __init__(self, preset: str | AugmentPreset, size: int, mean, std, crop_min_scale: float | None = None):
        if isinstance(preset, str):
            if preset not in PRESETS:
                raise ValueError(f"unknown augmentation {preset!r}; choose one of {sorted(PRESETS)}")
            preset = PRESETS[preset]
        if crop_min_scale is not None:
            preset = AugmentPreset(**{**preset.__dict__, "crop_scale": (float(crop_min_scale), 1.0)})
        self.preset = preset
        self.size = int(size)
        self.mean = list(mean)
        self.std = list(std)

    def view(self, image: Image.Image, g: torch.Generator) -> torch.Tensor:
        p = self.preset
        top, left, h, w = sample_resized_crop(image.height, image.width, p.crop_scale, (3 / 4, 4 / 3), g)
        image = image.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + w, top + h))
        u = torch.rand(4, generator=g).tolist()
        if p.grayscale_first and u[1] < p.grayscale_prob:
            image = image.convert("L").convert("RGB")
        if u[0] < p.jitter_prob:
            image = self._jitter(image, g)
        if not p.grayscale_first and u[1] < p.grayscale_prob:
            image = image.convert("L").convert("RGB")
        if u[2] < p.blur_prob:
            sigma = p.blur_sigma[0] + (p.blur_sigma[1] - p.blur_sigma[0]) * torch.rand(1, generator=g).item()
            image = image.filter(ImageFilter.GaussianBlur(radius=sigma))  # as the official v2 code
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
        return self.view(image, g), self.view(image, g)


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


# ---------------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------------


def _to_8_bits(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float grey image as 8-bit grey: `convert("RGB")` would clip it at 255 (a 16-bit
    PNG would come out almost white). 16-bit values are divided by 257; float images in [0, 1] are scaled by 255."""
    array = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16") or (image.mode == "I" and array.max(initial=0) > 255):
        array = array / 257.0
    elif image.mode == "F" and array.max(initial=0) <= 1.0:
        array = array * 255.0
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")


def image_name(value) -> str:
    """How logs name an image of a dataset: its path where the dataset keeps one, else `sha1:` and the first 12 hex
    digits of the SHA-1 of its bytes (stable across epochs, so a corrupt image is counted once)."""
    import hashlib

    if isinstance(value, dict):
        if value.get("path"):
            return str(value["path"])
        value = value.get("bytes")
    if isinstance(value, (str, os.PathLike)):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "sha1:" + hashlib.sha1(bytes(value)).hexdigest()[:12]
    return f"<{type(value).__name__}>"


def decode_image(value) -> Image.Image | None:
    """RGB PIL image from a datasets image value (dict with bytes/path, PIL image, raw bytes or a path).

    Returns None (never raises) for anything that cannot be decoded completely: corrupt, truncated, empty.
    """
    try:
        if isinstance(value, Image.Image):
            image = value
        else:
            if isinstance(value, dict):
                data, path = value.get("bytes"), value.get("path")
            elif isinstance(value, (bytes, bytearray)):
                data, path = value, None
            else:
                data, path = None, value
            source = io.BytesIO(data) if data else path
            if source is None:
                return None
            image = Image.open(source)
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        image.load()
        if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            image = _to_8_bits(image)
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        if image.mode != "RGB":
            image = image.convert("RGB")
        if image.width < 1 or image.height < 1:
            return None
        return image
    except Exception:  # noqa: BLE001 - any decoder failure means "skip this image"
        return None


# ---------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------


def digits_image_folder(cache_dir: str | None = None, size: int = 32) -> str:
    """scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes) as an image folder.

    Written once (atomically) as `train/<label>/*.png` (80 %) and `test/<label>/*.png` (every 5th image, 20 %),
    upscaled to `size` pixels. Returns the folder.
    """
    import numpy as np
    from sklearn.datasets import load_digits

    cache_dir = cache_dir or os.environ.get("MOCO_HF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "moco_hf")
    root = os.path.join(cache_dir, f"digits_{size}px")
    if os.path.isfile(os.path.join(root, "COMPLETE")):
        return root
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".digits-", dir=cache_dir)
    digits = load_digits()
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        split = "test" if i % 5 == 0 else "train"
        folder = os.path.join(tmp, split, str(int(label)))
        os.makedirs(folder, exist_ok=True)
        array = (pixels / 16.0 * 255).clip(0, 255).astype(np.uint8)
        Image.fromarray(array, mode="L").resize((size, size), Image.BILINEAR).save(os.path.join(folder, f"{i:04d}.png"))
    open(os.path.join(tmp, "COMPLETE"), "w").close()
    try:
        os.replace(tmp, root)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return root


@dataclass
class SourceInfo:
    dataset: object  # datasets.IterableDataset of raw images
    num_examples: int | None
    image_column: str
    label_column: str | None


def _local_builder(path: str) -> tuple[str, dict]:
    """Which `datasets` builder reads a local folder: parquet files, webdataset shards, or an image folder."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"train_dir {path!r} does not exist or is not a folder")
    files = [f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True) if os.path.isfile(f)]
    if any(f.endswith(".parquet") for f in files):
        return "parquet", {"data_dir": path}
    if any(f.endswith(".tar") for f in files):
        return "webdataset", {"data_dir": path}
    if not any(f.lower().endswith(IMAGE_EXTENSIONS) for f in files):
        raise ValueError(
            f"train_dir {path!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}), parquet files or .tar shards"
        )
    return "imagefolder", {"data_dir": path}


def find_image_column(features, requested: str | None) -> str:
    """The image column: `requested` if given (must exist), else the first column of type Image, else a column
    named like an image."""
    from datasets import Image as ImageFeature

    names = list(features) if features is not None else []
    if requested:
        if names and requested not in names:
            raise ValueError(f"image_column {requested!r} is not in the dataset; its columns are {names}")
        return requested
    for name in names:
        if isinstance(features[name], ImageFeature):
            return name
    for name in names:
        if name.lower() in ("image", "img", "jpg", "jpeg", "png", "webp", "pixel_values"):
            return name
    raise ValueError(f"the dataset has no image column (columns: {names}); name it with image_column")


def find_label_column(features, requested: str | None) -> str | None:
    names = list(features) if features is not None else []
    if requested:
        if names and requested not in names:
            raise ValueError(f"label_column {requested!r} is not in the dataset; its columns are {names}")
        return requested
    for name in ("label", "labels", "cls", "class", "fine_label"):
        if name in names:
            return name
    return None


def load_hub_dataset(name: str, config: str | None, split: str, streaming: bool):
    """`datasets.load_dataset` of a Hub dataset, its failures as one ValueError for people: no network (and how to
    run offline), a name that is not on the Hub (or gated), a split it does not have."""
    from datasets import load_dataset
    from datasets.exceptions import DatasetNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get("HF_DATASETS_OFFLINE", "") \
        not in ("", "0")
    try:
        return load_dataset(name, config, split=split, streaming=streaming)
    except ConnectionError as err:
        why = "HF_HUB_OFFLINE is set and there is no cached copy" if offline else f"no network ({_first_line(err)})"
        raise ValueError(
            f"cannot load Hub dataset {name!r}: {why}; to run offline, point train_dir at a local copy (image folder, "
            "parquet or webdataset shards), or load the dataset once with network so that HF_HUB_OFFLINE=1 finds it "
            "in the cache"
        ) from None
    except DatasetNotFoundError as err:
        raise ValueError(f"Hub dataset {name!r} was not found or is gated ({_first_line(err)}): check the name, and "
                         "for a gated dataset accept its terms on the Hub and log in with `hf auth login`") from None
    except ValueError as err:
        if _is_missing_split(err):
            raise ValueError(f"split {split!r} not found in Hub dataset {name!r}: {_first_line(err)}") from None
        raise


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _is_missing_split(err: ValueError) -> bool:
    message = str(err)
    return "Unknown split" in message or "Bad split" in message


def _load_local(split: str, train_dir: str | None, demo_image_size: int, streaming: bool = False):
    """(dataset, folder) of one split of a local folder (or of the embedded digits when `train_dir` is empty).

    Webdataset shards always stream; the other builders give a map-style table (for an image folder, of paths).
    """
    from datasets import load_dataset

    path = train_dir or digits_image_folder(size=demo_image_size)
    builder, kwargs = _local_builder(path)
    try:
        return load_dataset(builder, split=split, streaming=streaming or builder == "webdataset", **kwargs), path
    except ValueError as err:
        if _is_missing_split(err):
            raise ValueError(f"split {split!r} not found in {path!r}: {err}") from err
        raise


def load_source(
    split: str,
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    train_dir: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    num_shards: int = 16,
    demo_image_size: int = 32,
) -> SourceInfo:
    """A streamed split of the configured source, images left undecoded.

    Local data is indexed with `load_dataset` (an image folder keeps only file paths in its Arrow table) and
    streamed with `to_iterable_dataset(num_shards)`, so DataLoader workers and processes each get shards;
    a Hub dataset streams directly.
    """
    from datasets import Image as ImageFeature
    from datasets import IterableDataset

    if dataset_name:
        ds = load_hub_dataset(dataset_name, dataset_config, split, streaming=True)
        info_splits = getattr(ds.info, "splits", None) or {}
        num_examples = info_splits[split].num_examples if split in info_splits else None
    else:
        table, path = _load_local(split, train_dir, demo_image_size)
        if isinstance(table, IterableDataset):  # webdataset shards: streamed, size unknown
            ds, num_examples = table, None
        else:
            num_examples = len(table)
            if num_examples == 0:
                raise ValueError(f"split {split!r} of {path!r} is empty")
            # Folders list images class by class: a fixed permutation first, so that each shard (and so each
            # process and worker) holds every class, not a contiguous range of them.
            table = table.shuffle(seed=0)
            ds = table.to_iterable_dataset(num_shards=max(1, min(num_shards, num_examples)))
    features = ds.features
    image_col = find_image_column(features, image_column)
    label_col = find_label_column(features, label_column)
    if features is not None and isinstance(features.get(image_col), ImageFeature):
        ds = ds.cast_column(image_col, ImageFeature(decode=False))
    if num_examples == 0:
        raise ValueError(f"split {split!r} is empty")
    return SourceInfo(ds, num_examples, image_col, label_col)


# ---------------------------------------------------------------------------------------------------------
# Streams for the training loop
# ---------------------------------------------------------------------------------------------------------


class TwoViewStream(torch.utils.data.IterableDataset):
    """Decodes, skips corrupt images and yields (view_q, view_k, names of the corrupt images skipped before it)
    triples; corrupt images at the end of the stream come as (None, None, names).

    `hf_dataset` is this process's part of the stream (already split by node). The augmentation generator is
    seeded from (seed, epoch, rank, worker id), so an epoch replays identically.
    """

    def __init__(self, hf_dataset, image_column: str, transform: TwoViewTransform, seed: int, rank: int = 0):
        super().__init__()
        self.hf_dataset, self.image_column, self.transform = hf_dataset, image_column, transform
        self.seed, self.rank, self.epoch = int(seed), int(rank), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.hf_dataset.set_epoch(epoch)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        g = torch.Generator().manual_seed(hash((self.seed, self.epoch, self.rank, worker)) & 0x7FFF_FFFF_FFFF)
        skipped = []
        for example in self.hf_dataset:
            image = decode_image(example[self.image_column])
            if image is None:
                skipped.append(image_name(example[self.image_column]))
                continue
            view_q, view_k = self.transform(image, g)
            yield view_q, view_k, skipped
            skipped = []
        if skipped:  # corrupt images at the very end: a sample without views carries their names
            yield None, None, skipped


def collate_two_views(samples):
    """Stack (view_q, view_k, skipped names) samples into (N x 3 x S x S, N x 3 x S x S, names of the corrupt images
    skipped in this chunk); a chunk of only trailing corrupt images gives (None, None, names)."""
    views_q, views_k, skipped = zip(*samples)
    names = [name for names in skipped for name in names]
    kept = [i for i, view in enumerate(views_q) if view is not None]
    if not kept:
        return None, None, names
    return torch.stack([views_q[i] for i in kept]), torch.stack([views_k[i] for i in kept]), names


def integer_labels(hf_dataset, label_column: str) -> bool:
    """Whether `label_column` holds class indices (a ClassLabel or integers) rather than names: from the features
    where the dataset declares them, else from its first example."""
    from datasets import ClassLabel

    features = getattr(hf_dataset, "features", None)
    if features is not None and label_column in features:
        feature = features[label_column]
        return isinstance(feature, ClassLabel) or str(getattr(feature, "dtype", "")).startswith(("int", "uint"))
    first = next(iter(hf_dataset), None)
    return first is None or isinstance(first[label_column], int)


def label_index(hf_dataset, label_column: str) -> dict[str, int]:
    """Class name -> index, the names of `hf_dataset`'s labels in sorted order (as `load_labeled_split`)."""
    names = {str(example[label_column]) for example in hf_dataset.select_columns([label_column])}
    return {name: i for i, name in enumerate(sorted(names))}


class LabeledStream(torch.utils.data.IterableDataset):
    """Decoded, eval-transformed images with labels (kNN monitor, linear evaluation); corrupt images skipped.

    `label_map` turns label names into indices (a name it lacks becomes -1: never a correct prediction)."""

    def __init__(self, hf_dataset, image_column: str, label_column: str | None, transform, limit: int | None = None,
                 label_map: dict[str, int] | None = None):
        super().__init__()
        self.hf_dataset, self.image_column, self.label_column = hf_dataset, image_column, label_column
        self.transform, self.limit, self.label_map = transform, limit, label_map

    def __iter__(self):
        seen = 0
        for example in self.hf_dataset:
            if self.limit is not None and seen >= self.limit:
                return
            image = decode_image(example[self.image_column])
            if image is None:
                continue
            label = example[self.label_column] if self.label_column else -1
            label = self.label_map.get(str(label), -1) if self.label_map is not None else int(label)
            seen += 1
            yield self.transform(image), label


def read_bytes(value) -> bytes | None:
    """The encoded bytes of a datasets image value (dict with bytes/path, raw bytes or a path); None if unreadable."""
    try:
        if isinstance(value, dict):
            if value.get("bytes"):
                return bytes(value["bytes"])
            value = value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        if isinstance(value, str):
            with open(value, "rb") as f:
                return f.read()
    except OSError:
        return None
    return None


class EncodedStream(torch.utils.data.IterableDataset):
    """Images for augmenting whole batches on the GPU, as encoded bytes or decoded by the workers.

    `decode=False`: workers only read bytes, and the training process decodes them with nvJPEG
    (`gpu_augment.decode_jpegs`). `decode=True`: each worker decodes with libjpeg-turbo (torchvision) into 3 x H x W
    uint8, which scales with the number of workers; the batch is then copied to the device and augmented there.
    Unreadable or undecodable images are skipped and named. Samples are (image tensor, names of the unreadable
    images skipped before it, the image's own name: for a decode that fails later, in the training process).
    """

    def __init__(self, hf_dataset, image_column: str, decode: bool = False, unshuffled=None):
        super().__init__()
        self.hf_dataset, self.image_column, self.decode = hf_dataset, image_column, decode
        self.unshuffled = unshuffled  # the same split before its shuffle buffer, to look at one image cheaply

    def set_epoch(self, epoch: int) -> None:
        self.hf_dataset.set_epoch(epoch)

    def first_image_nbytes(self, tries: int = 8) -> int | None:
        """Decoded size (3 x H x W bytes) of the first readable image among the split's first `tries`, or None."""
        from .gpu_augment import decode_jpegs

        for i, example in enumerate(self.unshuffled if self.unshuffled is not None else ()):
            data = read_bytes(example[self.image_column])
            decoded = decode_jpegs([data], device="cpu").images if data else []
            if decoded:
                return decoded[0].numel()
            if i + 1 >= tries:
                break
        return None

    def __iter__(self):
        from .gpu_augment import decode_jpegs

        skipped = []
        for example in self.hf_dataset:
            value = example[self.image_column]
            data = read_bytes(value)
            tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else None
            if tensor is not None and self.decode:
                decoded = decode_jpegs([tensor], device="cpu").images
                tensor = decoded[0] if decoded else None
            if tensor is None:
                skipped.append(image_name(value))
                continue
            yield tensor, skipped, image_name(value) if not self.decode else None
            skipped = []
        if skipped:  # unreadable images at the very end: an empty image carries their names
            yield torch.empty((3, 0, 0) if self.decode else (0,), dtype=torch.uint8), skipped, None


def _shared_flat(parts: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat of 1-D tensors; in a DataLoader worker straight into shared memory (as torch's default collate
    does), which saves the copy the worker would otherwise make when sending the chunk."""
    out = None
    if torch.utils.data.get_worker_info() is not None:
        numel = sum(part.numel() for part in parts)
        out = parts[0].new(parts[0].untyped_storage()._new_shared(numel * parts[0].element_size())).resize_(numel)
    return torch.cat(parts, out=out)


def collate_encoded(samples):
    """(image tensor, skipped names, name) samples into (one flat uint8 tensor, shapes, names of the images skipped in
    this chunk, names of its encoded images or None).

    Encoded bytes give shapes N (lengths). Decoded 3 x H x W images give shapes N x 2 (H, W) and their pixels in
    H x W x 3 order, one image after the other: the order the JPEG decoder writes (torchvision's 3 x H x W result is
    a view of it), so nothing is transposed here, and the device turns a whole batch into channel planes at once
    (`ImageChunk`). Two tensors per chunk instead of one per image: every tensor leaving a worker costs a
    shared-memory file and every pinned one a page-locked allocation, which dominated the batched path when done
    per image. Encoded images keep their names, so that one the training process cannot decode is named too.
    """
    data, skipped, names = zip(*samples)
    skipped = [name for chunk in skipped for name in chunk]
    encoded = data[0].dim() == 1
    kept = [i for i, d in enumerate(data) if d.numel()]  # an empty image only carries trailing unreadable ones
    data = [data[i] for i in kept]
    if not data:
        shapes = torch.empty((0,) if encoded else (0, 2), dtype=torch.long)
        return torch.empty(0, dtype=torch.uint8), shapes, skipped, [] if encoded else None
    if encoded:
        shapes = torch.tensor([d.numel() for d in data], dtype=torch.long)
        return _shared_flat(list(data)), shapes, skipped, [names[i] for i in kept]
    shapes = torch.tensor([list(d.shape[1:]) for d in data], dtype=torch.long)  # N x 2
    return _shared_flat([d.permute(1, 2, 0).reshape(-1) for d in data]), shapes, skipped, None


def split_encoded(flat: torch.Tensor, shapes: torch.Tensor) -> list[torch.Tensor]:
    """The per-image tensors of a `collate_encoded` chunk (views, no copy): byte strings or 3 x H x W images."""
    if shapes.dim() == 1:
        return list(torch.split(flat, shapes.tolist()))
    sizes = shapes.tolist()
    parts = torch.split(flat, [h * w * 3 for h, w in sizes])
    return [part.view(h, w, 3).permute(2, 0, 1) for part, (h, w) in zip(parts, sizes)]


class ImageChunk(NamedTuple):
    """Decoded images of any sizes on the device, pixel after pixel: image n is the H_n * W_n rows of `pixels`
    after those of images 0..n-1, in row-major order."""

    pixels: torch.Tensor  # P x 3 uint8 (RGB per pixel), on the device
    sizes: torch.Tensor  # N x 2 int64 (H, W), on the CPU

    def __len__(self) -> int:
        return self.sizes.shape[0]

    @classmethod
    def from_chunk(cls, chunk, device, decoder: ThreadDecoder | None = None) -> tuple[ImageChunk, list[str]]:
        """(images, names of the corrupt images skipped) of one `collate_encoded` chunk: decoded by the workers (one
        copy of the whole chunk to the device), or encoded bytes decoded here: by `decoder`'s threads, else nvJPEG
        on CUDA (`gpu_augment.decode_jpegs`)."""
        from .gpu_augment import decode_jpegs

        flat, shapes, skipped, names = chunk
        if shapes.dim() == 2:
            return cls(flat.to(device, non_blocking=True).view(-1, 3), shapes), list(skipped)
        if decoder is not None:
            images, failed = decoder.decode(split_encoded(flat, shapes), device)
            return images, list(skipped) + [names[i] for i in failed]
        decoded = decode_jpegs(split_encoded(flat, shapes), device=device)
        kept = set(decoded.kept)
        skipped = list(skipped) + [name for i, name in enumerate(names) if i not in kept]
        if not decoded.images:
            empty = cls(torch.empty(0, 3, dtype=torch.uint8, device=device), torch.empty(0, 2, dtype=torch.long))
            return empty, skipped
        pixels = torch.cat([image.permute(1, 2, 0).reshape(-1, 3) for image in decoded.images])
        return cls(pixels, torch.tensor([list(image.shape[1:]) for image in decoded.images])), skipped

    @staticmethod
    def join(chunks: list[ImageChunk]) -> ImageChunk:
        if len(chunks) == 1:
            return chunks[0]
        return ImageChunk(torch.cat([c.pixels for c in chunks]), torch.cat([c.sizes for c in chunks]))

    def split(self, count: int) -> tuple[ImageChunk, ImageChunk]:
        """(the first `count` images, the rest)."""
        cut = int((self.sizes[:count, 0] * self.sizes[:count, 1]).sum())
        return (ImageChunk(self.pixels[:cut], self.sizes[:count]),
                ImageChunk(self.pixels[cut:], self.sizes[count:]))

    def packed(self):
        """The images as `gpu_augment.PackedImages` (channel planes, one transpose of the whole chunk)."""
        from .gpu_augment import PackedImages

        device = self.pixels.device
        areas = self.sizes[:, 0] * self.sizes[:, 1]
        meta = torch.stack([torch.cumsum(areas, 0) - areas, self.sizes[:, 0], self.sizes[:, 1]])  # 3 x N
        if device.type == "cuda":  # a pinned, non-blocking copy does not wait for the GPU's queued work
            meta = meta.pin_memory().to(device, non_blocking=True)
        else:
            meta = meta.to(device)
        offsets, heights, widths = meta.unbind(0)
        return PackedImages(self.pixels.t().contiguous(), offsets, heights, widths)  # no copy if built from planes


class ThreadDecoder:
    """Decodes encoded images in a pool of threads of the training process, straight into one pinned buffer.

    The DataLoader workers then only read bytes (about a seventh of the decoded pixels of a JPEG), so far less
    crosses process boundaries through shared memory; libjpeg-turbo and libpng run without the GIL, so the
    threads decode in parallel while the main thread keeps launching work on the GPU.
    """

    def __init__(self, threads: int):
        from concurrent.futures import ThreadPoolExecutor

        import warnings

        if threads < 1:
            raise ValueError(f"decode threads must be >= 1, got {threads}")
        self.threads = threads
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="moco-decode")
        # once, here: `warnings.catch_warnings` around each decode would race between threads
        warnings.filterwarnings("ignore", module=r"torchvision\.io")

    @staticmethod
    def _decode_one(data: torch.Tensor) -> torch.Tensor | None:
        """H x W x 3 uint8 (RGB), or None if `data` is not a readable image (`gpu_augment.decode_rgb`: grey, RGBA,
        CMYK and 16-bit images come out as 8-bit RGB)."""
        from .gpu_augment import decode_rgb

        image = decode_rgb(data)
        return image.permute(1, 2, 0).contiguous() if image is not None else None  # decoders' H x W x 3: no copy

    def decode(self, data: list[torch.Tensor], device) -> tuple[ImageChunk, list[int]]:
        """(the readable images of `data` on `device`, the indices in `data` of those that were not)."""
        device = torch.device(device)
        decoded = list(self.pool.map(self._decode_one, data))
        skipped = [i for i, image in enumerate(decoded) if image is None]
        images = [image for image in decoded if image is not None]
        if not images:
            return ImageChunk(torch.empty(0, 3, dtype=torch.uint8, device=device),
                              torch.empty(0, 2, dtype=torch.long)), skipped
        sizes = torch.tensor([image.shape[:2] for image in images], dtype=torch.long)  # N x 2
        counts = (sizes[:, 0] * sizes[:, 1] * 3).tolist()
        buffer = torch.empty(sum(counts), dtype=torch.uint8, pin_memory=device.type == "cuda")
        parts = torch.split(buffer, counts)
        list(self.pool.map(lambda pair: pair[0].copy_(pair[1].view(-1)), zip(parts, images)))  # parallel copies
        # Non-blocking from pinned memory: the host allocator keeps the buffer until the copy has run.
        return ImageChunk(buffer.to(device, non_blocking=True).view(-1, 3), sizes), skipped

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class DeviceImageCache:
    """A whole split decoded once into device memory, as one `PackedImages` (any image sizes), for training that
    augments whole batches on the device: small datasets (CIFAR-10: 50,000 x 3 x 32 x 32 = 150 MB) then cost no
    decoding, no host-to-device copy and no DataLoader after the first pass.

    `batch(indices)` is a zero-copy view of those images (their offsets and sizes), ready for
    `MoCoGPUAugment.two_views`.
    """

    def __init__(self, images, skipped: list[str]):
        self.images, self.skipped = images, skipped  # PackedImages; the names of the unreadable images left out

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def nbytes(self) -> int:
        return self.images.pixels.numel() * self.images.pixels.element_size()

    def batch(self, indices: torch.Tensor):
        from .gpu_augment import PackedImages

        images = self.images
        return PackedImages(images.pixels, images.offsets[indices], images.heights[indices], images.widths[indices])

    @classmethod
    def build(cls, chunks, max_bytes: int, expected_images: int | None = None) -> DeviceImageCache | None:
        """Join (ImageChunk, skipped names) pairs into one cache in the chunks' device memory (peak: twice the cache).

        Returns None as soon as the images so far exceed `max_bytes`; with `expected_images`, also once a sample
        of at least 1,000 images (or 5 % of the split) says that their mean size times `expected_images` is over
        1.5 x `max_bytes` (an early way out for large splits; the first images need not be typical).
        """
        planes, sizes, skipped, total, count = [], [], [], 0, 0
        for chunk, unreadable in chunks:
            skipped += unreadable
            if not len(chunk):
                continue
            planes.append(chunk.pixels.t().contiguous())  # 3 x P_chunk
            sizes.append(chunk.sizes)
            total += chunk.pixels.numel()
            count += len(chunk)
            sampled = expected_images and count >= min(1000, 0.05 * expected_images)
            if total > max_bytes or (sampled and total / count * expected_images > 1.5 * max_bytes):
                return None
        if not planes:
            raise ValueError("the training split yields no images: it is empty or every image is unreadable")
        pixels = torch.cat(planes, dim=1) if len(planes) > 1 else planes[0]
        del planes
        return cls(ImageChunk(pixels.t(), torch.cat(sizes)).packed(), skipped)


# ---------------------------------------------------------------------------------------------------------
# Labelled image-classification data (linear evaluation, fine-tuning)
# ---------------------------------------------------------------------------------------------------------


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


class ExampleTransform:
    """`datasets.Dataset.with_transform` function: decode every image (None when it is corrupt), apply
    `image_transform`, and turn labels into class indices. Returns the columns `pixel_values` and `labels`."""

    def __init__(self, image_transform, image_column: str, label_column: str, label_map: dict[str, int] | None = None):
        self.image_transform, self.image_column, self.label_column = image_transform, image_column, label_column
        self.label_map = label_map

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        pixel_values, labels = [], []
        for value, label in zip(batch[self.image_column], batch[self.label_column]):
            image = decode_image(value)
            pixel_values.append(None if image is None else self.image_transform(image))
            labels.append(self.label_map[str(label)] if self.label_map is not None else int(label))
        return {"pixel_values": pixel_values, "labels": labels}


class ClassificationCollator:
    """Stack `{"pixel_values", "labels"}` examples into a batch, leaving out (and counting) corrupt images.

    The count is kept in shared memory, so images skipped inside DataLoader worker processes are counted too.
    A batch whose images all failed to decode is returned as None (the loops here skip it), or raises ValueError
    with `allow_empty=False` (transformers' Trainer cannot skip a batch).
    """

    def __init__(self, allow_empty: bool = True):
        self.allow_empty = allow_empty
        self._skipped = multiprocessing.Value("q", 0)

    @property
    def skipped(self) -> int:
        return int(self._skipped.value)

    def reset(self) -> None:
        with self._skipped.get_lock():
            self._skipped.value = 0

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor] | None:
        kept = [e for e in examples if e["pixel_values"] is not None]
        if len(kept) < len(examples):
            with self._skipped.get_lock():
                self._skipped.value += len(examples) - len(kept)
        if not kept:
            if self.allow_empty:
                return None
            raise ValueError(f"none of the {len(examples)} images of a batch could be decoded (corrupt files)")
        return {
            "pixel_values": torch.stack([e["pixel_values"] for e in kept]),  # N x 3 x S x S
            "labels": torch.tensor([e["labels"] for e in kept], dtype=torch.long),  # N
        }


@dataclass
class LabeledSplit:
    """One split of a labelled image dataset, map-style, images undecoded (decoded by `ExampleTransform`)."""

    dataset: object  # datasets.Dataset
    image_column: str
    label_column: str
    label_names: list[str]
    label_map: dict[str, int] | None  # str(raw label) -> class index, when the label column is not a ClassLabel

    def __len__(self) -> int:
        return len(self.dataset)

    def with_transform(self, image_transform):
        """The split as a dataset of {"pixel_values": tensor or None, "labels": int}."""
        return self.dataset.with_transform(
            ExampleTransform(image_transform, self.image_column, self.label_column, self.label_map)
        )


def load_labeled_split(
    split: str,
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    train_dir: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    label_names: list[str] | None = None,
    max_samples: int | None = None,
    seed: int = 0,
    demo_image_size: int = 32,
) -> LabeledSplit:
    """A split of a Hub dataset (`dataset_name`, downloaded), of a local folder (`train_dir`: image folder,
    parquet or webdataset shards), or of the embedded digits (neither), as a map-style `datasets.Dataset`.

    Image columns are read undecoded so that a corrupt file is skipped and counted rather than fatal. Labels: a
    ClassLabel column gives class indices and names as they are; any other column (ints or strings) is mapped to
    indices in sorted order. Pass the train split's `label_names` for the eval split so both use the same indices.
    `max_samples` keeps a random subset (seeded) of that many examples.
    """
    from datasets import ClassLabel
    from datasets import Image as ImageFeature

    source = dataset_name or train_dir or "the embedded digits"
    if dataset_name:
        ds = load_hub_dataset(dataset_name, dataset_config, split, streaming=False)
    else:
        ds, _ = _load_local(split, train_dir, demo_image_size)
        if not hasattr(ds, "__len__"):
            raise ValueError(f"{source} streams webdataset shards; linear evaluation and fine-tuning need an "
                             "image folder or parquet files")
    if len(ds) == 0:
        raise ValueError(f"split {split!r} of {source} is empty")
    image_col = find_image_column(ds.features, image_column)
    label_col = find_label_column(ds.features, label_column)
    if label_col is None:
        raise ValueError(f"split {split!r} of {source} has no label column (columns: {list(ds.features)}); "
                         "name it with label_column")
    if isinstance(ds.features[image_col], ImageFeature):
        ds = ds.cast_column(image_col, ImageFeature(decode=False))
    feature, values = ds.features[label_col], ds.unique(label_col)  # classes of the whole split, even with a subset
    if max_samples is not None and len(ds) > max_samples:
        ds = ds.shuffle(seed=seed).select(range(int(max_samples)))
    if isinstance(feature, ClassLabel):
        names, label_map = list(feature.names), None
        if label_names is not None and list(label_names) != names:
            raise ValueError(f"the classes of split {split!r} ({names}) differ from the training split's "
                             f"({list(label_names)})")
        if any(v < 0 or v >= len(names) for v in values):
            raise ValueError(f"split {split!r} of {source} has examples without a valid label (e.g. -1): "
                             "use a labelled split")
    else:
        if label_names is None:
            label_names = [str(v) for v in sorted(values, key=lambda v: (type(v).__name__, v))]
        names = list(label_names)
        label_map = {name: i for i, name in enumerate(names)}
        unknown = sorted({str(v) for v in values} - set(label_map))
        if unknown:
            raise ValueError(f"split {split!r} has labels that the training split does not: {unknown[:10]}")
    return LabeledSplit(ds, image_col, label_col, names, label_map)


def make_loader(dataset, batch_size: int, collator, num_workers: int = 0, shuffle: bool = False,
                seed: int = 0, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """DataLoader over a `LabeledSplit.with_transform` dataset; shuffling drawn from its own seeded generator."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, collate_fn=collator,
        pin_memory=pin_memory, persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed),
    )

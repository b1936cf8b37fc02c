"""From bytes to RGB images, for every path of the pipeline. Nothing here raises on a bad image: a corrupt,
truncated or empty file comes out as None (or is left out and named), so the training can skip and count it.

- `decode_image`: PIL, for the CPU augmentation (any format PIL reads; 16-bit and float images scaled to 8 bits,
  palette, CMYK and grey converted to RGB).
- `decode_rgb`, `decode_jpegs`: torchvision's decoders (libjpeg-turbo, libpng, nvJPEG on CUDA), PIL for the rest,
  as 3 x H x W uint8 tensors for the batched device path.
- `ThreadDecoder`: a pool of threads of the training process that decodes into one pinned buffer.
- `read_bytes`, `image_name`: the encoded bytes of a dataset's image value, and how logs name it.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageFile
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.io import decode_image as decode_tensor


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


def _to_8_bits(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float grey image as 8-bit grey: `convert("RGB")` would clip it at 255 (a 16-bit
    PNG would come out almost white). 16-bit values are divided by 257; float images in [0, 1] are scaled by 255."""
    array = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16") or (image.mode == "I" and array.max(initial=0) > 255):
        array = array / 257.0
    elif image.mode == "F" and array.max(initial=0) <= 1.0:
        array = array * 255.0
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")


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


class DecodedImages(NamedTuple):
    images: list[Tensor]  # 3 x H_i x W_i uint8 on the requested device
    num_failed: int  # inputs that could not be decoded (skipped)
    kept: list[int]  # index into the input of each decoded image, to keep labels aligned


def _to_rgb(image: Tensor) -> Tensor:
    """Force 3 channels: grey -> replicated, grey + alpha -> grey replicated, RGBA -> RGB."""
    if image.shape[0] in (1, 2):
        return image[:1].expand(3, -1, -1).contiguous()
    return image[:3]


def decode_rgb(data: Tensor) -> Tensor | None:
    """One encoded image (a uint8 tensor of its bytes) as 3 x H x W uint8 RGB on the CPU, or None if unreadable.

    `torchvision.io.decode_image` first (JPEG, PNG, GIF, WebP); 16-bit PNGs, which it returns as uint16, are
    scaled to 8 bits. What it cannot read (TIFF, BMP, ...) goes through PIL, as the CPU augmentation path does."""
    try:
        image = decode_tensor(data, mode=ImageReadMode.RGB)
    except Exception:  # noqa: BLE001 - not a format torchvision reads, or corrupt
        pil = decode_image(data.numpy().tobytes())
        if pil is None:
            return None
        image = torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1)
    if image.dtype == torch.uint16:
        image = torch.round(image.float() / 257).to(torch.uint8)  # 0-65535 to 0-255, as the CPU path
    if image.dtype != torch.uint8 or image.ndim != 3 or image[0].numel() == 0:
        return None
    return _to_rgb(image)


def _as_byte_tensor(data) -> Tensor:
    if isinstance(data, Tensor):
        return data.reshape(-1).to("cpu", torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_jpegs(data: Sequence[bytes | bytearray | memoryview | Tensor], device="cpu") -> DecodedImages:
    """Decode encoded images to 3 x H x W uint8 RGB on `device`, skipping those that fail.

    On CUDA, one batched `torchvision.io.decode_jpeg(..., device="cuda")` (nvJPEG); if that call fails (one corrupt
    or non-JPEG file fails the whole call), each image is retried alone on the GPU, then on the CPU with
    `decode_rgb` (torchvision's `decode_image`: JPEG, PNG, GIF, WebP, CMYK JPEGs; PIL for the rest; 16-bit PNGs
    scaled to 8 bits), then skipped. On CPU, `decode_rgb`. Grey and CMYK images come out as RGB.

    Returns:
        `DecodedImages(images, num_failed, kept)`: the decoded images, how many inputs were skipped, and the input
        index of each decoded image (to keep labels aligned).
    """
    device = torch.device(device)
    decoded: list[Tensor | None] = [None] * len(data)
    tensors: list[Tensor | None] = []
    for item in data:
        try:
            tensors.append(_as_byte_tensor(item))
        except (TypeError, ValueError):  # e.g. empty bytes
            tensors.append(None)
    valid = [i for i, t in enumerate(tensors) if t is not None and t.numel() > 0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29 deprecates its decoders for TorchCodec; libjpeg warnings
        if device.type == "cuda" and valid:
            try:
                batch = decode_jpeg([tensors[i] for i in valid], mode=ImageReadMode.RGB, device=device)
                for i, image in zip(valid, batch):
                    decoded[i] = image
            except Exception:  # noqa: BLE001 - any decoder failure falls back to one image at a time
                for i in valid:
                    try:
                        decoded[i] = decode_jpeg(tensors[i], mode=ImageReadMode.RGB, device=device)
                    except Exception:  # noqa: BLE001
                        pass
        for i in valid:
            if decoded[i] is None:  # corrupt or unsupported data stays None: skipped and counted
                image = decode_rgb(tensors[i])
                decoded[i] = image.to(device) if image is not None else None
    kept = [i for i, image in enumerate(decoded) if image is not None and image.ndim == 3 and image[0].numel() > 0]
    return DecodedImages([_to_rgb(decoded[i]) for i in kept], len(data) - len(kept), kept)


class ThreadDecoder:
    """Decodes encoded images in a pool of threads of the training process, straight into one pinned buffer.

    The DataLoader workers then only read bytes (about a seventh of the decoded pixels of a JPEG), so far less
    crosses process boundaries through shared memory; libjpeg-turbo and libpng run without the GIL, so the
    threads decode in parallel while the main thread keeps launching work on the GPU.
    """

    def __init__(self, threads: int):
        from concurrent.futures import ThreadPoolExecutor

        if threads < 1:
            raise ValueError(f"decode threads must be >= 1, got {threads}")
        self.threads = threads
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="moco-decode")
        # once, here: `warnings.catch_warnings` around each decode would race between threads
        warnings.filterwarnings("ignore", module=r"torchvision\.io")

    @staticmethod
    def _decode_one(data: torch.Tensor) -> torch.Tensor | None:
        """H x W x 3 uint8 (RGB), or None if `data` is not a readable image (`decode_rgb`: grey, RGBA, CMYK and
        16-bit images come out as 8-bit RGB)."""
        image = decode_rgb(data)
        return image.permute(1, 2, 0).contiguous() if image is not None else None  # decoders' H x W x 3: no copy

    def decode(self, data: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(pixels: P x 3 uint8 on `device`, image after image in row-major order; sizes: N x 2 (H, W) on the CPU;
        the indices in `data` of the images that could not be decoded)."""
        device = torch.device(device)
        decoded = list(self.pool.map(self._decode_one, data))
        skipped = [i for i, image in enumerate(decoded) if image is None]
        images = [image for image in decoded if image is not None]
        if not images:
            return torch.empty(0, 3, dtype=torch.uint8, device=device), torch.empty(0, 2, dtype=torch.long), skipped
        sizes = torch.tensor([image.shape[:2] for image in images], dtype=torch.long)  # N x 2
        counts = (sizes[:, 0] * sizes[:, 1] * 3).tolist()
        buffer = torch.empty(sum(counts), dtype=torch.uint8, pin_memory=device.type == "cuda")
        parts = torch.split(buffer, counts)
        list(self.pool.map(lambda pair: pair[0].copy_(pair[1].view(-1)), zip(parts, images)))  # parallel copies
        # Non-blocking from pinned memory: the host allocator keeps the buffer until the copy has run.
        return buffer.to(device, non_blocking=True).view(-1, 3), sizes, skipped

    def close(self) -> None:
        self.pool.shutdown(wait=True)


__all__ = ["DecodedImages", "ThreadDecoder", "decode_image", "decode_jpegs", "decode_rgb", "image_name", "read_bytes"]

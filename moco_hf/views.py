"""Where the pretraining loop's two views come from, one batch per call of `next(step)`.

- `CPUViews`: views augmented by the DataLoader workers (PIL), joined into batches and copied to the device.
- `GPUViews`: decoded images streamed in chunks (or JPEG bytes decoded here) and augmented on the device as whole
  batches (`MoCoGPUAugment`).
- `CachedViews`: the whole split decoded once into device memory (`DeviceImageCache`), permuted every epoch and
  augmented on the device.

`ImageChunk` holds decoded images of any sizes on the device (a chunk of the stream, or the whole cache).

Each returns (query view, key view, names of the corrupt images skipped) and keeps its place in the data in `TrainState`
(`data_epoch`, `batches_in_epoch`, counted in units of `position_unit` images), so a checkpoint resumes the data
where it stopped.
"""

from __future__ import annotations

import hashlib
import logging
from typing import NamedTuple

import torch

from .data.decode import ThreadDecoder, decode_jpegs
from .data.gpu_augment import MoCoGPUAugment, PackedImages
from .data.streams import split_encoded
from .training import TrainState

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------
# Decoded images on the device
# ---------------------------------------------------------------------------------------------------------


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
        flat, shapes, skipped, names = chunk
        if shapes.dim() == 2:
            return cls(flat.to(device, non_blocking=True).view(-1, 3), shapes), list(skipped)
        if decoder is not None:
            pixels, sizes, failed = decoder.decode(split_encoded(flat, shapes), device)
            return cls(pixels, sizes), list(skipped) + [names[i] for i in failed]
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
        device = self.pixels.device
        areas = self.sizes[:, 0] * self.sizes[:, 1]
        meta = torch.stack([torch.cumsum(areas, 0) - areas, self.sizes[:, 0], self.sizes[:, 1]])  # 3 x N
        if device.type == "cuda":  # a pinned, non-blocking copy does not wait for the GPU's queued work
            meta = meta.pin_memory().to(device, non_blocking=True)
        else:
            meta = meta.to(device)
        offsets, heights, widths = meta.unbind(0)
        return PackedImages(self.pixels.t().contiguous(), offsets, heights, widths)  # no copy if built from planes


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

    def batch(self, indices: torch.Tensor) -> PackedImages:
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
# Views
# ---------------------------------------------------------------------------------------------------------


class _WholeBatches:
    """Views whose batches never carry images into the next one: the data position is all a checkpoint needs."""

    def carry_position(self) -> tuple[int, int, int]:
        return 0, 0, 0

    def restore_carry(self, images: int, epoch: int = 0, chunks: int = 0) -> None:
        pass


class BatchStream:
    """Endless batches from the loader, epoch after epoch, that can start at a saved (epoch, batch) position."""

    def __init__(self, dataset, loader, state: TrainState):
        self.dataset, self.loader, self.state = dataset, loader, state
        self.iterator = None

    def _start_epoch(self, skip: int) -> None:
        self.dataset.set_epoch(self.state.data_epoch)
        self.iterator = iter(self.loader)
        for _ in range(skip):  # replay to the saved position (augmentation RNG included)
            if next(self.iterator, None) is None:
                break

    def next(self):
        if self.iterator is None:
            self._start_epoch(self.state.batches_in_epoch)
        for _ in range(2):
            batch = next(self.iterator, None)
            if batch is not None:
                self.state.batches_in_epoch += 1
                return batch
            self.state.data_epoch += 1
            self.state.batches_in_epoch = 0
            self._start_epoch(0)
        raise ValueError("the training split yields no images: it is empty or every image is unreadable")


def join_chunks(chunks: list) -> tuple:
    """One `collate_encoded` chunk out of several of the same kind."""
    if len(chunks) == 1:
        return chunks[0]
    flats, shapes, skipped, names = zip(*chunks)
    skipped = [name for chunk in skipped for name in chunk]
    names = None if names[0] is None else [name for chunk in names for name in chunk]
    return torch.cat(flats), torch.cat(shapes), skipped, names


def step_seed(seed: int, rank: int, step: int) -> int:
    """Seed of the device augmentation at `step`: a resumed run draws the same parameters as an uninterrupted one."""
    return hash((seed, rank, step)) & 0x7FFF_FFFF_FFFF


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """Seed of the device cache's order in `epoch` (a hash that differs from every step seed)."""
    digest = hashlib.blake2b(f"epoch {seed} {rank} {epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF


class ViewPairs(NamedTuple):
    """Two augmented views per image (the CPU workers' chunks), joined and split as `ImageChunk` is."""

    query: torch.Tensor  # N x 3 x S x S
    key: torch.Tensor

    def __len__(self) -> int:
        return self.query.shape[0]

    @classmethod
    def from_chunks(cls, chunks: list) -> tuple[ViewPairs, list[str]]:
        """(the views, names of the corrupt images skipped) of `collate_two_views` chunks."""
        views_q, views_k, skipped = zip(*chunks)
        skipped = [name for names in skipped for name in names]
        views_q, views_k = [v for v in views_q if v is not None], [v for v in views_k if v is not None]
        if not views_q:  # only trailing corrupt images
            return cls(torch.empty(0), torch.empty(0)), skipped
        return cls(torch.cat(views_q), torch.cat(views_k)), skipped

    @staticmethod
    def join(chunks: list[ViewPairs]) -> ViewPairs:
        if len(chunks) == 1:
            return chunks[0]
        return ViewPairs(torch.cat([c.query for c in chunks]), torch.cat([c.key for c in chunks]))

    def split(self, count: int) -> tuple[ViewPairs, ViewPairs]:
        """(the first `count` images, the rest)."""
        return ViewPairs(self.query[:count], self.key[:count]), ViewPairs(self.query[count:], self.key[count:])


class _StreamedViews:
    """Batches joined from the loader's chunks. Chunks come short (a worker's last chunk of an epoch, corrupt images
    skipped), so the images beyond a batch are carried into the next one: every step (and every process) gets
    exactly `batch` images, and every readable image of an epoch reaches a batch.

    The carried images are the tail of the chunks read last, so a checkpoint stores their count and where those
    chunks began (`carry_position`); a resumed run reads the chunks again and keeps the same tail (`restore_carry`),
    so it sees exactly the batches of an uninterrupted run.
    """

    def __init__(self, batches: BatchStream, batch: int):
        self.batches, self.batch = batches, batch
        self.position_unit = batches.loader.batch_size  # images per item counted in the data position: a chunk
        self.carry: list = []  # images beyond the last batch
        self.carry_from = (0, 0)  # data position (epoch, chunks) where the chunks read last began
        self.pending_carry: tuple[int, int, int] | None = None  # (images, epoch, chunks) to read again after a resume

    def _load(self, chunks: list) -> tuple:
        """(images, names of the unreadable ones) of raw loader chunks."""
        raise NotImplementedError

    def _join(self, images: list):
        raise NotImplementedError

    def _chunks_to_read(self, missing: int) -> int:
        return 1

    def carry_position(self) -> tuple[int, int, int]:
        """(images carried into the next batch, data position where the chunks they are the tail of began): saved
        with the data position."""
        images = sum(len(c) for c in self.carry)
        return (images, *self.carry_from) if images else (0, 0, 0)

    def restore_carry(self, images: int, epoch: int = 0, chunks: int = 0) -> None:
        """After a resume: the next batch starts with the last `images` readable images of the chunks from position
        (`epoch`, `chunks`) up to the saved position, as it did in the run that saved it."""
        self.pending_carry = (images, epoch, chunks) if images > 0 else None

    def _read(self, count: int = 1, until: tuple[int, int] | None = None) -> tuple:
        """The next `count` loader chunks (or those up to data position `until`), loaded together."""
        state = self.batches.state
        self.carry_from = (state.data_epoch, state.batches_in_epoch)
        raw = []
        while len(raw) < count if until is None else (state.data_epoch, state.batches_in_epoch) < until:
            raw.append(self.batches.next())
        return self._load(raw)

    def _replay_carry(self, images: int, epoch: int, chunks: int) -> list:
        state = self.batches.state
        saved = (state.data_epoch, state.batches_in_epoch)
        state.data_epoch, state.batches_in_epoch = epoch, chunks  # the stream starts there: read the chunks again
        self.batches.iterator = None
        chunk, _ = self._read(until=saved)  # their unreadable images were counted before the checkpoint
        if (state.data_epoch, state.batches_in_epoch) != saved:
            raise RuntimeError(f"resuming the data stream: reading again from position {(epoch, chunks)} passed the "
                               f"saved position {saved} (the training split changed since the checkpoint?)")
        return [chunk.split(max(0, len(chunk) - images))[1]]

    def _take(self) -> tuple:
        """(the next `batch` images, corrupt images skipped while reading them)."""
        if self.pending_carry is not None:
            self.carry, self.pending_carry = self._replay_carry(*self.pending_carry), None
        chunks, skipped = self.carry, []
        while (have := sum(len(c) for c in chunks)) < self.batch:
            chunk, unreadable = self._read(self._chunks_to_read(self.batch - have))
            chunks, skipped = chunks + ([chunk] if len(chunk) else []), skipped + unreadable
        images, rest = self._join(chunks).split(self.batch)
        self.carry = [rest] if len(rest) else []
        return images, skipped


class CPUViews(_StreamedViews):
    """Views augmented by the DataLoader workers, joined into batches and moved to the device (pinned, non-blocking)."""

    def __init__(self, batches: BatchStream, device: torch.device, channels_last: bool, batch: int):
        super().__init__(batches, batch)
        self.device, self.channels_last = device, channels_last

    def _load(self, chunks: list) -> tuple[ViewPairs, int]:
        return ViewPairs.from_chunks(chunks)

    def _join(self, images: list[ViewPairs]) -> ViewPairs:
        return ViewPairs.join(images)

    def next(self, step: int):
        views, skipped = self._take()
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        view_q = views.query.to(self.device, non_blocking=True, memory_format=memory_format)
        view_k = views.key.to(self.device, non_blocking=True, memory_format=memory_format)
        return view_q, view_k, skipped


class GPUViews(_StreamedViews):
    """Chunks decoded by the workers (or encoded, then decoded here by threads or nvJPEG) and augmented as whole
    batches on the device. The augmentation generator is reseeded from (seed, rank, step) at each step, so a resumed
    run draws the same parameters as an uninterrupted one."""

    def __init__(self, batches: BatchStream, device: torch.device, augment: MoCoGPUAugment, seed: int, rank: int,
                 batch: int, decoder: ThreadDecoder | None = None):
        super().__init__(batches, batch)
        self.device, self.seed, self.rank = device, seed, rank
        self.augment, self.decoder = augment, decoder
        self.generator = torch.Generator(device=device)

    def _load(self, chunks: list) -> tuple[ImageChunk, int]:
        return ImageChunk.from_chunk(join_chunks(chunks), self.device, self.decoder)

    def _join(self, images: list[ImageChunk]) -> ImageChunk:
        return ImageChunk.join(images)

    def _chunks_to_read(self, missing: int) -> int:
        # bytes decoded here: as many chunks as the batch still needs, decoded in one go
        return -(-missing // self.position_unit) if self.decoder is not None else 1

    def next(self, step: int):
        images, skipped = self._take()
        self.generator.manual_seed(step_seed(self.seed, self.rank, step))
        view_q, view_k = self.augment.two_views(images.packed(), generator=self.generator)
        return view_q, view_k, skipped


class CachedViews(_WholeBatches):
    """Batches drawn from this process's part of the split, decoded once into device memory (`device_cache`).

    Each epoch is a permutation of the cached images seeded by (seed, rank, epoch), cut into `batch`-sized batches
    (the remainder is dropped); the augmentation is reseeded per step as in `GPUViews`. The position (epoch, batch)
    is all a checkpoint needs, so a resumed run sees exactly the batches of an uninterrupted one.
    """

    def __init__(self, cache: DeviceImageCache, state: TrainState, augment: MoCoGPUAugment, seed: int, rank: int,
                 batch: int):
        if len(cache) < batch:
            raise ValueError(f"this process has {len(cache)} readable training images, fewer than its batch of {batch}")
        self.cache, self.state, self.augment, self.batch = cache, state, augment, batch
        self.seed, self.rank = seed, rank
        self.position_unit = batch  # images per item counted in the data position: a batch
        self.device = cache.images.device
        self.generator = torch.Generator(device=self.device)
        self.order, self.order_epoch = None, None

    @property
    def batches_per_epoch(self) -> int:
        return len(self.cache) // self.batch

    def next(self, step: int):
        if self.state.batches_in_epoch >= self.batches_per_epoch:
            self.state.data_epoch += 1
            self.state.batches_in_epoch = 0
        if self.order_epoch != self.state.data_epoch:
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.rank, self.state.data_epoch))
            self.order = torch.randperm(len(self.cache), generator=generator).to(self.device)
            self.order_epoch = self.state.data_epoch
        start = self.state.batches_in_epoch * self.batch
        images = self.cache.batch(self.order[start: start + self.batch])
        self.state.batches_in_epoch += 1
        self.generator.manual_seed(step_seed(self.seed, self.rank, step))
        view_q, view_k = self.augment.two_views(images, generator=self.generator)
        return view_q, view_k, []

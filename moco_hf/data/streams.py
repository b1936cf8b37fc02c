"""The streams DataLoader workers iterate for training and the kNN monitor, and how their chunks are collated:

- `TwoViewStream` + `collate_two_views`: decode and augment on the CPU (two views per image).
- `EncodedStream` + `collate_encoded`: encoded bytes (decoded later on the device or by threads) or images decoded
  by the workers, for the batched device augmentation; `split_encoded` takes a chunk apart again.
- `LabeledStream`: eval-transformed images with labels.

Corrupt images are skipped and named (`decode.image_name`): each chunk carries the names of those it skipped. The
training streams read either an `IterableDataset` or a `sources.ProcessShards` (this process's shards, epoch by
epoch: `set_epoch` picks them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .decode import decode_image, decode_jpegs, image_name, read_bytes

if TYPE_CHECKING:
    from .transforms import TwoViewTransform


def _epoch_part(source, epoch: int):
    """The dataset to read in `epoch`: a `ProcessShards`'s part for that epoch, or the dataset itself (reseeded)."""
    if hasattr(source, "for_epoch"):
        return source.for_epoch(epoch)
    if hasattr(source, "set_epoch"):
        source.set_epoch(epoch)
    return source


class TwoViewStream(torch.utils.data.IterableDataset):
    """Decodes, skips corrupt images and yields (view_q, view_k, names of the corrupt images skipped before it)
    triples; corrupt images at the end of the stream come as (None, None, names).

    `hf_dataset` is this process's part of the stream (a `ProcessShards`, or a dataset already split). The
    augmentation generator is
    seeded from (seed, epoch, rank, worker id), so an epoch replays identically.
    """

    def __init__(self, hf_dataset, image_column: str, transform: TwoViewTransform, seed: int, rank: int = 0):
        super().__init__()
        self.source, self.image_column, self.transform = hf_dataset, image_column, transform
        self.hf_dataset = _epoch_part(hf_dataset, 0)
        self.seed, self.rank, self.epoch = int(seed), int(rank), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.hf_dataset = _epoch_part(self.source, epoch)

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
        self.source, self.image_column, self.decode = hf_dataset, image_column, decode
        self.hf_dataset = _epoch_part(hf_dataset, 0)
        self.unshuffled = unshuffled  # the same split before its shuffle buffer, to look at one image cheaply

    def set_epoch(self, epoch: int) -> None:
        self.hf_dataset = _epoch_part(self.source, epoch)

    def first_image_nbytes(self, tries: int = 8) -> int | None:
        """Decoded size (3 x H x W bytes) of the first readable image among the split's first `tries`, or None."""
        for i, example in enumerate(self.unshuffled if self.unshuffled is not None else ()):
            data = read_bytes(example[self.image_column])
            decoded = decode_jpegs([data], device="cpu").images if data else []
            if decoded:
                return decoded[0].numel()
            if i + 1 >= tries:
                break
        return None

    def __iter__(self):
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


__all__ = ["EncodedStream", "LabeledStream", "TwoViewStream", "collate_encoded", "collate_two_views", "split_encoded"]

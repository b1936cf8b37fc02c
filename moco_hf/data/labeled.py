"""Labelled image-classification splits for linear evaluation and fine-tuning: map-style `datasets` tables with the
images undecoded (`load_labeled_split`), decoded and transformed per example (`ExampleTransform`), batched with the
corrupt images left out and counted (`ClassificationCollator`).
"""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass

import torch

from .decode import decode_image
from .sources import _load_local, find_image_column, find_label_column, load_hub_dataset


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

    def labels(self):
        """The class index of every example (`torch.long`)."""
        import torch

        raw = self.dataset[self.label_column]
        values = [self.label_map[str(v)] for v in raw] if self.label_map is not None else [int(v) for v in raw]
        return torch.tensor(values, dtype=torch.long)

    def subset(self, indices) -> LabeledSplit:
        """The examples at `indices`, the same classes."""
        return LabeledSplit(self.dataset.select([int(i) for i in indices]), self.image_column, self.label_column,
                            self.label_names, self.label_map)

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


# Supervised training crops and flips: torchvision's / timm's defaults, and the embedded digits' (digits are not
# mirror-symmetric, and a crop of 8 % of a 32 px digit no longer shows which digit it is).
SUPERVISED_AUGMENTATION = {"default": dict(crop_min_scale=0.08, flip_prob=0.5),
                           "digits": dict(crop_min_scale=0.6, flip_prob=0.0)}


def supervised_augmentation(dataset_name: str | None, train_dir: str | None, crop_min_scale: float | None = None,
                            flip_prob: float | None = None) -> dict:
    """`crop_min_scale` and `flip_prob` for training a classifier: as given, else the dataset's (the embedded digits
    when neither `dataset_name` nor `train_dir` is set, else the usual 0.08 and 0.5)."""
    defaults = SUPERVISED_AUGMENTATION["default" if dataset_name or train_dir else "digits"]
    given = {"crop_min_scale": crop_min_scale, "flip_prob": flip_prob}
    return {key: given[key] if given[key] is not None else value for key, value in defaults.items()}


__all__ = ["ClassificationCollator", "ExampleTransform", "LabeledSplit", "load_labeled_split", "make_loader",
           "supervised_augmentation"]

"""Where the images come from, as `datasets` datasets with the images left undecoded (so that a corrupt file is
skipped and counted rather than fatal):

- a Hub dataset by name (`load_dataset(name, streaming=True)`; failures as one line for people: no network, a
  gated or unknown name, a missing split),
- a local folder (`train_dir`): an image folder (`class/xxx.jpg`, optionally under `train/`, `test/` ...), parquet
  files or webdataset `.tar` shards,
- the embedded default: scikit-learn's bundled handwritten digits, written once as an image folder.

`load_source` streams a split for pretraining; `integer_labels` and `label_index` say how its labels map to class
indices. The image and label columns are found by type or name (`find_image_column`, `find_label_column`).
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from dataclasses import dataclass

from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


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
# Each process's part of a streamed split
# ---------------------------------------------------------------------------------------------------------


def rank_shards(num_shards: int, world: int, rank: int, epoch: int, seed: int) -> list[int]:
    """The shards process `rank` of `world` reads in `epoch`: every process the same number, num_shards // world,
    and each shard at most one process. Where the shards do not divide evenly, the num_shards % world left over are
    other ones every epoch (a permutation seeded by the epoch), so that over the epochs every shard is read and every
    process's epoch is as long as the others' (the shorter epoch wins, by less than one shard per process)."""
    per = num_shards // world
    if num_shards % world == 0:
        return list(range(rank * per, (rank + 1) * per))
    import numpy as np

    order = np.random.default_rng([seed, epoch, num_shards]).permutation(num_shards)
    return sorted(int(i) for i in order[rank * per:(rank + 1) * per])


class ProcessShards:
    """This process's part of a streamed split, epoch by epoch: its `rank_shards` of the split's shards (files,
    parquet row groups or ranges of an indexed folder), so each byte is read by one process once per epoch for any
    shard count, then shuffled (a buffer of `shuffle_buffer` images, reseeded every epoch). Within the process,
    `datasets` hands the shards to the DataLoader workers.

    A parquet stream whose files do not divide among the processes and their workers is split into its row groups
    first (`IterableDataset.reshard`). With fewer shards than processes (a few webdataset .tar files), every process
    reads every shard and keeps 1 image in `world` (the I/O of all), with a warning."""

    def __init__(self, dataset, world: int = 1, rank: int = 0, seed: int = 0, shuffle_buffer: int = 10_000,
                 workers: int = 1):
        if dataset.num_shards % world or dataset.num_shards < world * max(1, workers):
            resharded = dataset.reshard()  # parquet: one shard per row group; other formats: unchanged
            if resharded.num_shards > dataset.num_shards:
                dataset = resharded
        self.dataset, self.world, self.rank, self.seed, self.shuffle_buffer = dataset, world, rank, seed, shuffle_buffer
        self.num_shards = dataset.num_shards
        self.per_process = self.num_shards // world
        self.features = dataset.features

    @property
    def reads_everything(self) -> bool:
        return self.per_process == 0

    def describe(self, num_examples: int | None) -> str:
        """One line for the log: the shards, and roughly how many images each process owns per epoch."""
        if self.reads_everything:
            return (f"only {self.num_shards} shard(s) for {self.world} processes: every process reads all of them "
                    f"and keeps 1 image in {self.world} ({self.world} times the I/O; write the data in at least "
                    f"{self.world} shards)")
        images = f", about {num_examples * self.per_process // self.num_shards} images" if num_examples else ""
        left = self.num_shards - self.per_process * self.world
        rest = f"; {left} left out per epoch, other ones every epoch" if left else ""
        return (f"{self.num_shards} shards: each of the {self.world} process(es) reads {self.per_process} per "
                f"epoch{images}{rest}")

    def epoch_fraction(self) -> float:
        """The share of the split read in one epoch (all processes together)."""
        return 1.0 if self.reads_everything else self.per_process * self.world / self.num_shards

    def for_epoch(self, epoch: int):
        """This process's shards of `epoch`, shuffled with the epoch's seed."""
        from datasets import concatenate_datasets
        from datasets.distributed import split_dataset_by_node

        if self.reads_everything:
            part = split_dataset_by_node(self.dataset, rank=self.rank, world_size=self.world, strategy="examples")
        elif self.world == 1:
            part = self.dataset
        else:
            indices = rank_shards(self.num_shards, self.world, self.rank, epoch, self.seed)
            part = concatenate_datasets([self.dataset.shard(self.num_shards, i) for i in indices])
        part = part.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        part.set_epoch(epoch)
        return part


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


__all__ = [
    "IMAGE_EXTENSIONS",
    "ProcessShards",
    "SourceInfo",
    "digits_image_folder",
    "find_image_column",
    "find_label_column",
    "integer_labels",
    "label_index",
    "load_hub_dataset",
    "load_source",
    "rank_shards",
]

"""The data side of moco_hf, one idea per module (as timm's `timm/data/`), so that a newcomer finds each from its
name:

- `sources`: where images come from: a Hub dataset (streamed), a local folder (image folder, parquet, webdataset
  shards) or the embedded digits; the image and label columns; class names to indices.
- `decode`: bytes to RGB images (PIL, torchvision's decoders, nvJPEG, a pool of threads); a corrupt image becomes
  None (or is left out) and is named, never raised.
- `presets`: the papers' augmentation recipes (v1, v2, the CIFAR demo), which both augmentation paths build from.
- `transforms`: the CPU path, one PIL image at a time: two augmented views, the eval and supervised transforms.
- `gpu_augment`: the same recipes on whole batches on the device.
- `streams`: what DataLoader workers iterate for training and the kNN monitor, and how their chunks are collated.
- `labeled`: labelled splits for linear evaluation and fine-tuning.

Imports run one way: `presets`, `sources` and `decode` import nothing of the package; `transforms` and
`gpu_augment` build from `presets`; `streams` and `labeled` read through `sources` and `decode`. The device side of
the training loop (decoded chunks, the device cache, the views) is `moco_hf/views.py`.
"""

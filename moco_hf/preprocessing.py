"""The preprocessing a model expects, read, resolved and saved in one place for pretraining (the kNN monitor's
eval transform goes into `final/`), evaluation and fine-tuning (the checkpoint's transform) and publishing (the
image processor of the staged repository):

- `preprocessing_for(model_dir)`: what a MoCo or timm-format folder was trained with, as a `Preprocessing`.
- `resolve_data_config`: timm's eval data config of a backbone, with overrides; `default_data_config`: the
  overrides a run recorded (training_config.json), else its `preprocessor_config.json`.
- `image_processor_from_data_config`, `save_image_processor`: the same transform as a transformers
  `BitImageProcessor` (`preprocessor_config.json`, for `AutoImageProcessor` and the pipelines).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn
from transformers import BitImageProcessor
from transformers.image_utils import PILImageResampling

from .configuration_moco import MoCoConfig

RECORD_FILES = ("metrics.json", "training_config.json", "training_args.json")


_RESAMPLE = {
    "nearest": PILImageResampling.NEAREST,
    "bilinear": PILImageResampling.BILINEAR,
    "bicubic": PILImageResampling.BICUBIC,
    "lanczos": PILImageResampling.LANCZOS,
    "box": PILImageResampling.BOX,
    "hamming": PILImageResampling.HAMMING,
}


@dataclass(frozen=True)
class Preprocessing:
    """The input pipeline a checkpoint expects: square image size, normalisation, eval crop fraction, interpolation."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float = 1.0
    interpolation: str = "bilinear"

    def data_config(self, crop_pct: float | None = None) -> dict:
        """As a timm data config (e.g. for `moco_hf.hub.save_image_processor`), optionally with another crop_pct."""
        return {
            "input_size": (3, self.image_size, self.image_size),
            "crop_pct": float(self.crop_pct if crop_pct is None else crop_pct),
            "crop_mode": "center",
            "interpolation": self.interpolation,
            "mean": tuple(self.mean),
            "std": tuple(self.std),
        }


def read_model_config(model_dir: str | os.PathLike) -> dict:
    """config.json of a local model folder; FileNotFoundError / ValueError with the reason otherwise."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(
            f"model_dir {str(model_dir)!r} is not a folder (download a Hub model first, e.g. with "
            "huggingface_hub.snapshot_download)"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{str(model_dir)!r} has no config.json: not a folder written by save_pretrained")
    with open(path) as f:
        return json.load(f)


def is_timm_folder(config: dict) -> bool:
    """A timm-format model folder (`timm.models.save_for_hf`, `moco_hf.hub.export_timm_backbone`)."""
    return "architecture" in config and "model_type" not in config


def preprocessing_for(model_dir: str | os.PathLike, image_size: int | None = None) -> Preprocessing:
    """The preprocessing that a MoCo or timm-format model folder was trained with.

    MoCo folder: what the run recorded (training_config.json from pretrain.py: image_size, mean, std,
    eval_crop_pct), else preprocessor_config.json (a staged or downloaded folder), else the backbone's timm
    defaults. timm-format folder: its `pretrained_cfg`. `image_size` replaces the size, keeping the rest.
    """
    config = read_model_config(model_dir)
    if config.get("model_type") == MoCoConfig.model_type:
        override = default_data_config(model_dir)
        if image_size:
            override["input_size"] = (3, int(image_size), int(image_size))
        data = resolve_data_config(MoCoConfig.from_pretrained(model_dir), override)
    elif is_timm_folder(config):
        data = {"input_size": (3, 224, 224), "crop_pct": 0.875, "interpolation": "bilinear",
                "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), **(config.get("pretrained_cfg") or {})}
        if image_size:
            data["input_size"] = (3, int(image_size), int(image_size))
    else:
        raise ValueError(
            f"{str(model_dir)!r} is neither a MoCo model (model_type 'moco') nor a timm-format folder (architecture)"
        )
    return Preprocessing(
        image_size=int(data["input_size"][-1]),
        mean=tuple(float(v) for v in data["mean"]),
        std=tuple(float(v) for v in data["std"]),
        crop_pct=float(data.get("crop_pct") or 1.0),
        interpolation=data.get("interpolation") or "bilinear",
    )


def _backbone_of(model_or_config) -> nn.Module:
    """The timm backbone of a MoCo model, a timm model itself, or one built (on the meta device) from a config."""
    if isinstance(model_or_config, MoCoConfig):
        kwargs = dict(model_or_config.backbone_kwargs or {})
        try:
            with torch.device("meta"):  # only pretrained_cfg is needed: skip allocating the weights
                return timm.create_model(model_or_config.backbone, pretrained=False, num_classes=0, **kwargs)
        except (RuntimeError, NotImplementedError):
            return timm.create_model(model_or_config.backbone, pretrained=False, num_classes=0, **kwargs)
    if hasattr(model_or_config, "get_backbone"):
        return model_or_config.get_backbone()
    if isinstance(model_or_config, nn.Module) and hasattr(model_or_config, "pretrained_cfg"):
        return model_or_config
    raise TypeError(f"expected a MoCo model, a MoCoConfig or a timm model, got {type(model_or_config).__name__}")


def resolve_data_config(model_or_config, data_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """timm's eval data config of the backbone, with `data_config` overriding input_size / img_size / crop_pct /
    crop_mode / interpolation / mean / std (e.g. a 32 px CIFAR run).

    `timm.data.resolve_input_data_config` is `timm.data.resolve_data_config({}, model=backbone)` that also
    respects the size a fixed-size backbone was built with (a ViT created with `img_size=32` gets 32, not its
    pretrained_cfg's 224) and refuses a requested size that such a model cannot take (ValueError).
    """
    return timm.data.resolve_input_data_config(_backbone_of(model_or_config), args=dict(data_config or {}))


def image_processor_from_data_config(data_config: dict[str, Any]) -> BitImageProcessor:
    """A transformers `BitImageProcessor` that performs timm's eval transform for `data_config`.

    timm: Resize(shorter side -> floor(size / crop_pct)), CenterCrop(size), ToTensor, Normalize(mean, std).
    BitImageProcessor: resize `shortest_edge`, center crop `crop_size`, rescale 1/255, normalise: the same steps.
    Its PIL backend gives timm's output exactly except that transformers places an odd crop margin at
    floor(margin / 2) and torchvision at round(margin / 2) (a one-pixel shift for some image sizes); its default
    torchvision backend resizes a tensor with antialiasing, within 1-2 intensity levels of PIL.
    """
    _, height, width = data_config["input_size"]
    crop_pct = data_config.get("crop_pct") or timm.data.DEFAULT_CROP_PCT
    crop_mode = data_config.get("crop_mode") or "center"
    scale = (math.floor(height / crop_pct), math.floor(width / crop_pct))
    if crop_mode == "center" and scale[0] == scale[1]:
        size = {"shortest_edge": scale[0]}
    elif crop_mode in ("center", "squash"):
        if crop_mode == "center":
            warnings.warn(
                f"non-square input size {(height, width)}: timm keeps the aspect ratio (ResizeKeepRatio), "
                "the image processor resizes to the scaled size directly",
                stacklevel=2,
            )
        size = {"height": scale[0], "width": scale[1]}
    else:
        raise ValueError(
            f"crop_mode {crop_mode!r} has no transformers image processor equivalent; use 'center' or 'squash'"
        )
    interpolation = data_config.get("interpolation") or "bilinear"
    if interpolation not in _RESAMPLE:
        raise ValueError(f"interpolation {interpolation!r} is not one of {sorted(_RESAMPLE)}")
    return BitImageProcessor(
        do_resize=True,
        size=size,
        resample=_RESAMPLE[interpolation],
        do_center_crop=True,
        crop_size={"height": height, "width": width},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[float(v) for v in data_config["mean"]],
        image_std=[float(v) for v in data_config["std"]],
        do_convert_rgb=True,
    )


def save_image_processor(
    model_or_config, out_dir: str | os.PathLike, data_config: dict[str, Any] | None = None
) -> BitImageProcessor:
    """Write `preprocessor_config.json` with the backbone's timm eval transform (see
    `image_processor_from_data_config`), so `AutoImageProcessor.from_pretrained(out_dir)` and the
    `image-feature-extraction` pipeline work without a user transform. Returns the processor."""
    processor = image_processor_from_data_config(resolve_data_config(model_or_config, data_config))
    processor.save_pretrained(out_dir)
    return processor


def run_records(model_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """`metrics.json`, `training_config.json`, `training_args.json` of a run folder, where present and valid JSON;
    a list of records (one per epoch) becomes its last record."""
    records = {}
    for name in RECORD_FILES:
        path = Path(model_dir) / name
        if not path.is_file():
            continue
        try:
            value = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            warnings.warn(f"ignoring {path}: not valid JSON", stacklevel=2)
            continue
        if isinstance(value, list):
            value = next((v for v in reversed(value) if isinstance(v, dict)), {})
        if isinstance(value, dict):
            records[name] = value
    return records


def flat_scalars(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested record as one level of `a.b` keys: scalars as they are, anything else as JSON."""
    out = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_scalars(value, prefix=f"{name}."))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


def processor_data_config(path: str | os.PathLike) -> dict[str, Any]:
    """timm data-config overrides from a BitImageProcessor's preprocessor_config.json ({} where there is none)."""
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        proc = json.load(f)
    out: dict[str, Any] = {}
    crop, size = proc.get("crop_size") or {}, proc.get("size") or {}
    if isinstance(crop, dict) and crop.get("height"):
        out["input_size"] = (3, int(crop["height"]), int(crop.get("width", crop["height"])))
        short = size.get("shortest_edge") or size.get("height") if isinstance(size, dict) else None
        if short:
            out["crop_pct"] = int(crop["height"]) / int(short)
    if proc.get("image_mean") and proc.get("image_std"):
        out["mean"], out["std"] = tuple(proc["image_mean"]), tuple(proc["image_std"])
    names = {int(resample): name for name, resample in _RESAMPLE.items()}
    if proc.get("resample") in names:
        out["interpolation"] = names[proc["resample"]]
    return out


def default_data_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """Eval preprocessing recorded by the run, as a timm data-config override: `image_size`, `eval_crop_pct` or
    `crop_pct`, `interpolation`, `mean`, `std` from `training_config.json` / `training_args.json`; where the
    folder records none (a linear-evaluation output, a staged or downloaded model), its preprocessor_config.json.

    A run that records its image size but no crop fraction gets crop_pct 1.0 (resize the shorter side to the size,
    center crop): that is the transform of moco_hf's kNN monitor (pretrain.py), so the published processor matches
    the kNN accuracy on the card. Mean / std not recorded come from the backbone's timm config, as in pretrain.py.
    """
    records = run_records(model_dir)
    found: dict[str, Any] = {}
    for name in ("training_config.json", "training_args.json"):
        found.update(flat_scalars(records.get(name, {})))
        for key, value in records.get(name, {}).items():  # lists (mean, std) are kept as lists
            if isinstance(value, (list, tuple)):
                found[key] = value
    out: dict[str, Any] = {}
    for key in ("image_size", "img_size", "input_size", "data.image_size"):
        size = found.get(key)
        if isinstance(size, int) and not isinstance(size, bool):
            out["input_size"] = (3, size, size)
            out["crop_pct"] = 1.0
            break
    for key in ("eval_crop_pct", "crop_pct"):
        if isinstance(found.get(key), (int, float)) and not isinstance(found[key], bool):
            out["crop_pct"] = float(found[key])
            break
    if isinstance(found.get("interpolation"), str) and found["interpolation"] in _RESAMPLE:
        out["interpolation"] = found["interpolation"]
    for key in ("mean", "std"):
        if isinstance(found.get(key), (list, tuple)) and len(found[key]) == 3:
            out[key] = tuple(float(v) for v in found[key])
    return out or processor_data_config(Path(model_dir) / "preprocessor_config.json")


__all__ = ["Preprocessing", "default_data_config", "flat_scalars", "image_processor_from_data_config", "is_timm_folder", "preprocessing_for", "processor_data_config", "read_model_config", "resolve_data_config", "run_records", "save_image_processor"]

"""Pieces of the pretraining loop used by `pretrain.py`: typed config, lr schedule, checkpoints, profiler."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import typing
from dataclasses import dataclass, field

import torch
import yaml

logger = logging.getLogger(__name__)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def uses_cuda_graphs(compile_mode: str, device: torch.device) -> bool:
    """Whether encoders compiled in `compile_mode` replay CUDA graphs on `device` (torch.compile's modes that do)."""
    return device.type == "cuda" and compile_mode in ("reduce-overhead", "max-autotune")


@dataclass
class PretrainConfig:
    """Everything `pretrain.py` reads. YAML files fill it; `--key value` on the command line overrides it.

    The defaults are the embedded demo (configs/demo_digits.yaml): with no dataset named (`dataset_name` and
    `train_dir` empty) it runs on scikit-learn's digits. The paper settings live in configs/.
    """

    # run
    output_dir: str = "outputs/moco-digits"
    seed: int = 0
    max_steps: int = -1  # > 0 overrides num_epochs
    num_epochs: int = 20
    batch_size: int = 128  # global, over all processes
    save_steps: int = 0  # checkpoint every N optimizer steps (0: none; the final model is always saved)
    save_total_limit: int = 3  # checkpoints kept
    resume_from_checkpoint: str | None = None  # a checkpoint folder, or "auto" for the newest in output_dir
    stop_after_steps: int = -1  # > 0: checkpoint and stop after this many steps of this invocation (time-limited jobs)
    log_steps: int = 10
    profile_steps: int = 0  # > 0: torch.profiler over that many steps after the first log window -> output_dir/profile
    report_to: str = "tensorboard"  # tensorboard, wandb, all, none
    mixed_precision: str = "no"  # no, fp16, bf16
    compile: bool = False  # torch.compile both encoders (and the device augmentation)
    compile_mode: str = "default"  # torch.compile mode of the encoders: default, reduce-overhead (CUDA graphs),
    # max-autotune (Triton autotuning plus CUDA graphs) or max-autotune-no-cudagraphs
    channels_last: bool = False
    cudnn_benchmark: bool = True  # cuDNN picks the fastest convolution algorithms (fixed shapes), as the official code

    # data
    dataset_name: str | None = None  # Hub dataset, e.g. "ILSVRC/imagenet-1k"
    dataset_config: str | None = None
    train_dir: str | None = None  # local image folder, parquet or webdataset shards
    train_split: str = "train"
    eval_split: str | None = "test"  # held-out split for the kNN monitor (None: no monitor)
    image_column: str | None = None  # detected when None
    label_column: str | None = None  # detected when None
    num_workers: int = 1
    num_shards: int = 16  # shards of a local dataset's stream (>= processes x workers)
    shuffle_buffer: int = 10_000
    num_train_examples: int | None = None  # size of the training split when the source does not say (webdataset)
    augmentation: str = "cifar"  # v1, v2, cifar
    image_size: int = 32  # crop size in pixels
    crop_min_scale: float | None = 0.4  # RandomResizedCrop lower scale bound: the demo's 0.4 (digits fill the
    # frame); None: the preset's, as published (v1, v2: 0.2; cifar: 0.08), which the paper configs set
    gpu_augment: str = "auto"  # auto (GPU when training on CUDA), on, off
    device_decode: str = "workers"  # with gpu_augment: JPEGs decoded by DataLoader workers (libjpeg-turbo),
    # by threads of the training process (threads: workers only read bytes) or with nvjpeg
    decode_threads: int = 0  # device_decode threads: how many (0: the CPU cores less the workers, at least 2);
    # the workers then only read bytes, so 2-4 of them are enough
    device_cache: str = "auto"  # with gpu_augment: decode the split once into device memory (auto: when it fits)
    device_cache_gb: float = 4.0  # the most device memory the cache may take, per process

    # model (MoCoConfig)
    backbone: str = "test_resnet"
    backbone_kwargs: dict = field(default_factory=dict)
    embed_dim: int = 128
    queue_size: int = 1024  # K
    momentum: float = 0.99  # m
    tau: float = 0.1
    mlp_head: bool = True
    mlp_hidden_dim: int | None = None
    shuffle_bn: bool = True
    bn_splits: int = 1
    symmetric: bool = False

    # optimisation
    base_lr: float = 0.06  # for a global batch of 256; lr = base_lr * batch_size / 256
    weight_decay: float = 5e-4
    sgd_momentum: float = 0.9
    lr_schedule: str = "cosine"  # cosine (per step) or step
    lr_steps: list = field(default_factory=lambda: [120, 160])  # epochs where the step schedule divides by 10
    warmup_epochs: float = 0.0

    # kNN monitor (official CIFAR demo: k=200, t=0.1)
    knn_every_epochs: int = 5  # 0: only before and after training
    knn_k: int = 200
    knn_t: float = 0.1
    knn_max_train_samples: int = 50_000
    knn_max_eval_samples: int = 10_000

    def model_kwargs(self) -> dict:
        names = ("backbone", "backbone_kwargs", "embed_dim", "queue_size", "momentum", "tau", "mlp_head",
                 "mlp_hidden_dim", "shuffle_bn", "bn_splits", "symmetric")
        return {name: getattr(self, name) for name in names}

    def validate(self) -> None:
        choices = {
            "mixed_precision": ("no", "fp16", "bf16"),
            "lr_schedule": ("cosine", "step"),
            "augmentation": ("v1", "v2", "cifar"),
            "gpu_augment": ("auto", "on", "off"),
            "device_decode": ("workers", "threads", "nvjpeg"),
            "device_cache": ("auto", "on", "off"),
            "report_to": ("tensorboard", "wandb", "all", "none"),
            "compile_mode": COMPILE_MODES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        for name in ("batch_size", "image_size", "num_shards", "knn_k", "log_steps", "save_total_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_workers", "save_steps", "knn_every_epochs", "warmup_epochs", "shuffle_buffer",
                     "profile_steps", "decode_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.compile_mode != "default" and not self.compile:
            raise ValueError(f"compile_mode={self.compile_mode!r} only applies to compiled encoders: set compile: true "
                             f"as well, or leave compile_mode at 'default'")
        if not self.device_cache_gb > 0:
            raise ValueError(f"device_cache_gb must be > 0, got {self.device_cache_gb}")
        if self.num_train_examples is not None and self.num_train_examples < 1:
            raise ValueError(f"num_train_examples must be >= 1, got {self.num_train_examples}")
        if self.max_steps <= 0 and self.num_epochs <= 0:
            raise ValueError("set max_steps > 0 or num_epochs > 0")
        if self.queue_size < self.batch_size * (2 if self.symmetric else 1):
            raise ValueError(
                f"queue_size={self.queue_size} is smaller than the keys enqueued per step "
                f"({self.batch_size}{' x 2' if self.symmetric else ''}); use queue_size >= that"
            )
        if self.dataset_name and self.train_dir:
            raise ValueError("set either dataset_name (Hub) or train_dir (local folder), not both")


def _field_types() -> dict[str, typing.Any]:
    return typing.get_type_hints(PretrainConfig)


def parse_value(name: str, text: str):
    """Convert a command-line string to the type of config field `name`."""
    kind = _field_types()[name]
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    base = args[0] if args else kind
    if text.lower() in ("none", "null") and type(None) in typing.get_args(kind):
        return None
    origin = typing.get_origin(base) or base
    if origin is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{name} expects true or false, got {text!r}")
    if origin in (list, dict):
        value = yaml.safe_load(text)
        if not isinstance(value, origin):
            raise ValueError(f"--{name} expects a {origin.__name__} (YAML syntax, e.g. [1, 2] or {{a: 1}}), got {text!r}")
        return value
    try:
        return origin(text)
    except ValueError:
        raise ValueError(f"--{name} expects {origin.__name__}, got {text!r}") from None


def load_config(config_path: str | None = None, overrides: list[str] | None = None) -> PretrainConfig:
    """Defaults <- YAML file <- `--key value` / `--key=value` overrides. Unknown keys are an error."""
    valid = [f.name for f in dataclasses.fields(PretrainConfig)]
    values: dict = {}
    if config_path:
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"config file {config_path!r} not found")
        with open(config_path) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{config_path} must hold a mapping of config keys")
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown} in {config_path}; valid keys: {', '.join(valid)}")
        # YAML reads 1e-4 and `none` as strings: give them the field's type as on the command line.
        values = {k: parse_value(k, v) if isinstance(v, str) else v for k, v in values.items()}
    overrides = list(overrides or [])
    i = 0
    while i < len(overrides):
        token = overrides[i]
        if not token.startswith("--"):
            raise ValueError(f"expected --key value, got {token!r}")
        key, eq, text = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(overrides):
                raise ValueError(f"--{key} needs a value")
            text = overrides[i + 1]
            i += 1
        key = key.replace("-", "_")
        if key not in valid:
            raise ValueError(f"unknown config key --{key}; valid keys: {', '.join(valid)}")
        values[key] = parse_value(key, text)
        i += 1
    config = PretrainConfig(**values)
    config.validate()
    return config


def save_config(config: PretrainConfig, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(dataclasses.asdict(config), f, sort_keys=False)


# ---------------------------------------------------------------------------------------------------------
# Learning-rate schedule: a pure function of the step
# ---------------------------------------------------------------------------------------------------------


def lr_at(step: int, total_steps: int, steps_per_epoch: int, base_lr: float, schedule: str = "cosine",
          warmup_steps: int = 0, milestones_epochs: typing.Sequence[int] = ()) -> float:
    """Learning rate for optimizer step `step` (0-based).

    cosine: lr * 0.5 * (1 + cos(pi * progress)) per step (MoCo v2), after a linear warm-up;
    step: lr * 0.1 ** (number of milestone epochs passed) (MoCo v1: epochs 120 and 160 of 200).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    epoch = step / max(1, steps_per_epoch)
    return base_lr * 0.1 ** sum(epoch >= m for m in milestones_epochs)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints: written to a temporary folder, then renamed into place
# ---------------------------------------------------------------------------------------------------------

CHECKPOINT_PREFIX = "checkpoint-"
COMPLETE_MARKER = "COMPLETE"


def checkpoint_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, "checkpoints", f"{CHECKPOINT_PREFIX}{step:08d}")


def _saved_order(path: str) -> int:
    """The save number a checkpoint's marker records (0 for markers from before it was recorded)."""
    try:
        with open(os.path.join(path, COMPLETE_MARKER)) as f:
            return int(json.load(f).get("saved", 0))
    except (OSError, ValueError, AttributeError):
        return 0


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints in the order they were saved, oldest first. After a resume from an older checkpoint,
    the resumed run's saves come after the abandoned run's later steps. Half-written ones (temporary names, no
    marker) are never listed."""
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", name)
        path = os.path.join(root, name)
        if match and os.path.isfile(os.path.join(path, COMPLETE_MARKER)):
            found.append((_saved_order(path), int(match.group(1)), path))
    return [path for *_, path in sorted(found)]


def resolve_resume(resume: str | None, output_dir: str) -> str | None:
    """The checkpoint folder to resume from: `auto` -> the last complete one saved (or None), a path -> itself."""
    if not resume:
        return None
    if resume == "auto":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    if not os.path.isfile(os.path.join(resume, COMPLETE_MARKER)):
        raise FileNotFoundError(f"resume_from_checkpoint {resume!r} is not a complete checkpoint folder")
    return resume


def _fsync(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(accelerator, output_dir: str, step: int, total_limit: int) -> str:
    """accelerator.save_state into `.tmp-...`, every file synced to disk, then a COMPLETE marker, then an atomic
    rename; prune the oldest saves beyond `total_limit`.

    A crash, Ctrl-C or power loss at any point leaves the previous checkpoints alone, plus at most a `.tmp-` (or
    `.old-`) folder that `resolve_resume` ignores and the next save removes.
    """
    final = checkpoint_dir(output_dir, step)
    root = os.path.dirname(final)
    tmp = os.path.join(root, f".tmp-{os.path.basename(final)}")
    if accelerator.is_main_process:
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):  # leftovers of saves that crashed, at this step or any other
            if name.startswith((".tmp-", ".old-")):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp, safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for folder, _, files in os.walk(tmp):  # the data is on disk before the marker that vouches for it
            for name in files:
                _fsync(os.path.join(folder, name))
        saved = max((_saved_order(path) for path in list_checkpoints(output_dir)), default=0) + 1
        with open(os.path.join(tmp, COMPLETE_MARKER), "w") as f:
            f.write(json.dumps({"step": step, "saved": saved}))
            f.flush()
            os.fsync(f.fileno())
        _fsync(tmp, directory=True)
        old = None
        if os.path.exists(final):  # the same step saved again (a run resumed from an older checkpoint)
            old = os.path.join(root, f".old-{os.path.basename(final)}")
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync(root, directory=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        checkpoints = list_checkpoints(output_dir)
        for stale in checkpoints[: max(0, len(checkpoints) - max(1, total_limit))]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


@dataclass
class TrainState:
    """Loop position, saved with every checkpoint (accelerate's register_for_checkpointing)."""

    step: int = 0
    data_epoch: int = 0  # epoch of this process's data stream
    batches_in_epoch: int = 0  # loader chunks (device cache: batches) already taken from it
    skipped_images: int = 0  # corrupt images skipped so far (all processes)
    # Per process, at save time: data_epoch, batches_in_epoch, images per counted item, then the images carried
    # into the next batch and the position (epoch, chunks) where the chunks they came from began
    # (`carry_position` of the streamed views).
    positions: list = field(default_factory=list)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class StepProfiler:
    """`profile_steps` > 0: torch.profiler over that many steps after the first log window (compilation and
    warm-up done), on the main process. Writes output_dir/profile/: the ops by device time and by host time
    (`ops_by_device_time.txt`, `ops_by_host_time.txt`) and a Chrome trace (`trace.json`, for Perfetto)."""

    def __init__(self, cfg: PretrainConfig, step: int, accelerator):
        self.first = step + cfg.log_steps
        self.last = self.first + cfg.profile_steps
        self.folder = os.path.join(cfg.output_dir, "profile")
        self.enabled = accelerator.is_main_process
        self.device_type = accelerator.device.type
        self.profile = None

    def before_step(self, step: int) -> None:
        if self.enabled and step == self.first and self.profile is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device_type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profile = torch.profiler.profile(activities=activities)
            self.profile.__enter__()

    def after_step(self, step: int) -> None:
        if self.profile is None or step != self.last:
            return
        if self.device_type == "cuda":
            torch.cuda.synchronize()
        self.profile.__exit__(None, None, None)
        os.makedirs(self.folder, exist_ok=True)
        averages = self.profile.key_averages()
        device_sort = "self_cuda_time_total" if self.device_type == "cuda" else "self_cpu_time_total"
        header = f"{self.last - self.first} steps from step {self.first}\n"
        for name, sort in (("ops_by_device_time.txt", device_sort), ("ops_by_host_time.txt", "self_cpu_time_total")):
            with open(os.path.join(self.folder, name), "w") as f:
                f.write(header + averages.table(sort_by=sort, row_limit=40, max_name_column_width=60))
        self.profile.export_chrome_trace(os.path.join(self.folder, "trace.json"))
        self.profile = None
        logger.info("profile of steps %d-%d written to %s", self.first + 1, self.last, self.folder)

    def close(self, step: int) -> None:
        """Training ended inside the profiled steps: write what there is."""
        if self.profile is not None:
            self.last = step
            self.after_step(step)

"""The pretraining run behind `pretrain.py`: build, resume, loop, finish.

`train(cfg)` takes a `pretrain.PretrainConfig` (validated) and reads top-down: `start` builds everything and checks
it before a file is written (the output folder, the backbone, the data source), then each step takes the two views
(`views.next`), runs one step of Algorithm 1 with the optimizer, and passes the step to three hooks: the log window,
the kNN monitor and the checkpoints; `finish` saves `output_dir/final`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import shutil
import time
from typing import NamedTuple

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
    broadcast_object_list,
    gather_object,
    set_seed,
)

from .configuration_moco import MoCoConfig
from .data.decode import ThreadDecoder
from .data.gpu_augment import MoCoGPUAugment
from .data.sources import ProcessShards, integer_labels, label_index, load_source
from .data.streams import EncodedStream, LabeledStream, TwoViewStream, collate_encoded, collate_two_views
from .data.transforms import EvalTransform, TwoViewTransform
from .evaluation import record_metrics
from .representation import FeatureSet, auto_knn_k, compare, extract_features, format_results, knn_accuracy
from .modeling_moco import MoCoModel
from .preprocessing import default_data_config, save_image_processor
from .run_folder import check_output_dir, clear_run, save_checkpoint, share_files, write_run_config
from .sync_batchnorm import convert_sync_batchnorm
from .training import StepProfiler, StopSignals, TrainState, create_optimizer, lr_at, momentum_at, uses_cuda_graphs
from .views import BatchStream, CachedViews, CPUViews, DeviceImageCache, GPUViews, ImageChunk

logger = logging.getLogger("pretrain")
SHOWN_NAMES = 5  # corrupt images named in a log line
RECORDED_NAMES = 20  # ... and in final/metrics.json


# ---------------------------------------------------------------------------------------------------------
# Pieces of the setup
# ---------------------------------------------------------------------------------------------------------


def make_accelerator(cfg) -> Accelerator:
    trackers = {"none": None, "all": "all", "tensorboard": "tensorboard", "wandb": "wandb"}[cfg.report_to]
    if cfg.report_to in ("wandb", "all"):
        import importlib.util

        if importlib.util.find_spec("wandb") is None and cfg.report_to == "wandb":
            raise ValueError("report_to=wandb needs the wandb package: pip install wandb, or report_to tensorboard "
                             "or none")
    if trackers == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            logger.warning("report_to=tensorboard, but tensorboard is not installed: no metrics are logged "
                           "(pip install tensorboard)")
            trackers = None
    # Every process enqueues the same gathered keys, so queues agree without DDP's buffer broadcast; leaving it
    # on would overwrite each rank's queue (and key-encoder BN statistics) with rank 0's on every forward.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    # The kNN monitor runs on the main process while the others wait in a collective: allow it time.
    group = InitProcessGroupKwargs(timeout=datetime.timedelta(hours=2))
    return Accelerator(
        mixed_precision=cfg.mixed_precision, log_with=trackers, project_dir=cfg.output_dir,
        kwargs_handlers=[ddp, group],
    )


def build_model(cfg) -> MoCoModel:
    model = MoCoModel(MoCoConfig(**cfg.model_kwargs()))
    check_image_size(model, cfg.image_size)
    if cfg.gradient_checkpointing:  # the query encoder only: the keys need no backward
        model.activation_checkpointing_enable()
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def check_image_size(model: MoCoModel, image_size: int) -> None:
    """A backbone built for one input size (a ViT's patch embedding) must be given that size: say so now, not in
    the first forward."""
    patch_embed = getattr(model.get_backbone(), "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    if size is not None and getattr(patch_embed, "strict_img_size", False) and tuple(size) != (image_size,) * 2:
        raise ValueError(f"backbone {model.config.backbone!r} takes {size[0]} x {size[1]} px images but image_size is "
                         f"{image_size}: set image_size {size[0]}, or build it for {image_size} px with "
                         f"--backbone_kwargs '{{img_size: {image_size}}}'")


def data_stats(model: MoCoModel) -> dict:
    """Normalisation and eval crop of the backbone (timm's data config)."""
    import timm.data

    data_config = timm.data.resolve_data_config({}, model=model.get_backbone())
    return {"mean": data_config["mean"], "std": data_config["std"], "crop_pct": data_config.get("crop_pct", 0.875)}


def compiles_on(device: torch.device) -> bool:
    """torch.compile is worth its minutes of compilation on CUDA only; on a CPU the encoders run eagerly."""
    return device.type == "cuda"


def use_gpu_augment(cfg, device: torch.device) -> bool:
    """Decode and augment whole batches on the device (`gpu_augment`: on, off, or auto = when training on CUDA)."""
    return cfg.gpu_augment == "on" or (cfg.gpu_augment == "auto" and device.type == "cuda")


def chunk_size(batch: int, largest: int = 32) -> int:
    """The largest divisor of `batch` that is at most `largest`."""
    return max(d for d in range(1, min(batch, largest) + 1) if batch % d == 0)


def build_train_loader(cfg, accelerator, stats: dict, gpu: bool = False):
    """(dataset, loader, images per epoch over all processes) of this process's part of the training stream.

    Each process reads its own shards (`ProcessShards`): a local folder is cut into a multiple of processes x
    workers shards, so every process and worker gets the same share; the loader is not passed through
    accelerator.prepare, which would split the stream a second time.
    CPU path: workers decode and augment (PIL), chunks are (view_q, view_k, skipped names).
    GPU path: workers read encoded bytes only, chunks are (flat bytes, lengths, skipped names, names).
    """
    parts = accelerator.num_processes * max(1, cfg.num_workers)
    source = load_source(
        cfg.train_split, cfg.dataset_name, cfg.dataset_config, cfg.train_dir, cfg.image_column, cfg.label_column,
        num_shards=-(-cfg.num_shards // parts) * parts, demo_image_size=cfg.image_size,
    )
    stream = ProcessShards(source.dataset, accelerator.num_processes, accelerator.process_index, cfg.seed,
                           cfg.shuffle_buffer, cfg.num_workers)
    accelerator.print(f"data: {stream.describe(source.num_examples)}")
    if stream.reads_everything:
        logger.warning("data: %s", stream.describe(source.num_examples))
    if gpu:
        dataset = EncodedStream(stream, source.image_column, decode=cfg.device_decode == "workers",
                                unshuffled=source.dataset)
        collate = collate_encoded
    else:
        transform = TwoViewTransform(cfg.augmentation, cfg.image_size, stats["mean"], stats["std"], cfg.crop_min_scale)
        dataset = TwoViewStream(stream, source.image_column, transform, seed=cfg.seed, rank=accelerator.process_index)
        collate = collate_two_views
    loader = chunk_loader(cfg, dataset, collate, chunk_size(cfg.batch_size // accelerator.num_processes),
                          pin_memory=accelerator.device.type == "cuda" and not (gpu and cfg.device_decode == "threads"))
    total = source.num_examples or cfg.num_train_examples  # webdataset shards do not say: num_train_examples
    return dataset, loader, int(total * stream.epoch_fraction()) if total else None


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave the scheduler's stop signals to the training process (`StopSignals`), which saves and
    stops after the current step: killed by them, a worker would end the run before the save."""
    import signal

    for sig in StopSignals.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def chunk_loader(cfg, dataset, collate, chunk: int, pin_memory: bool):
    """Workers deliver chunks (a divisor of the per-process batch) that the views join into batches, carrying the
    images beyond a batch into the next one: a worker's last, partial chunk of an epoch is used too."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=chunk,
        num_workers=cfg.num_workers,
        collate_fn=collate,
        drop_last=False,
        prefetch_factor=4 if cfg.num_workers > 0 else None,
        pin_memory=pin_memory,
        generator=torch.Generator(),  # keeps loader seeding off the global RNG (exact resume)
        persistent_workers=False,
        worker_init_fn=ignore_stop_signals,
    )


class KnnData(NamedTuple):
    bank: torch.utils.data.DataLoader  # the training split (capped at knn_max_train_samples), in a fixed order
    test: torch.utils.data.DataLoader  # the held-out split (capped at knn_max_eval_samples)
    class_names: list[str] | None


def build_knn_loaders(cfg, stats: dict) -> KnnData | None:
    """The kNN monitor's loaders (eval transform: resize and center crop to image_size), or None when there is no
    labelled eval split."""
    if not cfg.eval_split:
        return None
    transform = EvalTransform(cfg.image_size, stats["mean"], stats["std"], crop_pct=1.0)
    loaders, label_map, names = [], None, None
    for split, limit in ((cfg.train_split, cfg.knn_max_train_samples), (cfg.eval_split, cfg.knn_max_eval_samples)):
        try:
            source = load_source(split, cfg.dataset_name, cfg.dataset_config, cfg.train_dir, cfg.image_column,
                                 cfg.label_column, num_shards=1, demo_image_size=cfg.image_size)
        except ValueError as err:
            logger.warning("no kNN monitor: %s (set eval_split to a labelled held-out split, or none)", err)
            return None
        if source.label_column is None:
            logger.warning("no kNN monitor: split %r has no label column", split)
            return None
        # A fixed shuffle before the cap, so a capped bank is not just the first classes of a sorted folder.
        subset = source.dataset.shuffle(seed=0, buffer_size=cfg.shuffle_buffer).take(limit)
        if not loaders:
            if not integer_labels(source.dataset, source.label_column):
                label_map = label_index(subset, source.label_column)  # class names: the bank's, for both splits
                names = list(label_map)
            else:
                names = getattr((source.dataset.features or {}).get(source.label_column), "names", None)
        stream = LabeledStream(subset, source.image_column, source.label_column, transform, label_map=label_map)
        loaders.append(torch.utils.data.DataLoader(stream, batch_size=256, num_workers=min(cfg.num_workers, 1),
                                                   generator=torch.Generator(), worker_init_fn=ignore_stop_signals))
    return KnnData(*loaders, names)


class KnnMonitor:
    """The kNN monitor on the held-out split (`run_knn`), and at the end the comparison of the learned backbone
    with its two baselines, the same backbone at its random initialisation and the raw pixels, by kNN and linear
    probe at 1 %, 10 % and 100 % of the labels (`representation.compare`). k: `knn_k`, or by default
    `representation.auto_knn_k` of the bank."""

    PIXEL_BUDGET = 2 * 2**30  # bytes of flattened bank images kept for the raw-pixel baseline

    def __init__(self, cfg, data: KnnData, device: torch.device):
        self.cfg, self.data, self.device = cfg, data, device
        self.k = cfg.knn_k
        self.baselines: dict[str, FeatureSet] = {}

    def features(self, backbone, pixels: bool = False):
        """FeatureSet of `backbone` (and of the raw pixels with `pixels`)."""
        bank = extract_features(backbone, self.data.bank, self.device, self.cfg.channels_last, pixels=pixels)
        test = extract_features(backbone, self.data.test, self.device, self.cfg.channels_last, pixels=pixels)
        learned = FeatureSet(bank[0], bank[1], test[0], test[1])
        if self.k is None:
            self.k = auto_knn_k(learned.train_labels)
        return (learned, FeatureSet(bank[2], bank[1], test[2], test[1])) if pixels else learned

    def start(self) -> float:
        """Features of the random-init backbone (same seed as the run) and of the pixels; the former's kNN."""
        cfg, device = self.cfg, self.device
        cuda_devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_devices):  # manual_seed also seeds CUDA: keep its state too
            torch.manual_seed(cfg.seed)
            fresh = build_model(cfg).to(device)
        pixel_bytes = 4 * 3 * cfg.image_size**2 * cfg.knn_max_train_samples
        pixels = pixel_bytes <= self.PIXEL_BUDGET
        sets = self.features(fresh.get_backbone(), pixels=pixels)
        self.baselines["random_init"] = sets[0] if pixels else sets
        if pixels:
            self.baselines["pixels"] = sets[1]
        else:
            logger.warning("no raw-pixel baseline: the bank's images would take %.1f GiB", pixel_bytes / 2**30)
        return self.accuracy_of(self.baselines["random_init"])

    def accuracy_of(self, features: FeatureSet) -> float:
        return knn_accuracy(features.train, features.train_labels, features.test, features.test_labels,
                            k=self.k, t=self.cfg.knn_t)

    def accuracy(self, backbone) -> float:
        return self.accuracy_of(self.features(backbone))

    def compare(self, backbone) -> tuple[dict, FeatureSet]:
        learned = self.features(backbone)
        return compare({"learned": learned, **self.baselines}, k=self.k, t=self.cfg.knn_t, seed=self.cfg.seed), learned


def decode_threads(cfg) -> int:
    """`decode_threads`, or by default the CPU cores this process can use less the DataLoader workers (at least 2)."""
    if cfg.decode_threads > 0:
        return cfg.decode_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(2, cores - cfg.num_workers - 1)


def make_gpu_augment(cfg, stats: dict, compile: bool | None = None) -> MoCoGPUAugment:
    crop_scale = (cfg.crop_min_scale, 1.0) if cfg.crop_min_scale is not None else None
    return MoCoGPUAugment(cfg.augmentation, cfg.image_size, stats["mean"], stats["std"],
                          channels_last=cfg.channels_last, crop_scale=crop_scale,
                          compile=cfg.compile if compile is None else compile)


def build_device_cache(cfg, dataset, loader, device: torch.device, expected_images: int | None,
                       decoder: ThreadDecoder | None = None) -> DeviceImageCache | None:
    """This process's part of the training split decoded into device memory, or None when `device_cache` is off or
    the part does not fit in `device_cache_gb` (`settle_device_cache` then decides for all processes).

    `auto` gives up early on splits that are clearly too large: from one image of the unshuffled split (before any
    DataLoader worker fills its shuffle buffer), then from the mean size of the first images. `on` only stops
    when the images read exceed the budget."""
    if cfg.device_cache == "off":
        return None
    max_bytes = int(cfg.device_cache_gb * 2**30)
    if cfg.device_cache == "on":
        expected_images = None
    elif expected_images:
        sample = dataset.first_image_nbytes()
        if sample is not None and sample * expected_images > 2 * max_bytes:
            return None
    dataset.set_epoch(0)
    return DeviceImageCache.build((ImageChunk.from_chunk(chunk, device, decoder) for chunk in loader),  # every image
                                  max_bytes, expected_images)


def settle_device_cache(cfg, cache: DeviceImageCache | None, accelerator) -> DeviceImageCache | None:
    """Every process trains from its cache, or none does (ranks whose part did not fit stream, so all do)."""
    if cfg.device_cache == "off":
        return None
    fits = accelerator.gather(torch.tensor([cache is not None], device=accelerator.device))
    if bool(fits.all()):
        return cache
    if cfg.device_cache == "on":
        raise ValueError(f"device_cache=on, but the training split of {int((~fits).sum())} of "
                         f"{fits.numel()} processes does not fit in device_cache_gb={cfg.device_cache_gb:g}; raise "
                         "device_cache_gb or set device_cache auto/off")
    return None


def checked_output_dir(cfg, accelerator) -> str | None:
    """`run_folder.check_output_dir` on the main process, its verdict shared with every process (so that one
    process's first writes cannot make another refuse the folder). Returns the checkpoint to resume from."""
    verdict = [None, None]
    if accelerator.is_main_process:
        try:
            verdict[1] = check_output_dir(cfg.output_dir, cfg.resume_from_checkpoint, cfg.overwrite_output_dir,
                                          dataclasses.asdict(cfg), cfg.resumable_keys)
        except (ValueError, FileNotFoundError) as err:
            verdict[0] = f"{type(err).__name__}: {err}"
    if accelerator.num_processes > 1:
        broadcast_object_list(verdict)
    if verdict[0] is not None:
        kind, message = verdict[0].split(": ", 1)
        raise (FileNotFoundError if kind == "FileNotFoundError" else ValueError)(message)
    return verdict[1]


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainResult:
    metrics: dict
    model: MoCoModel  # unwrapped, on this process's device
    state: TrainState
    preempted: bool = False  # stopped by a scheduler's signal, its state saved: resume with `auto`


@dataclasses.dataclass
class Run:
    """Everything `start` builds, which the loop and its hooks use."""

    cfg: object
    accelerator: Accelerator
    model: torch.nn.Module  # prepared (DDP across processes)
    unwrapped: MoCoModel
    optimizer: torch.optim.Optimizer
    scheduler: object
    state: TrainState
    views: object  # CPUViews, GPUViews or CachedViews
    stats: dict
    steps_per_epoch: int
    total_steps: int
    knn: KnnMonitor | None
    decoder: ThreadDecoder | None
    cuda_graphs: bool
    skipped: list = dataclasses.field(default_factory=list)  # corrupt images met before the loop (device cache)
    saved_step: int = -1  # the step of the last checkpoint this run saved
    metrics: dict = dataclasses.field(default_factory=dict)
    history: dict = dataclasses.field(default_factory=lambda: {"step": [], "loss": [], "knn_step": [], "knn": []})


def start(cfg) -> Run:
    """Build the run. Everything is checked (the output folder, the backbone and image size, the data source)
    before the first file is written into output_dir; an old run is deleted only with overwrite_output_dir."""
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("mixed_precision fp16 needs a CUDA GPU (fp16 autocast with a loss scaler); on this machine "
                         "use bf16 or no")
    accelerator = make_accelerator(cfg)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("accelerate", "matplotlib", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if cfg.batch_size % accelerator.num_processes:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {accelerator.num_processes} processes")
    resume = checked_output_dir(cfg, accelerator)
    set_seed(cfg.seed)
    # Every step has the same input shapes, so cuDNN may time its convolution algorithms once and keep the fastest,
    # as the official MoCo code does (at the price of bit-reproducibility on the GPU; CPU runs are unaffected).
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark

    model = build_model(cfg)
    stats = data_stats(model)
    gpu_views = use_gpu_augment(cfg, accelerator.device)
    dataset, loader, num_examples = build_train_loader(cfg, accelerator, stats, gpu=gpu_views)
    if num_examples is None:
        raise ValueError("the dataset does not say how many images it has (e.g. webdataset shards); set "
                         "num_train_examples, which defines epochs for the schedule, kNN monitor and logs")
    if num_examples < cfg.batch_size:
        raise ValueError(f"the training split has {num_examples} images, fewer than batch_size={cfg.batch_size}")
    steps_per_epoch = max(1, num_examples // cfg.batch_size)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.num_epochs * steps_per_epoch

    if accelerator.is_main_process:  # all checked: the first writes into output_dir
        if cfg.overwrite_output_dir:
            removed = clear_run(cfg.output_dir)
            if removed:
                accelerator.print(f"overwrite_output_dir: deleted {', '.join(removed)} from {cfg.output_dir}")
        write_run_config(cfg.output_dir, dataclasses.asdict(cfg))
    accelerator.wait_for_everyone()

    if accelerator.num_processes > 1 and cfg.queue_size == 0:
        # MoCo v3 normalises over the global batch: BatchNorm synchronised across processes (heads, ResNet backbones)
        model = convert_sync_batchnorm(model, accelerator.device)
    compile = cfg.compile and compiles_on(accelerator.device)
    if cfg.compile and not compile:
        accelerator.print(f"compile: true is for GPUs; on {accelerator.device.type} the encoders run eagerly "
                          "(compiling would take minutes there for little gain)")
    if compile:
        model.query_encoder.compile(mode=cfg.compile_mode)
        model.key_encoder.compile(mode=cfg.compile_mode)
    lr = cfg.base_lr * cfg.batch_size / 256
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    optimizer = create_optimizer(model, cfg.optimizer, lr, cfg.weight_decay, cfg.sgd_momentum)
    schedule = lambda step: lr_at(step, total_steps, steps_per_epoch, lr, cfg.lr_schedule, warmup,  # noqa: E731
                                  cfg.lr_steps) / lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state)

    negatives = f"K={cfg.queue_size}" if cfg.queue_size else "no queue (MoCo v3: negatives from the batch)"
    momentum = f"m={cfg.momentum}" + (" rising to 1 (cosine)" if cfg.momentum_schedule == "cosine" else "")
    accelerator.print(
        f"global batch {cfg.batch_size} = {accelerator.num_processes} x {cfg.batch_size // accelerator.num_processes}; "
        f"{cfg.optimizer} lr {lr:g} ({cfg.base_lr:g} x {cfg.batch_size}/256, {cfg.lr_schedule}); {num_examples} "
        f"images, {steps_per_epoch} steps/epoch, {total_steps} steps; {negatives} {momentum} tau={cfg.tau}; "
        f"device {accelerator.device}, mixed precision {cfg.mixed_precision}, "
        f"augmentation {cfg.augmentation} on {'the device, batched' if gpu_views else 'CPU workers'}"
    )
    if accelerator.num_processes == 1 and cfg.shuffle_bn and cfg.bn_splits == 1:
        accelerator.print("shuffle BN: one process and bn_splits 1 leave nothing to shuffle across, so the keys are "
                          "normalised with their own batch's statistics (the leak shuffle BN prevents); bn_splits 8 "
                          "normalises 8 chunks of the batch as 8 GPUs would")

    saved_unit, saved_carry = None, (0, 0, 0)
    if resume:
        accelerator.load_state(resume)
        if state.positions:  # custom state is written by the main process: every rank's position is in it
            position = state.positions[accelerator.process_index]
            state.data_epoch, state.batches_in_epoch = position[:2]
            saved_unit = position[2] if len(position) > 2 else None
            saved_carry = tuple(position[3:6]) if len(position) > 5 else (0, 0, 0)
        accelerator.print(f"resumed from {resume} at step {state.step}")
    elif cfg.resume_from_checkpoint == "auto":
        accelerator.print(f"resume_from_checkpoint auto: no checkpoint in {cfg.output_dir} yet, starting at step 0")

    if accelerator.log_with:  # `report_to` (empty when it is none, or tensorboard is not installed)
        accelerator.init_trackers("moco", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                  for k, v in dataclasses.asdict(cfg).items()})
    knn_data = build_knn_loaders(cfg, stats) if accelerator.is_main_process else None
    knn = KnnMonitor(cfg, knn_data, accelerator.device) if knn_data else None

    per_process = cfg.batch_size // accelerator.num_processes
    rank, device = accelerator.process_index, accelerator.device
    decoder = ThreadDecoder(decode_threads(cfg)) if gpu_views and cfg.device_decode == "threads" else None
    batches = BatchStream(dataset, loader, state)
    cache = (build_device_cache(cfg, dataset, loader, device, num_examples // accelerator.num_processes, decoder)
             if gpu_views else None)
    cache = settle_device_cache(cfg, cache, accelerator) if gpu_views else None
    if cache is not None:
        views = CachedViews(cache, state, make_gpu_augment(cfg, stats, compile), cfg.seed, rank, per_process)
        accelerator.print(f"device cache: {len(cache)} decoded images ({cache.nbytes / 2**20:.0f} MiB) on {device}, "
                          f"{views.batches_per_epoch} batches per epoch")
    elif gpu_views:
        views = GPUViews(batches, device, make_gpu_augment(cfg, stats, compile), cfg.seed, rank, per_process, decoder)
    else:
        views = CPUViews(batches, device, cfg.channels_last, per_process)
    if saved_unit and saved_unit != views.position_unit:  # saved while streaming, resumed from the cache, or back
        state.batches_in_epoch = state.batches_in_epoch * saved_unit // views.position_unit
        accelerator.print(f"data position converted from units of {saved_unit} to {views.position_unit} images")
    else:
        views.restore_carry(*saved_carry)
    run = Run(cfg, accelerator, prepared, accelerator.unwrap_model(prepared), optimizer, scheduler, state, views,
              stats, steps_per_epoch, total_steps, knn, decoder,
              cuda_graphs=compile and uses_cuda_graphs(cfg.compile_mode, device))
    if cache is not None and state.step == 0:
        run.skipped = list(cache.skipped)
    if knn:
        run.metrics["knn_random_init"] = knn.start()
        accelerator.print(f"kNN accuracy (k={knn.k}) at random init: {run.metrics['knn_random_init']:.2f}%")
    return run


def train(cfg) -> TrainResult:
    """Pretrain MoCo as `cfg` (a `pretrain.PretrainConfig`) says; see the module docstring."""
    run = start(cfg)
    state, accelerator = run.state, run.accelerator
    stop_at = run.total_steps if cfg.stop_after_steps <= 0 else min(run.total_steps, state.step + cfg.stop_after_steps)
    window = LogWindow(run, stop_at)
    profiler = StepProfiler(cfg, state.step, accelerator) if cfg.profile_steps > 0 else None
    run.model.train()
    preempted = None
    with StopSignals() as signals:
        while state.step < stop_at:
            if profiler is not None:
                profiler.before_step(state.step)
            out = train_step(run, window)
            if profiler is not None:
                profiler.after_step(state.step)
            window.after_step(out)
            knn_hook(run)
            checkpoint_hook(run, window, stop_at)
            if signals.requested(accelerator.device):
                preempted = signals.received
                if run.saved_step != state.step:
                    save(run, window)
                break
    window.close()
    if profiler is not None:
        profiler.close(state.step)
    if run.decoder is not None:
        run.decoder.close()
    if preempted:
        accelerator.print(f"stopped at step {state.step} of {run.total_steps} on {preempted}, its state saved; "
                          f"resume with --resume_from_checkpoint auto")
    elif state.step < run.total_steps:
        accelerator.print(f"stopped at step {state.step} of {run.total_steps} (stop_after_steps); resume with "
                          f"--resume_from_checkpoint auto")
    else:
        run.metrics = finish(run)
    accelerator.end_training()
    return TrainResult(run.metrics, run.unwrapped, state, preempted=preempted is not None)


def train_step(run: Run, window: LogWindow):
    """One step of Algorithm 1 (the model's train-mode forward) and the optimizer step."""
    if run.cuda_graphs:
        # CUDA graphs (compile_mode reduce-overhead / max-autotune) reuse their output memory from one step to the
        # next: say where a step begins, so that the symmetric loss's second call of an encoder is not taken for a
        # new step.
        torch.compiler.cudagraph_mark_step_begin()
    fetch_start = time.perf_counter()
    view_q, view_k, skipped = run.views.next(run.state.step)
    window.data_time += time.perf_counter() - fetch_start
    window.skipped += skipped
    momentum = momentum_at(run.state.step, run.total_steps, run.cfg.momentum, run.cfg.momentum_schedule)
    out = run.model(pixel_values=view_q, key_pixel_values=view_k, momentum=momentum)
    run.accelerator.backward(out.loss)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.state.step += 1
    return out


class LogWindow:
    """Loss, contrastive accuracy, speed and corrupt images over the steps since the last log line: one host
    synchronisation per window, not per step. Logs to the progress bar, the trackers and the history."""

    def __init__(self, run: Run, stop_at: int):
        self.run, self.stop_at = run, stop_at
        self.sums = torch.zeros(2, device=run.accelerator.device)  # loss, contrastive accuracy
        self.steps, self.start, self.data_time = 0, time.perf_counter(), 0.0
        self.skipped: list[str] = list(run.skipped)  # corrupt images since the last count
        self.timed_from = None  # (step, time) after the first window: throughput without start-up costs
        self.progress = None
        if run.accelerator.is_main_process:
            from tqdm.auto import tqdm

            self.progress = tqdm(total=run.total_steps, initial=run.state.step, desc="pretrain", dynamic_ncols=True)

    def after_step(self, out) -> None:
        self.steps += 1
        with torch.no_grad():
            positives = out.labels if out.labels is not None else 0  # MoCo v3: the diagonal; else column 0
            self.sums += torch.stack([out.loss.detach().float(),
                                      (out.logits.argmax(dim=1) == positives).float().mean()])
        step = self.run.state.step
        if step % self.run.cfg.log_steps == 0 or step == self.stop_at:
            self.flush()
        if self.progress is not None:
            self.progress.update(1)

    def flush(self) -> None:
        run, cfg, step = self.run, self.run.cfg, self.run.state.step
        reduced = run.accelerator.reduce(self.sums / self.steps, reduction="mean").tolist()
        new = self.count_skipped()
        elapsed = time.perf_counter() - self.start
        log = {"loss": reduced[0], "contrastive_acc": 100 * reduced[1], "lr": run.scheduler.get_last_lr()[0],
               "momentum": momentum_at(step - 1, run.total_steps, cfg.momentum, cfg.momentum_schedule),
               "images_per_s": self.steps * cfg.batch_size / elapsed, "epoch": step / run.steps_per_epoch,
               "skipped_images": run.state.skipped_images, "data_time_fraction": self.data_time / elapsed}
        run.accelerator.log(log, step=step)
        run.history["step"].append(step)
        run.history["loss"].append(log["loss"])
        if self.progress is not None:
            self.progress.set_postfix(loss=f"{log['loss']:.3f}", acc=f"{log['contrastive_acc']:.1f}",
                                      lr=f"{log['lr']:.3g}", img_s=f"{log['images_per_s']:.0f}",
                                      data=f"{100 * log['data_time_fraction']:.0f}%")
        if new:
            shown = ", ".join(new[:SHOWN_NAMES]) + (f" and {len(new) - SHOWN_NAMES} more" if len(new) > SHOWN_NAMES
                                                    else "")
            logger.warning("skipped %d corrupt image(s): %s (%d in total)", len(new), shown,
                           run.state.skipped_images)
        self.sums.zero_()
        self.steps, self.start = 0, time.perf_counter()
        if self.timed_from is None:
            self.timed_from, self.timed_data_time = (step, self.start), 0.0
        elif step > self.timed_from[0]:
            self.timed_data_time += self.data_time
            span = self.start - self.timed_from[1]
            run.metrics["images_per_s"] = (step - self.timed_from[0]) * cfg.batch_size / span
            # Where the time went: host time in `views.next` (waiting for the DataLoader, or launching the device
            # augmentation) as a fraction of the wall clock. Near 0: the step is the limit; near 1: the data.
            run.metrics["data_time_fraction"] = self.timed_data_time / span
        self.data_time = 0.0

    def count_skipped(self) -> list[str]:
        """Add the corrupt images every process met since the last count to the state, each image once (by name,
        so the same image read again in a later epoch is not counted again); returns the new ones."""
        state = self.run.state
        names = gather_object(self.skipped) if self.run.accelerator.num_processes > 1 else self.skipped
        self.skipped = []
        known = set(state.skipped_names)
        new = sorted({name for name in names if name not in known})
        if new:
            state.skipped_names = sorted(known | set(new))
            state.skipped_images += len(new)
        return new

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()


def knn_hook(run: Run) -> None:
    """kNN accuracy every `knn_every_epochs` epochs (the last one is measured by `finish`)."""
    cfg, step = run.cfg, run.state.step
    epoch = step // run.steps_per_epoch
    if not run.knn or step % run.steps_per_epoch or cfg.knn_every_epochs <= 0 \
            or epoch % cfg.knn_every_epochs or step >= run.total_steps:
        return
    acc = run.knn.accuracy(run.unwrapped.get_backbone())
    run.history["knn_step"].append(step)
    run.history["knn"].append(acc)
    run.accelerator.log({"knn_acc": acc}, step=step)
    run.accelerator.print(f"\nepoch {epoch}: kNN accuracy {acc:.2f}%")


def checkpoint_hook(run: Run, window: LogWindow, stop_at: int) -> None:
    """A checkpoint every `save_steps` and when the run stops early."""
    cfg, state = run.cfg, run.state
    if (cfg.save_steps > 0 and state.step % cfg.save_steps == 0) or (state.step == stop_at < run.total_steps):
        save(run, window)


def save(run: Run, window: LogWindow) -> None:
    """A checkpoint of every process's state, with every process's data position."""
    cfg, state, accelerator = run.cfg, run.state, run.accelerator
    position = torch.tensor([[state.data_epoch, state.batches_in_epoch, run.views.position_unit,
                              *run.views.carry_position()]], device=accelerator.device)
    state.positions = accelerator.gather(position).tolist()
    window.count_skipped()  # corrupt images since the last log go into the checkpoint too
    path = save_checkpoint(accelerator, cfg.output_dir, state.step, cfg.save_total_limit, dataclasses.asdict(cfg))
    run.saved_step = state.step
    accelerator.print(f"\nsaved {path}")


def finish(run: Run) -> dict:
    """The final evaluation against the baselines, save_pretrained to output_dir/final with the run's metrics, the
    curves and the pictures."""
    cfg, accelerator, unwrapped, state = run.cfg, run.accelerator, run.unwrapped, run.state
    metrics = {**run.metrics, "steps": state.step, "skipped_images": state.skipped_images,
               "skipped_image_names": state.skipped_names[:RECORDED_NAMES]}
    results, learned = run.knn.compare(unwrapped.get_backbone()) if run.knn else (None, None)
    if results:
        metrics.update(evaluation_metrics(cfg, results, learned))
        run.history["knn_step"].append(state.step)
        run.history["knn"].append(metrics["knn_acc"])
        accelerator.log({"knn_acc": metrics["knn_acc"],
                         **{f"final/knn_{kind}": value for kind, value in results["knn"].items()},
                         **{f"final/probe_{kind}": value for kind, value in results["probe"].items()}},
                        step=state.step)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = os.path.join(cfg.output_dir, "final")
        unwrapped.save_pretrained(final)
        with open(os.path.join(final, "training_config.json"), "w") as f:
            # The eval transform of the kNN monitor travels with the weights (image processor, model card).
            json.dump({**dataclasses.asdict(cfg), "mean": list(run.stats["mean"]), "std": list(run.stats["std"]),
                       "eval_crop_pct": 1.0, "interpolation": "bilinear"}, f, indent=2)
        save_image_processor(unwrapped, final, default_data_config(final))  # AutoImageProcessor reads the folder
        plot_history(run.history, os.path.join(cfg.output_dir, "training_curves.png"),
                     metrics.get("knn_random_init"), cfg.eval_split)
        if results:
            pictures = draw_pictures(run, learned, final)
            metrics["pictures"] = sorted(pictures)
            accelerator.print(format_results(results, metrics["evaluation"]["dataset"],
                                             metrics["evaluation"]["bank"], metrics["evaluation"]["split"]))
        record_metrics(final, metrics)
        share_files(final)
        if state.skipped_images:
            accelerator.print(f"skipped {state.skipped_images} corrupt image(s), named in final/metrics.json "
                              f"(skipped_image_names)")
        accelerator.print(f"saved the final model to {final}")
    return metrics


def dataset_description(cfg) -> str:
    if cfg.dataset_name:
        return f"{cfg.dataset_name}{f' ({cfg.dataset_config})' if cfg.dataset_config else ''}"
    if cfg.train_dir:
        return f"the local dataset {cfg.train_dir}"
    return "scikit-learn's handwritten digits (embedded; 8 x 8 px upscaled)"


def evaluation_metrics(cfg, results: dict, learned: FeatureSet) -> dict:
    """The final comparison as metrics.json keys: each number with its protocol, split and unit
    (`evaluation`), and flat keys for the log, the trackers and older readers (`knn_acc`, ...)."""
    kinds = results["knn"].keys()
    out = {"knn_acc": results["knn"]["learned"], "knn_k": results["k"],
           **{f"knn_{kind}": results["knn"][kind] for kind in kinds if kind != "learned"},
           "probe_acc": results["probe"]["learned"],
           **{f"probe_{kind}": results["probe"][kind] for kind in kinds if kind != "learned"},
           "label_efficiency": results["label_efficiency"]}
    out["evaluation"] = {
        "dataset": dataset_description(cfg),
        "bank": f"'{cfg.train_split}' ({len(learned.train_labels)} images)",
        "split": f"'{cfg.eval_split}' ({len(learned.test_labels)} images)",
        "classes": learned.num_classes,
        "unit": "% top-1",
        "baselines": "random_init: the same backbone at its random initialisation (same seed); pixels: the "
                     f"{cfg.image_size} x {cfg.image_size} px eval images, flattened",
        "knn": f"weighted kNN on L2-normalised features, k={results['k']}"
               f"{' (a fifth of the smallest class, at most 200)' if cfg.knn_k is None else ''}, t={results['t']}",
        "probe": "logistic regression on frozen eval-transform features (no augmentation), L-BFGS, L2 penalty chosen "
                 "on a held-out fifth of the bank",
    }
    return out


def draw_pictures(run: Run, learned: FeatureSet, final: str) -> dict[str, str]:
    """The nearest-neighbour grid and the feature map into output_dir (and final/, for the model card); logged to
    TensorBoard."""
    from .visualize import draw

    cfg = run.cfg
    paths = draw(learned.train, learned.train_labels, learned.test, learned.test_labels, run.knn.data.bank,
                 run.knn.data.test, cfg.output_dir, run.stats["mean"], run.stats["std"], run.knn.data.class_names,
                 seed=cfg.seed)
    for path in paths.values():
        shutil.copy(path, final)
    if "tensorboard" in [getattr(t, "name", None) for t in run.accelerator.trackers]:
        import numpy as np
        from PIL import Image

        tracker = run.accelerator.get_tracker("tensorboard")
        for name, path in paths.items():
            image = np.asarray(Image.open(path).convert("RGB"))
            tracker.log_images({f"final/{name}": image[None]}, step=run.state.step, dataformats="NHWC")
    return {name: os.path.join(final, os.path.basename(path)) for name, path in paths.items()}


def plot_history(history: dict, path: str, random_init: float | None = None, eval_split: str | None = None):
    """training_curves.png: the InfoNCE loss per log window, and the kNN accuracy with the random-init backbone's
    as a reference line. Single points are drawn as markers. Returns the (closed) matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].plot(history["step"], history["loss"], marker="o" if len(history["step"]) < 2 else None)
    axes[0].set(xlabel="optimizer step", ylabel="InfoNCE loss (nats)",
                title="training loss, mean per log window")
    axes[1].plot(history["knn_step"], history["knn"], marker="o", label="learned backbone")
    if random_init is not None:
        axes[1].axhline(random_init, color="grey", linestyle="--", label=f"random init ({random_init:.1f} %)")
    axes[1].set(xlabel="optimizer step", ylabel="kNN top-1 (%)",
                title=f"kNN accuracy on the held-out split{f' ({eval_split!r})' if eval_split else ''}")
    if history["knn"] or random_init is not None:
        axes[1].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return fig


__all__ = ["TrainResult", "build_model", "data_stats", "start", "train"]

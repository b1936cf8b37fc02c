"""MoCo pretraining with Accelerate on images streamed with HF Datasets.

Run it:
    python pretrain.py                                              # embedded demo: sklearn digits, 2 CPU cores
    accelerate launch pretrain.py --config configs/moco_v2_resnet50_imagenet.yaml \
        --bn_splits 8                                               # one GPU (split BN: 8 chunks of 32)
    accelerate launch --num_processes 8 pretrain.py --config configs/moco_v2_resnet50_imagenet.yaml \
        --dataset_name none --train_dir /data/imagenet --eval_split validation   # 8 GPUs, local folder
    accelerate launch --num_machines 2 --machine_rank 0 --main_process_ip 10.0.0.1 --num_processes 16 \
        pretrain.py --config configs/moco_v2_resnet50_imagenet.yaml # 2 machines x 8 GPUs (rank 1 on the other)
    python pretrain.py --config configs/x.yaml --resume_from_checkpoint auto     # continue the newest checkpoint

Any config key can be overridden as `--key value`; the resolved config is written to output_dir/config.yaml.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import sys
import time

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, set_seed
from datasets.distributed import split_dataset_by_node

from moco_hf import MoCoConfig, MoCoModel
from moco_hf.data import (
    DeviceImageCache,
    EncodedStream,
    EvalTransform,
    ImageChunk,
    LabeledStream,
    ThreadDecoder,
    TwoViewStream,
    TwoViewTransform,
    collate_encoded,
    collate_two_views,
    integer_labels,
    label_index,
    load_source,
)
from moco_hf.evaluation import extract_features, knn_accuracy, record_metrics
from moco_hf.gpu_augment import MoCoGPUAugment
from moco_hf.hub import default_data_config, save_image_processor
from moco_hf.training import (
    PretrainConfig,
    StepProfiler,
    TrainState,
    load_config,
    lr_at,
    resolve_resume,
    save_checkpoint,
    save_config,
    uses_cuda_graphs,
)
from moco_hf.views import BatchStream, CachedViews, CPUViews, GPUViews

logger = logging.getLogger("pretrain")


# ---------------------------------------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------------------------------------


def make_accelerator(cfg: PretrainConfig) -> Accelerator:
    trackers = {"none": None, "all": "all", "tensorboard": "tensorboard", "wandb": "wandb"}[cfg.report_to]
    if trackers == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
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


def build_model(cfg: PretrainConfig) -> MoCoModel:
    model = MoCoModel(MoCoConfig(**cfg.model_kwargs()))
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def data_stats(model: MoCoModel) -> dict:
    """Normalisation and eval crop of the backbone (timm's data config)."""
    import timm.data

    data_config = timm.data.resolve_data_config({}, model=model.get_backbone())
    return {"mean": data_config["mean"], "std": data_config["std"], "crop_pct": data_config.get("crop_pct", 0.875)}


def use_gpu_augment(cfg: PretrainConfig, device: torch.device) -> bool:
    """Decode and augment whole batches on the device (`gpu_augment`: on, off, or auto = when training on CUDA)."""
    return cfg.gpu_augment == "on" or (cfg.gpu_augment == "auto" and device.type == "cuda")


def chunk_size(batch: int, largest: int = 32) -> int:
    """The largest divisor of `batch` that is at most `largest`."""
    return max(d for d in range(1, min(batch, largest) + 1) if batch % d == 0)


def build_train_loader(cfg: PretrainConfig, accelerator, stats: dict, gpu: bool = False):
    """(dataset, loader, number of examples) of this process's part of the training stream.

    CPU path: workers decode and augment (PIL), chunks are (view_q, view_k, skipped).
    GPU path: workers read encoded bytes only, chunks are (flat bytes, lengths, skipped).
    """
    source = load_source(
        cfg.train_split, cfg.dataset_name, cfg.dataset_config, cfg.train_dir, cfg.image_column, cfg.label_column,
        num_shards=max(cfg.num_shards, accelerator.num_processes * max(1, cfg.num_workers)),
        demo_image_size=cfg.image_size,
    )
    stream = source.dataset.shuffle(seed=cfg.seed, buffer_size=cfg.shuffle_buffer)
    # Split the stream here and never again: the loader below is not passed through accelerator.prepare.
    stream = split_dataset_by_node(stream, rank=accelerator.process_index, world_size=accelerator.num_processes)
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
    return dataset, loader, source.num_examples


def chunk_loader(cfg: PretrainConfig, dataset, collate, chunk: int, pin_memory: bool):
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
    )


def build_knn_loaders(cfg: PretrainConfig, stats: dict):
    """(memory-bank loader, test loader) for the kNN monitor, or None when there is no labelled eval split."""
    if not cfg.eval_split:
        return None
    transform = EvalTransform(cfg.image_size, stats["mean"], stats["std"], crop_pct=1.0)
    loaders, label_map = [], None
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
        if not loaders and not integer_labels(source.dataset, source.label_column):
            label_map = label_index(subset, source.label_column)  # class names: the bank's, for both splits
        stream = LabeledStream(subset, source.image_column, source.label_column, transform, label_map=label_map)
        loaders.append(torch.utils.data.DataLoader(stream, batch_size=256, num_workers=min(cfg.num_workers, 1),
                                                   generator=torch.Generator()))
    return tuple(loaders)


def run_knn(backbone, loaders, cfg: PretrainConfig, device) -> float:
    bank, bank_labels = extract_features(backbone, loaders[0], device, cfg.channels_last)
    test, test_labels = extract_features(backbone, loaders[1], device, cfg.channels_last)
    return knn_accuracy(bank, bank_labels, test, test_labels, k=cfg.knn_k, t=cfg.knn_t)


def random_init_knn(cfg: PretrainConfig, loaders, device) -> float:
    """kNN accuracy of the same backbone at its random initialisation (same seed), leaving the RNG untouched."""
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):  # manual_seed also seeds CUDA: keep its state too
        torch.manual_seed(cfg.seed)
        fresh = build_model(cfg).to(device)
    return run_knn(fresh.get_backbone(), loaders, cfg, device)


def decode_threads(cfg: PretrainConfig) -> int:
    """`decode_threads`, or by default the CPU cores this process can use less the DataLoader workers (at least 2)."""
    if cfg.decode_threads > 0:
        return cfg.decode_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(2, cores - cfg.num_workers - 1)


def make_gpu_augment(cfg: PretrainConfig, stats: dict) -> MoCoGPUAugment:
    crop_scale = (cfg.crop_min_scale, 1.0) if cfg.crop_min_scale is not None else None
    return MoCoGPUAugment(cfg.augmentation, cfg.image_size, stats["mean"], stats["std"],
                          channels_last=cfg.channels_last, crop_scale=crop_scale, compile=cfg.compile)


def build_device_cache(cfg: PretrainConfig, dataset, loader, device: torch.device, expected_images: int | None,
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


def settle_device_cache(cfg: PretrainConfig, cache: DeviceImageCache | None, accelerator) -> DeviceImageCache | None:
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


# ---------------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainResult:
    metrics: dict
    model: MoCoModel  # unwrapped, on this process's device
    state: TrainState


def train(cfg: PretrainConfig) -> TrainResult:
    accelerator = make_accelerator(cfg)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("accelerate", "matplotlib", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if cfg.batch_size % accelerator.num_processes:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {accelerator.num_processes} processes")
    set_seed(cfg.seed)
    # Every step has the same input shapes, so cuDNN may time its convolution algorithms once and keep the fastest,
    # as the official MoCo code does (at the price of bit-reproducibility on the GPU; CPU runs are unaffected).
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    if accelerator.is_main_process:
        os.makedirs(cfg.output_dir, exist_ok=True)
        save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))

    model = build_model(cfg)
    stats = data_stats(model)
    gpu_views = use_gpu_augment(cfg, accelerator.device)
    dataset, loader, num_examples = build_train_loader(cfg, accelerator, stats, gpu=gpu_views)
    num_examples = num_examples or cfg.num_train_examples
    if num_examples is None:
        raise ValueError("the dataset does not say how many images it has (e.g. webdataset shards); set "
                         "num_train_examples, which defines epochs for the schedule, kNN monitor and logs")
    steps_per_epoch = max(1, num_examples // cfg.batch_size)
    if num_examples < cfg.batch_size:
        raise ValueError(f"the training split has {num_examples} images, fewer than batch_size={cfg.batch_size}")

    total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.num_epochs * steps_per_epoch
    lr = cfg.base_lr * cfg.batch_size / 256
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))

    if cfg.compile:
        model.query_encoder.compile(mode=cfg.compile_mode)
        model.key_encoder.compile(mode=cfg.compile_mode)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr,
                                momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay)
    schedule = lambda step: lr_at(step, total_steps, steps_per_epoch, lr, cfg.lr_schedule, warmup,  # noqa: E731
                                  cfg.lr_steps) / lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state)

    accelerator.print(
        f"global batch {cfg.batch_size} = {accelerator.num_processes} x {cfg.batch_size // accelerator.num_processes}; "
        f"lr {lr:g} ({cfg.base_lr:g} x {cfg.batch_size}/256, {cfg.lr_schedule}); {num_examples} images, "
        f"{steps_per_epoch} steps/epoch, {total_steps} steps; K={cfg.queue_size} m={cfg.momentum} tau={cfg.tau}; "
        f"device {accelerator.device}, mixed precision {cfg.mixed_precision}, "
        f"augmentation {cfg.augmentation} on {'the device, batched' if gpu_views else 'CPU workers'}"
    )

    if accelerator.num_processes == 1 and cfg.shuffle_bn and cfg.bn_splits == 1:
        accelerator.print("shuffle BN: one process and bn_splits 1 leave nothing to shuffle across, so the keys are "
                          "normalised with their own batch's statistics (the leak shuffle BN prevents); bn_splits 8 "
                          "normalises 8 chunks of the batch as 8 GPUs would")

    resume = resolve_resume(cfg.resume_from_checkpoint, cfg.output_dir)
    saved_unit = None  # images per counted data item at save time (a loader chunk, or a batch of the cache)
    saved_carry = (0, 0, 0)  # images carried into the next batch at save time, position their chunks began at
    if resume:
        accelerator.load_state(resume)
        if state.positions:  # custom state is written by the main process: every rank's position is in it
            position = state.positions[accelerator.process_index]
            state.data_epoch, state.batches_in_epoch = position[:2]
            saved_unit = position[2] if len(position) > 2 else None
            saved_carry = tuple(position[3:6]) if len(position) > 5 else (0, 0, 0)
        accelerator.print(f"resumed from {resume} at step {state.step}")

    if accelerator.log_with:  # `report_to` (empty when it is none, or tensorboard is not installed)
        accelerator.init_trackers("moco", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                  for k, v in dataclasses.asdict(cfg).items()})
    unwrapped = accelerator.unwrap_model(model)
    knn_loaders = build_knn_loaders(cfg, stats) if accelerator.is_main_process else None
    history = {"step": [], "loss": [], "knn_step": [], "knn": []}
    metrics = {}
    if knn_loaders:
        metrics["knn_random_init"] = random_init_knn(cfg, knn_loaders, accelerator.device)
        accelerator.print(f"kNN accuracy at random init: {metrics['knn_random_init']:.2f}%")

    skipped = 0  # corrupt images since the last log
    batches = BatchStream(dataset, loader, state)
    per_process = cfg.batch_size // accelerator.num_processes
    rank, device = accelerator.process_index, accelerator.device
    decoder = ThreadDecoder(decode_threads(cfg)) if gpu_views and cfg.device_decode == "threads" else None
    cache = (build_device_cache(cfg, dataset, loader, device, num_examples // accelerator.num_processes, decoder)
             if gpu_views else None)
    cache = settle_device_cache(cfg, cache, accelerator) if gpu_views else None
    if cache is not None:
        views = CachedViews(cache, state, make_gpu_augment(cfg, stats), cfg.seed, rank, per_process)
        if state.step == 0:
            skipped += cache.num_skipped
        accelerator.print(f"device cache: {len(cache)} decoded images ({cache.nbytes / 2**20:.0f} MiB) on {device}, "
                          f"{views.batches_per_epoch} batches per epoch")
    elif gpu_views:
        views = GPUViews(batches, device, make_gpu_augment(cfg, stats), cfg.seed, rank, per_process, decoder)
    else:
        views = CPUViews(batches, device, cfg.channels_last, per_process)
    if saved_unit and saved_unit != views.position_unit:  # saved while streaming, resumed from the cache, or back
        state.batches_in_epoch = state.batches_in_epoch * saved_unit // views.position_unit
        accelerator.print(f"data position converted from units of {saved_unit} to {views.position_unit} images")
    else:
        views.restore_carry(*saved_carry)
    progress = None
    if accelerator.is_main_process:
        from tqdm.auto import tqdm

        progress = tqdm(total=total_steps, initial=state.step, desc="pretrain", dynamic_ncols=True)
    sums = torch.zeros(2, device=accelerator.device)  # loss, contrastive accuracy since the last log
    window_steps, window_start = 0, time.perf_counter()
    timed_from = None  # (step, time) after the first log window: throughput without start-up costs
    stop_at = total_steps if cfg.stop_after_steps <= 0 else min(total_steps, state.step + cfg.stop_after_steps)
    model.train()
    data_time = 0.0  # host time waiting for (and launching) the views, since the last log
    profiler = StepProfiler(cfg, state.step, accelerator) if cfg.profile_steps > 0 else None
    # CUDA graphs (compile_mode reduce-overhead / max-autotune) reuse their output memory from one step to the next:
    # say where a step begins, so that the symmetric loss's second call of an encoder is not taken for a new step.
    cuda_graphs = cfg.compile and uses_cuda_graphs(cfg.compile_mode, accelerator.device)
    while state.step < stop_at:
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        if profiler is not None:
            profiler.before_step(state.step)
        fetch_start = time.perf_counter()
        view_q, view_k, n_skipped = views.next(state.step)
        data_time += time.perf_counter() - fetch_start
        skipped += n_skipped
        out = model(pixel_values=view_q, key_pixel_values=view_k)
        accelerator.backward(out.loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        if profiler is not None:
            profiler.after_step(state.step)
        window_steps += 1
        with torch.no_grad():
            sums += torch.stack([out.loss.detach().float(), (out.logits.argmax(dim=1) == 0).float().mean()])

        if state.step % cfg.log_steps == 0 or state.step == stop_at:
            # One host sync per log window, not per step.
            reduced = accelerator.reduce(sums / window_steps, reduction="mean").tolist()
            skipped_all, skipped = count_skipped(accelerator, state, skipped), 0
            elapsed = time.perf_counter() - window_start
            log = {"loss": reduced[0], "contrastive_acc": 100 * reduced[1],
                   "lr": scheduler.get_last_lr()[0], "images_per_s": window_steps * cfg.batch_size / elapsed,
                   "epoch": state.step / steps_per_epoch, "skipped_images": state.skipped_images,
                   "data_time_fraction": data_time / elapsed}
            accelerator.log(log, step=state.step)
            history["step"].append(state.step)
            history["loss"].append(log["loss"])
            if progress is not None:
                progress.set_postfix(loss=f"{log['loss']:.3f}", acc=f"{log['contrastive_acc']:.1f}",
                                     lr=f"{log['lr']:.3g}", img_s=f"{log['images_per_s']:.0f}",
                                     data=f"{100 * log['data_time_fraction']:.0f}%")
            if skipped_all:
                logger.warning("skipped %d corrupt images (%d in total)", skipped_all, state.skipped_images)
            sums.zero_()
            window_steps, window_start = 0, time.perf_counter()
            if timed_from is None:
                timed_from, timed_data_time = (state.step, window_start), 0.0
            elif state.step > timed_from[0]:
                timed_data_time += data_time
                metrics["images_per_s"] = (state.step - timed_from[0]) * cfg.batch_size / (window_start - timed_from[1])
                # Where the time went: host time in `views.next` (waiting for the DataLoader, or launching the device
                # augmentation) as a fraction of the wall clock. Near 0: the step is the limit; near 1: the data.
                metrics["data_time_fraction"] = timed_data_time / (window_start - timed_from[1])
            data_time = 0.0
        if progress is not None:
            progress.update(1)

        end_of_epoch = state.step % steps_per_epoch == 0
        epoch = state.step // steps_per_epoch
        if knn_loaders and end_of_epoch and cfg.knn_every_epochs > 0 and epoch % cfg.knn_every_epochs == 0 \
                and state.step < total_steps:
            acc = run_knn(unwrapped.get_backbone(), knn_loaders, cfg, accelerator.device)
            history["knn_step"].append(state.step)
            history["knn"].append(acc)
            accelerator.log({"knn_acc": acc}, step=state.step)
            accelerator.print(f"\nepoch {epoch}: kNN accuracy {acc:.2f}%")
        if (cfg.save_steps > 0 and state.step % cfg.save_steps == 0) or (state.step == stop_at < total_steps):
            position = torch.tensor([[state.data_epoch, state.batches_in_epoch, views.position_unit,
                                      *views.carry_position()]], device=accelerator.device)
            state.positions = accelerator.gather(position).tolist()
            count_skipped(accelerator, state, skipped)  # corrupt images since the last log go into the checkpoint too
            skipped = 0
            path = save_checkpoint(accelerator, cfg.output_dir, state.step, cfg.save_total_limit)
            accelerator.print(f"\nsaved {path}")
    if progress is not None:
        progress.close()
    if profiler is not None:
        profiler.close(state.step)
    if decoder is not None:
        decoder.close()

    if state.step < total_steps:
        accelerator.print(f"stopped at step {state.step} of {total_steps} (stop_after_steps); resume with "
                          f"--resume_from_checkpoint auto")
        accelerator.end_training()
        return TrainResult(metrics, unwrapped, state)
    metrics = finish(cfg, accelerator, unwrapped, knn_loaders, history, state, metrics, stats)
    accelerator.end_training()
    return TrainResult(metrics, unwrapped, state)


def count_skipped(accelerator, state: TrainState, skipped: int) -> int:
    """Add the corrupt images every process met since the last count to `state`; returns their sum."""
    total = int(accelerator.reduce(torch.tensor(skipped, device=accelerator.device), "sum").item())
    state.skipped_images += total
    return total


def finish(cfg, accelerator, unwrapped, knn_loaders, history, state, metrics, stats) -> dict:
    """Final kNN, save_pretrained to output_dir/final with the run's metrics, loss/kNN plot."""
    metrics = {**metrics, "steps": state.step, "skipped_images": state.skipped_images}
    if knn_loaders:
        metrics["knn_acc"] = run_knn(unwrapped.get_backbone(), knn_loaders, cfg, accelerator.device)
        history["knn_step"].append(state.step)
        history["knn"].append(metrics["knn_acc"])
        accelerator.log({"knn_acc": metrics["knn_acc"]}, step=state.step)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = os.path.join(cfg.output_dir, "final")
        unwrapped.save_pretrained(final)
        with open(os.path.join(final, "training_config.json"), "w") as f:
            # The eval transform of the kNN monitor travels with the weights (image processor, model card).
            json.dump({**dataclasses.asdict(cfg), "mean": list(stats["mean"]), "std": list(stats["std"]),
                       "eval_crop_pct": 1.0, "interpolation": "bilinear"}, f, indent=2)
        save_image_processor(unwrapped, final, default_data_config(final))  # AutoImageProcessor reads the folder
        record_metrics(final, metrics)
        plot_history(history, os.path.join(cfg.output_dir, "training_curves.png"))
        if "knn_acc" in metrics:
            accelerator.print(
                f"kNN accuracy (k={cfg.knn_k}, t={cfg.knn_t}) on '{cfg.eval_split}': "
                f"learned {metrics['knn_acc']:.2f}% vs random init {metrics.get('knn_random_init', float('nan')):.2f}%"
            )
        accelerator.print(f"saved the final model to {final}")
    return metrics


def plot_history(history: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].plot(history["step"], history["loss"])
    axes[0].set(xlabel="step", ylabel="InfoNCE loss", title="loss")
    axes[1].plot(history["knn_step"], history["knn"], marker="o")
    axes[1].set(xlabel="step", ylabel="kNN top-1 (%)", title="kNN monitor")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            print("error: --config needs a YAML file", file=sys.stderr)
            return 2
        config_path = argv[i + 1]
        del argv[i:i + 2]
    elif any(a.startswith("--config=") for a in argv):
        arg = next(a for a in argv if a.startswith("--config="))
        config_path = arg.split("=", 1)[1]
        argv.remove(arg)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        print("config keys: " + ", ".join(f.name for f in dataclasses.fields(PretrainConfig)))
        return 0
    try:
        cfg = load_config(config_path, argv)
        train(cfg)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

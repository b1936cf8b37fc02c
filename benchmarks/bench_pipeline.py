"""Data pipeline and end-to-end throughput: CPU (PIL workers) vs batched device path, on generated JPEGs.

Prints one table:
  - data pipeline alone: images/s of two augmented views, CPU workers vs the batched device path
    (bytes from workers, decode + augmentation on the device: nvJPEG on CUDA);
  - pretrain.py end to end on a synthetic JPEG dataset (parquet shards it generates), both paths.

    python benchmarks/bench_pipeline.py                                   # CPU-sized defaults (2 cores: ~2 min)
    python benchmarks/bench_pipeline.py --images 4096 --width 500 --height 375 --size 224 --preset v2 \
        --batch 256 --workers 16 --backbone resnet50 --steps 40 --mixed_precision bf16 --channels_last  # one GPU

Any other `--key value` is passed to pretrain.py's config (e.g. `--bn_splits 8`).

Images are smooth random colour fields with noise, 500 x 375 by default like a typical ImageNet JPEG.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_jpeg_dataset(folder: str, count: int, width: int, height: int, shards: int = 4, seed: int = 0,
                      unique: int | None = None) -> str:
    """`count` JPEGs (quality 90) with 10 labels, as parquet shards under folder/train; returns folder.

    With `unique`, only that many distinct JPEGs are encoded and repeated to `count` rows: decoding costs the same,
    and encoding thousands of large JPEGs in one process takes longer than the benchmark itself.
    """
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(min(count, unique or count)):
        low = rng.integers(0, 256, size=(height // 25 + 2, width // 25 + 2, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(low).resize((width, height), Image.BICUBIC), dtype=np.int16)
        field = np.clip(field + rng.integers(-20, 21, size=field.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(field).save(buffer, format="JPEG", quality=90)
        images.append({"bytes": buffer.getvalue(), "path": None})
        labels.append(i % 10)
    images = [images[i % len(images)] for i in range(count)]
    labels = [i % 10 for i in range(count)]
    features = Features({"image": ImageFeature(), "label": ClassLabel(num_classes=10)})
    table = Dataset.from_dict({"image": images, "label": labels}, features=features)
    os.makedirs(os.path.join(folder, "train"), exist_ok=True)
    for k in range(shards):
        table.shard(shards, k, contiguous=True).to_parquet(os.path.join(folder, "train", f"part-{k:03d}.parquet"))
    return folder


def pipeline_throughput(cfg, gpu: bool, device: torch.device, batches: int) -> float:
    """images/s of (view_q, view_k) batches ready on `device`, after warm-up batches (and the device cache's fill)."""
    from accelerate import PartialState

    from moco_hf import pretraining
    from moco_hf.training import TrainState
    from moco_hf.views import BatchStream, CachedViews, CPUViews, GPUViews

    state = PartialState()
    model = pretraining.build_model(cfg)
    stats = pretraining.data_stats(model)
    dataset, loader, _ = pretraining.build_train_loader(cfg, state, stats, gpu=gpu)
    position = TrainState()
    stream = BatchStream(dataset, loader, position)
    cache = pretraining.build_device_cache(cfg, dataset, loader, device, None) if gpu else None
    if cache is not None:
        views = CachedViews(cache, position, pretraining.make_gpu_augment(cfg, stats), 0, 0, cfg.batch_size)
    elif gpu:
        views = GPUViews(stream, device, pretraining.make_gpu_augment(cfg, stats), 0, 0, cfg.batch_size)
    else:
        views = CPUViews(stream, device, cfg.channels_last, cfg.batch_size)
    for step in range(max(2, cfg.num_workers)):  # every worker has started and delivered once; compiled
        views.next(step)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for step in range(batches):
        view_q, view_k, _ = views.next(step)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batches * cfg.batch_size / (time.perf_counter() - start)


def end_to_end(cfg) -> tuple[float, str]:
    """images/s of pretrain.py after its first log window, and the share of that time spent waiting for data."""
    import pretrain

    metrics = pretrain.train(cfg).metrics
    return metrics["images_per_s"], f"{100 * metrics['data_time_fraction']:.0f}% of the time in data"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--unique", type=int, default=None, help="distinct JPEGs, repeated to --images rows")
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--size", type=int, default=64, help="crop size in pixels")
    parser.add_argument("--preset", default="v2")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batches", type=int, default=6, help="batches timed for the pipeline alone")
    parser.add_argument("--backbone", default="test_resnet")
    parser.add_argument("--steps", type=int, default=8, help="end-to-end steps (the first log window is not timed)")
    parser.add_argument("--mixed_precision", default="no")
    parser.add_argument("--channels_last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--paths", default="cpu,device",
                        help="comma-separated: cpu (PIL workers), device (batches streamed to the device), "
                             "cache (the split decoded once into device memory)")
    parser.add_argument("--profile_out", default=None,
                        help="with --profile_steps N: write each run's profile tables to this folder")
    parser.add_argument("--skip_pipeline", action="store_true", help="only pretrain.py end to end")
    parser.add_argument("--device_decode", default="workers", help="device path decoding: workers or nvjpeg")
    args, overrides = parser.parse_known_args(argv)  # any other `--key value`: a pretrain.py config override

    from pretrain import load_config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        data = make_jpeg_dataset(os.path.join(tmp, "data"), args.images, args.width, args.height, unique=args.unique)
        print(f"generated {args.images} JPEGs {args.width}x{args.height} ({args.unique or args.images} distinct) in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        for path in args.paths.split(","):
            if path not in ("cpu", "device", "cache"):
                parser.error(f"--paths: {path!r} is not one of cpu, device, cache")
            gpu = path != "cpu"
            common = ["--train_dir", data, "--image_size", str(args.size), "--augmentation", args.preset,
                      "--batch_size", str(args.batch), "--num_workers", str(args.workers), "--backbone", args.backbone,
                      "--crop_min_scale", "none", "--eval_split", "none", "--report_to", "none", "--save_steps", "0",
                      "--gpu_augment", "on" if gpu else "off", "--mixed_precision", args.mixed_precision,
                      "--device_decode", args.device_decode, "--device_cache", "on" if path == "cache" else "off",
                      "--channels_last", str(args.channels_last), "--compile", str(args.compile),
                      "--queue_size", str(max(4096, 2 * args.batch)), "--shuffle_buffer", "256",
                      "--output_dir", os.path.join(tmp, f"run-{path}"), "--log_steps", str(max(1, args.steps // 4))]
            cfg = load_config(None, common + overrides + ["--max_steps", str(args.steps)])
            label = {"cpu": "CPU path (PIL workers)", "device": f"device path ({args.device_decode} decode)",
                     "cache": "device cache"}[path]
            if not args.skip_pipeline:
                rows.append((f"data pipeline, {label}", pipeline_throughput(cfg, gpu, device, args.batches), ""))
                print(rows[-1], flush=True)
            rows.append((f"pretrain.py end to end, {label}", *end_to_end(cfg)))
            print(rows[-1], flush=True)
            profile = os.path.join(cfg.output_dir, "profile")
            if args.profile_out and os.path.isdir(profile):  # the two tables in one file (the trace stays behind)
                with open(os.path.join(args.profile_out, f"profile_{path}.txt"), "w") as out:
                    for name in ("ops_by_device_time.txt", "ops_by_host_time.txt"):
                        with open(os.path.join(profile, name)) as table:
                            out.write(f"== {name}\n{table.read()}\n")

    print()
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{os.cpu_count()} CPU cores'}),"
          f" torch {torch.__version__}, backbone {args.backbone}, {args.size} px {args.preset}, batch {args.batch},"
          f" {args.workers} workers, mixed precision {args.mixed_precision}, compile {args.compile}"
          f"{f' ({cfg.compile_mode})' if args.compile else ''}")
    print(f"| {'what':<56} | {'images/s':>10} | {'note':<28} |")
    print(f"|{'-' * 58}|{'-' * 12}|{'-' * 30}|")
    for name, value, note in rows:
        print(f"| {name:<56} | {value:>10.1f} | {note:<28} |")


if __name__ == "__main__":
    main()

"""Profile the batched device data path (decode + two-view augmentation) on generated JPEGs: top ops by time.

    python benchmarks/profile_device_views.py --images 2048 --width 32 --height 32 --size 32 --preset cifar --batch 512
"""

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--height", type=int, default=48)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--preset", default="cifar")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=4)
    args = p.parse_args()

    from accelerate import PartialState
    from bench_pipeline import make_jpeg_dataset

    from moco_hf import pretraining
    from moco_hf.training import TrainState
    from moco_hf.views import BatchStream, GPUViews
    from pretrain import load_config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        data = make_jpeg_dataset(os.path.join(tmp, "d"), args.images, args.width, args.height)
        cfg = load_config(None, ["--train_dir", data, "--image_size", str(args.size), "--augmentation", args.preset,
                                 "--batch_size", str(args.batch), "--num_workers", str(args.workers),
                                 "--crop_min_scale", "none", "--eval_split", "none", "--gpu_augment", "on",
                                 "--output_dir", os.path.join(tmp, "o"), "--queue_size", str(4 * args.batch)])
        model = pretraining.build_model(cfg)
        stats = pretraining.data_stats(model)
        dataset, loader, _ = pretraining.build_train_loader(cfg, PartialState(), stats, gpu=True)
        views = GPUViews(BatchStream(dataset, loader, TrainState()), device,
                                  pretraining.make_gpu_augment(cfg, stats), 0, 0, args.batch)
        for step in range(max(3, args.workers)):
            views.next(step)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for step in range(3):
                views.next(100 + step)
            if device.type == "cuda":
                torch.cuda.synchronize()
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=40))
        if device.type == "cuda":
            print(prof.key_averages().table(sort_by=sort, row_limit=12, max_name_column_width=40))


if __name__ == "__main__":
    main()

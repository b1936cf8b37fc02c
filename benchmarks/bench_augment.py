"""Time `MoCoGPUAugment.two_views` on one batch of decoded images: eager vs `compile=True`, on one device.

What pretrain.py does per step with the batched device path: N decoded uint8 images (a list of 3 x H x W tensors,
as `decode_jpegs` returns them) -> two augmented views, N x 3 x S x S, normalised, bf16 channels_last. Prints one
markdown row per mode: wall time per batch of two views (back to back, as in training), GPU kernel time per batch
(profiler; the GPU's own cost, whatever the host), images/s, peak memory, and the one-off first call (compilation).

    python benchmarks/bench_augment.py                         # CUDA: N 256, 500 x 375 -> 224, v2, bf16 channels_last
    python benchmarks/bench_augment.py --batch 16 --iters 3    # CPU (small sizes by default there: a sanity check)
    python benchmarks/bench_augment.py --baseline old_gpu_augment.py   # plus the eager path of another version:
        git show 1776c3b:moco_hf/gpu_augment.py > old_gpu_augment.py      # (one from before moco_hf/data/)

The baseline is loaded from its file (a standalone module, torch and torchvision only); the current version is
`moco_hf.data.gpu_augment`. No network; random pixels (the cost does not depend on the content).
"""

import argparse
import functools
import importlib.util
import os
import sys
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_gpu_augment(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, iters: int) -> float:
    """Seconds per call of `fn`, `iters` calls back to back (CUDA events on CUDA, so queued work is counted)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        synchronize(device)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def kernel_seconds(fn, iters: int, top: int) -> tuple[float | None, str]:
    """GPU time per call summed over kernels and copies (torch.profiler), and a table of the `top` heaviest."""
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                fn()
            torch.cuda.synchronize()
        events = prof.key_averages()
        total_us = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA)
        table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=top) if top else ""
        return total_us / 1e6 / iters, table
    except Exception as error:  # noqa: BLE001 - the profiler is optional (no CUPTI): report n/a
        return None, f"profiler failed: {error!r}"


def count_syncs(fn) -> str:
    """Host-device synchronisations in one call (CUDA's sync debug mode), as text for the table."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # "called a synchronizing CUDA operation"; not the one-off "Synchronization debug mode is a prototype" notice
    syncs = [w for w in caught if "synchronizing cuda operation" in str(w.message).lower()]
    return str(len(syncs))


def eager_ops(fn) -> int:
    """aten ops the host dispatches one by one in a call: top-level ones, outside compiled code (each is a launch
    on CUDA; compiled regions count as their own events and their kernels are not aten ops)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::"))


def params_for(module, params):
    """`params` (an AugmentParams of this version) in the classes of another version of gpu_augment."""
    ops = []
    for p in params.ops:
        if hasattr(p, "_fields"):  # a NamedTuple: rebuild it with the other version's class and fields
            cls = getattr(module, type(p).__name__)
            ops.append(cls(*(getattr(p, f) for f in cls._fields if hasattr(p, f))))
        else:
            ops.append(p)
    return module.AugmentParams(params.boxes, tuple(ops))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="images per batch; default 256 on CUDA, 16 on CPU")
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--size", type=int, default=224, help="output side")
    parser.add_argument("--preset", default="v2", choices=("v1", "v2", "cifar"))
    parser.add_argument("--dtype", default="bf16", choices=tuple(DTYPES))
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--modes", default="eager,compile", help="comma-separated: eager, compile")
    parser.add_argument("--baseline", default=None, help="another gpu_augment.py: its eager path is timed too")
    parser.add_argument("--warmup", type=int, default=3, help="calls after the first, not timed")
    parser.add_argument("--iters", type=int, default=None, help="timed calls; default 20 on CUDA, 3 on CPU")
    parser.add_argument("--profile-top", type=int, default=0, help="CUDA: print the N heaviest kernels per mode")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch or (256 if cuda else 16)
    iters = args.iters or (20 if cuda else 3)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    images = [
        torch.randint(0, 256, (3, args.height, args.width), dtype=torch.uint8, device=device) for _ in range(batch)
    ]
    current = importlib.import_module("moco_hf.data.gpu_augment")
    runs = [(mode, current, {"compile": mode == "compile"}) for mode in args.modes.split(",") if mode]
    if args.baseline:
        runs.insert(0, ("baseline eager", load_gpu_augment(args.baseline, "gpu_augment_baseline"), {}))

    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(
        f"device {device} ({name}), torch {torch.__version__}, {batch} images {args.height} x {args.width} uint8 "
        f"-> two views {args.size} px, preset {args.preset}, {args.dtype}, channels_last {args.channels_last}, "
        f"{iters} timed calls after {args.warmup} warm-up"
    )
    rows, tables, outputs = [], [], {}
    reference = current.MoCoGPUAugment(args.preset, args.size, dtype=dtype, channels_last=args.channels_last)
    fixed = reference.sample(images, torch.Generator(device).manual_seed(1))  # the same parameters for every mode
    for mode, module, kwargs in runs:
        augment = module.MoCoGPUAugment(args.preset, args.size, dtype=dtype, channels_last=args.channels_last, **kwargs)
        generator = torch.Generator(device).manual_seed(args.seed)
        # packed once, as pretrain.py hands the augmentation a packed batch (`ImageChunk.packed`)
        fn = functools.partial(augment.two_views, module.pack_images(images), generator=generator)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        first = time.perf_counter() - start
        for _ in range(args.warmup):
            fn()
        synchronize(device)
        seconds = timed(fn, device, iters)
        kernel, syncs, table = None, "n/a", ""
        if cuda:
            kernel, table = kernel_seconds(fn, min(iters, 5), args.profile_top)
            syncs = count_syncs(fn)
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if cuda else "n/a"
        # the same parameters through each mode, to check they agree (against the first mode)
        outputs[mode] = augment.apply(images, params_for(module, fixed)).float()
        kernel_ms = f"{kernel * 1e3:.2f}" if kernel is not None else "n/a"
        rows.append(
            f"| {mode} | {seconds * 1e3:.2f} | {kernel_ms} | {batch / seconds:,.0f} | {peak} | {syncs} | "
            f"{eager_ops(fn)} | {first:.1f} |"
        )
        tables.append((mode, table))

    print(
        "| mode | ms per batch (two views) | GPU kernel ms per batch | images/s | peak memory | host syncs per call "
        "| eager ops per call | first call s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    reference = next(iter(outputs))
    for mode, out in outputs.items():
        if mode != reference:
            diff = (out - outputs[reference]).abs()
            print(
                f"{mode} vs {reference}, same parameters: max |diff| {diff.max():.3g}, mean {diff.mean():.3g} "
                f"(output dtype {args.dtype})"
            )
    for mode, table in tables:
        if table:
            print(f"\n{mode}: heaviest kernels over {min(iters, 5)} calls\n{table}")


if __name__ == "__main__":
    main()

"""Bytes autograd keeps for backward in one MoCo training forward (what a step's peak memory grows with), on any
device, CPU included: distinct storages seen by a `saved_tensors_hooks` pack hook.

    python benchmarks/bench_saved_memory.py --backbone cifar_resnet18 --batch 64 --bn-splits 8 --amp
"""

import argparse
import sys

import torch

from moco_hf import MoCoConfig, MoCoModel


def saved_bytes(model: MoCoModel, view_q: torch.Tensor, view_k: torch.Tensor, amp: bool) -> int:
    seen, total = set(), 0

    def pack(tensor):
        nonlocal total
        key = (tensor.untyped_storage().data_ptr(), tensor.dtype)
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
            torch.autocast(view_q.device.type, dtype=torch.bfloat16, enabled=amp):
        model(pixel_values=view_q, key_pixel_values=view_k)
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="cifar_resnet18")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--bn-splits", type=int, default=8)
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    config = MoCoConfig(backbone=args.backbone, embed_dim=128, queue_size=8 * args.batch, bn_splits=args.bn_splits)
    model = MoCoModel(config).to(args.device, memory_format=torch.channels_last).train()
    views = [torch.randn(args.batch, 3, args.image_size, args.image_size, device=args.device)
             .contiguous(memory_format=torch.channels_last) for _ in range(2)]
    total = saved_bytes(model, *views, amp=args.amp)
    print(f"{args.backbone}, batch {args.batch} x {args.image_size} px, bn_splits {args.bn_splits}, amp {args.amp}: "
          f"{total / 2**20:.1f} MiB saved for backward")
    return 0


if __name__ == "__main__":
    sys.exit(main())

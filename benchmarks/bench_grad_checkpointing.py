"""Bytes autograd keeps for backward in one MoCo training forward, with and without gradient checkpointing of the query
encoder (`model.activation_checkpointing_enable()`, timm's `set_grad_checkpointing`), on any device, CPU included.

Counted as the distinct storages a `saved_tensors_hooks` pack hook sees, parameters excluded (they are held anyway;
`bench_saved_memory.py` counts them too). With checkpointing, what timm's checkpoints keep (each block's input) goes
through the hook and what they recompute in backward does not. One backward per case checks that the step runs.

    python benchmarks/bench_grad_checkpointing.py                                   # the default cases below
    python benchmarks/bench_grad_checkpointing.py --case resnet50:224:32 --amp      # backbone:pixels:batch
    python benchmarks/bench_grad_checkpointing.py --v3 --amp --case vit_small_patch16_224:224:4
                                                  # MoCo v3 (MoCoConfig.v3, the released ViT-S heads): two query views
"""

import argparse
import platform
import sys

import torch

from moco_hf import MoCoConfig, MoCoModel

# backbone:image size:batch[:bn_splits]. The official CIFAR demo's network and split BN; timm's tiny ViT; ViT-S/16.
DEFAULT_CASES = ["cifar_resnet18:32:64:8", "test_vit:32:64", "vit_small_patch16_224:64:64"]


def saved_bytes(model: MoCoModel, view_q: torch.Tensor, view_k: torch.Tensor, amp: bool) -> tuple[int, torch.Tensor]:
    """(bytes saved for backward, the loss) of one training forward."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, total = set(), 0

    def pack(tensor):
        nonlocal total
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
            torch.autocast(view_q.device.type, dtype=torch.bfloat16, enabled=amp):
        loss = model(pixel_values=view_q, key_pixel_values=view_k).loss
    return total, loss


def model_for(backbone: str, size: int, bn_splits: int, batch: int, device: str, v3: bool = False) -> MoCoModel:
    kwargs = {"img_size": size} if backbone.startswith(("vit_", "test_vit", "deit_")) else {}
    if v3:  # the released heads (4096 hidden, 256 out); ViT-S with the released 12 heads
        if backbone == "vit_small_patch16_224":
            kwargs["num_heads"] = 12
        config = MoCoConfig.v3(backbone, backbone_kwargs=kwargs)
    else:
        config = MoCoConfig(backbone=backbone, backbone_kwargs=kwargs, embed_dim=128, queue_size=max(4096, 2 * batch),
                            bn_splits=bn_splits)
    return MoCoModel(config).to(device).train()


def run_case(case: str, amp: bool, device: str, v3: bool = False) -> str:
    backbone, size, batch, *rest = case.split(":")
    size, batch, bn_splits = int(size), int(batch), int(rest[0]) if rest else 1
    torch.manual_seed(0)
    views = [torch.randn(batch, 3, size, size, device=device) for _ in range(2)]
    model = model_for(backbone, size, bn_splits, batch, device, v3)
    plain, _ = saved_bytes(model, *views, amp=amp)
    model.activation_checkpointing_enable()
    checkpointed, loss = saved_bytes(model, *views, amp=amp)
    loss.backward()  # the checkpointed step runs through
    return (f"{backbone:<24}{' v3' if v3 else ''} {size:>4} px  batch {batch:<4} bn_splits {bn_splits}  "
            f"{plain / 2**20:9.1f} MiB -> {checkpointed / 2**20:8.1f} MiB  ({checkpointed / plain:.1%})")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", action="append", help=f"backbone:pixels:batch[:bn_splits] (default: {DEFAULT_CASES})")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    p.add_argument("--device", default="cpu")
    p.add_argument("--v3", action="store_true", help="MoCo v3 models (MoCoConfig.v3: no queue, both views as queries)")
    args = p.parse_args(argv)
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else cpu_name()
    print(f"device {args.device} ({where}), torch {torch.__version__}, amp {args.amp}; "
          "bytes saved for backward in one training forward (parameters excluded), without -> with checkpointing")
    for case in args.case or DEFAULT_CASES:
        print(run_case(case, args.amp, args.device, args.v3), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

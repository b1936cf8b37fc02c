"""Convert a checkpoint of the official MoCo code (facebookresearch/moco, `main_moco.py`) into a moco_hf folder.

    python -m moco_hf.convert_official --checkpoint moco_v2_800ep_pretrain.pth.tar --output_dir moco_v2_800ep
    python -m moco_hf.convert_official --checkpoint moco_v1_200ep_pretrain.pth.tar --output_dir moco_v1_200ep
    python -m moco_hf.convert_official --checkpoint checkpoint_0199.pth.tar --output_dir run --arch resnet50 --tau 0.2

The output loads with `AutoModel.from_pretrained(output_dir)` (moco_hf imported, or `trust_remote_code=True`) and
stages / uploads with `push_to_hub.py --model_dir output_dir`.

What the official checkpoint holds (`torch.save({'epoch', 'arch', 'state_dict', 'optimizer'})` of the DDP model):
`module.encoder_q.*` and `module.encoder_k.*`, torchvision models built with `num_classes=dim` whose `fc` is the
projection (v1: `fc` Linear; v2 `--mlp`: `fc` = Sequential(Linear, ReLU, Linear), keys `fc.0` / `fc.2`),
`module.queue` (dim x K, columns L2-normalised) and `module.queue_ptr`. The released checkpoints keep only
`encoder_q`; then the key encoder is copied from the query encoder and the queue is filled with random unit
vectors, as at the start of training.

Key mapping: torchvision and timm ResNets (resnet18/34/50/101/152, resnext, wide_resnet) use the same parameter
names (conv1, bn1, layer1.0.conv1, ..., downsample.0/1) and the same ResNet v1.5 layout, so backbone keys move
unchanged under `query_encoder.backbone.` / `key_encoder.backbone.`; `fc.*` becomes `*.head.layers.*`. The queue is
transposed to moco_hf's K x dim. Nothing is guessed silently: the converted state dict must fill the model exactly.
"""

import argparse
import json
import pickle
import sys
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

from .configuration_moco import MoCoConfig
from .modeling_moco import MoCoModel

EXPECTED_KEYS = (
    "'state_dict' with 'module.encoder_q.*' (torchvision names: conv1, bn1, layer1.0.conv1, ..., "
    "fc or fc.0/fc.2), optionally 'module.encoder_k.*', 'module.queue' (dim x K), 'module.queue_ptr'; "
    "and 'arch', 'epoch'"
)
# Evaluation transform of the official linear classification (main_lincls.py): Resize(256), CenterCrop(224),
# ImageNet mean/std, torchvision's default bilinear interpolation.
OFFICIAL_EVAL_DATA_CONFIG = {
    "input_size": (3, 224, 224),
    "crop_pct": 224 / 256,
    "crop_mode": "center",
    "interpolation": "bilinear",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
}
DEFAULT_TAU = {True: 0.2, False: 0.07}  # v2 (MLP head), v1 (linear head)


class ConversionError(ValueError):
    """The file is not an official MoCo checkpoint, or it does not fit the requested architecture."""


def load_official_checkpoint(path: str | Path) -> dict:
    """`torch.load(path, map_location="cpu", weights_only=True)`, checked to be an official MoCo checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"checkpoint {str(path)!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(
            f"{str(path)!r} is not a loadable PyTorch checkpoint ({first}); expected an official MoCo checkpoint: "
            f"{EXPECTED_KEYS}"
        ) from None
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not any(_strip(k, "encoder_q.") is not None for k in state):
        found = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ConversionError(
            f"{str(path)!r} is not an official MoCo checkpoint: expected {EXPECTED_KEYS}; found keys {found}"
        )
    return checkpoint


def _strip(key: str, prefix: str) -> str | None:
    """`key` without `module.` + `prefix` (or without `prefix` alone), None when it has neither."""
    for full in (f"module.{prefix}", prefix):
        if key.startswith(full):
            return key[len(full) :]
    return None


def split_official_state_dict(state: dict) -> dict:
    """The pieces of an official state dict: encoder_q / encoder_k (torchvision names), queue, queue_ptr."""
    pieces = {"encoder_q": {}, "encoder_k": {}, "queue": None, "queue_ptr": None}
    for key, value in state.items():
        for name in ("encoder_q", "encoder_k"):
            rest = _strip(key, f"{name}.")
            if rest is not None:
                pieces[name][rest] = value
        if key in ("module.queue", "queue"):
            pieces["queue"] = value
        if key in ("module.queue_ptr", "queue_ptr"):
            pieces["queue_ptr"] = value
    return pieces


def encoder_to_moco(encoder: dict, prefix: str) -> dict:
    """torchvision encoder keys -> moco_hf keys under `prefix` (`query_encoder.` or `key_encoder.`).

    Backbone names are kept (torchvision and timm ResNets coincide); the projection `fc` (v1) or `fc.0`/`fc.2`
    (v2 MLP) becomes `head.layers.0` / `head.layers.0` + `head.layers.2`.
    """
    out = {}
    for key, value in encoder.items():
        if key.startswith("fc."):
            rest = key[len("fc.") :]
            layer = rest if rest[:1].isdigit() else f"0.{rest}"  # v1: fc.weight -> layers.0.weight
            out[f"{prefix}head.layers.{layer}"] = value
        else:
            out[f"{prefix}backbone.{key}"] = value
    return out


def infer_config(pieces: dict, arch: str, tau: float | None, momentum: float, queue_size: int | None) -> MoCoConfig:
    """MoCoConfig from the tensors: embed_dim and head type from `fc`, queue_size from the queue."""
    q = pieces["encoder_q"]
    mlp = "fc.0.weight" in q and "fc.2.weight" in q
    if mlp:
        hidden, in_dim = q["fc.0.weight"].shape
        embed_dim = q["fc.2.weight"].shape[0]
    elif "fc.weight" in q:
        embed_dim, in_dim = q["fc.weight"].shape
        hidden = None
    else:
        raise ConversionError(
            "encoder_q has no projection head: expected 'fc.weight' (MoCo v1) or 'fc.0.weight' and 'fc.2.weight' "
            f"(MoCo v2 MLP); found {sorted(k for k in q if k.startswith('fc'))}"
        )
    queue = pieces["queue"]
    if queue is not None:
        if queue.dim() != 2 or queue.shape[0] != embed_dim:
            raise ConversionError(f"queue of shape {tuple(queue.shape)} does not match embed_dim={embed_dim} (dim x K)")
        if queue_size is not None and queue_size != queue.shape[1]:
            raise ConversionError(
                f"--queue_size {queue_size} contradicts the checkpoint's queue of {queue.shape[1]} keys"
            )
        queue_size = queue.shape[1]
    if not timm.is_model(arch):
        raise ConversionError(f"--arch {arch!r} is not a timm architecture (timm.list_models())")
    try:
        return MoCoConfig(
            backbone=arch,
            embed_dim=int(embed_dim),
            queue_size=int(queue_size or 65536),
            tau=DEFAULT_TAU[mlp] if tau is None else tau,
            momentum=momentum,
            mlp_head=mlp,
            mlp_hidden_dim=int(hidden) if hidden is not None and hidden != in_dim else None,
        )
    except ValueError as e:
        raise ConversionError(str(e)) from None


def convert(
    checkpoint_path: str | Path,
    output_dir: str | Path | None = None,
    *,
    arch: str | None = None,
    tau: float | None = None,
    momentum: float = 0.999,
    queue_size: int | None = None,
    seed: int = 0,
) -> MoCoModel:
    """Convert an official MoCo checkpoint to a `MoCoModel`; with `output_dir`, save it there
    (`save_pretrained` + image processor + `training_config.json` describing the source)."""
    checkpoint = load_official_checkpoint(checkpoint_path)
    pieces = split_official_state_dict(checkpoint.get("state_dict", checkpoint))
    arch = arch or checkpoint.get("arch") or "resnet50"
    config = infer_config(pieces, arch, tau, momentum, queue_size)

    state = encoder_to_moco(pieces["encoder_q"], "query_encoder.")
    has_key = bool(pieces["encoder_k"])
    state.update(encoder_to_moco(pieces["encoder_k"] if has_key else pieces["encoder_q"], "key_encoder."))
    has_queue = pieces["queue"] is not None
    if has_queue:
        state["queue"] = pieces["queue"].T.contiguous()  # dim x K -> K x dim
        ptr = pieces["queue_ptr"]
        state["queue_ptr"] = ptr.reshape(1).long() if ptr is not None else torch.zeros(1, dtype=torch.long)
    else:
        generator = torch.Generator().manual_seed(seed)
        state["queue"] = F.normalize(torch.randn(config.queue_size, config.embed_dim, generator=generator), dim=1)
        state["queue_ptr"] = torch.zeros(1, dtype=torch.long)

    with torch.device("meta"):  # names and shapes only: check the fit before allocating anything
        expected = MoCoModel(config).state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise ConversionError(
            f"the checkpoint does not fit timm {arch!r}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
            f"wrong shape {wrong[:5]}; is --arch right (the checkpoint says {checkpoint.get('arch')!r})?"
        )
    model = MoCoModel(config)
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    model.eval()

    if output_dir is not None:
        from .hub import save_image_processor

        out = Path(output_dir)
        model.save_pretrained(out, safe_serialization=True)
        save_image_processor(model, out, OFFICIAL_EVAL_DATA_CONFIG)
        record = {
            "source": "facebookresearch/moco",
            "checkpoint": Path(checkpoint_path).name,
            "arch": arch,
            "epoch": checkpoint.get("epoch"),
            "moco_version": "v2" if config.mlp_head else "v1",
            "key_encoder": "from checkpoint" if has_key else "copied from the query encoder (not in checkpoint)",
            "queue": "from checkpoint" if has_queue else f"random unit vectors, seed {seed} (not in checkpoint)",
            "image_size": OFFICIAL_EVAL_DATA_CONFIG["input_size"][-1],
            "crop_pct": OFFICIAL_EVAL_DATA_CONFIG["crop_pct"],
            "interpolation": OFFICIAL_EVAL_DATA_CONFIG["interpolation"],
            "mean": list(OFFICIAL_EVAL_DATA_CONFIG["mean"]),
            "std": list(OFFICIAL_EVAL_DATA_CONFIG["std"]),
        }
        (out / "training_config.json").write_text(json.dumps(record, indent=2) + "\n")
    return model


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="official checkpoint (.pth.tar)")
    parser.add_argument("--output_dir", required=True, help="folder for the converted model")
    parser.add_argument(
        "--arch", default=None, help="timm architecture (default: the checkpoint's 'arch', else resnet50)"
    )
    parser.add_argument("--tau", type=float, default=None, help="softmax temperature (default 0.2 for v2, 0.07 for v1)")
    parser.add_argument("--momentum", type=float, default=0.999, help="key encoder momentum (default 0.999)")
    parser.add_argument(
        "--queue_size", type=int, default=None, help="K when the checkpoint has no queue (default 65536)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random queue when the checkpoint has none")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        model = convert(
            args.checkpoint,
            args.output_dir,
            arch=args.arch,
            tau=args.tau,
            momentum=args.momentum,
            queue_size=args.queue_size,
            seed=args.seed,
        )
    except ConversionError as e:
        print(f"convert_official: error: {e}", file=sys.stderr)
        return 1
    c = model.config
    print(
        f"converted {args.checkpoint} -> {args.output_dir}: MoCo {'v2' if c.mlp_head else 'v1'}, {c.backbone}, "
        f"embed_dim {c.embed_dim}, queue {c.queue_size}, tau {c.tau}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

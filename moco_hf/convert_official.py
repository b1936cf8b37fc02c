"""Convert a checkpoint of the official MoCo code (facebookresearch/moco, `main_moco.py`, and facebookresearch/moco-v3)
into a moco_hf folder.

    python -m moco_hf.convert_official --checkpoint moco_v2_800ep_pretrain.pth.tar --output_dir moco_v2_800ep
    python -m moco_hf.convert_official --checkpoint moco_v1_200ep_pretrain.pth.tar --output_dir moco_v1_200ep
    python -m moco_hf.convert_official --checkpoint checkpoint_0199.pth.tar --output_dir run --arch resnet50 --tau 0.2
    python -m moco_hf.convert_official --checkpoint vit-s-300ep.pth.tar --output_dir moco_v3_vit_small_300ep
    python -m moco_hf.convert_official --checkpoint r-50-100ep.pth.tar --output_dir moco_v3_resnet50_100ep

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

MoCo v3 checkpoints (detected from their `module.base_encoder.*` keys) hold `module.base_encoder.*` (f_q's backbone
and projection head), `module.momentum_encoder.*` (f_k) and `module.predictor.*`; their 'arch' is `resnet50`
(torchvision; projection head `fc.0 ... fc.4`, 2 layers) or `vit_small` / `vit_base` (timm's VisionTransformer with a
fixed sin-cos position embedding; projection head `head.0 ... head.7`, 3 layers). The heads' Sequential indices are
moco_hf's (`head.layers.N`, `predictor.layers.N`); the ViT backbones become timm's `vit_small_patch16_224` with 12
attention heads (the released ViT-Small's, where timm's has 6) and `vit_base_patch16_224`. The settings not stored in
the tensors are the released recipes': tau 0.2 (ViT) or 1.0 (ResNet-50), m 0.99, the symmetrised loss, and for ViTs
the frozen patch projection and fixed position embedding. No queue.
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
    "or MoCo v3's 'module.base_encoder.*', 'module.momentum_encoder.*', 'module.predictor.*'; and 'arch', 'epoch'"
)
# The released MoCo v3 ViTs (moco-v3 `vits.py`): timm's ViT layouts; ViT-Small with 12 heads instead of timm's 6.
V3_VIT_ARCHS = {
    "vit_small": ("vit_small_patch16_224", {"num_heads": 12}),
    "vit_base": ("vit_base_patch16_224", {}),
}
V3_DEFAULT_TAU = {True: 0.2, False: 1.0}  # ViT, ResNet-50 (the released commands)
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
    if not isinstance(state, dict) or not any(_strip(k, p) is not None for k in state
                                              for p in ("encoder_q.", "base_encoder.")):
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


# ---------------------------------------------------------------------------------------------------------
# MoCo v3 (facebookresearch/moco-v3)
# ---------------------------------------------------------------------------------------------------------


def is_v3(state: dict) -> bool:
    """Whether a state dict is MoCo v3's (`base_encoder.*` keys, no queue)."""
    return any(_strip(k, "base_encoder.") is not None for k in state)


def split_v3_state_dict(state: dict) -> dict:
    """The pieces of a MoCo v3 state dict: base_encoder, momentum_encoder, predictor (keys without their prefix)."""
    pieces = {"base_encoder": {}, "momentum_encoder": {}, "predictor": {}}
    for key, value in state.items():
        for name in pieces:
            rest = _strip(key, f"{name}.")
            if rest is not None:
                pieces[name][rest] = value
    return pieces


def _v3_head_name(encoder: dict) -> str:
    """`head` (ViT) or `fc` (ResNet): where the projection head of a v3 encoder lives."""
    for name in ("head", "fc"):
        if f"{name}.0.weight" in encoder:
            return name
    raise ConversionError(
        "base_encoder has no MoCo v3 projection head: expected 'head.0.weight' (ViT) or 'fc.0.weight' (ResNet); "
        f"found {sorted(k for k in encoder if k.startswith(('head', 'fc')))[:6]}"
    )


def _mlp_shape(layers: dict, what: str) -> tuple[list[int], bool]:
    """(indices of the linear layers, whether a BatchNorm follows the last one) of an official MLP's state dict
    (keys `N.weight`, BatchNorms `N.running_mean`)."""
    linear = sorted(int(k.split(".")[0]) for k, v in layers.items() if k.endswith(".weight") and v.dim() == 2)
    norms = {int(k.split(".")[0]) for k in layers if k.endswith(".running_mean")}
    if not linear:
        raise ConversionError(f"the {what} has no linear layers; found keys {sorted(layers)[:6]}")
    return linear, any(i > linear[-1] for i in norms)


def v3_encoder_to_moco(encoder: dict, prefix: str, head_name: str) -> dict:
    """Official v3 encoder keys -> moco_hf keys under `prefix`: the projection head (`head.N` / `fc.N`) becomes
    `head.layers.N` (the same Sequential layout), everything else is the backbone (timm's names)."""
    out = {}
    for key, value in encoder.items():
        if key.startswith(f"{head_name}."):
            out[f"{prefix}head.layers.{key[len(head_name) + 1:]}"] = value
        else:
            out[f"{prefix}backbone.{key}"] = value
    return out


def infer_v3_config(pieces: dict, arch: str, backbone_kwargs: dict, tau: float | None,
                    momentum: float | None) -> MoCoConfig:
    """MoCoConfig of a MoCo v3 checkpoint: heads' widths and depths from the tensors, the rest from the recipe."""
    base = pieces["base_encoder"]
    head_name = _v3_head_name(base)
    vit = head_name == "head"
    projector = {k[len(head_name) + 1:]: v for k, v in base.items() if k.startswith(f"{head_name}.")}
    linear, last_bn = _mlp_shape(projector, "projection head")
    if not last_bn:
        raise ConversionError("the projection head ends without its BatchNorm: not a MoCo v3 checkpoint")
    if not pieces["predictor"]:
        raise ConversionError("the checkpoint has base_encoder.* but no predictor.*: not a complete MoCo v3 model")
    predictor_linear, predictor_last_bn = _mlp_shape(pieces["predictor"], "prediction head")
    if len(predictor_linear) != 2:
        raise ConversionError(f"the prediction head has {len(predictor_linear)} linear layers, MoCo v3's has 2")
    if not timm.is_model(arch):
        raise ConversionError(f"--arch {arch!r} is not a timm architecture (timm.list_models())")
    try:
        return MoCoConfig(
            backbone=arch,
            backbone_kwargs=backbone_kwargs,
            queue_size=0,
            symmetric=True,
            embed_dim=int(projector[f"{linear[-1]}.weight"].shape[0]),
            mlp_head=True,
            mlp_layers=len(linear),
            mlp_hidden_dim=int(projector[f"{linear[0]}.weight"].shape[0]),
            mlp_bn=True,
            predictor_hidden_dim=int(pieces["predictor"][f"{predictor_linear[0]}.weight"].shape[0]),
            predictor_last_bn=predictor_last_bn,
            shuffle_bn=False,
            tau=V3_DEFAULT_TAU[vit] if tau is None else tau,
            momentum=0.99 if momentum is None else momentum,
            freeze_patch_embed=vit,
            sincos_pos_embed=vit,
        )
    except ValueError as e:
        raise ConversionError(str(e)) from None


def _v3_state(pieces: dict) -> tuple[dict, bool]:
    """(moco_hf state dict, whether the momentum encoder was in the checkpoint) of a MoCo v3 checkpoint."""
    head_name = _v3_head_name(pieces["base_encoder"])
    state = v3_encoder_to_moco(pieces["base_encoder"], "query_encoder.", head_name)
    has_key = bool(pieces["momentum_encoder"])
    state.update(v3_encoder_to_moco(pieces["momentum_encoder"] if has_key else pieces["base_encoder"],
                                    "key_encoder.", head_name))
    state.update({f"predictor.layers.{k}": v for k, v in pieces["predictor"].items()})  # f_q only
    return state, has_key


def _v3_arch(checkpoint: dict, arch: str | None, backbone_kwargs: dict | None) -> tuple[str, dict]:
    """The timm architecture and its arguments for a v3 checkpoint: the released ViTs' names mapped to timm's (with
    ViT-Small's 12 heads, also where `arch` names timm's model directly), anything else as given."""
    official = checkpoint.get("arch")
    name, defaults = V3_VIT_ARCHS.get(official, (official, {}))
    if isinstance(official, str) and official.startswith("vit_conv"):
        raise ConversionError(f"'arch' {official!r} (a ViT with a convolutional stem) has no timm counterpart")
    return arch or name or "resnet50", {**defaults, **(backbone_kwargs or {})}


# ---------------------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------------------


def convert(
    checkpoint_path: str | Path,
    output_dir: str | Path | None = None,
    *,
    arch: str | None = None,
    tau: float | None = None,
    momentum: float | None = None,
    queue_size: int | None = None,
    seed: int = 0,
    backbone_kwargs: dict | None = None,
) -> MoCoModel:
    """Convert an official MoCo (v1, v2 or v3) checkpoint to a `MoCoModel`; with `output_dir`, save it there
    (`save_pretrained` + image processor + `training_config.json` describing the source)."""
    checkpoint = load_official_checkpoint(checkpoint_path)
    raw = checkpoint.get("state_dict", checkpoint)
    v3 = is_v3(raw)
    has_queue = False
    if v3:
        if queue_size is not None:
            raise ConversionError("--queue_size does not apply: a MoCo v3 model has no queue")
        pieces = split_v3_state_dict(raw)
        arch, backbone_kwargs = _v3_arch(checkpoint, arch, backbone_kwargs)
        config = infer_v3_config(pieces, arch, backbone_kwargs, tau, momentum)
        state, has_key = _v3_state(pieces)
    else:
        pieces = split_official_state_dict(raw)
        arch = arch or checkpoint.get("arch") or "resnet50"
        config = infer_config(pieces, arch, tau, 0.999 if momentum is None else momentum, queue_size)
        if backbone_kwargs:
            config.backbone_kwargs = dict(backbone_kwargs)
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
            "source": "facebookresearch/moco-v3" if v3 else "facebookresearch/moco",
            "checkpoint": Path(checkpoint_path).name,
            "arch": arch,
            "official_arch": checkpoint.get("arch"),
            "epoch": checkpoint.get("epoch"),
            "moco_version": config.moco_version,
            "key_encoder": "from checkpoint" if has_key else "copied from the query encoder (not in checkpoint)",
            "queue": ("none (MoCo v3)" if v3 else "from checkpoint" if has_queue
                      else f"random unit vectors, seed {seed} (not in checkpoint)"),
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
        "--arch", default=None,
        help="timm architecture (default: the checkpoint's 'arch', else resnet50; MoCo v3's vit_small and vit_base "
             "become timm's vit_small_patch16_224 with 12 heads and vit_base_patch16_224)"
    )
    parser.add_argument("--backbone_kwargs", type=json.loads, default=None,
                        help="extra timm.create_model arguments as JSON, e.g. '{\"img_size\": 384}'")
    parser.add_argument("--tau", type=float, default=None,
                        help="softmax temperature (default 0.2 for v2, 0.07 for v1; v3: 0.2 for ViTs, 1.0 for ResNets)")
    parser.add_argument("--momentum", type=float, default=None,
                        help="key encoder momentum (default 0.999 for v1/v2, 0.99 for v3)")
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
            backbone_kwargs=args.backbone_kwargs,
        )
    except ConversionError as e:
        print(f"convert_official: error: {e}", file=sys.stderr)
        return 1
    c = model.config
    queue = f"queue {c.queue_size}" if c.queue_size else "no queue"
    print(
        f"converted {args.checkpoint} -> {args.output_dir}: MoCo {c.moco_version}, {c.backbone}, "
        f"embed_dim {c.embed_dim}, {queue}, tau {c.tau}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

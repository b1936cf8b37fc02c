"""MoCo configuration.

Defaults follow MoCo v2 (Chen et al., 2020, "Improved Baselines with Momentum Contrastive
Learning"): a 2-layer MLP projection head and a softmax temperature of 0.2, on top of the
MoCo v1 settings (He et al., 2019): 128-d embeddings, a queue of 65,536 keys and key-encoder
momentum 0.999.

MoCo v3 (Chen, Xie and He, 2021, "An Empirical Study of Training Self-Supervised Vision Transformers") is the same
model with `queue_size=0` (the other keys of the batch are the negatives), a prediction head
(`predictor_hidden_dim > 0`), BatchNorm in the heads (`mlp_bn`) and the symmetrised loss (`symmetric=True`); for
ViTs also `freeze_patch_embed` and `sincos_pos_embed`. `MoCoConfig.v3(backbone)` gives the paper's settings.
"""

from typing import Any

import torch
from transformers import PreTrainedConfig

from .backbones import SmallImageResNet  # noqa: F401  (importing registers the small-image ResNets with timm)


class MoCoConfig(PreTrainedConfig):
    r"""Configuration of a [`MoCoModel`] or [`MoCoForImageClassification`].

    Args:
        backbone (`str`, defaults to `"resnet50"`):
            Name of any timm architecture (`timm.list_models()`); it is created without a classifier
            (`num_classes=0`) and its pooled features feed the projection head.
        backbone_kwargs (`dict`, *optional*):
            Extra keyword arguments for `timm.create_model` (for example `{"drop_path_rate": 0.1}`).
        embed_dim (`int`, defaults to 128):
            Dimension of the normalised embeddings q and k (the paper's 128-d output).
        queue_size (`int`, defaults to 65536):
            K, the number of negative keys kept in the queue. 0: no queue (MoCo v3): the negatives of a query are
            the keys of the other images of the global batch, and the loss is the paper's
            `ctr(q, k) = 2 tau * CrossEntropy(q k^T / tau)` with the positives on the diagonal.
        momentum (`float`, defaults to 0.999):
            m in the key-encoder update theta_k <- m * theta_k + (1 - m) * theta_q. 0 copies the
            query encoder at every step; 1 freezes the key encoder.
        tau (`float`, defaults to 0.2):
            Softmax temperature of the InfoNCE loss (v1: 0.07, v2: 0.2). Named `tau` because
            transformers reserves `temperature` for generation.
        mlp_head (`bool`, defaults to `True`):
            v2's 2-layer MLP projection head (fc-ReLU-fc) when `True`, v1's single linear layer when `False`.
        mlp_hidden_dim (`int`, *optional*):
            Hidden width of the MLP head; defaults to the backbone's feature width (2048 for ResNet-50).
        mlp_layers (`int`, defaults to 2):
            Linear layers of the MLP head (v2: 2; v3: "a 3-layer MLP" for ViTs, 2 for ResNet-50). Only with
            `mlp_head=True`.
        mlp_bn (`bool`, defaults to `False`):
            BatchNorm in the MLP head, as MoCo v3 "following SimCLR": BN and ReLU after each hidden layer and a BN
            without affine parameters after the last one; the linear layers then have no bias (a BatchNorm follows
            each). Only with `mlp_head=True`.
        predictor_hidden_dim (`int`, defaults to 0):
            MoCo v3's prediction head: "f_q, a backbone, a projection head and an extra prediction head" (the key
            encoder has none). A 2-layer MLP (linear, BN, ReLU, linear; no biases) of this hidden width from
            `embed_dim` to `embed_dim`, applied to the query projections. 0: no prediction head (v1, v2).
        predictor_last_bn (`bool`, defaults to `False`):
            A BatchNorm without affine parameters after the prediction head's last layer: the released MoCo v3
            ViTs have one, the released ResNet-50s do not.
        shuffle_bn (`bool`, defaults to `True`):
            Shuffle the key batch across devices before the key encoder and restore its order after, so that
            BatchNorm statistics cannot reveal which key is the positive (paper, Sec. 3.3).
        bn_splits (`int`, defaults to 1):
            BatchNorm normalises each of this many equal chunks of each process's batch with its own
            statistics, as on `bn_splits` times as many GPUs (the official CIFAR demo's `SplitBatchNorm`, meant
            for one GPU), in one pass over the batch. As in the demo, the running statistics are updated with
            the average over the chunks of their statistics. The per-process batch must be divisible by
            `bn_splits` in train mode. Backbones with other BatchNorm types (e.g. timm's `BatchNormAct2d`) run
            once per chunk instead (their running statistics then take one update per chunk). 1 is off.
        symmetric (`bool`, defaults to `False`):
            Symmetric loss of the official CIFAR demo: each view is used once as query and once as key,
            the two losses are added and both key batches are enqueued. With `queue_size=0` it is MoCo v3's
            symmetrised loss `ctr(q1, k2) + ctr(q2, k1)`.
        freeze_patch_embed (`bool`, defaults to `False`):
            MoCo v3's stability trick for ViTs (Sec. 5): a fixed random patch projection, the backbone's
            `patch_embed.proj` kept at its random initialisation (no gradient) during pretraining.
            Needs a backbone with a patch embedding (`vit_*`).
        sincos_pos_embed (`bool`, defaults to `False`):
            Fixed 2-D sin-cos position embeddings (MoCo v3's ViTs): the backbone's `pos_embed` holds, for the patch
            at row y and column x, [sin(y w), cos(y w), sin(x w), cos(x w)] with w_i = 10000^(-i / (D / 4)),
            zeros for the class token, and gets no gradient during pretraining. Needs a ViT with a `pos_embed`
            covering the patch grid.
        freeze_backbone (`bool`, defaults to `False`):
            Only for [`MoCoForImageClassification`]: freeze the backbone and keep it in eval mode
            (linear evaluation protocol).
        initializer_range (`float`, defaults to 0.01):
            Standard deviation of the classifier's initial weights (the official linear evaluation uses 0.01).

    transformers' common keywords apply as well: `output_hidden_states`, `output_attentions` and `return_dict` (the
    forward's defaults), and `gradient_checkpointing=True`, which the model consumes at construction to enable
    gradient checkpointing of its query encoder (it is not saved; after `from_pretrained`, call
    `model.gradient_checkpointing_enable()`).
    """

    model_type = "moco"
    _auto_class = "AutoConfig"  # save_pretrained copies this file (and backbones.py) and maps it in config.json

    backbone: str = "resnet50"
    backbone_kwargs: dict[str, Any] | None = None
    embed_dim: int = 128
    queue_size: int = 65536
    momentum: float = 0.999
    tau: float = 0.2
    mlp_head: bool = True
    mlp_hidden_dim: int | None = None
    mlp_layers: int = 2
    mlp_bn: bool = False
    predictor_hidden_dim: int = 0
    predictor_last_bn: bool = False
    shuffle_bn: bool = True
    bn_splits: int = 1
    symmetric: bool = False
    freeze_patch_embed: bool = False
    sincos_pos_embed: bool = False
    freeze_backbone: bool = False
    initializer_range: float = 0.01

    @classmethod
    def v3(cls, backbone: str = "vit_small_patch16_224", **overrides) -> "MoCoConfig":
        """MoCo v3's settings for `backbone` (Chen, Xie and He, 2021, and its released models): no queue, the
        symmetrised loss, 256-d embeddings, 4096-wide heads with BatchNorm and a prediction head, m 0.99. A Vision
        Transformer gets the 3-layer projection head, a BatchNorm after the predictor, the frozen random patch
        projection and fixed sin-cos position embeddings, tau 0.2; other backbones (ResNet-50) the 2-layer
        projection head and tau 1.0. The published ViT-Small has 12 attention heads where timm's
        `vit_small_patch16_224` has 6: pass `backbone_kwargs={"num_heads": 12}` for it. `overrides` replace any
        value."""
        import timm

        vit = False
        if isinstance(backbone, str) and timm.is_model(backbone):
            with torch.device("meta"):
                built = timm.create_model(backbone, pretrained=False, num_classes=0,
                                          **overrides.get("backbone_kwargs", {}))
            vit = isinstance(built, timm.models.VisionTransformer)
        settings = dict(
            backbone=backbone, queue_size=0, symmetric=True, embed_dim=256, mlp_head=True, mlp_hidden_dim=4096,
            mlp_bn=True, predictor_hidden_dim=4096, momentum=0.99, shuffle_bn=False, mlp_layers=3 if vit else 2,
            predictor_last_bn=vit, freeze_patch_embed=vit, sincos_pos_embed=vit, tau=0.2 if vit else 1.0,
        )
        return cls(**{**settings, **overrides})

    @property
    def moco_version(self) -> str:
        """"v3" without a queue, else "v2" with an MLP head, "v1" with a linear one (for model cards and logs)."""
        if self.queue_size == 0:
            return "v3"
        return "v2" if self.mlp_head else "v1"

    def __post_init__(self, **kwargs):
        if self.backbone_kwargs is None:
            self.backbone_kwargs = {}
        self._check()
        super().__post_init__(**kwargs)

    def _check(self) -> None:
        import timm

        if not isinstance(self.backbone, str) or not timm.is_model(self.backbone):
            close = timm.list_models(f"*{self.backbone}*")[:5] if isinstance(self.backbone, str) else []
            hint = f" Close matches: {', '.join(close)}." if close else ""
            raise ValueError(
                f"backbone={self.backbone!r} is not a timm architecture; use a name from timm.list_models(), "
                f"e.g. 'resnet50', 'vit_small_patch16_224', 'convnext_tiny'.{hint}"
            )
        if not isinstance(self.backbone_kwargs, dict):
            raise ValueError(f"backbone_kwargs must be a dict of timm.create_model arguments, got {self.backbone_kwargs!r}")
        if "num_classes" in self.backbone_kwargs or "pretrained" in self.backbone_kwargs:
            raise ValueError(
                "backbone_kwargs must not set num_classes or pretrained: the backbone is always created "
                "without a classifier and initialised by MoCo (or loaded from a checkpoint)."
            )
        _positive_int("embed_dim", self.embed_dim)
        _non_negative_int("queue_size", self.queue_size, "(0: MoCo v3's negatives from the batch, no queue)")
        _positive_int("bn_splits", self.bn_splits)
        if self.mlp_hidden_dim is not None:
            _positive_int("mlp_hidden_dim", self.mlp_hidden_dim)
        _positive_int("mlp_layers", self.mlp_layers)
        _non_negative_int("predictor_hidden_dim", self.predictor_hidden_dim, "(0: no prediction head)")
        if not self.mlp_head and (self.mlp_layers != 2 or self.mlp_bn):
            raise ValueError(
                "mlp_layers and mlp_bn shape the MLP head: set mlp_head=True, or leave them at 2 and False for v1's "
                "linear head"
            )
        if self.mlp_head and self.mlp_layers < 2:
            raise ValueError(f"an MLP head has at least 2 layers (v2: 2, v3 ViT: 3), got mlp_layers={self.mlp_layers}; "
                             "use mlp_head=False for a single linear layer")
        if self.predictor_last_bn and not self.predictor_hidden_dim:
            raise ValueError("predictor_last_bn needs a prediction head: set predictor_hidden_dim > 0 (v3: 4096)")
        if self.queue_size == 0 and self.bn_splits > 1:
            raise ValueError(
                f"bn_splits={self.bn_splits} with queue_size=0: MoCo v3 normalises over the whole batch (BatchNorm "
                "synchronised across processes), so split BatchNorm does not apply; use bn_splits=1"
            )
        if not isinstance(self.momentum, (int, float)) or not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] (the paper uses 0.999), got {self.momentum!r}")
        if not isinstance(self.tau, (int, float)) or not self.tau > 0:
            raise ValueError(f"tau (softmax temperature) must be > 0 (v1: 0.07, v2: 0.2), got {self.tau!r}")


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _non_negative_int(name: str, value, meaning: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0 {meaning}, got {value!r}")


__all__ = ["MoCoConfig"]

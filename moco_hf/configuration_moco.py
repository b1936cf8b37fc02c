"""MoCo configuration.

Defaults follow MoCo v2 (Chen et al., 2020, "Improved Baselines with Momentum Contrastive
Learning"): a 2-layer MLP projection head and a softmax temperature of 0.2, on top of the
MoCo v1 settings (He et al., 2019): 128-d embeddings, a queue of 65,536 keys and key-encoder
momentum 0.999.
"""

from typing import Any

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
            K, the number of negative keys kept in the queue.
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
            the two losses are added and both key batches are enqueued.
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
    shuffle_bn: bool = True
    bn_splits: int = 1
    symmetric: bool = False
    freeze_backbone: bool = False
    initializer_range: float = 0.01

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
        _positive_int("queue_size", self.queue_size)
        _positive_int("bn_splits", self.bn_splits)
        if self.mlp_hidden_dim is not None:
            _positive_int("mlp_hidden_dim", self.mlp_hidden_dim)
        if not isinstance(self.momentum, (int, float)) or not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] (the paper uses 0.999), got {self.momentum!r}")
        if not isinstance(self.tau, (int, float)) or not self.tau > 0:
            raise ValueError(f"tau (softmax temperature) must be > 0 (v1: 0.07, v2: 0.2), got {self.tau!r}")


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


__all__ = ["MoCoConfig"]

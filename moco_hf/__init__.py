"""moco_hf: Momentum Contrast (MoCo v1/v2/v3) as a transformers model over any timm backbone."""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from .configuration_moco import MoCoConfig
from .modeling_moco import (
    MoCoForImageClassification,
    MoCoModel,
    MoCoModelOutput,
    MoCoPreTrainedModel,
    ctr_loss,
    enqueue,
    in_batch_labels,
    in_batch_logits,
    info_nce_logits,
    info_nce_loss,
    momentum_update,
)

__version__ = "0.1.0"

AutoConfig.register("moco", MoCoConfig, exist_ok=True)
AutoModel.register(MoCoConfig, MoCoModel, exist_ok=True)
AutoModelForImageClassification.register(MoCoConfig, MoCoForImageClassification, exist_ok=True)

# save_pretrained of either model class writes the code files and the complete auto_map (the classes carry their
# `_auto_class`; modeling_moco.AUTO_MAP), so trust_remote_code loading works without moco_hf.

__all__ = [
    "MoCoConfig",
    "MoCoModel",
    "MoCoModelOutput",
    "MoCoPreTrainedModel",
    "MoCoForImageClassification",
    "ctr_loss",
    "enqueue",
    "in_batch_labels",
    "in_batch_logits",
    "info_nce_logits",
    "info_nce_loss",
    "momentum_update",
]

"""Evaluation of learned features: the weighted kNN monitor (official CIFAR demo: k=200, t=0.1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, loader, device, channels_last: bool = False,
                     autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised pooled features (N x D, fp32, on CPU) and labels (N) for every batch of `loader`."""
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            pooled = backbone(images)  # N x D (timm model without classifier)
        features.append(F.normalize(pooled.float(), dim=1).cpu())
        labels.append(torch.as_tensor(targets).cpu())
    backbone.train(was_training)
    if not features:
        raise ValueError("no images to extract features from (empty or fully corrupt split)")
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def knn_predict(query: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
                k: int = 200, t: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Weighted kNN class predictions for `query` (B x D) against `bank` (N x D), both L2-normalised.

    Each of the k most similar bank features votes for its class with weight exp(similarity / t)
    (Wu et al. 2018, as in the official MoCo CIFAR demo).
    """
    k = min(k, bank.shape[0])
    predictions = []
    for start in range(0, query.shape[0], chunk):
        sim = query[start:start + chunk] @ bank.T  # B x N
        weights, indices = sim.topk(k, dim=1)  # B x k
        votes = torch.zeros(sim.shape[0], num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, bank_labels[indices], (weights / t).exp())  # B x C
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_accuracy(train_features, train_labels, test_features, test_labels, k: int = 200, t: float = 0.1) -> float:
    """Top-1 accuracy (%) of the weighted kNN classifier."""
    num_classes = int(max(train_labels.max(), test_labels.max()).item()) + 1
    predictions = knn_predict(test_features, train_features, train_labels, num_classes, k=k, t=t)
    return 100.0 * (predictions == test_labels).float().mean().item()

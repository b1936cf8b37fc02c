"""Is the representation any good, and better than what one had? Frozen features are extracted once, then measured
three ways, each next to the same protocol on two baselines: the backbone at its random initialisation (what
pretraining started from) and the raw pixels (the eval-size images, flattened: what one has without a network).

- kNN: weighted k nearest neighbours on L2-normalised features (Wu et al. 2018; the official MoCo CIFAR demo,
  k 200, t 0.1). `auto_knn_k` picks k for the bank: the paper's 200, or a fifth of the smallest class when that is
  fewer (with more neighbours than a class has images, the vote is bound to hear other classes).
- Linear probe: multinomial logistic regression on the frozen features, fitted to convergence with L-BFGS, its L2
  penalty chosen on a held-out fifth of the training split from a grid, then refitted on the whole split. Seconds
  where the features fit in memory (the kNN bank does by construction).
- Label efficiency: the probe trained on 1 %, 10 % and 100 % of the training labels (class-balanced subsets).

The paper's own linear evaluation (SGD, lr 30, 100 epochs, augmentation) is `linear_eval.py --protocol sgd`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PAPER_K = 200  # the official CIFAR demo's k
L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # penalty on the mean cross-entropy: weak (1e-5) .. strong (0.1)
LABEL_FRACTIONS = (0.01, 0.1, 1.0)
KINDS = ("learned", "random_init", "pixels")  # the representation and its two baselines


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, loader, device, channels_last: bool = False,
                     autocast_dtype: torch.dtype | None = None, pixels: bool = False):
    """L2-normalised pooled features (N x D, fp32, on the CPU) and labels (N) of every (images, labels) batch of
    `loader`; with `pixels`, also the images themselves flattened and L2-normalised (N x 3HW), from the same pass.
    The backbone runs in eval mode (its mode is restored)."""
    was_training = backbone.training
    backbone.eval()
    features, labels, flat = [], [], []
    for images, targets in loader:
        if images.shape[0] == 0:
            continue
        if pixels:
            flat.append(F.normalize(images.float().flatten(1), dim=1).cpu())
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
    if pixels:
        return torch.cat(features), torch.cat(labels), torch.cat(flat)
    return torch.cat(features), torch.cat(labels)


@dataclass
class FeatureSet:
    """Features of a bank (training) split and an evaluation split, one row per image (fp32, on the CPU)."""

    train: torch.Tensor  # N x D
    train_labels: torch.Tensor  # N
    test: torch.Tensor  # M x D
    test_labels: torch.Tensor  # M

    @property
    def num_classes(self) -> int:
        return int(max(self.train_labels.max(), self.test_labels.max()).item()) + 1


def auto_knn_k(train_labels: torch.Tensor, largest: int = PAPER_K) -> int:
    """k for a bank with these labels: `largest` (the paper's 200), or a fifth of the smallest class (at least 1)
    when that is fewer. CIFAR-10 (5,000 images a class) and ImageNet (about 1,300) keep 200; the embedded digits
    (about 140 a class in the bank) get 28."""
    counts = torch.bincount(train_labels[train_labels >= 0])
    smallest = int(counts[counts > 0].min()) if counts.numel() else 1
    return max(1, min(largest, smallest // 5))


@torch.no_grad()
def knn_predict(query: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
                k: int = PAPER_K, t: float = 0.1, chunk: int = 1024) -> torch.Tensor:
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
        votes.scatter_add_(1, bank_labels[indices].clamp(min=0), (weights / t).exp())  # B x C
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_accuracy(train_features, train_labels, test_features, test_labels, k: int = PAPER_K, t: float = 0.1) -> float:
    """Top-1 accuracy (%) of the weighted kNN classifier (a test label the bank lacks, -1, is never right)."""
    num_classes = int(max(train_labels.max(), test_labels.max()).item()) + 1
    predictions = knn_predict(test_features, train_features, train_labels, num_classes, k=k, t=t)
    return 100.0 * (predictions == test_labels).float().mean().item()


# ---------------------------------------------------------------------------------------------------------
# Linear probe: logistic regression with L-BFGS
# ---------------------------------------------------------------------------------------------------------


def _prepare(train: torch.Tensor, *others: torch.Tensor, kept_variance: float = 0.9999) -> list[torch.Tensor]:
    """The rows as the probe sees them: centred on the training rows; where there are more dimensions than half the
    rows (raw pixels), expressed in the training rows' principal components that hold `kept_variance` of their
    variance (32 px digits upscaled from 8 x 8: about a hundred of 3,072 dimensions; what is dropped is 1e-4 of the
    variance, the PNG's 8-bit rounding); then each dimension scaled to unit variance (L-BFGS then converges in far
    fewer steps)."""
    mean = train.mean(0)
    rows = [x - mean for x in (train, *others)]
    n, d = rows[0].shape
    if d > n // 2:
        # principal directions from the N x N Gram matrix (N^2 D operations, not an SVD of N x D): its
        # eigenvectors U with eigenvalues s^2 give the orthonormal directions X^T U / s
        eigenvalues, vectors = torch.linalg.eigh(rows[0] @ rows[0].T)  # ascending
        eigenvalues, vectors = eigenvalues.flip(0).clamp(min=0), vectors.flip(1)
        share = eigenvalues.cumsum(0) / eigenvalues.sum()
        r = int((share < kept_variance).sum()) + 1
        basis = (rows[0].T @ vectors[:, :r]) / eigenvalues[:r].sqrt()  # D x r, orthonormal columns
        rows = [x @ basis for x in rows]
    std = rows[0].std(0)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    return [x / std for x in rows]


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, max_iter: int = 200,
                 start: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight D x C, bias C) minimising mean cross-entropy + l2 / 2 * |weight|^2 with L-BFGS (strong Wolfe line
    search), from zero or from `start`. float64 where the problem is small (the optimum, not the optimiser's
    rounding, decides the accuracy), float32 beyond 250,000 feature values (the time goes into the matrix products)."""
    dtype = torch.float64 if x.numel() <= 250_000 else torch.float32
    x = x.to(dtype)
    threads = torch.get_num_threads()
    if x.numel() <= 1_000_000:  # small products: one thread, without the threads' synchronisation at every op
        torch.set_num_threads(1)
    weight = (start[0].clone() if start else torch.zeros(x.shape[1], num_classes)).to(dtype).requires_grad_()
    bias = (start[1].clone() if start else torch.zeros(num_classes)).to(dtype).requires_grad_()
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-6, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + 0.5 * l2 * weight.square().sum()
        loss.backward()
        return loss

    try:
        with torch.enable_grad():
            optimizer.step(closure)
    finally:
        torch.set_num_threads(threads)
    return weight.detach(), bias.detach()


def _accuracy(weight, bias, x, y) -> float:
    return 100.0 * ((x.to(weight.dtype) @ weight + bias).argmax(1) == y).double().mean().item()


def _holdout(labels: torch.Tensor, fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, validation) indices: `fraction` of every class held out (at least one image where a class has two)."""
    fit, held = [], []
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n = int(round(fraction * len(members))) if len(members) > 1 else 0
        n = max(n, 1) if len(members) > 1 else 0
        held.append(members[:n])
        fit.append(members[n:])
    return torch.cat(fit), torch.cat(held)


def logistic_probe(features: FeatureSet, l2_grid=L2_GRID, holdout: float = 0.2, seed: int = 0,
                   train_index: torch.Tensor | None = None) -> tuple[float, float]:
    """(top-1 % on the test rows, the chosen L2 penalty) of a logistic regression on the training rows (or the
    `train_index` subset of them): the penalty with the best accuracy on a held-out `holdout` of the training rows
    (ties: the larger penalty), then refitted on all of them."""
    x, y = features.train, features.train_labels
    if train_index is not None:
        x, y = x[train_index], y[train_index]
    keep = y >= 0
    x, y = x[keep], y[keep]
    x, test = _prepare(x, features.test)
    classes = features.num_classes
    generator = torch.Generator().manual_seed(seed)
    fit, held = _holdout(y, holdout, generator)
    if len(held) == 0 or len(fit) == 0:
        best = l2_grid[len(l2_grid) // 2]
    else:
        scores, start = [], None
        for l2 in sorted(l2_grid, reverse=True):  # strong penalty first: each fit starts from the previous one
            start = fit_logistic(x[fit], y[fit], classes, l2, max_iter=50, start=start)
            scores.append((_accuracy(*start, x[held], y[held]), l2))
        best = max(scores)[1]
    weight, bias = fit_logistic(x, y, classes, best)
    return _accuracy(weight, bias, test, features.test_labels), best


def label_subset(labels: torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    """Indices of `fraction` of the labelled rows, class by class (at least one image of every class)."""
    if fraction >= 1.0:
        return (labels >= 0).nonzero().flatten()
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in labels[labels >= 0].unique():
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        chosen.append(members[:max(1, int(math.floor(fraction * len(members))))])
    return torch.cat(chosen).sort().values


# ---------------------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------------------


def compare(sets: dict[str, FeatureSet], k: int | None = None, t: float = 0.1,
            fractions=LABEL_FRACTIONS, seed: int = 0) -> dict:
    """kNN and linear-probe top-1 (%) of every feature set (keys of `KINDS`: learned, random_init, pixels), and the
    probe at each label fraction. k: `auto_knn_k` of the bank when None."""
    first = next(iter(sets.values()))
    k = k or auto_knn_k(first.train_labels)
    results = {"k": k, "t": t, "knn": {}, "probe": {}, "probe_l2": {}, "label_efficiency": {}}
    for kind, features in sets.items():
        results["knn"][kind] = knn_accuracy(features.train, features.train_labels, features.test,
                                            features.test_labels, k=k, t=t)
        for fraction in fractions:
            subset = label_subset(features.train_labels, fraction, seed)
            acc, l2 = logistic_probe(features, seed=seed, train_index=subset)
            results["label_efficiency"].setdefault(f"{fraction:.0%}", {})[kind] = acc
            if fraction >= 1.0:
                results["probe"][kind], results["probe_l2"][kind] = acc, l2
    return results


def format_results(results: dict, dataset: str, bank: str, split: str) -> str:
    """The comparison as a plain-text table for the log."""
    kinds = [k for k in KINDS if k in results["knn"]]
    names = {"learned": "learned", "random_init": "random init", "pixels": "raw pixels"}
    header = f"{'top-1 (%) on ' + split:<34}" + "".join(f"{names[k]:>13}" for k in kinds)
    rows = [f"{dataset}: bank {bank}, evaluated on {split}", header,
            f"{'kNN (k=%d, t=%g)' % (results['k'], results['t']):<34}"
            + "".join(f"{results['knn'][k]:>13.2f}" for k in kinds),
            f"{'linear probe, 100 % of the labels':<34}" + "".join(f"{results['probe'][k]:>13.2f}" for k in kinds)]
    for fraction, values in results["label_efficiency"].items():
        if fraction != "100%":
            rows.append(f"{'linear probe, ' + fraction.replace('%', ' %') + ' of the labels':<34}"
                        + "".join(f"{values[k]:>13.2f}" for k in kinds))
    return "\n".join(rows)


__all__ = ["KINDS", "FeatureSet", "auto_knn_k", "compare", "extract_features", "fit_logistic", "format_results",
           "knn_accuracy", "knn_predict", "label_subset", "logistic_probe"]

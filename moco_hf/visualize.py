"""Pictures of what a representation learned, written as PNGs (and logged to TensorBoard by pretraining):

- `nearest_neighbours.png`: query images from the held-out split, each with its 8 nearest training images by cosine
  similarity of the features; a neighbour of another class is framed in red.
- `feature_map.png`: the held-out features in 2-D, coloured by class: UMAP where `umap-learn` is installed, else
  t-SNE (scikit-learn), else PCA.

On any saved model (a pretraining run's `final/`, a staged or downloaded folder), on the embedded digits or a
dataset of your own:

    python -m moco_hf.visualize --model_dir outputs/moco-digits/final
    python -m moco_hf.visualize --model_dir outputs/moco-v2-r18-cifar10/final --dataset_name uoft-cs/cifar10 \\
        --output_dir pictures/
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

NEIGHBOURS = 8
QUERIES = 8
MAP_POINTS = 2000  # held-out images on the feature map at most
WRONG = (0.85, 0.1, 0.1)  # frame of a neighbour of another class


def _as_rgb(images: torch.Tensor, mean, std) -> np.ndarray:
    """Normalised N x 3 x H x W images back to N x H x W x 3 values in [0, 1]."""
    mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (images.float() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def nearest_neighbour_grid(queries: torch.Tensor, query_labels, neighbours: torch.Tensor, neighbour_labels,
                           path: str, mean, std, class_names=None, what: str = "learned features"):
    """A grid: one row per query (first column) and its neighbours (next columns, nearest first); neighbours of
    another class than the query's framed in red. `neighbours`: Q x K x 3 x H x W. Returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q, k = neighbours.shape[:2]
    name = (lambda c: str(class_names[c])) if class_names else str
    rows_q, rows_n = _as_rgb(queries, mean, std), _as_rgb(neighbours.flatten(0, 1), mean, std).reshape(
        q, k, *neighbours.shape[-2:], 3)
    fig, axes = plt.subplots(q, k + 1, figsize=(1.1 * (k + 1), 1.2 * q + 0.6), squeeze=False)
    for i in range(q):
        axes[i, 0].imshow(rows_q[i])
        axes[i, 0].set_title(f"query: {name(int(query_labels[i]))}", fontsize=7)
        for j in range(k):
            ax = axes[i, j + 1]
            ax.imshow(rows_n[i, j])
            wrong = int(neighbour_labels[i][j]) != int(query_labels[i])
            ax.set_title(name(int(neighbour_labels[i][j])), fontsize=7, color=WRONG if wrong else "black")
            for spine in ax.spines.values():
                spine.set_visible(wrong)
                spine.set_color(WRONG)
                spine.set_linewidth(2.5)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"held-out queries and their {k} nearest training images (cosine similarity of the {what}); "
                 f"red: another class", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def embed_2d(features: np.ndarray, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """(N x 2 coordinates, the method used): UMAP if installed, else t-SNE, else PCA (`method` forces one)."""
    if method in ("auto", "umap"):
        try:
            import umap

            return umap.UMAP(n_components=2, random_state=seed).fit_transform(features), "UMAP"
        except ImportError:
            if method == "umap":
                raise ValueError("method umap needs the umap-learn package: pip install umap-learn") from None
    if method in ("auto", "tsne"):
        try:
            from sklearn.manifold import TSNE

            perplexity = float(min(30, max(2, (len(features) - 1) // 3)))
            # exact gradients are faster than Barnes-Hut's tree below about a thousand points (3 s for 360 here)
            method_ = "exact" if len(features) <= 1000 else "barnes_hut"
            return TSNE(n_components=2, init="pca", random_state=seed, perplexity=perplexity, method=method_,
                        max_iter=500).fit_transform(features), "t-SNE"
        except ImportError:
            if method == "tsne":
                raise
    centred = features - features.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T, "PCA"


def feature_map(features: torch.Tensor, labels: torch.Tensor, path: str, class_names=None,
                what: str = "learned features", split: str = "held-out", method: str = "auto"):
    """A scatter of the 2-D embedding of `features`, coloured by class. Returns (figure, method used)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(labels) > MAP_POINTS:  # a seeded sample: the map stays a few seconds for any split
        keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:MAP_POINTS]
        features, labels = features[keep], labels[keep]
    points, used = embed_2d(features.float().numpy(), method)
    labels = labels.numpy()
    fig, ax = plt.subplots(figsize=(6, 5))
    cmap = plt.get_cmap("tab10" if labels.max() < 10 else "tab20")
    for c in np.unique(labels):
        mask = labels == c
        ax.scatter(points[mask, 0], points[mask, 1], s=8, color=cmap(int(c) % cmap.N),
                   label=str(class_names[c]) if class_names else str(int(c)))
    ax.set(xlabel=f"{used} 1 (no unit)", ylabel=f"{used} 2 (no unit)",
           title=f"{used} of the {what} of {len(labels)} {split} images, coloured by class")
    ax.title.set_fontsize(9)
    if len(np.unique(labels)) <= 20:
        ax.legend(fontsize=7, markerscale=1.5, loc="best", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig, used


@torch.no_grad()
def images_at(loader, indices: list[int]) -> dict[int, torch.Tensor]:
    """The images of `loader` (batches of (images, labels), a fixed order) at the given positions."""
    wanted, found, seen = set(indices), {}, 0
    for images, _ in loader:
        for i in range(images.shape[0]):
            if seen + i in wanted:
                found[seen + i] = images[i]
        seen += images.shape[0]
        if len(found) == len(wanted):
            break
    return found


def draw(train_features, train_labels, test_features, test_labels, bank_loader, test_loader, out_dir: str,
         mean, std, class_names=None, what: str = "learned features", seed: int = 0) -> dict[str, str]:
    """Both pictures of L2-normalised features into `out_dir`; returns {name: path}. The loaders give the images
    in the order the features were extracted."""
    os.makedirs(out_dir, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    queries = torch.randperm(len(test_labels), generator=generator)[:QUERIES].tolist()
    sim = test_features[queries] @ train_features.T  # Q x N
    nearest = sim.topk(min(NEIGHBOURS, train_features.shape[0]), dim=1).indices  # Q x K
    bank_images = images_at(bank_loader, sorted(set(nearest.flatten().tolist())))
    test_images = images_at(test_loader, queries)
    grid = os.path.join(out_dir, "nearest_neighbours.png")
    nearest_neighbour_grid(torch.stack([test_images[i] for i in queries]), test_labels[queries],
                           torch.stack([torch.stack([bank_images[j] for j in row]) for row in nearest.tolist()]),
                           train_labels[nearest], grid, mean, std, class_names, what)
    scatter = os.path.join(out_dir, "feature_map.png")
    feature_map(test_features, test_labels, scatter, class_names, what)
    return {"nearest_neighbours": grid, "feature_map": scatter}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moco_hf.visualize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True, help="MoCo or timm-format folder (save_pretrained)")
    parser.add_argument("--output_dir", default=None, help="where the PNGs go (default: --model_dir)")
    parser.add_argument("--dataset_name", default=None, help="Hub dataset (default: the embedded digits)")
    parser.add_argument("--dataset_config", default=None)
    parser.add_argument("--train_dir", default=None, help="local image folder, parquet or webdataset shards")
    parser.add_argument("--train_split", default="train")
    parser.add_argument("--eval_split", default="test")
    parser.add_argument("--max_train_samples", type=int, default=10_000, help="training images searched")
    parser.add_argument("--max_eval_samples", type=int, default=2_000, help="held-out images mapped")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = parser.parse_args(argv)
    from .cli import run_command

    return run_command("moco_hf.visualize", lambda: _run(args), debug=args.debug)


def _run(args) -> None:
    from .data.labeled import ClassificationCollator, load_labeled_split, make_loader
    from .data.transforms import EvalTransform
    from .evaluation import load_backbone
    from .representation import extract_features

    backbone, preprocessing = load_backbone(args.model_dir)
    common = dict(dataset_name=args.dataset_name, dataset_config=args.dataset_config, train_dir=args.train_dir,
                  demo_image_size=preprocessing.image_size)
    train = load_labeled_split(args.train_split, max_samples=args.max_train_samples, **common)
    test = load_labeled_split(args.eval_split, label_names=train.label_names, max_samples=args.max_eval_samples,
                              **common)
    transform = EvalTransform(preprocessing.image_size, preprocessing.mean, preprocessing.std,
                              crop_pct=preprocessing.crop_pct, interpolation=preprocessing.interpolation)
    loaders = [make_loader(split.with_transform(transform), 256, _Pairs(ClassificationCollator()))
               for split in (train, test)]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bank, bank_labels = extract_features(backbone.to(device), loaders[0], device)
    query, query_labels = extract_features(backbone, loaders[1], device)
    paths = draw(bank, bank_labels, query, query_labels, loaders[0], loaders[1], args.output_dir or args.model_dir,
                 preprocessing.mean, preprocessing.std, train.label_names)
    for path in paths.values():
        print(f"wrote {path}")


class _Pairs:
    """A `ClassificationCollator` whose batches are (images, labels) pairs, as the kNN loaders give them."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        batch = self.collator(examples)
        return (batch["pixel_values"], batch["labels"]) if batch is not None else (torch.empty(0, 3, 1, 1),
                                                                                    torch.empty(0, dtype=torch.long))


if __name__ == "__main__":
    sys.exit(main())

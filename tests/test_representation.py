"""moco_hf.representation and moco_hf.visualize: the kNN rule, the L-BFGS linear probe against scikit-learn's
solution of the same problem, class-balanced label subsets, and the pictures; finetune.py's label fractions."""

import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from moco_hf import representation as R  # noqa: E402
from moco_hf import visualize  # noqa: E402


def blobs(n_per_class=40, classes=4, dim=6, seed=0, spread=1.5) -> R.FeatureSet:
    """Gaussian clusters: a split of 3/4 train, 1/4 test."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 3
    x = torch.cat([centres[c] + spread * torch.randn(n_per_class, dim, generator=g) for c in range(classes)])
    y = torch.arange(classes).repeat_interleave(n_per_class)
    test = torch.arange(len(y)) % 4 == 0
    return R.FeatureSet(x[~test], y[~test], x[test], y[test])


def test_auto_knn_k_is_the_papers_200_or_a_fifth_of_the_smallest_class():
    assert R.auto_knn_k(torch.arange(10).repeat(5000)) == 200  # CIFAR-10's bank
    assert R.auto_knn_k(torch.arange(10).repeat_interleave(torch.tensor([140] * 9 + [131]))) == 26  # the digits
    assert R.auto_knn_k(torch.tensor([0, 0, 1])) == 1
    assert R.auto_knn_k(torch.tensor([0] * 50 + [1] * 50 + [-1] * 7)) == 10  # unlabelled rows (-1) do not count


def test_fit_logistic_reaches_the_optimum_scikit_learn_finds():
    """The same convex problem (mean cross-entropy + l2/2 |W|^2, unpenalised bias) solved by scikit-learn's lbfgs
    to a gradient of 1e-10: ours stops at a gradient below 1e-6, and the objective is l2-strongly convex, so its
    coefficients are within 1e-6 / l2 = 1e-4 of the optimum, below 1e-3 of their size (order 1)."""
    from sklearn.linear_model import LogisticRegression

    data = blobs()
    x, y, l2 = data.train.double(), data.train_labels, 1e-2
    weight, bias = R.fit_logistic(x, y, 4, l2)
    reference = LogisticRegression(C=1.0 / (l2 * len(y)), tol=1e-10, max_iter=10_000).fit(x.numpy(), y.numpy())
    # scikit-learn's multinomial coefficients are defined up to a constant per feature; so are ours: compare centred
    ours = (weight.T - weight.T.mean(0)).numpy()
    theirs = reference.coef_ - reference.coef_.mean(0)
    assert np.abs(ours - theirs).max() < 1e-3 * np.abs(theirs).max()


def test_the_probe_learns_and_keeps_the_directions_that_hold_the_variance():
    data = blobs(spread=1.0)
    acc, l2 = R.logistic_probe(data)
    assert acc > 90.0 and l2 in R.L2_GRID
    chance = R.FeatureSet(torch.randn_like(data.train), data.train_labels, torch.randn_like(data.test),
                          data.test_labels)
    assert R.logistic_probe(chance)[0] < 60.0  # noise features are not separable: the probe cannot fake it

    # 22 rows in 40 dimensions that span 6 of them, plus noise of 1e-4 of their scale in all 40: the probe keeps
    # the 6 principal directions that hold 99.99 % of the variance (the noise holds 40 x 1e-8 of it), losing nothing
    # of the rows but the noise
    small = blobs(n_per_class=10, classes=3, spread=1.0)
    generator = torch.Generator().manual_seed(1)
    embed = torch.linalg.qr(torch.randn(40, 6, generator=generator, dtype=torch.float64))[0].T  # 6 x 40, orthonormal
    train = small.train.double() @ embed + 1e-4 * torch.randn(len(small.train), 40, generator=generator,
                                                               dtype=torch.float64)
    prepared = R._prepare(train, small.test.double() @ embed)
    assert prepared[0].shape == (len(small.train), 6) and prepared[1].shape == (len(small.test), 6)
    wide = R.FeatureSet(train, small.train_labels, small.test.double() @ embed, small.test_labels)
    narrow = R.FeatureSet(small.train.double(), small.train_labels, small.test.double(), small.test_labels)
    assert abs(R.logistic_probe(wide)[0] - R.logistic_probe(narrow)[0]) <= 100 / len(small.test)  # one image at most


def test_label_subsets_keep_every_class():
    labels = torch.arange(10).repeat_interleave(50)
    one = R.label_subset(labels, 0.01)
    assert sorted(labels[one].tolist()) == list(range(10))  # at least one of every class
    ten = R.label_subset(labels, 0.1)
    assert torch.bincount(labels[ten]).tolist() == [5] * 10 and len(set(ten.tolist())) == 50
    assert len(R.label_subset(labels, 1.0)) == 500
    assert R.label_subset(labels, 0.1, seed=1).tolist() != ten.tolist()


def test_compare_reports_every_kind_and_fraction():
    good, noise = blobs(), blobs(seed=3)
    noise = R.FeatureSet(torch.randn_like(noise.train), good.train_labels, torch.randn_like(noise.test),
                         good.test_labels)
    results = R.compare({"learned": good, "random_init": noise})
    assert results["k"] == R.auto_knn_k(good.train_labels) == 6
    assert results["knn"]["learned"] > results["knn"]["random_init"]
    assert set(results["label_efficiency"]) == {"1%", "10%", "100%"}
    assert results["probe"]["learned"] == results["label_efficiency"]["100%"]["learned"]
    table = R.format_results(results, "blobs", "train", "test")
    assert "kNN (k=6, t=0.1)" in table and "learned" in table and "random init" in table


def test_pictures(tmp_path):
    """The grid frames the neighbours of another class; the map falls back to PCA and labels its axes."""
    data = blobs(n_per_class=12)
    images = torch.rand(len(data.train_labels), 3, 8, 8)
    test_images = torch.rand(len(data.test_labels), 3, 8, 8)
    bank = [(images[i:i + 10], data.train_labels[i:i + 10]) for i in range(0, len(images), 10)]
    test = [(test_images[i:i + 10], data.test_labels[i:i + 10]) for i in range(0, len(test_images), 10)]
    train_f, test_f = F.normalize(data.train, dim=1), F.normalize(data.test, dim=1)
    paths = visualize.draw(train_f, data.train_labels, test_f, data.test_labels, bank, test, str(tmp_path),
                           [0.5] * 3, [0.25] * 3, ["a", "b", "c", "d"])
    assert all(os.path.getsize(p) > 0 for p in paths.values())

    queries = test_images[:2]
    labels = torch.tensor([0, 1])
    neighbours = torch.rand(2, 3, 3, 8, 8)
    figure = visualize.nearest_neighbour_grid(queries, labels, neighbours, torch.tensor([[0, 1, 0], [1, 1, 0]]),
                                              str(tmp_path / "grid.png"), [0.5] * 3, [0.25] * 3)
    framed = [[ax.spines["left"].get_visible() for ax in row[1:]] for row in np.array(figure.axes).reshape(2, 4)]
    assert framed == [[False, True, False], [False, False, True]]
    fig, method = visualize.feature_map(test_f, data.test_labels, str(tmp_path / "map.png"), method="pca")
    assert method == "PCA" and fig.axes[0].get_xlabel() == "PCA 1 (no unit)" and "coloured by class" in \
        fig.axes[0].get_title()
    assert visualize.embed_2d(test_f.numpy(), "tsne")[1] == "t-SNE"


def test_finetune_label_fraction_and_from_scratch(tmp_path):
    """A class-balanced 10 % of the digits, the same steps as on all of them, from scratch: other weights."""
    import finetune
    from moco_hf import MoCoConfig, MoCoModel

    from moco_hf.data.labeled import load_labeled_split

    torch.manual_seed(0)
    MoCoModel(MoCoConfig(backbone="test_resnet", embed_dim=16, queue_size=64)).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "training_config.json").write_text('{"image_size": 32}')
    args = finetune.FinetuneArguments(model_dir=str(tmp_path / "m"), label_fraction=0.1, max_eval_samples=32)
    training_args = finetune.training_arguments(output_dir=str(tmp_path / "ft"), num_train_epochs=1,
                                                save_strategy="no", eval_strategy="no", disable_tqdm=True,
                                                per_device_train_batch_size=64)
    result = finetune.run(args, training_args)
    counts = torch.bincount(load_labeled_split("train").labels())  # the 1,437 train digits, about 144 a class
    assert result.metrics["finetune_train_images"] == int((counts // 10).sum())  # 10 % of each class
    assert result.trainer.state.global_step == 23  # as many steps as one epoch of all 1,437 images at batch 64
    pretrained = finetune.load_model(str(tmp_path / "m"), [str(i) for i in range(10)])
    scratch = finetune.load_model(str(tmp_path / "m"), [str(i) for i in range(10)], from_scratch=True, seed=1)
    first = next(iter(pretrained.get_backbone().state_dict()))
    assert not torch.equal(pretrained.get_backbone().state_dict()[first], scratch.get_backbone().state_dict()[first])
    with pytest.raises(ValueError, match="label_efficiency"):
        finetune.label_efficiency(finetune.FinetuneArguments(model_dir="m", label_efficiency="1%"), training_args)

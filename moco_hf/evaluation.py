"""Evaluation of a saved model: its backbone and preprocessing (`load_backbone`), the paper's linear classification
protocol, and the metrics record of a model folder. The fast comparisons (kNN, L-BFGS linear probe, label efficiency,
against raw pixels and the random-init backbone) are `representation.py`.

- the linear classification protocol of MoCo (official `main_lincls.py`): a linear classifier trained on the
  pooled features of the frozen backbone, kept in eval mode, with SGD lr 30, momentum 0.9, no weight decay,
  100 epochs, lr / 10 at epochs 60 and 80; RandomResizedCrop + flip for training, Resize 256 / CenterCrop 224 for
  evaluation: `run_linear_eval`, `linear_evaluation` (their config: `linear_eval.LinearEvalConfig`);
- `record_metrics` merges results into a model folder's metrics.json (read by the model card: `linear_top1`).

The preprocessing of a checkpoint comes from `preprocessing.py`, the labelled data from `data/labeled.py`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import torch
import torch.nn.functional as F

from .data.labeled import ClassificationCollator, LabeledSplit, load_labeled_split, make_loader
from .data.transforms import EvalTransform, TrainTransform
from .preprocessing import Preprocessing, is_timm_folder, preprocessing_for, read_model_config
from .representation import extract_features


def load_backbone(model_dir: str | os.PathLike):
    """(the timm backbone of a MoCo or timm-format folder, in eval mode; its `Preprocessing`)."""
    config = read_model_config(model_dir)
    preprocessing = preprocessing_for(model_dir)
    if is_timm_folder(config):
        import timm

        import moco_hf  # noqa: F401  (registers the small-image ResNets a timm-format folder may name)

        backbone = timm.create_model(f"local-dir:{os.fspath(model_dir)}", pretrained=True, num_classes=0)
        return backbone.eval(), preprocessing
    from .modeling_moco import MoCoForImageClassification, MoCoModel

    classifier = "MoCoForImageClassification" in (config.get("architectures") or [])
    model = (MoCoForImageClassification if classifier else MoCoModel).from_pretrained(model_dir)
    return model.get_backbone().eval(), preprocessing


# ---------------------------------------------------------------------------------------------------------
# Metrics records
# ---------------------------------------------------------------------------------------------------------


def record_metrics(model_dir: str | os.PathLike, metrics: dict) -> dict:
    """Merge `metrics` into model_dir/metrics.json (read by the model card) and return the merged record.

    Existing keys not in `metrics` are kept. Written to a temporary file then renamed, so an interrupted write never
    leaves a truncated metrics.json behind.
    """
    path = os.path.join(model_dir, "metrics.json")
    existing = {}
    if os.path.isfile(path):
        with open(path) as f:
            existing = json.load(f)
    existing.update(metrics)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(existing, f, indent=2)
    os.replace(tmp, path)
    return existing


# ---------------------------------------------------------------------------------------------------------
# Linear evaluation
# ---------------------------------------------------------------------------------------------------------


def linear_lr(epoch: int, base_lr: float, schedule: tuple[int, ...]) -> float:
    """Step schedule of the official linear classification: base_lr / 10 at every milestone epoch reached."""
    return base_lr * 0.1 ** sum(epoch >= milestone for milestone in schedule)


def backbone_snapshot(model) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer (BatchNorm statistics included) of the model's backbone."""
    return {name: t.detach().clone() for name, t in model.get_backbone().state_dict().items()}


def check_backbone_unchanged(model, snapshot: dict[str, torch.Tensor]) -> None:
    """Raise RuntimeError naming the backbone tensors that differ (even by one bit) from `snapshot`."""
    state = model.get_backbone().state_dict()
    moved = [name for name, ref in snapshot.items()
             if name not in state or not torch.equal(state[name].detach(), ref.to(state[name].device))]
    if moved or state.keys() != snapshot.keys():
        shown = ", ".join(moved[:5]) + (f" and {len(moved) - 5} more" if len(moved) > 5 else "")
        raise RuntimeError(f"the frozen backbone changed during linear evaluation: {shown or 'its set of tensors'}")


def load_linear_classifier(model_dir: str | os.PathLike, label_names: list[str], init_std: float = 0.01):
    """`MoCoForImageClassification` with the frozen, eval-mode query backbone of a MoCo folder and a fresh
    linear classifier, initialised as in the official code: weight ~ N(0, 0.01), bias 0."""
    from .modeling_moco import MoCoForImageClassification

    model = MoCoForImageClassification.from_pretrained(
        model_dir, num_labels=len(label_names), freeze_backbone=True, ignore_mismatched_sizes=True,
        id2label=dict(enumerate(label_names)), label2id={name: i for i, name in enumerate(label_names)},
    )
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, init_std)
        model.classifier.bias.zero_()
    return model


def _forward_backbone(model, pixel_values: torch.Tensor) -> torch.Tensor:
    backbone = model.get_backbone()
    return backbone.forward_head(backbone.forward_features(pixel_values), pre_logits=True)  # N x D


@torch.no_grad()
def pooled_features(model, loader, device, autocast_dtype: torch.dtype | None = None):
    """Pooled backbone features (N x D, fp32, not normalised, on CPU) and labels (N) of every batch of `loader`."""
    backbone = model.get_backbone()
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    for batch in loader:
        if batch is None:
            continue
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            features.append(_forward_backbone(model, batch["pixel_values"].to(device)).float().cpu())
        labels.append(batch["labels"])
    backbone.train(was_training)
    if not features:
        raise ValueError("no images to extract features from (empty or fully corrupt split)")
    return torch.cat(features), torch.cat(labels)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[int]:
    """Number of rows whose label is among the k highest logits, for each k (k capped at the number of classes)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # N x kmax
    hits = top == labels.view(-1, 1)
    return [int(hits[:, :k].any(dim=1).sum()) for k in ks]


def run_linear_eval(model, train: LabeledSplit, evaluation: LabeledSplit, preprocessing: Preprocessing,
                    cfg, device: torch.device | None = None, log=print) -> dict:
    """Train `model.classifier` on the frozen backbone's pooled features of `train`, evaluate on `evaluation`.

    `model` is a `MoCoForImageClassification` with `freeze_backbone=True` (its backbone gets no gradient and stays in
    eval mode). Its backbone's parameters and buffers are compared, bit for bit, with a copy taken at the start:
    RuntimeError if anything moved. Returns `linear_top1` (%), `linear_top5` (% , with >= 5 classes) and the run's
    settings, each key prefixed `linear_`.
    """
    if not model.config.freeze_backbone:
        raise ValueError("linear evaluation needs a frozen backbone: load the model with freeze_backbone=True")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    snapshot = backbone_snapshot(model)
    autocast_dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else None
    size, mean, std = preprocessing.image_size, preprocessing.mean, preprocessing.std

    # train and eval views resized alike, as the processor saved with the classifier says
    eval_transform = EvalTransform(size, mean, std, crop_pct=cfg.eval_crop_pct(preprocessing.crop_pct, sgd=True),
                                   interpolation=preprocessing.interpolation)
    collator = ClassificationCollator()
    pin = device.type == "cuda"
    eval_loader = make_loader(evaluation.with_transform(eval_transform), cfg.batch_size, collator, cfg.num_workers,
                              pin_memory=pin)
    head = model.classifier
    optimizer = torch.optim.SGD(head.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)

    if cfg.cached_features:
        start = time.perf_counter()
        loader = make_loader(train.with_transform(eval_transform), cfg.batch_size, collator, cfg.num_workers,
                             pin_memory=pin)
        train_x, train_y = pooled_features(model, loader, device, autocast_dtype)  # N x D, N
        log(f"cached {tuple(train_x.shape)} center-crop train features in {time.perf_counter() - start:.1f}s")

        def train_batches():
            for index in torch.randperm(len(train_y), generator=generator).split(cfg.batch_size):
                yield train_x[index].to(device), train_y[index].to(device)

        def logits_of(inputs):
            return head(inputs)
    else:
        train_transform = TrainTransform(size, mean, std, cfg.crop_min_scale or 0.08,
                                         flip_prob=0.5 if cfg.flip_prob is None else cfg.flip_prob,
                                         interpolation=preprocessing.interpolation)
        loader = make_loader(train.with_transform(train_transform), cfg.batch_size, collator, cfg.num_workers,
                             shuffle=True, seed=cfg.seed, pin_memory=pin)

        def train_batches():
            for batch in loader:
                if batch is not None:
                    yield batch["pixel_values"].to(device, non_blocking=True), batch["labels"].to(device)

        def logits_of(inputs):
            with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                                 enabled=autocast_dtype is not None):
                pooled = _forward_backbone(model, inputs)
            return head(pooled.float())

    for epoch in range(cfg.epochs):
        lr = linear_lr(epoch, cfg.lr, cfg.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()  # the classifier; MoCoForImageClassification keeps a frozen backbone in eval mode
        if model.get_backbone().training:
            raise RuntimeError("the frozen backbone is in train mode: its BatchNorm statistics would move")
        start, total, correct, loss_sum = time.perf_counter(), 0, 0, 0.0
        for inputs, labels in train_batches():
            logits = logits_of(inputs)  # N x num_labels
            loss = F.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += len(labels)
            loss_sum += loss.item() * len(labels)
            correct += int((logits.argmax(dim=1) == labels).sum())
        if total == 0:
            raise ValueError("the training split yields no decodable image")
        log(f"epoch {epoch + 1}/{cfg.epochs}: lr {lr:g}, loss {loss_sum / total:.4f}, "
            f"train top-1 {100 * correct / total:.2f}% ({time.perf_counter() - start:.1f}s)")

    model.eval()
    num_classes = head.out_features
    ks = (1, 5) if num_classes >= 5 else (1,)
    correct, total = [0] * len(ks), 0
    with torch.no_grad():
        if cfg.cached_features:
            eval_x, eval_y = pooled_features(model, eval_loader, device, autocast_dtype)
            batches = zip(eval_x.split(cfg.batch_size), eval_y.split(cfg.batch_size))
        else:
            batches = ((b["pixel_values"], b["labels"]) for b in eval_loader if b is not None)
        for inputs, labels in batches:
            logits = logits_of(inputs.to(device)).cpu()
            correct = [c + n for c, n in zip(correct, topk_correct(logits, labels, ks))]
            total += len(labels)
    if total == 0:
        raise ValueError("the evaluation split yields no decodable image")
    check_backbone_unchanged(model, snapshot)

    metrics = {"linear_top1": 100.0 * correct[0] / total}
    if len(ks) > 1:
        metrics["linear_top5"] = 100.0 * correct[1] / total
    metrics.update({
        "linear_epochs": cfg.epochs,
        "linear_lr": cfg.lr,
        "linear_batch_size": cfg.batch_size,
        "linear_image_size": size,
        "linear_protocol": f"SGD lr {cfg.lr:g}, {cfg.epochs} epochs, on "
                           + ("cached center-crop features" if cfg.cached_features else
                              f"RandomResizedCrop (scale {cfg.crop_min_scale or 0.08:g}-1)"
                              + (" + flip" if (0.5 if cfg.flip_prob is None else cfg.flip_prob) > 0 else "")),
        "linear_train_images": len(train),
        "linear_eval_images": total,
        "linear_skipped_images": collator.skipped,
    })
    return metrics


def _pairs(loader):
    """(images, labels) batches of a `make_loader` loader, its empty (all corrupt) batches left out."""
    return ((batch["pixel_values"], batch["labels"]) for batch in loader if batch is not None)


def run_probe(model, train: LabeledSplit, evaluation: LabeledSplit, preprocessing: Preprocessing, cfg,
              device: torch.device | None = None, log=print) -> dict:
    """The lbfgs protocol: center-crop features of the frozen backbone extracted once, a logistic regression fitted
    to convergence (`representation.logistic_probe`), and the same probe on the backbone at its random
    initialisation (seed `cfg.seed`) and on the raw pixels (where they fit in `cfg.probe_memory_gb`) as baselines.
    Returns `linear_top1` (%), `linear_top1_random_init`, `linear_top1_pixels` and the run's settings."""
    from .modeling_moco import MoCoForImageClassification
    from .representation import FeatureSet, logistic_probe

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    snapshot = backbone_snapshot(model)
    autocast_dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else None
    size = preprocessing.image_size
    transform = EvalTransform(size, preprocessing.mean, preprocessing.std,
                              crop_pct=cfg.eval_crop_pct(preprocessing.crop_pct, sgd=False),
                              interpolation=preprocessing.interpolation)
    collator = ClassificationCollator()
    loaders = [make_loader(split.with_transform(transform), cfg.batch_size, collator, cfg.num_workers,
                           pin_memory=device.type == "cuda") for split in (train, evaluation)]
    pixels = len(train) * 3 * size * size * 4 <= cfg.probe_memory_gb * 2**30
    start = time.perf_counter()

    def sets(backbone, with_pixels):
        bank = extract_features(backbone.to(device), _pairs(loaders[0]), device, autocast_dtype=autocast_dtype,
                                pixels=with_pixels)
        test = extract_features(backbone, _pairs(loaders[1]), device, autocast_dtype=autocast_dtype,
                                pixels=with_pixels)
        learned = FeatureSet(bank[0], bank[1], test[0], test[1])
        return (learned, FeatureSet(bank[2], bank[1], test[2], test[1])) if with_pixels else (learned,)

    learned, *raw = sets(model.get_backbone(), pixels)
    check_backbone_unchanged(model, snapshot)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        fresh = MoCoForImageClassification(model.config).get_backbone()
    random_init = sets(fresh, False)[0]
    log(f"features: {tuple(learned.train.shape)} train, {tuple(learned.test.shape)} eval "
        f"({time.perf_counter() - start:.1f}s)")
    metrics = {}
    for name, features in (("", learned), ("_random_init", random_init), *((("_pixels", raw[0]),) if raw else ())):
        top1, l2 = logistic_probe(features, seed=cfg.seed)
        metrics[f"linear_top1{name}"] = top1
        metrics[f"linear_l2{name}"] = l2
    metrics.update({
        "linear_protocol": "logistic regression on frozen center-crop features (L-BFGS, L2 penalty chosen on a "
                           "held-out fifth of the train split)",
        "linear_image_size": size,
        "linear_train_images": len(learned.train_labels),
        "linear_eval_images": len(learned.test_labels),
        "linear_skipped_images": collator.skipped,
    })
    return metrics


def linear_evaluation(
    model_dir: str | os.PathLike,
    cfg,
    *,
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    train_dir: str | None = None,
    train_split: str = "train",
    eval_split: str = "test",
    image_column: str | None = None,
    label_column: str | None = None,
    output_dir: str | os.PathLike | None = None,
    overwrite_output_dir: bool = False,
    record: bool = True,
    device: torch.device | None = None,
    log=print,
) -> dict:
    """Linear evaluation of the MoCo model in `model_dir` (`run_linear_eval` on the given data; the embedded digits
    when no dataset is given). With `record`, the metrics are merged into model_dir/metrics.json (the model card
    shows `linear_top1`); with `output_dir`, the trained classifier is saved there (save_pretrained, image processor,
    metrics.json). An `output_dir` that holds a saved model is refused (ValueError) unless `overwrite_output_dir`,
    and is replaced only once the evaluation has finished."""
    from .run_folder import check_model_output_dir

    if output_dir:
        check_model_output_dir(str(output_dir), overwrite_output_dir)
    torch.manual_seed(cfg.seed)
    preprocessing = preprocessing_for(model_dir, cfg.image_size)
    common = dict(dataset_name=dataset_name, dataset_config=dataset_config, train_dir=train_dir,
                  image_column=image_column, label_column=label_column, seed=cfg.seed,
                  demo_image_size=preprocessing.image_size)
    train = load_labeled_split(train_split, max_samples=cfg.max_train_samples, **common)
    evaluation = load_labeled_split(eval_split, label_names=train.label_names, max_samples=cfg.max_eval_samples,
                                    **common)
    model = load_linear_classifier(model_dir, train.label_names)
    protocol = cfg.protocol
    if protocol == "auto":
        fits = len(train) * model.classifier.in_features * 4 <= cfg.probe_memory_gb * 2**30
        protocol = "lbfgs" if fits else "sgd"
    # the probe sees the images as the run's own evaluation did; the SGD protocol as the paper's (crop_pct 0.875)
    cfg = dataclasses.replace(cfg, crop_pct=cfg.eval_crop_pct(preprocessing.crop_pct, sgd=protocol == "sgd"))
    if protocol == "lbfgs":
        log(f"linear probe of {model_dir} ({model.config.backbone}, {model.classifier.in_features}-d features): "
            f"{len(train)} train / {len(evaluation)} eval images, {len(train.label_names)} classes; logistic "
            f"regression with L-BFGS, against the random-init backbone and the raw pixels")
        metrics = run_probe(model, train, evaluation, preprocessing, cfg, device=device, log=log)
        baselines = ", ".join(f"{name} {metrics[key]:.2f}%" for name, key in (
            ("random init", "linear_top1_random_init"), ("raw pixels", "linear_top1_pixels")) if key in metrics)
        log(f"linear probe top-1 {metrics['linear_top1']:.2f}% on '{eval_split}' ({baselines}); backbone unchanged")
        return _record_linear(model, model_dir, output_dir, overwrite_output_dir, record, metrics, preprocessing,
                              cfg, eval_split)
    from .data.labeled import supervised_augmentation

    cfg = dataclasses.replace(cfg, **supervised_augmentation(dataset_name, train_dir, cfg.crop_min_scale,
                                                              cfg.flip_prob))
    size = preprocessing.image_size
    train_views = ("cached center-crop features" if cfg.cached_features else
                   f"train RandomResizedCrop {size} (scale {cfg.crop_min_scale:g}-1)"
                   + (f" + flip (p {cfg.flip_prob:g})" if cfg.flip_prob else ", no flip"))
    log(f"linear evaluation of {model_dir} ({model.config.backbone}, {model.classifier.in_features}-d features): "
        f"{len(train)} train / {len(evaluation)} eval images, {len(train.label_names)} classes; {cfg.epochs} epochs, "
        f"batch {cfg.batch_size}, SGD lr {cfg.lr:g} (/10 at epochs {list(cfg.schedule)}), momentum {cfg.momentum}, "
        f"wd {cfg.weight_decay:g}; eval Resize {math.floor(size / cfg.crop_pct)} / CenterCrop {size}; "
        f"{train_views}")
    metrics = run_linear_eval(model, train, evaluation, preprocessing, cfg, device=device, log=log)
    top5 = f", top-5 {metrics['linear_top5']:.2f}%" if "linear_top5" in metrics else ""
    log(f"linear evaluation top-1 {metrics['linear_top1']:.2f}%{top5} on '{eval_split}'; backbone unchanged")
    return _record_linear(model, model_dir, output_dir, overwrite_output_dir, record, metrics, preprocessing, cfg,
                          eval_split)


def _record_linear(model, model_dir, output_dir, overwrite_output_dir: bool, record: bool, metrics: dict,
                   preprocessing: Preprocessing, cfg, eval_split: str) -> dict:
    """Merge the metrics into model_dir/metrics.json (`record`); save the classifier into `output_dir`."""
    from .run_folder import MODEL_FILES, clear_run, share_files

    metrics = {**metrics, "linear_eval_split": f"'{eval_split}' ({metrics['linear_eval_images']} images)"}
    if record:
        record_metrics(model_dir, metrics)
    if output_dir:
        from .preprocessing import save_image_processor

        if overwrite_output_dir:
            clear_run(str(output_dir), MODEL_FILES + ("preprocessor_config.json",))
        model.save_pretrained(output_dir)
        save_image_processor(model, output_dir, preprocessing.data_config(crop_pct=cfg.crop_pct))
        record_metrics(output_dir, metrics)
        share_files(output_dir)
    return metrics

"""Fine-tune a MoCo-pretrained backbone on an image-classification dataset with transformers' Trainer.

Run it:
    python finetune.py --model_dir outputs/moco-digits/final         # embedded demo: sklearn digits, 2 CPU cores
    python finetune.py --model_dir outputs/moco-digits/final --dataset_name uoft-cs/cifar10 --eval_split test \
        --output_dir outputs/finetune-cifar10                         # a Hub dataset (downloaded, map-style)
    python finetune.py --model_dir outputs/moco-digits/final --train_dir /data/flowers --eval_split validation
    python finetune.py --model_dir staged/backbone                   # the timm-format export (TimmWrapper)
    accelerate launch --num_processes 8 finetune.py --model_dir outputs/moco-v2-r50-in1k/final \
        --train_dir /data/imagenet --eval_split validation --bf16 true --per_device_train_batch_size 64
                                                                      # 8 GPUs: Trainer runs under accelerate

`--model_dir` is a MoCo folder written by save_pretrained (pretrain.py's OUT/final, a `push_to_hub.py --dry_run`
folder, a downloaded repository), loaded as `MoCoForImageClassification` with a fresh classifier; or a timm-format
folder (`config.json` with `architecture`, e.g. the staged `backbone/`), loaded with
`AutoModelForImageClassification` (transformers' TimmWrapper). Every `TrainingArguments` flag works
(`--learning_rate`, `--num_train_epochs`, `--per_device_train_batch_size`, `--optim`, `--bf16`, ...); the defaults
below (`TRAINING_DEFAULTS`) differ from Trainer's where fine-tuning a CNN needs it. With no dataset, the embedded
digits (1,437 train / 360 test images at 32 px) are used, without flips and with crops of at least 60 % of the
image. From the demo's model (`python pretrain.py`) the defaults reach 99.17 % test accuracy in 10 epochs (38 s of
training on 2 CPU cores of an AMD EPYC), as from scratch; on 1 % of the labels, 77.78 % against 70.00 % from
scratch (`--label_efficiency 0.01,0.1,1`: six runs, 620 s on the same cores; README).

Written to --output_dir: the fine-tuned model (save_pretrained; loads with AutoModelForImageClassification, with
moco_hf imported for a MoCo model), preprocessor_config.json (the eval transform), metrics.json (`finetune_top1`,
`finetune_top5` in %, and Trainer's eval metrics), training_config.json (the arguments and preprocessing).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser, TrainingArguments

# moco_hf, torch's data tools and Trainer are imported where they are used, so that `--help` and mistakes in the
# arguments answer quickly.
logger = logging.getLogger("finetune")

# Trainer defaults replaced (any can be overridden on the command line). Chosen for the digits demo, where they give
# 99 % test accuracy from a randomly initialised cifar_resnet10_slim in 10 epochs (30 s of training on 2 CPU
# cores): AdamW lr 3e-3, weight decay 0.05, cosine decay after 5 % warmup, batch 32. For a pretrained ResNet-50 on a
# large dataset lower the learning rate (e.g. 5e-4 at batch 256). remove_unused_columns is always False: the
# datasets carry the raw image column that the transform turns into pixel_values.
TRAINING_DEFAULTS = dict(
    output_dir="outputs/finetune",
    num_train_epochs=10,
    learning_rate=3e-3,
    weight_decay=0.05,
    lr_scheduler_type="cosine",
    warmup_steps=0.05,
    per_device_train_batch_size=32,
    per_device_eval_batch_size=256,
    eval_strategy="epoch",
    save_strategy="epoch",
    save_total_limit=1,
    logging_steps=10,
    report_to="none",
    remove_unused_columns=False,
    seed=0,
)
# What a finished fine-tuning leaves in output_dir (and --overwrite_output_dir deletes, with Trainer's checkpoints).
MODEL_ARTEFACTS = ("config.json", "model.safetensors", "model.safetensors.index.json", "metrics.json",
                   "training_config.json", "preprocessor_config.json", "training_args.bin", "README.md")


@dataclass
class FinetuneArguments:
    """What to fine-tune on what (the optimisation itself is set with TrainingArguments)."""

    model_dir: str = field(metadata={"help": "MoCo folder (save_pretrained) or timm-format folder to start from"})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset (default: the embedded digits)"})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration"})
    train_dir: str | None = field(default=None, metadata={"help": "local image folder, parquet or webdataset shards"})
    train_split: str = field(default="train", metadata={"help": "split to train on"})
    eval_split: str = field(default="test", metadata={"help": "split to evaluate on (e.g. validation)"})
    image_column: str | None = field(default=None, metadata={"help": "image column (detected if not given)"})
    label_column: str | None = field(default=None, metadata={"help": "label column (detected if not given)"})
    image_size: int | None = field(default=None, metadata={"help": "crop size (default: the checkpoint's)"})
    crop_min_scale: float | None = field(
        default=None, metadata={"help": "RandomResizedCrop minimum area fraction (default 0.08; digits demo 0.6)"}
    )
    flip_prob: float | None = field(
        default=None, metadata={"help": "horizontal flip probability (default 0.5; digits demo 0)"}
    )
    eval_crop_pct: float | None = field(
        default=None, metadata={"help": "eval: resize to size / crop_pct, center crop (default: the checkpoint's)"}
    )
    freeze_backbone: bool = field(default=False, metadata={"help": "train only the classifier (MoCo models)"})
    channels_last: bool = field(
        default=True, metadata={"help": "channels-last weights: faster convolutions (1.3x on 2 CPU cores)"}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "train on a random subset"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "evaluate on a random subset"})
    label_fraction: float = field(
        default=1.0, metadata={"help": "train on this fraction of the train labels (class-balanced; e.g. 0.01)"}
    )
    from_scratch: bool = field(
        default=False, metadata={"help": "the same architecture at random initialisation: the baseline pretraining "
                                         "has to beat"}
    )
    label_efficiency: str | None = field(
        default=None, metadata={"help": "comma-separated label fractions (e.g. 0.01,0.1,1): fine-tune on each, from "
                                        "the pretrained weights and from scratch, and print the table"}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "start over in an output_dir that holds another run (deletes its model "
                                         "files and checkpoints)"}
    )


@dataclass
class FinetuneResult:
    metrics: dict
    trainer: object  # transformers.Trainer
    output_dir: str
    preempted: bool = False  # stopped by a scheduler's signal after saving a checkpoint: resume with `auto`


# ---------------------------------------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------------------------------------


def _loader_defaults() -> dict:
    """DataLoader workers and pinned memory: on a GPU machine only (the CPU demo trains in the main process)."""
    import torch

    cuda = torch.cuda.is_available()
    return dict(dataloader_num_workers=min(8, os.cpu_count() or 1) if cuda else 0, dataloader_pin_memory=cuda)


def parse_args(argv: list[str] | None = None) -> tuple[FinetuneArguments, TrainingArguments]:
    parser = HfArgumentParser((FinetuneArguments, TrainingArguments), description=__doc__)
    parser.set_defaults(**TRAINING_DEFAULTS, **_loader_defaults())
    args, training_args = parser.parse_args_into_dataclasses(args=argv)
    return args, training_args


def training_arguments(**overrides) -> TrainingArguments:
    """TrainingArguments with this script's defaults (`TRAINING_DEFAULTS`) and `overrides`."""
    return TrainingArguments(**{**TRAINING_DEFAULTS, **_loader_defaults(), **overrides})


def build_datasets(args: FinetuneArguments, preprocessing):
    """(train, eval) `LabeledSplit`s, map-style with undecoded images, sharing the train split's class indices."""
    from moco_hf.data.labeled import load_labeled_split

    common = dict(dataset_name=args.dataset_name, dataset_config=args.dataset_config, train_dir=args.train_dir,
                  image_column=args.image_column, label_column=args.label_column,
                  demo_image_size=preprocessing.image_size)
    train = load_labeled_split(args.train_split, max_samples=args.max_train_samples, **common)
    evaluation = load_labeled_split(args.eval_split, label_names=train.label_names, max_samples=args.max_eval_samples,
                                    **common)
    return train, evaluation


def resolve_augmentation(args: FinetuneArguments) -> dict:
    """crop_min_scale and flip_prob: as given, else the dataset's (`data.labeled.supervised_augmentation`: 0.08 and
    0.5, or for the embedded digits 0.6 and no flips)."""
    from moco_hf.data.labeled import supervised_augmentation

    return supervised_augmentation(args.dataset_name, args.train_dir, args.crop_min_scale, args.flip_prob)


def build_transforms(args: FinetuneArguments, preprocessing):
    """(train, eval) image transforms: RandomResizedCrop + flip + normalise; resize + center crop + normalise."""
    from moco_hf.data.transforms import EvalTransform, TrainTransform

    size, mean, std = preprocessing.image_size, preprocessing.mean, preprocessing.std
    augmentation = resolve_augmentation(args)
    train = TrainTransform(size, mean, std, augmentation["crop_min_scale"], augmentation["flip_prob"],
                           preprocessing.interpolation)
    crop_pct = args.eval_crop_pct or preprocessing.crop_pct
    return train, EvalTransform(size, mean, std, crop_pct=crop_pct, interpolation=preprocessing.interpolation)


def load_model(model_dir: str, label_names: list[str], freeze_backbone: bool = False, from_scratch: bool = False,
               seed: int = 0):
    """The model to fine-tune with a fresh `len(label_names)`-way classifier: `MoCoForImageClassification` for a
    MoCo folder (query backbone kept; key encoder, queue and projection head dropped), transformers' TimmWrapper
    for a timm-format folder. `from_scratch`: the same architecture at random initialisation (seeded)."""
    import torch
    from transformers import AutoModelForImageClassification

    from moco_hf.preprocessing import is_timm_folder, read_model_config
    from moco_hf.modeling_moco import MoCoForImageClassification

    config = read_model_config(model_dir)
    labels = dict(num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                  label2id={name: i for i, name in enumerate(label_names)})
    if is_timm_folder(config):
        if freeze_backbone:
            raise ValueError("freeze_backbone is for MoCo folders; a timm-format folder is fine-tuned entirely")
        model = AutoModelForImageClassification.from_pretrained(model_dir, **labels)
        if from_scratch:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                model = AutoModelForImageClassification.from_config(model.config)
        return model
    model = MoCoForImageClassification.from_pretrained(
        model_dir, freeze_backbone=freeze_backbone, ignore_mismatched_sizes=True, **labels
    )
    if from_scratch:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = MoCoForImageClassification(model.config)
    model.reset_classifier()  # a classifier the folder may hold (same shape) is not the fine-tuning's starting point
    return model


def compute_metrics(eval_pred) -> dict:
    """Top-1 (and top-5 with at least 5 classes) accuracy in %, from the eval logits."""
    import numpy as np

    logits, labels = eval_pred.predictions, eval_pred.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    order = np.argsort(-logits, axis=1)  # N x C
    metrics = {"accuracy": 100.0 * float((order[:, 0] == labels).mean())}
    if logits.shape[1] >= 5:
        metrics["top5"] = 100.0 * float((order[:, :5] == labels[:, None]).any(axis=1).mean())
    return metrics


# ---------------------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------------------


def run(args: FinetuneArguments, training_args: TrainingArguments, callbacks: list | None = None) -> FinetuneResult:
    """Fine-tune `args.model_dir` with transformers' Trainer; save the model, processor and metrics to
    `training_args.output_dir`. `callbacks` are extra `TrainerCallback`s.

    An output_dir holding another run's model or checkpoints is refused (ValueError) unless
    `args.overwrite_output_dir` or, for checkpoints, `resume_from_checkpoint`; nothing is written before the data
    and the model have loaded."""
    import torch
    from transformers import Trainer

    import moco_hf  # noqa: F401  (registers MoCo with the Auto classes and the small-image ResNets with timm)
    from moco_hf.data.labeled import ClassificationCollator
    from moco_hf.preprocessing import preprocessing_for
    from moco_hf.run_folder import check_model_output_dir, clear_run

    if training_args.hub_token:
        raise ValueError("--hub_token would be written into training_args.bin next to the model (Trainer saves its "
                         "arguments); set HF_TOKEN or log in once with `hf auth login` instead")
    training_args.remove_unused_columns = False  # the raw image column feeds the transform
    out = training_args.output_dir
    if str(training_args.resume_from_checkpoint).lower() in ("auto", "true"):
        training_args.resume_from_checkpoint = last_complete_checkpoint(out)
    check_model_output_dir(out, args.overwrite_output_dir, resume=bool(training_args.resume_from_checkpoint))
    if not 0.0 < args.label_fraction <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1], got {args.label_fraction}")
    preprocessing = preprocessing_for(args.model_dir, args.image_size)
    train, evaluation = build_datasets(args, preprocessing)
    full_train = len(train)
    if args.label_fraction < 1.0:
        from moco_hf.representation import label_subset

        train = train.subset(label_subset(train.labels(), args.label_fraction, seed=training_args.seed))
        if training_args.max_steps <= 0:  # the same number of steps as on all the labels
            world = training_args.world_size * training_args.gradient_accumulation_steps
            steps_full = math.ceil(full_train / (training_args.per_device_train_batch_size * world))
            training_args.max_steps = int(steps_full * training_args.num_train_epochs)
    train_transform, eval_transform = build_transforms(args, preprocessing)
    model = load_model(args.model_dir, train.label_names, args.freeze_backbone, args.from_scratch,
                       seed=training_args.seed)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_collator, eval_collator = ClassificationCollator(allow_empty=False), ClassificationCollator(allow_empty=False)
    if args.overwrite_output_dir and training_args.process_index == 0:  # everything loaded: the first writes
        removed = clear_run(out, MODEL_ARTEFACTS, trainer_checkpoints=True)
        if removed:
            print(f"overwrite_output_dir: deleted {', '.join(removed)} from {out}")
    trainer = Trainer(
        model=model,
        args=training_args,
        data_collator=_SplitCollator(train_collator, eval_collator),
        train_dataset=_TaggedDataset(train.with_transform(train_transform), "train"),
        eval_dataset=_TaggedDataset(evaluation.with_transform(eval_transform), "eval"),
        compute_metrics=compute_metrics,
        callbacks=callbacks,
    )
    world = training_args.world_size
    batch = training_args.per_device_train_batch_size * world * training_args.gradient_accumulation_steps
    steps = math.ceil(len(train) / batch) * training_args.num_train_epochs if training_args.max_steps <= 0 \
        else training_args.max_steps
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if training_args.process_index == 0:
        print(f"fine-tuning {args.model_dir} ({type(model).__name__}, {trainable:,} trainable parameters) on "
              f"{args.dataset_name or args.train_dir or 'the embedded digits'}: {len(train)} train / "
              f"{len(evaluation)} eval images, {len(train.label_names)} classes, {preprocessing.image_size} px; "
              f"global batch {batch} = {world} x {training_args.per_device_train_batch_size} x "
              f"{training_args.gradient_accumulation_steps}; {_name(training_args.optim)} lr "
              f"{training_args.learning_rate:g} ({_name(training_args.lr_scheduler_type)}); {steps:g} steps")
    from moco_hf.training import StopSignals

    with StopSignals() as signals:
        stop = stop_on_signal(signals)
        trainer.add_callback(stop)
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if stop.stopped:
        if training_args.process_index == 0:
            print(f"stopped at step {trainer.state.global_step} on {stop.stopped} after saving a checkpoint in {out}; "
                  f"resume with --resume_from_checkpoint auto")
        return FinetuneResult({}, trainer, out, preempted=True)
    train_skipped = train_collator.skipped
    eval_collator.reset()
    metrics = trainer.evaluate()
    metrics = {
        "finetune_top1": metrics["eval_accuracy"],
        **({"finetune_top5": metrics["eval_top5"]} if "eval_top5" in metrics else {}),
        **metrics,
        "finetune_train_images": len(train),
        "finetune_label_fraction": args.label_fraction,
        "finetune_from_scratch": args.from_scratch,
        "finetune_eval_images": len(evaluation) - eval_collator.skipped,
        "finetune_skipped_train_images": train_skipped,  # over all epochs
        "finetune_skipped_eval_images": eval_collator.skipped,
    }
    if trainer.is_world_process_zero():
        save(trainer, out, args, training_args, preprocessing, metrics)
        if train_skipped or metrics["finetune_skipped_eval_images"]:
            logger.warning("skipped corrupt images: %d while training, %d in the final evaluation", train_skipped,
                           metrics["finetune_skipped_eval_images"])
        print(f"fine-tuned top-1 {metrics['finetune_top1']:.2f}% on '{args.eval_split}'; saved to {out}")
    return FinetuneResult(metrics, trainer, out)


def label_efficiency(args: FinetuneArguments, training_args: TrainingArguments) -> dict:
    """Fine-tune on each fraction of `args.label_efficiency` of the train labels, from the pretrained weights and
    from scratch (each in output_dir/<pretrained|scratch>-<percent>), every run the same number of steps as on all
    the labels; print the table and write output_dir/label_efficiency.json. Returns {fraction: {init: top-1}}."""
    import copy

    from moco_hf.run_folder import share_files

    try:
        fractions = [float(v) for v in args.label_efficiency.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"label_efficiency expects comma-separated fractions such as 0.01,0.1,1, got "
                         f"{args.label_efficiency!r}") from None
    if not fractions or any(not 0.0 < f <= 1.0 for f in fractions):
        raise ValueError(f"label_efficiency fractions must be in (0, 1], got {args.label_efficiency!r}")
    out = training_args.output_dir
    table: dict[str, dict[str, float]] = {}
    for fraction in fractions:
        for init, scratch in (("pretrained", False), ("scratch", True)):
            run_args = dataclasses.replace(args, label_fraction=fraction, from_scratch=scratch, label_efficiency=None)
            run_training = copy.deepcopy(training_args)
            run_training.output_dir = os.path.join(out, f"{init}-{fraction:.0%}".replace("%", "pct"))
            metrics = run(run_args, run_training).metrics
            table.setdefault(f"{fraction:.0%}", {})[init] = metrics["finetune_top1"]
            table[f"{fraction:.0%}"]["train_images"] = metrics["finetune_train_images"]
    if training_args.process_index == 0:
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "label_efficiency.json")
        with open(path, "w") as f:
            json.dump({"model_dir": args.model_dir, "eval_split": args.eval_split, "unit": "% top-1",
                       "results": table}, f, indent=2)
        share_files(path)
        print(format_label_efficiency(table, args.eval_split))
    return table


def format_label_efficiency(table: dict, eval_split: str) -> str:
    rows = [f"fine-tuned top-1 (%) on '{eval_split}'", f"{'labels':<20}{'pretrained':>12}{'from scratch':>14}"]
    for fraction, values in table.items():
        label = f"{fraction.replace('%', ' %')} ({values['train_images']} images)"
        rows.append(f"{label:<20}{values['pretrained']:>12.2f}{values['scratch']:>14.2f}")
    return "\n".join(rows)


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest `checkpoint-<step>` in `output_dir` that Trainer finished writing (its trainer_state.json, written
    after the model, optimizer and RNG states, is there), or None: a save cut short by a kill is skipped."""
    if not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if name.startswith("checkpoint-") and name[len("checkpoint-"):].isdigit() and \
                os.path.isfile(os.path.join(path, "trainer_state.json")):
            steps.append((int(name[len("checkpoint-"):]), path))
    return max(steps)[1] if steps else None


def stop_on_signal(signals):
    """A TrainerCallback: after the step in which a scheduler's signal arrived (on any process), Trainer saves a
    checkpoint and stops training (`should_save`, `should_training_stop`); `.stopped` names the signal."""
    from transformers import TrainerCallback

    class StopOnSignal(TrainerCallback):
        stopped: str | None = None

        def on_step_end(self, args, state, control, **kwargs):
            if signals.requested(args.device):
                control.should_save = control.should_training_stop = True
                self.stopped = signals.received
            return control

    return StopOnSignal()


def _name(value) -> str:
    return str(getattr(value, "value", value))


class _SplitCollator:
    """Sends each batch to its split's `ClassificationCollator` (by the `_split` tag): skips counted per split."""

    def __init__(self, train, evaluation):
        self.train, self.evaluation = train, evaluation

    def __call__(self, examples: list[dict]) -> dict:
        target = self.train if examples and examples[0].get("_split") == "train" else self.evaluation
        return target([{k: v for k, v in e.items() if k != "_split"} for e in examples])


class _TaggedDataset:
    """A (map-style) dataset whose examples also carry `_split`, for `_SplitCollator`."""

    def __init__(self, dataset, split: str):
        self.dataset, self.split = dataset, split

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        return {**self.dataset[index], "_split": self.split}


def save(trainer, out: str, args: FinetuneArguments, training_args: TrainingArguments, preprocessing,
         metrics: dict) -> None:
    """save_pretrained + eval transform (preprocessor_config.json; for TimmWrapper, config.json's pretrained_cfg) +
    metrics.json + training_config.json in `out`, readable by others as the umask says."""
    from moco_hf.evaluation import record_metrics
    from moco_hf.preprocessing import save_image_processor
    from moco_hf.run_folder import share_files

    model = trainer.model
    crop_pct = args.eval_crop_pct or preprocessing.crop_pct
    data_config = preprocessing.data_config(crop_pct=crop_pct)
    if hasattr(model, "timm_model"):
        # TimmWrapper: AutoImageProcessor builds timm's eval transform from the config's pretrained_cfg.
        model.config.pretrained_cfg = {**(model.config.pretrained_cfg or {}), **data_config}
        trainer.save_model(out)
    else:
        trainer.save_model(out)
        save_image_processor(model, out, data_config)
    record_metrics(out, metrics)
    # Read by moco_hf.hub (model card, image processor) if the fine-tuned model is published.
    optimisation = ("learning_rate", "num_train_epochs", "max_steps", "optim", "weight_decay", "lr_scheduler_type",
                    "warmup_steps", "per_device_train_batch_size", "seed")
    record = {**dataclasses.asdict(args), **resolve_augmentation(args), "image_size": preprocessing.image_size,
              "mean": list(preprocessing.mean), "std": list(preprocessing.std), "eval_crop_pct": crop_pct,
              "interpolation": preprocessing.interpolation,
              **{key: _name(getattr(training_args, key)) if key in ("optim", "lr_scheduler_type")
                 else getattr(training_args, key) for key in optimisation}}
    with open(os.path.join(out, "training_config.json"), "w") as f:
        json.dump(record, f, indent=2)
    share_files(out)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("MOCO_HF_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("datasets", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        args, training_args = parse_args(argv)  # argparse prints its own one-line errors and exits with 2
    except ValueError as err:  # TrainingArguments' own checks
        if debug:
            raise
        print(f"finetune.py: error: {str(err).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    from moco_hf.cli import run_command

    from moco_hf.training import PREEMPTED

    if args.label_efficiency:
        return run_command("finetune.py", lambda: label_efficiency(args, training_args), debug=debug)
    return run_command("finetune.py", lambda: PREEMPTED if run(args, training_args).preempted else 0, debug=debug)


if __name__ == "__main__":
    sys.exit(main())

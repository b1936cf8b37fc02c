"""Linear evaluation of a MoCo checkpoint (thin command line over `moco_hf.evaluation.linear_evaluation`).

Two protocols on the frozen backbone (kept in eval mode, checked bit for bit to be unchanged at the end):

- lbfgs (the default where the train features fit in memory): center-crop features extracted once, a logistic
  regression fitted to convergence with L-BFGS (L2 penalty chosen on a held-out fifth of the train split), and the
  same probe on the backbone at random initialisation and on the raw pixels, as baselines. Seconds on the demo.
- sgd: MoCo's protocol (official main_lincls.py): a linear classifier on the pooled features trained with SGD lr 30,
  momentum 0.9, no weight decay, batch 256, for 100 epochs with the learning rate divided by 10 at epochs 60 and 80,
  on RandomResizedCrop + flip views (the dataset's: digits are not flipped); top-1 (and top-5) on Resize 256 /
  CenterCrop 224 views (other sizes: Resize size / 0.875). For ImageNet-scale runs.

`linear_top1` (%) is merged into MODEL_DIR/metrics.json, where the model card reads it.

Run it:
    python linear_eval.py --model_dir outputs/moco-digits/final      # embedded digits: L-BFGS probe, seconds
    python linear_eval.py --model_dir outputs/moco-digits/final --protocol sgd --epochs 30
                                                                      # the paper's SGD protocol, shortened
    python linear_eval.py --model_dir outputs/moco-v2-r50-in1k/final --train_dir /data/imagenet --protocol sgd \
        --eval_split validation --num_workers 16 --mixed_precision bf16   # ImageNet, paper protocol (one GPU)
    python linear_eval.py --model_dir outputs/moco-digits/final --dataset_name uoft-cs/cifar10 --image_size 32 \
        --output_dir outputs/linear-cifar10                           # also save the trained classifier
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field

# moco_hf (torch, timm, transformers, datasets) is imported once the arguments are known to be good.


@dataclass
class LinearEvalConfig:
    """Linear classification protocol; the defaults are MoCo's ImageNet ResNet-50 ones (official main_lincls.py).

    MoCo v1, Sec. 4.1: "we freeze the features and train a supervised linear classifier (a fully-connected layer
    followed by softmax). We train this classifier on the global average pooling features of a ResNet, for 100
    epochs. [...] we perform a grid search and find the optimal initial learning rate is 30 and weight decay is 0".
    Published: 60.6 % (v1, 200 epochs), 67.5 % (v2, 200 epochs), 71.1 % (v2, 800 epochs) ImageNet top-1.

    Args:
        epochs (`int`, defaults to 100): training epochs of the classifier.
        lr (`float`, defaults to 30.0): initial SGD learning rate (ResNet; ViTs need far smaller values).
        schedule (`tuple[int, ...]`, defaults to (60, 80)): epochs at which the learning rate is divided by 10.
        momentum (`float`, defaults to 0.9): SGD momentum.
        weight_decay (`float`, defaults to 0.0): SGD weight decay.
        batch_size (`int`, defaults to 256): images per step (single process).
        image_size (`int`, *optional*): crop size; defaults to the size the checkpoint was trained with.
        crop_pct (`float`, *optional*): eval transform: shorter side to image_size / crop_pct, center crop
            image_size. By default the model's own (the one its pretraining run evaluated with, so the probe's figures
            and the run's agree) for "lbfgs", and the paper's 0.875 (Resize 256 / CenterCrop 224) for "sgd".
        protocol (`str`, defaults to "auto"): "lbfgs": a logistic regression on center-crop features extracted once,
            fitted to convergence with L-BFGS, its L2 penalty chosen on a held-out fifth of the train split, next to
            the same probe on the backbone at random initialisation and on the raw pixels (seconds where the
            features fit in memory); "sgd": the paper's protocol below; "auto": lbfgs when the train features fit
            in `probe_memory_gb`, else sgd.
        probe_memory_gb (`float`, defaults to 8.0): the most memory the lbfgs protocol's train features may take.
        crop_min_scale (`float`, *optional*): sgd: train RandomResizedCrop minimum area fraction; default the
            dataset's (0.08; the embedded digits 0.6).
        flip_prob (`float`, *optional*): sgd: horizontal flip probability; default the dataset's (0.5; digits 0).
        cached_features (`bool`, defaults to False): sgd: extract center-crop features of the train split once and
            train the classifier on them without augmentation (fast; not the paper protocol).
        num_workers (`int`, defaults to 4, at most the CPU count): DataLoader worker processes.
        seed (`int`, defaults to 0): classifier initialisation, shuffling and augmentation.
        max_train_samples / max_eval_samples (`int`, *optional*): evaluate on a random subset.
        mixed_precision (`str`, defaults to "no"): "bf16" runs the frozen backbone under bf16 autocast.
    """

    epochs: int = 100
    lr: float = 30.0
    schedule: tuple[int, ...] = (60, 80)
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 256
    image_size: int | None = None
    crop_pct: float | None = None
    protocol: str = "auto"
    probe_memory_gb: float = 8.0
    crop_min_scale: float | None = None
    flip_prob: float | None = None
    cached_features: bool = False
    num_workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))
    seed: int = 0
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    mixed_precision: str = "no"

    PAPER_CROP_PCT = 0.875  # Resize 256 / CenterCrop 224

    def eval_crop_pct(self, model_crop_pct: float, sgd: bool) -> float:
        """crop_pct, else the paper's for the SGD protocol and the model's own for the L-BFGS probe."""
        if self.crop_pct is not None:
            return self.crop_pct
        return self.PAPER_CROP_PCT if sgd else model_crop_pct

    def __post_init__(self):
        self.schedule = tuple(int(m) for m in self.schedule)
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0 (the paper uses 30 for ResNets), got {self.lr!r}")
        if list(self.schedule) != sorted(self.schedule) or any(m < 1 for m in self.schedule):
            raise ValueError(f"schedule must be increasing epochs >= 1 (e.g. 60,80), got {self.schedule}")
        if not 0.0 <= self.momentum < 1.0 or self.weight_decay < 0:
            raise ValueError(f"momentum must be in [0, 1) and weight_decay >= 0, got {self.momentum}, "
                             f"{self.weight_decay}")
        if not 0.0 < (self.crop_pct or 1.0) <= 1.0 or not 0.0 < (self.crop_min_scale or 1.0) <= 1.0:
            raise ValueError(f"crop_pct and crop_min_scale must be in (0, 1], got {self.crop_pct}, "
                             f"{self.crop_min_scale}")
        if self.flip_prob is not None and not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")
        if self.protocol not in ("auto", "lbfgs", "sgd"):
            raise ValueError(f"protocol must be auto, lbfgs or sgd, got {self.protocol!r}")
        if not self.probe_memory_gb > 0:
            raise ValueError(f"probe_memory_gb must be > 0, got {self.probe_memory_gb}")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {self.image_size}")
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(f"mixed_precision must be 'no' or 'bf16', got {self.mixed_precision!r}")


def _schedule(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs such as 60,80, got {text!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    d = LinearEvalConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True, help="MoCo folder written by save_pretrained (e.g. OUT/final)")
    parser.add_argument("--dataset_name", default=None, help="Hub dataset (default: the embedded digits)")
    parser.add_argument("--dataset_config", default=None)
    parser.add_argument("--train_dir", default=None, help="local image folder, parquet or webdataset shards")
    parser.add_argument("--train_split", default="train")
    parser.add_argument("--eval_split", default="test")
    parser.add_argument("--image_column", default=None, help="detected if not given")
    parser.add_argument("--label_column", default=None, help="detected if not given")
    parser.add_argument("--epochs", type=int, default=d.epochs, help=f"default {d.epochs}")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"initial learning rate (default {d.lr:g}, ResNets)")
    parser.add_argument("--schedule", type=_schedule, default=d.schedule,
                        help="epochs where the lr is divided by 10 (default 60,80)")
    parser.add_argument("--momentum", type=float, default=d.momentum)
    parser.add_argument("--weight_decay", type=float, default=d.weight_decay)
    parser.add_argument("--batch_size", type=int, default=d.batch_size)
    parser.add_argument("--image_size", type=int, default=None, help="default: the size the checkpoint was trained at")
    parser.add_argument("--crop_pct", type=float, default=d.crop_pct,
                        help="eval resize = size / crop_pct (default: the model's own with lbfgs, 0.875 with sgd)")
    parser.add_argument("--protocol", choices=("auto", "lbfgs", "sgd"), default=d.protocol,
                        help="lbfgs: logistic regression on features extracted once, with the random-init and "
                             "raw-pixel baselines (seconds); sgd: the paper's protocol; auto (default): lbfgs when "
                             "the features fit in --probe_memory_gb")
    parser.add_argument("--probe_memory_gb", type=float, default=d.probe_memory_gb,
                        help=f"memory the lbfgs train features may take (default {d.probe_memory_gb:g})")
    parser.add_argument("--crop_min_scale", type=float, default=None,
                        help="sgd: train crop area (default the dataset's: 0.08; digits 0.6)")
    parser.add_argument("--flip_prob", type=float, default=None,
                        help="sgd: horizontal flip probability (default the dataset's: 0.5; digits 0)")
    parser.add_argument("--cached_features", action="store_true",
                        help="train on center-crop features computed once (no augmentation; fast, not the paper)")
    parser.add_argument("--num_workers", type=int, default=d.num_workers)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--max_train_samples", type=int, default=None)
    parser.add_argument("--max_eval_samples", type=int, default=None)
    parser.add_argument("--mixed_precision", choices=("no", "bf16"), default=d.mixed_precision)
    parser.add_argument("--output_dir", default=None, help="also save the trained classifier model here")
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="replace a classifier already saved in --output_dir")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error (or MOCO_HF_DEBUG=1)")
    parser.add_argument("--no_record", action="store_true", help="do not write MODEL_DIR/metrics.json")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    debug = args.debug or os.environ.get("MOCO_HF_DEBUG", "") not in ("", "0")
    try:
        cfg = LinearEvalConfig(
            epochs=args.epochs, lr=args.lr, schedule=args.schedule, momentum=args.momentum,
            weight_decay=args.weight_decay, batch_size=args.batch_size, image_size=args.image_size,
            crop_pct=args.crop_pct, protocol=args.protocol, probe_memory_gb=args.probe_memory_gb,
            crop_min_scale=args.crop_min_scale, flip_prob=args.flip_prob, cached_features=args.cached_features,
            num_workers=args.num_workers, seed=args.seed, max_train_samples=args.max_train_samples,
            max_eval_samples=args.max_eval_samples, mixed_precision=args.mixed_precision,
        )
    except ValueError as err:
        if debug:
            raise
        print(f"linear_eval.py: error: {err}", file=sys.stderr)
        return 2
    from moco_hf.cli import run_command

    return run_command("linear_eval.py", lambda: run(args, cfg), debug=debug)


def run(args: argparse.Namespace, cfg: LinearEvalConfig) -> dict:
    from moco_hf.evaluation import linear_evaluation

    return linear_evaluation(
        args.model_dir, cfg, dataset_name=args.dataset_name, dataset_config=args.dataset_config,
        train_dir=args.train_dir, train_split=args.train_split, eval_split=args.eval_split,
        image_column=args.image_column, label_column=args.label_column, output_dir=args.output_dir,
        overwrite_output_dir=args.overwrite_output_dir, record=not args.no_record,
    )


if __name__ == "__main__":
    sys.exit(main())

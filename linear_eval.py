"""Linear evaluation of a MoCo checkpoint (thin command line over `moco_hf.evaluation.linear_evaluation`).

MoCo's protocol (official main_lincls.py): the backbone is frozen and kept in eval mode; a linear classifier on its
pooled features is trained with SGD lr 30, momentum 0.9, no weight decay, batch 256, for 100 epochs with the
learning rate divided by 10 at epochs 60 and 80, on RandomResizedCrop + flip views; top-1 (and top-5) is measured on
Resize 256 / CenterCrop 224 views (other sizes: Resize size / 0.875). The backbone is checked, bit for bit, to be
unchanged at the end. `linear_top1` (%) is merged into MODEL_DIR/metrics.json, where the model card reads it.

Run it:
    python linear_eval.py --model_dir outputs/moco-digits/final      # embedded digits (train / test splits)
    python linear_eval.py --model_dir outputs/moco-digits/final --cached_features --epochs 30
                                                                      # CPU-friendly: center-crop features once
    python linear_eval.py --model_dir outputs/moco-v2-r50-in1k/final --train_dir /data/imagenet \
        --eval_split validation --num_workers 16 --mixed_precision bf16   # ImageNet, paper protocol (one GPU)
    python linear_eval.py --model_dir outputs/moco-digits/final --dataset_name uoft-cs/cifar10 --image_size 32 \
        --output_dir outputs/linear-cifar10                           # also save the trained classifier
"""

import argparse
import sys

from moco_hf.evaluation import LinearEvalConfig, linear_evaluation


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
    parser.add_argument("--crop_pct", type=float, default=d.crop_pct, help="eval resize = size / crop_pct (0.875)")
    parser.add_argument("--crop_min_scale", type=float, default=d.crop_min_scale, help="train crop area (0.08)")
    parser.add_argument("--cached_features", action="store_true",
                        help="train on center-crop features computed once (no augmentation; fast, not the paper)")
    parser.add_argument("--num_workers", type=int, default=d.num_workers)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--max_train_samples", type=int, default=None)
    parser.add_argument("--max_eval_samples", type=int, default=None)
    parser.add_argument("--mixed_precision", choices=("no", "bf16"), default=d.mixed_precision)
    parser.add_argument("--output_dir", default=None, help="also save the trained classifier model here")
    parser.add_argument("--no_record", action="store_true", help="do not write MODEL_DIR/metrics.json")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = LinearEvalConfig(
            epochs=args.epochs, lr=args.lr, schedule=args.schedule, momentum=args.momentum,
            weight_decay=args.weight_decay, batch_size=args.batch_size, image_size=args.image_size,
            crop_pct=args.crop_pct, crop_min_scale=args.crop_min_scale, cached_features=args.cached_features,
            num_workers=args.num_workers, seed=args.seed, max_train_samples=args.max_train_samples,
            max_eval_samples=args.max_eval_samples, mixed_precision=args.mixed_precision,
        )
        linear_evaluation(
            args.model_dir, cfg, dataset_name=args.dataset_name, dataset_config=args.dataset_config,
            train_dir=args.train_dir, train_split=args.train_split, eval_split=args.eval_split,
            image_column=args.image_column, label_column=args.label_column, output_dir=args.output_dir,
            record=not args.no_record,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"linear_eval.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""MoCo pretraining with Accelerate on images streamed with HF Datasets.

Run it:
    python pretrain.py                                              # embedded demo: sklearn digits, 2 CPU cores
    accelerate launch pretrain.py --config configs/moco_v2_resnet50_imagenet.yaml --bn_splits 8
                                                                    # one GPU (split BN: 8 chunks of 32)
    python pretrain.py --config configs/demo_digits_v3.yaml         # MoCo v3 on the digits, 2 CPU cores
    accelerate launch --num_processes 8 pretrain.py --config configs/moco_v3_vit_small_imagenet.yaml
                                                                    # MoCo v3, ViT-S/16, 8 GPUs
    accelerate launch --num_processes 8 pretrain.py --config configs/moco_v2_resnet50_imagenet.yaml \\
        --dataset_name none --train_dir /data/imagenet --eval_split validation
                                                                    # 8 GPUs, local folder
    accelerate launch --num_machines 2 --machine_rank 0 --main_process_ip 10.0.0.1 --num_processes 16 \\
        pretrain.py --config configs/moco_v2_resnet50_imagenet.yaml # 2 machines x 8 GPUs (rank 1 on the other)
    python pretrain.py --config configs/x.yaml --resume_from_checkpoint auto
                                                                    # continue the newest checkpoint

Any config key can be overridden as `--key value`; the resolved config is written to output_dir/config.yaml.
An output_dir that holds another run (its final model or checkpoints) is refused unless the run is resumed
(`--resume_from_checkpoint auto`) or `--overwrite_output_dir true` says to start over. `--debug` shows the full
traceback of an error (or set MOCO_HF_DEBUG=1). On SIGTERM or SIGUSR1 (a scheduler's warning before it kills the job)
the run finishes its step, saves a checkpoint and exits with status 75: requeue it with
`--resume_from_checkpoint auto` (README, "Clusters").

This file holds the configuration and the command line only, with no heavy imports, so that `--help` and mistakes
in the arguments answer at once; the run itself is `moco_hf.pretraining.train`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from dataclasses import dataclass, field

import yaml

PROG = "pretrain.py"
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Keys a resumed run may change: they steer logging, saving, stopping and how fast the same computation runs (on
# another machine, say), not what is learned. A checkpoint whose config.yaml differs in any other key is refused.
RESUMABLE_KEYS = ("resume_from_checkpoint", "overwrite_output_dir", "stop_after_steps", "log_steps", "save_steps",
                  "save_total_limit", "report_to", "profile_steps", "mixed_precision", "compile", "compile_mode",
                  "channels_last", "gradient_checkpointing", "cudnn_benchmark", "num_workers", "gpu_augment",
                  "device_decode", "decode_threads", "device_cache", "device_cache_gb", "knn_every_epochs",
                  "knn_max_train_samples", "knn_max_eval_samples")


def _key(default, help: str, group: str):
    """A config field with its default, one line of help and its section in `--help`."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, "group": group})
    return field(default=default, metadata={"help": help, "group": group})


RUN, DATA, MODEL, OPTIM, KNN = "run", "data", "model (MoCoConfig)", "optimisation", "kNN monitor"


@dataclass
class PretrainConfig:
    """Everything `pretrain.py` reads. YAML files fill it; `--key value` on the command line overrides it.

    The defaults are the embedded demo (configs/demo_digits.yaml): with no dataset named (`dataset_name` and
    `train_dir` empty) it runs on scikit-learn's digits. The paper settings live in configs/.
    """

    resumable_keys: typing.ClassVar[tuple[str, ...]] = RESUMABLE_KEYS

    # run
    output_dir: str = _key("outputs/moco-digits", "folder of the run: config.yaml, checkpoints/, final/, logs", RUN)
    overwrite_output_dir: bool = _key(False, "start over in an output_dir that holds another run (deletes it)", RUN)
    seed: int = _key(0, "seed of the model initialisation, data order and augmentation", RUN)
    max_steps: int = _key(-1, "optimizer steps to train; > 0 overrides num_epochs", RUN)
    num_epochs: int = _key(30, "epochs over the training split (when max_steps <= 0)", RUN)
    batch_size: int = _key(128, "global batch over all processes (images per step)", RUN)
    save_steps: int = _key(0, "checkpoint every N steps (0: none; the final model is always saved)", RUN)
    save_total_limit: int = _key(3, "checkpoints kept (the oldest are deleted)", RUN)
    resume_from_checkpoint: str | None = _key(None, "a checkpoint folder, or auto: the newest in output_dir", RUN)
    stop_after_steps: int = _key(-1, "> 0: checkpoint and stop after this many steps (time-limited jobs)", RUN)
    log_steps: int = _key(10, "steps per log line / TensorBoard point", RUN)
    profile_steps: int = _key(0, "> 0: torch.profiler over this many steps after the first log window", RUN)
    report_to: str = _key("tensorboard", "tracker: tensorboard (output_dir/moco/), wandb, all, none", RUN)
    mixed_precision: str = _key("no", "no, fp16 or bf16 (the loss and softmax stay fp32)", RUN)
    compile: bool = _key(False, "torch.compile both encoders and the GPU augmentation (GPUs only; skipped on CPU)",
                         RUN)
    compile_mode: str = _key("default", "torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune, "
                             "max-autotune-no-cudagraphs", RUN)
    channels_last: bool = _key(False, "channels-last memory format for images and weights", RUN)
    gradient_checkpointing: bool = _key(False, "recompute the query encoder's activations in backward: less memory "
                                        "(bigger batches on one GPU), about a third more compute", RUN)
    cudnn_benchmark: bool = _key(True, "let cuDNN time its convolution algorithms once (fixed shapes)", RUN)

    # data
    dataset_name: str | None = _key(None, "Hub dataset, e.g. ILSVRC/imagenet-1k (none: train_dir or the digits)",
                                    DATA)
    dataset_config: str | None = _key(None, "configuration of the Hub dataset", DATA)
    train_dir: str | None = _key(None, "local image folder (class/xxx.jpg), parquet or webdataset .tar shards", DATA)
    train_split: str = _key("train", "split to pretrain on", DATA)
    eval_split: str | None = _key("test", "labelled held-out split for the kNN monitor (none: no monitor)", DATA)
    image_column: str | None = _key(None, "image column (detected when none)", DATA)
    label_column: str | None = _key(None, "label column (detected when none)", DATA)
    num_workers: int = _key(1, "DataLoader worker processes per process", DATA)
    num_shards: int = _key(16, "shards of a local dataset's stream (>= processes x workers)", DATA)
    shuffle_buffer: int = _key(10_000, "images in the streaming shuffle buffer", DATA)
    num_train_examples: int | None = _key(None, "size of the training split when the source does not say "
                                                "(webdataset)", DATA)
    augmentation: str = _key("digits", "augmentation preset: v1, v2, cifar, digits, v3 (BYOL's asymmetric views) or "
                                      "v3_cifar (v3 without blur); moco_hf/data/presets.py", DATA)
    image_size: int = _key(32, "crop size in pixels", DATA)
    crop_min_scale: float | None = _key(0.4, "RandomResizedCrop minimum area fraction (none: the preset's, as "
                                             "published; the digits demo uses 0.4)", DATA)
    gpu_augment: str = _key("auto", "augment whole batches on the device: auto (on CUDA), on, off", DATA)
    device_decode: str = _key("workers", "with gpu_augment, who decodes JPEGs: workers, threads or nvjpeg", DATA)
    decode_threads: int = _key(0, "device_decode threads: how many (0: the free CPU cores, at least 2)", DATA)
    device_cache: str = _key("auto", "with gpu_augment, decode the split once into device memory: auto (when it "
                                     "fits), on, off", DATA)
    device_cache_gb: float = _key(4.0, "the most device memory the cache may take, per process (GiB)", DATA)

    # model (MoCoConfig)
    backbone: str = _key("test_resnet", "timm architecture, e.g. resnet50, cifar_resnet18, vit_small_patch16_224",
                         MODEL)
    backbone_kwargs: dict = _key({}, "extra timm.create_model arguments, e.g. {drop_path_rate: 0.1}", MODEL)
    embed_dim: int = _key(128, "dimension of the embeddings q and k", MODEL)
    queue_size: int = _key(1024, "K, negative keys in the queue (>= keys enqueued per step); 0: MoCo v3, the batch's "
                                 "keys are the negatives", MODEL)
    momentum: float = _key(0.99, "m, key-encoder momentum (the start value with momentum_schedule cosine)", MODEL)
    tau: float = _key(0.2, "softmax temperature (v1 0.07, v2 0.2, v3 0.2 for ViTs and 1.0 for ResNets)", MODEL)
    mlp_head: bool = _key(True, "v2's 2-layer MLP head (false: v1's linear head)", MODEL)
    mlp_hidden_dim: int | None = _key(None, "hidden width of the MLP head (none: the backbone's width)", MODEL)
    mlp_layers: int = _key(2, "linear layers of the MLP head (v2: 2; v3: 3 for ViTs, 2 for ResNets)", MODEL)
    mlp_bn: bool = _key(False, "BatchNorm in the MLP head (v3): BN + ReLU after hidden layers, affine-free BN last",
                        MODEL)
    predictor_hidden_dim: int = _key(0, "hidden width of v3's prediction head on the queries (0: none; v3: 4096)",
                                     MODEL)
    predictor_last_bn: bool = _key(False, "affine-free BatchNorm after the prediction head (v3 ViTs)", MODEL)
    freeze_patch_embed: bool = _key(False, "keep a ViT's patch projection at its random init (v3's stability trick)",
                                    MODEL)
    sincos_pos_embed: bool = _key(False, "fixed 2-D sin-cos position embeddings for a ViT (v3)", MODEL)
    shuffle_bn: bool = _key(True, "shuffle BN across processes (or across bn_splits chunks)", MODEL)
    bn_splits: int = _key(1, "normalise the batch in this many chunks, as that many GPUs would", MODEL)
    symmetric: bool = _key(True, "symmetric loss (each view once as query, once as key)", MODEL)

    # optimisation
    optimizer: str = _key("sgd", "sgd (v1, v2), adamw (v3 ViTs) or lars (v3 ResNets), the last two timm's", OPTIM)
    base_lr: float = _key(0.06, "learning rate for a global batch of 256; lr = base_lr x batch_size / 256", OPTIM)
    weight_decay: float = _key(5e-4, "weight decay (sgd: every parameter; adamw, lars: not biases and norm weights)",
                               OPTIM)
    sgd_momentum: float = _key(0.9, "momentum of sgd and lars", OPTIM)
    momentum_schedule: str = _key("constant", "key-encoder momentum per step: constant, or cosine from momentum to 1 "
                                              "(v3)", OPTIM)
    lr_schedule: str = _key("cosine", "cosine (per step) or step (/10 at each of lr_steps)", OPTIM)
    lr_steps: list = _key([120, 160], "epochs where the step schedule divides the lr by 10", OPTIM)
    warmup_epochs: float = _key(0.0, "epochs of linear warm-up", OPTIM)

    # kNN monitor (official CIFAR demo: k=200, t=0.1)
    knn_every_epochs: int = _key(5, "epochs between kNN evaluations (0: only before and after training)", KNN)
    knn_k: int | None = _key(None, "neighbours that vote (none: the paper's 200, or a fifth of the smallest class "
                                   "of the bank when that is fewer)", KNN)
    knn_t: float = _key(0.1, "temperature of the neighbours' weights exp(similarity / t)", KNN)
    knn_max_train_samples: int = _key(50_000, "images in the memory bank", KNN)
    knn_max_eval_samples: int = _key(10_000, "held-out images classified", KNN)

    def model_kwargs(self) -> dict:
        names = ("backbone", "backbone_kwargs", "embed_dim", "queue_size", "momentum", "tau", "mlp_head",
                 "mlp_hidden_dim", "mlp_layers", "mlp_bn", "predictor_hidden_dim", "predictor_last_bn", "shuffle_bn",
                 "bn_splits", "symmetric", "freeze_patch_embed", "sincos_pos_embed")
        return {name: getattr(self, name) for name in names}

    def validate(self) -> None:
        """Values that are wrong whatever the data and the machine: ValueError saying what would be right."""
        choices = {
            "mixed_precision": ("no", "fp16", "bf16"),
            "lr_schedule": ("cosine", "step"),
            "augmentation": ("v1", "v2", "cifar", "digits", "v3", "v3_cifar"),
            "optimizer": ("sgd", "adamw", "lars"),
            "momentum_schedule": ("constant", "cosine"),
            "gpu_augment": ("auto", "on", "off"),
            "device_decode": ("workers", "threads", "nvjpeg"),
            "device_cache": ("auto", "on", "off"),
            "report_to": ("tensorboard", "wandb", "all", "none"),
            "compile_mode": COMPILE_MODES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.knn_k is not None and self.knn_k < 1:
            raise ValueError(f"knn_k must be >= 1 (or none for the automatic choice), got {self.knn_k}")
        for name in ("batch_size", "image_size", "num_shards", "log_steps", "save_total_limit",
                     "embed_dim", "bn_splits", "mlp_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_workers", "save_steps", "knn_every_epochs", "warmup_epochs", "shuffle_buffer",
                     "profile_steps", "decode_threads", "weight_decay", "sgd_momentum", "queue_size",
                     "predictor_hidden_dim"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] (the paper uses 0.999), got {self.momentum}")
        if not self.tau > 0 or not self.base_lr > 0 or not self.knn_t > 0:
            raise ValueError(f"tau, base_lr and knn_t must be > 0, got {self.tau}, {self.base_lr}, {self.knn_t}")
        if self.crop_min_scale is not None and not 0.0 < self.crop_min_scale <= 1.0:
            raise ValueError(f"crop_min_scale must be in (0, 1] (or none for the preset's), got {self.crop_min_scale}")
        if self.compile_mode != "default" and not self.compile:
            raise ValueError(f"compile_mode={self.compile_mode!r} only applies to compiled encoders: set compile: true "
                             f"as well, or leave compile_mode at 'default'")
        if not self.device_cache_gb > 0:
            raise ValueError(f"device_cache_gb must be > 0, got {self.device_cache_gb}")
        if self.num_train_examples is not None and self.num_train_examples < 1:
            raise ValueError(f"num_train_examples must be >= 1, got {self.num_train_examples}")
        if self.max_steps <= 0 and self.num_epochs <= 0:
            raise ValueError("set max_steps > 0 or num_epochs > 0")
        if self.queue_size == 0 and self.bn_splits > 1:
            raise ValueError(f"bn_splits={self.bn_splits} with queue_size 0: MoCo v3 normalises over the whole batch "
                             "(synchronised across processes); use bn_splits 1")
        if self.queue_size == 0 and self.batch_size < 2:
            raise ValueError("queue_size 0 takes the negatives from the batch: use batch_size >= 2")
        if 0 < self.queue_size < self.batch_size * (2 if self.symmetric else 1):
            raise ValueError(
                f"queue_size={self.queue_size} is smaller than the keys enqueued per step "
                f"({self.batch_size}{' x 2' if self.symmetric else ''}); use queue_size >= that (or 0: MoCo v3, "
                "no queue)"
            )
        if self.dataset_name and self.train_dir:
            raise ValueError("set either dataset_name (Hub) or train_dir (local folder), not both")
        if self.resume_from_checkpoint and self.overwrite_output_dir:
            raise ValueError("resume_from_checkpoint continues a run and overwrite_output_dir deletes it: set one")


# ---------------------------------------------------------------------------------------------------------
# Reading the config: defaults <- YAML file <- --key value
# ---------------------------------------------------------------------------------------------------------


def _field_types() -> dict[str, typing.Any]:
    return typing.get_type_hints(PretrainConfig)


def parse_value(name: str, text: str):
    """Convert a command-line string to the type of config field `name`."""
    kind = _field_types()[name]
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    base = args[0] if args else kind
    if text.lower() in ("none", "null") and type(None) in typing.get_args(kind):
        return None
    origin = typing.get_origin(base) or base
    if origin is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{name} expects true or false, got {text!r}")
    if origin in (list, dict):
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = None
        if not isinstance(value, origin):
            raise ValueError(f"--{name} expects a {origin.__name__} (YAML syntax, e.g. [1, 2] or {{a: 1}}), got {text!r}")
        return value
    try:
        return origin(text)
    except ValueError:
        raise ValueError(f"--{name} expects {origin.__name__}, got {text!r}") from None


def _check_type(name: str, value):
    """A YAML value of the field's type (YAML's 3 for a float field is fine); ValueError otherwise."""
    if isinstance(value, str):  # YAML reads 1e-4 and `none` as strings: give them the field's type
        return parse_value(name, value)
    kind = _field_types()[name]
    allowed = tuple(typing.get_origin(a) or a for a in (typing.get_args(kind) or (kind,)))
    if value is None and type(None) in allowed:
        return None
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if str in allowed and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. `train_split: 2019`
    if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
        expected = " or ".join(a.__name__ for a in allowed if a is not type(None))
        raise ValueError(f"{name} expects {expected}, got {value!r}")
    return value


def load_config(config_path: str | None = None, overrides: list[str] | None = None) -> PretrainConfig:
    """Defaults <- YAML file <- `--key value` / `--key=value` overrides. Unknown keys, values of the wrong type and
    values out of range are a ValueError (FileNotFoundError for a missing file) that names the fix."""
    valid = [f.name for f in dataclasses.fields(PretrainConfig)]
    values: dict = {}
    if config_path:
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"config file {config_path!r} not found (the shipped ones are in configs/)")
        try:
            with open(config_path) as f:
                values = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"{config_path} is not valid YAML{where}: {problem} (expected `key: value` lines)") \
                from None
        if not isinstance(values, dict):
            raise ValueError(f"{config_path} must hold a mapping of config keys (`key: value` lines)")
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown} in {config_path}; valid keys: {', '.join(valid)}")
        values = {k: _check_type(k, v) for k, v in values.items()}
    overrides = list(overrides or [])
    i = 0
    while i < len(overrides):
        token = overrides[i]
        if not token.startswith("--"):
            raise ValueError(f"expected --key value, got {token!r}")
        key, eq, text = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(overrides):
                raise ValueError(f"--{key} needs a value")
            text = overrides[i + 1]
            i += 1
        key = key.replace("-", "_")
        if key not in valid:
            raise ValueError(f"unknown config key --{key}; valid keys: {', '.join(valid)} (see --help)")
        values[key] = parse_value(key, text)
        i += 1
    config = PretrainConfig(**values)
    config.validate()
    return config


def format_help() -> str:
    """`--help`: the launch commands, then every key with its type, default and one line of description."""
    lines = [__doc__.split("\n\nThis file holds")[0].rstrip(), "", "options:",
             "  --config FILE                  YAML file of keys (configs/*.yaml); --key value overrides it",
             "  --debug                        show the full traceback of an error (or MOCO_HF_DEBUG=1)",
             "  -h, --help                     this text"]
    types = _field_types()
    group = None
    for f in dataclasses.fields(PretrainConfig):
        if f.metadata["group"] != group:
            group = f.metadata["group"]
            lines += ["", f"{group}:"]
        kind = types[f.name]
        name = "/".join(getattr(a, "__name__", str(a)) for a in typing.get_args(kind) if a is not type(None)) \
            if typing.get_args(kind) else getattr(kind, "__name__", str(kind))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default = "none" if default is None else str(default).lower() if isinstance(default, bool) else default
        left = f"  --{f.name} {name.upper()}"
        lines.append(f"{left:<32} {f.metadata['help']} (default: {default})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> PretrainConfig | None:
    """The config of `argv` (`--config FILE` and `--key value` pairs), or None after printing `--help`."""
    argv = list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(format_help())
        return None
    config_path = None
    for i, arg in enumerate(argv):
        if arg == "--config":
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ValueError("--config needs a YAML file, e.g. --config configs/demo_digits.yaml")
            config_path = argv[i + 1]
            del argv[i:i + 2]
            break
        if arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
            del argv[i]
            break
    return load_config(config_path, argv)


def train(cfg: PretrainConfig):
    """Run pretraining (`moco_hf.pretraining.train`): imported here, once the config is known to be good."""
    from moco_hf.pretraining import train as run

    return run(cfg)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("MOCO_HF_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        cfg = parse_args(argv)
    except (ValueError, FileNotFoundError) as err:  # before any heavy import: answers at once
        if debug:
            raise
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    if cfg is None:
        return 0
    from moco_hf.cli import run_command
    from moco_hf.training import PREEMPTED

    return run_command(PROG, lambda: PREEMPTED if train(cfg).preempted else 0, debug=debug)


if __name__ == "__main__":
    sys.exit(main())

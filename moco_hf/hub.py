"""Publishing a MoCo run on the Hugging Face Hub: image processor, timm-format backbone, model card, upload.

`stage` builds, and `push` uploads, this layout (huggingface_hub 2.x `HfApi`, no git):

    USER/NAME                        AutoModel.from_pretrained("USER/NAME", trust_remote_code=True)
      config.json                    MoCoConfig; auto_map: AutoConfig, AutoModel, AutoModelForImageClassification
      model.safetensors              query + key encoders and queue (safetensors only, never a pickle)
      configuration_moco.py          the code that trust_remote_code runs
      modeling_moco.py
      backbones.py                   small-image ResNets (cifar_resnet18, ...) registered with timm on import
      preprocessor_config.json       BitImageProcessor = the backbone's timm eval transform
      README.md                      model card
      backbone/                      the query backbone alone, in timm's hub format
        config.json                  architecture, num_features, model_args, pretrained_cfg (also the
        model.safetensors            image processor: transformers reads pretrained_cfg as TimmWrapperImageProcessor)
        README.md

    USER/NAME-timm                   the files of backbone/ at the repository root (`backbone_repo_id`)

Why the backbone also gets its own repository: timm 1.0.31 reads `hf-hub:` names as `owner/name[@revision]` and
downloads `config.json` and the weights from the repository root (`timm.models._hub.hf_split` +
`hf_hub_download(repo_id, "config.json")`, no subfolder argument); `hf-hub:USER/NAME/backbone` is refused by
huggingface_hub's repo id validation. So `timm.create_model("hf-hub:USER/NAME-timm", pretrained=True)` needs a
repository whose root is the backbone. `backbone/` stays in the main repository so that one repository holds the
whole run: transformers loads it with `AutoModel.from_pretrained("USER/NAME", subfolder="backbone")` (TimmWrapper)
and timm with `local-dir:` after `snapshot_download(..., allow_patterns="backbone/*")`.
"""

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
from huggingface_hub import HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.errors import HFValidationError, HfHubHTTPError
from huggingface_hub.utils import validate_repo_id
from torch import nn

from . import __version__
from .backbones import SMALL_IMAGE_RESNETS
from .configuration_moco import MoCoConfig
from .modeling_moco import MoCoForImageClassification, MoCoModel
from .preprocessing import (
    _backbone_of,
    default_data_config,
    flat_scalars,
    image_processor_from_data_config,
    resolve_data_config,
    run_records,
    save_image_processor,
)
from .run_folder import share_files

BACKBONE_SUBFOLDER = "backbone"
BACKBONE_REPO_SUFFIX = "-timm"
_WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"
)
_SECRET_WORDS = ("token", "secret", "password", "api_key", "apikey", "credential")


class HubError(Exception):
    """An expected failure (bad model folder, no token, refused upload): the CLI prints it as one line."""


# ---------------------------------------------------------------------------------------------------------
# Loading a run folder
# ---------------------------------------------------------------------------------------------------------


def load_moco(model_dir: str | os.PathLike) -> MoCoModel | MoCoForImageClassification:
    """A MoCo folder written by `save_pretrained` (pretraining or linear evaluation), in eval mode.

    Raises `HubError` with the reason when the folder is missing, is not a MoCo model or has no weights.
    """
    path = Path(model_dir)
    if not path.is_dir():
        raise HubError(f"model directory {str(path)!r} does not exist (expected the folder written by save_pretrained)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise HubError(f"{str(path)!r} has no config.json: not a folder written by save_pretrained")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HubError(f"{config_file} is not valid JSON: {e}") from e
    if config.get("model_type") != MoCoConfig.model_type:
        raise HubError(
            f"{str(path)!r} holds a {config.get('model_type')!r} model, not a MoCo model (model_type 'moco')"
        )
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        raise HubError(f"{str(path)!r} has no weights (expected one of {', '.join(_WEIGHT_FILES)})")
    is_classifier = "MoCoForImageClassification" in (config.get("architectures") or [])
    model_class = MoCoForImageClassification if is_classifier else MoCoModel
    try:
        return model_class.from_pretrained(path).eval()
    except (OSError, ValueError, RuntimeError) as e:
        raise HubError(f"could not load {str(path)!r} as {model_class.__name__}: {_first_line(e)}") from e


def _as_model(model_or_dir) -> nn.Module:
    return model_or_dir if isinstance(model_or_dir, nn.Module) else load_moco(model_or_dir)




# ---------------------------------------------------------------------------------------------------------
# timm-format backbone
# ---------------------------------------------------------------------------------------------------------


def export_timm_backbone(
    moco_model_or_dir,
    out_dir: str | os.PathLike,
    data_config: dict[str, Any] | None = None,
    license: str | None = None,
) -> Path:
    """Write the query backbone alone in timm's hub format: `config.json` + `model.safetensors`.

    Written by timm's own `timm.models.save_for_hf` (safetensors only; config: architecture, num_features, model_args,
    pretrained_cfg with the eval preprocessing) except that `num_classes` is removed from `model_args`:
    transformers' TimmWrapper calls `timm.create_model(architecture, num_classes=..., **model_args)`, which fails
    with "got multiple values for keyword argument 'num_classes'" when model_args has it. timm still builds the
    classifier-free model from the root `num_classes: 0`. Loads with `timm.create_model("local-dir:" + out_dir,
    pretrained=True)` and with transformers `AutoModel` / `AutoModelForImageClassification(num_labels=N)`.
    """
    model = _as_model(moco_model_or_dir)
    backbone = _backbone_of(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    data = resolve_data_config(backbone, data_config)
    keys = ("input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std")
    pretrained_cfg = {"tag": "moco", "num_classes": 0}
    if license:
        pretrained_cfg["license"] = license
    timm.models.save_for_hf(
        backbone,
        out,
        model_config={"pretrained_cfg": pretrained_cfg},
        safe_serialization=True,
        data_config={k: data[k] for k in keys if k in data},
    )
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    model_args = config.get("model_args", {})
    model_args.pop("num_classes", None)
    if model_args:
        config["model_args"] = model_args
    else:
        config.pop("model_args", None)
    config["num_classes"] = 0
    config["pretrained_cfg"]["num_classes"] = 0
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return out


# ---------------------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------------------


def read_run_records(model_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """`metrics.json`, `training_config.json`, `training_args.json` of a run folder, where present
    (`preprocessing.run_records`), with the keys that look like secrets (hub_token, ...) dropped and tokens inside
    strings redacted, so they can never reach the model card."""
    secrets = known_secrets()
    return {name: _without_secrets(value, secrets) for name, value in run_records(model_dir).items()}


# A Hugging Face user access token: "hf_" and 34 letters or digits (older ones had other lengths).
_TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{30,}")


def known_secrets(*tokens: str | None) -> list[str]:
    """The tokens a run could have leaked: those given, and the one this machine uses (`HF_TOKEN` or the stored
    login), longest first."""
    found = {t for t in tokens if t}
    stored = get_token()
    if stored:
        found.add(stored)
    return sorted(found, key=len, reverse=True)


def _without_secrets(value, secrets: list[str]):
    """`value` with keys that look like secrets (hub_token, ...) dropped, and tokens inside strings (a recorded
    command line, say) replaced by ***: the known ones and anything shaped like one."""
    if isinstance(value, dict):
        return {k: _without_secrets(v, secrets) for k, v in value.items()
                if not any(w in str(k).lower() for w in _SECRET_WORDS)}
    if isinstance(value, list):
        return [_without_secrets(v, secrets) for v in value]
    if isinstance(value, str):
        return _redact(value, secrets)
    return value


def _files_with_secrets(folder: Path, secrets: list[str]) -> list[str]:
    """Files under `folder` (relative paths) that hold one of `secrets` or anything shaped like a token."""
    pattern = re.compile(_TOKEN_PATTERN.pattern.encode())
    leaked = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if pattern.search(data) or any(secret.encode() in data for secret in secrets):
            leaked.append(path.relative_to(folder).as_posix())
    return leaked




def build_model_card(
    model_dir: str | os.PathLike,
    repo_id: str,
    *,
    backbone_repo_id: str | None = None,
    license: str = "apache-2.0",
    datasets: list[str] | None = None,
    config: MoCoConfig | None = None,
) -> ModelCard:
    """The README.md of the main repository: metadata (library transformers, pipeline image-feature-extraction,
    tags, license, datasets); the results recorded in `model_dir` (a table of top-1 accuracies with protocol,
    split and the random-init and raw-pixel baselines, the label-efficiency rows, linear evaluation and
    fine-tuning where present, the pictures); the MoCo and the training configuration (each key once) and
    copy-paste usage for transformers, moco_hf and timm.
    """
    config = config or MoCoConfig.from_pretrained(model_dir)
    backbone_repo_id = backbone_repo_id or f"{repo_id}{BACKBONE_REPO_SUFFIX}"
    records = read_run_records(model_dir)
    training = {}
    for name in ("training_config.json", "training_args.json"):
        training.update(flat_scalars(records.get(name, {})))
    if not datasets:
        names = ("dataset_name", "dataset", "data.dataset")
        found = next((training[k] for k in names if isinstance(training.get(k), str)), None)
        datasets = [found] if found and _is_repo_id(found) else None

    version = config.moco_version
    is_classifier = "MoCoForImageClassification" in (config.architectures or [])
    data = ModelCardData(
        library_name="transformers",
        license=license,
        pipeline_tag="image-classification" if is_classifier else "image-feature-extraction",
        tags=["moco", f"moco-{version}", "self-supervised", "contrastive", "timm", config.backbone],
        datasets=datasets,
    )

    lines = [
        f"# MoCo {version} / {config.backbone}",
        "",
        f"Momentum Contrast (MoCo {version}) pretraining of a timm `{config.backbone}` backbone, saved with "
        "moco_hf as a transformers `PreTrainedModel`. The query encoder's pooled features "
        f"(`pooler_output`) are the representation; the key encoder and the "
        f"{'prediction head' if version == 'v3' else 'queue'} are kept so training can resume.",
        "",
        "- He et al., 2019, *Momentum Contrast for Unsupervised Visual Representation Learning* (MoCo v1), "
        "arXiv:1911.05722",
        "- Chen et al., 2020, *Improved Baselines with Momentum Contrastive Learning* (MoCo v2), arXiv:2003.04297",
        *(["- Chen, Xie and He, 2021, *An Empirical Study of Training Self-Supervised Vision Transformers* (MoCo v3), "
           "arXiv:2104.02057"] if version == "v3" else []),
        "",
        "## Results",
        "",
        *_results(records.get("metrics.json", {}), training, config, model_dir),
    ]
    hidden = ("transformers_version", "architectures", "model_type", "dtype", "auto_map")
    model_config = {k: v for k, v in flat_scalars(config.to_diff_dict()).items() if k.split(".")[0] not in hidden}
    lines += ["", "## Model configuration", "", *_table(model_config)]
    training = {k: v for k, v in training.items() if k not in model_config}  # each key once
    if training:
        lines += ["", "## Training configuration", "", *_table(training)]
    lines += ["", "## Usage", "", _usage(repo_id, backbone_repo_id, config.backbone)]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


# Metrics shown in the results table, with their protocol, and the keys of their baselines.
_ROWS = (
    ("kNN", "knn_acc", ("knn_random_init", "knn_pixels")),
    ("linear probe", "probe_acc", ("probe_random_init", "probe_pixels")),
)
_PICTURES = {"nearest_neighbours.png": "nearest neighbours", "feature_map.png": "feature map"}


def _pct(value) -> str:
    return f"{value:.2f} %" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _recipe(config: MoCoConfig, training: dict[str, Any]) -> str:
    """The recipe in one line, from the model and the training configuration."""
    parts = [f"MoCo {config.moco_version}", f"`{config.backbone}`"]
    if isinstance(training.get("steps"), int):
        parts.append(f"{training['steps']} steps")
    elif training.get("num_epochs"):
        parts.append(f"{training['num_epochs']} epochs")
    if training.get("batch_size"):
        parts.append(f"batch {training['batch_size']}")
    parts += [f"K {config.queue_size}" if config.queue_size else "negatives from the batch",
              f"m {config.momentum:g}", f"tau {config.tau:g}"]
    if training.get("base_lr") is not None:
        lr = training["base_lr"] * training.get("batch_size", 256) / 256
        optimizer = {"sgd": "SGD", "adamw": "AdamW", "lars": "LARS"}.get(training.get("optimizer", "sgd"), "SGD")
        parts.append(f"{optimizer} lr {lr:g} ({training.get('lr_schedule', 'cosine')})")
    if training.get("augmentation"):
        crop = training.get("crop_min_scale")
        parts.append(f"augmentation {training['augmentation']}" + (f" (crops {crop:g}-1)" if crop else ""))
    if training.get("image_size"):
        parts.append(f"{training['image_size']} px")
    return ", ".join(parts)


def _results(metrics: dict[str, Any], training: dict[str, Any], config: MoCoConfig, model_dir) -> list[str]:
    """The results section: training data and recipe, one table of top-1 accuracies with protocol, split and the
    baselines, the label-efficiency rows, the pictures, then the other recorded metrics (each key once)."""
    if not metrics:
        return ["No metrics were recorded with this checkpoint."]
    evaluation = metrics.get("evaluation") if isinstance(metrics.get("evaluation"), dict) else {}
    dataset = evaluation.get("dataset") or training.get("dataset_name") or "a local or embedded dataset"
    lines = [f"Trained on {dataset}. Recipe: {_recipe(config, training)}.", ""]
    shown = {"evaluation", "label_efficiency", "pictures"}
    split = evaluation.get("split", f"'{training.get('eval_split', 'test')}'")
    rows = []
    for name, key, baselines in _ROWS:
        if key in metrics:
            protocol = evaluation.get("knn" if key.startswith("knn") else "probe", "")
            if key == "knn_acc" and "knn_k" in metrics and not protocol:
                protocol = f"weighted kNN, k={metrics['knn_k']}"
            rows.append(f"| {name} | {protocol} | {split} | **{_pct(metrics[key])}** | "
                        f"{_pct(metrics.get(baselines[0]))} | {_pct(metrics.get(baselines[1]))} |")
            shown |= {key, *baselines, "knn_k"}
    for fraction, values in (metrics.get("label_efficiency") or {}).items():
        if fraction != "100%" and isinstance(values, dict):
            rows.append(f"| linear probe, {fraction.replace('%', ' %')} of the labels | class-balanced subset of "
                        f"the bank | {split} | **{_pct(values.get('learned'))}** | {_pct(values.get('random_init'))} | "
                        f"{_pct(values.get('pixels'))} |")
    linear = next((k for k in metrics if k in ("linear_top1", "lincls_top1")), None)
    if linear:
        protocol = metrics.get("linear_protocol", "SGD on frozen features (linear_eval.py)")
        rows.append(f"| linear evaluation | {protocol} | {metrics.get('linear_eval_split', split)} | "
                    f"**{_pct(metrics[linear])}** | {_pct(metrics.get(f'{linear}_random_init'))} | "
                    f"{_pct(metrics.get(f'{linear}_pixels'))} |")
        shown |= {linear, f"{linear}_random_init", f"{linear}_pixels", "linear_protocol", "linear_eval_split"}
    if "finetune_top1" in metrics:
        rows.append(f"| fine-tuned | the whole network (finetune.py) | {split} | **{_pct(metrics['finetune_top1'])}** "
                    f"| - | - |")
        shown |= {"finetune_top1"}
    if rows:
        lines += ["| top-1 accuracy | protocol | evaluated on | this model | random init | raw pixels |",
                  "| --- | --- | --- | --- | --- | --- |", *rows, ""]
        if evaluation.get("bank"):
            baselines = evaluation.get("baselines", "the backbone at random initialisation and raw pixels")
            lines.append(f"Bank (kNN) and probe training data: {evaluation['bank']}. Baselines, with the same "
                         f"protocol: {baselines}.")
            lines.append("")
    pictures = [name for name in _PICTURES if (Path(model_dir) / name).is_file()]
    for name in pictures:
        lines += [f"![{_PICTURES[name]}]({name})", ""]
    rest = {k: v for k, v in flat_scalars(metrics).items() if k.split(".")[0] not in shown}
    if rest:
        lines += ["Other metrics recorded by the run (`metrics.json`):", "", *_table(rest)]
    return lines


def _table(values: dict[str, Any]) -> list[str]:
    rows = ["| key | value |", "| --- | --- |"]
    for key, value in values.items():
        text = json.dumps(value) if not isinstance(value, str) else value
        text = text if len(text) <= 200 else text[:197] + "..."
        rows.append(f"| `{key}` | {text.replace('|', '&#124;')} |")
    return rows


def _timm_import(backbone: str) -> str:
    """The import a timm snippet needs first for an architecture moco_hf registers (plain timm lacks it)."""
    if backbone in SMALL_IMAGE_RESNETS:
        return f"import moco_hf  # registers {backbone} with timm (plain timm does not know it)\n"
    return ""


def _usage(repo_id: str, backbone_repo_id: str, backbone: str) -> str:
    return f'''Features with transformers only (the modeling code ships with the weights):

```python
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

processor = AutoImageProcessor.from_pretrained("{repo_id}")
model = AutoModel.from_pretrained("{repo_id}", trust_remote_code=True).eval()
with torch.no_grad():
    features = model(**processor(Image.open("cat.jpg"), return_tensors="pt")).pooler_output  # N x num_features

# or: pipeline("image-feature-extraction", model="{repo_id}", trust_remote_code=True)(image, pool=True)
```

With moco_hf installed (resume pretraining, or linear evaluation on frozen features):

```python
import moco_hf

model = moco_hf.MoCoModel.from_pretrained("{repo_id}")
classifier = moco_hf.MoCoForImageClassification.from_pretrained("{repo_id}", num_labels=10, freeze_backbone=True)
```

The backbone alone, in timm's format (`{backbone_repo_id}`, the same files as `{BACKBONE_SUBFOLDER}/` here):

```python
{_timm_import(backbone)}import timm
from transformers import AutoModel, AutoModelForImageClassification

backbone = timm.create_model("hf-hub:{backbone_repo_id}", pretrained=True)  # num_classes=0: pooled features
transform = timm.data.create_transform(**timm.data.resolve_data_config({{}}, model=backbone))

wrapped = AutoModel.from_pretrained("{backbone_repo_id}")  # transformers TimmWrapperModel
finetune = AutoModelForImageClassification.from_pretrained("{backbone_repo_id}", num_labels=10)
```'''


def build_backbone_card(
    repo_id: str, backbone_repo_id: str, config: MoCoConfig, license: str = "apache-2.0"
) -> ModelCard:
    """The README.md of the timm-format backbone repository."""
    data = ModelCardData(
        library_name="timm",
        license=license,
        pipeline_tag="image-feature-extraction",
        tags=["moco", "self-supervised", "contrastive", "timm", "transformers", config.backbone],
    )
    body = f'''# {config.backbone}, MoCo-pretrained (timm format)

The query backbone of [{repo_id}](https://huggingface.co/{repo_id}) without classifier (`num_classes=0`),
in timm's format.

```python
{_timm_import(config.backbone)}import timm
from transformers import AutoModel

backbone = timm.create_model("hf-hub:{backbone_repo_id}", pretrained=True)
classifier = timm.create_model("hf-hub:{backbone_repo_id}", pretrained=True, num_classes=10)
wrapped = AutoModel.from_pretrained("{backbone_repo_id}")  # transformers TimmWrapperModel
```
'''
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


# ---------------------------------------------------------------------------------------------------------
# Staging and upload
# ---------------------------------------------------------------------------------------------------------


def _check_repo_id(repo_id: str, what: str = "repo_id") -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubError(f"{what} {repo_id!r} is not a valid repository id: {_first_line(e)}") from e
    if repo_id.count("/") != 1:
        raise HubError(f"{what} {repo_id!r} must name its owner: USER/NAME or ORG/NAME")






def stage(
    model_dir: str | os.PathLike,
    staging_dir: str | os.PathLike,
    repo_id: str,
    *,
    backbone_repo_id: str | None = None,
    data_config: dict[str, Any] | None = None,
    license: str = "apache-2.0",
    datasets: list[str] | None = None,
    token: str | None = None,
) -> list[str]:
    """Build in `staging_dir` exactly what `push` uploads (see the module docstring for the layout) and return
    the relative paths of its files. `staging_dir` must be new or empty.

    Tokens never reach the staged files: recorded values are scrubbed (`read_run_records`), and if a staged file
    still holds `token`, this machine's token or anything shaped like one, nothing is staged and `HubError` names
    the files (not the token). The files are built in a temporary folder beside `staging_dir` and renamed into place
    when complete, so a failing call leaves nothing behind."""
    _check_repo_id(repo_id)
    backbone_repo_id = backbone_repo_id or f"{repo_id}{BACKBONE_REPO_SUFFIX}"
    _check_repo_id(backbone_repo_id, "backbone_repo_id")
    out = Path(staging_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HubError(f"staging directory {str(out)!r} exists and is not empty; give a new or empty directory")
    model = load_moco(model_dir)
    try:
        data_config = resolve_data_config(model, default_data_config(model_dir) if data_config is None else data_config)
        image_processor_from_data_config(data_config)
    except ValueError as e:
        raise HubError(f"no eval preprocessing for backbone {model.config.backbone!r}: {e}") from e
    out.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        files = _build_staging(model, model_dir, building, repo_id, backbone_repo_id, data_config, license, datasets,
                               token)
        if out.exists():
            out.rmdir()  # new or empty, checked above
        os.replace(building, out)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return files


def _build_staging(model, model_dir, out: Path, repo_id: str, backbone_repo_id: str, data_config: dict,
                   license: str, datasets: list[str] | None, token: str | None) -> list[str]:
    """The staged files of `stage`, written into `out`."""
    model.save_pretrained(out, safe_serialization=True)  # config.json with the complete auto_map (the model classes)
    # copied by save_pretrained (the classes' _auto_class) with the relative imports they need
    for name in ("configuration_moco.py", "modeling_moco.py", "backbones.py"):
        if not (out / name).is_file():
            shutil.copy(Path(__file__).with_name(name), out / name)
    for pickled in out.glob("*.bin"):
        pickled.unlink()

    save_image_processor(model, out, data_config)
    for picture in _PICTURES:  # shown by the model card on the Hub page
        if (Path(model_dir) / picture).is_file():
            shutil.copy(Path(model_dir) / picture, out / picture)
    build_model_card(
        model_dir, repo_id, backbone_repo_id=backbone_repo_id, license=license, datasets=datasets, config=model.config
    ).save(out / "README.md")

    backbone_dir = export_timm_backbone(model, out / BACKBONE_SUBFOLDER, data_config=data_config, license=license)
    build_backbone_card(repo_id, backbone_repo_id, model.config, license=license).save(backbone_dir / "README.md")
    leaked = _files_with_secrets(out, known_secrets(token))
    if leaked:  # e.g. a token in the model config: never leave it in a file, never upload it (`stage` removes `out`)
        raise HubError(f"a Hugging Face token appears in {', '.join(leaked)}; remove it from {model_dir}")
    share_files(out)  # safetensors writes 0600: the staged folder is for others to read
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


def resolve_token(token: str | None = None) -> str:
    """`token`, else `HF_TOKEN`, else the stored login (`huggingface_hub.get_token()`); `HubError` if none."""
    token = token or get_token()
    if not token:
        raise HubError(
            "no Hugging Face token: pass --token, set HF_TOKEN, or log in once with `hf auth login` "
            "(a token with write access)"
        )
    return token


@dataclass
class PushResult:
    repo_id: str
    backbone_repo_id: str | None
    files: list[str]
    commit_urls: list[str]


def push(
    model_dir: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    api: HfApi | None = None,
    *,
    backbone_repo_id: str | None = None,
    push_backbone: bool = True,
    data_config: dict[str, Any] | None = None,
    license: str = "apache-2.0",
    datasets: list[str] | None = None,
) -> PushResult:
    """Stage `model_dir` and upload it to `repo_id`, and its `backbone/` to `backbone_repo_id` (default
    `repo_id + "-timm"`) unless `push_backbone=False`: `create_repo(exist_ok=True)`, `create_branch(exist_ok=True)`
    when `revision` is given, then one `upload_folder` commit per repository.

    The token (argument, `HF_TOKEN` or stored login) only goes to `HfApi`; with `api` given, that object's own
    authentication is used. Either way no file holding a token is uploaded (`stage`), and failures raise
    `HubError` with the token redacted.
    """
    if api is None:
        api = HfApi(token=resolve_token(token), library_name="moco_hf", library_version=__version__)
    api_token = api.token if isinstance(getattr(api, "token", None), str) else None
    secrets = known_secrets(token, api_token)
    backbone_repo_id = backbone_repo_id or f"{repo_id}{BACKBONE_REPO_SUFFIX}"
    with tempfile.TemporaryDirectory(prefix="moco_hf_stage_") as tmp:
        staged = Path(tmp) / "repo"
        files = stage(
            model_dir, staged, repo_id, backbone_repo_id=backbone_repo_id, data_config=data_config,
            license=license, datasets=datasets, token=api_token or token,
        )
        message = commit_message or f"Upload MoCo model ({len(files)} files, moco_hf {__version__})"
        uploads = [(repo_id, staged, message)]
        if push_backbone:
            message = commit_message or f"Upload the timm-format backbone of {repo_id}"
            uploads.append((backbone_repo_id, staged / BACKBONE_SUBFOLDER, message))
        commit_urls = []
        for target, folder, message in uploads:
            try:
                url = api.create_repo(repo_id=target, private=private, exist_ok=True)
                target = getattr(url, "repo_id", None) or target
                if revision is not None:
                    api.create_branch(repo_id=target, branch=revision, exist_ok=True)
                info = api.upload_folder(
                    repo_id=target, folder_path=str(folder), commit_message=message, revision=revision
                )
            except (HfHubHTTPError, HFValidationError, OSError) as e:
                reason = f"upload to {target} failed: {type(e).__name__}: {_first_line(e)}"
                raise HubError(_redact(reason, secrets)) from None
            commit_urls.append(str(getattr(info, "commit_url", None) or info))
    return PushResult(repo_id, backbone_repo_id if push_backbone else None, files, commit_urls)


def _is_repo_id(name: str) -> bool:
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _redact(text: str, secrets: list[str]) -> str:
    """`text` with `secrets`, and anything shaped like a token, replaced by ***."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return _TOKEN_PATTERN.sub("***", text)


__all__ = [
    "BACKBONE_SUBFOLDER",
    "HubError",
    "PushResult",
    "build_backbone_card",
    "build_model_card",
    "export_timm_backbone",
    "known_secrets",
    "load_moco",
    "push",
    "read_run_records",
    "resolve_token",
    "stage",
]

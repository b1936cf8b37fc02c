"""moco_hf.hub and push_to_hub.py: staged layout, every loading path, image processor, model card, upload calls.

No network: uploads go to a fake `HfApi` whose calls are checked against the real method signatures.
"""

import importlib
import inspect
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from _tolerance import PIXEL, TINY_FORWARD
from huggingface_hub import HfApi, ModelCard
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification, BitImageProcessorPil

import moco_hf
from moco_hf import hub, preprocessing

REPO = Path(__file__).resolve().parents[1]
REPO_ID = "user/moco-tiny"
TOKEN = "hf_TestSecretToken0123456789abcdef"
STAGED_FILES = {
    "README.md",
    "config.json",
    "configuration_moco.py",
    "backbones.py",
    "model.safetensors",
    "modeling_moco.py",
    "preprocessor_config.json",
    "backbone/README.md",
    "backbone/config.json",
    "backbone/model.safetensors",
}


def _tiny_config(**kwargs) -> moco_hf.MoCoConfig:
    return moco_hf.MoCoConfig(backbone="test_resnet", embed_dim=8, queue_size=16, **kwargs)


def _images(n=2, size=32, seed=1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _smooth_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like (smooth) RGB image: random 6 x 8 colours upsampled."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny run: save_pretrained folder + metrics + training args (with a secret that must not leak)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("run")
    model = moco_hf.MoCoModel(_tiny_config()).eval()
    model.reset_queue()
    model.save_pretrained(root / "final")
    (root / "final" / "metrics.json").write_text(json.dumps({"knn_acc": 42.5, "linear_top1": 47.25, "epoch": 3}))
    (root / "final" / "training_args.json").write_text(
        json.dumps({"image_size": 32, "crop_pct": 1.0, "lr": 0.03, "batch_size": 8, "hub_token": TOKEN})
    )
    with torch.no_grad():
        reference = model(_images()).pooler_output
    return SimpleNamespace(dir=root / "final", model=model, reference=reference)


@pytest.fixture(scope="module")
def staged(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("staged") / "repo"
    files = hub.stage(run.dir, out, REPO_ID)
    return SimpleNamespace(dir=out, files=files)


# ---------------------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------------------


def test_stage_writes_exactly_the_upload_layout(staged):
    assert set(staged.files) == STAGED_FILES == _files(staged.dir)
    assert not [f for f in staged.files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]  # no pickle

    config = json.loads((staged.dir / "config.json").read_text())
    assert config["model_type"] == "moco" and config["architectures"] == ["MoCoModel"]
    assert config["auto_map"] == {
        "AutoConfig": "configuration_moco.MoCoConfig",
        "AutoModel": "modeling_moco.MoCoModel",
        "AutoModelForImageClassification": "modeling_moco.MoCoForImageClassification",
    }

    timm_config = json.loads((staged.dir / "backbone" / "config.json").read_text())
    assert timm_config["architecture"] == "test_resnet"
    assert timm_config["num_features"] == 96 and timm_config["num_classes"] == 0
    assert "num_classes" not in timm_config.get("model_args", {})  # TimmWrapper passes num_classes itself
    assert timm_config["pretrained_cfg"]["num_classes"] == 0
    assert timm_config["pretrained_cfg"]["input_size"] == [3, 32, 32]  # from training_args.json image_size
    assert timm_config["pretrained_cfg"]["crop_pct"] == 1.0


def test_stage_refuses_bad_model_dirs(tmp_path, run):
    with pytest.raises(hub.HubError, match="does not exist"):
        hub.stage(tmp_path / "missing", tmp_path / "a", REPO_ID)
    (tmp_path / "empty").mkdir()
    with pytest.raises(hub.HubError, match="no config.json"):
        hub.stage(tmp_path / "empty", tmp_path / "b", REPO_ID)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(hub.HubError, match="not a MoCo model"):
        hub.stage(other, tmp_path / "c", REPO_ID)
    (other / "config.json").write_text(json.dumps({"model_type": "moco", "backbone": "test_resnet"}))
    with pytest.raises(hub.HubError, match="no weights"):
        hub.stage(other, tmp_path / "d", REPO_ID)
    with pytest.raises(hub.HubError, match="must name its owner"):
        hub.stage(run.dir, tmp_path / "e", "no-owner")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(hub.HubError, match="not empty"):
        hub.stage(run.dir, tmp_path / "full", REPO_ID)


# ---------------------------------------------------------------------------------------------------------
# Every way of loading the staged folder gives the source model's features
# ---------------------------------------------------------------------------------------------------------


def test_staged_folder_loads_with_moco_hf(run, staged):
    model = AutoModel.from_pretrained(staged.dir).eval()
    assert isinstance(model, moco_hf.MoCoModel)
    with torch.no_grad():
        torch.testing.assert_close(model(_images()).pooler_output, run.reference, **TINY_FORWARD)
    assert torch.equal(model.queue, run.model.queue)  # loaded, not computed
    classifier = AutoModelForImageClassification.from_pretrained(staged.dir, num_labels=3).eval()
    with torch.no_grad():
        pooled = classifier.get_backbone()(_images())
    torch.testing.assert_close(pooled, run.reference, **TINY_FORWARD)


def test_backbone_loads_with_timm_local_dir(run, staged):
    backbone = timm.create_model(f"local-dir:{staged.dir / 'backbone'}", pretrained=True).eval()
    assert backbone.num_classes == 0
    with torch.no_grad():
        torch.testing.assert_close(backbone(_images()), run.reference, **TINY_FORWARD)
    # a new classifier on the pretrained backbone, as the backbone card shows
    classifier = timm.create_model(f"local-dir:{staged.dir / 'backbone'}", pretrained=True, num_classes=5).eval()
    with torch.no_grad():
        assert classifier(_images()).shape == (2, 5)
        features = classifier.forward_features(_images())
        torch.testing.assert_close(classifier.forward_head(features, pre_logits=True), run.reference, **TINY_FORWARD)


def test_backbone_loads_with_transformers_timm_wrapper(run, staged):
    for model in (
        AutoModel.from_pretrained(staged.dir / "backbone"),
        AutoModel.from_pretrained(staged.dir, subfolder="backbone"),
    ):
        assert type(model).__name__ == "TimmWrapperModel"
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(_images()).pooler_output, run.reference, **TINY_FORWARD)
    classifier = AutoModelForImageClassification.from_pretrained(staged.dir / "backbone", num_labels=4).eval()
    assert type(classifier).__name__ == "TimmWrapperForImageClassification"
    with torch.no_grad():
        assert classifier(_images()).logits.shape == (2, 4)
    # config.json is also the backbone's image processor: timm's own eval transform
    processor = AutoImageProcessor.from_pretrained(staged.dir / "backbone")
    assert type(processor).__name__ == "TimmWrapperImageProcessor"
    image = _smooth_image(45, 37)
    data_config = preprocessing.resolve_data_config(run.model, {"input_size": (3, 32, 32), "crop_pct": 1.0})  # training_args
    expected = timm.data.create_transform(**data_config)
    torch.testing.assert_close(processor(image)["pixel_values"][0], expected(image), **PIXEL)


@pytest.mark.parametrize(
    "backbone, kwargs",
    [("test_vit", {"depth": 1, "drop_path_rate": 0.1}), ("vit_tiny_patch16_224", {"img_size": 32, "depth": 2})],
)
def test_export_keeps_backbone_kwargs(tmp_path, backbone, kwargs):
    """Architecture kwargs reach timm and TimmWrapper through model_args (without num_classes; timm leaves drop
    rates out of exports by design); a fixed-size ViT keeps its 32 px in the exported preprocessing."""
    model = moco_hf.MoCoModel(moco_hf.MoCoConfig(backbone=backbone, backbone_kwargs=kwargs, embed_dim=8, queue_size=16))
    model.eval()
    out = hub.export_timm_backbone(model, tmp_path / "backbone")
    config = json.loads((out / "config.json").read_text())
    assert "num_classes" not in config["model_args"]
    assert config["model_args"]["depth"] == kwargs["depth"] and "drop_path_rate" not in config["model_args"]
    x = _images()
    with torch.no_grad():
        reference = model(x).pooler_output
        from_dir = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        torch.testing.assert_close(from_dir(x), reference, **TINY_FORWARD)
        torch.testing.assert_close(AutoModel.from_pretrained(out).eval()(x).pooler_output, reference, **TINY_FORWARD)
    if "img_size" in kwargs:
        assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]


@pytest.mark.parametrize("backbone", ["cifar_resnet10_slim", "cifar_resnet18"])
def test_small_image_resnets_load_from_their_export(tmp_path, backbone):
    """The CIFAR backbones (registered by moco_hf) load from the timm export as the cards show: local-dir:, a
    weights file with num_classes=0, and transformers' TimmWrapper."""
    model = moco_hf.MoCoModel(moco_hf.MoCoConfig(backbone=backbone, embed_dim=8, queue_size=16)).eval()
    out = hub.export_timm_backbone(model, tmp_path / "backbone")
    x = _images()
    with torch.no_grad():
        reference = model(x).pooler_output
        from_dir = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        torch.testing.assert_close(from_dir(x), reference, **TINY_FORWARD)
        weights = dict(file=str(out / "model.safetensors"))
        from_file = timm.create_model(backbone, pretrained=True, num_classes=0, pretrained_cfg_overlay=weights)
        torch.testing.assert_close(from_file.eval()(x), reference, **TINY_FORWARD)
        torch.testing.assert_close(AutoModel.from_pretrained(out).eval()(x).pooler_output, reference, **TINY_FORWARD)
        assert timm.create_model(backbone, num_classes=0)(x).shape == reference.shape  # no weights asked: none loaded
    cards = hub.build_model_card(tmp_path, "me/m", config=model.config).content + hub.build_backbone_card(
        "me/m", "me/m-timm", model.config).content
    assert cards.count(f"import moco_hf  # registers {backbone} with timm") == 2  # before each timm snippet


def test_remote_code_without_moco_hf(run, staged, tmp_path):
    """trust_remote_code loading and the feature-extraction pipeline in a process where moco_hf cannot be imported."""
    x = _images()
    torch.save(x, tmp_path / "x.pt")
    image = _smooth_image(40, 36)
    image.save(tmp_path / "image.png")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["moco_hf"] = None  # import moco_hf -> ImportError
        try:
            import moco_hf  # noqa: F401
            raise SystemExit("moco_hf is importable")
        except ImportError:
            pass
        import torch
        from PIL import Image
        from transformers import AutoModel, AutoModelForImageClassification, pipeline

        staged = {str(staged.dir)!r}
        model = AutoModel.from_pretrained(staged, trust_remote_code=True).eval()
        assert type(model).__name__ == "MoCoModel" and not type(model).__module__.startswith("moco_hf"), type(model)
        classifier = AutoModelForImageClassification.from_pretrained(staged, trust_remote_code=True, num_labels=3)
        assert type(classifier).__name__ == "MoCoForImageClassification"
        extractor = pipeline("image-feature-extraction", model=staged, trust_remote_code=True)
        with torch.no_grad():
            pooled = model(torch.load({str(tmp_path / "x.pt")!r})).pooler_output
            features = extractor(Image.open({str(tmp_path / "image.png")!r}), pool=True, return_tensors=True)
        torch.save({{"pooled": pooled, "pipeline": features}}, {str(tmp_path / "out.pt")!r})
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), TRANSFORMERS_VERBOSITY="error")
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(out["pooled"], run.reference, **TINY_FORWARD)

    processor = AutoImageProcessor.from_pretrained(staged.dir)  # what the pipeline used
    with torch.no_grad():
        expected = run.model(**processor(image, return_tensors="pt")).pooler_output
    torch.testing.assert_close(out["pipeline"], expected, **TINY_FORWARD)


# ---------------------------------------------------------------------------------------------------------
# Image processor = timm eval transform
# ---------------------------------------------------------------------------------------------------------

DATA_CONFIGS = [
    {},  # test_resnet's own: 160 px, crop_pct 0.95, bilinear, mean/std 0.5
    {"input_size": (3, 224, 224), "crop_pct": 0.875, "interpolation": "bicubic",
     "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
    {"input_size": (3, 32, 32), "crop_pct": 1.0},
]


def _crop_margins_agree(image, data_config) -> bool:
    """True when torchvision's CenterCrop offset round(m / 2) equals transformers' floor(m / 2) on both axes."""
    processor = preprocessing.image_processor_from_data_config(data_config)
    resized = BitImageProcessorPil(**{**processor.to_dict(), "do_center_crop": False, "do_normalize": False})(image)
    _, h, w = resized["pixel_values"][0].shape
    _, ch, cw = data_config["input_size"]
    return all(int(round((n - c) / 2.0)) == (n - c) // 2 for n, c in ((h, ch), (w, cw)))


@pytest.mark.parametrize("override", DATA_CONFIGS)
@pytest.mark.parametrize("size", [(300, 200), (200, 300), (256, 256), (97, 131), (301, 203)])
def test_image_processor_matches_timm_eval_transform(run, override, size):
    data_config = preprocessing.resolve_data_config(run.model, override)
    timm_transform = timm.data.create_transform(**data_config, is_training=False)
    processor = preprocessing.image_processor_from_data_config(data_config)  # torchvision backend, the default
    pil_processor = BitImageProcessorPil(**processor.to_dict())
    image = _smooth_image(*size)
    expected = timm_transform(image)
    got_pil = pil_processor(image, return_tensors="pt")["pixel_values"][0]
    got = processor(image, return_tensors="pt")["pixel_values"][0]
    assert got.shape == expected.shape == (3, *data_config["input_size"][1:])

    if _crop_margins_agree(image, data_config):
        torch.testing.assert_close(got_pil, expected, **PIXEL)  # PIL backend: the same 8-bit pixels
        level = 1 / 255 / min(data_config["std"])
        # tensor resize: antialiased in float, not PIL's 8-bit filter: the algorithms differ by up to 2 grey levels
        torch.testing.assert_close(got, expected, atol=2.5 * level, rtol=0)
    else:
        # Known difference: an odd crop margin goes to floor(m/2) in transformers, round(m/2) in torchvision.
        # With the crop at the same place, the PIL backend is identical again.
        scale = timm_transform.transforms[0]
        resized = scale(image)
        _, ch, cw = data_config["input_size"]
        top, left = (resized.height - ch) // 2, (resized.width - cw) // 2
        cropped = torch.from_numpy(np.array(resized.crop((left, top, left + cw, top + ch)))).permute(2, 0, 1)
        mean, std = (torch.tensor(data_config[k]).view(3, 1, 1) for k in ("mean", "std"))
        torch.testing.assert_close(got_pil, (cropped.float() / 255 - mean) / std, **PIXEL)


def test_default_data_config_follows_the_run_records(tmp_path):
    (tmp_path / "training_config.json").write_text(json.dumps({"image_size": 64, "backbone": "resnet18"}))
    assert preprocessing.default_data_config(tmp_path) == {"input_size": (3, 64, 64), "crop_pct": 1.0}  # pretrain.py's kNN eval
    (tmp_path / "training_args.json").write_text(
        json.dumps({"eval_crop_pct": 0.875, "interpolation": "bicubic", "mean": [0.4, 0.5, 0.6], "std": [0.2] * 3})
    )
    assert preprocessing.default_data_config(tmp_path) == {
        "input_size": (3, 64, 64), "crop_pct": 0.875, "interpolation": "bicubic",
        "mean": (0.4, 0.5, 0.6), "std": (0.2, 0.2, 0.2),
    }
    assert preprocessing.default_data_config(tmp_path / "nothing") == {}


def test_a_folder_without_run_records_keeps_its_own_processor_when_staged(run, tmp_path):
    """A linear-evaluation output or a downloaded model records no training config: its preprocessor_config.json
    is the eval transform, and staging keeps it rather than falling back to timm's defaults."""
    folder = tmp_path / "linear"
    run.model.save_pretrained(folder)
    own = {"input_size": (3, 32, 32), "crop_pct": 32 / 36, "interpolation": "bicubic", "mean": (0.4, 0.4, 0.4),
           "std": (0.2, 0.2, 0.2)}
    preprocessing.save_image_processor(run.model, folder, own)
    hub.stage(folder, tmp_path / "staged", REPO_ID)
    staged = json.loads((tmp_path / "staged" / "preprocessor_config.json").read_text())
    assert staged["crop_size"] == {"height": 32, "width": 32} and staged["size"] == {"shortest_edge": 36}
    assert staged["resample"] == 3 and staged["image_mean"] == [0.4, 0.4, 0.4]  # bicubic, the folder's own
    assert preprocessing.default_data_config(tmp_path / "staged") == preprocessing.default_data_config(folder)  # and again when re-staged


def test_saved_processor_loads_with_auto_image_processor(run, tmp_path):
    processor = preprocessing.save_image_processor(run.model, tmp_path, {"input_size": (3, 224, 224), "crop_pct": 0.875})
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "BitImageProcessor"
    assert loaded.size == {"shortest_edge": 256} and loaded.crop_size == {"height": 224, "width": 224}
    assert loaded.to_dict() == processor.to_dict()
    # a MoCoConfig alone is enough (the backbone is built on the meta device)
    from_config = preprocessing.save_image_processor(_tiny_config(), tmp_path / "from_config")
    assert from_config.size == {"shortest_edge": 168} and from_config.crop_size == {"height": 160, "width": 160}


# ---------------------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------------------


def test_model_card(staged):
    card = ModelCard.load(staged.dir / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "image-feature-extraction"
    assert data["license"] == "apache-2.0"
    assert {"moco", "self-supervised", "contrastive", "timm", "test_resnet"} <= set(data["tags"])
    text = card.text
    assert "| kNN |  | 'test' | **42.50 %** | - | - |" in text
    assert "| linear evaluation | SGD on frozen features (linear_eval.py) | 'test' | **47.25 %** | - | - |" in text
    assert text.count("| `epoch` | 3 |") == 1  # the other metrics, once
    assert "| `lr` | 0.03 |" in text and "| `embed_dim` | 8 |" in text
    assert f'AutoModel.from_pretrained("{REPO_ID}", trust_remote_code=True)' in text
    assert f'moco_hf.MoCoModel.from_pretrained("{REPO_ID}")' in text
    assert f'timm.create_model("hf-hub:{REPO_ID}-timm", pretrained=True)' in text
    assert "hub_token" not in text and TOKEN not in text
    backbone_card = ModelCard.load(staged.dir / "backbone" / "README.md")
    assert backbone_card.data.to_dict()["library_name"] == "timm"


def test_model_card_from_pretrain_records(tmp_path, run):
    """The records pretrain.py writes: metrics.json (kNN at init and at the end) and the PretrainConfig dataclass."""
    model_dir = tmp_path / "final"
    run.model.save_pretrained(model_dir)
    (model_dir / "metrics.json").write_text(json.dumps({"knn_random_init": 20.5, "steps": 100, "knn_acc": 61.25}))
    (model_dir / "training_config.json").write_text(
        json.dumps({"dataset_name": "uoft-cs/cifar10", "image_size": 32, "lr_steps": [120, 160], "backbone_kwargs": {}})
    )
    card = hub.build_model_card(model_dir, REPO_ID)
    assert "| kNN |  | 'test' | **61.25 %** | 20.50 % | - |" in card.text and "| linear evaluation |" not in card.text
    assert card.data.to_dict()["datasets"] == ["uoft-cs/cifar10"]
    assert "| `lr_steps` | [120, 160] |" in card.text


def test_model_card_datasets_and_missing_records(tmp_path, run):
    model_dir = tmp_path / "bare"
    run.model.save_pretrained(model_dir)
    card = hub.build_model_card(model_dir, REPO_ID, datasets=["uoft-cs/cifar10"])
    assert card.data.to_dict()["datasets"] == ["uoft-cs/cifar10"]
    assert "No metrics were recorded" in card.text


# ---------------------------------------------------------------------------------------------------------
# Upload, through a fake HfApi checked against the real signatures
# ---------------------------------------------------------------------------------------------------------


class FakeApi:
    """Records HfApi calls; each call must bind to the real HfApi method's signature."""

    def __init__(self, token=None, **kwargs):
        self.token = token
        self.calls = []

    def _record(self, name, kwargs):
        inspect.signature(getattr(HfApi, name)).bind(None, **kwargs)
        self.calls.append((name, kwargs))

    def create_repo(self, **kwargs):
        self._record("create_repo", kwargs)
        return SimpleNamespace(repo_id=kwargs["repo_id"])

    def create_branch(self, **kwargs):
        self._record("create_branch", kwargs)

    def upload_folder(self, **kwargs):
        self._record("upload_folder", kwargs)
        folder = Path(kwargs["folder_path"])
        kwargs["files"] = sorted(_files(folder))
        kwargs["contains_token"] = any(TOKEN.encode() in p.read_bytes() for p in folder.rglob("*") if p.is_file())
        return SimpleNamespace(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/0123")


def test_push_calls(run):
    api = FakeApi()
    result = hub.push(run.dir, REPO_ID, private=True, revision="ep3", commit_message="three epochs", api=api)
    backbone_files = sorted(f.removeprefix("backbone/") for f in STAGED_FILES if f.startswith("backbone/"))
    assert [(name, kw.get("repo_id")) for name, kw in api.calls] == [
        ("create_repo", REPO_ID), ("create_branch", REPO_ID), ("upload_folder", REPO_ID),
        ("create_repo", f"{REPO_ID}-timm"), ("create_branch", f"{REPO_ID}-timm"), ("upload_folder", f"{REPO_ID}-timm"),
    ]
    create, branch, upload = (kw for _, kw in api.calls[:3])
    assert create == {"repo_id": REPO_ID, "private": True, "exist_ok": True}
    assert branch == {"repo_id": REPO_ID, "branch": "ep3", "exist_ok": True}
    assert upload["revision"] == "ep3" and upload["commit_message"] == "three epochs"
    assert upload["files"] == sorted(STAGED_FILES) == result.files
    assert api.calls[5][1]["files"] == backbone_files
    assert result.backbone_repo_id == f"{REPO_ID}-timm" and len(result.commit_urls) == 2

    api = FakeApi()
    hub.push(run.dir, REPO_ID, api=api, push_backbone=False, backbone_repo_id="org/other-timm")
    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder"]  # no revision: no branch
    create, upload = api.calls[0][1], api.calls[1][1]
    assert create["private"] is False and upload["revision"] is None and "Upload MoCo model" in upload["commit_message"]


def test_token_is_never_printed_logged_or_written(run, monkeypatch, capsys, caplog):
    apis = []
    monkeypatch.setattr(hub, "HfApi", lambda **kw: apis.append(FakeApi(**kw)) or apis[-1])
    caplog.set_level(logging.DEBUG)
    hub.push(run.dir, REPO_ID, token=TOKEN)
    assert apis[0].token == TOKEN  # handed to HfApi, nowhere else
    uploads = [kw for name, kw in apis[0].calls if name == "upload_folder"]
    assert len(uploads) == 2 and not any(kw["contains_token"] for kw in uploads)
    assert all(TOKEN not in json.dumps(kw, default=str) for _, kw in apis[0].calls)

    # a failing upload: one clear error, the token redacted even if the server echoes it
    def refuse(**kwargs):
        raise OSError(f"401 Unauthorized for token {TOKEN}\nmore detail")

    monkeypatch.setattr(FakeApi, "upload_folder", lambda self, **kw: refuse(**kw))
    with pytest.raises(hub.HubError) as error:
        hub.push(run.dir, REPO_ID, token=TOKEN)
    assert "upload to user/moco-tiny failed" in str(error.value) and TOKEN not in str(error.value)
    assert "\n" not in str(error.value)

    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err + caplog.text


def _staged_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def test_tokens_in_run_records_never_reach_a_staged_or_uploaded_file(run, tmp_path, monkeypatch):
    stored = "hf_StoredLoginToken9876543210zyxwvu"  # this machine's token (HF_TOKEN or `hf auth login`)
    monkeypatch.setenv("HF_TOKEN", stored)
    model_dir = tmp_path / "leaky"
    run.model.save_pretrained(model_dir)
    (model_dir / "training_config.json").write_text(json.dumps(
        {"image_size": 32, "command": f"train.py --push --hf {TOKEN}", "hf_auth": stored, "short": "hf_abc"}))
    hub.stage(model_dir, tmp_path / "dry", REPO_ID)  # the dry run: scrubbed, not refused
    staged = _staged_bytes(tmp_path / "dry")
    assert TOKEN.encode() not in staged and stored.encode() not in staged
    card = (tmp_path / "dry" / "README.md").read_text()
    assert "train.py --push --hf ***" in card and "hf_abc" in card  # only what is shaped like a token goes
    api = FakeApi()  # an HfApi of the caller's own: the same scrubbing
    hub.push(model_dir, REPO_ID, api=api)
    uploads = [kw for name, kw in api.calls if name == "upload_folder"]
    assert len(uploads) == 2 and not any(kw["contains_token"] for kw in uploads)


@pytest.mark.parametrize("how", ["stage", "push"])
def test_a_token_that_reaches_a_staged_file_is_refused_and_nothing_is_left(run, tmp_path, how):
    model_dir = tmp_path / "leaky"
    model = moco_hf.MoCoModel(run.model.config)
    model.config.notes = f"pushed with {TOKEN}"  # a route the record scrubbing does not cover: config.json
    model.save_pretrained(model_dir)
    api = FakeApi()
    with pytest.raises(hub.HubError, match="token appears in .*config.json") as error:
        if how == "stage":
            hub.stage(model_dir, tmp_path / "dry", REPO_ID)
        else:
            hub.push(model_dir, REPO_ID, api=api)
    assert TOKEN not in str(error.value) and api.calls == []
    assert not (tmp_path / "dry").exists()


def test_http_error_becomes_hub_error(run):
    from huggingface_hub.errors import HfHubHTTPError

    http = importlib.import_module(HfHubHTTPError.__mro__[1].__module__)  # httpx (hub 1.x) or its successor

    class Refusing(FakeApi):
        def create_repo(self, **kwargs):
            request = http.Request("POST", "https://huggingface.co/api/repos/create")
            response = http.Response(403, request=request)
            raise HfHubHTTPError("403 Forbidden: you don't have the rights", response=response)

    with pytest.raises(hub.HubError, match="upload to user/moco-tiny failed: HfHubHTTPError: 403 Forbidden"):
        hub.push(run.dir, REPO_ID, api=Refusing())


def test_missing_token_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(hub, "get_token", lambda: None)
    with pytest.raises(hub.HubError, match="no Hugging Face token: pass --token, set HF_TOKEN"):
        hub.resolve_token(None)
    assert hub.resolve_token(TOKEN) == TOKEN


# ---------------------------------------------------------------------------------------------------------
# push_to_hub.py command line
# ---------------------------------------------------------------------------------------------------------


def _start_cli(args, tmp_path, **env) -> subprocess.Popen:
    environment = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "empty_hf_home"), **env)
    return subprocess.Popen(
        [sys.executable, str(REPO / "push_to_hub.py"), *args],
        cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_cli(run, tmp_path):
    """The script itself, two runs side by side: --dry_run stages and uploads nothing; without any token
    (HF_TOKEN empty, HF_HOME without a stored login) it stops with one line and exit status 1."""
    (tmp_path / "empty_hf_home").mkdir()
    out = tmp_path / "dry"
    dry = _start_cli(["--model_dir", str(run.dir), "--repo_id", REPO_ID, "--dry_run", str(out)], tmp_path, HF_TOKEN="")
    no_token = _start_cli(["--model_dir", str(run.dir), "--repo_id", REPO_ID], tmp_path, HF_TOKEN="")
    dry_out, dry_err = dry.communicate(timeout=180)
    out_text, err_text = no_token.communicate(timeout=180)

    assert dry.returncode == 0, dry_err[-2000:]
    assert _files(out) == STAGED_FILES
    assert "nothing uploaded" in dry_out and "backbone/model.safetensors" in dry_out

    assert no_token.returncode == 1, err_text[-2000:]
    assert "push_to_hub.py: error: no Hugging Face token" in err_text
    assert "Traceback" not in err_text and len(err_text.strip().splitlines()) == 1


def test_cli_missing_model_dir(tmp_path, capsys):
    sys.path.insert(0, str(REPO))
    try:
        import push_to_hub
    finally:
        sys.path.remove(str(REPO))
    code = push_to_hub.main(["--model_dir", str(tmp_path / "nope"), "--repo_id", REPO_ID, "--token", TOKEN])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.err.startswith("push_to_hub.py: error: model directory") and "does not exist" in captured.err
    assert len(captured.err.strip().splitlines()) == 1 and TOKEN not in captured.out + captured.err

"""finetune.py: Trainer fine-tuning from a MoCo folder or the timm-format export, on digits or a local folder."""

import json
import os
import sys

import numpy as np
import pytest
import torch
from _tolerance import PIXEL, TINY_FORWARD
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification, TrainerCallback
from transformers.trainer_utils import EvalPrediction

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import finetune  # noqa: E402
import moco_hf  # noqa: E402
from moco_hf import hub  # noqa: E402
from moco_hf import preprocessing as preprocessing_module  # noqa: E402

QUICK = dict(save_strategy="no", eval_strategy="no", disable_tqdm=True, logging_steps=1, dataloader_num_workers=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A randomly initialised tiny MoCo model saved like pretrain.py's OUT/final (training_config.json: 32 px)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("run") / "final"
    model = moco_hf.MoCoModel(moco_hf.MoCoConfig(backbone="test_resnet", embed_dim=16, queue_size=64))
    model.save_pretrained(path)
    record = {"image_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "eval_crop_pct": 1.0}
    (path / "training_config.json").write_text(json.dumps(record))
    return path


def digits_args(model_dir, **kwargs):
    return finetune.FinetuneArguments(model_dir=str(model_dir), max_train_samples=128, max_eval_samples=64, **kwargs)


def test_compute_metrics():
    logits = np.array([[0.1, 0.9, 0, 0, 0, 0], [0.9, 0.1, 0, 0, 0, 0.05], [0, 0, 0, 0, 0, 1.0]])
    metrics = finetune.compute_metrics(EvalPrediction(predictions=logits, label_ids=np.array([1, 5, 0])))
    # Row 0 right; row 1: label 5 is 3rd best (top-5 hit); row 2: label 0 ties 4 others below 5 -> in the top-5.
    assert metrics["accuracy"] == pytest.approx(100 / 3)
    assert metrics["top5"] == pytest.approx(100.0)


def test_finetune_digits_end_to_end(checkpoint, tmp_path):
    """Default path (Trainer with evaluation and checkpoints every epoch): a folder that AutoModel* loads."""
    out = tmp_path / "ft"
    args = digits_args(checkpoint)
    training_args = finetune.training_arguments(output_dir=str(out), num_train_epochs=2, disable_tqdm=True,
                                                dataloader_num_workers=0)
    result = finetune.run(args, training_args)

    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["finetune_top1"] <= 100.0 and metrics["finetune_top1"] == metrics["eval_accuracy"]
    assert metrics["finetune_top5"] >= metrics["finetune_top1"]
    assert metrics["finetune_eval_images"] == 64 and metrics["finetune_skipped_train_images"] == 0
    assert [h["epoch"] for h in result.trainer.state.log_history if "eval_accuracy" in h][:2] == [1.0, 2.0]
    record = json.loads((out / "training_config.json").read_text())
    assert (record["image_size"], record["eval_crop_pct"], record["crop_min_scale"], record["flip_prob"]) == (
        32, 1.0, 0.6, 0.0)  # the checkpoint's preprocessing; the digits demo's augmentation

    loaded = AutoModelForImageClassification.from_pretrained(out).eval()
    assert isinstance(loaded, moco_hf.MoCoForImageClassification)
    assert loaded.config.num_labels == 10 and loaded.config.id2label[7] == "7"
    images = torch.randn(3, 3, 32, 32)
    trained = result.trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images).logits, trained(images).logits, **TINY_FORWARD)
    start = moco_hf.MoCoModel.from_pretrained(checkpoint).get_backbone().state_dict()
    assert any(not torch.equal(v, loaded.get_backbone().state_dict()[k]) for k, v in start.items())  # it trained
    processor = AutoImageProcessor.from_pretrained(out)
    assert (processor.crop_size["height"], processor.crop_size["width"]) == (32, 32)
    assert list(processor.image_mean) == [0.5, 0.5, 0.5]
    pixels = processor(Image.new("RGB", (40, 50), (200, 10, 10)), return_tensors="pt")["pixel_values"]
    assert loaded(pixels).logits.shape == (1, 10)


class GradientProbe(TrainerCallback):
    """Records, before every optimizer step, each backbone parameter's gradient: None, zero or non-zero."""

    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        backbone = model.get_backbone()
        self.steps.append({n: None if p.grad is None else bool(p.grad.abs().sum() > 0)
                           for n, p in backbone.named_parameters()})


@pytest.mark.parametrize("freeze", [False, True])
def test_trainer_trains_the_backbone_unless_frozen(checkpoint, tmp_path, freeze):
    probe = GradientProbe()
    args = digits_args(checkpoint, freeze_backbone=freeze)
    training_args = finetune.training_arguments(output_dir=str(tmp_path / "ft"), max_steps=2, warmup_steps=0, **QUICK)
    start = moco_hf.MoCoModel.from_pretrained(checkpoint).get_backbone().state_dict()
    result = finetune.run(args, training_args, callbacks=[probe])

    assert len(probe.steps) == 2
    end = result.trainer.model.get_backbone().state_dict()
    if freeze:
        assert all(grad is None for step in probe.steps for grad in step.values())
        assert all(torch.equal(v, end[k]) for k, v in start.items())  # weights and BN statistics untouched
    else:
        assert all(grad is not None for step in probe.steps for grad in step.values())
        # timm zero-initialises each block's last BN scale, so the conv before it gets a zero gradient until that
        # scale has moved: every parameter has a non-zero gradient at the second step.
        assert all(probe.steps[1].values()), [n for n, nonzero in probe.steps[1].items() if not nonzero]
        weights = [k for k in start if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
        assert all(not torch.equal(start[k], end[k]) for k in weights)
        assert not torch.equal(start["bn1.running_mean"], end["bn1.running_mean"])  # BN in train mode


def test_finetune_from_the_timm_export(checkpoint, tmp_path):
    backbone_dir = hub.export_timm_backbone(checkpoint, tmp_path / "backbone",
                                            data_config=preprocessing_module.default_data_config(checkpoint))
    assert preprocessing_module.preprocessing_for(backbone_dir) == preprocessing_module.preprocessing_for(checkpoint)
    model = finetune.load_model(str(backbone_dir), [str(i) for i in range(10)])
    assert type(model).__name__ == "TimmWrapperForImageClassification"
    source = moco_hf.MoCoModel.from_pretrained(checkpoint).get_backbone().state_dict()
    for name, tensor in source.items():  # starts from the MoCo backbone
        assert torch.equal(tensor, model.timm_model.state_dict()[name]), name

    out = tmp_path / "ft"
    finetune.run(digits_args(backbone_dir), finetune.training_arguments(output_dir=str(out), max_steps=2, **QUICK))
    loaded = AutoModelForImageClassification.from_pretrained(out)
    assert type(loaded).__name__ == "TimmWrapperForImageClassification" and loaded.config.num_labels == 10
    assert "finetune_top1" in json.loads((out / "metrics.json").read_text())
    processor = AutoImageProcessor.from_pretrained(out)  # timm's transform, from config.json's pretrained_cfg
    pixels = processor(Image.new("RGB", (40, 50), (200, 10, 10)), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32) and loaded(pixels).logits.shape == (1, 10)


def test_local_folder_with_corrupt_images(checkpoint, tmp_path):
    """Corrupt files are left out of the batches and counted per split; string class names come through."""
    g = torch.Generator().manual_seed(0)
    for split, count in (("train", 6), ("test", 2)):
        for c, name in enumerate(("cat", "dog", "owl")):
            folder = tmp_path / "data" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                array = torch.randint(0, 255, (20, 20, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(array).save(folder / f"{i}.png")
    (tmp_path / "data" / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    (tmp_path / "data" / "train" / "dog" / "empty.png").write_bytes(b"")
    (tmp_path / "data" / "test" / "owl" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")

    args = finetune.FinetuneArguments(model_dir=str(checkpoint), train_dir=str(tmp_path / "data"))
    # Two DataLoader worker processes: the skips they see must still be counted in this process.
    training_args = finetune.training_arguments(output_dir=str(tmp_path / "ft"), num_train_epochs=1,
                                                per_device_train_batch_size=5, **{**QUICK, "dataloader_num_workers": 2})
    metrics = finetune.run(args, training_args).metrics
    assert metrics["finetune_skipped_train_images"] == 2 and metrics["finetune_skipped_eval_images"] == 1
    assert metrics["finetune_train_images"] == 20 and metrics["finetune_eval_images"] == 6
    config = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert config["id2label"] == {"0": "cat", "1": "dog", "2": "owl"}
    assert json.loads((tmp_path / "ft" / "training_config.json").read_text())["flip_prob"] == 0.5  # not the demo's


def test_a_classifier_in_the_folder_is_not_the_starting_point(checkpoint, tmp_path):
    trained = moco_hf.MoCoForImageClassification.from_pretrained(str(checkpoint), num_labels=3)
    with torch.no_grad():
        trained.classifier.weight.fill_(1.0)
        trained.classifier.bias.fill_(2.0)
    trained.save_pretrained(tmp_path / "linear")  # e.g. a linear-evaluation output, same number of classes
    model = finetune.load_model(str(tmp_path / "linear"), ["a", "b", "c"])
    weight, bias = model.classifier.weight, model.classifier.bias
    assert 0.005 < weight.std() < 0.02 and abs(weight.mean()) < 0.005 and torch.equal(bias, torch.zeros(3))
    torch.testing.assert_close(model.get_backbone().state_dict(), trained.get_backbone().state_dict(), rtol=0, atol=0)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_train_and_eval_views_are_resized_alike(interpolation):
    from torchvision.transforms.v2 import functional as TF

    preprocessing = preprocessing_module.Preprocessing(image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=0.875,
                                             interpolation=interpolation)
    train, evaluate = finetune.build_transforms(digits_args("m"), preprocessing)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    mode = TF.InterpolationMode(interpolation)
    expected = TF.normalize(TF.to_dtype(TF.pil_to_tensor(TF.center_crop(TF.resize(image, 36, interpolation=mode), 32)),
                                        torch.float32, scale=True), [0.5] * 3, [0.5] * 3)
    torch.testing.assert_close(evaluate(image), expected, **PIXEL)  # the same resize and crop, normalised
    assert str(train.transform.transforms[0].interpolation) == str(mode)


def test_hub_token_is_refused_before_anything_is_written(checkpoint, tmp_path, capsys):
    token = "hf_TestSecretToken0123456789abcdef"
    code = finetune.main(["--model_dir", str(checkpoint), "--output_dir", str(tmp_path / "o"), "--hub_token", token])
    err = capsys.readouterr().err
    assert code == 2 and "HF_TOKEN" in err and token not in err
    assert not (tmp_path / "o").exists() or not any(token.encode() in p.read_bytes()
                                                    for p in (tmp_path / "o").rglob("*") if p.is_file())


def test_command_line(checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit):
        finetune.parse_args([])  # --model_dir is required
    args, training_args = finetune.parse_args(["--model_dir", "m", "--learning_rate", "0.01"])
    assert training_args.learning_rate == 0.01 and training_args.num_train_epochs == 10  # ours, not Trainer's 3
    assert training_args.remove_unused_columns is False and args.eval_split == "test"
    assert finetune.main(["--model_dir", str(tmp_path / "nothing"), "--output_dir", str(tmp_path / "o")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert finetune.main(["--model_dir", str(checkpoint), "--output_dir", str(tmp_path / "o"),
                          "--eval_split", "validation"]) == 2
    assert "split 'validation' not found" in capsys.readouterr().err

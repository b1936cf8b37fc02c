"""Linear evaluation (moco_hf.evaluation, linear_eval.py): frozen backbone bit-identical, classifier learns,
metrics.json and model card, and the check that catches a backbone that moved."""

import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import linear_eval  # noqa: E402
import moco_hf  # noqa: E402
from moco_hf import evaluation, hub  # noqa: E402
from moco_hf import preprocessing as preprocessing_module  # noqa: E402
from linear_eval import LinearEvalConfig  # noqa: E402

# Cached features: paper optimiser and schedule (lr 30, /10 at 60 and 80) over 100 cheap epochs on a digits subset.
FAST = dict(image_size=32, num_workers=0, batch_size=128, max_train_samples=500, max_eval_samples=200)


def save_tiny_checkpoint(path, backbone="test_resnet", seed=0):
    """A randomly initialised MoCo model saved like pretrain.py's OUT/final (training_config.json: 32 px)."""
    torch.manual_seed(seed)
    model = moco_hf.MoCoModel(moco_hf.MoCoConfig(backbone=backbone, embed_dim=16, queue_size=64))
    model.save_pretrained(path)
    record = {"image_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "eval_crop_pct": 1.0}
    (path / "training_config.json").write_text(json.dumps(record))
    (path / "metrics.json").write_text(json.dumps({"knn_acc": 12.5, "steps": 0}))
    return path


@pytest.fixture()
def checkpoint(tmp_path):
    return save_tiny_checkpoint(tmp_path / "final")


@pytest.fixture(scope="module")
def digits():
    """(train, eval) digits subsets and the preprocessing of the tiny checkpoint, loaded once for the module."""
    train = evaluation.load_labeled_split("train", max_samples=160, seed=0)
    test = evaluation.load_labeled_split("test", label_names=train.label_names, max_samples=64, seed=0)
    prep = preprocessing_module.Preprocessing(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1.0)
    return train, test, prep


def test_lr_schedule_and_config_validation():
    lrs = [evaluation.linear_lr(e, 30.0, (60, 80)) for e in (0, 59, 60, 79, 80, 99)]
    assert lrs == pytest.approx([30, 30, 3, 3, 0.3, 0.3])
    assert LinearEvalConfig().schedule == (60, 80) and LinearEvalConfig().lr == 30.0
    for bad in (dict(schedule=(80, 60)), dict(lr=0.0), dict(crop_pct=1.5), dict(epochs=0), dict(mixed_precision="fp8")):
        with pytest.raises(ValueError):
            LinearEvalConfig(**bad)


def test_topk_correct():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    # Row 0: label 5 is the best (top-1 hit). Row 1: label 5 is the worst (outside the top-5).
    assert evaluation.topk_correct(logits, torch.tensor([5, 5]), (1, 5)) == [1, 1]
    assert evaluation.topk_correct(logits, torch.tensor([4, 1]), (1, 5)) == [0, 2]


def test_record_metrics_merges(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"knn_acc": 50.0, "linear_top1": 1.0}))
    merged = evaluation.record_metrics(tmp_path, {"linear_top1": 60.5})
    assert merged == {"knn_acc": 50.0, "linear_top1": 60.5}
    assert json.loads((tmp_path / "metrics.json").read_text()) == merged
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left


def test_cached_linear_eval_learns_and_is_recorded_for_the_card(checkpoint, tmp_path):
    logs = []
    metrics = evaluation.linear_evaluation(
        checkpoint, LinearEvalConfig(protocol="sgd", cached_features=True, **FAST), output_dir=tmp_path / "classifier",
        log=logs.append,
    )
    # Ten classes: chance is 10 %. Random-init test_resnet features with the paper's optimiser reach ~65 %.
    assert metrics["linear_top1"] > 40.0
    assert metrics["linear_top5"] >= metrics["linear_top1"]
    assert metrics["linear_eval_images"] == 200 and metrics["linear_train_images"] == 500
    assert any("lr 30 (/10 at epochs [60, 80])" in line for line in logs)
    assert any(line.startswith("epoch 100/100: lr 0.3") for line in logs)

    recorded = json.loads((checkpoint / "metrics.json").read_text())
    assert recorded["linear_top1"] == metrics["linear_top1"] and recorded["knn_acc"] == 12.5  # merged, not replaced
    card = hub.build_model_card(checkpoint, "user/moco-tiny").text
    assert f"| linear evaluation | SGD lr 30, 100 epochs, on cached center-crop features | 'test' (200 images) | " \
           f"**{metrics['linear_top1']:.2f} %** | - | - |" in card
    assert "| kNN |  | 'test' | **12.50 %** | - | - |" in card

    # The saved classifier: frozen backbone identical to the checkpoint's query backbone, processor at 32 px.
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    classifier = AutoModelForImageClassification.from_pretrained(tmp_path / "classifier")
    source = moco_hf.MoCoModel.from_pretrained(checkpoint)
    assert classifier.config.freeze_backbone and classifier.config.id2label[3] == "3"
    for name, tensor in source.get_backbone().state_dict().items():
        assert torch.equal(tensor, classifier.get_backbone().state_dict()[name]), name
    processor = AutoImageProcessor.from_pretrained(tmp_path / "classifier")
    assert (processor.crop_size["height"], processor.crop_size["width"]) == (32, 32)
    assert processor.size["shortest_edge"] == 36  # 32 / 0.875


def test_augmented_protocol_keeps_the_backbone_bit_identical(checkpoint, digits):
    train, test, prep = digits
    model = evaluation.load_linear_classifier(checkpoint, train.label_names)
    before = {k: v.clone() for k, v in model.get_backbone().state_dict().items()}
    head_before = model.classifier.weight.detach().clone()
    modes = []
    for module in model.get_backbone().modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.register_forward_hook(lambda module, args, out: modes.append(module.training))
    cfg = LinearEvalConfig(epochs=2, lr=1.0, schedule=(1,), batch_size=32, num_workers=0, protocol="sgd")
    metrics = evaluation.run_linear_eval(model, train, test, prep, cfg)

    assert len(modes) > 10 and not any(modes)  # every backbone forward ran in eval mode (BN statistics frozen)
    after = model.get_backbone().state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name  # weights and BN buffers (num_batches_tracked too)
    assert all(p.grad is None for p in model.get_backbone().parameters())
    assert not torch.equal(model.classifier.weight, head_before)  # while the classifier trained
    assert 0.0 <= metrics["linear_top1"] <= 100.0
    assert metrics["linear_protocol"] == "SGD lr 1, 2 epochs, on RandomResizedCrop (scale 0.08-1) + flip"


def _perturb_bn_once(model):
    """A forward hook that moves one BatchNorm running mean by 1e-6 at the 3rd forward (mid-training)."""
    name, bn = next((n, m) for n, m in model.get_backbone().named_modules() if isinstance(m, torch.nn.BatchNorm2d))
    calls = {"n": 0}

    def hook(module, args, output):
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                module.running_mean[0] += 1e-6

    bn.register_forward_hook(hook)
    return name


@pytest.mark.parametrize("cached", [False, True])
def test_a_moved_backbone_is_caught(checkpoint, digits, cached):
    train, test, prep = digits
    model = evaluation.load_linear_classifier(checkpoint, train.label_names)
    name = _perturb_bn_once(model)
    cfg = LinearEvalConfig(epochs=2, lr=1.0, schedule=(1,), batch_size=32, num_workers=0, cached_features=cached)
    with pytest.raises(RuntimeError, match=f"frozen backbone changed.*{name}.running_mean"):
        evaluation.run_linear_eval(model, train, test, prep, cfg)


def test_a_backbone_left_in_train_mode_is_refused(checkpoint, digits, monkeypatch):
    train, test, prep = digits
    model = evaluation.load_linear_classifier(checkpoint, train.label_names)
    monkeypatch.setattr(type(model), "train", torch.nn.Module.train)  # no longer keeps the backbone in eval mode
    with pytest.raises(RuntimeError, match="train mode"):
        evaluation.run_linear_eval(model, train, test, prep, LinearEvalConfig(epochs=1, num_workers=0))
    model.config.freeze_backbone = False
    with pytest.raises(ValueError, match="frozen backbone"):
        evaluation.run_linear_eval(model, train, test, prep, LinearEvalConfig(epochs=1, num_workers=0))


def test_cli(checkpoint, capsys):
    before = (checkpoint / "metrics.json").read_text()
    code = linear_eval.main(["--model_dir", str(checkpoint), "--epochs", "2", "--schedule", "1", "--lr", "1",
                             "--cached_features", "--num_workers", "0", "--max_train_samples", "64",
                             "--max_eval_samples", "32", "--no_record", "--protocol", "sgd"])
    assert code == 0
    assert "linear evaluation top-1" in capsys.readouterr().out
    assert (checkpoint / "metrics.json").read_text() == before  # --no_record
    assert linear_eval.main(["--model_dir", str(checkpoint / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        linear_eval.parse_args(["--model_dir", "x", "--schedule", "sixty"])


def test_lbfgs_probe_with_baselines_and_the_digits_augmentation(checkpoint, tmp_path):
    """The default protocol on the digits: L-BFGS on features extracted once, next to the random-init backbone and
    the raw pixels (a random-init test_resnet is far below the pixels); the sgd protocol does not flip digits."""
    logs = []
    metrics = evaluation.linear_evaluation(checkpoint, LinearEvalConfig(**FAST), log=logs.append)
    assert {"linear_top1", "linear_top1_random_init", "linear_top1_pixels"} <= metrics.keys()
    assert metrics["linear_top1_pixels"] > 85.0  # 8 x 8 digits are nearly linearly separable
    assert metrics["linear_top1"] == metrics["linear_top1_random_init"]  # the checkpoint is a random init (seed 0)
    assert "L-BFGS" in metrics["linear_protocol"] and any("raw pixels" in line for line in logs)
    card = hub.build_model_card(checkpoint, "user/moco-tiny").text
    assert f"{metrics['linear_top1_pixels']:.2f} % |" in card  # the baselines reach the model card

    sgd = evaluation.linear_evaluation(checkpoint, LinearEvalConfig(protocol="sgd", epochs=1, schedule=(1,), **FAST),
                                       record=False, log=logs.append)
    assert sgd["linear_protocol"].endswith("RandomResizedCrop (scale 0.6-1)")  # digits: no flip, large crops


def test_the_probe_sees_the_images_as_the_run_did_and_sgd_as_the_paper():
    """Default crop: the model's own for the L-BFGS probe (so its figures agree with the pretraining run's, which
    evaluated whole digits), the paper's Resize 256 / CenterCrop 224 for the SGD protocol; a given one wins."""
    assert LinearEvalConfig().eval_crop_pct(1.0, sgd=False) == 1.0
    assert LinearEvalConfig().eval_crop_pct(1.0, sgd=True) == 0.875
    assert LinearEvalConfig(crop_pct=0.9).eval_crop_pct(1.0, sgd=False) == 0.9
    assert LinearEvalConfig(crop_pct=0.9).eval_crop_pct(1.0, sgd=True) == 0.9

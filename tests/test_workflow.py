"""The whole user path, offline: pretrain -> linear evaluation -> push_to_hub.py --dry_run -> load the staged folder
(transformers AutoModel, timm local-dir:) -> fine-tune from the staged folder."""

import json
import os
import sys

import timm
import torch
from transformers import AutoModel, AutoModelForImageClassification

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import finetune  # noqa: E402
import moco_hf  # noqa: E402
import pretrain  # noqa: E402
import push_to_hub  # noqa: E402
from linear_eval import LinearEvalConfig  # noqa: E402
from moco_hf.evaluation import linear_evaluation  # noqa: E402
from moco_hf.preprocessing import preprocessing_for  # noqa: E402
from pretrain import load_config  # noqa: E402

from _tiny import TINY  # noqa: E402
from _tolerance import TINY_FORWARD  # noqa: E402


def test_pretrain_linear_eval_publish_finetune(tmp_path):
    out = tmp_path / "run"
    result = pretrain.train(load_config(None, TINY + [
        "--output_dir", str(out), "--max_steps", "4", "--save_steps", "0",
        "--knn_max_train_samples", "200", "--knn_max_eval_samples", "60",
    ]))
    final = out / "final"

    # Linear evaluation of the pretrained folder: recorded next to the kNN accuracy.
    metrics = linear_evaluation(final, LinearEvalConfig(protocol="sgd", cached_features=True, epochs=20,
                                                        schedule=(12, 16),
                                                        batch_size=128, num_workers=0, max_train_samples=300,
                                                        max_eval_samples=100))
    recorded = json.loads((final / "metrics.json").read_text())
    assert recorded["linear_top1"] == metrics["linear_top1"] and "knn_acc" in recorded and recorded["steps"] == 4

    # Staging: exactly what would be uploaded, the model card showing both accuracies.
    staged = tmp_path / "staged"
    assert push_to_hub.main(["--model_dir", str(final), "--repo_id", "user/moco-tiny", "--dry_run", str(staged)]) == 0
    card = (staged / "README.md").read_text()
    assert f"| linear evaluation | SGD lr 30, 20 epochs, on cached center-crop features | 'test' (100 images) | " \
           f"**{metrics['linear_top1']:.2f} %**" in card
    assert f"| kNN | weighted kNN on L2-normalised features, k=20, t=0.1 | 'test' (60 images) | " \
           f"**{recorded['knn_acc']:.2f} %** | {recorded['knn_random_init']:.2f} % | {recorded['knn_pixels']:.2f} % |" in card
    assert "![nearest neighbours](nearest_neighbours.png)" in card and (staged / "nearest_neighbours.png").is_file()

    # The staged folder loads with transformers (moco_hf imported) and timm, to the pretrained features.
    images = torch.randn(2, 3, 32, 32)
    trained = result.model.eval()
    with torch.no_grad():
        expected = trained(images).pooler_output
        loaded = AutoModel.from_pretrained(staged).eval()
        assert isinstance(loaded, moco_hf.MoCoModel)
        torch.testing.assert_close(loaded(images).pooler_output, expected, **TINY_FORWARD)
        backbone = timm.create_model(f"local-dir:{staged / 'backbone'}", pretrained=True).eval()
        torch.testing.assert_close(backbone(images), expected, **TINY_FORWARD)

    # Fine-tuning from the staged folder: its preprocessing (32 px, from preprocessor_config.json) is picked up.
    assert preprocessing_for(staged).image_size == 32
    tuned = tmp_path / "finetuned"
    args = finetune.FinetuneArguments(model_dir=str(staged), max_train_samples=64, max_eval_samples=32)
    training_args = finetune.training_arguments(output_dir=str(tuned), max_steps=2, save_strategy="no",
                                                eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    run = finetune.run(args, training_args)
    assert run.trainer.state.global_step == 2 and 0.0 <= run.metrics["finetune_top1"] <= 100.0
    classifier = AutoModelForImageClassification.from_pretrained(tuned)
    assert isinstance(classifier, moco_hf.MoCoForImageClassification) and classifier.config.num_labels == 10

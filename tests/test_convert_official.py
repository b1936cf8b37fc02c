"""moco_hf.convert_official against fake checkpoints laid out like facebookresearch/moco's (no network).

The reference is the official model itself: a torchvision ResNet-18 whose `fc` is the projection head, as
`moco/builder.py` builds it; the converted model must give its avgpool features and its head output.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _tolerance import PIXEL, UNIT_NORM, tolerance
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn
from transformers import AutoImageProcessor, AutoModel, BitImageProcessorPil

import moco_hf
from moco_hf.convert_official import ConversionError, convert, main

REPO = Path(__file__).resolve().parents[1]
DIM, K = 128, 64


def official_encoder(mlp: bool, seed: int) -> nn.Module:
    """`base_encoder(num_classes=dim)`, with v2's `--mlp` head built as in the official builder.py."""
    torch.manual_seed(seed)
    encoder = torchvision.models.resnet18(num_classes=DIM)
    if mlp:
        dim_mlp = encoder.fc.weight.shape[1]
        encoder.fc = nn.Sequential(nn.Linear(dim_mlp, dim_mlp), nn.ReLU(), encoder.fc)
    # non-trivial BatchNorm statistics, so eval-mode features depend on them
    for module in encoder.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return encoder.eval()


def save_official(path: Path, encoder_q: nn.Module, encoder_k: nn.Module | None = None, queue: bool = True) -> Path:
    state = {f"module.encoder_q.{k}": v for k, v in encoder_q.state_dict().items()}
    if encoder_k is not None:
        state.update({f"module.encoder_k.{k}": v for k, v in encoder_k.state_dict().items()})
    if queue:
        state["module.queue"] = F.normalize(torch.randn(DIM, K), dim=0)  # dim x K, as in builder.py
        state["module.queue_ptr"] = torch.tensor([24], dtype=torch.long)
    optimizer = {"state": {}, "param_groups": []}
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": state, "optimizer": optimizer}, path)
    return path


# torchvision's ResNet-18 and timm's, eval mode, float32 (tests/_tolerance.py): the longest sum is a convolution over
# 512 x 3 x 3 inputs, about 25 layers, activations below 10.
RESNET18 = tolerance(torch.float32, terms=512 * 9, depth=25, scale=10)


def pooled(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision ResNet features after avgpool (everything but fc)."""
    return torch.flatten(nn.Sequential(*list(encoder.children())[:-1])(x), 1)


@pytest.fixture
def x():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def test_v2_full_checkpoint(tmp_path, x):
    encoder_q, encoder_k = official_encoder(mlp=True, seed=1), official_encoder(mlp=True, seed=2)
    checkpoint = save_official(tmp_path / "checkpoint_0199.pth.tar", encoder_q, encoder_k)
    assert main(["--checkpoint", str(checkpoint), "--output_dir", str(tmp_path / "out"), "--arch", "resnet18"]) == 0

    model = AutoModel.from_pretrained(tmp_path / "out").eval()
    assert isinstance(model, moco_hf.MoCoModel)
    c = model.config
    assert (c.backbone, c.embed_dim, c.queue_size, c.tau) == ("resnet18", DIM, K, 0.2)
    assert c.mlp_head is True and c.mlp_hidden_dim is None  # 512 -> 512 -> 128: hidden = feature width
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out.pooler_output, pooled(encoder_q, x), **RESNET18)
        torch.testing.assert_close(model.query_encoder(x), encoder_q(x), **RESNET18)  # the official head output
        torch.testing.assert_close(out.query_embeddings, F.normalize(encoder_q(x), dim=1), **RESNET18)
        torch.testing.assert_close(model.key_encoder(x), encoder_k(x), **RESNET18)
    official = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert torch.equal(model.queue, official["module.queue"].T)  # copied, not computed
    assert model.queue_ptr.tolist() == [24]


def test_v1_linear_head(tmp_path, x):
    encoder_q = official_encoder(mlp=False, seed=4)
    checkpoint = save_official(tmp_path / "v1.pth.tar", encoder_q, official_encoder(mlp=False, seed=5))
    convert(checkpoint, tmp_path / "out")  # arch from the checkpoint's 'arch'

    model = AutoModel.from_pretrained(tmp_path / "out").eval()
    assert model.config.mlp_head is False and model.config.tau == 0.07  # v1 default
    with torch.no_grad():
        torch.testing.assert_close(model(x).pooler_output, pooled(encoder_q, x), **RESNET18)
        torch.testing.assert_close(model.query_encoder(x), encoder_q(x), **RESNET18)


def test_cleaned_checkpoint_copies_query_encoder_and_draws_a_queue(tmp_path, x):
    encoder_q = official_encoder(mlp=True, seed=6)
    checkpoint = save_official(tmp_path / "moco_v2_800ep_pretrain.pth.tar", encoder_q, encoder_k=None, queue=False)
    convert(checkpoint, tmp_path / "out", arch="resnet18", queue_size=32, tau=0.1)

    model = AutoModel.from_pretrained(tmp_path / "out").eval()
    assert model.config.queue_size == 32 and model.config.tau == 0.1
    with torch.no_grad():
        torch.testing.assert_close(model(x).pooler_output, pooled(encoder_q, x), **RESNET18)
        torch.testing.assert_close(model.key_encoder(x), encoder_q(x), **RESNET18)  # f_k starts as a copy of f_q
    assert model.queue.shape == (32, DIM) and model.queue_ptr.tolist() == [0]
    torch.testing.assert_close(model.queue.norm(dim=1), torch.ones(32), **UNIT_NORM)
    record = (tmp_path / "out" / "training_config.json").read_text()
    assert "copied from the query encoder" in record and "random unit vectors" in record

    # the image processor is the official evaluation transform of main_lincls.py:
    # Resize(256), CenterCrop(224), ToTensor, Normalize(ImageNet mean/std)
    processor = AutoImageProcessor.from_pretrained(tmp_path / "out")
    assert processor.size == {"shortest_edge": 256} and processor.crop_size == {"height": 224, "width": 224}
    official = torchvision.transforms.Compose([
        torchvision.transforms.Resize(256),
        torchvision.transforms.CenterCrop(224),
        torchvision.transforms.ToTensor(),
        torchvision.transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    rng = np.random.default_rng(0)
    # 400 x 300 -> 341 x 256: crop margins 117 and 32 land on the same pixel in torchvision and transformers
    # (odd margins whose half rounds up differ by one pixel, see tests/test_hub.py)
    image = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((400, 300), Image.BICUBIC)
    got = BitImageProcessorPil(**processor.to_dict())(image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(got, official(image), **PIXEL)  # the same 8-bit pixels, normalised




def test_wrong_arch_is_refused(tmp_path):
    checkpoint = save_official(tmp_path / "c.pth.tar", official_encoder(mlp=True, seed=8), queue=False)
    with pytest.raises(ConversionError, match="does not fit timm 'resnet50'.*wrong shape"):
        convert(checkpoint, arch="resnet50", queue_size=16)


def test_bad_files_are_refused_with_the_expected_keys(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(ConversionError, match="not a loadable PyTorch checkpoint.*module.encoder_q"):
        convert(text)
    other = tmp_path / "supervised.pth"
    torch.save({"state_dict": torchvision.models.resnet18().state_dict()}, other)
    expected = "not an official MoCo checkpoint: expected 'state_dict' with 'module.encoder_q"
    with pytest.raises(ConversionError, match=expected):
        convert(other)
    with pytest.raises(ConversionError, match="does not exist"):
        convert(tmp_path / "missing.pth.tar")


def test_module_entry_point_reports_errors_in_one_line(tmp_path):
    bad = tmp_path / "bad.pth.tar"
    bad.write_bytes(b"\x00garbage")
    result = subprocess.run(
        [sys.executable, "-m", "moco_hf.convert_official", "--checkpoint", str(bad), "--output_dir", str(tmp_path)],
        cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("convert_official: error:") and "Traceback" not in result.stderr
    assert not (tmp_path / "config.json").exists()

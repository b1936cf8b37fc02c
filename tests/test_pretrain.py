"""pretrain.py end to end on CPU: the embedded demo path, exact resume, checkpoints, config handling."""

import json
import os
import sys

import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pretrain  # noqa: E402
from moco_hf import pretraining  # noqa: E402
from moco_hf.views import ImageChunk  # noqa: E402
from moco_hf.run_folder import list_checkpoints, resolve_resume  # noqa: E402
from moco_hf.training import uses_cuda_graphs  # noqa: E402
from pretrain import COMPILE_MODES, load_config  # noqa: E402

from _tiny import TINY  # noqa: E402
from _tolerance import PIXEL, UNIT_NORM  # noqa: E402


def tiny_config(tmp_path, *extra):
    return load_config(None, TINY + ["--output_dir", str(tmp_path / "out"), *extra])


def make_image_folder(root, per_class=12, size=24, classes=3):
    """A small RGB image folder with train/ and test/ splits; returns the root."""
    g = torch.Generator().manual_seed(0)
    for split, count in (("train", per_class), ("test", max(2, per_class // 3))):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                base = torch.zeros(3, size, size, dtype=torch.uint8)
                base[c] = 200
                noise = torch.randint(0, 55, (3, size, size), generator=g, dtype=torch.uint8)
                array = (base + noise).permute(1, 2, 0).numpy()
                Image.fromarray(array).save(folder / f"{i}.png")
    return root


def test_demo_run_end_to_end(tmp_path, capsys):
    """The embedded default (digits) through the real code path: final model, metrics, curves, config."""
    cfg = tiny_config(tmp_path, "--max_steps", "6", "--save_steps", "3", "--knn_max_train_samples", "200",
                      "--knn_max_eval_samples", "60", "--report_to", "tensorboard")
    result = pretrain.train(cfg)
    assert "one process and bn_splits 1 leave nothing to shuffle across" in capsys.readouterr().out
    out = tmp_path / "out"
    assert (out / "config.yaml").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = {tag for events in out.rglob("events.out.tfevents.*")  # report_to: the metrics reach TensorBoard
              for tag in EventAccumulator(str(events)).Reload().Tags()["scalars"]}
    assert {"loss", "contrastive_acc", "lr", "images_per_s", "knn_acc"} <= logged
    assert (out / "training_curves.png").stat().st_size > 0
    final = out / "final"
    metrics = json.loads((final / "metrics.json").read_text())
    assert 0.0 <= metrics["knn_acc"] <= 100.0 and 0.0 <= metrics["knn_random_init"] <= 100.0
    # every number next to its baselines, with protocol, split and unit; the pictures beside the weights
    for key in ("knn_pixels", "probe_acc", "probe_random_init", "probe_pixels"):
        assert 0.0 <= metrics[key] <= 100.0, key
    assert set(metrics["label_efficiency"]) == {"1%", "10%", "100%"}
    assert metrics["evaluation"]["unit"] == "% top-1" and metrics["evaluation"]["split"] == "'test' (60 images)"
    assert metrics["knn_k"] == 20 and "k=20" in metrics["evaluation"]["knn"]
    assert {"nearest_neighbours.png", "feature_map.png"} <= {p.name for p in final.iterdir()}
    images = {tag for events in out.rglob("events.out.tfevents.*")
              for tag in EventAccumulator(str(events)).Reload().Tags()["images"]}
    assert "final/knn_pixels" in logged and {"final/nearest_neighbours", "final/feature_map"} <= images
    assert metrics["steps"] == 6 and result.state.step == 6
    assert len(list_checkpoints(str(out))) == 2

    from transformers import AutoImageProcessor, AutoModel

    # the kNN monitor's eval transform travels with the weights: resize and center crop to 32 px, the run's mean/std
    from moco_hf.preprocessing import default_data_config

    assert default_data_config(final)["interpolation"] == "bilinear"  # what the kNN monitor resized with
    processor = AutoImageProcessor.from_pretrained(str(final))
    pixels = processor(Image.new("RGB", (48, 40), (255, 0, 0)), return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 32, 32)
    stats = pretraining.data_stats(result.model)
    expected = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(stats["mean"])) / torch.tensor(stats["std"])
    torch.testing.assert_close(pixels[0, :, 16, 16], expected, **PIXEL)
    loaded = AutoModel.from_pretrained(str(final))
    assert torch.equal(loaded.queue, result.model.queue)
    assert int(loaded.queue_ptr) == (6 * 16) % 64
    # The queue was written by training: its rows are still unit vectors, and no longer the random init.
    torch.testing.assert_close(loaded.queue.norm(dim=1), torch.ones(64), **UNIT_NORM)


def test_resume_equals_uninterrupted(tmp_path):
    """2N steps in one go == N steps, stop, resume with `auto`, N more: same weights, queue, optimizer state."""
    # batch 48 = 2 worker chunks of 24 per step: batches are joined from chunks and must resume exactly too.
    common = ["--max_steps", "8", "--eval_split", "none", "--bn_splits", "2", "--seed", "3", "--batch_size", "48",
              "--queue_size", "100"]
    straight = pretrain.train(load_config(None, TINY + ["--output_dir", str(tmp_path / "a"), *common]))

    first = pretrain.train(load_config(None, TINY + ["--output_dir", str(tmp_path / "b"), *common,
                                                     "--stop_after_steps", "4"]))
    assert first.state.step == 4 and not (tmp_path / "b" / "final").exists()
    assert resolve_resume("auto", str(tmp_path / "b")).endswith("checkpoint-00000004")
    resumed = pretrain.train(load_config(None, TINY + ["--output_dir", str(tmp_path / "b"), *common,
                                                       "--resume_from_checkpoint", "auto"]))
    assert resumed.state.step == 8
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # And the run really moved: the final queue differs from a fresh model's.
    assert not torch.equal(a["queue"], first.model.state_dict()["queue"])


def test_interrupted_save_leaves_no_checkpoint_for_auto(tmp_path, monkeypatch):
    """A crash in the middle of accelerator.save_state leaves only a temporary folder that `auto` ignores."""
    cfg = tiny_config(tmp_path, "--max_steps", "4", "--save_steps", "2", "--eval_split", "none")
    from accelerate import Accelerator

    real_save = Accelerator.save_state
    calls = {"n": 0}

    def flaky_save(self, output_dir=None, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.makedirs(output_dir, exist_ok=True)
            with open(os.path.join(output_dir, "model.safetensors"), "wb") as f:
                f.write(b"half-written")
            raise KeyboardInterrupt
        return real_save(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", flaky_save)
    with pytest.raises(KeyboardInterrupt):
        pretrain.train(cfg)
    out = str(tmp_path / "out")
    assert [os.path.basename(p) for p in list_checkpoints(out)] == ["checkpoint-00000002"]
    assert resolve_resume("auto", out).endswith("checkpoint-00000002")
    monkeypatch.setattr(Accelerator, "save_state", real_save)
    resumed = pretrain.train(load_config(None, TINY + ["--output_dir", out, "--max_steps", "4", "--save_steps", "2",
                                                       "--eval_split", "none", "--resume_from_checkpoint", "auto"]))
    assert resumed.state.step == 4
    assert not any(name.startswith(".tmp-") for name in os.listdir(os.path.join(out, "checkpoints")))


def test_local_folder_with_bad_images_is_skipped_and_counted(tmp_path):
    root = make_image_folder(tmp_path / "data")
    train = root / "train" / "class0"
    (train / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    good = (train / "0.png").read_bytes()
    (train / "truncated.png").write_bytes(good[: len(good) // 2])
    Image.new("L", (20, 20), 90).save(train / "gray.png")
    Image.new("RGBA", (20, 20), (10, 20, 30, 128)).save(train / "rgba.png")
    Image.new("P", (20, 20), 3).save(train / "palette.png")
    Image.new("CMYK", (20, 20), (10, 20, 30, 40)).save(train / "cmyk.jpg")
    Image.new("RGB", (5, 7), (200, 10, 10)).save(train / "tiny.png")  # smaller than the 32 px crop
    # The stream itself: every readable image comes out as two 3 x 32 x 32 views, the two broken ones are counted.
    from moco_hf.data.sources import load_source
    from moco_hf.data.streams import TwoViewStream
    from moco_hf.data.transforms import TwoViewTransform

    source = load_source("train", train_dir=str(root), num_shards=2)
    stream = TwoViewStream(source.dataset, source.image_column, TwoViewTransform("v2", 32, [0.5] * 3, [0.5] * 3), 0)
    samples = list(stream)
    views = [(q, k) for q, k, _ in samples if q is not None]
    names = sorted(os.path.basename(name) for _, _, skipped in samples for name in skipped)
    assert len(views) == 3 * 12 + 5 and names == ["corrupt.png", "truncated.png"]
    assert all(q.shape == k.shape == (3, 32, 32) and torch.isfinite(q).all() for q, k in views)

    # And the training loop keeps going and reports each of them once, by name, although 10 steps x 8 images read
    # the 45 files about twice.
    cfg = tiny_config(tmp_path, "--train_dir", str(root), "--max_steps", "10", "--batch_size", "8",
                      "--queue_size", "32", "--save_steps", "0", "--eval_split", "none")
    result = pretrain.train(cfg)
    assert result.state.data_epoch >= 1  # the second pass began
    assert result.metrics["skipped_images"] == 2
    recorded = json.loads((tmp_path / "out" / "final" / "metrics.json").read_text())
    assert sorted(os.path.basename(n) for n in recorded["skipped_image_names"]) == ["corrupt.png", "truncated.png"]
    assert result.state.step == 10


@pytest.mark.parametrize(
    "args, message",
    [
        (["--train_dir", "/nonexistent/folder"], "does not exist"),
        (["--queue_size", "8", "--batch_size", "16"], "queue_size"),
        (["--no_such_key", "1"], "valid keys"),
        (["--mixed_precision", "fp8"], "mixed_precision"),
        (["--batch_size", "abc"], "expects int"),
        (["--compile", "true", "--compile_mode", "fastest"], "compile_mode"),
        (["--compile_mode", "reduce-overhead"], "set compile: true"),
    ],
)
def test_bad_input_fails_fast_with_a_clear_message(tmp_path, capsys, args, message):
    code = pretrain.main(TINY + ["--output_dir", str(tmp_path / "out"), *args])
    assert code == 2
    assert message in capsys.readouterr().err


def test_a_small_split_over_many_workers_trains_on_every_image(tmp_path):
    """36 images over 4 workers give each worker less than a chunk (16): its partial chunk still reaches a batch."""
    root = make_image_folder(tmp_path / "images", per_class=12)
    cfg = tiny_config(tmp_path, "--train_dir", str(root), "--eval_split", "none", "--max_steps", "9",
                      "--num_workers", "4")
    result = pretrain.train(cfg)  # 9 steps of 16 = 4 epochs of 36 images
    assert result.state.step == 9 and result.state.data_epoch == 3


def test_dataset_without_image_column_and_empty_folder(tmp_path):
    import pandas as pd

    parquet_dir = tmp_path / "numbers"
    parquet_dir.mkdir()
    pd.DataFrame({"x": [1, 2, 3], "label": [0, 1, 0]}).to_parquet(parquet_dir / "train.parquet")
    with pytest.raises(ValueError, match="no image column"):
        pretrain.train(tiny_config(tmp_path, "--train_dir", str(parquet_dir), "--max_steps", "1"))
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "train" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images"):
        pretrain.train(tiny_config(tmp_path, "--train_dir", str(empty), "--max_steps", "1"))


def test_knn_monitor_with_class_names_for_labels(tmp_path):
    """A label column of class names (a parquet split, not a ClassLabel): the kNN monitor maps the bank's names to
    sorted indices for both splits; a name only the eval split has counts as a wrong prediction."""
    import io as _io

    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    colours = {"cat": (200, 30, 30), "dog": (30, 200, 30), "bird": (30, 30, 200), "fish": (200, 200, 30)}

    def split(names, count):
        images = []
        for i in range(count):
            buffer = _io.BytesIO()
            Image.new("RGB", (24, 24), colours[names[i % len(names)]]).save(buffer, format="PNG")
            images.append({"bytes": buffer.getvalue(), "path": None})
        labels = [names[i % len(names)] for i in range(count)]
        features = Features({"image": ImageFeature(), "label": Value("string")})
        return Dataset.from_dict({"image": images, "label": labels}, features=features)

    for name, names, count in (("train", ["cat", "dog", "bird"], 48), ("test", ["dog", "fish"], 8)):
        (tmp_path / "data" / name).mkdir(parents=True)
        split(names, count).to_parquet(str(tmp_path / "data" / name / "part-0.parquet"))
    cfg = tiny_config(tmp_path, "--train_dir", str(tmp_path / "data"), "--max_steps", "2", "--num_workers", "0")
    bank, test, names = pretraining.build_knn_loaders(cfg, pretraining.data_stats(pretraining.build_model(cfg)))
    assert names == ["bird", "cat", "dog"]
    bank_labels = torch.cat([labels for _, labels in bank])
    assert sorted(bank_labels.unique().tolist()) == [0, 1, 2]  # bird, cat, dog
    assert sorted(torch.cat([labels for _, labels in test]).tolist()) == [-1] * 4 + [2] * 4  # fish (no bank), dog
    metrics = pretrain.train(cfg).metrics
    assert 0.0 <= metrics["knn_acc"] <= 50.0  # the fish half can never be right


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("batch_size: 64\nlr_steps: [3, 4]\nbackbone: test_vit\n")
    cfg = load_config(str(path), ["--batch_size", "32", "--symmetric", "true", "--crop_min_scale=0.5"])
    assert (cfg.batch_size, cfg.lr_steps, cfg.backbone, cfg.symmetric, cfg.crop_min_scale) == (
        32, [3, 4], "test_vit", True, 0.5)
    path.write_text("base_lr: 3e-2\nweight_decay: 1e-4\neval_split: none\n")  # YAML reads these as strings
    cfg = load_config(str(path), [])
    assert (cfg.base_lr, cfg.weight_decay, cfg.eval_split) == (0.03, 1e-4, None)
    with pytest.raises(ValueError, match="log_steps"):
        load_config(None, ["--log_steps", "0"])
    path.write_text("bogus: 1\n")
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(str(path), [])


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(ROOT, "configs"))))
def test_shipped_configs_parse_and_build(name):
    """Every shipped config is valid, and its model config builds (on the meta device: no memory)."""
    cfg = load_config(os.path.join(ROOT, "configs", name), [])
    from moco_hf import MoCoConfig

    MoCoConfig(**cfg.model_kwargs())


@pytest.mark.parametrize("name, scale", [("moco_v1_resnet50_imagenet.yaml", 0.2), ("moco_v2_resnet50_imagenet.yaml", 0.2),
                                         ("moco_v2_vit_small_imagenet_exploratory.yaml", 0.2),
                                         ("moco_v2_resnet18_cifar10.yaml", 0.08), ("moco_v3_vit_small_imagenet.yaml", 0.08),
                                         ("moco_v3_vit_small_imagenet_1gpu.yaml", 0.08),
                                         ("moco_v3_vit_base_imagenet.yaml", 0.08), ("moco_v3_resnet50_imagenet.yaml", 0.2),
                                         ("moco_v3_resnet18_cifar10.yaml", 0.08)])
def test_paper_configs_crop_as_published(name, scale):
    """The demo's crop scale (0.4, the default) must not leak into the paper configs, on either augmentation path."""
    from moco_hf.data.transforms import TwoViewTransform

    cfg = load_config(os.path.join(ROOT, "configs", name), [])
    stats = {"mean": [0.5] * 3, "std": [0.25] * 3}
    cpu = TwoViewTransform(cfg.augmentation, cfg.image_size, stats["mean"], stats["std"], cfg.crop_min_scale)
    assert cpu.preset.crop_scale == (scale, 1.0)
    assert tuple(pretraining.make_gpu_augment(cfg, stats).crop.scale) == (scale, 1.0)


def test_defaults_are_the_demo_config():
    """`python pretrain.py` and configs/demo_digits.yaml must not drift apart."""
    from pretrain import PretrainConfig

    assert load_config(os.path.join(ROOT, "configs", "demo_digits.yaml"), []) == PretrainConfig()


def test_cuda_graph_modes_are_torch_compiles_own():
    for mode in COMPILE_MODES:
        cudagraphs = bool(torch._inductor.list_mode_options(mode).get("triton.cudagraphs", False))
        assert uses_cuda_graphs(mode, torch.device("cuda")) == cudagraphs, mode
        assert not uses_cuda_graphs(mode, torch.device("cpu"))


@pytest.mark.parametrize("mode, marks", [("default", 0), ("reduce-overhead", 3), ("max-autotune-no-cudagraphs", 0)])
def test_compile_mode_reaches_both_encoders_and_cuda_graphs_see_each_step(tmp_path, monkeypatch, mode, marks):
    from moco_hf.modeling_moco import MoCoEncoder

    modes, marked = [], []
    monkeypatch.setattr(MoCoEncoder, "compile", lambda self, **kwargs: modes.append(kwargs.get("mode")))
    # as on a GPU, where the CUDA-graph modes replay graphs whose outputs the next step overwrites
    monkeypatch.setattr(pretraining, "uses_cuda_graphs", lambda m, device: uses_cuda_graphs(m, torch.device("cuda")))
    monkeypatch.setattr(pretraining, "compiles_on", lambda device: True)  # as on a GPU
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marked.append(True))
    cfg = tiny_config(tmp_path, "--max_steps", "3", "--eval_split", "none", "--symmetric", "true", "--compile", "true",
                      "--compile_mode", mode)
    pretrain.train(cfg)
    assert modes == [mode, mode]  # query and key encoder
    assert len(marked) == marks  # once per step, although the symmetric loss calls each encoder twice


def test_lr_schedules():
    from moco_hf.training import lr_at

    cos = [lr_at(s, 100, 10, 0.1, "cosine") for s in range(100)]
    assert cos[0] == pytest.approx(0.1) and cos[50] == pytest.approx(0.05) and cos[-1] < 1e-3
    assert all(a >= b for a, b in zip(cos, cos[1:]))
    step = [lr_at(s, 200, 1, 0.03, "step", milestones_epochs=[120, 160]) for s in (0, 119, 120, 159, 160, 199)]
    assert step == pytest.approx([0.03, 0.03, 0.003, 0.003, 0.0003, 0.0003])
    warm = [lr_at(s, 100, 10, 0.1, "cosine", warmup_steps=10) for s in range(12)]
    assert warm[0] == pytest.approx(0.01) and warm[9] == pytest.approx(0.1) and warm[10] == pytest.approx(0.1)


@pytest.mark.parametrize("decode", ["workers", "threads", "nvjpeg"])
def test_batched_device_path_on_cpu(tmp_path, decode):
    """gpu_augment on (here on the CPU): chunks of decoded images or raw bytes, joined into full batches,
    corrupt files skipped and counted, training runs."""
    root = make_image_folder(tmp_path / "data", per_class=8)
    (root / "train" / "class1" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    from moco_hf.data.streams import collate_encoded, split_encoded

    images = [torch.randint(0, 255, (3, h, w), dtype=torch.uint8) for h, w in ((5, 7), (9, 4), (1, 3))]
    flat, shapes, skipped, names = collate_encoded([(images[0], [], None), (images[1], ["a", "b"], None),
                                                    (images[2], [], None)])
    assert skipped == ["a", "b"] and all(torch.equal(a, b) for a, b in zip(images, split_encoded(flat, shapes)))
    from moco_hf.views import ImageChunk

    chunk, n_skipped = ImageChunk.from_chunk((flat, shapes, skipped, names), torch.device("cpu"))
    first, rest = chunk.split(2)
    assert n_skipped == ["a", "b"] and len(first) == 2 and len(rest) == 1
    packed = ImageChunk.join([rest, first]).packed()  # channel planes: pixel (c, y, x) at offset + y * W + x
    for n, image in enumerate([images[2], images[0], images[1]]):
        h, w = image.shape[1:]
        assert (int(packed.heights[n]), int(packed.widths[n])) == (h, w)
        start = int(packed.offsets[n])
        assert torch.equal(packed.pixels[:, start: start + h * w].reshape(3, h, w), image)

    cfg = tiny_config(tmp_path, "--train_dir", str(root), "--max_steps", "8", "--batch_size", "8",
                      "--queue_size", "32", "--eval_split", "none", "--gpu_augment", "on",
                      "--device_decode", decode, "--num_workers", "1", "--device_cache", "off")
    result = pretrain.train(cfg)
    assert result.state.step == 8 and result.metrics["skipped_images"] == 1  # named once over 2.5 passes
    assert [os.path.basename(n) for n in result.metrics["skipped_image_names"]] == ["bad.jpg"]
    assert torch.isfinite(result.model.queue).all()


class _PassThrough:
    """Stands in for MoCoGPUAugment: returns which cached images a batch holds (their offsets)."""

    def two_views(self, images, generator=None):
        return images.offsets, images.offsets


def _chunk(images):
    from moco_hf.data.streams import collate_encoded

    return ImageChunk.from_chunk(collate_encoded([(image, [], None) for image in images]), torch.device("cpu"))[0]


def _tiny_cache(count=10):
    from moco_hf.views import DeviceImageCache

    images = [torch.randint(0, 255, (3, 2 + i % 3, 3), dtype=torch.uint8) for i in range(count)]
    chunks = [(_chunk(images[:4]), ["bad.jpg"]), (_chunk(images[4:]), [])]
    return DeviceImageCache.build(chunks, max_bytes=10_000), images


def test_device_cache_packs_every_image_and_batches_are_views():
    cache, images = _tiny_cache()
    assert len(cache) == 10 and cache.skipped == ["bad.jpg"]
    batch = cache.batch(torch.tensor([7, 2]))
    for n, i in enumerate((7, 2)):
        h, w = int(batch.heights[n]), int(batch.widths[n])
        start = int(batch.offsets[n])
        pixels = batch.pixels[:, start: start + h * w].reshape(3, h, w)
        assert torch.equal(pixels, images[i])
    assert batch.pixels.data_ptr() == cache.images.pixels.data_ptr()  # no copy
    from moco_hf.views import DeviceImageCache

    too_small = DeviceImageCache.build([(_chunk(images), [])], max_bytes=100)
    assert too_small is None
    # the mean image size times the expected count already exceeds the budget after the first chunk
    assert DeviceImageCache.build(iter([(_chunk(images[:2]), [])] * 1000), 2_000, 1000) is None


def test_cached_views_epochs_are_permutations_and_resume_exactly():
    from moco_hf.training import TrainState
    from moco_hf.views import CachedViews

    cache, _ = _tiny_cache()
    offsets = cache.images.offsets.tolist()
    state = TrainState()
    views = CachedViews(cache, state, _PassThrough(), seed=0, rank=0, batch=3)
    assert views.batches_per_epoch == 3
    seen = [views.next(step)[0].tolist() for step in range(9)]  # 3 epochs
    epochs = [[i for batch in seen[e * 3:(e + 1) * 3] for i in batch] for e in range(3)]
    for epoch in epochs:  # each epoch: 9 distinct cached images (one dropped), in a fresh order
        assert len(set(epoch)) == 9 and set(epoch) <= set(offsets)
    assert epochs[0] != epochs[1] != epochs[2]
    assert (state.data_epoch, state.batches_in_epoch) == (2, 3)

    resumed_state = TrainState(step=4, data_epoch=1, batches_in_epoch=1)  # after 4 batches
    resumed = CachedViews(cache, resumed_state, _PassThrough(), seed=0, rank=0, batch=3)
    assert [resumed.next(step)[0].tolist() for step in range(4, 9)] == seen[4:]
    other_rank = CachedViews(cache, TrainState(), _PassThrough(), seed=0, rank=1, batch=3)
    assert [other_rank.next(step)[0].tolist() for step in range(3)] != seen[:3]


@pytest.mark.parametrize("decode", ["workers", "threads"])
def test_device_cache_training_resumes_exactly_and_counts_corrupt_images(tmp_path, decode):
    """gpu_augment on with the split cached in (here CPU) memory: 6 straight steps == 1 + resume + 5."""
    root = make_image_folder(tmp_path / "data", per_class=8)
    (root / "train" / "class1" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    common = ["--train_dir", str(root), "--max_steps", "6", "--batch_size", "8", "--queue_size", "32",
              "--eval_split", "none", "--gpu_augment", "on", "--device_cache", "on", "--num_workers", "1",
              "--bn_splits", "2", "--device_decode", decode]
    straight = pretrain.train(tiny_config(tmp_path / "a", *common))
    assert straight.metrics["skipped_images"] == 1
    assert (straight.state.data_epoch, straight.state.batches_in_epoch) == (1, 3)  # 24 images: 3 batches/epoch

    pretrain.train(tiny_config(tmp_path / "b", *common, "--stop_after_steps", "1"))  # saved before the first log
    resumed = pretrain.train(tiny_config(tmp_path / "b", *common, "--resume_from_checkpoint", "auto"))
    assert resumed.metrics["skipped_images"] == 1  # not counted again on resume
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_device_cache_that_does_not_fit(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=4)
    common = ["--train_dir", str(root), "--max_steps", "2", "--batch_size", "4", "--queue_size", "32",
              "--eval_split", "none", "--gpu_augment", "on", "--num_workers", "0", "--device_cache_gb", "1e-6"]
    with pytest.raises(ValueError, match="does not fit in device_cache_gb"):
        pretrain.train(tiny_config(tmp_path / "a", *common, "--device_cache", "on"))
    result = pretrain.train(tiny_config(tmp_path / "b", *common))  # auto: streams instead
    assert result.state.step == 2


def test_device_cache_gives_up_before_starting_workers(tmp_path, monkeypatch):
    """One decoded image times the split's size already exceeds the budget: no loader pass is made."""
    from accelerate import PartialState

    root = make_image_folder(tmp_path / "data", per_class=4)
    cfg = tiny_config(tmp_path, "--train_dir", str(root), "--batch_size", "4", "--gpu_augment", "on",
                      "--device_cache_gb", "5e-6", "--eval_split", "none")  # 12 x 1,728 B > 2 x 5,369 B
    model = pretraining.build_model(cfg)
    dataset, loader, n = pretraining.build_train_loader(cfg, PartialState(), pretraining.data_stats(model), gpu=True)
    assert dataset.first_image_nbytes() == 3 * 24 * 24
    monkeypatch.setattr(pretraining, "chunk_loader", lambda *a, **k: pytest.fail("the split was read"))
    assert pretraining.build_device_cache(cfg, dataset, loader, torch.device("cpu"), n) is None


class _Processes:
    """Stands in for the Accelerator of several processes: `gather` returns every process's flag."""

    device = torch.device("cpu")

    def __init__(self, *fits):
        self.fits = torch.tensor(fits)

    def gather(self, tensor):
        return self.fits


def test_processes_agree_on_the_device_cache(tmp_path):
    cache, _ = _tiny_cache()
    auto = tiny_config(tmp_path, "--gpu_augment", "on")
    assert pretraining.settle_device_cache(auto, cache, _Processes(True, True)) is cache
    assert pretraining.settle_device_cache(auto, cache, _Processes(True, False)) is None  # then every process streams
    on = tiny_config(tmp_path, "--gpu_augment", "on", "--device_cache", "on")
    with pytest.raises(ValueError, match="1 of 2 processes does not fit"):
        pretraining.settle_device_cache(on, cache, _Processes(True, False))


def test_cache_budget_is_exact_for_on_and_an_estimate_for_auto():
    from moco_hf.views import DeviceImageCache

    big, small = torch.zeros(3, 20, 20, dtype=torch.uint8), torch.zeros(3, 2, 2, dtype=torch.uint8)
    skewed = [(_chunk([big] * 10), [])] + [(_chunk([small] * 10), []) for _ in range(99)]  # 12,000 + 11,880 bytes
    # `on` (no estimate): large first images do not matter, only the total
    assert len(DeviceImageCache.build(iter(skewed), 25_000)) == 1000
    assert DeviceImageCache.build(iter(skewed), 23_000) is None
    # `auto` extrapolates from a sample of the split (5 %, at most 1,000 images): typical first images pass
    typical = [(_chunk([big] + [small] * 9), []) for _ in range(100)]  # 120,000 + 10,800 bytes
    assert len(DeviceImageCache.build(iter(typical), 140_000, expected_images=1000)) == 1000
    consumed = []
    assert DeviceImageCache.build((consumed.append(c) or c for c in typical), 60_000, expected_images=1000) is None
    assert len(consumed) == 5  # gave up after a sample of 50 images, not at 60,000 bytes


def test_trailing_unreadable_images_are_counted():
    from moco_hf.data.streams import EncodedStream, collate_encoded

    good = _png_bytes()
    rows = [{"image": {"bytes": good}}] * 3 + [{"image": {"bytes": b"junk"}}, {"image": {"path": "/no/such.jpg"}}]
    # workers that decode skip both bad rows; workers that only read bytes pass the junk on (decoded later, and
    # named by the training process: test_batched_device_path_on_cpu)
    for decode, unreadable, kept in ((True, 2, 3), (False, 1, 4)):
        samples = list(EncodedStream(_Rows(rows), "image", decode=decode))
        skipped = [name for _, names, _ in samples for name in names]
        assert len(skipped) == unreadable and sum(t.numel() > 0 for t, _, _ in samples) == kept
        assert "/no/such.jpg" in skipped and (not decode or skipped[0].startswith("sha1:"))  # bytes: their hash
        chunk = collate_encoded(samples[-1:])  # a chunk of only the names of the trailing unreadable rows
        assert chunk[2] == samples[-1][1] and chunk[0].numel() == 0 and chunk[1].shape[0] == 0
        assert len(ImageChunk.from_chunk(chunk, torch.device("cpu"))[0]) == 0


class _Rows(list):
    def set_epoch(self, epoch):
        pass


def _png_bytes():
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (5, 4), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_resume_from_streaming_into_the_device_cache_converts_the_position(tmp_path):
    """Streaming counts chunks of 24 images, the cache batches of 48: 2 chunks taken = 1 batch taken."""
    root = make_image_folder(tmp_path / "data", per_class=40)  # 120 images: 2 cached batches of 48 per epoch
    common = ["--train_dir", str(root), "--batch_size", "48", "--queue_size", "96", "--eval_split", "none",
              "--gpu_augment", "on", "--num_workers", "1", "--max_steps", "3"]
    first = pretrain.train(tiny_config(tmp_path, *common, "--device_cache", "off", "--stop_after_steps", "1"))
    assert (first.state.data_epoch, first.state.batches_in_epoch) == (0, 2)
    resumed = pretrain.train(tiny_config(tmp_path, *common, "--device_cache", "on",
                                         "--resume_from_checkpoint", "auto"))
    # converted to (0, 1); step 2 takes batch 1 of epoch 0, step 3 starts epoch 1 (unconverted: (1, 2))
    assert (resumed.state.data_epoch, resumed.state.batches_in_epoch) == (1, 1)


def test_device_cache_and_the_training_stream_keep_the_workers_partial_chunks(tmp_path):
    """Each worker's last chunk is partial: the training loader delivers it, and the cache holds every image."""
    from accelerate import PartialState

    root = make_image_folder(tmp_path / "data", per_class=6)  # 18 train images over 2 workers: 9 each, chunks of 4
    cfg = tiny_config(tmp_path, "--train_dir", str(root), "--batch_size", "4", "--num_workers", "2",
                      "--gpu_augment", "on", "--device_cache", "on", "--eval_split", "none")
    model = pretraining.build_model(cfg)
    dataset, loader, num_examples = pretraining.build_train_loader(cfg, PartialState(), pretraining.data_stats(model),
                                                                gpu=True)
    chunks = [len(chunk[1]) for chunk in loader]
    assert num_examples == 18 and sum(chunks) == 18 and min(chunks) < 4  # the partial chunks too
    cache = pretraining.build_device_cache(cfg, dataset, loader, torch.device("cpu"), num_examples)
    assert len(cache) == 18 and cache.num_skipped == 0


def test_profile_steps_writes_where_the_time_went(tmp_path):
    cfg = tiny_config(tmp_path, "--max_steps", "5", "--profile_steps", "2", "--eval_split", "none")  # log_steps 2
    pretrain.train(cfg)
    folder = tmp_path / "out" / "profile"
    table = (folder / "ops_by_host_time.txt").read_text()
    assert table.startswith("2 steps from step 2") and "aten::convolution" in table
    assert (folder / "ops_by_device_time.txt").is_file() and (folder / "trace.json").stat().st_size > 0


def test_thread_decoder_matches_the_workers_decode():
    """Threads decode into one buffer: the same pixels as `collate_encoded` of worker-decoded images, bad ones
    skipped and counted (PNG, JPEG, grey, RGBA, junk)."""
    import io

    from torchvision.io import ImageReadMode, decode_image

    from moco_hf.data.decode import ThreadDecoder
    from moco_hf.data.streams import collate_encoded

    g = torch.Generator().manual_seed(0)
    encoded = []
    for i, (mode, fmt) in enumerate([("RGB", "PNG"), ("L", "PNG"), ("RGBA", "PNG"), ("RGB", "JPEG")] * 3):
        array = torch.randint(0, 255, (7 + i, 5 + 2 * i, 3), generator=g, dtype=torch.uint8).numpy()
        buffer = io.BytesIO()
        Image.fromarray(array).convert(mode).save(buffer, format=fmt)
        encoded.append(torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8))
    junk = [torch.frombuffer(bytearray(b"not an image"), dtype=torch.uint8), torch.empty(0, dtype=torch.uint8)]
    decoder = ThreadDecoder(3)
    pixels, sizes, skipped = decoder.decode(encoded[:5] + junk + encoded[5:], torch.device("cpu"))
    decoder.close()
    expected = [decode_image(e, mode=ImageReadMode.RGB) for e in encoded]
    reference, _ = ImageChunk.from_chunk(collate_encoded([(image, [], None) for image in expected]),
                                         torch.device("cpu"))
    assert skipped == [5, 6] and torch.equal(sizes, reference.sizes)  # the junk's indices
    assert torch.equal(pixels, reference.pixels)


def test_16_bit_tiff_and_bmp_images_decode_alike_on_every_path():
    """A 16-bit grey PNG is scaled to 8 bits (not clipped to white), and TIFF / BMP, which torchvision does not
    read, decode through PIL: on the CPU path, the workers' decode and the threads' decode alike."""
    import io

    import numpy as np
    from moco_hf.data.decode import ThreadDecoder, decode_image
    from moco_hf.data.decode import decode_jpegs

    def encode(image, fmt):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)

    ramp = np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)
    expected = torch.from_numpy(np.rint(ramp / 257).astype(np.int16))
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    encoded = [encode(Image.fromarray(ramp), "PNG"), encode(rgb, "TIFF"), encode(rgb, "BMP")]

    grey = torch.from_numpy(np.array(decode_image(encoded[0].numpy().tobytes()))).permute(2, 0, 1)  # CPU path
    assert (grey.short() - expected).abs().max() <= 1 and torch.equal(grey[0], grey[2])
    workers = decode_jpegs(encoded)
    assert workers.num_failed == 0 and all(image.dtype == torch.uint8 for image in workers.images)
    assert torch.equal(workers.images[0].short(), grey.short())  # the same scaling as the CPU path
    for image in workers.images[1:]:
        assert torch.equal(image.permute(1, 2, 0), torch.from_numpy(np.array(rgb)))
    decoder = ThreadDecoder(2)
    pixels, _, skipped = decoder.decode(encoded, torch.device("cpu"))
    decoder.close()
    flat = [image.permute(1, 2, 0).reshape(-1, 3) for image in workers.images]
    assert skipped == [] and torch.equal(pixels, torch.cat(flat))


def test_cpu_path_resumes_exactly_with_carried_images(tmp_path):
    """CPU augmentation, 36 images in chunks of 16, 16, 4: the third batch takes the epoch's short chunk and carries
    4 images of the next epoch's first chunk over the checkpoint. straight == stop + resume, weights and queue."""
    root = make_image_folder(tmp_path / "data", per_class=12)
    common = ["--train_dir", str(root), "--max_steps", "6", "--eval_split", "none", "--num_workers", "1"]
    straight = pretrain.train(tiny_config(tmp_path / "a", *common))
    first = pretrain.train(tiny_config(tmp_path / "b", *common, "--stop_after_steps", "3"))
    assert first.state.positions[0][3] == 4  # images carried over the checkpoint
    resumed = pretrain.train(tiny_config(tmp_path / "b", *common, "--resume_from_checkpoint", "auto"))
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_streamed_device_path_resumes_exactly_with_carried_images(tmp_path):
    """gpu_augment on, streamed (no cache), bytes decoded by threads: unreadable files make chunks short, so images
    are carried from one batch into the next; the checkpoint saves them as a position and the resumed run reads
    them again: straight == stop + resume, weights and queue."""
    root = make_image_folder(tmp_path / "data", per_class=8, classes=2)
    for i in range(4):
        (root / "train" / "class1" / f"bad{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    common = ["--train_dir", str(root), "--max_steps", "5", "--batch_size", "8", "--queue_size", "32",
              "--eval_split", "none", "--gpu_augment", "on", "--device_cache", "off", "--num_workers", "1",
              "--device_decode", "threads", "--decode_threads", "2"]
    straight = pretrain.train(tiny_config(tmp_path / "a", *common))
    first = pretrain.train(tiny_config(tmp_path / "b", *common, "--stop_after_steps", "3"))
    assert first.state.positions[0][3] > 0  # images were carried over the checkpoint
    resumed = pretrain.train(tiny_config(tmp_path / "b", *common, "--resume_from_checkpoint", "auto"))
    assert resumed.metrics["skipped_images"] == straight.metrics["skipped_images"] > 0
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_gradient_checkpointing_trains_the_same_weights(tmp_path):
    """The same ops recomputed on the same inputs: the run with checkpointing is bit-identical to the one without."""
    common = ["--max_steps", "2", "--eval_split", "none", "--bn_splits", "2"]
    plain = pretrain.train(tiny_config(tmp_path / "a", *common))
    checkpointed = pretrain.train(tiny_config(tmp_path / "b", *common, "--gradient_checkpointing", "true"))
    assert checkpointed.model.query_encoder.gradient_checkpointing and not plain.model.query_encoder.gradient_checkpointing
    expected = plain.model.state_dict()
    for name, tensor in checkpointed.model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name

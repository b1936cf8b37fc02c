"""MoCoModel and MoCoForImageClassification against a plain Algorithm-1 reference, and their transformers plumbing.

Tiny timm test models on 32 px images, queues of 20 keys: the whole file runs in about a minute on 2 CPU cores.
"""

import copy
import shutil

import pytest
import timm
import torch
import torch.nn.functional as F
from _reference import ReferenceMoCo, encode, plain_copy, sgd
from _tolerance import UNIT_NORM, tolerance
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForImageClassification

from moco_hf import MoCoConfig, MoCoForImageClassification, MoCoModel, enqueue, info_nce_logits, info_nce_loss
from moco_hf.modeling_moco import MoCoEncoder, SplitBatchNorm2d, _split_batch_norm_ops, convert_split_batchnorm

BACKBONES = ["test_resnet", "test_vit", "test_convnext"]
BATCH = 6  # does not divide QUEUE: the pointer wraps around mid-batch
QUEUE = 20
LR = 0.1
STEPS = 5  # of the Algorithm-1 comparison; every case wraps the queue around at least once
# Comparisons of two implementations of the model's computation run in float64 (tests/_tolerance.py): the longest
# reduction is a BatchNorm over 12 images of 32 x 32 (12,288 terms); a training comparison chains the forward and
# backward passes of at most 30 layers over 5 steps (depth 5 x 2 x 30 = 300); values stay below 10. In float32 the
# same comparisons differ by up to 1.2e-5 (the first training steps amplify rounding through BatchNorm over few
# images), which no fixed float32 tolerance bounds on every CPU.
TOL = tolerance(torch.float64, terms=12 * 32 * 32, depth=300, scale=10)


def tiny_config(backbone: str = "test_resnet", **overrides) -> MoCoConfig:
    kwargs = dict(backbone=backbone, embed_dim=16, queue_size=QUEUE, momentum=0.9, tau=0.2)
    if backbone == "test_vit":
        kwargs["backbone_kwargs"] = {"img_size": 32}
    kwargs.update(overrides)
    return MoCoConfig(**kwargs)


def images(n: int = BATCH, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train_step(model: MoCoModel, optimizer, x1, x2, seed: int = 0):
    torch.manual_seed(seed)  # shuffle BN draws its permutation from the global generator
    out = model(x1, x2)
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
    return out


def trained_model(steps: int = 2, **overrides) -> MoCoModel:
    """A model whose key encoder, queue and pointer have all moved away from their initial values."""
    model = MoCoModel(tiny_config(**overrides)).train()
    optimizer = sgd(trainable(model), LR)
    for step in range(steps):
        train_step(model, optimizer, images(seed=2 * step), images(seed=2 * step + 1), seed=step)
    return model


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def assert_states_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


def assert_states_close(actual: torch.nn.Module, expected: torch.nn.Module) -> None:
    actual, expected = actual.state_dict(), expected.state_dict()
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, **TOL, msg=lambda m, name=name: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------------------
# 1. Algorithm 1
# ---------------------------------------------------------------------------------------------------------

# (config overrides, batch size). No batch divides the queue of 20. With split BN each chunk keeps >= 3 images:
# BatchNorm over 2 samples is so ill-conditioned that float rounding alone grows by orders of magnitude in a few
# steps. Every case runs in float64 (see TOL); SplitBatchNorm2d is checked against per-chunk BatchNorm in float32
# further down.
ALGORITHM_CASES = {
    "v2": (dict(), BATCH),
    "v1_linear_head": (dict(mlp_head=False, tau=0.07, momentum=0.5), BATCH),
    "symmetric": (dict(symmetric=True), BATCH),
    "split_bn": (dict(bn_splits=2, shuffle_bn=False), BATCH),
    "split_shuffle_bn": (dict(bn_splits=3, shuffle_bn=True), 12),
    "symmetric_split_shuffle_bn": (dict(symmetric=True, bn_splits=2, shuffle_bn=True), 8),
}


@pytest.mark.parametrize("case", ALGORITHM_CASES)
def test_training_matches_algorithm_1(case):
    overrides, batch = ALGORITHM_CASES[case]
    config = tiny_config(**overrides)
    dtype = torch.float64
    model = MoCoModel(config).to(dtype).train()
    ref = ReferenceMoCo(
        model.query_encoder,
        model.queue,
        model.queue_ptr.item(),
        config.momentum,
        config.tau,
        LR,
        symmetric=config.symmetric,
        splits=config.bn_splits,
        shuffle=config.shuffle_bn,
    )
    optimizer = sgd(trainable(model), LR)
    key_start = snapshot(model.key_encoder)
    per_step = batch * (2 if config.symmetric else 1)

    pointers = []
    for step in range(STEPS):
        x1, x2 = images(batch, seed=2 * step).to(dtype), images(batch, seed=2 * step + 1).to(dtype)
        out = train_step(model, optimizer, x1, x2, seed=100 + step)
        torch.manual_seed(100 + step)
        ref_loss, ref_keys = ref.step(x1, x2)

        torch.testing.assert_close(out.loss, ref_loss, **TOL)  # float64 logits: promoted, never narrowed
        # Symmetric: the reference enqueues [k1, k2]; the model returns k2, the keys of its `key_pixel_values`.
        torch.testing.assert_close(out.key_embeddings, ref_keys[-batch:], **TOL)
        torch.testing.assert_close(model.queue, ref.queue.T, **TOL)
        assert model.queue_ptr.item() == ref.ptr
        pointers.append(ref.ptr)
    assert pointers == [(per_step * (s + 1)) % QUEUE for s in range(STEPS)]
    assert any(after < before for before, after in zip([0] + pointers, pointers))  # the pointer wrapped around

    # The model applies the last momentum update at the start of its next step; the paper right after SGD.
    # The states include the BatchNorm running statistics: with split BN, averaged over the chunks, once per forward.
    model.momentum_update_key_encoder()
    assert_states_close(model.query_encoder, ref.f_q)
    assert_states_close(model.key_encoder, ref.f_k)
    forwards = STEPS * (2 if config.symmetric else 1)
    for encoder in (model.query_encoder, model.key_encoder):
        counts = {n: t.item() for n, t in encoder.state_dict().items() if n.endswith("num_batches_tracked")}
        assert counts and set(counts.values()) == {forwards}
    if config.momentum > 0:  # the comparison is not vacuous: f_k moved, and lags behind f_q
        moved = [not torch.equal(t, key_start[n]) for n, t in model.key_encoder.named_parameters()]
        assert all(moved)
        query = dict(model.query_encoder.named_parameters())
        assert any(not torch.allclose(t, query[n]) for n, t in model.key_encoder.named_parameters())


def test_shuffle_bn_with_split_bn_changes_keys_but_keeps_each_with_its_image():
    shuffled = MoCoModel(tiny_config(bn_splits=2, shuffle_bn=True)).double().train()
    plain = copy.deepcopy(shuffled)
    plain.config = copy.deepcopy(shuffled.config)
    plain.config.shuffle_bn = False
    x1, x2 = images(8, seed=1, dtype=torch.float64), images(8, seed=2, dtype=torch.float64)
    torch.manual_seed(3)
    perm = torch.randperm(8)
    torch.manual_seed(3)
    k_shuffled = shuffled(x1, x2).key_embeddings
    k_plain = plain(x1, x2).key_embeddings

    # Each BN chunk holds other images, so the statistics (and keys) change ...
    assert not set(perm[:4].tolist()) == set(range(4))
    assert not torch.allclose(k_shuffled, k_plain, atol=1e-4)  # 1e-4: far above float64 rounding (TOL)
    # ... but key i is still the key of image i: it equals f_k on image i with the same chunk-mates.
    with torch.no_grad():
        chunk_keys = encode(shuffled.key_encoder, x2[perm], splits=2)
    torch.testing.assert_close(k_shuffled[perm], chunk_keys, **TOL)


def test_shuffle_bn_in_one_chunk_gives_the_unshuffled_keys():
    model = MoCoModel(tiny_config(bn_splits=1, shuffle_bn=True)).double().train()
    x1, x2 = images(seed=1, dtype=torch.float64), images(seed=2, dtype=torch.float64)
    reference = copy.deepcopy(model.key_encoder)
    out = model(x1, x2)
    with torch.no_grad():
        expected = encode(reference, x2)
    torch.testing.assert_close(out.key_embeddings, expected, **TOL)


# ---------------------------------------------------------------------------------------------------------
# 2.-3. Gradients and side effects
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [False, True])
def test_gradients_reach_query_encoder_only(symmetric):
    # After one step: timm zero-initialises the last BN scale of each residual block, which blocks the gradient
    # of the block's convolutions at step 0 only.
    model = trained_model(steps=1, symmetric=symmetric)
    model.zero_grad(set_to_none=True)
    out = model(images(seed=1), images(seed=2))
    out.loss.backward()
    for name, param in model.key_encoder.named_parameters():
        assert not param.requires_grad, name
        assert param.grad is None, name
    for name, param in model.query_encoder.named_parameters():
        assert param.requires_grad, name
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    assert not model.queue.requires_grad and model.queue.grad is None
    assert out.key_embeddings.grad_fn is None


def test_eval_forward_changes_no_state():
    model = trained_model().double()
    model.eval()
    before = snapshot(model)
    x1, x2 = images(seed=10, dtype=torch.float64), images(seed=11, dtype=torch.float64)
    features = model(x1)
    contrast = model(x1, x2)
    assert_states_equal(snapshot(model), before)

    num_features = model.query_encoder.backbone.num_features
    assert features.loss is None and features.logits is None
    assert features.pooler_output.shape == (BATCH, num_features)
    torch.testing.assert_close(features.query_embeddings.norm(dim=1), torch.ones(BATCH, dtype=torch.float64), **TOL)
    torch.testing.assert_close(features.last_hidden_state, model.query_encoder.backbone.forward_features(x1), **TOL)
    assert contrast.logits.shape == (BATCH, 1 + QUEUE)
    assert torch.isfinite(contrast.loss)
    torch.testing.assert_close(contrast.query_embeddings, features.query_embeddings, **TOL)


def test_feature_forward_in_train_mode_leaves_queue_and_key_encoder():
    model = trained_model()
    before = snapshot(model)
    out = model(images(seed=10))
    after = snapshot(model)
    assert out.loss is None
    for name in before:
        if name.startswith("key_encoder.") or name in ("queue", "queue_ptr"):
            assert torch.equal(after[name], before[name]), name
    # Train-mode BatchNorm of the query encoder does update its statistics: the snapshot would catch it.
    name = "query_encoder.backbone.bn1.running_mean"
    assert not torch.equal(after[name], before[name])


def test_both_encoders_run_through_call():
    """`encoder.compile()` and hooks only see `__call__`: the query path must not bypass it."""
    model = MoCoModel(tiny_config()).train()
    calls = []
    for name in ("query_encoder", "key_encoder"):
        getattr(model, name).register_forward_hook(lambda *_, name=name: calls.append(name))
    model(images(seed=1), images(seed=2))
    model(images(seed=3))
    assert calls == ["query_encoder", "key_encoder", "query_encoder"]


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="inductor needs a C++ compiler")
def test_compiled_step_keeps_eager_gradients():
    """Under torch.compile, the negatives' gradient must use the queue as it was before this step's enqueue."""

    class Step(torch.nn.Module):  # the queue part of MoCoModel.forward, on a linear "encoder"
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.Linear(8, 4)
            self.register_buffer("queue", F.normalize(torch.randn(6, 4), dim=1))
            self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

        def forward(self, x, k):
            logits = info_nce_logits(F.normalize(self.encoder(x), dim=1), k, self.queue, 0.2)
            enqueue(self.queue, self.queue_ptr, k)
            return info_nce_loss(logits)

    eager = Step()
    compiled = copy.deepcopy(eager)
    x, k = torch.randn(4, 8), F.normalize(torch.randn(4, 4), dim=1)
    eager(x, k).backward()
    # aot_eager: AOTAutograd's functionalisation of the in-place enqueue (what this is about), without inductor's
    # C++ build on a CPU
    torch.compile(compiled, backend="aot_eager")(x, k).backward()
    # float32, as trained: reductions of at most 8 terms (the linear layer), about 10 chained forward and backward,
    # gradients below 10 (logits / tau = 5 times unit-vector dot products, times inputs of a few units)
    torch.testing.assert_close(compiled.encoder.weight.grad, eager.encoder.weight.grad,
                               **tolerance(torch.float32, terms=8, depth=10, scale=10))
    assert torch.equal(compiled.queue, eager.queue)


def _train_compiled_against_eager(device: str, mode: str, symmetric: bool, steps: int = 4):
    """A few SGD steps of one MoCoModel eagerly and of a copy whose encoders are compiled in `mode`, on the same
    batches, in float64 (see TOL); returns both models. Without the key permutation of shuffle BN: compiling draws
    from the global generator, which would give the compiled model other permutations."""
    torch.manual_seed(0)
    config = MoCoConfig(backbone="test_resnet", embed_dim=16, queue_size=64, bn_splits=4, shuffle_bn=False,
                        symmetric=symmetric)
    eager = MoCoModel(config).to(device, torch.float64).train()
    compiled = copy.deepcopy(eager)
    compiled.query_encoder.compile(mode=mode)
    compiled.key_encoder.compile(mode=mode)
    optimizers = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.03, momentum=0.9)
                  for m in (eager, compiled)]
    for step in range(steps):
        torch.manual_seed(100 + step)
        view_q, view_k = torch.randn(2, 32, 3, 32, 32, device=device, dtype=torch.float64)  # 8 images per BN split
        for model, optimizer in zip((eager, compiled), optimizers):
            if model is compiled:  # as pretrain.py does with CUDA graphs
                torch.compiler.cudagraph_mark_step_begin()
            model(view_q, view_k).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return eager, compiled


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CUDA graphs)")
@pytest.mark.parametrize("symmetric", [False, True])
def test_cuda_graphs_train_like_eager(symmetric, monkeypatch):
    """compile_mode reduce-overhead replays CUDA graphs, whose outputs the next replay overwrites: training must
    still match eager (weights, BN running statistics, queue), and no graph may have been skipped."""
    from torch._dynamo.utils import counters

    counters.clear()
    eager, graphed = _train_compiled_against_eager("cuda", "reduce-overhead", symmetric)
    assert counters["inductor"]["cudagraph_skips"] == 0, "inductor ran some graphs without CUDA graphs"
    expected = eager.state_dict()
    # float64: 32 images of 32 x 32 in the largest BatchNorm, 4 steps of at most 30 layers forward and backward
    step_tolerance = tolerance(torch.float64, terms=32 * 32 * 32, depth=4 * 2 * 30, scale=10)
    for name, tensor in graphed.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], **step_tolerance, msg=name)


# ---------------------------------------------------------------------------------------------------------
# 4.-5. save_pretrained / from_pretrained
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bn_splits", [1, 2])
def test_round_trip_is_exact_and_training_continues_identically(tmp_path, bn_splits):
    model = trained_model(bn_splits=bn_splits)
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is MoCoModel
    for encoder in (loaded.query_encoder, loaded.key_encoder):
        assert any(isinstance(m, SplitBatchNorm2d) for m in encoder.modules()) == (bn_splits > 1)
    assert_states_equal(snapshot(loaded), snapshot(model))
    assert all(not p.requires_grad for p in loaded.key_encoder.parameters())
    assert all(p.requires_grad for p in loaded.query_encoder.parameters())

    x1, x2 = images(seed=20), images(seed=21)
    losses = []
    for m in (model, loaded):
        m.train()
        losses.append(train_step(m, sgd(trainable(m), LR), x1, x2, seed=5).loss)
    assert torch.equal(losses[0], losses[1])
    assert_states_equal(snapshot(loaded), snapshot(model))


@pytest.mark.parametrize("dropped", ["key_encoder+queue", "key_encoder", "queue"])
def test_checkpoint_without_key_encoder_or_queue_loads(tmp_path, dropped):
    model = trained_model()
    saved = snapshot(model)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    drop_key, drop_queue = "key_encoder" in dropped, "queue" in dropped
    kept = {
        name: tensor
        for name, tensor in weights.items()
        if not (drop_key and name.startswith("key_encoder.")) and not (drop_queue and name in ("queue", "queue_ptr"))
    }
    assert len(kept) < len(weights)
    save_file(kept, tmp_path / "model.safetensors", metadata={"format": "pt"})

    loaded = AutoModel.from_pretrained(tmp_path)
    state = snapshot(loaded)
    for name, tensor in saved.items():
        if name.startswith("query_encoder."):
            assert torch.equal(state[name], tensor), name
        if name.startswith("key_encoder."):
            expected = saved["query_encoder." + name.removeprefix("key_encoder.")] if drop_key else tensor
            assert torch.equal(state[name], expected), name
    assert all(not p.requires_grad for p in loaded.key_encoder.parameters())
    if drop_queue:
        assert loaded.queue_ptr.item() == 0
        torch.testing.assert_close(loaded.queue.norm(dim=1), torch.ones(QUEUE), **UNIT_NORM)
        assert not torch.equal(loaded.queue, saved["queue"])
    else:
        assert torch.equal(loaded.queue, saved["queue"]) and torch.equal(loaded.queue_ptr, saved["queue_ptr"])
    out = loaded.train()(images(seed=1), images(seed=2))
    assert torch.isfinite(out.loss)


def test_classifier_from_moco_checkpoint(tmp_path):
    model = trained_model()
    model.save_pretrained(tmp_path)
    clf = MoCoForImageClassification.from_pretrained(tmp_path, num_labels=10)
    assert_states_equal(snapshot(clf.query_encoder.backbone), snapshot(model.query_encoder.backbone))
    assert set(snapshot(clf)) == {"query_encoder." + n for n in snapshot(clf.query_encoder)} | {
        "classifier.weight",
        "classifier.bias",
    }
    # Official linear evaluation: weight ~ N(0, 0.01), bias 0.
    assert 0.005 < clf.classifier.weight.std().item() < 0.02
    assert torch.equal(clf.classifier.bias, torch.zeros(10))

    x, labels = images(seed=3), torch.arange(BATCH) % 10
    out = clf.train()(x, labels=labels)
    assert out.logits.shape == (BATCH, 10) and torch.isfinite(out.logits).all()
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels),
                               **tolerance(torch.float32, terms=10, depth=2, scale=10))  # 10 classes, a mean
    out.loss.backward()
    assert all(p.grad is not None for p in clf.parameters())

    auto = AutoModelForImageClassification.from_pretrained(tmp_path, num_labels=10)
    assert type(auto) is MoCoForImageClassification
    assert_states_equal(snapshot(auto.query_encoder.backbone), snapshot(model.query_encoder.backbone))


def test_frozen_backbone_stays_in_eval_mode_and_gets_no_gradient(tmp_path):
    trained_model().save_pretrained(tmp_path)
    clf = MoCoForImageClassification.from_pretrained(tmp_path, num_labels=10, freeze_backbone=True)
    clf.train()
    assert clf.classifier.training
    assert not any(m.training for m in clf.query_encoder.modules())
    # The official linear evaluation asserts exactly two trainable tensors.
    assert [p for p in clf.parameters() if p.requires_grad] == [clf.classifier.weight, clf.classifier.bias]

    backbone_before = snapshot(clf.query_encoder)
    out = clf(images(seed=3), labels=torch.arange(BATCH) % 10)
    out.loss.backward()
    assert all(p.grad is None for p in clf.query_encoder.parameters())
    assert clf.classifier.weight.grad is not None and clf.classifier.bias.grad is not None
    assert_states_equal(snapshot(clf.query_encoder), backbone_before)  # BN statistics did not move


# ---------------------------------------------------------------------------------------------------------
# 6. Initialisation
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", BACKBONES)
def test_fresh_model_keeps_timm_initialisation(backbone):
    config = tiny_config(backbone)
    torch.manual_seed(3)
    model = MoCoModel(config)
    torch.manual_seed(3)
    expected = timm.create_model(backbone, pretrained=False, num_classes=0, **config.backbone_kwargs)
    assert_states_equal(snapshot(model.query_encoder.backbone), snapshot(expected))
    assert_states_equal(snapshot(model.key_encoder), snapshot(model.query_encoder))  # f_k.params = f_q.params
    torch.testing.assert_close(model.queue.norm(dim=1), torch.ones(QUEUE), **UNIT_NORM)
    assert model.queue_ptr.item() == 0

    torch.manual_seed(3)
    clf = MoCoForImageClassification(tiny_config(backbone, num_labels=4))
    assert_states_equal(snapshot(clf.query_encoder.backbone), snapshot(expected))
    assert 0.005 < clf.classifier.weight.std().item() < 0.02
    assert torch.equal(clf.classifier.bias, torch.zeros(4))


# ---------------------------------------------------------------------------------------------------------
# 7. Validation
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(momentum=-0.1), "momentum"),
        (dict(momentum=1.5), "momentum"),
        (dict(tau=0.0), "tau"),
        (dict(tau=-0.2), "tau"),
        (dict(backbone="not_a_timm_model"), "timm"),
        (dict(queue_size=-1), "queue_size"),  # 0 is MoCo v3 (no queue)
        (dict(bn_splits=0), "bn_splits"),
    ],
)
def test_bad_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**overrides)


@pytest.mark.parametrize("symmetric", [False, True])
def test_queue_smaller_than_the_keys_of_one_step_raises_at_forward(symmetric):
    model = MoCoModel(tiny_config(queue_size=BATCH + 2, symmetric=symmetric)).train()
    before = snapshot(model)
    x1, x2 = images(seed=1), images(seed=2)
    if symmetric:  # 2 x 6 keys per step > 8
        with pytest.raises(ValueError, match="queue_size"):
            model(x1, x2)
        assert_states_equal(snapshot(model), before)
    else:
        model(x1, x2)
        with pytest.raises(ValueError, match="queue_size"):
            model(images(BATCH + 3, seed=1), images(BATCH + 3, seed=2))


@pytest.mark.parametrize(
    "pixel_values, key_pixel_values",
    [
        (torch.randn(3, 32, 32), None),
        (torch.randn(2, 1, 3, 32, 32), None),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), None),
        (torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)),
        (torch.randn(2, 3, 32, 32), torch.randn(3, 32, 32)),
    ],
)
def test_bad_inputs_raise(pixel_values, key_pixel_values):
    model = MoCoModel(tiny_config()).train()
    with pytest.raises(ValueError, match="pixel_values"):
        model(pixel_values, key_pixel_values)
    clf = MoCoForImageClassification(tiny_config(num_labels=3))
    if key_pixel_values is None:
        with pytest.raises(ValueError, match="pixel_values"):
            clf(pixel_values)


# ---------------------------------------------------------------------------------------------------------
# 8. Other backbones
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", BACKBONES)
def test_backbone_trains(backbone):
    model = MoCoModel(tiny_config(backbone)).train()
    optimizer = sgd(trainable(model), LR)
    start = snapshot(model)
    for step in range(3):
        out = train_step(model, optimizer, images(seed=2 * step), images(seed=2 * step + 1), seed=step)
        assert torch.isfinite(out.loss)
        assert out.logits.shape == (BATCH, 1 + QUEUE)
    end = snapshot(model)
    assert model.queue_ptr.item() == (3 * BATCH) % QUEUE
    assert not torch.equal(end["queue"][: 3 * BATCH], start["queue"][: 3 * BATCH])
    assert torch.equal(end["queue"][3 * BATCH :], start["queue"][3 * BATCH :])
    torch.testing.assert_close(model.queue.norm(dim=1), torch.ones(QUEUE), **UNIT_NORM)
    for prefix in ("query_encoder.", "key_encoder."):
        assert any(not torch.equal(end[n], start[n]) for n in start if n.startswith(prefix)), prefix


# ---------------------------------------------------------------------------------------------------------
# 9. Split BatchNorm in one pass
# ---------------------------------------------------------------------------------------------------------


def per_chunk_batchnorm(bn: torch.nn.BatchNorm2d, x: torch.Tensor, splits: int, weight, bias):
    """The plain definition: torch's batch_norm on each chunk with its own statistics; each chunk updates a copy of
    the running statistics and the copies are averaged (official CIFAR demo). Returns (output, mean, var)."""
    factor = bn.momentum if bn.momentum is not None else 1.0 / (bn.num_batches_tracked.item() + 1)
    outputs, means, variances = [], [], []
    for chunk in x.chunk(splits):
        mean, var = bn.running_mean.clone(), bn.running_var.clone()
        outputs.append(F.batch_norm(chunk, mean, var, weight, bias, training=True, momentum=factor, eps=bn.eps))
        means.append(mean)
        variances.append(var)
    return torch.cat(outputs), torch.stack(means).mean(0), torch.stack(variances).mean(0)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_split_batchnorm_matches_per_chunk_batchnorm(memory_format, momentum):
    """In float64 (the algorithm, not float32 rounding, is under test): BN_TOL."""
    splits, channels = 3, 5
    g = torch.Generator().manual_seed(0)
    bn = SplitBatchNorm2d(channels, splits, momentum=momentum, dtype=torch.float64).train()
    with torch.no_grad():
        for tensor in (bn.weight, bn.bias, bn.running_mean):
            tensor.copy_(torch.randn(channels, generator=g, dtype=torch.float64))
        bn.running_var.uniform_(0.5, 2.0, generator=g)
    weight, bias = (t.detach().clone().requires_grad_() for t in (bn.weight, bn.bias))

    for step in range(2):  # momentum=None: factors 1 then 1/2
        x = (torch.randn(12, channels, 4, 3, generator=g, dtype=torch.float64) * 3 + 2)
        x = x.contiguous(memory_format=memory_format)
        x_ref = x.detach().clone().requires_grad_()
        x.requires_grad_()
        upstream = torch.randn(12, channels, 4, 3, generator=g, dtype=torch.float64)
        expected, mean, var = per_chunk_batchnorm(bn, x_ref, splits, weight, bias)
        out = bn(x)

        assert out.is_contiguous(memory_format=memory_format)
        torch.testing.assert_close(out, expected, **BN_TOL)
        torch.testing.assert_close(bn.running_mean, mean, **BN_TOL)
        torch.testing.assert_close(bn.running_var, var, **BN_TOL)
        assert bn.num_batches_tracked.item() == step + 1

        bn.zero_grad()
        (out * upstream).sum().backward()
        (expected * upstream).sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad, **BN_TOL)
        torch.testing.assert_close(bn.weight.grad, weight.grad, **BN_TOL)
        torch.testing.assert_close(bn.bias.grad, bias.grad, **BN_TOL)
        weight.grad = bias.grad = None


# Split BatchNorm layers alone, in float64: the longest reduction is a weight or bias gradient over a whole batch
# (12 x 4 x 3 = 144 products), about 8 chained forward and backward; products of values of a few units, summed.
BN_TOL = tolerance(torch.float64, terms=144, depth=8, scale=100)


def random_split_batchnorm(channels: int, splits: int, seed: int = 0, **kwargs) -> SplitBatchNorm2d:
    """A SplitBatchNorm2d in train mode with random weight and bias (when affine)."""
    bn = SplitBatchNorm2d(channels, splits, **kwargs).train()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in bn.parameters():
            p.copy_(torch.randn(channels, generator=g, dtype=p.dtype))
    return bn


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("splits", [2, 4])
def test_split_batchnorm_gradcheck(splits, affine):
    """The eager path's hand-written backward against finite differences, in float64."""
    bn = random_split_batchnorm(3, splits, affine=affine, track_running_stats=False, dtype=torch.float64)
    params = {name: p.detach().clone().requires_grad_() for name, p in bn.named_parameters()}
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2 + 1
    x.requires_grad_()

    def split_bn(x, *values):
        return torch.func.functional_call(bn, dict(zip(params, values)), (x,))

    assert torch.autograd.gradcheck(split_bn, (x, *params.values()))


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_split_batchnorm_function_matches_plain_ops(memory_format, affine):
    """Eager mode (the autograd Function) computes what the plain ops used under torch.compile compute (float64)."""
    splits, channels = 2, 4
    bn = random_split_batchnorm(channels, splits, affine=affine, dtype=torch.float64)
    params = [p.detach().clone().requires_grad_() for p in (bn.weight, bn.bias)] if affine else [None, None]
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(6, channels, 5, 3, generator=g, dtype=torch.float64) * 3 + 2)
    x = x.contiguous(memory_format=memory_format)
    x_ref = x.detach().clone().requires_grad_()
    x.requires_grad_()
    upstream = torch.randn(6, channels, 5, 3, generator=g, dtype=torch.float64)

    out = bn(x)
    expected = _split_batch_norm_ops(x_ref, splits, *params, bn.eps)[0]
    assert out.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(out, expected, **BN_TOL)
    (out * upstream).sum().backward()
    (expected * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **BN_TOL)
    for p, ref in zip(bn.parameters(), params):
        torch.testing.assert_close(p.grad, ref.grad, **BN_TOL)


def split_batchnorm_saved_tensors(forward, x: torch.Tensor) -> list[tuple[torch.dtype, int]]:
    """(dtype, number of elements) of each tensor that autograd saves for backward in `forward(x)`."""
    saved = []

    def pack(tensor):
        saved.append((tensor.dtype, tensor.numel()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward(x)
    return saved


def test_split_batchnorm_saves_only_bf16_input_and_per_channel_stats():
    """As nn.BatchNorm2d, autograd keeps the bf16 input and per-channel vectors, not an fp32 copy of the input."""
    splits, channels = 2, 4
    bn = random_split_batchnorm(channels, splits)
    x = torch.randn(8, channels, 6, 6, generator=torch.Generator().manual_seed(1)).bfloat16().requires_grad_()
    saved = split_batchnorm_saved_tensors(bn, x)
    assert [s for s in saved if s[1] > splits * channels] == [(torch.bfloat16, x.numel())], saved
    # The plain ops (the torch.compile path, where Inductor decides what to save) keep fp32 copies of the input.
    plain = split_batchnorm_saved_tensors(lambda x: _split_batch_norm_ops(x, splits, bn.weight, bn.bias, bn.eps), x)
    assert (torch.float32, x.numel()) in plain

    out = F.relu(bn(x), inplace=True)  # in place, as timm's ReLU after a BatchNorm
    # The output is a tensor of its own, not a view: the in-place ReLU is a plain ReLU node for autograd (on a view
    # it would become CopySlices / AsStrided copies in backward).
    assert out.dtype == torch.bfloat16 and out._base is None and type(out.grad_fn).__name__ == "ReluBackward0"
    out.float().square().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and bn.weight.grad.dtype == bn.bias.grad.dtype == torch.float32


def test_split_batchnorm_is_batchnorm_in_eval_mode_and_with_one_split():
    x = images(7) * 2 + 1  # 7: no split applies in eval mode
    plain = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
        plain.running_var.uniform_(0.5, 2.0)
    split = convert_split_batchnorm(copy.deepcopy(plain), 3)
    assert type(split) is SplitBatchNorm2d and split.num_splits == 3
    assert torch.equal(split.eval()(x), plain.eval()(x))

    split.num_splits = 1
    assert torch.equal(split.train()(x), plain.train()(x))
    assert_states_equal(snapshot(split), snapshot(plain))


def test_split_batchnorm_indivisible_batch_raises():
    with pytest.raises(ValueError, match=r"batch N=7 must be divisible by bn_splits=2"):
        SplitBatchNorm2d(3, 2).train()(images(7))
    model = MoCoModel(tiny_config(bn_splits=2)).train()
    with pytest.raises(ValueError, match=r"batch N=7 must be divisible by bn_splits=2"):
        model(images(7, seed=1), images(7, seed=2))
    assert torch.isfinite(model.eval()(images(7, seed=1), images(7, seed=2)).loss)  # eval mode: running statistics
    with pytest.raises(ValueError, match="num_splits"):
        SplitBatchNorm2d(3, 0)


def test_convert_split_batchnorm_keeps_state_and_other_norms():
    backbone = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    before = {name: tensor for name, tensor in backbone.state_dict(keep_vars=True).items()}
    other = timm.layers.BatchNormAct2d(4)
    converted = convert_split_batchnorm(torch.nn.Sequential(backbone, other), 2)
    after = converted[0].state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    assert all(after[name] is tensor for name, tensor in before.items())  # shared, not copied
    norms = [m for m in converted.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert [type(m) for m in norms] == [SplitBatchNorm2d] * (len(norms) - 1) + [timm.layers.BatchNormAct2d]

    split, plain = MoCoModel(tiny_config(bn_splits=2)), MoCoModel(tiny_config())
    assert split.state_dict().keys() == plain.state_dict().keys()
    assert any(isinstance(m, SplitBatchNorm2d) for m in split.key_encoder.modules())


def count_stem_calls(encoder) -> list:
    """A list that grows by one at each call of the backbone's first convolution."""
    calls = []
    stem = next(m for m in encoder.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    stem.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_split_bn_encoder_runs_once_and_matches_per_chunk_reference():
    model = MoCoModel(tiny_config(bn_splits=2)).double().train()
    encoder = model.query_encoder
    plain = plain_copy(encoder)
    calls = count_stem_calls(encoder)
    x = images(8, seed=1, dtype=torch.float64)

    out = encoder(x, 2)
    assert len(calls) == 1
    torch.testing.assert_close(F.normalize(out, dim=1), encode(plain, x, splits=2), **TOL)
    assert_states_close(encoder, plain)  # running statistics averaged over the 2 chunks
    # Between calls the split BatchNorms are plain ones: `get_backbone()` in train mode uses whole-batch statistics.
    assert all(m.num_splits == 1 for m in model.get_backbone().modules() if isinstance(m, SplitBatchNorm2d))

    # splits=1 (MoCoModel's feature forward): whole-batch statistics, exactly torch's BatchNorm.
    plain.load_state_dict(encoder.state_dict())
    features = model(x).query_embeddings
    assert len(calls) == 2
    torch.testing.assert_close(features, encode(plain, x), rtol=0, atol=0)
    assert_states_equal(snapshot(encoder), snapshot(plain))

    model(x, images(8, seed=2, dtype=torch.float64))  # one pass of each encoder per step
    assert len(calls) == 3

    plain.load_state_dict(encoder.state_dict())  # in eval mode the kept backbone is plain BatchNorm
    assert torch.equal(model.eval().get_backbone()(x), plain.backbone.eval()(x))


def test_split_bn_falls_back_to_chunks_with_other_batchnorms():
    """timm's BatchNormAct2d is not converted: the encoder then runs once per chunk, as before."""
    model = MoCoModel(tiny_config("test_efficientnet", bn_splits=2)).double().train()
    encoder = model.query_encoder
    assert not encoder.split_bn
    assert not any(isinstance(m, SplitBatchNorm2d) for m in encoder.modules())
    reference = copy.deepcopy(encoder)
    calls = count_stem_calls(encoder)
    x = images(8, seed=1, dtype=torch.float64)
    out = encoder(x, 2)
    assert len(calls) == 2
    torch.testing.assert_close(F.normalize(out, dim=1), torch.cat([encode(reference, c) for c in x.chunk(2)]), **TOL)
    assert torch.isfinite(model(x, images(8, seed=2, dtype=torch.float64)).loss)


def test_compiled_split_bn_encoder_matches_eager():
    """The split count is set outside the compiled forward: one graph per count, without graph breaks."""
    torch._dynamo.reset()
    encoder = MoCoEncoder(tiny_config(bn_splits=2)).double().train()
    eager = copy.deepcopy(encoder)
    encoder.compile(backend="aot_eager", fullgraph=True)  # whole-encoder capture; inductor's kernels: next test
    x = images(4, seed=1, dtype=torch.float64)[..., :16, :16]
    for splits in (2, 1):  # splits=1 must not reuse the split graph
        encoder.zero_grad()
        eager.zero_grad()
        loss, expected = encoder(x, splits).square().mean(), eager(x, splits).square().mean()
        loss.backward()
        expected.backward()
        torch.testing.assert_close(loss, expected, **TOL)
        for (name, p), e in zip(encoder.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, e.grad, **TOL, msg=lambda m, name=name: f"{name}: {m}")
        assert_states_close(encoder, eager)


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="inductor needs a C++ compiler")
def test_inductor_split_batchnorm_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        SplitBatchNorm2d(8, 2),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 4),
    ).double().train()
    compiled = copy.deepcopy(net)
    compiled.compile()
    x = images(8, seed=3, dtype=torch.float64)[..., :12, :12].contiguous(memory_format=torch.channels_last)
    for model in (net, compiled):
        model(x).square().mean().backward()
    for (name, p), e in zip(compiled.named_parameters(), net.parameters()):
        torch.testing.assert_close(p.grad, e.grad, **TOL, msg=lambda m, name=name: f"{name}: {m}")
    assert_states_close(compiled, net)

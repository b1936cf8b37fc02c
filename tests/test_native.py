"""MoCoModel and MoCoForImageClassification as native transformers and timm models: what transformers' common model
tests check for a vision model, written for this project, plus gradient checkpointing, the code shipped for
`trust_remote_code` and timm's factory arguments for the registered backbones.

timm's tiny test models at 32 px (`test_resnet`, `test_vit`, `test_convnext`): the file runs in well under a minute on
2 CPU cores.
"""

import copy
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import warnings
from collections import Counter

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from test_model import images, tiny_config, trained_model
from transformers import pipeline
from transformers.integrations.accelerate import infer_auto_device_map

import moco_hf.backbones
from moco_hf import MoCoConfig, MoCoForImageClassification, MoCoModel
from moco_hf.backbones import SMALL_IMAGE_RESNETS
from moco_hf.preprocessing import image_processor_from_data_config, resolve_data_config
from moco_hf.modeling_moco import AUTO_MAP

BACKBONES = ["test_resnet", "test_vit", "test_convnext"]
EPS = torch.finfo(torch.float32).eps  # 1.19e-7


def rounding_bound(model: torch.nn.Module) -> float:
    """Relative bound on the difference of two fp32 evaluations of `model` that only sum in another order (another
    batch size, memory format or kernel). A sum of n terms in any order is exact to gamma_n ~ n u relative to the sum
    of the terms' magnitudes, u = eps / 2 the unit roundoff (Higham, Accuracy and Stability of Numerical Algorithms,
    Sec. 4.2); to first order the errors of the L weighted layers (convolutions, linear layers) on a path add, so each
    evaluation is within L n_max u of the exact result and two of them differ by at most L n_max eps, n_max the
    largest fan-in. Applied relative to the largest output magnitude: BatchNorm / LayerNorm keep these networks'
    activations, and so the terms of their sums, of the order of their outputs."""
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.modules.conv._ConvNd))]
    return len(layers) * max(m.weight[0].numel() for m in layers) * EPS


def assert_rounding_close(actual: torch.Tensor, expected: torch.Tensor, model: torch.nn.Module) -> None:
    bound = rounding_bound(model) * expected.abs().max().item()
    assert (actual - expected).abs().max().item() <= bound


def assert_states_equal(actual: torch.nn.Module, expected: torch.nn.Module, prefix: str = "") -> None:
    actual, expected = actual.state_dict(), expected.state_dict()
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        if name.startswith(prefix):
            assert actual[name].dtype == tensor.dtype and torch.equal(actual[name], tensor), name


def assert_same_values(actual, expected) -> None:
    """Tensors, or (nested) tuples of tensors, bitwise equal."""
    if isinstance(expected, tuple):
        assert isinstance(actual, tuple) and len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_same_values(a, e)
    else:
        assert torch.equal(actual, expected)


# ---------------------------------------------------------------------------------------------------------
# 1. save_pretrained / from_pretrained: safetensors, shards, dtype, device_map and disk offload
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A trained MoCoModel (key encoder, queue and pointer moved) and a classifier from it, each saved."""
    root = tmp_path_factory.mktemp("saved")
    moco = trained_model().eval()
    moco.save_pretrained(root / "moco")
    clf = MoCoForImageClassification.from_pretrained(root / "moco", num_labels=3).eval()
    clf.save_pretrained(root / "clf")
    return moco, clf, root


@pytest.mark.parametrize("which", ["moco", "clf"])
def test_save_writes_safetensors_code_and_complete_auto_map(saved, which):
    _, _, root = saved
    folder = root / which
    files = set(os.listdir(folder))
    assert {"model.safetensors", "config.json", "modeling_moco.py", "configuration_moco.py", "backbones.py"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth"))]
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP  # both classes, whichever was saved


@pytest.mark.parametrize("which", ["moco", "clf"])
def test_sharded_round_trip_is_exact(saved, tmp_path, which):
    moco, clf, _ = saved
    model = moco if which == "moco" else clf
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and set(index["weight_map"].values()) == set(shards)
    if which == "moco":
        assert {"queue", "queue_ptr"} <= index["weight_map"].keys()
    loaded = type(model).from_pretrained(tmp_path)
    assert_states_equal(loaded, model)


def test_bfloat16_loading(saved):
    moco, _, root = saved
    model = MoCoModel.from_pretrained(root / "moco", dtype=torch.bfloat16).eval()
    floats = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
    assert {t.dtype for t in floats} == {torch.bfloat16}
    assert model.queue_ptr.dtype == torch.long and torch.equal(model.queue_ptr, moco.queue_ptr)
    with torch.no_grad():
        features = model(images().bfloat16())
    assert features.pooler_output.dtype == torch.bfloat16
    train = model.train()(images(seed=1).bfloat16(), images(seed=2).bfloat16())
    train.loss.backward()
    assert torch.isfinite(train.loss) and train.logits.dtype == torch.float32  # logits in fp32 as documented


@pytest.mark.parametrize(
    "device_map",
    [
        "auto",
        {"query_encoder": "disk", "key_encoder": "cpu", "queue": "cpu", "queue_ptr": "cpu"},
        {"query_encoder": "cpu", "key_encoder": "disk", "queue": "disk", "queue_ptr": "disk"},
    ],
    ids=["auto", "query_on_disk", "key_and_queue_on_disk"],
)
def test_device_map_and_disk_offload_give_the_same_outputs(saved, tmp_path, device_map):
    moco, _, root = saved
    with warnings.catch_warnings():
        # accelerate: "device_map keys do not match any submodules: ['queue', 'queue_ptr']" (top-level buffers,
        # which it places all the same)
        warnings.filterwarnings("ignore", message="The following device_map keys do not match")
        model = MoCoModel.from_pretrained(root / "moco", device_map=device_map, offload_folder=tmp_path).eval()
    x, x_key = images(seed=5), images(seed=6)
    with torch.no_grad():
        features, expected = model(x), moco(x)
        contrast, expected_contrast = model(x, x_key), moco(x, x_key)
    # Offloaded weights are the saved values, computed on the same CPU kernels: the same numbers.
    assert torch.equal(features.pooler_output, expected.pooler_output)
    assert torch.equal(contrast.logits, expected_contrast.logits)


def test_device_map_auto_keeps_each_encoder_on_one_device():
    """transformers' planner for device_map="auto", as `from_pretrained` calls it, on two accelerators that each hold
    a little more than one encoder (sizes only: no accelerator is needed). Without the model's `_no_split_modules` it
    would cut a timm block between them, whose residual sum would then add tensors of two devices."""
    model = MoCoModel(tiny_config())
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    memory = {0: int(0.6 * size), 1: int(0.6 * size), "cpu": 4 * size}
    plan = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=model._no_split_modules)
    assert set(plan) == {"query_encoder", "key_encoder", "queue", "queue_ptr"}, plan
    split = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=[])
    assert any(name.startswith("query_encoder.backbone.") for name in split)  # what the setting prevents


# ---------------------------------------------------------------------------------------------------------
# 2. Initialisation of what a checkpoint does not hold
# ---------------------------------------------------------------------------------------------------------


def test_moco_model_from_a_classifier_folder_initialises_head_key_encoder_and_queue(saved):
    _, clf, root = saved
    loads = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        loads.append(MoCoModel.from_pretrained(root / "clf"))
    model = loads[0]
    backbone = {f"query_encoder.{n}": t for n, t in clf.query_encoder.state_dict().items()}
    state = model.state_dict()
    for name, tensor in backbone.items():
        assert torch.equal(state[name], tensor), name
    assert_states_equal(model.key_encoder, model.query_encoder)  # f_k starts as a copy of f_q
    torch.testing.assert_close(model.queue.norm(dim=1), torch.ones(model.queue.shape[0]))
    assert model.queue_ptr.item() == 0
    # The head is initialised (PyTorch's default for Linear: |w| <= 1/sqrt(fan_in)) from the random generator, not
    # left as allocated memory: another seed gives other values.
    for layer in (m for m in model.query_encoder.head.modules() if isinstance(m, torch.nn.Linear)):
        bound = layer.weight.shape[1] ** -0.5
        assert layer.weight.abs().max() <= bound and layer.weight.std() > bound / 4
    assert not torch.equal(loads[0].query_encoder.head.layers[0].weight, loads[1].query_encoder.head.layers[0].weight)
    assert all(not p.requires_grad for p in model.key_encoder.parameters())


# ---------------------------------------------------------------------------------------------------------
# 3. Hidden states and attentions
# ---------------------------------------------------------------------------------------------------------

HIDDEN_SHAPES = {  # batch 6, 32 px
    "test_resnet": [(6, 32, 16, 16), (6, 32, 8, 8), (6, 48, 4, 4), (6, 192, 2, 2), (6, 96, 1, 1)],  # stem, 4 stages
    "test_vit": [(6, 5, 64)] * 6,  # 6 blocks, 1 class token + 2 x 2 patches, width 64
    "test_convnext": [(6, 24, 8, 8), (6, 32, 4, 4), (6, 48, 2, 2), (6, 64, 1, 1)],  # 4 stages
}


@pytest.mark.parametrize("backbone", BACKBONES)
def test_hidden_states(backbone):
    model = MoCoModel(tiny_config(backbone)).eval()
    x = images()
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
        plain = model(x)
        from_config = MoCoModel(tiny_config(backbone, output_hidden_states=True)).eval()
        from_config.load_state_dict(model.state_dict())
        configured = from_config(x)
        last_two = model(x, output_hidden_states=[-2, -1])
    assert [tuple(h.shape) for h in out.hidden_states] == HIDDEN_SHAPES[backbone]
    assert plain.hidden_states is None and plain.attentions is None
    # forward_intermediates runs the ops of forward_features: the same numbers
    assert torch.equal(out.last_hidden_state, plain.last_hidden_state)
    assert torch.equal(out.pooler_output, plain.pooler_output)
    if backbone == "test_vit":  # the last block's tokens, before the final norm
        assert torch.equal(out.last_hidden_state, model.get_backbone().norm(out.hidden_states[-1]))
    else:  # the last stage is the unpooled feature map
        assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
    assert_same_values(configured.hidden_states, out.hidden_states)
    assert_same_values(last_two.hidden_states, out.hidden_states[-2:])


def test_hidden_states_in_a_training_step_and_with_split_bn_chunks():
    model = MoCoModel(tiny_config("test_efficientnet", bn_splits=2)).train()  # BatchNormAct2d: one pass per chunk
    reference = copy.deepcopy(model)
    x1, x2 = images(8, seed=1), images(8, seed=2)
    torch.manual_seed(0)
    out = model(x1, x2, output_hidden_states=True)
    torch.manual_seed(0)
    expected = reference(x1, x2)
    assert torch.equal(out.loss, expected.loss)  # asking for hidden states changes nothing else
    assert all(h.shape[0] == 8 and h.grad_fn is not None for h in out.hidden_states)  # chunks joined, with gradient
    clf = MoCoForImageClassification(tiny_config(num_labels=3)).train()
    assert [tuple(h.shape) for h in clf(images(), output_hidden_states=True).hidden_states] == HIDDEN_SHAPES["test_resnet"]


def test_attentions_of_a_vit_are_its_softmax_weights():
    model = MoCoModel(tiny_config("test_vit")).eval()
    x = images()
    with torch.no_grad():
        out = model(x, output_attentions=True, output_hidden_states=True)
    blocks = model.get_backbone().blocks
    assert len(out.attentions) == len(blocks)
    assert all(tuple(a.shape) == (6, 2, 5, 5) for a in out.attentions)  # N x heads x L x L
    # Rows are distributions: each weight is exact to 6 u (its exp, the softmax's 5-term sum, the division; u = eps / 2)
    # and adding 5 of them costs 4 u more, so a row sums to 1 within 10 u.
    for weights in out.attentions:
        torch.testing.assert_close(weights.sum(-1), torch.ones(6, 2, 5), rtol=0, atol=5 * EPS)
    # Block i's weights, recomputed from block i-1's output with timm's unfused formula: the same ops, same numbers.
    with torch.no_grad():
        for i in range(1, len(blocks)):
            attn = blocks[i].attn
            qkv = attn.qkv(blocks[i].norm1(out.hidden_states[i - 1])).reshape(6, 5, 3, attn.num_heads, -1)
            q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            assert torch.equal(out.attentions[i], ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
    assert all(block.attn.fused_attn == timm.layers.use_fused_attn() for block in blocks)  # restored after the call
    assert MoCoForImageClassification(tiny_config("test_vit", num_labels=3)).eval()(x, output_attentions=True).attentions


@pytest.mark.parametrize("backbone", ["test_resnet", "test_convnext"])
def test_attentions_of_a_backbone_without_them_raise(backbone):
    model = MoCoModel(tiny_config(backbone)).eval()
    with pytest.raises(ValueError, match=rf"output_attentions=True: backbone '{backbone}' has no attention blocks"):
        model(images(), output_attentions=True)
    with pytest.raises(ValueError, match="output_attentions=True"):
        MoCoForImageClassification(tiny_config(backbone, num_labels=3))(images(), output_attentions=True)


def test_hidden_states_without_forward_intermediates_raise_and_unknown_arguments_are_errors():
    model = MoCoModel(tiny_config()).eval()
    model.query_encoder._intermediates = None  # as for a timm model without forward_intermediates
    with pytest.raises(ValueError, match="needs timm's forward_intermediates"):
        model(images(), output_hidden_states=True)
    with pytest.raises(ValueError, match="output_hidden_states must be a bool or a list"):
        model(images(), output_hidden_states="yes")
    with pytest.raises(TypeError):
        model(images(), output_hidden_state=True)  # a typo is not swallowed


# ---------------------------------------------------------------------------------------------------------
# 4. return_dict=False, batching, memory format, torch.compile
# ---------------------------------------------------------------------------------------------------------


def test_tuple_and_dict_returns_hold_the_same_values():
    model = MoCoModel(tiny_config()).eval()
    clf = MoCoForImageClassification(tiny_config(num_labels=3)).eval()
    x, x_key, labels = images(seed=1), images(seed=2), torch.arange(6) % 3
    cases = [
        (model, dict(pixel_values=x, output_hidden_states=True)),
        (model, dict(pixel_values=x, key_pixel_values=x_key)),
        (clf, dict(pixel_values=x, labels=labels, output_hidden_states=True)),
    ]
    with torch.no_grad():
        for m, inputs in cases:
            as_dict = m(**inputs)
            as_tuple = m(**inputs, return_dict=False)
            assert isinstance(as_tuple, tuple)
            assert_same_values(as_tuple, tuple(as_dict.values()))  # the fields in order, without the Nones
        m = MoCoModel(tiny_config(return_dict=False)).eval()
        m.load_state_dict(model.state_dict())
        assert_same_values(m(x), tuple(model(x).values()))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_eval_outputs_do_not_depend_on_the_batch(backbone):
    model = MoCoModel(tiny_config(backbone)).eval()
    x = images()
    with torch.no_grad():
        batch = model(x)
        rows = [model(x[i : i + 1]) for i in range(len(x))]
    for field in ("last_hidden_state", "pooler_output", "query_embeddings"):
        assert_rounding_close(torch.cat([r[field] for r in rows]), batch[field], model.query_encoder)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_channels_last(backbone):
    model = MoCoModel(tiny_config(backbone)).eval()
    x = images()
    with torch.no_grad():
        expected = model(x)
        model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    assert_rounding_close(out.pooler_output, expected.pooler_output, model.query_encoder)
    step = model.train()(x, images(seed=1).contiguous(memory_format=torch.channels_last))
    step.loss.backward()
    assert torch.isfinite(step.loss)


def test_whole_model_compiles_for_inference_in_one_graph():
    """torch.compile of the whole model, eval mode, one view: captured without graph breaks (fullgraph) and traced by
    AOTAutograd; inductor's C++ kernels are left out to keep the file fast (the same graph)."""
    torch._dynamo.reset()
    model = MoCoModel(tiny_config()).eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = images()
    with torch.no_grad():
        out, expected = compiled(x), model(x)
    assert_rounding_close(out.pooler_output, expected.pooler_output, model.query_encoder)
    assert_rounding_close(out.query_embeddings, expected.query_embeddings, model.query_encoder)


# ---------------------------------------------------------------------------------------------------------
# 5. Gradient checkpointing
# ---------------------------------------------------------------------------------------------------------


def enable_checkpointing(model) -> None:
    """`gradient_checkpointing_enable()`, the name callers know; transformers 5 keeps it as a deprecated alias of
    `activation_checkpointing_enable()` that warns (FutureWarning). Both must work."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable()


def test_gradient_checkpointing_api():
    model = MoCoModel(tiny_config())
    assert not model.is_activation_checkpointing
    enable_checkpointing(model)
    assert model.is_activation_checkpointing
    assert model.query_encoder.gradient_checkpointing and model.query_encoder.backbone.grad_checkpointing
    assert not model.key_encoder.gradient_checkpointing and not model.key_encoder.backbone.grad_checkpointing
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        assert model.is_gradient_checkpointing
        model.gradient_checkpointing_disable()
    assert not model.is_activation_checkpointing and not model.query_encoder.backbone.grad_checkpointing

    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_activation_checkpointing
    clf = MoCoForImageClassification(tiny_config(num_labels=3))
    clf.activation_checkpointing_enable()
    assert clf.is_activation_checkpointing and clf.query_encoder.backbone.grad_checkpointing

    # transformers' config keyword, consumed at construction
    configured = MoCoModel(tiny_config(gradient_checkpointing=True))
    assert configured.is_activation_checkpointing and not hasattr(configured.config, "gradient_checkpointing")


@pytest.mark.parametrize(
    "options",
    [
        dict(every_n_layers=2),
        dict(activation_checkpointing_kwargs={"use_reentrant": True}),
        dict(offload=True),
    ],
    ids=["every_n_layers", "use_reentrant", "offload"],
)
def test_checkpointing_options_timm_cannot_apply_raise(options):
    model = MoCoModel(tiny_config())
    with pytest.raises(ValueError, match="every_n_layers=1|enable it without them"):
        model.activation_checkpointing_enable(**options)
    assert not model.is_activation_checkpointing


def test_checkpointing_is_a_setting_of_the_run_not_saved(tmp_path):
    model = MoCoModel(tiny_config())
    enable_checkpointing(model)
    model.save_pretrained(tmp_path)
    assert "gradient_checkpointing" not in json.loads((tmp_path / "config.json").read_text())
    assert not MoCoModel.from_pretrained(tmp_path).is_activation_checkpointing  # as for transformers' models
    config = MoCoConfig.from_pretrained(tmp_path)
    config.gradient_checkpointing = True
    assert MoCoModel.from_pretrained(tmp_path, config=config).is_activation_checkpointing


# (backbone, config overrides, batch). Split BN with and without shuffling, the symmetric loss (two query forwards
# before one backward), timm's BatchNormAct2d (one pass per BN chunk), a ViT and a ConvNeXt.
CHECKPOINT_CASES = {
    "resnet": ("test_resnet", dict(), 6),
    "resnet_split_shuffle_bn": ("test_resnet", dict(bn_splits=2, shuffle_bn=True), 8),
    "resnet_symmetric_split_bn": ("test_resnet", dict(symmetric=True, bn_splits=2), 8),
    "efficientnet_bn_chunks": ("test_efficientnet", dict(bn_splits=2), 8),
    "vit": ("test_vit", dict(), 6),
    "convnext": ("test_convnext", dict(), 6),
}


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_checkpointed_training_is_exactly_the_plain_one(case):
    """Checkpointing recomputes the same ops on the same inputs in the same order: every gradient is bitwise equal,
    and so (the recomputation's BatchNorm updates undone) are the weights, BatchNorm statistics and queue after an
    SGD step."""
    backbone, overrides, batch = CHECKPOINT_CASES[case]
    plain = trained_model(steps=1, backbone=backbone, **overrides)  # zero-initialised BN scales have moved
    checkpointed = copy.deepcopy(plain)
    enable_checkpointing(checkpointed)
    optimizers = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1) for m in (plain, checkpointed)]
    x1, x2 = images(batch, seed=10), images(batch, seed=11)
    outputs = []
    for model in (plain, checkpointed):
        model.zero_grad(set_to_none=True)  # trained_model leaves its last step's gradients
        torch.manual_seed(0)  # shuffle BN's permutation
        outputs.append(model(x1, x2))
        outputs[-1].loss.backward()
    assert torch.equal(outputs[0].loss, outputs[1].loss)
    with_grad = 0
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), name
            with_grad += 1
    assert with_grad == len(list(plain.query_encoder.parameters()))  # the whole query encoder, the key encoder none
    for optimizer in optimizers:
        optimizer.step()
    assert_states_equal(checkpointed, plain)  # weights, BatchNorm statistics, key encoder, queue and pointer


def test_checkpointed_classifier_fine_tuning_is_exactly_the_plain_one():
    plain = MoCoForImageClassification(tiny_config(num_labels=3)).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.activation_checkpointing_enable()
    labels = torch.arange(6) % 3
    for model in (plain, checkpointed):
        model(images(seed=3), labels=labels).loss.backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.equal(p.grad, q.grad), name
    assert_states_equal(checkpointed, plain)


def test_only_the_query_encoder_is_recomputed():
    model = trained_model(steps=1)
    enable_checkpointing(model)
    calls = Counter()
    block_type = type(model.query_encoder.backbone.layer1[0])
    for name in ("query_encoder", "key_encoder"):
        for module in getattr(model, name).modules():
            if isinstance(module, block_type):
                # a pre-hook: the recomputation stops once it has what backward needs, before the block returns
                module.register_forward_pre_hook(lambda *_, name=name: calls.update([name]))
    blocks = sum(isinstance(m, block_type) for m in model.query_encoder.modules())
    out = model(images(seed=1), images(seed=2))
    assert calls == {"query_encoder": blocks, "key_encoder": blocks}
    out.loss.backward()
    assert calls == {"query_encoder": 2 * blocks, "key_encoder": blocks}  # recomputed in backward: the query's only
    assert all(p.grad is None for p in model.key_encoder.parameters())


def saved_activation_bytes(model: torch.nn.Module, *inputs: torch.Tensor) -> int:
    """Bytes autograd keeps for backward in `model(*inputs)`: the distinct storages that a saved_tensors_hooks pack
    hook sees, parameters excluded (they are held anyway). With checkpointing, what timm's checkpoints keep (their
    inputs) goes through the hook; what they recompute does not."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, total = set(), 0

    def pack(tensor):
        nonlocal total
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(*inputs)
    return total


@pytest.mark.parametrize("backbone", BACKBONES)
def test_checkpointing_saves_less_for_backward(backbone):
    model = MoCoModel(tiny_config(backbone)).train()
    views = images(16, seed=1), images(16, seed=2)
    plain = saved_activation_bytes(model, *views)
    enable_checkpointing(model)
    checkpointed = saved_activation_bytes(model, *views)
    assert checkpointed < plain, (checkpointed, plain)


def test_attentions_with_checkpointing_need_no_grad():
    model = MoCoModel(tiny_config("test_vit")).train()
    enable_checkpointing(model)
    with pytest.raises(ValueError, match="torch.no_grad"):
        model(images(), output_attentions=True)
    with torch.no_grad():
        assert len(model(images(), output_attentions=True).attentions) == 6


# ---------------------------------------------------------------------------------------------------------
# 6. The small-image ResNets take timm's factory arguments
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SMALL_IMAGE_RESNETS)
def test_small_image_resnets_take_device_and_dtype(name):
    model = timm.create_model(name, num_classes=0, dtype=torch.bfloat16)
    assert {t.dtype for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()} == {
        torch.bfloat16
    }
    assert model(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16
    meta = timm.create_model(name, num_classes=0, device="meta")
    assert {t.device.type for t in list(meta.parameters()) + list(meta.buffers())} == {"meta"}


# ---------------------------------------------------------------------------------------------------------
# 7. Remote code: every saved folder loads with either Auto class, without moco_hf, quietly
# ---------------------------------------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys

    sys.modules["moco_hf"] = None  # `import moco_hf` now raises ImportError, whatever sys.path holds
    import torch
    from transformers import AutoModel, AutoModelForImageClassification

    moco_dir, clf_dir, results = sys.argv[1:4]
    loaded = {}
    for name, auto, folder, kwargs in [
        ("moco_as_moco", AutoModel, moco_dir, {}),
        ("moco_as_clf", AutoModelForImageClassification, moco_dir, {"num_labels": 3}),
        ("clf_as_moco", AutoModel, clf_dir, {}),
        ("clf_as_clf", AutoModelForImageClassification, clf_dir, {}),
    ]:
        model = auto.from_pretrained(folder, trust_remote_code=True, **kwargs)
        loaded[name] = {"class": type(model).__name__, "module": type(model).__module__, "state": model.state_dict()}
    torch.save(loaded, results)
    """
)


def test_either_class_loads_with_either_auto_class_without_moco_hf_and_without_warnings(tmp_path):
    config = dict(backbone="cifar_resnet10_slim", embed_dim=16, queue_size=20, momentum=0.9)
    moco = MoCoModel(MoCoConfig(**config))
    moco.reset_queue()
    moco.save_pretrained(tmp_path / "moco")
    clf = MoCoForImageClassification(MoCoConfig(**config, num_labels=3))
    clf.save_pretrained(tmp_path / "clf")

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), TRANSFORMERS_VERBOSITY="error")
    child = subprocess.run(
        # -W error: any warning fails the child, timm's "Overwriting cifar_resnet10_slim in registry" included (the
        # remote configuration and modeling files import backbones.py as separate modules, twice per folder)
        [sys.executable, "-W", "error", "-c", CHILD, str(tmp_path / "moco"), str(tmp_path / "clf"),
         str(tmp_path / "results.pt")],
        cwd=tmp_path,  # not the repository: its moco_hf/ folder must not be found on sys.path
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr[-4000:]
    assert "Warning" not in child.stderr and "Overwriting" not in child.stderr, child.stderr[-4000:]

    loaded = torch.load(tmp_path / "results.pt")
    assert {name: r["class"] for name, r in loaded.items()} == {
        "moco_as_moco": "MoCoModel",
        "moco_as_clf": "MoCoForImageClassification",
        "clf_as_moco": "MoCoModel",
        "clf_as_clf": "MoCoForImageClassification",
    }
    assert all(r["module"].startswith("transformers_modules.") for r in loaded.values())
    for name, expected in (("moco_as_moco", moco.state_dict()), ("clf_as_clf", clf.state_dict())):
        assert loaded[name]["state"].keys() == expected.keys()
        assert all(torch.equal(loaded[name]["state"][k], t) for k, t in expected.items()), name
    backbones = [
        ({n: t for n, t in loaded["moco_as_clf"]["state"].items() if n.startswith("query_encoder.")}, moco),
        ({n: t for n, t in loaded["clf_as_moco"]["state"].items() if n.startswith("query_encoder.backbone.")}, clf),
    ]
    for state, source in backbones:
        expected = {n: t for n, t in source.state_dict().items() if n.startswith("query_encoder.backbone.")}
        assert state.keys() == expected.keys() and all(torch.equal(state[n], t) for n, t in expected.items())


def test_a_second_copy_of_backbones_py_registers_nothing_and_warns_nothing():
    """What the remote code does (its configuration and modeling files import backbones.py as modules of their own):
    a copy imported under another module name keeps the first registration, quietly."""
    spec = importlib.util.spec_from_file_location("copy_of_backbones", moco_hf.backbones.__file__)
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec.loader.exec_module(module)
    for name in SMALL_IMAGE_RESNETS:
        assert timm.models.model_entrypoint(name).__module__ == "moco_hf.backbones"
        assert timm.create_model(name, num_classes=0)(images(2)).shape[0] == 2


# ---------------------------------------------------------------------------------------------------------
# 8. transformers' image-feature-extraction pipeline
# ---------------------------------------------------------------------------------------------------------


def test_feature_extraction_pipeline_gives_the_pooled_embedding_with_pool_true():
    """transformers 5.24's pipeline returns `pooler_output` only with `pool=True` and else the first output, the
    unpooled `last_hidden_state` (kept first for users of the tuple form); `pool=True` may be given once, to
    `pipeline(...)`."""
    model = MoCoModel(tiny_config()).eval()
    processor = image_processor_from_data_config(resolve_data_config(model))
    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8"))
    with torch.no_grad():
        expected = model(**processor(image, return_tensors="pt"))
    pooled = pipeline("image-feature-extraction", model=model, image_processor=processor, pool=True)
    assert torch.equal(pooled(image, return_tensors=True), expected.pooler_output)
    unpooled = pipeline("image-feature-extraction", model=model, image_processor=processor)
    assert torch.equal(unpooled(image, return_tensors=True), expected.last_hidden_state)

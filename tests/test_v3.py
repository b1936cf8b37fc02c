"""MoCo v3 (`queue_size=0`, a prediction head): against a plain Algorithm-1 reference (tests/_reference_v3.py), two
processes against one, and the pieces of its recipe: the momentum schedule, the ViT tricks, the asymmetric
augmentation on both paths, the optimisers' parameter groups, the configs and the official checkpoints.

Tiny timm test models on 32 px images with 32-wide heads; float64 wherever two implementations are compared.
"""

import copy
import itertools
import json
import os
import socket
import sys

import numpy as np
import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from _reference_v3 import ReferenceMoCoV3, cosine_momentum, mlp, sincos_2d
from _tolerance import tolerance
from PIL import Image, ImageFilter, ImageOps
from transformers import AutoModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pretrain  # noqa: E402
from moco_hf import MoCoConfig, MoCoModel, hub  # noqa: E402
from moco_hf.data import gpu_augment as G  # noqa: E402
from moco_hf.data import transforms as T  # noqa: E402
from moco_hf.data.presets import VIEW_PRESETS, get_view_presets  # noqa: E402
from moco_hf.sync_batchnorm import CPUSyncBatchNorm, convert_sync_batchnorm  # noqa: E402
from moco_hf.training import create_optimizer, momentum_at  # noqa: E402

EMBED, HIDDEN = 16, 32
BATCH = 8
LR = 0.1
STEPS = 5
BASE_MOMENTUM = 0.9  # far from 1, so that the key encoder visibly lags behind
# float64 (tests/_tolerance.py): the longest reduction is a BatchNorm over 8 images of 32 x 32; a training comparison
# chains the forward and backward passes of at most 30 layers over 5 steps (depth 5 x 2 x 30); values below 10.
TOL = tolerance(torch.float64, terms=BATCH * 32 * 32, depth=STEPS * 2 * 30, scale=10)


def v3_config(backbone: str, **overrides) -> MoCoConfig:
    kwargs = dict(embed_dim=EMBED, mlp_hidden_dim=HIDDEN, predictor_hidden_dim=HIDDEN, momentum=BASE_MOMENTUM)
    if backbone == "test_vit":
        kwargs["backbone_kwargs"] = {"img_size": 32}
    return MoCoConfig.v3(backbone, **{**kwargs, **overrides})


def images(n: int = BATCH, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimiser of the reference (tests/_reference_v3.py) on the model's trainable parameters."""
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR, momentum=0.9, weight_decay=1e-4)


def head_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A moco_hf head's Sequential state without the `layers.` prefix: the official layout's keys."""
    return {k.removeprefix("layers."): v for k, v in module.state_dict().items()}


def assert_close_states(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, **TOL, msg=lambda m, n=name: f"{what}.{n}: {m}")


# ---------------------------------------------------------------------------------------------------------
# 1. Algorithm 1
# ---------------------------------------------------------------------------------------------------------

ALGORITHM_CASES = {
    "vit": ("test_vit", dict()),  # 3-layer projector, BN after the predictor, frozen patches, sin-cos positions
    "resnet": ("test_resnet", dict()),  # 2-layer projector, no BN after the predictor, BatchNorm in the backbone
    "resnet_one_direction": ("test_resnet", dict(symmetric=False)),
}


@pytest.mark.parametrize("case", ALGORITHM_CASES)
def test_training_matches_algorithm_1(case):
    backbone, overrides = ALGORITHM_CASES[case]
    config = v3_config(backbone, **overrides)
    model = MoCoModel(config).double().train()
    vit = backbone == "test_vit"
    assert (config.mlp_layers, config.predictor_last_bn, config.freeze_patch_embed) == ((3, True, True) if vit
                                                                                        else (2, False, False))
    assert "queue" not in model.state_dict() and "queue_ptr" not in model.state_dict()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    ref = ReferenceMoCoV3(
        model.query_encoder.backbone, head_state(model.query_encoder.head), head_state(model.predictor),
        num_proj_layers=config.mlp_layers, in_dim=model.query_encoder.backbone.num_features, hidden_dim=HIDDEN,
        out_dim=EMBED, predictor_last_bn=config.predictor_last_bn, tau=config.tau, lr=LR, symmetric=config.symmetric,
        freeze_patch_embed=vit, fixed_pos_embed=vit,
    )
    optimizer = sgd(model)
    momenta = [cosine_momentum(step, STEPS, BASE_MOMENTUM) for step in range(STEPS)]
    for step in range(STEPS):
        x1, x2 = images(seed=2 * step), images(seed=2 * step + 1)
        # The paper updates f_k after the SGD step with this step's m; the model at the start of the next step.
        out = model(x1, x2, momentum=momenta[step - 1] if step else momenta[0])  # step 0: f_k == f_q, a no-op
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        ref_loss = ref.step(x1, x2, momenta[step])
        torch.testing.assert_close(out.loss, ref_loss, **TOL)
        rows = BATCH * (2 if config.symmetric else 1)
        assert out.logits.shape == (rows, BATCH) and out.logits.dtype == torch.float64
        assert torch.equal(out.labels, torch.arange(BATCH).repeat(rows // BATCH))
    model.momentum_update_key_encoder(momenta[-1])

    # Every weight and BatchNorm buffer (running statistics and counts) of f_q, its predictor and f_k.
    assert_close_states(model.query_encoder.backbone.state_dict(), ref.f_q.backbone.state_dict(), "f_q.backbone")
    assert_close_states(head_state(model.query_encoder.head), ref.f_q.projector.state_dict(), "f_q.projector")
    assert_close_states(head_state(model.predictor), ref.f_q.predictor.state_dict(), "f_q.predictor")
    assert_close_states(model.key_encoder.backbone.state_dict(), ref.f_k.backbone.state_dict(), "f_k.backbone")
    assert_close_states(head_state(model.key_encoder.head), ref.f_k.projector.state_dict(), "f_k.projector")
    forwards = STEPS * (2 if config.symmetric else 1)  # one per view and encoder (f_k: only x2 without symmetry)
    for module in (model.query_encoder, model.predictor):
        counts = {t.item() for n, t in module.state_dict().items() if n.endswith("num_batches_tracked")}
        assert counts == {forwards}
    key_counts = {t.item() for n, t in model.key_encoder.state_dict().items() if n.endswith("num_batches_tracked")}
    assert key_counts == {forwards}

    # Not vacuous: everything trainable moved, and f_k lags behind f_q.
    state = model.state_dict()
    trainable = {f"query_encoder.{n}" for n, p in model.query_encoder.named_parameters() if p.requires_grad}
    assert all(not torch.equal(state[n], start[n]) for n in trainable)
    query = dict(model.query_encoder.named_parameters())
    assert any(not torch.allclose(p, query[n]) for n, p in model.key_encoder.named_parameters())
    if vit:  # the frozen random patch projection and the fixed sin-cos positions did not move, on either side
        for name in ("backbone.patch_embed.proj.weight", "backbone.patch_embed.proj.bias", "backbone.pos_embed"):
            for side in ("query_encoder.", "key_encoder."):
                assert torch.equal(state[side + name], start[side + name]), side + name
        grid = model.query_encoder.backbone.patch_embed.grid_size
        pos_embed = state["query_encoder.backbone.pos_embed"][0]  # (1 + H*W) x D
        # built in float32 (the model's dtype then): a few float32 operations per value (power, product, sine)
        torch.testing.assert_close(pos_embed[1:], sincos_2d(*grid, pos_embed.shape[-1]),
                                   **tolerance(torch.float32, terms=1, depth=4))
        assert torch.equal(pos_embed[0], torch.zeros_like(pos_embed[0]))  # the class token's position: zeros


def test_eval_forward_changes_no_state_and_feature_forward_goes_through_the_predictor():
    model = MoCoModel(v3_config("test_resnet")).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x1, x2 = images(seed=1), images(seed=2)
    model.eval()
    contrast = model(x1, x2, momentum=0.5)
    features = model(x1)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.isfinite(contrast.loss) and contrast.logits.shape == (2 * BATCH, BATCH)
    with torch.no_grad():
        q = F.normalize(model.predictor(model.query_encoder(x1)), dim=1)
    torch.testing.assert_close(features.query_embeddings, q, **TOL)
    torch.testing.assert_close(contrast.query_embeddings, q, **TOL)


def test_gradients_reach_query_encoder_and_predictor_only():
    model = MoCoModel(v3_config("test_vit")).train()
    model(images(seed=1).float(), images(seed=2).float()).loss.backward()  # step 0 of a fresh model
    for name, param in model.named_parameters():
        frozen = name.startswith("key_encoder.") or "patch_embed.proj" in name or name.endswith("pos_embed")
        assert param.requires_grad == (not frozen), name
        assert (param.grad is None) == frozen, name
        if not frozen:
            assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


def test_ctr_loss_is_the_papers():
    """ctr(q, k) = 2 tau CE(q k^T / tau, diagonal); the model's loss is ctr(q1, k2) + ctr(q2, k1)."""
    from moco_hf.modeling_moco import ctr_loss, in_batch_labels, in_batch_logits

    g = torch.Generator().manual_seed(0)
    q, k = (F.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=1) for _ in range(2))
    tau = 0.3
    by_hand = -2 * tau * sum(torch.log_softmax(q[i] @ k.T / tau, dim=0)[i] for i in range(6)) / 6
    torch.testing.assert_close(ctr_loss(in_batch_logits(q, k, tau), in_batch_labels(6, 0, q.device), tau), by_hand)
    keys = torch.cat([F.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=1), k])  # rank 1 of 2
    logits = in_batch_logits(q, keys, tau)
    assert logits.shape == (6, 12) and torch.equal(in_batch_labels(6, 1, q.device), torch.arange(6, 12))
    torch.testing.assert_close(logits[:, 6:], q @ k.T / tau)


# ---------------------------------------------------------------------------------------------------------
# 2. Two processes x N/2 = one process x N, BatchNorm synchronised
# ---------------------------------------------------------------------------------------------------------

WORLD, DIST_STEPS = 2, 3


def _dist_config() -> MoCoConfig:
    return v3_config("test_resnet")  # BatchNorm in the backbone, the projector and the predictor


def _dist_batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    return images(BATCH, seed=100 + 2 * step), images(BATCH, seed=101 + 2 * step)


def _dist_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)  # the same initial model on every rank, as DDP's broadcast would give
        model = convert_sync_batchnorm(MoCoModel(_dist_config()).double().train(), torch.device("cpu"))
        assert any(isinstance(m, CPUSyncBatchNorm) for m in model.modules())
        optimizer = sgd(model)
        mine = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        losses, labels = [], []
        for step in range(DIST_STEPS):
            x1, x2 = _dist_batches(step)
            out = model(x1[mine], x2[mine], momentum=cosine_momentum(step, DIST_STEPS, BASE_MOMENTUM))
            optimizer.zero_grad()
            out.loss.backward()
            for p in model.parameters():  # what DDP does: the mean of the processes' gradients
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= WORLD
            optimizer.step()
            losses.append(out.loss.detach())
            labels.append(out.labels)
        torch.save({"state": model.state_dict(), "losses": losses, "labels": labels},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_synchronised_batchnorm_equal_one_process(tmp_path):
    mp.spawn(_dist_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    torch.manual_seed(0)
    model = MoCoModel(_dist_config()).double().train()
    optimizer = sgd(model)
    for step in range(DIST_STEPS):
        x1, x2 = _dist_batches(step)
        out = model(x1, x2, momentum=cosine_momentum(step, DIST_STEPS, BASE_MOMENTUM))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        # each process's loss is the mean over its N/2 queries against all N keys: their mean is the whole loss
        torch.testing.assert_close(sum(r["losses"][step] for r in ranks) / WORLD, out.loss.detach(), **TOL)
        half = BATCH // WORLD
        for rank, result in enumerate(ranks):  # positives offset by rank: process 1's are columns 4..7
            assert torch.equal(result["labels"][step], (torch.arange(half) + rank * half).repeat(2))

    # Every weight and every BatchNorm buffer (statistics of the whole batch on both processes) equals the
    # one-process run's, on both processes.
    for result in ranks:
        assert_close_states(result["state"], model.state_dict(), "model")
    assert any("running_mean" in name for name in ranks[0]["state"])


def test_cpu_sync_batchnorm_is_batchnorm_in_one_process():
    """Without several processes (and in eval mode) it is exactly `nn.BatchNorm*`, with the same state dict."""
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 30 * 30, 6), torch.nn.BatchNorm1d(6, affine=False)).double()
    synced = convert_sync_batchnorm(copy.deepcopy(plain), torch.device("cpu"))
    assert [type(m) for m in synced if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)] == [CPUSyncBatchNorm] * 2
    assert synced.state_dict().keys() == plain.state_dict().keys()
    x = images(seed=3)
    for mode in (True, False):
        assert torch.equal(synced.train(mode)(x), plain.train(mode)(x))
    assert all(torch.equal(a, b) for a, b in zip(synced.state_dict().values(), plain.state_dict().values()))
    with pytest.raises(ValueError, match="cannot be synchronised across CPU processes"):
        convert_sync_batchnorm(timm.layers.BatchNormAct2d(4), torch.device("cpu"))


# ---------------------------------------------------------------------------------------------------------
# 3. The recipe's pieces: momentum schedule, optimisers
# ---------------------------------------------------------------------------------------------------------


def test_momentum_schedule():
    assert [momentum_at(s, 100, 0.99) for s in (0, 50, 99)] == [0.99] * 3  # constant: v1, v2
    cosine = [momentum_at(s, 100, 0.99, "cosine") for s in range(101)]
    assert cosine[0] == 0.99 and cosine[100] == 1.0 and cosine[50] == pytest.approx(0.995)
    assert all(a < b for a, b in itertools.pairwise(cosine))  # rises every step
    assert cosine == pytest.approx([cosine_momentum(s, 100, 0.99) for s in range(101)])
    with pytest.raises(ValueError, match="constant or cosine"):
        momentum_at(0, 10, 0.99, "linear")


def _param_names(model, group) -> set[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for p in group["params"]}


@pytest.mark.parametrize("name", ["adamw", "lars"])
def test_optimizer_groups_keep_biases_and_norms_out_of_decay(name):
    model = MoCoModel(v3_config("test_vit"))
    optimizer = create_optimizer(model, name, lr=0.5, weight_decay=0.1, momentum=0.9)
    assert type(optimizer).__name__ == {"adamw": "AdamW", "lars": "Lars"}[name]
    no_decay, decay = ({n for g in optimizer.param_groups if (g["weight_decay"] > 0) == d for n in _param_names(model, g)}
                       for d in (False, True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert no_decay | decay == trainable and not no_decay & decay
    assert not any(n.startswith("key_encoder.") or "patch_embed" in n or n.endswith("pos_embed") for n in trainable)
    params = dict(model.named_parameters())
    assert {n for n in trainable if params[n].ndim <= 1} | {"query_encoder.backbone.cls_token"} == no_decay
    assert all(params[n].ndim == 2 for n in decay)  # the linear layers' weights (heads, attention, MLPs)
    assert any(n.startswith("predictor.") for n in decay) and any(".norm" in n for n in no_decay)


def test_lars_adapts_only_the_decayed_weights():
    """timm's Lars: where the group's weight decay is 0 (biases, norm weights) neither decay nor the trust ratio,
    a plain SGD step; elsewhere the layer-wise step lr * trust * (g + wd w), trust = 0.001 |w| / (|g| + wd |w|)
    (1 where |g| or |w| is 0: at step 0, the convolutions behind timm's zero-initialised last BN of each block)."""
    torch.manual_seed(0)
    model = MoCoModel(v3_config("test_resnet")).double().train()
    optimizer = create_optimizer(model, "lars", lr=0.5, weight_decay=0.1, momentum=0.9)
    model(images(seed=1), images(seed=2)).loss.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    optimizer.step()  # first step: the momentum buffer is the (adapted) gradient itself
    params = dict(model.named_parameters())
    adapted = set()
    for group in optimizer.param_groups:
        for name in _param_names(model, group):
            w, g = before[name], params[name].grad
            if group["weight_decay"] == 0:
                expected = w - 0.5 * g
            else:
                trust = 0.001 * w.norm() / (g.norm() + 0.1 * w.norm() + 1e-8) if g.norm() * w.norm() > 0 else 1.0
                expected = w - 0.5 * trust * (g + 0.1 * w)
                if trust != 1.0:
                    adapted.add(name)
            # a handful of float64 operations on values of a few units; the norms sum at most 4096 x 32 squares
            torch.testing.assert_close(params[name].detach(), expected,
                                       **tolerance(torch.float64, terms=4096 * 32, depth=4, scale=10))
    heads = {f"{head}.layers.{i}.weight" for head in ("query_encoder.head", "predictor") for i in (0, 3)}
    assert heads <= adapted  # the layer-wise adaptation did happen (the heads' linear weights)


def test_adamw_decays_only_the_decayed_weights():
    """With zero gradients AdamW's step is its decoupled weight decay alone: w (1 - lr wd) in the decay group, w
    unchanged in the other."""
    model = MoCoModel(v3_config("test_vit")).double()
    optimizer = create_optimizer(model, "adamw", lr=0.5, weight_decay=0.1)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.step()
    for group in optimizer.param_groups:
        for name in _param_names(model, group):
            factor = 1 - 0.5 * group["weight_decay"]
            torch.testing.assert_close(dict(model.named_parameters())[name].detach(), before[name] * factor,
                                       **tolerance(torch.float64, terms=1, depth=2))


# ---------------------------------------------------------------------------------------------------------
# 4. BYOL's asymmetric augmentation, on the batched device path and the PIL path
# ---------------------------------------------------------------------------------------------------------


def smooth_images(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """n x 3 x height x width uint8 of smooth colour, with levels on both sides of the solarize threshold."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 5, 6, generator=g)
    x = F.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def test_solarize_matches_torchvision_and_pil():
    x = smooth_images(4, 12, 14).float() / 255
    apply = torch.tensor([True, False, True, True])
    out = G.RandomSolarize(0.2).apply(x, apply)
    assert torch.equal(out[apply], TF.solarize(x[apply], 128 / 255)) and torch.equal(out[~apply], x[~apply])
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)  # every 8-bit level
    pil = Image.fromarray(levels[0].permute(1, 2, 0).numpy())
    expected = torch.from_numpy(np.array(ImageOps.solarize(pil, T.SOLARIZE_THRESHOLD)))
    ours = G.solarize(levels.float() / 255, torch.tensor([True]))[0].permute(1, 2, 0) * 255
    assert torch.equal(ours.round().to(torch.uint8), expected)  # the same levels inverted: 128 and above


# crop (source coordinates up to 36), the jitter (contrast's mean over 24 x 24), blur, solarize: as in
# tests/test_gpu_augment.py, on pixels in [0, 1]; times 4.5 after normalising (std 0.22)
VIEW_TERMS, VIEW_DEPTH, VIEW_SCALE = 24 * 24, 6 + 4 * 40 + 6, 36


def reference_view(augment: G.MoCoGPUAugment, view: int, image: torch.Tensor, params: G.AugmentParams, i: int):
    """One view through torchvision's functionals, in the view's order, with the sampled parameters; and the pixels
    that were within rounding of the solarize threshold (either side is right for them)."""
    x = TF.resized_crop(image.float() / 255, *params.boxes[i].tolist(), [augment.size] * 2, antialias=False)
    ambiguous = torch.zeros_like(x, dtype=torch.bool)
    for op, p in zip(augment.view_ops[view], params.ops):
        if isinstance(op, G.ColorJitter) and p.apply[i]:
            for k in p.order[i].tolist():
                fn = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)[k]
                x = fn(x, float(p.factors[i, k]))
        elif isinstance(op, G.RandomGrayscale) and p[i]:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        elif isinstance(op, G.GaussianBlur) and p.apply[i]:
            x = TF.gaussian_blur(x, [op.kernel_size] * 2, [float(p.sigma[i])] * 2)
        elif isinstance(op, G.RandomSolarize) and p[i]:
            # values in [0, 1] through the ops so far (a crop coordinate's rounding moves a smooth image's value
            # by far less): within the bound of the threshold, either side is right
            ambiguous = (x - 128 / 255).abs() <= _pixel_tol(1.0)["atol"]
            x = TF.solarize(x, 128 / 255)
        elif isinstance(op, G.RandomHorizontalFlip) and p[i]:
            x = TF.horizontal_flip(x)
            ambiguous = TF.horizontal_flip(ambiguous)
    return TF.normalize(x, augment.mean, augment.std), ambiguous


def _pixel_tol(scale: float) -> dict:
    return tolerance(torch.float32, terms=VIEW_TERMS, depth=VIEW_DEPTH, scale=scale)


@pytest.mark.parametrize("view", [0, 1])
def test_v3_views_match_torchvision_on_sampled_parameters(view):
    augment = G.MoCoGPUAugment("v3", size=24)
    batch = [smooth_images(1, 30 + 3 * i, 36 - 2 * i, seed=i)[0] for i in range(12)]
    params = augment.sample(batch, torch.Generator().manual_seed(view), view=view)
    out = augment.apply(batch, params, view=view)
    reference, ambiguous = map(torch.stack, zip(*(reference_view(augment, view, image, params, i)
                                                 for i, image in enumerate(batch))))
    assert ambiguous.float().mean() < 0.01
    torch.testing.assert_close(out[~ambiguous], reference[~ambiguous], **_pixel_tol(VIEW_SCALE * 4.5))
    if view == 1:
        assert params.ops[3].any()  # something was solarized


def test_v3_views_sample_byols_asymmetric_parameters_on_the_device_path():
    augment = G.MoCoGPUAugment("v3")
    assert [type(op) for op in augment.view_ops[0]] == [G.ColorJitter, G.RandomGrayscale, G.GaussianBlur,
                                                       G.RandomHorizontalFlip]
    assert [type(op) for op in augment.view_ops[1]] == [G.ColorJitter, G.RandomGrayscale, G.GaussianBlur,
                                                       G.RandomSolarize, G.RandomHorizontalFlip]
    assert augment.crop.scale == (0.08, 1.0) and augment.view_ops[1][3].threshold == 128 / 255
    n = 20000
    sizes = torch.full((n,), 64), torch.full((n,), 64)
    packed = G.PackedImages(torch.zeros(3, 64 * 64, dtype=torch.uint8), torch.zeros(n, dtype=torch.long), *sizes)
    rates = []
    for view in (0, 1):
        params = augment.sample(packed, torch.Generator().manual_seed(view), view=view)
        jitter, grey, blur = params.ops[:3]
        assert jitter.factors[:, 2].min() >= 0.8 and jitter.factors[:, 2].max() <= 1.2  # saturation 0.2
        assert jitter.factors[:, 3].abs().max() <= 0.1 and jitter.factors[:, 0].min() >= 0.6  # hue 0.1, brightness
        solarized = params.ops[3].float().mean() if view else 0.0
        rates.append((jitter.apply.float().mean(), grey.float().mean(), blur.apply.float().mean(), solarized,
                      params.ops[-1].float().mean()))
    expected = [(0.8, 0.2, 1.0, 0.0, 0.5), (0.8, 0.2, 0.1, 0.2, 0.5)]
    for got, want in zip(rates, expected):
        assert torch.allclose(torch.tensor([float(r) for r in got]), torch.tensor(want), atol=0.015), (got, want)
    # the symmetric recipes keep one op list (one compiled graph) for both views
    v2 = G.MoCoGPUAugment("v2")
    assert v2.view_ops[0] == v2.view_ops[1] and v2._view_index(1) == 0


def test_v3_views_sample_byols_asymmetric_parameters_on_the_pil_path(monkeypatch):
    transform = T.TwoViewTransform("v3", 8, [0.5] * 3, [0.25] * 3)
    assert transform.presets == VIEW_PRESETS["v3"] and transform.preset is transform.presets[0]
    calls = []
    real_solarize, real_blur, real_saturation = ImageOps.solarize, ImageFilter.GaussianBlur, TF.adjust_saturation
    monkeypatch.setattr(T.ImageOps, "solarize", lambda im, t: calls.append(("solarize", t)) or real_solarize(im, t))
    monkeypatch.setattr(T.ImageFilter, "GaussianBlur",
                        lambda radius: calls.append(("blur", radius)) or real_blur(radius=radius))
    monkeypatch.setattr(T.TF, "adjust_saturation", lambda im, f: calls.append(("saturation", f)) or real_saturation(im, f))
    image = Image.fromarray(smooth_images(1, 10, 10)[0].permute(1, 2, 0).numpy())
    g = torch.Generator().manual_seed(0)
    counts = []
    for view in (0, 1):
        calls.clear()
        n = 1500
        for _ in range(n):
            transform.view(image, g, transform.presets[view])
        kinds = [c[0] for c in calls]
        counts.append((kinds.count("blur") / n, kinds.count("solarize") / n))
        assert all(t == 128 for k, t in calls if k == "solarize")
        assert all(0.1 <= r <= 2.0 for k, r in calls if k == "blur")
        assert all(0.8 <= f <= 1.2 for k, f in calls if k == "saturation")
    # view 1: always blurred, never solarized; view 2: blurred 10 %, solarized 20 % (1500 draws: std 0.8 / 1 %)
    assert counts[0] == (1.0, 0.0)
    assert abs(counts[1][0] - 0.1) < 0.03 and abs(counts[1][1] - 0.2) < 0.04
    q, k = transform(image, g)  # __call__: view 1's preset, then view 2's
    assert q.shape == k.shape == (3, 8, 8)


def test_view_presets():
    v3 = get_view_presets("v3", crop_min_scale=0.2)
    assert [p.crop_scale for p in v3] == [(0.2, 1.0)] * 2 and [p.blur_prob for p in v3] == [1.0, 0.1]
    assert [p.solarize_prob for p in v3] == [0.0, 0.2] and all(p.jitter == (0.4, 0.4, 0.2, 0.1) for p in v3)
    cifar = get_view_presets("v3_cifar")
    assert [p.blur_prob for p in cifar] == [0.0, 0.0] and [p.solarize_prob for p in cifar] == [0.0, 0.2]
    assert G.MoCoGPUAugment("v3_cifar").size == 32 and G.MoCoGPUAugment("v3_cifar").mean == G.CIFAR10_MEAN
    v2 = get_view_presets("v2")
    assert v2[0] is v2[1]
    with pytest.raises(ValueError, match="unknown augmentation"):
        get_view_presets("v4")


# ---------------------------------------------------------------------------------------------------------
# 5. Official MoCo v3 checkpoints (facebookresearch/moco-v3 layout, built here)
# ---------------------------------------------------------------------------------------------------------


def _random_bn_statistics(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.1, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)


def official_v3(kind: str, seed: int):
    """(base_encoder, momentum_encoder, predictor) as the released code builds them: a torchvision ResNet whose `fc`
    is the 2-layer projection head (no predictor BN), or a timm ViT (fixed sin-cos positions) whose `head` is the
    3-layer one (predictor BN); in eval mode, with non-trivial BatchNorm statistics."""
    import torchvision

    encoders = []
    for s in (seed, seed + 1):
        torch.manual_seed(s)
        if kind == "resnet":
            encoder = torchvision.models.resnet18()
            encoder.fc = mlp(2, 512, HIDDEN, EMBED, last_bn=True)
        else:
            encoder = timm.create_model("test_vit", img_size=32, num_classes=HIDDEN)
            encoder.head = mlp(3, 64, HIDDEN, EMBED, last_bn=True)
            with torch.no_grad():
                encoder.pos_embed[0, 1:] = sincos_2d(2, 2, 64).float()
                encoder.pos_embed[0, 0] = 0
        _random_bn_statistics(encoder, s)
        encoders.append(encoder.eval())
    torch.manual_seed(seed + 2)
    predictor = mlp(2, EMBED, HIDDEN, EMBED, last_bn=kind == "vit")
    _random_bn_statistics(predictor, seed + 2)
    return encoders[0], encoders[1], predictor.eval()


def save_official_v3(path, base, momentum, predictor, arch: str, with_momentum: bool = True) -> str:
    state = {f"module.base_encoder.{k}": v for k, v in base.state_dict().items()}
    if with_momentum:
        state.update({f"module.momentum_encoder.{k}": v for k, v in momentum.state_dict().items()})
    state.update({f"module.predictor.{k}": v for k, v in predictor.state_dict().items()})
    torch.save({"epoch": 300, "arch": arch, "state_dict": state, "optimizer": {"state": {}, "param_groups": []},
                "scaler": {}}, path)
    return str(path)


# float64, eval mode: the longest sum is a ResNet-18 convolution over 512 x 3 x 3 inputs, about 30 layers
CONVERTED = tolerance(torch.float64, terms=512 * 9, depth=30, scale=10)


@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_official_v3_checkpoint_converts_to_the_same_network(tmp_path, kind):
    import finetune
    from moco_hf.convert_official import main

    base, momentum, predictor = official_v3(kind, seed=3)
    arch, extra = ("resnet18", []) if kind == "resnet" else ("test_vit", ["--backbone_kwargs", '{"img_size": 32}'])
    checkpoint = save_official_v3(tmp_path / "ckpt.pth.tar", base, momentum, predictor, arch)
    assert main(["--checkpoint", checkpoint, "--output_dir", str(tmp_path / "out"), *extra]) == 0

    model = AutoModel.from_pretrained(tmp_path / "out").double().eval()
    c = model.config
    assert (c.queue_size, c.symmetric, c.embed_dim, c.mlp_hidden_dim, c.predictor_hidden_dim, c.mlp_bn) == (
        0, True, EMBED, HIDDEN, HIDDEN, True)
    assert (c.mlp_layers, c.predictor_last_bn, c.freeze_patch_embed, c.tau) == (
        (2, False, False, 1.0) if kind == "resnet" else (3, True, True, 0.2))
    record = json.loads((tmp_path / "out" / "training_config.json").read_text())
    assert record["moco_version"] == "v3" and record["source"] == "facebookresearch/moco-v3"
    base, momentum, predictor = base.double(), momentum.double(), predictor.double()
    x = images(2, seed=5)
    with torch.no_grad():
        if kind == "resnet":
            pooled = torch.flatten(torch.nn.Sequential(*list(base.children())[:-1])(x), 1)
        else:
            pooled = base.forward_head(base.forward_features(x), pre_logits=True)
        out = model(x)
        torch.testing.assert_close(out.pooler_output, pooled, **CONVERTED)
        torch.testing.assert_close(model.query_encoder(x), base(x), **CONVERTED)  # the projection head's output
        torch.testing.assert_close(model.key_encoder(x), momentum(x), **CONVERTED)
        torch.testing.assert_close(out.query_embeddings, F.normalize(predictor(base(x)), dim=1), **CONVERTED)

        # the backbone alone in timm's format (what push_to_hub uploads for hf-hub:), and for finetune.py
        exported = hub.export_timm_backbone(model.float(), tmp_path / "backbone")
        from_timm = timm.create_model(f"local-dir:{exported}", pretrained=True).double().eval()
        torch.testing.assert_close(from_timm(x), pooled, **CONVERTED)
        classifier = finetune.load_model(str(tmp_path / "out"), ["a", "b", "c"]).double().eval()
        torch.testing.assert_close(classifier.query_encoder(x)[1], pooled, **CONVERTED)
        assert classifier(x).logits.shape == (2, 3)


def test_official_v3_vits_and_incomplete_checkpoints(tmp_path):
    from moco_hf.convert_official import ConversionError, _v3_arch, convert

    # the released ViT-Small has 12 heads (timm's vit_small_patch16_224 has 6): kept even where --arch is given
    assert _v3_arch({"arch": "vit_small"}, None, None) == ("vit_small_patch16_224", {"num_heads": 12})
    assert _v3_arch({"arch": "vit_small"}, "vit_small_patch16_224", {"img_size": 384}) == (
        "vit_small_patch16_224", {"num_heads": 12, "img_size": 384})
    assert _v3_arch({"arch": "vit_base"}, None, None) == ("vit_base_patch16_224", {})
    with pytest.raises(ConversionError, match="convolutional stem"):
        _v3_arch({"arch": "vit_conv_small"}, None, None)

    base, momentum, predictor = official_v3("resnet", seed=4)
    cleaned = save_official_v3(tmp_path / "cleaned.pth.tar", base, momentum, predictor, "resnet18",
                               with_momentum=False)
    model = convert(cleaned).double().eval()  # the key encoder restarts as a copy of the query encoder
    x = images(2, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(model.key_encoder(x), base.double()(x), **CONVERTED)
    with pytest.raises(ConversionError, match="no queue"):
        convert(cleaned, queue_size=16)
    state = torch.load(cleaned, weights_only=True)
    state["state_dict"] = {k: v for k, v in state["state_dict"].items() if "predictor" not in k}
    torch.save(state, tmp_path / "no_predictor.pth.tar")
    with pytest.raises(ConversionError, match="no predictor"):
        convert(tmp_path / "no_predictor.pth.tar")


# ---------------------------------------------------------------------------------------------------------
# 6. Configs and pretrain.py
# ---------------------------------------------------------------------------------------------------------

V3_CONFIGS = {  # file: (backbone, optimizer, projection layers, predictor BN, ViT tricks, tau, base lr)
    "moco_v3_vit_small_imagenet.yaml": ("vit_small_patch16_224", "adamw", 3, True, True, 0.2, 1.5e-4),
    "moco_v3_vit_small_imagenet_1gpu.yaml": ("vit_small_patch16_224", "adamw", 3, True, True, 0.2, 1.5e-4),
    "moco_v3_vit_base_imagenet.yaml": ("vit_base_patch16_224", "adamw", 3, True, True, 0.2, 1.5e-4),
    "moco_v3_resnet50_imagenet.yaml": ("resnet50", "lars", 2, False, False, 1.0, 0.6),
    "moco_v3_resnet18_cifar10.yaml": ("cifar_resnet18", "lars", 2, False, False, 0.2, 0.6),
    "demo_digits_v3.yaml": ("test_resnet", "lars", 2, False, False, 0.2, 0.6),
}


@pytest.mark.parametrize("name", sorted(V3_CONFIGS))
def test_v3_configs_are_the_recipe(name):
    backbone, optimizer, layers, predictor_bn, vit, tau, lr = V3_CONFIGS[name]
    cfg = pretrain.load_config(os.path.join(ROOT, "configs", name), [])
    assert (cfg.backbone, cfg.optimizer, cfg.mlp_layers, cfg.predictor_last_bn, cfg.tau, cfg.base_lr) == (
        backbone, optimizer, layers, predictor_bn, tau, lr)
    assert (cfg.queue_size, cfg.symmetric, cfg.mlp_bn, cfg.momentum, cfg.momentum_schedule) == (
        0, True, True, 0.99, "cosine")
    # the digits demo: crops and brightness / contrast, as the v2 demo (flips and colour do not suit digits)
    assert cfg.freeze_patch_embed == cfg.sincos_pos_embed == vit
    assert cfg.augmentation == "digits" if name.startswith("demo") else cfg.augmentation.startswith("v3")
    assert cfg.predictor_hidden_dim == cfg.mlp_hidden_dim and cfg.bn_splits == 1 and not cfg.shuffle_bn
    if backbone == "vit_small_patch16_224":
        assert cfg.backbone_kwargs == {"num_heads": 12}
    if name.endswith("imagenet.yaml"):
        assert cfg.batch_size == 4096 and (cfg.embed_dim, cfg.mlp_hidden_dim) == (256, 4096)
        assert cfg.warmup_epochs == (40 if vit else 10)
        assert cfg.weight_decay == (0.1 if vit else 1e-6)
    with torch.device("meta"):  # the model builds, without memory
        model = MoCoModel(MoCoConfig(**cfg.model_kwargs()))
    assert model.queue is None and model.predictor is not None


def test_v3_pretrain_config_mistakes_are_one_line():
    base = ["--queue_size", "0", "--predictor_hidden_dim", "32"]
    for extra, match in [(["--optimizer", "adam"], "optimizer='adam' is not one of sgd, adamw, lars"),
                         (["--momentum_schedule", "linear"], "momentum_schedule='linear' is not one of constant, cosine"),
                         (["--bn_splits", "2"], "bn_splits=2 with queue_size 0"),
                         (["--augmentation", "v4"], "augmentation='v4' is not one of"),
                         (["--queue_size", "-1"], "queue_size must be >= 0")]:
        with pytest.raises(ValueError, match=match):
            pretrain.load_config(None, base + extra)
    cfg = pretrain.load_config(None, base + ["--batch_size", "16"])  # no queue: no queue size check
    assert cfg.queue_size == 0


def test_v3_pretraining_run(tmp_path, monkeypatch):
    """pretrain.py with MoCo v3 end to end (tiny): LARS, the cosine momentum reaching every step's forward, the
    batched augmentation's v3 views, a final model without a queue that AutoModel loads."""
    from _tiny import TINY

    momenta = []
    forward = MoCoModel.forward

    def recording_forward(self, *args, momentum=None, **kwargs):
        if kwargs.get("key_pixel_values") is not None:
            momenta.append(momentum)
        return forward(self, *args, momentum=momentum, **kwargs)

    monkeypatch.setattr(MoCoModel, "forward", recording_forward)
    cfg = pretrain.load_config(None, TINY + [
        "--output_dir", str(tmp_path / "out"), "--max_steps", "3", "--eval_split", "none", "--queue_size", "0",
        "--mlp_bn", "true", "--predictor_hidden_dim", "32", "--mlp_hidden_dim", "32", "--symmetric", "true",
        "--optimizer", "lars", "--base_lr", "0.6", "--weight_decay", "1e-6", "--momentum_schedule", "cosine",
        "--augmentation", "v3_cifar", "--gpu_augment", "on", "--device_cache", "on"])
    result = pretrain.train(cfg)
    assert momenta == pytest.approx([momentum_at(s, 3, 0.99, "cosine") for s in range(3)])
    assert type(result.model.predictor).__name__ == "MoCoPredictionHead"
    loaded = AutoModel.from_pretrained(tmp_path / "out" / "final")
    assert loaded.queue is None and "queue" not in loaded.state_dict()
    assert all(torch.equal(v, result.model.state_dict()[k]) for k, v in loaded.state_dict().items())

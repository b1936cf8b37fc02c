"""Time one MoCo training step (forward + backward + SGD step) of `MoCoModel` against a straightforward implementation
in the style of the official code (facebookresearch/moco `moco/builder.py`): python-loop momentum update, queue
stored C x K and cloned for the negatives, `int(queue_ptr)` slicing enqueue, loss computed outside the model.

Both start from the same weights and see the same synthetic batches; they are timed interleaved (the order flips
every repeat) on the same hardware in one run, and the median over repeats is reported.

Run it:
    python benchmarks/bench_model_step.py                                   # CPU defaults: resnet18, batch 32, 64 px
    python benchmarks/bench_model_step.py --backbone resnet50 --batch 256 --image-size 224 \\
        --queue-size 65536 --amp --channels-last             # one GPU; the paper's global batch (it used 8 GPUs)
    python benchmarks/bench_model_step.py --backbone resnet50 --batch 128 --image-size 224 --compile --amp
    python benchmarks/bench_model_step.py --backbone cifar_resnet18 --batch 512 --image-size 32 --bn-splits 8 \
        --amp --channels-last --compile --baseline-fp32         # the CIFAR-10 demo's step (split BN, one GPU)

With `--bn-splits` > 1 the official-style model is the CIFAR-10 demo's: its `SplitBatchNorm` (one `batch_norm` call
over a view with `bn_splits` x C channels, interleaved chunks) and a permutation of the key batch in place of
shuffle BN across GPUs; moco_hf runs `bn_splits` in its config (`SplitBatchNorm2d`, contiguous chunks).

With `--v3`, MoCo v3 (`MoCoConfig.v3`: no queue, symmetrised loss, heads with BatchNorm, a prediction head) against
a naive implementation of the paper's Algorithm 1 on the same encoder and prediction head (python-loop momentum
update, each view through f_q and the predictor then f_k, `ctr` written out, loss outside the model):
    python benchmarks/bench_model_step.py --v3                              # CPU: resnet18, batch 32, 64 px
    python benchmarks/bench_model_step.py --v3 --backbone vit_small_patch16_224 --backbone-kwargs '{"num_heads": 12}' \
        --batch 256 --image-size 224 --amp --compile --baseline-fp32         # one GPU: ViT-S/16, the released heads
"""

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # pretrain.py, from any directory

from moco_hf import MoCoConfig, MoCoModel  # noqa: E402
from moco_hf.modeling_moco import SplitBatchNorm2d  # noqa: E402
from moco_hf.training import uses_cuda_graphs  # noqa: E402
from pretrain import COMPILE_MODES  # noqa: E402


class DemoSplitBatchNorm(nn.BatchNorm2d):
    """The CIFAR-10 demo's split BatchNorm: the batch viewed as N/g x (g*C) x H x W, one `batch_norm` call, running
    statistics repeated per split and averaged back. The view needs a contiguous (NCHW) input."""

    def __init__(self, bn: nn.BatchNorm2d, num_splits: int):
        super().__init__(bn.num_features, eps=bn.eps, momentum=bn.momentum, device=bn.weight.device)
        self.load_state_dict(bn.state_dict())
        self.num_splits = num_splits

    def forward(self, input):
        if not self.training:
            return super().forward(input)
        n, c, h, w = input.shape
        g = self.num_splits
        mean_split, var_split = self.running_mean.repeat(g), self.running_var.repeat(g)
        out = F.batch_norm(input.contiguous().view(-1, c * g, h, w), mean_split, var_split, self.weight.repeat(g),
                           self.bias.repeat(g), True, self.momentum, self.eps).view(n, c, h, w)
        self.running_mean.data.copy_(mean_split.view(g, c).mean(dim=0))
        self.running_var.data.copy_(var_split.view(g, c).mean(dim=0))
        return out


def demo_split_bn(module: nn.Module, num_splits: int) -> nn.Module:
    """Every `nn.BatchNorm2d` (or moco_hf `SplitBatchNorm2d`) of `module` replaced by a `DemoSplitBatchNorm` (same values)."""
    for name, child in module.named_children():
        if type(child) in (nn.BatchNorm2d, SplitBatchNorm2d):
            setattr(module, name, DemoSplitBatchNorm(child, num_splits))
        else:
            demo_split_bn(child, num_splits)
    return module


class OfficialStyleMoCo(nn.Module):
    """MoCo as written in the official `builder.py`, single process (no DDP, hence no shuffle BN)."""

    def __init__(self, encoder_q: nn.Module, queue_kxc: torch.Tensor, momentum: float, tau: float,
                 shuffle_keys: bool = False):
        super().__init__()
        self.m, self.T, self.shuffle_keys = momentum, tau, shuffle_keys
        self.encoder_q = encoder_q
        self.encoder_k = copy.deepcopy(encoder_q)
        for param_k in self.encoder_k.parameters():
            param_k.requires_grad = False
        self.register_buffer("queue", queue_kxc.T.clone())  # C x K
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update_key_encoder(self):
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data = param_k.data * self.m + param_q.data * (1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        batch_size = keys.shape[0]
        ptr = int(self.queue_ptr)
        assert self.queue.shape[1] % batch_size == 0  # for simplicity (as in the official code)
        self.queue[:, ptr : ptr + batch_size] = keys.T
        self.queue_ptr[0] = (ptr + batch_size) % self.queue.shape[1]

    def forward(self, im_q, im_k):
        q = nn.functional.normalize(self.encoder_q(im_q), dim=1)  # N x C
        with torch.no_grad():
            self._momentum_update_key_encoder()
            if self.shuffle_keys:  # the demo's `_batch_shuffle_single_gpu` and its inverse
                idx_shuffle = torch.randperm(im_k.shape[0], device=im_k.device)
                k = self.encoder_k(im_k[idx_shuffle])[torch.argsort(idx_shuffle)]
            else:
                k = self.encoder_k(im_k)
            k = nn.functional.normalize(k, dim=1)  # N x C
        l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)  # N x 1
        l_neg = torch.einsum("nc,ck->nk", [q, self.queue.clone().detach()])  # N x K
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T  # N x (1+K)
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        self._dequeue_and_enqueue(k)
        return logits, labels


class NaiveMoCoV3(nn.Module):
    """MoCo v3's Algorithm 1 as a straightforward single-process implementation: f_q (backbone + projection head) with
    the prediction head, f_k a frozen copy of f_q updated by a python loop over the parameters, each view through
    each encoder in its own forward; returns (q1, q2, k1, k2) for `naive_ctr` outside the model."""

    def __init__(self, encoder_q: nn.Module, predictor: nn.Module, momentum: float):
        super().__init__()
        self.m = momentum
        self.encoder_q, self.predictor = encoder_q, predictor
        self.encoder_k = copy.deepcopy(encoder_q)
        for param_k in self.encoder_k.parameters():
            param_k.requires_grad = False

    def forward(self, x1, x2):
        q1, q2 = self.predictor(self.encoder_q(x1)), self.predictor(self.encoder_q(x2))  # N x C each
        with torch.no_grad():
            for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
                param_k.data = param_k.data * self.m + param_q.data * (1.0 - self.m)
            k1, k2 = self.encoder_k(x1), self.encoder_k(x2)  # N x C each
        return q1, q2, k1, k2


def naive_ctr(q: torch.Tensor, k: torch.Tensor, tau: float) -> torch.Tensor:
    """ctr(q, k) = 2 tau CrossEntropy(norm(q) norm(k)^T / tau, labels = the diagonal), as the paper writes it."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = torch.einsum("nc,mc->nm", q, k) / tau  # N x N
    labels = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits.float(), labels) * (2 * tau)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--backbone", default="resnet18", help="timm architecture (default: resnet18, CPU-sized)")
    p.add_argument("--backbone-kwargs", type=json.loads, default={},
                   help="extra timm.create_model arguments as JSON, e.g. '{\"num_heads\": 12}'")
    p.add_argument("--v3", action="store_true",
                   help="MoCo v3 (no queue, symmetrised loss, BatchNorm heads, predictor) against a naive Algorithm 1")
    p.add_argument("--mlp-hidden", type=int, default=4096, help="--v3: hidden width of both heads (default: 4096)")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="gradient checkpointing of both implementations' query backbones (timm's)")
    p.add_argument("--batch", type=int, default=32, help="images per step (default: 32)")
    p.add_argument("--image-size", type=int, default=64, help="square input size in pixels (default: 64)")
    p.add_argument("--queue-size", type=int, default=4096, help="K; a multiple of --batch (default: 4096)")
    p.add_argument("--bn-splits", type=int, default=1,
                   help="split BatchNorm over this many chunks of the batch, as the CIFAR-10 demo (default: 1)")
    p.add_argument("--embed-dim", type=int, default=128, help="embedding dimension (default: 128)")
    p.add_argument("--steps", type=int, default=1, help="timed steps per repeat and implementation (default: 1)")
    p.add_argument("--repeats", type=int, default=15, help="interleaved repeats; the median is reported (default: 15)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation first (default: 2)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (GPU)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format (GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoders of both (as pretrain.py does)")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                   help="torch.compile mode with --compile (pretrain.py's compile_mode; reduce-overhead: CUDA graphs)")
    p.add_argument("--baseline-fp32", action="store_true",
                   help="run the official-style baseline as published (fp32, contiguous, eager) while moco_hf uses "
                        "--amp/--channels-last/--compile: the speed-up the project gives over the published code")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark for both implementations (the official code sets it; "
                        "pretrain.py too, `cudnn_benchmark: true`)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: all cores)")
    args = p.parse_args(argv)
    if not args.v3 and args.queue_size % args.batch:
        p.error(f"--queue-size {args.queue_size} must be a multiple of --batch {args.batch} (official enqueue)")
    if args.v3 and args.bn_splits != 1:
        p.error("--v3 normalises over the whole batch: leave --bn-splits at 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or os.cpu_count() or 1)
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    if args.v3:
        config = MoCoConfig.v3(args.backbone, backbone_kwargs=args.backbone_kwargs, embed_dim=args.embed_dim,
                               mlp_hidden_dim=args.mlp_hidden, predictor_hidden_dim=args.mlp_hidden)
    else:
        config = MoCoConfig(
            backbone=args.backbone, backbone_kwargs=args.backbone_kwargs, embed_dim=args.embed_dim,
            queue_size=args.queue_size, momentum=0.999, tau=0.2, bn_splits=args.bn_splits,
        )
    ours = MoCoModel(config).to(device, memory_format=memory_format).train()
    encoder_q = copy.deepcopy(ours.query_encoder)
    if args.bn_splits > 1:  # the demo's split BN in place of moco_hf's (same values)
        encoder_q = demo_split_bn(encoder_q, args.bn_splits)
    if args.v3:
        official = NaiveMoCoV3(encoder_q, copy.deepcopy(ours.predictor), config.momentum)
    else:
        official = OfficialStyleMoCo(encoder_q, ours.queue, config.momentum, config.tau,
                                     shuffle_keys=args.bn_splits > 1)
    if args.grad_checkpointing:
        ours.activation_checkpointing_enable()
        official.encoder_q.backbone.set_grad_checkpointing(True)
    base_format = torch.contiguous_format if args.baseline_fp32 else memory_format
    official = official.to(device, memory_format=base_format).train()
    if args.compile:  # the encoders, as pretrain.py does; the queue logic stays eager in both
        compiled = [ours.query_encoder, ours.key_encoder]
        if not args.baseline_fp32:
            compiled += [official.encoder_q, official.encoder_k]
        for encoder in compiled:
            encoder.compile(mode=args.compile_mode)
    cuda_graphs = args.compile and uses_cuda_graphs(args.compile_mode, device)

    def make_step(model, loss_of, amp=args.amp, fmt=memory_format):
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.03, momentum=0.9, weight_decay=1e-4)

        def step(x1, x2):
            if cuda_graphs:  # as pretrain.py: one step, even where the symmetric loss calls an encoder twice
                torch.compiler.cudagraph_mark_step_begin()
            x1, x2 = x1.contiguous(memory_format=fmt), x2.contiguous(memory_format=fmt)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = loss_of(model(x1, x2))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss

        return step

    baseline = "naive Algorithm 1" if args.v3 else "official-style"
    if args.v3:
        def baseline_loss(out):
            q1, q2, k1, k2 = out
            return naive_ctr(q1, k2, config.tau) + naive_ctr(q2, k1, config.tau)
    else:
        def baseline_loss(out):
            return F.cross_entropy(out[0].float(), out[1])
    steps = {
        "moco_hf MoCoModel": make_step(ours, lambda out: out.loss),
        baseline: make_step(official, baseline_loss, amp=args.amp and not args.baseline_fp32, fmt=base_format),
    }
    g = torch.Generator().manual_seed(0)
    n_batches = 4
    batches = [
        tuple(
            torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g)
            .to(device)
            .contiguous(memory_format=memory_format)
            for _ in range(2)
        )
        for _ in range(n_batches)
    ]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    negatives = "MoCo v3, K=0 (no queue)" if args.v3 else f"K={args.queue_size}"
    print(
        f"device {device} ({where}); "
        f"torch {torch.__version__}; {args.backbone}, batch {args.batch} x {args.image_size}px, {negatives}, "
        f"amp={args.amp}, channels_last={args.channels_last}, compile={args.compile}"
        f"{f' ({args.compile_mode})' if args.compile else ''}, grad_checkpointing={args.grad_checkpointing}, "
        f"bn_splits={args.bn_splits}"
    )
    first_losses, peak = {}, {}
    for name, step in steps.items():  # warm-up; the first step of both starts from identical state
        if device.type == "cuda":
            sync()
            torch.cuda.reset_peak_memory_stats(device)
        for i in range(args.warmup):
            loss = step(*batches[i % n_batches])
            if i == 0:
                first_losses[name] = loss.item()
        sync()
        if device.type == "cuda":
            peak[name] = torch.cuda.max_memory_allocated(device) / 2**30
    sync()
    a, b = first_losses.values()
    differ = " (bn_splits > 1: other chunks and key permutation, so not equal)" if args.bn_splits > 1 else ""
    print(f"first-step losses: {a:.6f} vs {b:.6f} (|diff| {abs(a - b):.2e}){differ}")

    times = {name: [] for name in steps}
    order = list(steps)
    for r in range(args.repeats):
        for name in order if r % 2 == 0 else order[::-1]:
            sync()
            start = time.perf_counter()
            for i in range(args.steps):
                steps[name](*batches[i % n_batches])
            sync()
            times[name].append((time.perf_counter() - start) / args.steps)

    print(f"\n{'implementation':<20} {'median ms/step':>15} {'min ms/step':>12} {'images/s':>10} {'peak GiB':>9}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<20} {1e3 * med:>15.1f} {1e3 * min(ts):>12.1f} {args.batch / med:>10.1f}"
              f" {peak.get(name, float('nan')):>9.2f}")
    ours_t, official_t = times[order[0]], times[order[1]]
    ratio = statistics.median(ours_t) / statistics.median(official_t)
    paired = statistics.median(a / b for a, b in zip(ours_t, official_t))  # neighbours in time share the noise
    print(
        f"\nratio moco_hf / {baseline}: {ratio:.3f} (of medians), {paired:.3f} (median of paired repeats), "
        f"{min(ours_t) / min(official_t):.3f} (of minima)"
    )
    print("target: <= 1.05")


if __name__ == "__main__":
    sys.exit(main())

"""Two gloo processes on CPU against a single-process reference of two-GPU MoCo.

Each rank trains on its half of every global batch and averages gradients with all_reduce (what DDP does). Every
step is checked against one step of a plain single-process reference started from the same state: queries with
per-GPU BatchNorm (the global batch in two chunks), keys with shuffle BN (rank 0's permutation of the global
batch, reproduced from the same seed), the mean of the per-GPU losses, and one enqueue of all keys, rank 0's then
rank 1's. Checking step by step (rather than a whole trajectory) keeps the comparison tight: BatchNorm over 4
images amplifies float rounding by orders of magnitude within a few steps. Everything runs in float64 (TOL).
"""

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from _reference import encode, python_enqueue
from _tolerance import tolerance

from moco_hf import MoCoConfig, MoCoModel

WORLD = 2
LOCAL_BATCH = 4  # global batch 8 does not divide the queue of 20: the third step wraps around
QUEUE = 20
STEPS = 3
LR = 0.1
MOMENTUM = 0.9
TAU = 0.2
# float64 (tests/_tolerance.py): the longest reduction is a BatchNorm over 4 images of 32 x 32 per process; one
# step chains at most 30 layers forward and backward; values below 10.
TOL = tolerance(torch.float64, terms=4 * 32 * 32, depth=2 * 30, scale=10)


def config(shuffle_bn: bool) -> MoCoConfig:
    return MoCoConfig(
        backbone="test_resnet", embed_dim=16, queue_size=QUEUE, momentum=MOMENTUM, tau=TAU, shuffle_bn=shuffle_bn
    )


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return tuple(torch.randn(WORLD * LOCAL_BATCH, 3, 32, 32, generator=g, dtype=torch.float64) for _ in range(2))


def clone_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for shuffle_bn in (False, True):
            torch.manual_seed(0)  # same initial model (and queue) on every rank, as DDP's broadcast would give
            model = MoCoModel(config(shuffle_bn)).double().train()
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.SGD(params, lr=LR)
            mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
            steps = []
            for step in range(STEPS):
                before = clone_state(model)
                x1, x2 = global_batch(step)
                torch.manual_seed(1000 + step)  # rank 0's shuffle permutation is the one broadcast
                out = model(x1[mine], x2[mine])
                optimizer.zero_grad()
                out.loss.backward()
                for p in params:
                    dist.all_reduce(p.grad)
                    p.grad /= WORLD
                optimizer.step()
                after = clone_state(model)
                steps.append({"before": before, "after": after, "loss": out.loss.detach(), "keys": out.key_embeddings})
            torch.save(steps, os.path.join(out_dir, f"{shuffle_bn}_{rank}.pt"))
    finally:
        dist.destroy_process_group()


def reference_step(state: dict[str, torch.Tensor], step: int, shuffle_bn: bool) -> dict:
    """One step of two-GPU MoCo in one process, from a model state, written plainly."""
    model = MoCoModel(config(shuffle_bn)).double()
    model.load_state_dict(state)
    f_q, f_k = copy.deepcopy(model.query_encoder), copy.deepcopy(model.key_encoder)
    with torch.no_grad():  # the paper's update after the previous SGD step; MoCoModel defers it to this step
        for p_k, p_q in zip(f_k.parameters(), f_q.parameters()):
            p_k.data = p_k.data * MOMENTUM + p_q.data * (1 - MOMENTUM)
    queue, ptr = model.queue.T.clone(), int(model.queue_ptr)  # C x K

    x1, x2 = global_batch(step)
    q = encode(f_q, x1, splits=WORLD)  # 8 x C, BN per GPU
    with torch.no_grad():
        if shuffle_bn:
            torch.manual_seed(1000 + step)
            perm = torch.randperm(WORLD * LOCAL_BATCH)
            k = encode(f_k, x2[perm], splits=WORLD)[torch.argsort(perm)]  # 8 x C, BN per GPU on shuffled images
        else:
            k = encode(f_k, x2, splits=WORLD)
    losses = []
    for q_r, k_r in zip(q.chunk(WORLD), k.chunk(WORLD)):
        logits = torch.cat([(q_r * k_r).sum(1, keepdim=True), q_r @ queue], dim=1) / TAU  # 4 x (1+K)
        losses.append(F.cross_entropy(logits, torch.zeros(LOCAL_BATCH, dtype=torch.long)))
    (sum(losses) / WORLD).backward()  # DDP averages the per-GPU gradients
    with torch.no_grad():
        for p in f_q.parameters():
            p -= LR * p.grad
    ptr = python_enqueue(queue, ptr, k)
    return {"losses": losses, "keys": k.chunk(WORLD), "f_q": f_q, "f_k": f_k, "queue": queue.T, "ptr": ptr}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return {
        (shuffle_bn, rank): torch.load(out_dir / f"{shuffle_bn}_{rank}.pt")
        for shuffle_bn in (False, True)
        for rank in range(WORLD)
    }


@pytest.mark.parametrize("shuffle_bn", [False, True])
def test_two_processes_match_single_process_reference(rank_results, shuffle_bn):
    ranks = [rank_results[(shuffle_bn, rank)] for rank in range(WORLD)]
    pointers = []
    for step in range(STEPS):
        after0, after1 = ranks[0][step]["after"], ranks[1][step]["after"]
        # Every rank holds the same queue, pointer and parameters, bit for bit (BN statistics are per rank).
        for name in after0:
            if not ("running_" in name or "num_batches_tracked" in name):
                assert torch.equal(after0[name], after1[name]), name

        # ... equal to one process enqueueing rank 0's keys then rank 1's, after the reference algorithm's step.
        expected = reference_step(ranks[0][step]["before"], step, shuffle_bn)
        for rank in range(WORLD):
            torch.testing.assert_close(ranks[rank][step]["loss"], expected["losses"][rank], **TOL)
            torch.testing.assert_close(ranks[rank][step]["keys"], expected["keys"][rank], **TOL)
        torch.testing.assert_close(after0["queue"], expected["queue"], **TOL)
        assert after0["queue_ptr"].item() == expected["ptr"]
        pointers.append(expected["ptr"])
        for prefix in ("query_encoder.", "key_encoder."):
            encoder = expected["f_q" if prefix == "query_encoder." else "f_k"]
            for name, param in encoder.named_parameters():
                torch.testing.assert_close(after0[prefix + name], param, **TOL, msg=lambda m, n=name: f"{n}: {m}")
    assert pointers == [8, 16, 4]  # wrapped around


def test_shuffle_bn_changes_the_keys(rank_results):
    """Shuffling across processes mixes the BN batches: the keys differ from the unshuffled run's."""
    for rank in range(WORLD):
        plain = rank_results[(False, rank)][0]["keys"]
        shuffled = rank_results[(True, rank)][0]["keys"]
        assert not torch.allclose(plain, shuffled, atol=1e-4)  # far above float64 rounding (TOL)

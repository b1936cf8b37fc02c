"""A deliberately plain MoCo, written from Algorithm 1 of He et al. (2019), to test `MoCoModel` against.

Nothing here is shared with `moco_hf`'s algorithm code: python loops and slicing instead of fused ops, the queue
stored C x K as in the paper's pseudo-code, and the momentum update done *after* the SGD step as in the paper
(`MoCoModel` does it at the start of the next forward, as the official code does).

    f_k.params = f_q.params  # initialize
    for x in loader:
        x_q = aug(x); x_k = aug(x)
        q = f_q.forward(x_q); k = f_k.forward(x_k); k = k.detach()
        l_pos = bmm(q.view(N,1,C), k.view(N,C,1))  # N x 1
        l_neg = mm(q.view(N,C), queue.view(C,K))  # N x K
        logits = cat([l_pos, l_neg], dim=1)  # N x (1+K)
        loss = CrossEntropyLoss(logits/t, labels)  # labels: N zeros
        loss.backward(); update(f_q.params)
        f_k.params = m*f_k.params + (1-m)*f_q.params
        enqueue(queue, k); dequeue(queue)
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn


def encode(encoder: nn.Module, images: torch.Tensor, splits: int = 1) -> torch.Tensor:
    """Normalised embeddings: projection head over the timm model's pooled output.

    `splits` > 1 is split BatchNorm as in the official CIFAR demo: each chunk of the batch runs on its own, from the
    same running statistics, as on one of `splits` GPUs (BatchNorm normalises it with its own statistics and updates
    its own copy of the running ones); then the running statistics become the average of the chunks' copies.
    """
    if splits == 1:
        return F.normalize(encoder.head(encoder.backbone(images)), dim=1)  # N x C
    norms = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    norms = norms if encoder.training else []  # in eval mode BatchNorm uses, and keeps, the running statistics
    start = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
    outputs, copies = [], []
    for chunk in torch.chunk(images, splits):
        for m, (mean, var, count) in zip(norms, start):  # new tensors: autograd keeps the ones the last chunk used
            m.running_mean, m.running_var, m.num_batches_tracked = mean.clone(), var.clone(), count.clone()
        outputs.append(encode(encoder, chunk))
        copies.append([(m.running_mean, m.running_var) for m in norms])
    for i, m in enumerate(norms):  # num_batches_tracked stays as every chunk left it: one more than at the start
        m.running_mean = sum(c[i][0] for c in copies) / len(copies)
        m.running_var = sum(c[i][1] for c in copies) / len(copies)
    return torch.cat(outputs, dim=0)


def plain_copy(encoder: nn.Module) -> nn.Module:
    """A deep copy of `encoder` with each of `moco_hf`'s `SplitBatchNorm2d` (found by name: nothing is imported from
    `moco_hf`) replaced by torch's own `nn.BatchNorm2d` holding the same state, so the reference runs torch's."""
    encoder = copy.deepcopy(encoder)
    for module in list(encoder.modules()):
        for name, child in module.named_children():
            if type(child).__name__ == "SplitBatchNorm2d":
                plain = nn.BatchNorm2d(
                    child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
                )
                like = next(t for t in (child.weight, child.running_mean) if t is not None)
                plain.to(like.device, like.dtype).load_state_dict(child.state_dict())
                setattr(module, name, plain.train(child.training))
    return encoder


def shuffled_keys(key_encoder: nn.Module, images: torch.Tensor, splits: int) -> torch.Tensor:
    """Shuffle BN on one device (official CIFAR demo): permute, encode in chunks, undo the permutation."""
    idx_shuffle = torch.randperm(images.shape[0])
    idx_unshuffle = torch.argsort(idx_shuffle)
    return encode(key_encoder, images[idx_shuffle], splits)[idx_unshuffle]


def python_enqueue(queue: torch.Tensor, ptr: int, keys: torch.Tensor) -> int:
    """Write keys (n x C) as columns of queue (C x K) from ptr on, wrapping around; return the new pointer."""
    K, n = queue.shape[1], keys.shape[0]
    end = ptr + n
    if end <= K:
        queue[:, ptr:end] = keys.T
    else:
        first = K - ptr
        queue[:, ptr:] = keys[:first].T
        queue[:, : n - first] = keys[first:].T
    return end % K


class ReferenceMoCo:
    """Algorithm 1 over deep copies of a model's encoders and queue."""

    def __init__(self, query_encoder, queue_kxc, ptr, momentum, tau, lr, symmetric=False, splits=1, shuffle=False):
        self.f_q = plain_copy(query_encoder)
        self.f_k = plain_copy(query_encoder)  # f_k.params = f_q.params
        for p in self.f_k.parameters():
            p.requires_grad = False
        self.queue = queue_kxc.detach().T.clone()  # C x K, as in the paper
        self.ptr = int(ptr)
        self.m, self.t = momentum, tau
        self.symmetric, self.splits, self.shuffle = symmetric, splits, shuffle
        self.optimizer = sgd(self.f_q.parameters(), lr)

    def keys(self, x_k):
        with torch.no_grad():
            if self.shuffle and self.splits > 1:
                return shuffled_keys(self.f_k, x_k, self.splits)
            return encode(self.f_k, x_k, self.splits)

    def contrastive_loss(self, x_q, x_k):
        q = encode(self.f_q, x_q, self.splits)  # N x C
        k = self.keys(x_k).detach()  # N x C
        N, C = q.shape
        K = self.queue.shape[1]
        l_pos = torch.bmm(q.view(N, 1, C), k.view(N, C, 1)).view(N, 1)  # N x 1
        l_neg = torch.mm(q.view(N, C), self.queue.view(C, K))  # N x K
        logits = torch.cat([l_pos, l_neg], dim=1) / self.t  # N x (1+K)
        labels = torch.zeros(N, dtype=torch.long)
        return nn.CrossEntropyLoss()(logits, labels), k

    def step(self, x1, x2):
        """One iteration; returns (loss, keys enqueued)."""
        if self.symmetric:
            loss_12, k2 = self.contrastive_loss(x1, x2)
            loss_21, k1 = self.contrastive_loss(x2, x1)
            loss, k = loss_12 + loss_21, torch.cat([k1, k2], dim=0)
        else:
            loss, k = self.contrastive_loss(x1, x2)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            for param_k, param_q in zip(self.f_k.parameters(), self.f_q.parameters()):
                param_k.data = param_k.data * self.m + param_q.data * (1.0 - self.m)
        self.ptr = python_enqueue(self.queue, self.ptr, k)
        return loss.detach(), k


def sgd(params, lr):
    """The optimiser both implementations use (the paper's: SGD with momentum 0.9 and weight decay)."""
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)

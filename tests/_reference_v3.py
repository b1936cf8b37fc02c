"""A deliberately plain MoCo v3, written from Algorithm 1 of Chen, Xie and He (2021), to test `MoCoModel` against.

Nothing here comes from `moco_hf`: the heads are built here from the paper's description (and the layout of the
released models: no biases in the heads' linear layers, a BatchNorm without affine parameters after the projection
head, and after the prediction head of the ViTs), the position embedding from its formula, the loss as printed in
the paper; plain python loops for the momentum update, done *after* the SGD step as in the paper (`MoCoModel` does
it at the start of the next forward, as the released code does).

    # f_q: encoder: backbone + proj mlp + pred mlp
    # f_k: momentum encoder: backbone + proj mlp
    for x in loader:  # load a minibatch x with N samples
        x1, x2 = aug(x), aug(x)  # augmentation
        q1, q2 = f_q(x1), f_q(x2)  # queries: [N, C] each
        k1, k2 = f_k(x1), f_k(x2)  # keys: [N, C] each
        loss = ctr(q1, k2) + ctr(q2, k1)  # symmetrized
        loss.backward()
        update(f_q)  # optimizer update: f_q
        f_k = m*f_k + (1-m)*f_q  # momentum update: f_k

    def ctr(q, k):
        logits = mm(q, k.t())  # [N, N] pairs
        labels = range(N)  # positives are in diagonal
        loss = CrossEntropyLoss(logits/tau, labels)
        return 2 * tau * loss

q and k are L2-normalised before `mm` (cosine similarities, as in MoCo v1/v2 and the released code).
"""

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn


def mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool) -> nn.Sequential:
    """"The hidden layers of both MLPs are 4096-d and are with ReLU; the output layers of both MLPs are 256-d,
    without ReLU. In MoCo v3, all layers in both MLPs have BN": Linear (no bias) + BN + ReLU per hidden layer, then
    the output Linear (no bias) and, with `last_bn`, a BN without scale and shift."""
    layers = []
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    for i in range(num_layers):
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=False))
        if i < num_layers - 1:
            layers.append(nn.BatchNorm1d(dims[i + 1]))
            layers.append(nn.ReLU())
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


def sincos_2d(grid_h: int, grid_w: int, dim: int) -> torch.Tensor:
    """The fixed 2-D sin-cos position embedding, from its formula: for the patch at row y, column x,
    [sin(y w_i), cos(y w_i), sin(x w_i), cos(x w_i)], w_i = 1 / 10000^(i / (dim / 4)), i = 0 .. dim/4 - 1.
    Returns (grid_h * grid_w) x dim, the patches in row-major order."""
    quarter = dim // 4
    rows = []
    for y in range(grid_h):
        for x in range(grid_w):
            w = [1.0 / 10000 ** (i / quarter) for i in range(quarter)]
            rows.append([math.sin(y * f) for f in w] + [math.cos(y * f) for f in w]
                        + [math.sin(x * f) for f in w] + [math.cos(x * f) for f in w])
    return torch.tensor(rows, dtype=torch.float64)


class Encoder(nn.Module):
    """backbone + projection MLP (+ prediction MLP for f_q)."""

    def __init__(self, backbone: nn.Module, projector: nn.Module, predictor: nn.Module | None = None):
        super().__init__()
        self.backbone, self.projector, self.predictor = backbone, projector, predictor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.projector(self.backbone(x))  # the timm backbone returns pooled features
        return z if self.predictor is None else self.predictor(z)


def ctr(q: torch.Tensor, k: torch.Tensor, tau: float, offset: int = 0) -> torch.Tensor:
    """The paper's contrastive loss on normalised q (N x C) and k (M x C): positives at column offset + i."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = torch.mm(q, k.t())  # [N, M] pairs
    labels = torch.arange(q.shape[0]) + offset  # positives are in the diagonal (of this process's block)
    return 2 * tau * nn.CrossEntropyLoss()(logits / tau, labels)


class ReferenceMoCoV3:
    """Algorithm 1 over copies of a model's weights, loaded into the modules built here (strictly: any difference
    in the heads' layout is an error)."""

    def __init__(self, backbone: nn.Module, projector_state: dict, predictor_state: dict, *, num_proj_layers: int,
                 in_dim: int, hidden_dim: int, out_dim: int, predictor_last_bn: bool, tau: float, lr: float,
                 symmetric: bool = True, freeze_patch_embed: bool = False, fixed_pos_embed: bool = False):
        dtype = next(backbone.parameters()).dtype
        projector = mlp(num_proj_layers, in_dim, hidden_dim, out_dim, last_bn=True).to(dtype)
        predictor = mlp(2, out_dim, hidden_dim, out_dim, last_bn=predictor_last_bn).to(dtype)
        projector.load_state_dict(projector_state)
        predictor.load_state_dict(predictor_state)
        self.f_q = Encoder(copy.deepcopy(backbone), projector, predictor)
        self.f_k = Encoder(copy.deepcopy(backbone), copy.deepcopy(projector))  # f_k.params = f_q.params, no pred
        for p in self.f_k.parameters():
            p.requires_grad = False
        frozen = []
        if freeze_patch_embed:  # the patch projection stays at its random initialisation
            frozen += list(self.f_q.backbone.patch_embed.proj.parameters())
        if fixed_pos_embed:  # "2-d sin-cos position embedding", fixed
            frozen.append(self.f_q.backbone.pos_embed)
        for p in frozen:
            p.requires_grad = False
        self.tau, self.symmetric = tau, symmetric
        self.optimizer = torch.optim.SGD([p for p in self.f_q.parameters() if p.requires_grad], lr=lr, momentum=0.9,
                                         weight_decay=1e-4)

    def step(self, x1: torch.Tensor, x2: torch.Tensor, m: float) -> torch.Tensor:
        """One iteration of Algorithm 1 with momentum m; returns the loss."""
        if self.symmetric:
            q1, q2 = self.f_q(x1), self.f_q(x2)  # queries: [N, C] each
            with torch.no_grad():
                k1, k2 = self.f_k(x1), self.f_k(x2)  # keys: [N, C] each
            loss = ctr(q1, k2, self.tau) + ctr(q2, k1, self.tau)  # symmetrized
        else:
            q1 = self.f_q(x1)
            with torch.no_grad():
                k2 = self.f_k(x2)
            loss = ctr(q1, k2, self.tau)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()  # update(f_q)
        with torch.no_grad():  # f_k = m*f_k + (1-m)*f_q, over the backbone and the projection head
            for name in ("backbone", "projector"):
                for p_k, p_q in zip(getattr(self.f_k, name).parameters(), getattr(self.f_q, name).parameters()):
                    p_k.data = p_k.data * m + p_q.data * (1.0 - m)
        return loss.detach()


def cosine_momentum(step: int, total: int, base: float) -> float:
    """The key encoder's momentum rising from `base` (0.99) to 1 on a half-cycle cosine, as in BYOL:
    m = 1 - (1 - base) * (1 + cos(pi * step / total)) / 2."""
    return 1.0 - (1.0 - base) * (1.0 + math.cos(math.pi * step / total)) / 2.0

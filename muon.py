"""
Muon: momentum, orthogonalised, for the weight matrices of the blocks; AdamW keeps the rest.

For a weight matrix W (out, in) with gradient g, momentum mu and learning rate lr:
    B <- mu B + g                       (momentum buffer)
    O  = orthogonalise(g + mu B)        (Nesterov; about U V^T of its SVD U S V^T)
    W <- W (1 - lr wd) - lr * 0.2 sqrt(max(out, in)) * O
The factor 0.2 sqrt(max(out, in)) gives O the root-mean-square of a typical AdamW update, so AdamW's
learning rate and weight decay carry over.
"""
import math

import torch

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz, steep at 0: singular values land in about [0.7, 1.2]


def orthogonalise(G, steps=5):
    """About U V^T for each matrix of G (..., m, n) = U S V^T: from X = G / ||G||_F (all singular values
    in (0, 1]), steps of X <- a X + (b X X^T + c (X X^T)^2) X push every singular value towards 1."""
    a, b, c = NS_COEFFS
    tall = G.size(-2) > G.size(-1)
    X = G.mT if tall else G  # (..., short, long): X X^T is the small Gram matrix
    X = (X / X.float().norm(dim=(-2, -1), keepdim=True).clamp(min=1e-7)).bfloat16()
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return (X.mT if tall else X).float()


class Muon(torch.optim.Optimizer):
    """Muon on 2-D weights. Matrices of one shape are orthogonalised together, in one batched product."""

    def __init__(self, params, lr, weight_decay, momentum=0.95):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
            by_shape = {}
            for p in group["params"]:
                by_shape.setdefault(tuple(p.shape), []).append(p)
            for shape, ps in by_shape.items():
                bufs = [self.state[p].setdefault("momentum", torch.zeros_like(p)) for p in ps]
                grads = [p.grad for p in ps]
                torch._foreach_mul_(bufs, mu)
                torch._foreach_add_(bufs, grads)
                O = orthogonalise(torch.stack(torch._foreach_add(grads, bufs, alpha=mu)))  # (n, out, in)
                torch._foreach_mul_(ps, 1 - lr * wd)
                torch._foreach_add_(ps, list(O.unbind(0)), alpha=-lr * 0.2 * math.sqrt(max(shape)))


class Optimisers:
    """Several optimisers that step, schedule and save as one."""

    def __init__(self, *opts):
        self.opts = opts

    @property
    def param_groups(self):
        return [g for o in self.opts for g in o.param_groups]

    def step(self):
        for o in self.opts:
            o.step()

    def state_dict(self):
        return [o.state_dict() for o in self.opts]

    def load_state_dict(self, states):
        for o, s in zip(self.opts, states):
            o.load_state_dict(s)

"""
Infinite Self-Attention (InfSA): attention as diffusion on a graph of tokens. Read top to bottom.

One attention layer moves information one step along a graph whose nodes are tokens and whose
edge weights are query-key affinities A_hat. Pure-InfSA sums K such steps with a discount gamma,

    Y = sum_{t=1..K} gamma^t A_hat^t V   ->   ((I - gamma A_hat)^-1 - I) V   as K -> inf,

a Neumann series whose limit holds the resolvent (I - gamma A_hat)^-1 of Katz centrality and
(for sub-stochastic rows) of absorbing Markov chains. The sum starts at t = 1; the residual
stream x + Attn(x) carries each token's own state, like the t = 0 term by analogy only (that
term would add W_o v_i; the residual adds x_i). Linear-InfSA trades the N x N graph for one
pooled query. Tensors are (..., N, d_h).
"""
import math
from collections import namedtuple

import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Pure-InfSA: the affinity graph and the Neumann series on it


def relu_scores(q, k):
    """S = ReLU(q k^T / sqrt(d_h)): non-negative edge weights, (..., N, N)."""
    return F.relu(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]))


def frobenius_norm(S):
    """||S||_F = sqrt(sum_ij S_ij^2) over the last two dims, in fp32 at least: (..., 1, 1)."""
    return torch.linalg.vector_norm(S, dim=(-2, -1), keepdim=True, dtype=_sum_dtype(S))


def affinity(q, k, eps=1e-6):
    """A_hat = S / (||S||_F + eps),  S = relu_scores(q, k).

    Normalised over the whole matrix, not per row (row sums vary): A_hat >= 0, ||A_hat||_F < 1
    (1 up to eps; A_hat = 0 if no affinity is > 0), so its spectral norm and radius are < 1.
    Invariant to positive rescaling of q or k (up to eps)."""
    _check_qkv(q, k)
    S = relu_scores(q, k)
    return (S / (frobenius_norm(S) + eps)).to(S.dtype)


def neumann_series(A, x, gamma, hops):
    """Y = sum_{t=1..hops} gamma^t A^t x by repeated products, A^t never formed:
    z_0 = x, z_t = gamma A z_{t-1}, Y = sum_t z_t.

    A (..., N, N), x (..., N, d); gamma in (0, 1), a float or a tensor broadcastable against x,
    e.g. (H, 1, 1): one per head."""
    _check_gamma(gamma)
    _check_hops(hops)
    gamma = _gamma_in_dtype_of(gamma, x)
    z, y = x, 0
    for _ in range(hops):
        z = gamma * (A @ z)
        y = y + z
    return y


def neumann_closed_form(A, x, gamma):
    """Y_inf = ((I - gamma A)^-1 - I) x, the hops -> inf limit, by a linear solve."""
    _check_gamma(gamma)
    I = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    return torch.linalg.solve(I - gamma * A, x) - x


def truncation_bound(x, gamma, hops):
    """||Y_inf - Y_K||_2 <= gamma^(K+1) / (1 - gamma) ||x||_2 (K = hops) whenever ||A||_2 <= 1,
    as for A_hat: the tail is sum_{t>K} gamma^t A^t x and ||A^t x|| <= ||A||^t ||x||. Attained
    when A x = x (e.g. A = 1 1^T / N, equal rows of x). ||.||_2: spectral norm per (N, d) block."""
    _check_gamma(gamma)
    _check_hops(hops)
    return gamma ** (hops + 1) / (1 - gamma) * torch.linalg.matrix_norm(x, ord=2, keepdim=True)


def pure_infsa(q, k, v, gamma, hops=3, eps=1e-6):
    """Pure-InfSA: Y = sum_{t=1..hops} gamma^t A_hat^t v,  A_hat = affinity(q, k), formed once
    (N x N); relu_hop.pure_infsa_fused computes the same without it."""
    _check_qkv(q, k, v)
    return neumann_series(affinity(q, k, eps), v, gamma, hops)

# -----------------------------------------------------------------------------
# The same operator read as graph centrality and as a Markov chain
# (A any non-negative (..., N, N) matrix; A_ij = how much token i attends to token j)


def katz_centrality(A, gamma, direction="in"):
    """Katz centrality c = ((I - gamma A^T)^-1 - I) 1 = sum_{t>=1} gamma^t (A^T)^t 1.

    direction='in': how much each token is attended, directly or through chains; 'out' (A for
    A^T): how much it attends. Needs gamma < 1 / rho(A): any gamma in (0, 1) for A_hat."""
    if direction not in ("in", "out"):
        raise ValueError(f"direction must be 'in' or 'out'; got {direction!r}")
    if not isinstance(gamma, torch.Tensor) and gamma <= 0:
        raise ValueError(f"gamma must be > 0 (and < 1 / rho(A)); got {gamma}")
    M = A.transpose(-2, -1) if direction == "in" else A
    one = torch.ones(*A.shape[:-1], 1, dtype=A.dtype, device=A.device)  # (..., N, 1)
    I = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    return (torch.linalg.solve(I - gamma * M, one) - one).squeeze(-1)


def eigenvector_centrality(A, iters=200, eps=1e-12):
    """Principal left eigenvector of A (the Perron vector, c >= 0, sum 1): c proportional to
    A^T c, by power iteration c <- A^T c / ||A^T c||_1 from c = 1/N. Converges geometrically
    when A is irreducible and aperiodic (e.g. A > 0)."""
    c = torch.full(A.shape[:-1], 1.0 / A.shape[-1], dtype=A.dtype, device=A.device)  # (..., N)
    for _ in range(iters):
        c = (c.unsqueeze(-2) @ A).squeeze(-2)  # (A^T c)_j = sum_i c_i A_ij
        c = c / (c.sum(-1, keepdim=True) + eps)
    return c


def pagerank(A, alpha=0.85, iters=100):
    """PageRank: the stationary vector pi = pi G of G = alpha P + (1 - alpha) 1 1^T / N,
    P = A row-normalised (a row with no weight jumps uniformly). Power iteration
    pi <- alpha pi P + (1 - alpha) / N; pi >= 0 and sums to 1."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1) (the follow-a-link probability); got {alpha}")
    N = A.shape[-1]
    rows = A.sum(-1, keepdim=True)
    P = torch.where(rows > 0, A / rows.clamp_min(1e-30), 1.0 / N)
    pi = torch.full(A.shape[:-1], 1.0 / N, dtype=A.dtype, device=A.device)  # (..., N)
    for _ in range(iters):
        pi = alpha * (pi.unsqueeze(-2) @ P).squeeze(-2) + (1 - alpha) / N
    return pi


Chain = namedtuple("Chain", "M R fundamental valid")


def absorbing_chain(A, gamma):
    """gamma A as an absorbing Markov chain: Chain(M, R, F, valid).

    M = gamma A (transient -> transient), absorption R_i = 1 - sum_j M_ij, fundamental matrix
    F = (I - M)^-1 = sum_{t>=0} M^t: F_ij is the expected number of visits to j of a walk from i
    before it is absorbed; (F - I) 1 is the out-Katz score, 1^T (F - I) the in-Katz. The reading
    needs M sub-stochastic (every R_i >= 0), which Frobenius normalisation does not guarantee
    (rows of A_hat can sum above 1): `valid` says whether it holds."""
    _check_gamma(gamma)
    M = gamma * A
    R = 1 - M.sum(-1)
    I = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    valid = bool((A >= 0).all() and (R >= -1e-12).all())
    return Chain(M, R, torch.linalg.inv(I - M), valid)


def random_walk_visits(M, walks=20000, max_steps=1000, generator=None):
    """Monte-Carlo F = (I - M)^-1 of a valid chain, (N, N), inverting nothing: `walks` walks from
    each start i count a visit to the current state, then move to j with probability M_ij or stop
    with probability R_i. F_ij = mean visits to j."""
    N = M.shape[-1]
    R = 1 - M.sum(-1)
    if (M < 0).any() or (R < -1e-12).any():
        raise ValueError("M must be a valid sub-stochastic chain (M >= 0, row sums <= 1); "
                         "check absorbing_chain(...).valid first")
    T = torch.cat([M, R.clamp_min(0).unsqueeze(-1)], dim=-1).double()  # (N, N + 1): N = absorbed
    state = torch.arange(N).repeat_interleave(walks)  # (N * walks,)
    start = state.clone()
    visits = torch.zeros(N, N, dtype=torch.float64)
    for _ in range(max_steps):
        alive = state < N
        if not alive.any():
            break
        s, s0 = state[alive], start[alive]
        visits.index_put_((s0, s), torch.ones(len(s), dtype=torch.float64), accumulate=True)
        state[alive] = torch.multinomial(T[s], 1, generator=generator).squeeze(-1)
    return visits / walks

# -----------------------------------------------------------------------------
# Linear-InfSA: one pooled score vector instead of an N x N matrix


def query_energy(q, eps=1e-6):
    """w_t = ||q_t|| / sum_s ||q_s||: each token's share of the query energy, (..., N)."""
    n = torch.linalg.vector_norm(q, dim=-1, dtype=_sum_dtype(q))
    return n / (n.sum(-1, keepdim=True) + eps)


def linear_infsa_scores(q, k, eps=1e-6):
    """a_j = ReLU(k_j . qbar) / (sum_l ReLU(k_l . qbar) + eps),  qbar = sum_t w_t q_t,  (..., N).

    As qbar . k_j = sum_t w_t (q k^T)_tj, the scores are one power-iteration step on S = q k^T
    from the query energies w, *followed by* a ReLU: not a power step on ReLU(q k^T). The two
    differ on random q, k (cosine about 0.7) and agree (about 1) when queries and keys share a
    direction, as after training. Sums over tokens run in fp32 at least."""
    _check_qkv(q, k)
    w = query_energy(q, eps)  # (..., N)
    qbar = (w.to(q.dtype).unsqueeze(-1) * q).sum(-2, dtype=_sum_dtype(q))  # sum_t w_t q_t: d_h
    s = F.relu((k * qbar.to(k.dtype).unsqueeze(-2)).sum(-1, dtype=_sum_dtype(k)))  # k_j . qbar
    return s / (s.sum(-1, keepdim=True) + eps)


def linear_infsa(q, k, v, gamma, eps=1e-6, expand=True):
    """Linear-InfSA: o_i = gamma context for every token i,  context = sum_j a_j v_j,
    a = linear_infsa_scores.

    Were A_hat rank one, lam 1 a^T (every token attends like a, a summing to 1), A_hat^t would be
    lam^t 1 a^T and the Neumann series gamma lam / (1 - gamma lam) 1 context^T. This returns
    gamma context, one hop of 1 a^T, not that limit: gamma is a scale here, not a discount over
    hops. The output is the same vector for every token; tokens differ only through their
    residual stream. Time O(N d_h), memory N scores a head, never N x N. expand=False returns the
    vector once, (..., 1, d_v)."""
    _check_qkv(q, k, v)
    _check_gamma(gamma)
    a = linear_infsa_scores(q, k, eps)  # (..., N)
    context = (a.to(v.dtype).unsqueeze(-1) * v).sum(-2, keepdim=True, dtype=_sum_dtype(v))
    o = _gamma_in_dtype_of(gamma, v) * context.to(v.dtype)  # (..., 1, d_v)
    return o.expand(v.shape) if expand else o

# -----------------------------------------------------------------------------
# Softmax attention: the baseline


def softmax_attention(q, k, v):
    """softmax(q k^T / sqrt(d_h)) v by PyTorch's fused SDPA kernel (on GPUs never N x N)."""
    _check_qkv(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def softmax_weights(q, k):
    """P = softmax(q k^T / sqrt(d_h)), rows summing to 1: the attention map, (..., N, N)."""
    _check_qkv(q, k)
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)


def softmax_attention_materialized(q, k, v):
    """(P v, P), P = softmax_weights(q, k) formed: the unfused baseline, O(N^2) memory."""
    _check_qkv(q, k, v)
    P = softmax_weights(q, k)
    return P @ v, P

# -----------------------------------------------------------------------------
# argument checks (one error line naming the problem) and dtype rules


def _check_qkv(q, k, v=None):
    """q, k (..., N, d_h), v (..., N, d_v) with the same leading dims (matmul would broadcast)."""
    ok = q.dim() >= 2 and q.shape[:-2] == k.shape[:-2] and q.shape[-1] == k.shape[-1]
    if not ok or (v is not None and v.shape[:-1] != k.shape[:-1]):
        shapes = [tuple(t.shape) for t in (q, k, v) if t is not None]
        raise ValueError(f"q, k, v must be (..., N, d_h), (..., N, d_h), (..., N, d_v) with the "
                         f"same leading dims; got {shapes}")


def _check_gamma(gamma):
    """A tensor (the model's sigmoid, in (0, 1)) is not read: that would sync a GPU every call."""
    if not isinstance(gamma, torch.Tensor) and not 0.0 < gamma < 1.0:
        raise ValueError(f"gamma must lie in (0, 1) for the Neumann series to converge; "
                         f"got {gamma}")


def _check_hops(hops):
    if not isinstance(hops, int) or hops < 1:
        raise ValueError(f"hops must be an integer >= 1 (the number of Neumann terms); "
                         f"got {hops!r}")


def _gamma_in_dtype_of(gamma, x):
    """A tensor gamma (the model's fp32 sigmoid) cast to x's dtype: bf16 stays bf16."""
    return gamma.to(x.dtype) if isinstance(gamma, torch.Tensor) else gamma


def _sum_dtype(x):
    """Sums over tokens run in fp32, or in fp64 for fp64 data."""
    return torch.promote_types(x.dtype, torch.float32)

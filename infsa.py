"""
Infinite Self-Attention (InfSA): attention as diffusion on a graph of tokens.

One attention layer moves information one step along a graph whose nodes are
tokens and whose edge weights are query-key affinities. Pure-InfSA sums many
such steps with a discount gamma,

    Y = sum_{t=1..K} gamma^t A^t V   ->   ((I - gamma A)^-1 - I) V   as K -> inf,

a Neumann series whose limit is the resolvent of the graph: the same object as
Katz centrality and as the fundamental matrix of an absorbing Markov chain.
Linear-InfSA keeps only the dominant direction of that operator: one pooled
score vector a over the tokens, so the state per head is O(d_h), whatever N is.

Every function takes tensors shaped (..., N, d_h) (any leading batch / head
dims) and states its formula in its docstring. Reading order: affinity ->
neumann_series -> neumann_closed_form -> pure_infsa -> the centrality and
Markov views -> linear_infsa -> softmax baselines -> toy_graph.
"""
import math
from collections import namedtuple

import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# argument checks (one clear line each)


def _check_qkv(q, k, v=None):
    if q.dim() < 2 or q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"k must be (..., N, d_h) with the leading dims and d_h of q; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if v is not None and (v.shape[:-1] != k.shape[:-1]):
        raise ValueError(f"v must be (..., N, d_v) with the same leading dims and N as k; "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")


def _check_gamma(gamma):
    """gamma must lie in (0, 1). Python numbers are always checked; constant tensors only on the
    CPU (checking a CUDA tensor would synchronise the GPU on every call). A trained gamma,
    sigmoid(logit), is in (0, 1) by construction and is not checked."""
    if isinstance(gamma, torch.Tensor):
        if gamma.device.type == "cpu" and not gamma.requires_grad and not torch.compiler.is_compiling():
            bad = (gamma <= 0) | (gamma >= 1)
            if bool(bad.any()):
                raise ValueError("gamma must lie in (0, 1) for the Neumann series to converge; "
                                 f"got values in [{gamma.min().item():.4g}, {gamma.max().item():.4g}]")
    elif not 0.0 < float(gamma) < 1.0:
        raise ValueError(f"gamma must lie in (0, 1) for the Neumann series to converge; got {gamma}")


def _check_hops(hops):
    if not isinstance(hops, int) or hops < 1:
        raise ValueError(f"hops must be an integer >= 1 (the number of Neumann terms); got {hops!r}")


def _acc(x):
    """x in an accumulation dtype of at least fp32 (fp16 / bf16 -> fp32; fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _square(A):
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"A must be (..., N, N); got {tuple(A.shape)}")

# -----------------------------------------------------------------------------
# Pure-InfSA: the affinity graph and the Neumann series on it


def relu_scores(q, k):
    """S = ReLU(q k^T / sqrt(d_h)): non-negative edge weights, (..., N, N)."""
    return F.relu(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]))


def frobenius_norm(S):
    """||S||_F = sqrt(sum_ij S_ij^2) over the last two dims, accumulated in fp32, (..., 1, 1)."""
    return torch.linalg.vector_norm(S, dim=(-2, -1), keepdim=True, dtype=torch.promote_types(S.dtype, torch.float32))


def affinity(q, k, eps=1e-6):
    """A_hat = S / (||S||_F + eps),  S = ReLU(q k^T / sqrt(d_h)).

    Normalised over the whole N x N matrix, not per row: A_hat >= 0, ||A_hat||_F = 1
    (or A_hat = 0 when every affinity is <= 0), so its spectral radius is <= 1. Row sums
    vary, unlike softmax. Invariant to positive rescaling of q or k (up to eps).
    The norm is accumulated in fp32 and the scaling is done in fp32."""
    _check_qkv(q, k)
    S = relu_scores(q, k)
    inv = 1.0 / (frobenius_norm(S) + eps)  # (..., 1, 1), >= fp32
    if S.requires_grad:
        return (S * inv).to(S.dtype)  # autograd needs S as it is
    return S.mul_(inv)  # no gradient: scale in place, one N x N buffer in S's own dtype


def neumann_series(A, x, gamma, hops):
    """Y = sum_{t=1..hops} gamma^t A^t x, by repeated products:
    z_0 = x, z_t = gamma A z_{t-1}, Y = sum_t z_t.  A^t is never formed.

    A: (..., N, N); x: (..., N, d); gamma: a float in (0, 1) or a tensor broadcastable
    against x, e.g. (H, 1, 1) for one gamma per head."""
    _square(A)
    _check_gamma(gamma)
    _check_hops(hops)
    if x.shape[-2] != A.shape[-1]:
        raise ValueError(f"x must be (..., N, d) with N = {A.shape[-1]} to match A; got {tuple(x.shape)}")
    z, y = x, None
    for _ in range(hops):
        z = gamma * (A @ z)
        y = z if y is None else y + z
    return y


def neumann_closed_form(A, x, gamma):
    """Y_inf = ((I - gamma A)^-1 - I) x, by a linear solve (for teaching and tests)."""
    _square(A)
    _check_gamma(gamma)
    I = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    return torch.linalg.solve(I - gamma * A, x) - x


def truncation_bound(gamma, hops):
    """||Y_inf - Y_K|| <= gamma^(K+1) / (1 - gamma) * ||x||  when ||A||_2 <= 1 (true for A_hat).

    The tail sum_{t>K} gamma^t ||A||_2^t ||x||: a certificate for cutting the series at K."""
    _check_gamma(gamma)
    _check_hops(hops)
    return gamma ** (hops + 1) / (1 - gamma)


def pure_infsa(q, k, v, gamma, hops=3, chunk=None, eps=1e-6):
    """Pure-InfSA head output: Y = sum_{t=1..hops} gamma^t A_hat^t v, A_hat = affinity(q, k).

    chunk=None builds A_hat (N x N) once. chunk=C never holds more than C rows of it:
    a first pass accumulates ||S||_F over row blocks, then every hop recomputes
    A_hat[rows] @ z block by block, so peak memory is O(N C) instead of O(N^2),
    at the price of recomputing S once per hop."""
    _check_qkv(q, k, v)
    if chunk is None or chunk >= q.shape[-2]:
        return neumann_series(affinity(q, k, eps), v, gamma, hops)
    _check_gamma(gamma)
    _check_hops(hops)
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer (rows of A_hat per block); got {chunk!r}")
    blocks = q.split(chunk, dim=-2)  # each (..., C, d_h)
    sq = sum(frobenius_norm(relu_scores(qb, k)).square() for qb in blocks)
    inv = 1.0 / (sq.sqrt() + eps)  # (..., 1, 1), >= fp32
    z, y = v, None
    for _ in range(hops):
        Az = torch.cat([_acc(relu_scores(qb, k) @ z) for qb in blocks], dim=-2)  # (..., N, d)
        z = gamma * (Az * inv).to(v.dtype)
        y = z if y is None else y + z
    return y

# -----------------------------------------------------------------------------
# The same operator read as graph centrality and as a Markov chain
# (A any non-negative (..., N, N) matrix; A_ij = how much token i attends to token j)


def katz_centrality(A, gamma, direction="in"):
    """Katz centrality c = ((I - gamma A^T)^-1 - I) 1 = sum_{t>=1} gamma^t (A^T)^t 1.

    direction='in': how much each token is attended, directly or through chains.
    direction='out' uses A instead of A^T: how much each token attends. Needs
    gamma < 1 / rho(A) (any gamma in (0, 1) for A_hat)."""
    _square(A)
    if direction not in ("in", "out"):
        raise ValueError(f"direction must be 'in' or 'out'; got {direction!r}")
    if not isinstance(gamma, torch.Tensor) and gamma <= 0:
        raise ValueError(f"gamma must be > 0 (and < 1 / rho(A)); got {gamma}")
    M = A.transpose(-2, -1) if direction == "in" else A
    one = torch.ones(*A.shape[:-1], 1, dtype=A.dtype, device=A.device)  # (..., N, 1)
    I = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    return (torch.linalg.solve(I - gamma * M, one) - one).squeeze(-1)


def eigenvector_centrality(A, iters=200, eps=1e-12):
    """Principal left eigenvector of A: c proportional to A^T c, by power iteration
    c <- A^T c / ||A^T c||_1 from c = 1/N. Normalised to sum 1 (Perron vector, c >= 0).
    Converges geometrically when A is irreducible and aperiodic (e.g. A > 0)."""
    _square(A)
    c = torch.full(A.shape[:-1], 1.0 / A.shape[-1], dtype=A.dtype, device=A.device)  # (..., N)
    At = A.transpose(-2, -1)
    for _ in range(iters):
        c = (At @ c.unsqueeze(-1)).squeeze(-1)
        c = c / (c.sum(-1, keepdim=True) + eps)
    return c


def pagerank(A, alpha=0.85, iters=100):
    """PageRank: the stationary vector pi = pi G of G = alpha P + (1 - alpha) 1 1^T / N,
    P = A row-normalised (a row with no weight jumps uniformly). Power iteration
    pi <- alpha pi P + (1 - alpha) / N; pi >= 0 and sums to 1."""
    _square(A)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1) (the follow-a-link probability); got {alpha}")
    N = A.shape[-1]
    rows = A.sum(-1, keepdim=True)
    P = torch.where(rows > 0, A / rows.clamp_min(1e-30), torch.full_like(A, 1.0 / N))
    pi = torch.full(A.shape[:-1], 1.0 / N, dtype=A.dtype, device=A.device)  # (..., N)
    for _ in range(iters):
        pi = alpha * (pi.unsqueeze(-2) @ P).squeeze(-2) + (1 - alpha) / N
    return pi


_Chain = namedtuple("Chain", "M R fundamental valid")


def absorbing_chain(A, gamma):
    """Absorbing Markov chain read of gamma A.

    M = gamma A (transient -> transient), absorption R_i = 1 - sum_j M_ij,
    fundamental matrix F = (I - M)^-1 = sum_{t>=0} M^t: F_ij is the expected number of
    visits to j of a walk started at i before it is absorbed; (F - I) 1 is out-Katz.
    valid is True only where every R_i >= 0 (each row of M a sub-distribution);
    Frobenius normalisation does not guarantee it, so the probabilistic reading
    is only offered where valid holds. Returns (M, R, fundamental, valid), a named tuple."""
    _square(A)
    _check_gamma(gamma)
    M = gamma * A
    R = 1 - M.sum(-1)
    I = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    F_ = torch.linalg.inv(I - M)
    valid = bool((A >= 0).all() and (R >= -1e-12).all())
    return _Chain(M, R, F_, valid)


def random_walk_visits(M, walks=20000, max_steps=1000, generator=None):
    """Monte-Carlo estimate of the fundamental matrix F = (I - M)^-1 of a valid chain.

    From each start i run `walks` walks: count the visit to the current state, then move
    to j with probability M_ij or stop with probability R_i = 1 - sum_j M_ij. The mean
    visit counts estimate F_ij (an independent check of the closed form). M: (N, N)."""
    _square(M)
    N = M.shape[-1]
    R = 1 - M.sum(-1)
    if (M < 0).any() or (R < -1e-12).any():
        raise ValueError("M must be a valid sub-stochastic chain (M >= 0, row sums <= 1); "
                         "check absorbing_chain(...).valid first")
    T = torch.cat([M, R.clamp_min(0).unsqueeze(-1)], dim=-1)  # (N, N+1); column N = absorbed
    state = torch.arange(N).repeat_interleave(walks)  # (N * walks,)
    start = state.clone()
    visits = torch.zeros(N, N, dtype=torch.float64)
    for _ in range(max_steps):
        alive = state < N
        if not alive.any():
            break
        s, s0 = state[alive], start[alive]
        visits.index_put_((s0, s), torch.ones(len(s), dtype=torch.float64), accumulate=True)
        state[alive] = torch.multinomial(T[s].double(), 1, generator=generator).squeeze(-1)
    return visits / walks

# -----------------------------------------------------------------------------
# Linear-InfSA: one pooled score vector instead of an N x N matrix


def query_energy(q, eps=1e-6):
    """w_t = ||q_t|| / sum_s ||q_s||: each token's share of the query energy, (..., N), >= fp32."""
    n = _acc(q).norm(dim=-1)
    return n / (n.sum(-1, keepdim=True) + eps)


def linear_infsa_scores(q, k, eps=1e-6):
    """a_j = ReLU(qbar . k_j) / (sum_l ReLU(qbar . k_l) + eps),  qbar = sum_t w_t q_t.

    One power-iteration step toward the principal left eigenvector of ReLU(q k^T),
    started from the query energies w. Cost O(N d_h); nothing N x N is built. (..., N).
    Every sum runs in fp32 (weighted_sum); q and k are never copied to fp32."""
    _check_qkv(q, k)
    w = query_energy(q, eps)  # (..., N), fp32
    qbar = weighted_sum(w, q)  # sum_t w_t q_t: (..., d_h), fp32
    s = F.relu(token_dots(k, qbar))  # qbar . k_j: (..., N), fp32
    return s / (s.sum(-1, keepdim=True) + eps)  # (..., N)


def weighted_sum(w, x, fused=None):
    """sum_t w_t x_t for w (..., T) and x (..., T, d) -> (..., d), accumulated in fp32 (at least).

    fused (default: on a GPU): a product and a sum, which torch.compile fuses into one pass
    over x (as a matrix product it would be a batched matrix-vector product, slow on GPUs);
    otherwise a matrix product, which needs no temporary of x's size."""
    acc = torch.promote_types(x.dtype, torch.float32)
    w = w.to(x.dtype)
    if x.is_cuda if fused is None else fused:
        return (w.unsqueeze(-1) * x).sum(-2, dtype=acc)
    return (w.unsqueeze(-2) @ x).squeeze(-2).to(acc)  # matmuls accumulate in fp32 on bf16 / fp16 inputs


def token_dots(k, qbar, fused=None):
    """qbar . k_j for every token j: k (..., N, d), qbar (..., d) -> (..., N), accumulated in fp32
    (at least); fused (default: on a GPU) as a product and a sum, else a matrix product (see weighted_sum)."""
    acc = torch.promote_types(k.dtype, torch.float32)
    qbar = qbar.to(k.dtype)
    if k.is_cuda if fused is None else fused:
        return (k * qbar.unsqueeze(-2)).sum(-1, dtype=acc)
    return (qbar.unsqueeze(-2) @ k.transpose(-2, -1)).squeeze(-2).to(acc)


def linear_infsa(q, k, v, gamma, eps=1e-6, expand=True):
    """Linear-InfSA: o_i = gamma c for every token i, c = sum_j a_j v_j, a = linear_infsa_scores.

    State per head: qbar and c, both d_h-sized; time O(N d_h). The output is the same
    context vector for every token (rank one): tokens differ only through their
    residual stream. expand=False returns the (..., 1, d_v) context alone, which a
    model can broadcast instead of repeating it N times."""
    _check_qkv(q, k, v)
    _check_gamma(gamma)
    a = linear_infsa_scores(q, k, eps)  # (..., N)
    c = weighted_sum(a, v).unsqueeze(-2).to(v.dtype)  # sum_j a_j v_j: (..., 1, d_v)
    o = gamma * c
    return o.expand(*v.shape) if expand else o

# -----------------------------------------------------------------------------
# Softmax attention: the baseline


def softmax_attention(q, k, v):
    """softmax(q k^T / sqrt(d_h)) v through PyTorch's fused SDPA kernel (never builds N x N
    on GPUs with a flash / memory-efficient kernel)."""
    _check_qkv(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def softmax_attention_materialized(q, k, v):
    """P = softmax(q k^T / sqrt(d_h)) built explicitly, then P v. Returns (P v, P).
    The unfused baseline: O(N^2) memory, used for attention maps and fair benchmarks."""
    _check_qkv(q, k, v)
    P = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    return P @ v, P

# -----------------------------------------------------------------------------
# A toy graph where multi-hop propagation finds what one hop misses


def toy_graph():
    """Five tokens: tokens 1 and 2 attend to token 0, and a chain 0 -> 3 -> 4 leads on.
    A_ij = 1 when token i attends to token j. One hop (in-degree, the column sums)
    ranks token 0 first (2 in-links); Katz in-centrality with gamma = 0.9 ranks token 4
    first (0.9 + 0.81 + 2 * 0.729 = 3.17 > 2.52 for token 3 > 1.8 for token 0), because
    everything that flows into 0 flows on to 3 and then to 4. Token 4 attends to nothing:
    it is where the absorbing walk ends. Returns A, (5, 5) float64."""
    A = torch.zeros(5, 5, dtype=torch.float64)
    for i, j in [(1, 0), (2, 0), (0, 3), (3, 4)]:
        A[i, j] = 1.0
    return A

"""
One Pure-InfSA hop as a fused GPU kernel, and Pure-InfSA built from it: never an N x N matrix.

    S = scale q k^T (scale = 1 / sqrt(d_h)),  o_i = sum_j ReLU(s_ij) z_j,  s2_i = sum_j ReLU(s_ij)^2

A program holds BM queries of one head and streams tiles of BN keys and values past them: per
tile q k^T, a ReLU and ReLU(S) z, summed in fp32. Unlike softmax, ReLU needs no running maximum,
and ReLU(scale r) = scale ReLU(r): scale is applied once, to the sums. The backward recomputes S
tile by tile, in one kernel over key tiles and one over query tiles:

    dS_ij = [s_ij > 0] (dO_i . z_j + 2 ds2_i s_ij),  dq = scale dS k,  dk = scale dS^T q,
    dz = ReLU(S)^T dO
"""
import math
import os
from types import SimpleNamespace

import torch

import infsa

try:
    import triton
    import triton.language as tl
except ImportError:  # pure_infsa_fused refuses; tl.constexpr only annotates arguments
    triton, tl = None, SimpleNamespace(constexpr=None)

# where the kernels can run: a GPU, or Triton's interpreter (TRITON_INTERPRET=1 before this import)
AVAILABLE = triton is not None and (torch.cuda.is_available()
                                    or os.environ.get("TRITON_INTERPRET") == "1")
# (BM queries, BN keys, warps, pipeline stages) per kernel: the fastest tried on an H200, d_h = 16
CONFIG = {"fwd": (128, 64, 4, 3), "bwd_kz": (32, 128, 4, 3), "bwd_q": (128, 64, 4, 3)}


def _jit(fn):
    """triton.jit, not specialised on H and N: each kind of count (1, a multiple of 16, other)
    would compile again."""
    return triton.jit(fn, do_not_specialize=["H", "N"]) if triton is not None else fn


@_jit
def _rows(P, r, cols, stride, N, D):
    """The tile P[r, cols] of an (N, D) matrix of row stride `stride`; entries past N or D read
    as 0, as zero-padding would give."""
    mask = (r[:, None] < N) & (cols[None, :] < D)
    return tl.load(P + r[:, None] * stride + cols[None, :], mask=mask, other=0.0)


@_jit
def _put(P, r, cols, stride, N, D, value):
    """Store value into the tile P[r, cols], skipping entries past N or D."""
    mask = (r[:, None] < N) & (cols[None, :] < D)
    tl.store(P + r[:, None] * stride + cols[None, :], value, mask=mask)


@_jit
def _hop_fwd(Q, K, Z, O, S2, sb, sh, sn, zb, zh, zn, H, N, scale, D: tl.constexpr,
             DVR: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr,
             BN: tl.constexpr, WITH_S2: tl.constexpr, PREC: tl.constexpr):
    """o_i = scale sum_j ReLU(r_ij) z_j and s2_i = scale^2 sum_j ReLU(r_ij)^2, r = q k^T, for BM
    queries of one head."""
    bh = tl.program_id(1).to(tl.int64)  # b H + h; int64: offsets pass 2^31 at 100k's of tokens
    b, h = bh // H, bh % H
    i = tl.program_id(0) * BM + tl.arange(0, BM)  # this tile's queries
    dk, dv = tl.arange(0, DK), tl.arange(0, DV)
    Q, K, Z = Q + b * sb + h * sh, K + b * sb + h * sh, Z + b * zb + h * zh  # q, k share strides
    q = _rows(Q, i, dk, sn, N, D)  # (BM, DK)
    o = tl.zeros((BM, DV), tl.float32)
    s2 = tl.zeros((BM,), tl.float32)
    for start in range(0, N, BN):
        j = start + tl.arange(0, BN)
        k = _rows(K, j, dk, sn, N, D)  # (BN, DK); keys past N are 0, so ReLU drops their scores
        z = _rows(Z, j, dv, zn, N, DVR)  # (BN, DV)
        p = tl.maximum(tl.dot(q, tl.trans(k), input_precision=PREC), 0.0)  # ReLU(q k^T), fp32
        if WITH_S2:  # the norm needs it once, in the first hop
            s2 += tl.sum(p * p, 1)
        o = tl.dot(p.to(z.dtype), z, o, input_precision=PREC)  # o += ReLU(r) z, in fp32
    _put(O + bh * N * DVR, i, dv, DVR, N, DVR, (o * scale).to(O.dtype.element_ty))
    if WITH_S2:
        tl.store(S2 + bh * N + i, s2 * (scale * scale), mask=i < N)


@_jit
def _hop_bwd_kz(Q, K, Z, DO, DS2, DKo, DZo, sb, sh, sn, zb, zh, zn, H, N, scale, D: tl.constexpr,
                DVR: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr,
                BN: tl.constexpr, WITH_S2: tl.constexpr, PREC: tl.constexpr):
    """dk_j = scale sum_i dS_ij q_i and dz_j = sum_i ReLU(s_ij) dO_i for BN keys of one head."""
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    j = tl.program_id(0) * BN + tl.arange(0, BN)  # this tile's keys
    dk, dv = tl.arange(0, DK), tl.arange(0, DV)
    Q, K, Z = Q + b * sb + h * sh, K + b * sb + h * sh, Z + b * zb + h * zh
    DO, DS2 = DO + bh * N * DVR, DS2 + bh * N  # dO and ds2 are contiguous
    k = _rows(K, j, dk, sn, N, D)  # (BN, DK)
    z = _rows(Z, j, dv, zn, N, DVR)  # (BN, DV)
    gk = tl.zeros((BN, DK), tl.float32)
    gz = tl.zeros((BN, DV), tl.float32)
    for start in range(0, N, BM):
        i = start + tl.arange(0, BM)
        q = _rows(Q, i, dk, sn, N, D)  # (BM, DK)
        do = _rows(DO, i, dv, DVR, N, DVR)  # (BM, DV)
        rT = tl.dot(k, tl.trans(q), input_precision=PREC)  # r^T = k q^T, recomputed: (BN, BM)
        gz = tl.dot(tl.maximum(rT, 0.0).to(do.dtype), do, gz, input_precision=PREC)  # ReLU(r)^T dO
        gT = tl.dot(z, tl.trans(do), input_precision=PREC)  # z_j . dO_i: (BN, BM)
        if WITH_S2:  # + 2 ds2_i s_ij, with s = scale r
            gT += (2 * scale * tl.load(DS2 + i, mask=i < N, other=0.0))[None, :] * rT
        gT = tl.where(rT > 0, gT, 0.0)  # ReLU passes the gradient where the score is positive
        gk = tl.dot(gT.to(q.dtype), q, gk, input_precision=PREC)  # dk += dS^T q
    _put(DKo + bh * N * D, j, dk, D, N, D, gk * scale)
    _put(DZo + bh * N * DVR, j, dv, DVR, N, DVR, gz * scale)


@_jit
def _hop_bwd_q(Q, K, Z, DO, DS2, DQo, sb, sh, sn, zb, zh, zn, H, N, scale, D: tl.constexpr,
               DVR: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr,
               BN: tl.constexpr, WITH_S2: tl.constexpr, PREC: tl.constexpr):
    """dq_i = scale sum_j dS_ij k_j for BM queries of one head, over every key tile."""
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    i = tl.program_id(0) * BM + tl.arange(0, BM)
    dk, dv = tl.arange(0, DK), tl.arange(0, DV)
    Q, K, Z = Q + b * sb + h * sh, K + b * sb + h * sh, Z + b * zb + h * zh
    q = _rows(Q, i, dk, sn, N, D)  # (BM, DK)
    do = _rows(DO + bh * N * DVR, i, dv, DVR, N, DVR)  # (BM, DV)
    c = 2 * scale * tl.load(DS2 + bh * N + i, mask=i < N, other=0.0)  # (BM,): 2 ds2_i scale
    gq = tl.zeros((BM, DK), tl.float32)
    for start in range(0, N, BN):
        j = start + tl.arange(0, BN)
        k = _rows(K, j, dk, sn, N, D)  # (BN, DK)
        z = _rows(Z, j, dv, zn, N, DVR)  # (BN, DV)
        r = tl.dot(q, tl.trans(k), input_precision=PREC)  # (BM, BN)
        g = tl.dot(do, tl.trans(z), input_precision=PREC)  # dO_i . z_j
        if WITH_S2:
            g += c[:, None] * r
        g = tl.where(r > 0, g, 0.0)
        gq = tl.dot(g.to(k.dtype), k, gq, input_precision=PREC)  # dq += dS k
    _put(DQo + bh * N * D, i, dk, D, N, D, gq * scale)

# -----------------------------------------------------------------------------
# the custom ops: what torch.compile and autograd see


def _width(d):
    """The kernels' width for a head size d: the next power of two, at least 16 (tl.dot's). The
    extra columns load as 0: exact, they add nothing to q . k."""
    return max(16, 1 << (d - 1).bit_length())


def _launch(kernel, cfg, over, tensors, scale, with_s2):
    """kernel over a grid of (tiles of `over`, "q" or "k"; heads) with CONFIG[cfg]; tensors (q, k,
    z, *rest), (B, H, N, d). Wider heads get fewer rows, so a tile's fp32 sums fit in registers."""
    BM, BN, warps, stages = CONFIG[cfg]
    q, k, z = tensors[:3]
    B, H, N, d = q.shape
    DK, DV = _width(d), _width(z.shape[-1])
    rows = lambda r: max(16, r * 16 // max(DK, DV))  # noqa: E731 (r rows at d = 16)
    BM, BN = (rows(BM), BN) if over == "q" else (BM, rows(BN))
    grid = (triton.cdiv(N, BM if over == "q" else BN), B * H)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"  # ieee: fp32 products exact to fp32
    # wrap_triton lets torch.compile see the kernel; it refuses the interpreter's plain functions
    jit = isinstance(kernel, triton.runtime.JITFunction)
    run = torch.library.wrap_triton(kernel) if jit else kernel
    run[grid](*tensors, *q.stride()[:3], *z.stride()[:3], H, N, scale, D=d, DVR=z.shape[-1], DK=DK,
              DV=DV, BM=BM, BN=BN, WITH_S2=with_s2, PREC=prec, num_warps=warps, num_stages=stages)


def _kernel_layout(q, k, z):
    """q, k, z with unit stride along d, q and k with one set of strides: the model's q, k, v
    (views of one qkv tensor) already are."""
    q, k, z = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, z))
    return (q, k, z) if q.stride() == k.stride() else (q.contiguous(), k.contiguous(), z)


_ops = {}  # filled by ops()


def ops():
    """The custom op infsa::relu_hop with its backward, as a torch.library.triton_op that
    torch.compile traces; registered on first use (it imports torch's compiler)."""
    if _ops:
        return _ops["relu_hop"]

    @torch.library.triton_op("infsa::relu_hop", mutates_args=())
    def relu_hop(q: torch.Tensor, k: torch.Tensor, z: torch.Tensor, scale: float, with_s2: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(o, s2) for q, k (B, H, N, d), z (B, H, N, dv): o = ReLU(scale q k^T) z, summed in fp32,
        in z's dtype (fp16: fp32, as o is not yet normalised and can pass fp16's range); with_s2:
        s2 = the row sums of ReLU(scale q k^T)^2 (B, H, N), fp32 (else 0)."""
        q, k, z = _kernel_layout(q, k, z)
        o = z.new_empty(z.shape, dtype=torch.float32 if z.dtype == torch.float16 else z.dtype)
        s2 = q.new_zeros(q.shape[:3], dtype=torch.float32)
        _launch(_hop_fwd, "fwd", "q", (q, k, z, o, s2), scale, with_s2)
        return o, s2

    @torch.library.triton_op("infsa::relu_hop_backward", mutates_args=())
    def relu_hop_backward(q: torch.Tensor, k: torch.Tensor, z: torch.Tensor, do: torch.Tensor,
                          ds2: torch.Tensor, scale: float, with_s2: bool
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dq, dk, dz) of relu_hop, given dO (B, H, N, dv) and ds2 (B, H, N)."""
        q, k, z = _kernel_layout(q, k, z)
        do, ds2 = do.to(z.dtype).contiguous(), ds2.float().contiguous()  # products in z's dtype
        dq, dk, dz = q.new_empty(q.shape), k.new_empty(k.shape), z.new_empty(z.shape)
        _launch(_hop_bwd_kz, "bwd_kz", "k", (q, k, z, do, ds2, dk, dz), scale, with_s2)
        _launch(_hop_bwd_q, "bwd_q", "q", (q, k, z, do, ds2, dq), scale, with_s2)
        return dq, dk, dz

    def _setup_context(ctx, inputs, output):
        q, k, z, ctx.scale, ctx.with_s2 = inputs
        ctx.save_for_backward(q, k, z)

    def _backward(ctx, do, ds2):
        q, k, z = ctx.saved_tensors
        ds2 = torch.zeros(q.shape[:3], device=q.device) if ds2 is None else ds2
        return *relu_hop_backward(q, k, z, do, ds2, ctx.scale, ctx.with_s2), None, None

    relu_hop.register_autograd(_backward, setup_context=_setup_context)
    _ops["relu_hop"] = relu_hop
    return relu_hop

# -----------------------------------------------------------------------------
# Pure-InfSA from fused hops


def pure_infsa_fused(q, k, v, gamma, hops=3, eps=1e-6):
    """infsa.pure_infsa by fused hops: Y = sum_{t=1..hops} z_t, z_0 = v, z_t = gamma A_hat z_{t-1},

        A_hat z = ReLU(S) z / (||ReLU(S)||_F + eps),   ||ReLU(S)||_F^2 = sum_i s2_i (first hop),

    each ReLU(S) z one relu_hop call: O(N d) memory. gamma, a float or a tensor against (..., 1, 1):
    gamma / (||ReLU(S)||_F + eps) in fp32, applied in the data's dtype (as in infsa)."""
    if not AVAILABLE:
        raise RuntimeError("relu_hop needs Triton and a GPU (or Triton's interpreter, "
                           "TRITON_INTERPRET=1); infsa.pure_infsa computes the same sum")
    infsa._check_qkv(q, k, v)
    infsa._check_gamma(gamma)
    infsa._check_hops(hops)
    supported = (torch.float32, torch.bfloat16, torch.float16)
    if not q.dtype == k.dtype == v.dtype or q.dtype not in supported:
        raise ValueError(f"relu_hop runs fp32, bf16 or fp16, one dtype for q, k, v; got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    *lead, N, d = q.shape
    four_d = lambda t: t.reshape(-1, *([1] + list(t.shape))[-3:])  # noqa: E731 (..., N, d) -> 4-d
    q, k, z, y, hop = four_d(q), four_d(k), v, 0, ops()
    for t in range(hops):
        o, s2 = hop(q, k, four_d(z), 1 / math.sqrt(d), t == 0)  # (B, H, N, d_v), (B, H, N)
        if t == 0:  # the clamp keeps sqrt's gradient finite when S = 0
            norm = s2.view(*lead, N).sum(-1).clamp_min(1e-30).sqrt()[..., None, None]  # (.., 1, 1)
            g = gamma.float() if isinstance(gamma, torch.Tensor) else gamma
            gamma_over_norm = g / (norm + eps)
        z = (gamma_over_norm.to(o.dtype) * o.view(v.shape)).to(v.dtype)  # gamma A_hat z_{t-1}
        y = z if t == 0 else y + z  # (..., N, d_v)
    return y

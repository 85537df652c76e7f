"""relu_hop.py against the plain series infsa.pure_infsa: values and gradients (q, k, v, gamma),
tails of N that are not a multiple of the tile, rows with no positive score, head sizes padded to
the kernels' widths, and the compiled op. On a GPU the kernels run compiled; on the CPU under
Triton's interpreter at tiny sizes."""
import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch

import infsa
import model
import relu_hop
import runtime

has_triton = importlib.util.find_spec("triton") is not None
cuda = pytest.mark.skipif(not (torch.cuda.is_available() and has_triton),
                          reason="the compiled kernels need CUDA and Triton")


def qkv(B=2, H=3, N=300, d=16, dtype=torch.float32, device="cpu", seed=0, strided=False):
    """q, k, v (B, H, N, d); strided: views of one (B, N, 3, H, d) tensor, as the model makes
    them."""
    g = torch.Generator().manual_seed(seed)
    if strided:
        return list(torch.randn(B, N, 3, H, d, generator=g).to(device, dtype).requires_grad_()
                    .permute(2, 0, 3, 1, 4))
    return [torch.randn(B, H, N, d, generator=g).to(device, dtype).requires_grad_()
            for _ in range(3)]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check(q, k, v, gamma, hops, tol):
    """The fused sum and its gradients for q, k, v, gamma against autograd of the plain series in
    fp64."""
    out = relu_hop.pure_infsa_fused(q, k, v, gamma, hops)
    ref = infsa.pure_infsa(*(t.double() for t in (q, k, v, gamma)), hops)
    assert out.dtype == q.dtype and rel(out, ref) < tol, rel(out, ref)
    w = torch.randn_like(ref)
    ins = (q, k, v, gamma)
    for name, a, b in zip("qkvg", torch.autograd.grad((out.double() * w).sum(), ins),
                          torch.autograd.grad((ref * w).sum(), ins)):
        assert torch.isfinite(a).all() and rel(a, b) < tol, (name, rel(a, b))


def gammas(H, device="cpu"):
    # a different gamma per head
    return torch.linspace(0.3, 0.9, H, device=device).view(H, 1, 1).requires_grad_()


@cuda
@pytest.mark.parametrize("N, d, dtype, tol", [(1000, 16, torch.float32, 1e-5),
                                              (4097, 16, torch.bfloat16, 2e-2),
                                              (300, 48, torch.bfloat16, 2e-2)])
def test_fused_hops_equal_the_neumann_sum_on_gpu(N, d, dtype, tol):
    """fp32 runs its products in IEEE precision (1e-5); bf16 to the tolerance of bf16 data.
    d_h = 48 is padded to 64."""
    q, k, v = qkv(B=1 if N > 1000 else 2, N=N, d=d, dtype=dtype, device="cuda", strided=N == 1000)
    check(q, k, v, gammas(3, "cuda"), 3, tol)


@cuda
def test_rows_with_no_positive_score_on_gpu():
    q, k, v = qkv(B=1, H=2, N=200, device="cuda")
    with torch.no_grad():
        k[:, :, 100:] *= -1
        q[:, :, 5] = 0  # a zero query: its whole row of S is 0
        q[:, :, 7] = -k[:, :, :100].sum(-2) / 10  # a query that meets few positive scores
    check(q, k, v, gammas(2, "cuda"), 2, 1e-5)
    one = torch.ones(1, 1, 130, 16, device="cuda", requires_grad=True)
    y = relu_hop.pure_infsa_fused(one, -one, one, 0.9, 3)  # every score < 0: A_hat = 0
    y.sum().backward()
    assert (y == 0).all() and torch.isfinite(one.grad).all()


@cuda
def test_compiled_forward_and_backward_equal_eager_on_gpu():
    """torch.compile(fullgraph=True) traces through the custom op: the same kernels, the glue fused
    differently (in bf16, the dtype training uses, that moves roundings: 3.7e-3 on the output,
    measured)."""
    torch._dynamo.reset()
    q, k, v = qkv(B=2, H=4, N=1100, dtype=torch.bfloat16, device="cuda")
    g = gammas(4, "cuda")
    f = torch.compile(lambda q, k, v, g: relu_hop.pure_infsa_fused(q, k, v, g, 3), fullgraph=True)
    outs = []
    for fn in (f, relu_hop.pure_infsa_fused):
        y = fn(q, k, v, g)
        outs.append([y, *torch.autograd.grad(y.float().square().sum(), (q, k, v, g))])
    for a, b in zip(*outs):
        assert rel(a, b) < 2e-2


@cuda
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_pure_model_trains_through_the_kernel_under_cuda_graphs(dtype):
    """A Pure-InfSA model at 145 tokens (the kernel's side of FUSED_MIN_TOKENS) trained by
    train.py's step (flat gradients, fused AdamW, bf16 or fp16 with a gradient scaler), compiled
    with CUDA graphs: the compiled steps' losses follow the eager ones, weights for weights. An
    fp16 step that overflows at the scaler's first scale (2^16) is skipped, the weights kept: the
    loss after it repeats, and runs whose gradients differ in the last bit skip different steps."""
    torch._dynamo.reset()
    cfg = model.ViTConfig(image_size=48, patch_size=4, n_layer=2, n_head=2, n_embd=32, attn="pure")
    assert cfg.n_tokens == 145 >= model.FUSED_MIN_TOKENS
    x, y = torch.randn(16, 3, 48, 48, device="cuda"), torch.randint(0, 10, (16,), device="cuda")
    losses = []
    for mode in (None, "reduce-overhead"):
        torch.manual_seed(0)
        m = model.ViT(cfg, verbose=False).cuda()
        opt, flat = m.optimizer(1e-3, 0.05, fused=True), runtime.flat_grads(list(m.parameters()))
        scaler, f = torch.amp.GradScaler("cuda"), torch.compile(m, mode=mode) if mode else m
        skipped = False
        losses.append([])  # the loss of each new set of weights
        for _ in range(6):
            if mode:
                torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast("cuda", dtype=getattr(torch, dtype)):
                loss = f(x, y)[1]
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            scaler.step(opt)
            if not skipped:
                losses[-1].append(loss.item())
            scale = scaler.get_scale()
            scaler.update()
            skipped = scaler.get_scale() < scale  # the scale halves after an overflow
            flat.zero_()
    eager, graphs = losses
    assert all(math.isfinite(v) for v in eager + graphs) and eager[-1] < eager[0]
    assert min(len(eager), len(graphs)) >= 4 and len(set(eager)) == len(eager)
    assert max(abs(a - b) for a, b in zip(eager, graphs)) < 0.05, (eager, graphs)


@cuda
def test_fp16_hops_do_not_overflow_on_gpu():
    """Large queries and keys: ReLU(S) z passes fp16's 65,504 before the norm divides it out; in
    fp16 the fused sum (o kept in fp32) stays finite and equals the fp64 series."""
    q, k, v = (30 * t for t in qkv(B=1, H=2, N=1000, dtype=torch.float16, device="cuda"))
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    check(q, k, v, gammas(2, "cuda"), 3, 2e-2)


@cuda
def test_memory_is_linear_in_tokens_and_q_k_v_are_read_in_place_on_gpu():
    """Peak memory beyond the inputs at N and 4N tokens: about 4x (O(N d)), where N x N would be
    16x. q, k, v are strided views of one qkv tensor, as in the model: the sum needs o, z and y
    (4 copies of v at the peak, measured), and no copies of q, k, v (3 more)."""
    extra = []
    for N in (4096, 16384):
        q, k, v = torch.randn(1, N, 3, 4, 16, device="cuda",
                              dtype=torch.bfloat16).permute(2, 0, 3, 1, 4)  # (1, 4, N, 16)
        y = relu_hop.pure_infsa_fused(q, k, v, 0.9, 3)  # compiles
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        assert torch.equal(relu_hop.pure_infsa_fused(q, k, v, 0.9, 3), y)
        extra.append(torch.cuda.max_memory_allocated() - base)
        assert torch.equal(y, relu_hop.pure_infsa_fused(q.contiguous(), k.contiguous(),
                                                        v.contiguous(), 0.9, 3))
    # + 64 KB: small tensors (the norm, gamma / norm) take 512-byte blocks
    assert extra[1] / extra[0] < 6 and extra[1] <= 4.5 * v.nbytes + 2**16, (extra, v.nbytes)


@cuda
def test_model_uses_the_kernel_from_fused_min_tokens(monkeypatch):
    calls = []
    monkeypatch.setattr(relu_hop, "pure_infsa_fused",
                        lambda *a: calls.append(a) or infsa.pure_infsa(*a))
    for N in (model.FUSED_MIN_TOKENS - 1, model.FUSED_MIN_TOKENS):
        q, k, v = (t.detach() for t in qkv(B=1, H=1, N=N, device="cuda"))
        model.pure_attention(q, k, v, 0.9, 2)
    assert len(calls) == 1 and calls[0][0].shape[-2] == model.FUSED_MIN_TOKENS


INTERPRETED = """
import torch, infsa, relu_hop, tests.test_relu_hop as t
torch.manual_seed(0)
for N, d, dtype, tol, strided in ((70, 16, torch.float32, 1e-5, True),
                                  (37, 12, torch.float16, 3e-3, False)):
    t.check(*t.qkv(N=N, d=d, dtype=dtype, strided=strided), t.gammas(3), 3, tol)
q, k, v = t.qkv(N=40)
# q strided, k column-major
t.check(t.qkv(N=40, strided=True)[0], k.mT.contiguous().mT, v, t.gammas(3), 2, 1e-5)
one = torch.ones(1, 1, 20, 16, requires_grad=True)
y = relu_hop.pure_infsa_fused(one, -one, one, 0.9, 2)
y.sum().backward()
assert (y == 0).all() and torch.isfinite(one.grad).all()
print("ok")
"""


@pytest.mark.skipif(not has_triton or torch.cuda.is_available(),
                    reason="needs Triton (the interpreter is part of it); with a GPU the compiled "
                           "kernels are tested instead")
def test_kernels_under_the_triton_interpreter_on_cpu():
    """The same kernels, interpreted on CPU tensors (TRITON_INTERPRET=1 must be set before Triton
    compiles anything, hence a fresh process): N = 70 and 37 cross the tiles' edges, d_h = 12 is
    padded to 16, N = 70 reads q, k, v as strided views of one tensor, and N = 40 gives q and k
    layouts that the kernels cannot share. fp32 and fp16 only: the interpreter of Triton 3.9
    returns wrong values for tl.dot on bf16."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", INTERPRETED], cwd=root, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_refusals():
    q, k, v = qkv(B=1, H=1, N=8, d=4)
    if not relu_hop.AVAILABLE:  # no Triton, or no GPU without the interpreter
        with pytest.raises(RuntimeError, match="needs Triton"):
            relu_hop.pure_infsa_fused(q, k, v, 0.9)
        return
    with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
        relu_hop.pure_infsa_fused(q.double(), k.double(), v.double(), 0.9)
    with pytest.raises(ValueError, match="q, k, v must be"):
        relu_hop.pure_infsa_fused(q, k[..., :3, :], v, 0.9)
    with pytest.raises(ValueError, match="hops"):
        relu_hop.pure_infsa_fused(q, k, v, 0.9, hops=0)

"""infsa.py against the authors' released modules (github.com/giorgioroffo/infinite-self-attention).

Run: git clone https://github.com/giorgioroffo/infinite-self-attention
     INFSA_RELEASE=infinite-self-attention python -m pytest -q -s tests/test_release.py
"""
import importlib
import os
import sys

import pytest
import torch

import infsa

RELEASE = os.environ.get("INFSA_RELEASE")
B, N, E, H = 2, 64, 128, 4  # batch, tokens, width, heads


def load_release(path):
    """Import their package, also named `infsa`, then give the name back to ours."""
    assert os.path.isfile(os.path.join(path, "infsa", "attention.py")), f"no checkout at {path}"
    ours = sys.modules.pop("infsa")  # hide our infsa.py so `import infsa` finds theirs
    sys.path.insert(0, path)
    try:
        return importlib.import_module("infsa")  # needs only torch: no stubs
    finally:
        sys.path.remove(path)
        for name in [n for n in sys.modules if n == "infsa" or n.startswith("infsa.")]:
            del sys.modules[name]  # their modules stay alive through the objects we hold
        sys.modules["infsa"] = ours


def ours(m, x, variant, hops):
    """Their projections and weights around our attention; gamma = sigmoid(their logit)."""
    heads = lambda p: p(x).view(B, N, H, E // H).transpose(1, 2)  # (B, H, N, d_h)
    q, k, v = heads(m.q_proj), heads(m.k_proj), heads(m.v_proj)
    logit = m.rho_logit.detach().clone().requires_grad_()  # a leaf, to see its gradient
    gamma = torch.sigmoid(logit)  # a tensor: it trains
    if variant == "pure_infsa":
        y = infsa.pure_infsa(q, k, v, gamma, hops=hops)
    else:
        y = infsa.linear_infsa(q, k, v, gamma)
    return m.out_proj(y.transpose(1, 2).reshape(B, N, E)), logit  # (B, N, E)


def rel(a, b):
    """||a - b||_F / ||b||_F."""
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("variant", ["pure_infsa", "linear_infsa"])
def test_release_matches_one_hop_and_its_rho_never_trains(variant):
    if not RELEASE:
        pytest.skip("needs the authors' code: git clone https://github.com/giorgioroffo/"
                    "infinite-self-attention; INFSA_RELEASE=path "
                    "python -m pytest -q -s tests/test_release.py")
    release = load_release(RELEASE)
    torch.manual_seed(0)  # their init draws from the global generator
    m = release.InfSAAttention(E, H, variant=variant)  # rho = 0.95, fp32, biases zero
    with torch.no_grad():  # non-zero biases, so the test sees them placed like theirs
        for p in (m.q_proj, m.k_proj, m.v_proj, m.out_proj):
            p.bias.normal_(0, 0.1)
    x = torch.randn(B, N, E)
    theirs, _ = m(x, x, x)  # (B, N, E)
    mine, logit = ours(m, x, variant, hops=1)
    d = (mine - theirs).abs().max().item()
    print(f"\n{variant}: rho={m.rho:.4f} max|diff|={d:.2e} rel={rel(mine, theirs):.2e}")
    # Same operator at one hop: they scale q k^T by 1/d_h, we by 1/sqrt(d_h); the Frobenius
    # (Pure) and sum (Linear) normalisations cancel that up to eps and fp32 rounding.
    assert rel(mine, theirs) < 1e-5  # measured: 2.6e-7 (Pure), 1.3e-6 (Linear)
    if variant == "pure_infsa":  # what a layer of theirs leaves out: the hops 2 and 3
        three, _ = ours(m, x, variant, hops=3)
        print(f"pure_infsa: rel(theirs, ours hops=3) = {rel(theirs, three):.1%}")
        assert rel(theirs, three) > 0.05
    # Their rho passes through .item(): a Python float, outside the graph; our gamma is not.
    assert isinstance(m.rho, float)
    theirs.sum().backward()
    mine.sum().backward()
    assert m.rho_logit.grad is None  # never trained, though it is an nn.Parameter
    assert logit.grad is not None and logit.grad.abs().item() > 0

"""
Five tokens, two graphs: where InfSA's later hops change which token leads, and where they fade.

    python toy.py --out_dir assets  # assets/toy.png, then CAPTION with its numbers
"""
import os
import sys
from types import SimpleNamespace

import matplotlib.pyplot as plt
import torch

import infsa
import runtime
from configurator import config_defaults, configure, die

# -----------------------------------------------------------------------------
out_dir = "."               # where toy.png goes
# -----------------------------------------------------------------------------
DEFAULTS = config_defaults(globals())
GAMMA, WALKS = 0.9, 4000  # the discount; random walks from every token
KS, BACK, GAMMAS = range(1, 7), 0.5, torch.linspace(0.001, 0.999, 999).tolist()
CAPTION = (
    "Tokens 1 and 2 attend to token 0, which attends to 3, then 4 (graph A). A token's score is "
    "the weight of its value in all outputs: a column sum of Σ_{{t≤K}} γᵗÂᵗ (γ = {g}), "
    "with Â = A/‖A‖_F as in the model, so each edge carries γ/{A.F:.0f}. On A token 0 leads "
    "at every K ({A.inf[0]:.2f}): later hops lift tokens 3 and 4 to {A.inf[3]:.2f} and "
    "{A.inf[4]:.2f} and stop, as the chain ends (they tie with it only at γ = 1). An edge back "
    "from 4 to 3 (weight {BACK}, graph B) gives token 3 more weight and a loop 3 → 4 → 3 that "
    "keeps handing it back: "
    "token 3 leads from K = {B.k} ({B.inf[3]:.2f} to {B.inf[0]:.2f} at K = ∞, where it leads for "
    "every γ above {B.g:.2f}). Unnormalised Katz on the raw A, not what the model computes, puts "
    "token {raw.top} first for every γ above {raw.g:.2f}. Rings: random walks on the chain γÂ, "
    "which invert nothing.")


def graph(back=0.0):
    """S (5, 5), S_ij = how much token i attends to j: graph A, and 4 -> 3 weighing `back` (B)."""
    S = torch.zeros(5, 5, dtype=torch.float64)
    S[[1, 2, 0, 3, 4], [0, 0, 3, 4, 3]] = torch.tensor([1, 1, 1, 1, back], dtype=S.dtype)
    return S


def lead(c):
    """Token 0's lead c_0 / max_{j>0} c_j: below 1 once another token scores more; 1 at 0/0."""
    return float(c[0] / c[1:].max()) if c.any() else 1.0


def walk_scores(A, gamma, walks):
    """Katz in without an inverse: 1^T V - 1, V_ij the mean visits to j of walks from i on the
    absorbing chain gamma A; None where that reading fails (a row of gamma A sums above 1)."""
    chain, gen = infsa.absorbing_chain(A, gamma), torch.Generator().manual_seed(0)
    if chain.valid:
        return infsa.random_walk_visits(chain.M, walks, generator=gen).sum(0) - 1


def view(S, gamma, walks, norm=True):
    """A = S / ||S||_F as in the model (S if not norm); scores c_K = sum_{t<=K} gamma^t 1^T A^t
    (len(KS), 5); Katz in c_inf = ((I - gamma A^T)^-1 - I) 1; walks; token 0's lead at GAMMAS;
    g, k: the first gamma, K where the lead is below 1."""
    if not S.any():
        raise ValueError("an all-zero S has no ||S||_F to normalise by, and no scores")
    F = float(infsa.frobenius_norm(S))
    A = S / F if norm else S
    one = torch.ones(5, 1, dtype=A.dtype)
    cK = torch.stack([infsa.neumann_series(A.T, one, gamma, K)[:, 0] for K in KS])
    inf = infsa.katz_centrality(A, gamma)
    leads = [lead(infsa.katz_centrality(A, g)) for g in GAMMAS]
    return SimpleNamespace(F=F, A=A, cK=cK, inf=inf, top=int(inf.argmax()), leads=leads,
                           g=next((g for g, x in zip(GAMMAS, leads) if x < 1), None),
                           k=next((K for K, c in zip(KS, cK) if lead(c) < 1), None),
                           rho=float(torch.linalg.eigvals(A).abs().max()),
                           walk=walk_scores(A, gamma, walks))


def draw(A, B, raw):
    """The graphs; each token's score against K on A and on B; token 0's lead against gamma."""
    fig, ((ag, aA), (aB, al)) = plt.subplots(2, 2, figsize=(9, 6.8), layout="constrained")
    pos, col = [(1, 0), (0, 1), (0, -1), (2, 0), (3, 0)], "C3 0.55 0.55 C0 C2".split()
    for i, j in graph(BACK).nonzero().tolist():
        back = i == 4  # B's edge, orange
        ag.annotate("", pos[j], pos[i], arrowprops=dict(
            arrowstyle="-|>", lw=2, shrinkA=15, shrinkB=15, color="C1" if back else "k",
            connectionstyle=f"arc3,rad={0.6 * back}"))
    for i, p in enumerate(pos):
        ag.text(*p, i, ha="center", va="center", size=14, c="w",
                bbox=dict(boxstyle="circle", fc=col[i]))
    ag.set(xlim=(-0.3, 3.3), ylim=(-1.3, 1.3), title="i → j: token i attends to j\nA: black "
           f"(‖A‖_F = {A.F:.0f}); B: A + orange ({BACK})")
    ag.axis("off")
    for a, n, v in ((aA, "A", A), (aB, "B", B)):
        for j in (1, 4, 3, 0):  # (token 2 scores as token 1)
            a.plot([*KS, 7.5], [*v.cK[:, j], v.inf[j]], "o-", c=col[j])
        a.plot([7.5] * 5, v.walk, "ko", mfc="none", ms=11)
        who = f"token {v.top} first from K = {v.k}" if v.k else "token 0 first at every K"
        a.set(xticks=[*KS, 7.5], xticklabels=[*KS, "∞"], ylabel="score", ylim=(-0.05, 1.4),
              title=f"{n}: ρ(Â) = {v.rho:.2f}, {who}", xlabel="hops K; ○: random walks")
    for v, c, s in ((A, "k-", "A"), (B, "C1-", "B"),
                    (raw, "k--", "raw A: unnormalised Katz,\nnot what the model computes")):
        al.plot(GAMMAS, v.leads, c, label=s)
    al.axhline(1, c="k", lw=0.5)
    al.set(xlabel="γ", ylim=(0, 2.1), title="token 0's lead at K = ∞: c₀ / max_{j>0} c_j")
    al.legend()
    fig.suptitle(rf"score $c_j = \Sigma_i (\Sigma_{{t=1}}^K \gamma^t\hat A^t)_{{ij}}$, "
                 rf"$\gamma = {GAMMA}$")
    return fig


def main(argv):
    out = configure(argv, DEFAULTS, __doc__)[0]["out_dir"]
    if not out or os.path.isfile(out):
        die(f"--out_dir must name a folder; got {out!r}")
    A, B, raw = (view(graph(b), GAMMA, WALKS, norm) for b, norm in ((0, 1), (BACK, 1), (0, 0)))
    fig, path = draw(A, B, raw), os.path.join(out, "toy.png")
    try:
        runtime.write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110), binary=True)
    except runtime.WriteError as e:
        die(f"{e}; pick another --out_dir")
    plt.close(fig)
    text = CAPTION.format(g=GAMMA, A=A, B=B, raw=raw, BACK=BACK)
    print(f"wrote {path}\n{text}")
    return A, B, raw, text


if __name__ == "__main__":
    main(sys.argv[1:])

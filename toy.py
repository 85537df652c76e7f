"""
A five-token graph where multi-hop propagation finds what one hop misses (the paper's Figure 3 idea).

    python toy.py                            # toy.png here
    python toy.py --gamma 0.3 --out_dir /tmp  # a small discount: Katz comes back to the one-hop ranking

Five tokens: 1 and 2 attend to 0, and a chain 0 -> 3 -> 4 leads on. One hop (the in-degree, the
column sums of A) ranks token 0 first. Katz in-centrality ((I - gamma A^T)^-1 - I) 1 and the expected
visits 1^T (I - gamma A)^-1 of the absorbing chain gamma A rank token 4 first at gamma = 0.9: what
flows into 0 flows on to 3, then to 4. Random walks on the chain check its closed form.
"""
import os
import sys
from types import SimpleNamespace

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import infsa
from configurator import config_defaults, configure, die

# -----------------------------------------------------------------------------
out_dir = "."               # where toy.png goes
gamma = 0.9                 # the discount, in (0, 1)
walks = 4000                # Monte-Carlo walks from every token
# -----------------------------------------------------------------------------
DEFAULTS = config_defaults(globals())


def toy_graph():
    """A (5, 5) float64, A_ij = 1 when token i attends to token j: tokens 1 and 2 attend to token 0,
    and a chain 0 -> 3 -> 4 leads on. Token 4 attends to nothing: it is where the absorbing walk ends."""
    A = torch.zeros(5, 5, dtype=torch.float64)
    for i, j in [(1, 0), (2, 0), (0, 3), (3, 4)]:
        A[i, j] = 1.0
    return A


def toy_scores(gamma=0.9, walks=4000, seed=0):
    """On the toy graph A: one-hop in-degree 1^T A, Katz in-centrality, the expected visits
    1^T (I - gamma A)^-1 of the absorbing chain gamma A (one walk from every token) and a Monte-Carlo
    estimate of them. Returns (A, in-degree, Katz, visits, visits by Monte Carlo)."""
    A = toy_graph()
    chain = infsa.absorbing_chain(A, gamma)
    mc = infsa.random_walk_visits(chain.M, walks=walks, generator=torch.Generator().manual_seed(seed))
    return A, A.sum(0), infsa.katz_centrality(A, gamma), chain.fundamental.sum(0), mc.sum(0)


def draw(path, gamma, A, deg, katz, visits, mc):
    """The graph (node colour: Katz in-centrality) beside one bar chart per ranking; orange: ranked first."""
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6), width_ratios=[1.3, 1, 1, 1], layout="constrained")
    ax, pos = axes[0], {1: (0, 1), 2: (0, -1), 0: (1, 0), 3: (2, 0), 4: (3, 0)}
    for i, j in A.nonzero().tolist():
        (x0, y0), (x1, y1) = pos[i], pos[j]
        ax.annotate("", (x1, y1), (x0, y0), arrowprops=dict(arrowstyle="-|>", lw=1.5, shrinkA=17, shrinkB=17))
        ax.text((x0 + x1) / 2, (y0 + y1) / 2 + 0.13, f"{A[i, j]:g}", ha="center", fontsize=10, color="C3")
    for t, (px, py) in pos.items():
        ax.scatter(px, py, s=900, c=[katz[t].item()], cmap="viridis", vmin=0, vmax=katz.max().item(), edgecolors="k")
        ax.text(px, py, str(t), ha="center", va="center", fontsize=12, color="w" if katz[t] < 0.6 * katz.max() else "k")
    ax.set(xlim=(-0.5, 3.5), ylim=(-1.5, 1.5))
    ax.set_title("arrow i → j: token i attends to j, weight A_ij\n(node colour: Katz in-centrality)", fontsize=9)
    ax.axis("off")
    for a, v, title in ((axes[1], deg, "one hop: in-degree (column sums of A)"),
                        (axes[2], katz, f"Katz in-centrality, γ = {gamma}"),
                        (axes[3], visits, "absorbing chain γA: expected visits,\none walk from each token (dots: Monte Carlo)")):
        bars = a.bar(range(5), v.numpy(), color=["C1" if t == int(v.argmax()) else "C0" for t in range(5)])
        a.bar_label(bars, fmt="%.2f", padding=6, fontsize=8)
        a.set(xticks=range(5), xlabel="token", ylim=(0, 1.15 * v.max().item()))
        a.set_title(title, fontsize=9)
    axes[3].plot(range(5), mc.numpy(), "k.", ms=10)
    fig.suptitle(f"orange: ranked first. One hop ranks token {int(deg.argmax())} first; "
                 f"multi-hop propagation with γ = {gamma} ranks token {int(katz.argmax())} first", fontsize=10)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")


def main(argv):
    opt = SimpleNamespace(**configure(argv, DEFAULTS, __doc__, counts=("walks",))[0])
    if not 0 < opt.gamma < 1:
        die(f"--gamma must lie in (0, 1) for the Neumann series to converge; got {opt.gamma}")
    scores = toy_scores(opt.gamma, opt.walks)
    os.makedirs(opt.out_dir, exist_ok=True)
    draw(os.path.join(opt.out_dir, "toy.png"), opt.gamma, *scores)
    for name, v in zip(("in-degree", "Katz in", "visits", "visits (MC)"), scores[1:]):
        print(f"{name:>12}: " + "  ".join(f"{t}:{v[t]:.2f}" for t in range(5)) + f"  -> token {int(v.argmax())} first")
    return scores


if __name__ == "__main__":
    main(sys.argv[1:])

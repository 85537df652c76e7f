"""
A five-token graph where multi-hop propagation finds what one hop misses (the paper's Figure 3 idea).

    python toy.py                            # toy.png here
    python toy.py --gamma 0.3 --out_dir /tmp  # a small discount: Katz comes back to the one-hop ranking

Five tokens: 1 and 2 attend to 0, and a chain 0 -> 3 -> 4 leads on. One hop, gamma 1^T A (the t = 1
term), ranks token 0 first. The whole Neumann sum, Katz in-centrality sum_{t>=1} gamma^t 1^T A^t =
((I - gamma A^T)^-1 - I) 1, ranks token 4 first at gamma = 0.9: what flows into 0 flows on to 3, then 4.
The absorbing chain gamma A reads the same quantity as expected visits, 1^T (I - gamma A)^-1 = 1 + Katz in
(the 1: each token's own start), so random walks on it, which count visits and invert nothing, check Katz.
"""
import math
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
    and a chain 0 -> 3 -> 4 leads on. Token 4 attends to nothing: a walk that reaches it is absorbed there."""
    A = torch.zeros(5, 5, dtype=torch.float64)
    for i, j in [(1, 0), (2, 0), (0, 3), (3, 4)]:
        A[i, j] = 1.0
    return A


def toy_scores(gamma=0.9, walks=4000, seed=0):
    """On the toy graph A: one hop gamma 1^T A, Katz in-centrality sum_{t>=1} gamma^t 1^T A^t, and its
    Monte-Carlo estimate 1^T V - 1, V_ij the mean visits to j of `walks` walks from i on the chain gamma A.
    Returns (A, one hop, Katz, Katz by random walks)."""
    A = toy_graph()
    M = infsa.absorbing_chain(A, gamma).M
    visits = infsa.random_walk_visits(M, walks=walks, generator=torch.Generator().manual_seed(seed))
    return A, gamma * A.sum(0), infsa.katz_centrality(A, gamma), visits.sum(0) - 1


def draw(path, gamma, A, one_hop, katz, katz_walks):
    """The graph (node colour: Katz in-centrality) beside the one-hop and the Neumann-sum scores, on one
    scale; orange: ranked first. Sized to read at a README's width (about 800 px)."""
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6), width_ratios=[1.2, 1, 1], layout="constrained")
    ax, pos = axes[0], {1: (0, 1), 2: (0, -1), 0: (1, 0), 3: (2, 0), 4: (3, 0)}
    for i, j in A.nonzero().tolist():
        ax.annotate("", pos[j], pos[i], arrowprops=dict(arrowstyle="-|>", lw=1.8, shrinkA=16, shrinkB=16))
    for t, (px, py) in pos.items():
        ax.scatter(px, py, s=800, c=[katz[t].item()], cmap="viridis", vmin=0, vmax=katz.max().item(), edgecolors="k")
        ax.text(px, py, str(t), ha="center", va="center", fontsize=13, color="w" if katz[t] < 0.6 * katz.max() else "k")
    ax.set(xlim=(-0.4, 3.4), ylim=(-1.4, 1.4))
    ax.set_title("arrow i → j: token i attends to j\n(Aᵢⱼ = 1; colour: Katz in)", fontsize=11)
    ax.axis("off")
    for a, v, title in ((axes[1], one_hop, "one hop (K = 1): γ 1ᵀA"),
                        (axes[2], katz, "Neumann sum over t ≥ 1: Σ γᵗ 1ᵀAᵗ\n(Katz in; dots: random walks)")):
        bars = a.bar(range(5), v.numpy(), color=["C1" if t == int(v.argmax()) else "C0" for t in range(5)])
        a.bar_label(bars, fmt="%.2f", padding=7, fontsize=10)
        a.set(xticks=range(5), xlabel="token", ylim=(0, 1.18 * katz.max().item()))
        a.set_title(title, fontsize=11)
    axes[2].plot(range(5), katz_walks.numpy(), "k.", ms=9)
    fig.suptitle(f"γ = {gamma}: one hop ranks token {int(one_hop.argmax())} first, "
                 f"the sum over all hops ranks token {int(katz.argmax())} first (orange)", fontsize=12)
    fig.savefig(path, dpi=160)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv):
    opt = SimpleNamespace(**configure(argv, DEFAULTS, __doc__, dict(walks=(1, math.inf)))[0])
    if not 0 < opt.gamma < 1:
        die(f"--gamma must lie in (0, 1) for the Neumann series to converge; got {opt.gamma}")
    scores = toy_scores(opt.gamma, opt.walks)
    os.makedirs(opt.out_dir, exist_ok=True)
    draw(os.path.join(opt.out_dir, "toy.png"), opt.gamma, *scores)
    for name, v in zip(("one hop", "Katz in", "Katz (walks)"), scores[1:]):
        print(f"{name:>12}: " + "  ".join(f"{t}:{v[t]:.2f}" for t in range(5)) + f"  -> token {int(v.argmax())} first")
    return scores


if __name__ == "__main__":
    main(sys.argv[1:])

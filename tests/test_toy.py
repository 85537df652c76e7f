"""toy.py: every sentence of its CAPTION and of its docstring against the numbers the figure draws;
those numbers against independent references (sums by hand, matrix powers, inverses, random walks);
the command line's one-line errors."""
import re

import matplotlib.pyplot as plt
import pytest
import torch

import infsa
import runtime
import toy
from tests.test_readme import FLAT

N = r"(\d+\.\d+|\d+)"  # a number quoted in a sentence
I = torch.eye(5, dtype=torch.float64)
GRID = torch.linspace(0.001, 0.999, 999).tolist()


def powers(A, gamma, K):
    """Column sums of sum_{t=1..K} gamma^t A^t, by matrix powers."""
    return sum(gamma ** t * torch.linalg.matrix_power(A, t) for t in range(1, K + 1)).sum(0)


def katz(A, gamma):
    """Column sums of (I - gamma A)^-1 - I, by an inverse."""
    return (torch.linalg.inv(I - gamma * A) - I).sum(0)


def by_hand(g):
    """Column sums on graph A when every edge weighs g: the walks into j, g^length each."""
    return torch.tensor([2 * g, 0, 0, g + 2 * g * g, g + g * g + 2 * g ** 3], dtype=torch.float64)


def lead(c):
    return float(c[0] / c[1:].max())


def close(quoted, value):
    """A number as quoted (2 decimals) against the value it stands for."""
    return abs(float(quoted) - float(value)) <= 0.005 + 1e-12


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    return (out, *toy.main(["--out_dir", str(out)]))


def test_every_caption_sentence_holds(run):
    _, A, B, raw, text = run
    s = re.split(r"(?<=\.) (?=[A-Z])", text)
    assert len(s) == 6  # a new sentence needs its check here

    assert s[0] == "Tokens 1 and 2 attend to token 0, which attends to 3, then 4 (graph A)."
    assert {tuple(e) for e in toy.graph().nonzero().tolist()} == {(1, 0), (2, 0), (0, 3), (3, 4)}

    m = re.fullmatch(r"A token's score is the weight of its value in all outputs: a column sum of "
                     rf"Σ_\{{t≤K\}} γᵗÂᵗ \(γ = {N}\), with Â = A/‖A‖_F as in the "
                     rf"model, so each edge carries γ/{N}\.", s[1])
    assert float(m[1]) == toy.GAMMA == 0.9
    model = infsa.affinity(toy.graph(), 5 ** 0.5 * I)  # q = rows of A, one-hot keys: S = A
    torch.testing.assert_close(A.A, model, atol=1e-6, rtol=0)
    assert set(A.A[toy.graph() > 0].tolist()) == {1 / float(m[2])}  # ||A||_F = sqrt(4 edges)
    V = torch.randn(5, 3, dtype=torch.float64)
    for v in (A, B):
        for K, c in zip(toy.KS, v.cK):
            torch.testing.assert_close(c, powers(v.A, 0.9, K))
            Y = infsa.neumann_series(v.A, V, 0.9, K)  # every token's output, (5, 3)
            torch.testing.assert_close(Y.sum(0), c @ V)  # v_j enters them with weight c_j

    m = re.fullmatch(rf"On A token 0 leads at every K \({N}\): later hops lift tokens 3 and 4 to "
                     rf"{N} and {N} and stop, as the chain ends \(they tie with it only at "
                     r"γ = 1\)\.", s[2])
    hand = by_hand(0.45)  # every edge weighs gamma / 2
    assert close(m[1], hand[0]) and close(m[2], hand[3]) and close(m[3], hand[4])
    torch.testing.assert_close(A.inf, hand)
    assert all(int(powers(A.A, 0.9, K).argmax()) == 0 for K in range(1, 12))
    assert A.cK[0, 3] == A.cK[0, 4] == 0.45 and torch.equal(A.cK[2:], A.cK[-1:].expand(4, 5))
    assert torch.linalg.matrix_power(A.A, 3).any() and not torch.linalg.matrix_power(A.A, 4).any()
    assert all(lead(by_hand(g / 2)) > 1 for g in GRID)
    assert torch.equal(by_hand(0.5)[[0, 3, 4]], torch.ones(3, dtype=torch.float64))  # gamma = 1

    m = re.fullmatch(rf"An edge back from 4 to 3 \(weight {N}, graph B\) gives token 3 more weight "
                     r"and a loop 3 → 4 → 3 that keeps handing it back: token 3 leads from "
                     rf"K = (\d+) \({N} to {N} at K = ∞, where it leads for every γ above "
                     rf"{N}\)\.", s[3])
    torch.testing.assert_close(B.A, (toy.graph() + float(m[1]) * I[4:].T @ I[3:4]) / 4.25 ** 0.5)
    assert B.cK[0, 3] > A.cK[0, 3] and B.A[3, 4] * B.A[4, 3] > 0
    assert all(B.cK[K, 3] < B.cK[K + 1, 3] for K in range(5)) and B.cK[-1, 3] < B.inf[3]
    top = [int(powers(B.A, 0.9, K).argmax()) for K in range(1, 40)]
    assert top.index(3) + 1 == int(m[2]) and top[0] == 0 and set(top[1:]) == {3}
    ref = katz(B.A, 0.9)
    assert close(m[3], ref[3]) and close(m[4], ref[0])
    first = next(g for g in GRID if lead(katz(B.A, g)) < 1)
    assert all(lead(katz(B.A, g)) < 1 for g in GRID if g >= first)
    assert abs(B.g - first) < 1e-3 and close(m[5], B.g)

    m = re.fullmatch(r"Unnormalised Katz on the raw A, not what the model computes, puts token "
                     rf"(\d) first for every γ above {N}\.", s[4])
    for g in GRID:  # the raw 0/1 graph: every edge weighs gamma
        assert int(by_hand(g).argmax()) == (int(m[1]) if g > float(m[2]) else 0)
    torch.testing.assert_close(raw.inf, by_hand(0.9))

    assert s[5] == "Rings: random walks on the chain γÂ, which invert nothing."
    for v in (A, B):
        assert infsa.absorbing_chain(v.A, 0.9).valid
        torch.testing.assert_close(v.walk, v.inf, atol=0.08, rtol=0)


def test_walks_invert_nothing_and_are_skipped_where_the_chain_fails(run, monkeypatch):
    _, A, _, _, _ = run
    M = infsa.absorbing_chain(A.A, 0.9).M

    def refuse(*args, **kwargs):
        raise AssertionError("a random walk must not invert")
    monkeypatch.setattr(torch.linalg, "inv", refuse)
    monkeypatch.setattr(torch.linalg, "solve", refuse)
    visits = infsa.random_walk_visits(M, toy.WALKS, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(visits.sum(0) - 1, A.walk)
    monkeypatch.undo()
    S = torch.zeros(5, 5, dtype=torch.float64)
    S[0] = 1  # token 0 attends to all: its row of gamma A_hat sums to gamma sqrt(5) > 1
    assert toy.walk_scores(S / 5 ** 0.5, 0.9, 10) is None
    assert toy.view(S, 0.9, 10).walk is None


def test_an_all_zero_S_is_refused_and_lead_has_no_nan():
    """S / ||S||_F with S = 0 was 0/0: NaN in every number the figure draws."""
    with pytest.raises(ValueError, match="all-zero S"):
        toy.view(torch.zeros(5, 5, dtype=torch.float64), 0.9, 10)
    assert toy.lead(torch.zeros(5)) == 1.0  # no token scores: none leads token 0
    assert toy.lead(torch.tensor([1.0, 0, 0, 0, 0])) == float("inf")
    assert toy.lead(torch.tensor([1.0, 2, 0, 0, 0])) == 0.5


def test_the_figure_draws_the_numbers_the_caption_quotes(run):
    out, A, B, raw, text = run
    img = plt.imread(out / "toy.png")
    assert img.shape[1] == 990 and img[..., :3].std() > 0.05  # 9 in at 110 dpi: a README's width
    fig = toy.draw(A, B, raw)
    _, aA, aB, al = fig.axes
    assert aA.get_title() == f"A: ρ(Â) = {A.rho:.2f}, token 0 first at every K"
    assert aB.get_title() == f"B: ρ(Â) = {B.rho:.2f}, token 3 first from K = 2"
    assert A.rho < 1e-6 and 0.3 < B.rho < 0.4  # A has no loop (A_hat^4 = 0), B has one
    for a, v in ((aA, A), (aB, B)):
        curves = {tuple(line.get_ydata()) for line in a.lines}
        for j in (0, 1, 3, 4):  # (token 2 scores as token 1)
            assert (*v.cK[:, j].tolist(), float(v.inf[j])) in curves
        assert tuple(v.walk.tolist()) in curves
        # the numbers the caption quotes: each curve's last point, at the tick labelled ∞
        assert a.get_xticklabels()[-1].get_text() == "∞" and a.get_xticks()[-1] == 7.5
        assert all(line.get_xdata()[-1] == 7.5 for line in a.lines)
        assert all(f"({v.inf[j]:.2f}" in text or f" {v.inf[j]:.2f}" in text for j in (0, 3))
    curves, labels = al.get_legend_handles_labels()
    assert [list(c.get_ydata()) for c in curves] == [A.leads, B.leads, raw.leads]
    assert labels[2] == "raw A: unnormalised Katz,\nnot what the model computes"
    assert r"\gamma = 0.9" in fig._suptitle.get_text()
    plt.close(fig)


def test_every_docstring_sentence_holds(run):
    out, A, B, raw, text = run
    lines = [s.strip() for s in toy.__doc__.strip().splitlines() if s.strip()]
    assert len(lines) == 2  # a new sentence needs its check here
    assert lines[0] == ("Five tokens, two graphs: where InfSA's later hops change which token "
                        "leads, and where they fade.")
    assert {int(c.argmax()) for c in A.cK} == {0} and len({int(c.argmax()) for c in B.cK}) == 2
    assert not (A.cK[-1] - A.cK[-2]).any()  # on A the hops fade out: nothing after K = 3
    assert lines[1].endswith("# assets/toy.png, then CAPTION with its numbers")
    assert (out / "toy.png").is_file()
    assert text == toy.CAPTION.format(g=0.9, A=A, B=B, raw=raw, BACK=toy.BACK)


@pytest.mark.parametrize("args, says", [
    (["--out_dir", ""], "--out_dir must name a folder"),
    (["--gamma", "0.3"], "unknown option --gamma; valid options: out_dir")])
def test_bad_options_are_one_line(args, says, capsys):
    with pytest.raises(SystemExit) as e:
        toy.main(args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and says in err


def test_an_unwritable_out_dir_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(toy, "WALKS", 1)
    (tmp_path / "f").write_text("")
    for out, says in ((tmp_path / "f", "--out_dir must name a folder"),
                      (tmp_path / "f" / "sub", "pick another --out_dir")):
        with pytest.raises(SystemExit) as e:
            toy.main(["--out_dir", str(out)])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and "\n" not in err and says in err

    def full(path, write, binary=False):
        raise runtime.WriteError(f"cannot write {path} (No space left on device)")
    monkeypatch.setattr(runtime, "write_atomic", full)
    with pytest.raises(SystemExit) as e:
        toy.main(["--out_dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.endswith("(No space left on device); pick another --out_dir")


def test_a_uniform_background_never_reranks_graph_a():
    """RESULTS §3: dense attention, A + b 1 1^T, leaves token 0 first for every b, gamma and K
    tried, K = inf included (Katz in of the normalised operator)."""
    for b in (0.01, 0.1, 1.0, 10.0):
        S = toy.graph() + b
        A = S / S.norm()
        for gamma in (0.05, 0.3, 0.6, 0.9, 0.95):
            sums = [infsa.neumann_series(A.T, torch.ones(5, 1, dtype=A.dtype), gamma, K)[:, 0]
                    for K in range(1, 6)] + [infsa.katz_centrality(A, gamma)]
            assert all(int(c.argmax()) == 0 for c in sums), (b, gamma)


def test_the_numbers_in_results_are_the_figures(run):
    """RESULTS §3 quotes the figure's numbers: each one against what toy.py computes."""
    _, A, B, raw, _ = run
    m = re.search(rf"‖A‖_F = {N}, so each edge carries γ/{N}\) token 0 leads at every K "
                  rf"\({N}\): later hops lift tokens 3 and 4 to {N} and {N} and stop, since "
                  rf"Â⁴ = 0\. One extra edge 4 → 3 of weight {N} \(graph B, ρ\(Â\) = {N}\) "
                  rf"gives token 3 a loop that keeps handing weight back: it leads from "
                  rf"K = {N} \({N} to {N} at K = ∞\) for every γ above {N}\. .* ranks token "
                  rf"{N} first for every γ above {N} \({N} / {N} / {N} for tokens 0 / 3 / 4\)\.",
                  FLAT)
    F, F2, a0, a3, a4, back, rho, k, b3, b0, bg, top, rg, r0, r3, r4 = map(float, m.groups())
    assert F == F2 == A.F and back == toy.BACK and torch.linalg.matrix_power(A.A, 4).eq(0).all()
    assert [close(q, v) for q, v in ((a0, A.inf[0]), (rho, B.rho), (b3, B.inf[3]), (b0, B.inf[0]),
                                     (bg, B.g), (rg, raw.g), (r0, raw.inf[0]), (r3, raw.inf[3]),
                                     (r4, raw.inf[4]))] == [True] * 9
    assert abs(a3 - A.inf[3]) < 5e-4 and abs(a4 - A.inf[4]) < 5e-4 and A.k is None  # 3 decimals
    assert k == B.k and top == raw.top == 4
    walks = re.search(rf"Random walks on the absorbing chain γÂ \(([\d,]+) per token\) agree "
                      rf"with the closed form within {N}\.", FLAT)
    assert int(walks[1].replace(",", "")) == toy.WALKS
    error = max((v.walk - v.inf).abs().max() for v in (A, B))
    assert error <= float(walks[2]) < error + 0.01

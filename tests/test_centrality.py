"""infsa.py's graph readings of A_hat against independent references: Katz, eigenvector and
PageRank centrality against power series and eigen-solvers, the absorbing Markov chain against
simulation; in float64, as test_infsa.py (its autouse fixture, imported)."""
import pytest
import torch

import infsa
from tests.test_infsa import float64, principal_left_eigvec  # noqa: F401 (float64: autouse)

# ---------------------------------------------------------------- centrality views

def random_graph(N=6, seed=0):
    A = torch.rand(N, N, generator=torch.Generator().manual_seed(seed))
    return A / torch.linalg.matrix_norm(A)  # Frobenius 1, strictly positive


def test_katz_in_and_out_match_power_series():
    A, gamma = random_graph(), 0.7
    for direction, M in (("in", A.T), ("out", A)):
        series = sum(gamma ** t * torch.linalg.matrix_power(M, t) @ torch.ones(6)
                     for t in range(1, 200))
        torch.testing.assert_close(infsa.katz_centrality(A, gamma, direction), series)


def test_katz_in_is_column_weighted_out_is_row_weighted():
    A = torch.zeros(3, 3)
    A[0, 1] = 1.0  # token 0 attends to token 1 only
    torch.testing.assert_close(infsa.katz_centrality(A, 0.5, "in"), torch.tensor([0.0, 0.5, 0.0]))
    torch.testing.assert_close(infsa.katz_centrality(A, 0.5, "out"), torch.tensor([0.5, 0.0, 0.0]))


def test_eigenvector_centrality_matches_eig():
    A = random_graph(8, seed=1)
    torch.testing.assert_close(infsa.eigenvector_centrality(A), principal_left_eigvec(A))


def test_katz_turns_toward_eigenvector_as_gamma_approaches_one_over_rho():
    A = random_graph(8, seed=2)
    rho = torch.linalg.eigvals(A).abs().max().item()
    e = infsa.eigenvector_centrality(A)
    cos = [torch.cosine_similarity(infsa.katz_centrality(A, f / rho), e, dim=0).item()
           for f in (0.1, 0.5, 0.9, 0.999)]
    assert cos == sorted(cos) and cos[-1] > 1 - 1e-6


def test_pagerank_sums_to_one_and_is_the_teleported_eigenvector():
    A = random_graph(7, seed=3)
    A[2] = 0.0  # a dangling row
    pi = infsa.pagerank(A, alpha=0.85, iters=300)
    torch.testing.assert_close(pi.sum(), torch.tensor(1.0))
    P = A / A.sum(-1, keepdim=True)
    P[2] = 1 / 7
    G = 0.85 * P + 0.15 / 7
    torch.testing.assert_close(pi, principal_left_eigvec(G))


# ---------------------------------------------------------------- absorbing Markov chain

def test_fundamental_matrix_matches_random_walk_visits():
    A = torch.rand(4, 4, generator=torch.Generator().manual_seed(4))
    A = A / A.sum(-1, keepdim=True)  # row-stochastic: every R_i = 1 - gamma > 0
    chain = infsa.absorbing_chain(A, 0.6)
    assert chain.valid
    torch.testing.assert_close(chain.R, torch.full((4,), 0.4))
    est = infsa.random_walk_visits(chain.M, walks=4000, generator=torch.Generator().manual_seed(0))
    # visits per walk have variance < 10 here; 4000 walks -> standard error < 0.05
    assert (est - chain.fundamental).abs().max() < 0.15
    # (F - I) 1 is the out-Katz score
    torch.testing.assert_close((chain.fundamental - torch.eye(4)).sum(-1),
                               infsa.katz_centrality(A, 0.6, "out"))


def test_invalid_chain_is_reported():
    A = torch.full((3, 3), 1 / 3)  # Frobenius norm 1, but every row sums to 1
    A[0] = torch.tensor([0.9, 0.9, 0.0])  # row sum 1.8: gamma * 1.8 > 1 for gamma > 0.56
    chain = infsa.absorbing_chain(A, 0.9)
    assert not chain.valid and chain.R[0] < 0
    with pytest.raises(ValueError, match="valid"):
        infsa.random_walk_visits(chain.M)

"""toy.py: the rankings of the 5-token graph against hand-computed Katz sums and the chain's expected visits,
Katz against random walks, and the command line."""
import matplotlib.pyplot as plt
import pytest
import torch

import infsa
import toy


def test_one_hop_ranks_token_0_and_multi_hop_token_4():
    A, one_hop, katz, katz_walks = toy.toy_scores(gamma=0.9, walks=2000)
    assert int(one_hop.argmax()) == 0 and int(katz.argmax()) == 4 and int(katz_walks.argmax()) == 4
    torch.testing.assert_close(one_hop, torch.tensor([1.8, 0, 0, 0.9, 0.9], dtype=torch.float64))  # gamma 1^T A
    # Katz in of token j: the discounted walks that end at j, gamma^length each
    torch.testing.assert_close(katz, torch.tensor([1.8, 0, 0, 0.9 + 2 * 0.81, 0.9 + 0.81 + 2 * 0.729], dtype=torch.float64))
    visits = infsa.absorbing_chain(A, 0.9).fundamental.sum(0)  # 1^T (I - gamma A)^-1 = 1 + Katz in: the same ranking
    torch.testing.assert_close(visits, katz + 1)
    torch.testing.assert_close(katz_walks, katz, atol=0.1, rtol=0)  # random walks, no matrix inverse, agree


def test_cli_draws_and_a_small_discount_gives_the_one_hop_ranking(tmp_path, capsys):
    toy.main(["--out_dir", str(tmp_path)])
    text = capsys.readouterr().out
    assert "one hop: 0:1.80" in text and "Katz in: 0:1.80" in text and "-> token 4 first" in text
    img = plt.imread(tmp_path / "toy.png")
    assert img.ndim == 3 and img[..., :3].std() > 0.05
    _, _, katz, _ = toy.main(["--gamma", "0.3", "--walks", "10", "--out_dir", str(tmp_path)])
    assert int(katz.argmax()) == 0  # 2 * 0.3 > 0.3 + 2 * 0.09 > 0.3 + 0.09 + 2 * 0.027


@pytest.mark.parametrize("value", ["0", "1", "1.5"])
def test_bad_gamma_is_one_line(value, capsys):
    with pytest.raises(SystemExit) as e:
        toy.main(["--gamma", value])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "--gamma must lie in (0, 1)" in err

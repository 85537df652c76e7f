"""model.py: the attention switch computes what infsa.py says, gamma trains, counts are right;
and loader.evaluate's views of each image."""
import contextlib

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import data
import infsa
import loader
import model
import train
from model import ViT, ViTConfig, paper_4l64h

KINDS = ["softmax", "pure", "linear"]


def tiny(attn, **kw):
    torch.manual_seed(0)
    return ViT(ViTConfig(image_size=16, patch_size=4, n_layer=2, n_head=2, n_embd=16, attn=attn,
                         **kw), verbose=False)


def test_paper_preset_parameter_count_close_to_53_5M():
    cfg = paper_4l64h()
    d, L, N, r = 1024, 4, 197, 4
    block = (2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 64 + (r * d * d + r * d)
             + (r * d * d + d))
    by_hand = (3 * 16 * 16 * d + d) + d + N * d + L * block + 2 * d + (d * 1000 + 1000)
    n = ViT(cfg, verbose=False).num_params()
    assert n == by_hand
    # 52.4M: width 1024 is inferred, the paper's exact extras are unknown
    assert abs(n - 53.5e6) / 53.5e6 < 0.03


@pytest.mark.parametrize("attn", KINDS)
def test_attention_module_matches_infsa(attn):
    m = tiny(attn, hops=2).blocks[0].attn
    x = torch.randn(3, 17, 16)
    B, N, C, H = 3, 17, 16, 2
    q, k, v = (x @ m.qkv.weight.T + m.qkv.bias).split(C, dim=-1)
    q, k, v = (t.reshape(B, N, H, C // H).transpose(1, 2) for t in (q, k, v))  # (B, H, N, d)
    gamma = torch.sigmoid(m.gamma_logit).view(H, 1, 1) if attn != "softmax" else None
    ref = {"softmax": lambda: infsa.softmax_attention_materialized(q, k, v)[0],
           "pure": lambda: infsa.neumann_series(infsa.affinity(q, k), v, gamma, 2),
           "linear": lambda: infsa.linear_infsa(q, k, v, gamma)}[attn]()
    ref = ref.transpose(1, 2).reshape(B, N, C) @ m.proj.weight.T + m.proj.bias
    out = m(x)
    torch.testing.assert_close(out.expand(B, N, C), ref, rtol=1e-4, atol=1e-5)
    if attn == "linear":
        assert out.shape == (B, 1, C)  # one context vector, broadcast by the residual add
    if attn == "softmax":  # the map is P = softmax_weights(q, k), not a product with v
        torch.testing.assert_close(m.maps(x)["P"], infsa.softmax_weights(q, k), rtol=1e-5,
                                   atol=1e-6)


@pytest.mark.parametrize("attn", KINDS)
def test_forward_loss_and_gamma_gradients(attn):
    m = tiny(attn)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    logits, loss = m(x, y)
    assert logits.shape == (4, 10) and torch.isfinite(loss)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, y))
    loss.backward()
    if attn == "softmax":  # softmax has no gamma: no parameter, nothing in a checkpoint
        assert not any("gamma" in n for n, _ in m.named_parameters()) and m.gammas() is None
    else:
        grad = m.blocks[0].attn.gamma_logit.grad
        assert torch.isfinite(grad).all() and (grad.abs() > 0).all()


def test_pure_zero_padding_keeps_gradients():
    """model.pure_attention pads N = 17 to 24 with zero tokens on the CPU; the weights' gradients
    must equal those of the unpadded Neumann sum."""
    m = tiny("pure", hops=3).blocks[0].attn
    x = torch.randn(3, 17, 16)
    m(x).square().sum().backward()
    padded = m.qkv.weight.grad.clone()
    m.zero_grad()
    q, k, v = m.qkv(x).view(3, 17, 3, 2, 8).permute(2, 0, 3, 1, 4)  # each (B, H, N, d)
    y = infsa.neumann_series(infsa.affinity(q, k), v, m.gamma().view(2, 1, 1), 3)
    m.proj(y.transpose(1, 2).reshape(3, 17, 16)).square().sum().backward()
    torch.testing.assert_close(padded, m.qkv.weight.grad, rtol=1e-4, atol=1e-6)


def test_pure_attention_in_fp16_does_not_overflow():
    """Large queries and keys make S z pass fp16's 65,504 while A_hat z stays small: in fp16 the
    model's Pure-InfSA must stay finite and close to the fp64 sum."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (30 * torch.randn(2, 2, 65, 16, generator=g) for _ in range(3))
    gamma = torch.tensor([0.6, 0.9]).view(2, 1, 1)
    ref = infsa.pure_infsa(q.double(), k.double(), v.double(), gamma.double(), 3)
    assert (infsa.relu_scores(q, k) @ v).abs().max() > 65504  # the product that would overflow
    out = model.pure_attention(q.half(), k.half(), v.half(), gamma, 3)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("overlap", [0, 1, 2])
def test_patch_embedding_is_a_strided_convolution(overlap):
    m, k = tiny("linear", patch_overlap=overlap), 4 + 2 * overlap  # windows of k x k, stride 4
    x = torch.randn(2, 3, 16, 16)
    conv = torch.nn.functional.conv2d(x, m.patch.weight.view(16, 3, k, k), m.patch.bias, stride=4,
                                      padding=overlap)
    torch.testing.assert_close(m.embed(x), conv.flatten(2).transpose(1, 2),  # (B, 16, C)
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attn", KINDS)
def test_attention_maps(attn):
    m = tiny(attn)
    x = torch.randn(2, 3, 16, 16)
    logits, maps = m.attention_maps(x)
    torch.testing.assert_close(logits, m(x)[0])
    # nothing kept afterwards: no hook stays on a layer
    assert len(maps) == 2 and all(not blk.attn._forward_hooks for blk in m.blocks)
    mp = maps[1]
    if attn == "softmax":
        assert mp["P"].shape == (2, 2, 17, 17)
        torch.testing.assert_close(mp["cls"].sum(-1), torch.ones(2, 2))
    elif attn == "pure":
        torch.testing.assert_close(mp["A"].square().sum((-2, -1)), torch.ones(2, 2), rtol=1e-4,
                                   atol=1e-4)
        A, gamma = mp["A"][1, 0].double(), mp["gamma"][0].item()
        torch.testing.assert_close(mp["katz"][1, 0].double(), infsa.katz_centrality(A, gamma),
                                   rtol=1e-4, atol=1e-5)
    else:
        torch.testing.assert_close(mp["a"].sum(-1), torch.ones(2, 2), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attn", KINDS)
def test_flop_count_matches_pytorch_flop_counter(attn, monkeypatch):
    m = tiny(attn, hops=3, patch_overlap=1)
    # count softmax in its materialised form: the counter does not see inside every SDPA kernel
    monkeypatch.setattr(infsa, "softmax_attention",
                        lambda q, k, v: infsa.softmax_attention_materialized(q, k, v)[0])
    # and Pure-InfSA without the zero tokens that pad N to a multiple of 8: they only cost, they
    # compute nothing
    monkeypatch.setattr(model, "pure_attention",
                        lambda q, k, v, g, hops: infsa.pure_infsa(q, k, v, g, hops))
    with FlopCounterMode(display=False) as fc:
        m(torch.randn(1, 3, 16, 16))
    # the counter sees matrix products only; Linear-InfSA's three sums over the tokens are products
    # and sums
    uncounted = 2 * 6 * 17 * 16 if attn == "linear" else 0  # layers x 6 N d
    assert fc.get_total_flops() == m.flops_per_image() - uncounted


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="attn must be one of"):
        ViTConfig(attn="cosine")
    with pytest.raises(ValueError, match="divisible"):
        ViTConfig(n_embd=100, n_head=3)


def test_flip_averages_the_logits_of_each_image_and_its_mirror():
    """loader.evaluate(views="flip") against the logits averaged image by image: its accuracy and
    mean loss; the result is the same for the mirrored set, and differs from plain evaluation."""
    m, ctx = tiny("softmax").eval(), contextlib.nullcontext()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(24, 3, 16, 16, generator=g), torch.randint(0, 10, (24,), generator=g)
    batches = [(x[:16], y[:16]), (x[16:], y[16:])]
    mean_logits = torch.cat([(m(x[i:i + 1])[0] + m(x[i:i + 1].flip(-1))[0]) / 2 for i in range(24)])
    acc, loss = loader.evaluate(m, batches, ctx, "flip")
    assert acc == pytest.approx((mean_logits.argmax(-1) == y).float().mean().item())
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(mean_logits, y).item(), rel=1e-5)
    mirrored = loader.evaluate(m, [(b.flip(-1), t) for b, t in batches], ctx, "flip")
    assert mirrored[1] == pytest.approx(loss, rel=1e-5)
    assert loader.evaluate(m, batches, ctx)[1] != pytest.approx(loss, rel=1e-3)


def test_flip_move_averages_over_the_image_moved_four_ways():
    """loader.evaluate(views="flip_move") against the logits of 5 views built pixel by pixel (the
    image, and moved 2 pixels down, up, right, left with zeros coming in), each with its mirror:
    accuracy and mean loss."""
    m, ctx = tiny("softmax").eval(), contextlib.nullcontext()
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(12, 3, 16, 16, generator=g), torch.randint(0, 10, (12,), generator=g)

    def moved(img, dy, dx):  # out[r, c] = img[r - dy, c - dx], zero where that is outside the image
        out = torch.zeros_like(img)
        for r in range(16):
            for c in range(16):
                if 0 <= r - dy < 16 and 0 <= c - dx < 16:
                    out[:, :, r, c] = img[:, :, r - dy, c - dx]
        return out
    views = [moved(x, dy, dx) for dy, dx in ((0, 0), (2, 0), (-2, 0), (0, 2), (0, -2))]
    mean_logits = sum(m(v)[0] + m(v.flip(-1))[0] for v in views) / 10
    acc, loss = loader.evaluate(m, [(x[:8], y[:8]), (x[8:], y[8:])], ctx, "flip_move")
    assert acc == pytest.approx((mean_logits.argmax(-1) == y).float().mean().item())
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(mean_logits, y).item(), rel=1e-5)
    assert loader.evaluate(m, [(x, y)], ctx, "flip")[1] != pytest.approx(loss, rel=1e-3)


def test_a_finished_run_resumed_with_other_evaluation_views_is_evaluated_again(tmp_path):
    """--init_from resume after the last step trains nothing and evaluates the test set with the
    new views: the summary's test accuracy is the checkpoint's weights evaluated so, recomputed
    here."""
    args = ["--n_train", "512", "--n_test", "256", "--n_layer", "1", "--n_embd", "16", "--n_head",
            "2", "--epochs", "3", "--device", "cpu", "--out_dir", str(tmp_path)]
    first = train.main(args)
    again = train.main(["--init_from", "resume", "--out_dir", str(tmp_path), "--eval_views",
                        "flip_move"])
    c = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    m = ViT(ViTConfig(**c["model_args"]), verbose=False)
    m.load_state_dict(c["model"])
    d = data.load("shapes", n_train=512, n_test=256)
    x = loader.normalize(d["x_test"], c["mean"], c["std"])
    want = loader.evaluate(m, [(x, d["y_test"])], contextlib.nullcontext(), "flip_move")[0]
    assert again["steps"] == first["steps"] and again["best_acc"] == first["best_acc"]
    assert again["test_acc"] == pytest.approx(want) and first["test_acc"] != pytest.approx(want)

"""loader.py: batches on the device and the augmentations, each against a reference computed
another way."""
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

import loader
from model import ViT, ViTConfig


def test_mixed_targets_weigh_the_two_labels_by_lam():
    """The loss against mix_pairs's targets is lam CE(y) + (1 - lam) CE(y of the partner),
    recomputed from the same draw of partners and lam."""
    model = ViT(ViTConfig(attn="softmax", image_size=16, n_layer=1, n_head=2, n_embd=16),
                verbose=False).eval()
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8)
    for mixup, cutmix in ((0.8, 0.0), (0.0, 1.0)):
        torch.manual_seed(0)
        loss = model(*loader.mix_pairs(x, y, 10, mixup, cutmix), 0.1)[1].item()
        torch.manual_seed(0)
        use_cutmix = cutmix > 0
        alpha = 0.8 + 0.2 * use_cutmix
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        perm = torch.randperm(8)
        xm, lam = (loader.paste_box(x, x[perm], lam) if use_cutmix
                   else (lam * x + (1 - lam) * x[perm], lam))
        ce = lambda t: F.cross_entropy(model(xm)[0], t, label_smoothing=0.1).item()  # noqa: E731
        assert 0.05 < lam < 0.95
        assert loss == pytest.approx(lam * ce(y) + (1 - lam) * ce(y[perm]), rel=1e-5)
    assert loader.mix_pairs(x, y, 10) == (x, y)


def test_paste_box_keeps_the_reported_area():
    x, other = torch.zeros(2, 3, 10, 12), torch.ones(2, 3, 10, 12)
    torch.manual_seed(0)
    for lam in (0.1, 0.5, 0.9, 0.99):
        mixed, kept = loader.paste_box(x, other, lam)
        pasted = mixed[0, 0]  # 1 inside the box, 0 outside
        assert kept == pytest.approx(1 - pasted.mean().item())  # lam follows the clipped box
        rows, cols = pasted.bool().any(1), pasted.bool().any(0)
        assert torch.equal(pasted.bool(), rows[:, None] & cols[None, :])
        assert torch.equal(mixed[0], mixed[1])
        assert x.sum() == 0  # the input is not modified


def test_random_crop_is_a_shifted_window_and_flip_mirrors():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    out = loader.random_crop_flip(x, 2, torch.rand(2, 3, generator=g))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        windows = [padded[i, :, a:a + 8, b:b + 8] for a in range(5) for b in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)
    flips = loader.random_crop_flip(x.repeat(50, 1, 1, 1), 0, torch.rand(100, 3, generator=g))
    mirrored = (flips == x.repeat(50, 1, 1, 1).flip(-1)).flatten(1).all(1)
    assert 0.3 < mirrored.float().mean() < 0.7  # about half the images mirrored, the rest unchanged
    assert ((flips == x.repeat(50, 1, 1, 1)).flatten(1).all(1) | mirrored).all()


def test_loader_epochs_cover_the_data_once():
    x = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 4, 4).contiguous()
    y = torch.arange(10)
    ld = loader.Loader(x, y, 3, torch.zeros(3), torch.ones(3) / 255, train=True)
    seen = torch.cat([yb for _, yb in ld])
    assert len(ld) == 3 and len(seen) == 9 and len(set(seen.tolist())) == 9
    ld.start = 3  # a run stopped after the epoch's last batch resumes to no batches
    assert list(ld) == []
    for xb, yb in loader.Loader(x, y, 4, torch.zeros(3), torch.ones(3) / 255, train=False):
        # normalised with mean 0, std 1/255: the raw value
        torch.testing.assert_close(xb[:, 0, 0, 0], yb.float())


def _ramp(B=4, H=16, W=16):
    """Images whose value is the column index."""
    return torch.arange(W, dtype=torch.float32).view(1, 1, 1, W).expand(B, 3, H, W).contiguous()


def test_random_affine_identity_shift_and_rotation():
    x = torch.rand(4, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    out = loader.random_affine(x, torch.rand(4, 4, generator=g))  # zero strengths: identity
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)
    out = loader.random_affine(_ramp(), torch.rand(4, 4, generator=g), zoom=0.2)
    # column c (centre 7.5) takes input column 7.5 + (c - 7.5) / s: (c - 7.5) / (out - 7.5) = s
    s = ((_ramp() - 7.5) / (out - 7.5))[:, :, 3:-3, 3:-3].flatten(1)  # away from the borders
    torch.testing.assert_close(s, s[:, :1].expand_as(s), atol=1e-4, rtol=0)  # one zoom an image
    assert ((s[:, 0] - 1).abs() <= 0.2 + 1e-4).all() and s[:, 0].std() > 0  # in range, not equal
    yy, xx = torch.meshgrid(torch.arange(32.0) - 15.5, torch.arange(32.0) - 15.5, indexing="ij")
    blob = torch.exp(-(xx ** 2 + yy ** 2) / 40).expand(4, 3, 32, 32)  # rotation-invariant image
    disk = (xx ** 2 + yy ** 2) < 14 ** 2  # inside the inscribed circle: nothing from the borders
    out = loader.random_affine(blob, torch.rand(4, 4, generator=g), rotate=45)
    torch.testing.assert_close(out[..., disk], blob[..., disk], atol=2e-2, rtol=0)
    assert (out - blob).abs().amax() > 0  # the corners did move


def test_color_jitter_keeps_range_and_zero_is_identity():
    x = torch.rand(8, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(loader.color_jitter(x, torch.rand(8, 3, generator=g), 0.0), x)
    out = loader.color_jitter(x, torch.rand(8, 3, generator=g), 0.4)
    assert out.min() >= 0 and out.max() <= 1 and not torch.allclose(out, x)
    grey = x.mean(1, keepdim=True).expand_as(x)  # a grey image keeps equal channels
    out = loader.color_jitter(grey, torch.rand(8, 3, generator=g), 0.4)
    torch.testing.assert_close(out, out[:, :1].expand_as(out))


def test_random_erase_sets_one_rectangle_of_the_asked_area():
    x = torch.ones(200, 1, 20, 20)
    g = torch.Generator().manual_seed(0)
    u = lambda: torch.rand(200, 5, generator=g)  # noqa: E731
    assert torch.equal(loader.random_erase(x, u(), p=0.0), x)
    out = loader.random_erase(x, u(), p=1.0)[:, 0] == 0  # (B, H, W) erased pixels
    area = out.flatten(1).float().mean(1)
    assert (area > 0).all() and (area <= 0.25 + 0.1).all() and area.mean() > 0.05
    for m in out[:20]:  # each erased set is a full rectangle: rows x columns
        rows, cols = m.any(1), m.any(0)
        assert torch.equal(m, rows[:, None] & cols[None, :])
    half = loader.random_erase(x, u(), p=0.5)[:, 0].eq(0).flatten(1).any(1).float().mean()
    assert 0.35 < half < 0.65


@pytest.mark.skipif(not torch.cuda.is_available() and shutil.which("g++") is None
                    and shutil.which("c++") is None, reason="compiling on a CPU needs a compiler")
def test_compiled_augmentation_equals_the_eager_one():
    """train.py compiles the pipeline on GPUs; it must compute exactly what the eager code
    computes. On a GPU, as train.py runs it; without one, compiled for the CPU."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, device=dev)
    ld = loader.Loader(x, torch.arange(64, device=dev) % 10, 32, torch.full((3,), 0.5),
                       torch.full((3,), 0.25), True, "policy", compile=True)  # mean, std moved
    g = torch.Generator().manual_seed(1)
    u = torch.rand(32, sum(loader.DRAWS.values()), generator=g).to(dev)
    eager = ld.augment(x[:32], u)
    torch.testing.assert_close(ld.transform(x[:32], u), eager, atol=1e-4, rtol=0)
    assert (eager == 0).any() and eager.std() > 0.5  # erased boxes, and real image content


def _policy(x, name, m):
    """random_policy with op `name` and magnitude m for every image."""
    u = torch.tensor([(loader.POLICY.index(name) + 0.5) / len(loader.POLICY), (m + 1) / 2])
    return loader.random_policy(x, u.expand(len(x), 2))


def test_random_policy_colour_ops_match_their_formulas():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 3, 8, 8), generator=g).float() / 255
    mean, grey = x.mean((1, 2, 3), keepdim=True), x.mean(1, keepdim=True)
    box = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), torch.ones(3, 1, 3, 3) / 9,
                   groups=3)  # the 3x3 mean, as a convolution
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    v = (x * 255).round().long()
    want = {"identity": x, "brightness": x * 1.45, "contrast": (x - mean) * 0.55 + mean,
            "saturation": (x - grey) * 1.45 + grey, "sharpness": box + 1.45 * (x - box),
            "posterize": (v // 4 * 4).float() / 255,  # |m| = 0.5: the 2 low bits dropped
            "solarize": torch.where(x > 0.5, 1 - x, x), "autocontrast": (x - lo) / (hi - lo)}
    for name, ref in want.items():
        m = -0.5 if name == "contrast" else 0.5
        torch.testing.assert_close(_policy(x, name, m), ref.clamp(0, 1), atol=1e-5, rtol=0,
                                   msg=name)
    torch.testing.assert_close(_policy(x, "posterize", 1.0), (v // 16 * 16).float() / 255,
                               atol=1e-6, rtol=0)


def test_random_policy_geometric_ops_rotate_shear_and_shift():
    x = torch.rand(4, 3, 16, 16)
    u = torch.tensor([[1.0, 0.5, 0.5, 0.5]]).expand(4, 4)
    turned = loader.random_affine(x, u, rotate=30)  # +30 degrees
    torch.testing.assert_close(_policy(x, "rotate", 1.0), turned, atol=1e-5, rtol=0)
    ramp = _ramp() / 16  # value = column index / 16
    d = (_policy(ramp, "shift_x", 0.5) - ramp)[..., 4:-4, 4:-4] * 16  # in columns
    torch.testing.assert_close(d, torch.full_like(d, 0.15 * 16), atol=1e-4, rtol=0)  # 0.3 m wide
    # input column = output column + 0.15 (row offset)
    d = (_policy(ramp, "shear_x", 0.5) - ramp)[..., 5:-5, 5:-5] * 16
    rows = torch.arange(5, 11.0) - 7.5
    torch.testing.assert_close(d, (0.15 * rows)[:, None].expand_as(d), atol=1e-4, rtol=0)
    d = (_policy(ramp.mT, "shear_y", 0.5) - ramp.mT)[..., 5:-5, 5:-5] * 16  # rows, columns swapped
    torch.testing.assert_close(d, (0.15 * rows)[None, :].expand_as(d), atol=1e-4, rtol=0)


def test_random_policy_picks_each_op_about_equally_often():
    x = torch.rand(1, 3, 8, 8).expand(2600, 3, 8, 8)
    u = torch.rand(2600, 2, generator=torch.Generator().manual_seed(0))
    changed = (loader.random_policy(x, u) - x).abs().flatten(1).amax(1) > 1e-4
    share = 1 - changed.float().mean()  # identity, and magnitudes near 0
    assert 1 / len(loader.POLICY) - 0.02 < share < 0.25 and not math.isnan(share)

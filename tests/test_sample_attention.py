"""sample_attention.py: the metrics against hand-computed cases, the maps against their definitions,
and end-to-end runs on tiny checkpoints that train.py itself writes."""
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

import data
import runtime
import sample_attention as sa
import train
from model import ViT, ViTConfig

# ---------------------------------------------------------------- ROC-AUC, PR-AUC


def test_roc_auc_perfect_reversed_and_all_tied():
    y = [0, 0, 1, 1]
    assert sa.roc_auc([0.1, 0.2, 0.8, 0.9], y) == 1.0
    assert sa.roc_auc([0.9, 0.8, 0.2, 0.1], y) == 0.0
    assert sa.roc_auc([0.5, 0.5, 0.5, 0.5], y) == 0.5


def test_roc_auc_counts_ties_half():
    # (positive, negative) pairs: (0.4, 0.1) 1, (0.4, 0.4) 1/2, (0.8, 0.1) 1, (0.8, 0.4) 1 -> 3.5 / 4
    assert sa.roc_auc([0.1, 0.4, 0.4, 0.8], [0, 1, 0, 1]) == pytest.approx(0.875)


def test_roc_auc_equals_the_area_under_the_roc_curve_on_many_ties():
    """A second method: the trapezoid area under the (FPR, TPR) points of every distinct threshold."""
    rng = np.random.default_rng(0)
    s, y = rng.integers(0, 4, 40).astype(float), rng.random(40) < 0.4
    pts = [(0.0, 0.0)] + [((s[~y] >= t).mean(), (s[y] >= t).mean()) for t in sorted(set(s), reverse=True)]
    fpr, tpr = np.array(pts).T
    assert sa.roc_auc(s, y) == pytest.approx(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def test_average_precision_hand_cases():
    assert sa.average_precision([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0]) == 1.0
    # ranking hit, miss, hit, miss: precision 1/1 at the first hit, 2/3 at the second
    assert sa.average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx((1 + 2 / 3) / 2)
    # reversed: the hits come 3rd and 4th
    assert sa.average_precision([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == pytest.approx((1 / 3 + 2 / 4) / 2)
    # all tied: one threshold, precision = prevalence
    assert sa.average_precision([0.5] * 4, [1, 0, 0, 0]) == pytest.approx(0.25)
    # a tie of a hit and a miss enters at once: recall 1/2 at precision 1/2, then recall 1 at 2/3
    assert sa.average_precision([0.5, 0.5, 0.2], [1, 0, 1]) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)

# ---------------------------------------------------------------- patches, curves


def test_patch_labels_use_the_covered_fraction():
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)  # 2x2 grid of 2x2 patches
    mask[0, :2, :2] = True   # patch 0: all covered
    mask[0, :2, 2] = True    # patch 1: half
    mask[0, 2, 0] = True     # patch 2: a quarter
    assert sa.patch_labels(mask, 2, 0.5).tolist() == [[True, True, False, False]]
    assert sa.patch_labels(mask, 2, 0.75).tolist() == [[True, False, False, False]]
    assert sa.patch_labels(mask, 2, 0.25).tolist() == [[True, True, True, False]]


def test_area_trapezoid():
    assert sa.area([1.0, 0.5, 0.0]) == pytest.approx(0.5)
    assert sa.area([1.0, 1.0, 1.0, 1.0]) == pytest.approx(1.0)
    assert sa.area([0.0, 1.0, 1.0]) == pytest.approx(0.75)


def test_removal_rank_orders_by_score_and_breaks_ties_at_random():
    s = torch.tensor([[0.1, 0.9, 0.5, 0.5]])
    seen = set()
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        morf, lerf = sa.removal_rank(s, "morf", g)[0].tolist(), sa.removal_rank(s, "lerf", g)[0].tolist()
        assert morf[1] == 0 and morf[0] == 3 and sorted(morf[2:]) == [1, 2]
        assert lerf[0] == 0 and lerf[1] == 3 and sorted(lerf[2:]) == [1, 2]
        assert sorted(sa.removal_rank(s, "random", g)[0].tolist()) == [0, 1, 2, 3]
        seen.add(tuple(morf[2:]))
    assert seen == {(1, 2), (2, 1)}  # neither tied patch always goes first


def test_blank_patches_zeroes_exactly_the_first_k():
    x = torch.arange(1, 17, dtype=torch.float32).view(1, 1, 4, 4)
    rank = torch.tensor([[2, 0, 3, 1]])  # patches top-left, top-right, bottom-left, bottom-right
    keep = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.float32)
    assert torch.equal(sa.blank_patches(x, rank, 2, 2), x * keep)
    assert torch.equal(sa.blank_patches(x, rank, 0, 2), x)
    assert (sa.blank_patches(x, rank, 4, 2) == 0).all()

# ---------------------------------------------------------------- maps


def test_rollout_is_the_product_of_residual_attention():
    g = torch.Generator().manual_seed(0)
    P1, P2 = (torch.rand(1, 2, 4, 4, generator=g).softmax(-1) for _ in range(2))  # (B, H, N, N)
    layers = [{"P": P, "cls": P[:, :, 0]} for P in (P1, P2)]
    out = sa.token_scores(layers, "softmax", hops=1)
    I = torch.eye(4)
    R = (0.5 * P2.mean(1) + 0.5 * I) @ (0.5 * P1.mean(1) + 0.5 * I)
    torch.testing.assert_close(out["rollout@2"], R[:, 0])
    torch.testing.assert_close(out["cls@1"], P1[:, :, 0].mean(1))
    torch.testing.assert_close(sa.token_scores(layers, "softmax", 1, head=1)["cls@2"], P2[:, 1, 0])
    assert out["rollout@2"].sum().item() == pytest.approx(1.0)  # still a distribution over tokens


def test_pure_hops_are_rows_of_powers_of_A():
    A = torch.rand(1, 2, 5, 5, generator=torch.Generator().manual_seed(1))
    out = sa.token_scores([{"A": A, "katz": torch.zeros(1, 2, 5)}], "pure", hops=3)
    torch.testing.assert_close(out["hop1@1"], A[:, :, 0].mean(1))
    torch.testing.assert_close(out["hop3@1"], torch.linalg.matrix_power(A, 3)[:, :, 0].mean(1))


# ---------------------------------------------------------------- tiny runs, end to end

def make_run(folder, kind, *argv):
    """A tiny run, two steps of train.py itself: its checkpoint format, whatever it becomes."""
    train.main(["--attn", kind, "--patch_size", "8", "--n_layer", "2", "--n_head", "2", "--n_embd", "16", "--epochs", "1",
                "--min_steps", "0", "--seed", "3", "--device", "cpu", "--out_dir", str(folder), *argv])
    return str(folder)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return [make_run(tmp_path_factory.mktemp(kind), kind, "--n_train", "128", "--n_test", "48") for kind in ("softmax", "pure", "linear")]


def test_compare_with_metrics_end_to_end(runs, tmp_path, capsys):
    out = tmp_path / "png"
    res = sa.main(["--runs", ",".join(runs), "--metrics", "true", "--n_metric", "30", "--steps", "4",
                   "--images", "0,47", "--out_dir", str(out), "--device", "cpu"])
    text = capsys.readouterr().out
    for name in ("compare.png", "curves.png", "morf_lerf.png"):
        assert f"wrote {out / name}" in text
        img = plt.imread(out / name)
        assert img.ndim == 3 and min(img.shape[:2]) > 200 and img[..., :3].std() > 0.05  # a real picture
    for kind, name in (("softmax", "cls@2"), ("pure", "katz@2"), ("linear", "a@2")):
        assert f"| {kind} | {name} |" in text
    for r in res:
        c = r["curves"]
        assert r["n"] == 30 and len(c["morf"]) == 5
        for key in ("roc", "pr", "morf_aoc", "lerf_auc", "acc"):
            assert 0.0 <= r[key] <= 1.0
        assert abs(r["roc_rand"] - 0.5) < 0.1  # random scores: chance
        assert c["morf"][0] == c["lerf"][0] == c["random"][0]  # nothing blanked: the same images
        assert c["morf"][-1] == c["lerf"][-1] == c["random"][-1]  # everything blanked
        assert r["morf_aoc"] == pytest.approx(1 - sa.area(c["morf"]))


def test_single_run_maps_hops_and_one_head(runs, tmp_path, capsys):
    sa.main(["--runs", runs[1], "--out_dir", str(tmp_path), "--head", "2", "--score_map", "hop2", "--metrics", "true",
             "--n_metric", "8", "--steps", "2", "--device", "cpu"])
    text = capsys.readouterr().out
    assert f"wrote {tmp_path / 'maps.png'}" in text and "| pure | hop2@2 |" in text and "head 2" in text
    assert plt.imread(tmp_path / "maps.png").shape[1] > plt.imread(tmp_path / "maps.png").shape[0]  # 1 + 2 + 2 columns


def one_line_error(capsys, argv, words):
    with pytest.raises(SystemExit) as e:
        sa.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error:") and "\n" not in err and words in err


def test_errors_are_one_line(runs, tmp_path, capsys):
    one_line_error(capsys, ["--runs", str(tmp_path / "none.pt")], "no checkpoint")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    one_line_error(capsys, ["--runs", str(tmp_path / "bad.pt")], "not a readable checkpoint")
    one_line_error(capsys, ["--runs", runs[0], "--images", "0,48"], "indices of the test split's 48 images, 0..47; got '0,48'")
    one_line_error(capsys, ["--runs", runs[0], "--head", "3"], "--head 3 --layer 0 out of range")
    one_line_error(capsys, ["--runs", runs[0], "--images", "0,x"], "--images takes comma-separated indices")
    one_line_error(capsys, ["--runs", runs[2], "--score_map", "katz"], "not a map of linear")
    one_line_error(capsys, ["--runs", runs[0], "--steps", "0"], "--steps must be at least 1")
    one_line_error(capsys, ["--runs", runs[0], "--device", "foo"], "--device foo is not usable here")
    one_line_error(capsys, ["--runs", runs[0], "--steps", "4"], "--steps applies only with --metrics true")
    (tmp_path / "file").write_text("")
    one_line_error(capsys, ["--runs", runs[0], "--out_dir", str(tmp_path / "file" / "png")], "cannot write")
    ckpt = runtime.load_checkpoint(f"{runs[0]}/ckpt.pt")
    torch.save({k: v for k, v in ckpt.items() if k != "mean"}, tmp_path / "old.pt")
    one_line_error(capsys, ["--runs", str(tmp_path / "old.pt")], "does not fit this code (KeyError: 'mean')")
    for key, value, words in (("dataset", "cifar10", "needs object masks"), ("seed", 4, "tested on other images")):
        data.write_atomic(str(tmp_path / "other.pt"), lambda f: torch.save(dict(ckpt, config=dict(ckpt["config"], **{key: value})), f), "wb")
        one_line_error(capsys, ["--runs", f"{tmp_path / 'other.pt'},{runs[1]}" if key == "seed" else str(tmp_path / "other.pt"),
                                "--metrics", "true"], words)


def test_a_run_on_a_folder_of_other_than_10_classes(tmp_path, capsys):
    """The model has one output per class of the run; a folder whose classes changed since is refused."""
    from PIL import Image
    classes = ["ant", "bee", "owl"]
    for split in ("train", "test"):
        for i, c in enumerate(classes):
            (tmp_path / "d" / split / c).mkdir(parents=True)
            Image.new("RGB", (32, 32), (80 * i, 0, 0)).save(tmp_path / "d" / split / c / "0.png")
    run = make_run(tmp_path / "run", "linear", "--dataset", "folder", "--data_dir", str(tmp_path / "d"), "--batch_size", "3")
    sa.main(["--runs", run, "--images", "0,2", "--device", "cpu"])
    assert f"wrote {tmp_path / 'run' / 'maps.png'}" in capsys.readouterr().out
    for split in ("train", "test"):
        (tmp_path / "d" / split / "bee").rename(tmp_path / "d" / split / "bees")
    one_line_error(capsys, ["--runs", run, "--device", "cpu"], "was trained on other classes than")

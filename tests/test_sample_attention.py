"""sample_attention.py: the metrics against hand-computed cases, the maps against their
definitions, and end-to-end runs on tiny checkpoints that train.py itself writes."""
import itertools
import os
import re
import warnings
from types import SimpleNamespace

import matplotlib.figure
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

import data
import loader
import runtime
import sample_attention as sa
import train
from model import ViT, ViTConfig


def test_roc_auc_perfect_reversed_all_tied_and_ties_counted_half():
    y = [0, 0, 1, 1]
    assert sa.roc_auc([0.1, 0.2, 0.8, 0.9], y) == 1.0
    assert sa.roc_auc([0.9, 0.8, 0.2, 0.1], y) == 0.0
    assert sa.roc_auc([0.5, 0.5, 0.5, 0.5], y) == 0.5
    # (positive, negative) pairs: (.4, .1) 1, (.4, .4) 1/2, (.8, .1) 1, (.8, .4) 1 -> 3.5 / 4
    assert sa.roc_auc([0.1, 0.4, 0.4, 0.8], [0, 1, 0, 1]) == pytest.approx(0.875)
    # a second method on many ties: the trapezoid area under (FPR, TPR) at every threshold
    rng = np.random.default_rng(0)
    s, y = rng.integers(0, 4, 40).astype(float), rng.random(40) < 0.4
    pts = [(0.0, 0.0)] + [((s[~y] >= t).mean(), (s[y] >= t).mean())
                          for t in sorted(set(s), reverse=True)]
    fpr, tpr = np.array(pts).T
    assert sa.roc_auc(s, y) == pytest.approx(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def test_average_precision_hand_cases():
    ap = sa.average_precision
    assert ap([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0]) == 1.0
    # ranking hit, miss, hit, miss: precision 1/1 at the first hit, 2/3 at the second
    assert ap([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx((1 + 2 / 3) / 2)
    # reversed: the hits come 3rd and 4th
    assert ap([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert ap([0.5] * 4, [1, 0, 0, 0]) == pytest.approx(0.25)  # all tied: the prevalence
    # a tie of a hit and a miss enters at once: recall 1/2 at precision 1/2, then recall 1 at 2/3
    assert ap([0.5, 0.5, 0.2], [1, 0, 1]) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)


def test_patch_labels_use_the_covered_fraction():
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)  # 2x2 grid of 2x2 patches
    mask[0, :2, :2] = mask[0, :2, 2] = mask[0, 2, 0] = True  # patches 0: all, 1: half, 2: 1/4
    assert sa.patch_labels(mask, 2, 0.5).tolist() == [[True, True, False, False]]
    assert sa.patch_labels(mask, 2, 0.75).tolist() == [[True, False, False, False]]
    assert sa.patch_labels(mask, 2, 0.25).tolist() == [[True, True, True, False]]


def test_area_is_the_trapezoid_rule():
    assert sa.area([1.0, 0.5, 0.0]) == pytest.approx(0.5)
    assert sa.area([1.0, 1.0, 1.0, 1.0]) == pytest.approx(1.0)
    assert sa.area([0.0, 1.0, 1.0]) == pytest.approx(0.75)


def test_removal_rank_orders_by_score_and_breaks_ties_at_random():
    s = torch.tensor([[0.1, 0.9, 0.5, 0.5]])
    seen = set()
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        morf, lerf = (sa.removal_rank(s, how, g)[0].tolist() for how in ("morf", "lerf"))
        assert morf[1] == 0 and morf[0] == 3 and sorted(morf[2:]) == [1, 2]
        assert lerf[0] == 0 and lerf[1] == 3 and sorted(lerf[2:]) == [1, 2]
        assert sorted(sa.removal_rank(s, "random", g)[0].tolist()) == [0, 1, 2, 3]
        seen.add(tuple(morf[2:]))
    assert seen == {(1, 2), (2, 1)}  # neither tied patch always goes first


def test_blank_patches_zeroes_exactly_the_first_k():
    x = torch.arange(1, 17, dtype=torch.float32).view(1, 1, 4, 4)
    rank = torch.tensor([[2, 0, 3, 1]])  # patches top-left, top-right, bottom-left, bottom-right
    keep = torch.tensor([[1, 1, 0, 0]] * 4, dtype=torch.float32)
    assert torch.equal(sa.blank_patches(x, rank, 2, 2), x * keep)
    assert torch.equal(sa.blank_patches(x, rank, 0, 2), x)
    assert (sa.blank_patches(x, rank, 4, 2) == 0).all()


def tiny_model(attn, dead=False):
    """An untrained 2-layer ViT; dead: every query 0, so every affinity is 0 and A_hat = 0."""
    torch.manual_seed(0)
    cfg = ViTConfig(attn=attn, n_layer=2, n_head=2, n_embd=16, patch_size=8)
    model = ViT(cfg, verbose=False).eval()
    for block in model.blocks if dead else ():
        block.attn.qkv.weight.data[:16], block.attn.qkv.bias.data[:16] = 0, 0
    return SimpleNamespace(model=model, vit=cfg, label=attn, path=attn, mean=torch.zeros(3),
                           std=torch.ones(3))


def test_pure_maps_are_cls_rows_of_powers_of_A_and_katz_in_centrality():
    run, x = tiny_model("pure"), data.load("shapes", n_train=0, n_test=3)["x_test"]
    maps = run.model.attention_maps(loader.normalize(x, run.mean, run.std))[1][0]
    A, out = maps["A"].detach(), sa.token_scores(run, x)  # A (B, H, N, N)
    torch.testing.assert_close(out["cls_Apow1@1"], A[:, :, 0, 1:].mean(1))
    A3 = torch.linalg.matrix_power(A, 3)
    torch.testing.assert_close(out["cls_Apow3@1"], A3[:, :, 0, 1:].mean(1))
    # Katz in-centrality ((I - gamma A^T)^-1 - I) 1, per head with its own gamma
    gamma, eye = maps["gamma"].double().view(1, -1, 1, 1), torch.eye(A.shape[-1]).double()
    katz = (torch.linalg.inv(eye - gamma * A.double().mT) - eye).sum(-1, keepdim=True)  # @ 1
    torch.testing.assert_close(out["katz@1"], katz[..., 0].float()[:, :, 1:].mean(1))


def test_an_all_zero_A_hat_is_finite_and_drawn_as_a_dead_layer():
    run, test = tiny_model("pure", dead=True), data.load("shapes", n_train=0, n_test=16)
    x, y = test["x_test"], test["y_test"]
    assert all((v == 0).all() for v in sa.token_scores(run, x).values())  # Katz through infsa
    with warnings.catch_warnings(action="error"):  # no 0/0 anywhere
        fig = sa.draw_grid([(run, "katz@2"), (run, "cls_Apow2@2")], x, y, None, test["classes"],
                           rows=1)
        run.map = "katz@2"
        res = sa.quality(run, x, y, test["mask_test"], steps=2)
    assert [ax.get_title() for ax in fig.axes] == [
        "pure: katz@2\nscale 0 to 0", "pure: cls_Apow2@2\nscale 0 to 0"]
    plt.close(fig)
    assert res[0]["ROC-AUC"][0] == 0.5 and np.isfinite(list(res[0].values())).all()


def test_metrics_refuse_masks_without_object_and_background(capsys):
    run, test = tiny_model("linear"), data.load("shapes", n_train=0, n_test=4)
    run.map = "a@2"
    with pytest.raises(SystemExit) as e:  # cover 0: every patch is object
        sa.quality(run, test["x_test"], test["y_test"], test["mask_test"], cover=0)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err
    assert err == "error: linear: no test image has object and background patches at cover 0"


def test_a_kind_of_map_shares_one_scale_named_over_its_column():
    run, test = tiny_model("softmax"), data.load("shapes", n_train=0, n_test=4)
    x, columns = test["x_test"], [(run, "cls@1"), (run, "cls@2")]
    maps = sa.token_scores(run, x)
    fig = sa.draw_grid(columns, x, test["y_test"], None, test["classes"], rows=2)
    top = max(maps["cls@1"][:2].max().item(), maps["cls@2"][:2].max().item())  # one scale
    assert len(fig.axes) == 4 and {ax.images[-1].get_clim() for ax in fig.axes} == {(0, top)}
    assert [ax.get_title() for ax in fig.axes] == [
        f"softmax: cls@1\nscale 0 to {top:.2g}", f"softmax: cls@2\nscale 0 to {top:.2g}", "", ""]
    for ax, row, name in zip(fig.axes, (0, 0, 1, 1), ("cls@1", "cls@2") * 2):  # the maps drawn
        assert np.array_equal(ax.images[-1].get_array(), maps[name][row].view(4, 4).numpy())
    plt.close(fig)
    for p in run.model.blocks[1].attn.qkv.parameters():  # q = k = 0 in layer 2: P uniform
        p.data[:32] = 0
    fig = sa.draw_grid(columns, x, test["y_test"], None, test["classes"], rows=1)
    torch.testing.assert_close(torch.tensor(fig.axes[1].images[-1].get_array()),
                               torch.full((4, 4), 1 / 17))
    plt.close(fig)


TINY = ["--patch_size", "8", "--n_layer", "2", "--n_head", "2", "--n_embd", "16", "--epochs", "1",
        "--seed", "3", "--device", "cpu"]


def make_run(folder, kind, *argv):
    """A tiny run of train.py itself: its checkpoint format, whatever it becomes."""
    train.main(TINY + ["--attn", kind, "--out_dir", str(folder), *argv])
    return str(folder)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return [make_run(tmp_path_factory.mktemp(kind), kind, "--n_train", "128", "--n_test", "48")
            for kind in ("softmax", "pure", "linear")]


def test_compare_with_metrics_end_to_end(runs, tmp_path, capsys):
    out = tmp_path / "png"
    res = sa.main(["--runs", ",".join(runs), "--metrics", "true", "--out_dir", str(out),
                   "--device", "cpu"])
    text = capsys.readouterr().out
    for name in ("compare.png", "curves.png", "morf_lerf.png"):
        assert f"wrote {out / name}" in text and (img := plt.imread(out / name)).ndim == 3
        assert min(img.shape[:2]) > 200 and img[..., :3].std() > 0.05
    assert "| run | map | MoRF-AOC | LeRF-AUC | ROC-AUC | PR-AUC |" in text
    for kind, name in (("softmax", "cls@2"), ("pure", "katz@2"), ("linear", "a@2")):
        assert f"| {kind} | {name} |" in text
    assert "\n" + sa.PAPER + "\n" in text  # the paper's line
    assert sorted(os.listdir(out)) == ["compare.png", "curves.png", "morf_lerf.png"]
    for metrics, c in res:
        assert len(c["morf"]) == 9 and all(0 <= v <= 1 for pair in metrics.values() for v in pair)
        assert abs(metrics["ROC-AUC"][1] - 0.5) < 0.1  # random scores: chance
        assert c["morf"][0] == c["lerf"][0] == c["random"][0]  # nothing blanked: the same images
        assert c["morf"][-1] == c["lerf"][-1] == c["random"][-1]  # everything blanked
        assert metrics["MoRF-AOC"][0] == pytest.approx(1 - sa.area(c["morf"]))
        assert metrics["LeRF-AUC"] == pytest.approx((sa.area(c["lerf"]), sa.area(c["random"])))


def test_single_run_maps_powers_at_a_layer(runs, tmp_path, capsys, monkeypatch):
    drawn = []
    monkeypatch.setattr(sa, "draw_grid", lambda columns, *a: drawn.append(columns) or plt.figure())
    sa.main(["--runs", runs[1], "--out_dir", str(tmp_path), "--layer", "1", "--metrics", "true"])
    text = capsys.readouterr().out
    assert f"wrote {tmp_path / 'maps.png'}" in text and "| pure | katz@1 |" in text
    assert [name for _, name in drawn[0]] == ["katz@1", "katz@2", "cls_Apow1@1", "cls_Apow2@1",
                                              "cls_Apow3@1"]
    sa.main(["--runs", runs[1], "--out_dir", str(tmp_path)])
    assert [name for _, name in drawn[1]][2:] == ["cls_Apow1@2", "cls_Apow2@2", "cls_Apow3@2"]


def refused(capsys, tmp_path, argv, words):
    """One line on stderr, exit status 2, only options that exist named, nothing written."""
    out = str(tmp_path / "never")
    with pytest.raises(SystemExit) as e:
        sa.main(argv if "--out_dir" in argv else [*argv, "--out_dir", out])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error:") and "\n" not in err, err
    assert words in err and not os.path.exists(out), err
    assert set(re.findall(r"--(\w+)", err)) <= set(sa.DEFAULTS), err
    return err


def test_errors_are_one_line_and_write_nothing(runs, tmp_path, capsys):
    for argv, words in (
            ([str(tmp_path / "none.pt")], "no checkpoint at"), ([","], "no checkpoint at ;"),
            ([runs[0], "--layer", "3"], "--layer must be in [0, 3); got 3"),
            ([runs[0], "--layer", "-1"], "--layer must be"),
            ([runs[0], "--device", "foo"], "--device foo is not usable here")):
        refused(capsys, tmp_path, ["--runs", *argv], words)
    (tmp_path / "file").write_text("")
    for out, words in (("file", "(File exists); pick another --out_dir"), ("file/x", "cannot")):
        refused(capsys, tmp_path, ["--runs", runs[0], "--out_dir", str(tmp_path / out)], words)


def test_checkpoints_of_older_formats_are_one_line(runs, tmp_path, capsys):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    err = refused(capsys, tmp_path, ["--runs", str(tmp_path / "bad.pt")], "is not a readable")
    assert err.endswith("delete it or pick another --runs") and "--out_dir" not in err
    ckpt = runtime.load_checkpoint(f"{runs[0]}/ckpt.pt")
    with_gamma = dict(ckpt["model"], **{"blocks.0.attn.gamma_logit": torch.zeros(2)})
    for old, words in (({k: v for k, v in ckpt.items() if k != "mean"}, "KeyError: 'mean'"),
                       (dict(ckpt, model=with_gamma), "blocks.0.attn.gamma_logit"),
                       (dict(ckpt, model_args=dict(ckpt["model_args"], dropout=0.1)), "dropout"),
                       (dict(ckpt, config={}), "KeyError: 'dataset'")):
        torch.save(old, tmp_path / "old.pt")
        refused(capsys, tmp_path, ["--runs", str(tmp_path / "old.pt")], words)
    other = str(tmp_path / "other.pt")
    for key, value, also, words in (("dataset", "cifar10", "", "needs the object masks"),
                                    ("n_test", 40, f",{runs[1]}", "not all tested on")):
        torch.save(dict(ckpt, config=dict(ckpt["config"], **{key: value})), other)
        refused(capsys, tmp_path, ["--runs", other + also, "--metrics", "true"], words)


def test_a_failed_write_leaves_the_earlier_png_whole(runs, tmp_path, capsys, monkeypatch):
    argv = ["--runs", runs[2], "--out_dir", str(tmp_path)]
    sa.main(argv)
    before = (tmp_path / "maps.png").read_bytes()

    def half_then_full_disk(self, f, **kwargs):  # f: the temporary file write_atomic opened
        f.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_then_full_disk)
    err = refused(capsys, tmp_path, argv, "(No space left on device); pick another --out_dir")
    assert err.startswith(f"error: cannot write {tmp_path / 'maps.png'}")
    assert (tmp_path / "maps.png").read_bytes() == before  # and no temporary file left:
    assert sorted(os.listdir(tmp_path)) == ["curves.png", "maps.png"]


def test_a_run_on_a_folder_of_other_than_10_classes(tmp_path, capsys):
    """The model has an output per class of the run; a folder whose classes changed is refused."""
    from PIL import Image
    for split, (i, c) in itertools.product(("train", "test"), enumerate(["ant", "bee", "owl"])):
        (tmp_path / "d" / split / c).mkdir(parents=True)
        Image.new("RGB", (32, 32), (80 * i, 0, 0)).save(tmp_path / "d" / split / c / "0.png")
    run = make_run(tmp_path / "run", "linear", "--dataset", "folder", "--data_dir",
                   str(tmp_path / "d"), "--batch_size", "3")
    sa.main(["--runs", run, "--out_dir", ""])  # "": the run's folder; 3 test images drawn
    assert f"wrote {tmp_path / 'run' / 'maps.png'}" in capsys.readouterr().out
    for split in ("train", "test"):
        (tmp_path / "d" / split / "bee").rename(tmp_path / "d" / split / "bees")
    refused(capsys, tmp_path, ["--runs", run], "not all tested on the images and classes")

"""
Pictures and numbers from trained runs: maps.png (one run) or compare.png (several), curves.png;
with --metrics true a quality table and morf_lerf.png. A layer's token maps, CLS dropped, heads
averaged:
  cls          softmax: the CLS row of the attention matrix P
  katz         pure: Katz in-centrality ((I - gamma A_hat^T)^-1 - I) 1 = sum_{t>=1} gamma^t
               (A_hat^T)^t 1, gamma per head: how strongly each token's value reaches all
               tokens by paths of any length (the layer itself stops at hops)
  cls_Apow<t>  pure: the CLS row of A_hat^t: how strongly each token's value reaches CLS by
               paths of exactly t hops, before gamma^t (A_hat is not row-stochastic: not a
               walk's probability)
  a            linear: the pooled scores (sum 1); every token's output is gamma sum_j a_j v_j
"""
import math
import os
import sys
from types import SimpleNamespace

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

import data
import loader
import runtime
from configurator import config_defaults, configure, die
from model import ViT, ViTConfig

N_METRIC = 500  # the metrics use the first N_METRIC test images (all, when fewer)
# the paper's numbers (%, bounding-box ground truth), printed under the table
PAPER = ("paper, ImageNet-1K, MoRF-AOC / ROC-AUC / PR-AUC: softmax 42.6 / 53.8 / 56.2, "
         "pure 71.7 / 77.3 / 72.4, linear 76.0 / 75.9 / 76.1")

# -----------------------------------------------------------------------------
runs = "out/linear"         # run folders or checkpoints, comma separated
out_dir = ""                # for the PNGs; "" = the first run's folder
layer = 0                   # 1..n_layer: of the metrics and cls_Apow maps; 0 = the last
metrics = False             # scored on the object masks of the built-in shapes
device = "auto"             # auto | cpu | cuda | cuda:1
# -----------------------------------------------------------------------------
DEFAULTS = config_defaults(globals())


def roc_auc(s, y):
    """ROC-AUC = mean over (positive i, negative j) pairs of [s_i > s_j] + [s_i = s_j] / 2: the
    chance that a positive outscores a negative, ties counted half."""
    s, y = np.asarray(s, float), np.asarray(y, bool)
    d = s[y][:, None] - s[~y][None, :]  # (positives, negatives)
    return float(np.mean((d > 0) + 0.5 * (d == 0)))


def average_precision(s, y):
    """PR-AUC as average precision: AP = mean over positives i of #{positive j: s_j >= s_i} /
    #{j: s_j >= s_i}, the precision at each positive's threshold (tied scores enter together)."""
    s, y = np.asarray(s, float), np.asarray(y, bool)
    above = s[None, :] >= s[y][:, None]  # (positives, all)
    return float(np.mean((above & y).sum(1) / above.sum(1)))


def patch_labels(mask, patch, cover=0.5):
    """Object patches: mask (B, H, W) -> (B, g*g), True where the covered fraction >= cover."""
    frac = torch.nn.functional.avg_pool2d(mask[:, None].float(), patch)  # (B, 1, g, g)
    return (frac >= cover).flatten(1)  # (B, g*g), row-major like the tokens


def area(p):
    """Area under a curve p sampled at equal steps of x over [0, 1] (trapezoid rule)."""
    p = np.asarray(p, float)
    return float((p[1:] + p[:-1]).sum() / 2 / (len(p) - 1))


def removal_rank(scores, how, gen):
    """rank[b, p] = when patch p is blanked (0 = first): 'morf' by score descending, 'lerf'
    ascending, 'random' in a random order; ties broken at random. (B, P) -> (B, P)."""
    perm = torch.rand(scores.shape, generator=gen).argsort(1)  # random, then a stable sort
    if how != "random":
        order = scores.gather(1, perm).sort(dim=1, descending=how == "morf", stable=True)
        perm = perm.gather(1, order.indices)
    return perm.argsort(1)


def blank_patches(x, rank, k, patch):
    """x (B, C, H, W), normalised, with the patches of rank < k set to 0 (the dataset mean)."""
    B, C, H, W = x.shape
    keep = (rank >= k).view(B, 1, H // patch, W // patch).to(x.dtype)  # (B, 1, g, g)
    return x * keep.repeat_interleave(patch, 2).repeat_interleave(patch, 3)  # (B, 1, H, W)


def read_run(path, dev):
    """A run from its checkpoint: its model on dev, its log, what it was tested on."""
    path = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
    ckpt = runtime.load_checkpoint(path, "--runs")
    try:  # of an older train.py: a key missing, a parameter this model lacks
        classes = ckpt["data"]["classes"]
        model = ViT(ViTConfig(**ckpt["model_args"], n_classes=len(classes)), verbose=False)
        model.load_state_dict(ckpt["model"])
        test = [ckpt["config"][k] for k in ("dataset", "data_dir", "image_size", "n_test")]
        return SimpleNamespace(model=model.to(dev).eval(), vit=model.cfg, path=path, test=test,
                               classes=classes, log=ckpt["log"], mean=ckpt["mean"].to(dev),
                               std=ckpt["std"].to(dev))
    except Exception as e:
        why = " ".join(f"{type(e).__name__}: {e}".split())[:120]
        die(f"--runs: {path} is not a checkpoint of this code ({why})")


def map_names(vit):
    """A model's maps, its default (the metrics') first."""
    return [{"softmax": "cls", "pure": "katz", "linear": "a"}[vit.attn]] + [
        f"cls_Apow{t}" for t in range(1, vit.hops + 1) if vit.attn == "pure"]


@torch.no_grad()
def token_scores(run, x_uint8):
    """{'name@layer': (B, P)}, every map of a run at every layer."""
    x = loader.normalize(x_uint8.to(run.mean.device), run.mean, run.std)
    pick = lambda t: t.mean(1)[:, 1:].float().cpu()  # (B, H, N) -> (B, P)
    out, name = {}, map_names(run.vit)[0]
    for depth, maps in enumerate(run.model.attention_maps(x)[1], 1):
        out[f"{name}@{depth}"] = pick(maps[name])
        if run.vit.attn == "pure":
            row = maps["A"][:, :, :1]  # (B, H, 1, N): the CLS row of A_hat
            for t in range(1, run.vit.hops + 1):
                out[f"cls_Apow{t}@{depth}"] = pick(row[:, :, 0])  # the CLS row of A_hat^t
                row = row @ maps["A"]
    return out


def draw_grid(columns, x, y, mask, classes, rows=4):
    """A row per test image (the first `rows`), a column per (run, map name): the map over the
    image in grey, on one colour scale per kind of map; all zero (scale 0 to 0) is a dead layer
    (katz, a) or no t-hop path to CLS (cls_Apow<t>)."""
    x = x[:rows]
    scores = [token_scores(run, x)[name] for run, name in columns]  # (rows, P)
    kinds = [name.split("@")[0] for _, name in columns]
    top = {k: max(s.max().item() for s, k2 in zip(scores, kinds) if k2 == k) for k in kinds}
    fig, axes = plt.subplots(len(x), len(columns), squeeze=False, layout="constrained",
                             figsize=(1.7 * len(columns) + 0.5, 1.8 * len(x) + 0.3))
    for ax, k, (run, name) in zip(axes[0], kinds, columns):
        ax.set_title(f"{run.label}: {name}\nscale 0 to {top[k]:.2g}", fontsize=7)
    for i in range(len(x)):
        axes[i, 0].set_ylabel(f"#{i} {classes[y[i]]}")
        for ax, s, k in zip(axes[i], scores, kinds):
            g = math.isqrt(s.shape[1])
            ax.imshow(x[i].float().mean(0).numpy(), cmap="gray")
            ax.imshow(s[i].view(g, g).numpy(), cmap="inferno", vmin=0, vmax=top[k] or 1,
                      alpha=0.7, extent=(-0.5, x.shape[3] - 0.5, x.shape[2] - 0.5, -0.5))
            ax.set(xticks=[], yticks=[])
            if mask is not None:
                ax.contour(mask[i].numpy(), levels=[0.5], colors="cyan", linewidths=0.8)
    outline = "; cyan: the object's outline" if mask is not None else ""
    fig.suptitle("heads averaged" + outline, fontsize=9)
    return fig


def draw_curves(runs):
    """Loss and accuracy by step: training (each record a mean over steps, on smoothed labels and
    augmented batches), evaluations dashed."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    for c, run in enumerate(runs):
        for ax, key in zip(axes, ("loss", "acc")):
            for k in (key, "val_" + key, "test_" + key):
                log = [r for r in run.log if k in r]
                ax.plot([r["step"] for r in log], [r[k] for r in log], f"C{c}-" if k == key
                        else f"C{c}o--", ms=3, label=f"{run.label} {k}" if log else None)
    for ax, title in zip(axes, ("loss", "accuracy")):
        ax.set(xlabel="step", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


@torch.no_grad()
def quality(run, x, y, mask, steps=8, cover=0.5):
    """({metric: (value, random baseline)}, curves). ROC-AUC, PR-AUC: per-image means of run.map
    against the object patches, beside random scores. Curves p_s, s = 0..steps: the mean
    probability of the true class with round(s P / steps) of the P patches blanked, most
    relevant first (MoRF), least (LeRF) or in a random order. MoRF-AOC = 1 - area (high when p
    drops early: the map found what the model uses), LeRF-AUC = area."""
    labels = patch_labels(mask, run.vit.patch_size, cover).numpy()  # (n, P)
    both = [i for i, l in enumerate(labels) if 0 < l.sum() < len(l)]  # object and background
    if not both:
        die(f"{run.path}: no test image has object and background patches at cover {cover}")
    s, gen = token_scores(run, x)[run.map], torch.Generator().manual_seed(0)
    xn, y = loader.normalize(x.to(run.mean.device), run.mean, run.std), y.to(run.mean.device)
    curves = {}
    for how in ("morf", "lerf", "random"):
        rank = removal_rank(s, how, gen).to(y.device)
        curves[how] = [run.model(blank_patches(xn, rank, round(k * s.shape[1] / steps),
                                               run.vit.patch_size))[0].softmax(-1)
                       [range(len(y)), y].mean().item() for k in range(steps + 1)]
    A = {how: area(c) for how, c in curves.items()}
    res = {"MoRF-AOC": (1 - A["morf"], 1 - A["random"]), "LeRF-AUC": (A["lerf"], A["random"])}
    noise = np.random.default_rng(0).random(labels.shape)
    for name, fn in (("ROC-AUC", roc_auc), ("PR-AUC", average_precision)):
        res[name] = tuple(np.mean([fn(v[i], labels[i]) for i in both]) for v in (s, noise))
    return res, curves


def report(runs, results):
    """Prints the quality table (Markdown); returns the figure of the MoRF / LeRF curves."""
    print(f"\nattention quality, % (random in parentheses; ROC, PR on the images with object and "
          f"background)\n\n| run | map | {' | '.join(results[0][0])} |\n" + "|---" * 6 + "|")
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for c, (run, (res, curves)) in enumerate(zip(runs, results)):
        cells = [f"{100 * v:.1f} ({100 * rand:.1f})" for v, rand in res.values()]
        print(f"| {run.label} | {run.map} | {' | '.join(cells)} |")
        for how, style in (("morf", "o-"), ("lerf", "s--"), ("random", ":")):
            ax.plot(np.linspace(0, 1, len(curves[how])), curves[how], f"C{c}{style}", ms=3,
                    label=f"{run.label} ({run.map}), {how}")
    print("\n" + PAPER)
    ax.set(xlabel="fraction of patches blanked (set to the dataset mean)", ylim=(0, 1),
           ylabel="mean p(true class)")
    ax.set_title("blanked most relevant first (morf: lower is better), least relevant first "
                 "(lerf: higher is better) or at random", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def main(argv):
    cfg = configure(argv, DEFAULTS, __doc__)[0]
    dev = runtime.setup_device(cfg["device"])[0]
    runs = [read_run(path, dev) for path in cfg["runs"].split(",")]
    layers = min(run.vit.n_layer for run in runs)
    if cfg["layer"] > layers:
        die(f"--layer must be in [0, {layers + 1}); got {cfg['layer']}")
    dataset, data_dir, image_size, n_test = runs[0].test
    if cfg["metrics"] and dataset != "shapes":
        die(f"--metrics needs the object masks of the built-in shapes, not {dataset}; drop it")
    try:
        test = data.load(dataset, data_dir, image_size, 0, n_test)
    except data.DataError as e:
        die(f"the runs' test images: {e}")
    x, y, mask = test["x_test"], test["y_test"], test["mask_test"]
    if any(run.test != runs[0].test or run.classes != test["classes"] for run in runs):
        die("--runs: not all tested on the images and classes that their data has now")
    kinds = [run.vit.attn for run in runs]
    for run in runs:  # two runs of a kind are told apart by their paths
        run.label = run.vit.attn if kinds.count(run.vit.attn) == 1 else run.path
        run.map = f"{map_names(run.vit)[0]}@{cfg['layer'] or run.vit.n_layer}"
    grid, columns = "compare.png", [(run, run.map) for run in runs]
    if len(runs) == 1:  # one run: its default map at every layer, its other maps at --layer
        run, (default, *others) = runs[0], map_names(runs[0].vit)
        at = cfg["layer"] or run.vit.n_layer
        columns = [(run, f"{default}@{d}") for d in range(1, run.vit.n_layer + 1)]
        grid, columns = "maps.png", columns + [(run, f"{name}@{at}") for name in others]
    n = N_METRIC
    results = [quality(run, x[:n], y[:n], mask[:n]) for run in runs] if cfg["metrics"] else None
    figures = {grid: draw_grid(columns, x, y, mask, test["classes"]),
               "curves.png": draw_curves(runs)}
    if cfg["metrics"]:
        figures["morf_lerf.png"] = report(runs, results)
    out = cfg["out_dir"] or os.path.dirname(runs[0].path) or "."
    for name, fig in figures.items():  # written last: a fault above leaves nothing behind
        try:
            runtime.write_atomic(os.path.join(out, name), lambda f: fig.savefig(
                f, format="png", dpi=130, bbox_inches="tight"), binary=True)
        except runtime.WriteError as e:
            die(f"{e}; pick another --out_dir")
        plt.close(fig)
        print(f"wrote {os.path.join(out, name)}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])

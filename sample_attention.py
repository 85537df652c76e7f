"""
Pictures and numbers from trained runs: maps.png (one run) or compare.png (several), curves.png;
with --metrics true a quality table and morf_lerf.png. Token maps of a layer (CLS dropped):
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
from configurator import config_defaults, configure, die, refuse_unused
from model import ViT, ViTConfig

# the paper's ImageNet-1K numbers (%, bounding-box ground truth): MoRF-AOC / ROC-AUC / PR-AUC
PAPER = {"softmax": (42.6, 53.8, 56.2), "pure": (71.7, 77.3, 72.4), "linear": (76.0, 75.9, 76.1)}

# -----------------------------------------------------------------------------
runs = "out/linear"         # run folders or checkpoints, comma separated
out_dir = ""                # for the PNGs; "" = the first run's folder
images = "0,1,2,3"          # test images to draw, comma separated
head = 0                    # 1..n_head: one head; 0 = the mean of the heads
layer = 0                   # 1..n_layer: of the metric and cls_Apow maps; 0 = the last
score_map = "auto"          # the metric's map; auto = cls / katz / a
metrics = False             # scored on the object masks of the built-in shapes
n_metric = 500              # test images the metrics use
steps = 8                   # MoRF / LeRF blanking steps
cover = 0.5                 # a patch is 'object' when the mask covers >= cover of it
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
    """A run from its checkpoint: its model on dev, what it was trained and tested on."""
    path = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
    ckpt = runtime.load_checkpoint(path, "--runs")
    try:  # of an older train.py: a key missing, a parameter this model lacks
        classes = ckpt["data"]["classes"]
        model = ViT(ViTConfig(**ckpt["model_args"], n_classes=len(classes)), verbose=False)
        model.load_state_dict(ckpt["model"])
        test = [ckpt["config"][k] for k in ("dataset", "data_dir", "image_size", "n_test")]
        return SimpleNamespace(model=model.to(dev).eval(), vit=model.cfg, kind=model.cfg.attn,
                               path=path, classes=classes, log=ckpt["log"], test=test,
                               mean=ckpt["mean"].to(dev), std=ckpt["std"].to(dev))
    except Exception as e:
        why = " ".join(f"{type(e).__name__}: {e}".split())[:120]
        die(f"--runs: {path} is not a checkpoint of this code ({why})")


def map_names(vit):
    """A model's maps, its default (--score_map auto) first."""
    return [{"softmax": "cls", "pure": "katz", "linear": "a"}[vit.attn]] + [
        f"cls_Apow{t}" for t in range(1, vit.hops + 1) if vit.attn == "pure"]


@torch.no_grad()
def token_scores(run, x_uint8, head=-1):
    """{'name@layer': (B, P)}, every map of a run; head 0-based, -1 = the mean of the heads."""
    x = loader.normalize(x_uint8.to(run.mean.device), run.mean, run.std)
    pick = lambda t: (t.mean(1) if head < 0 else t[:, head])[:, 1:].float().cpu()  # (B, P)
    out, name = {}, map_names(run.vit)[0]
    for depth, maps in enumerate(run.model.attention_maps(x)[1], 1):
        out[f"{name}@{depth}"] = pick(maps[name])  # (B, H, N) -> (B, P)
        row = maps["A"][:, :, :1] if run.kind == "pure" else None  # (B, H, 1, N): CLS row of A_hat
        for t in range(1, run.vit.hops + 1) if run.kind == "pure" else ():
            out[f"cls_Apow{t}@{depth}"] = pick(row[:, :, 0])  # CLS row of A_hat^t
            row = row @ maps["A"]
    return out


def draw_grid(columns, x, y, mask, index, classes, head):
    """A row per test image, a column per (run, map name): the map over the image in grey, on one
    colour scale per kind of map (printed). Flat: it varies by at most 0.1% of its largest value;
    all zero is a dead head (katz, a) or no t-hop path to CLS (cls_Apow<t>)."""
    scores = [token_scores(run, x[index], head)[name] for run, name in columns]  # (rows, P)
    kinds = [name.split("@")[0] for _, name in columns]
    top = {k: max(s.max().item() for s, k2 in zip(scores, kinds) if k2 == k) for k in kinds}
    fig, axes = plt.subplots(len(index), len(columns), squeeze=False, layout="constrained",
                             figsize=(1.7 * len(columns) + 0.5, 1.8 * len(index) + 0.3))
    for row, i in enumerate(index):
        axes[row, 0].set_ylabel(f"#{i} {classes[y[i]]}")
        for ax, s, k, (run, name) in zip(axes[row], scores, kinds, columns):
            s, g = s[row], math.isqrt(s.shape[1])
            ax.imshow(x[i].float().mean(0).numpy(), cmap="gray")
            ax.imshow(s.view(g, g).numpy(), cmap="inferno", vmin=0, vmax=top[k] or 1, alpha=0.7,
                      extent=(-0.5, x.shape[3] - 0.5, x.shape[2] - 0.5, -0.5))
            ax.set_title(f"{run.label}: {name}\n" + (f"flat: every patch {s.max():.2g}" if s.max()
                         - s.min() <= 1e-3 * s.max() else f"scale 0 to {top[k]:.2g}"), fontsize=7)
            ax.set(xticks=[], yticks=[])
            if mask is not None:
                ax.contour(mask[i].numpy(), levels=[0.5], colors="cyan", linewidths=0.8)
    heads = f"head {head + 1}" if head >= 0 else "heads averaged"
    fig.suptitle(heads + ("; cyan: the object's outline" if mask is not None else ""), fontsize=9)
    return fig


def draw_curves(runs):
    """Loss and accuracy by step: training (a log record is the mean of its steps; label
    smoothing, augmented batches), evaluations dashed."""
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
def quality(run, x, y, mask, opt):
    """({metric: (value, random baseline)}, curves). ROC-AUC, PR-AUC: per-image means of run.map
    against the object patches, beside random scores. Curves p_s, s = 0..steps: the mean
    probability of the true class with round(s P / steps) of the P patches blanked, most
    relevant first (MoRF), least (LeRF) or in a random order. MoRF-AOC = 1 - area (high when p
    drops early: the map found what the model uses), LeRF-AUC = area."""
    labels = patch_labels(mask, run.vit.patch_size, opt.cover).numpy()  # (n, P)
    both = [i for i, l in enumerate(labels) if 0 < l.sum() < len(l)]  # object and background
    if not both:
        die(f"--cover {opt.cover}: no image has object and background patches; pick another")
    s, gen = token_scores(run, x, opt.head - 1)[run.map], torch.Generator().manual_seed(0)
    xn, y = loader.normalize(x.to(run.mean.device), run.mean, run.std), y.to(run.mean.device)
    curves = {}
    for how in ("morf", "lerf", "random"):
        rank = removal_rank(s, how, gen).to(y.device)
        curves[how] = [run.model(blank_patches(xn, rank, round(k * s.shape[1] / opt.steps),
                                               run.vit.patch_size))[0].softmax(-1)
                       [range(len(y)), y].mean().item() for k in range(opt.steps + 1)]
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
    print("\npaper, ImageNet-1K, MoRF-AOC / ROC-AUC / PR-AUC: "
          + ", ".join(f"{k} {' / '.join(map(str, v))}" for k, v in PAPER.items()))
    ax.set(xlabel="fraction of patches blanked (set to the dataset mean)", ylim=(0, 1),
           ylabel="mean p(true class)")
    ax.set_title("blanked most relevant first (morf: lower is better), least relevant first "
                 "(lerf: higher is better) or at random", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def main(argv):
    cfg = configure(argv, DEFAULTS, __doc__)[0]  # first: the runs, which bound other options
    dev = runtime.setup_device(cfg["device"])[0]
    runs = [read_run(path, dev) for path in cfg["runs"].split(",")]
    least = lambda size: min(getattr(r.vit, size) for r in runs)
    names = [m for m in map_names(runs[0].vit) if all(m in map_names(r.vit) for r in runs)]
    opt = SimpleNamespace(**configure(argv, DEFAULTS, __doc__, dict(
        head=(0, least("n_head") + 1), layer=(0, least("n_layer") + 1), n_metric=(1, math.inf),
        steps=(1, least("n_tokens")), score_map=["auto", *names]))[0])  # steps <= patches
    refuse_unused(vars(opt), DEFAULTS, dict.fromkeys(("n_metric", "steps", "cover"), "metrics"))
    dataset, data_dir, image_size, n_test = runs[0].test
    if opt.metrics and dataset != "shapes":
        die(f"--metrics needs the object masks of the built-in shapes, not {dataset}; drop it")
    try:
        test = data.load(dataset, data_dir, image_size, 0, n_test)
    except data.DataError as e:
        die(f"the runs' test images: {e}")
    x, y, mask = test["x_test"], test["y_test"], test["mask_test"]
    if any(r.test != runs[0].test or r.classes != test["classes"] for r in runs):
        die("--runs: not all tested on the images and classes that their data has now")
    index = [int(i) if i.strip().isdigit() else -1 for i in opt.images.split(",")]
    if not all(0 <= i < len(x) for i in index):
        die(f"--images takes indices 0..{len(x) - 1}, comma separated; got {opt.images!r}")
    for run in runs:
        name = map_names(run.vit)[0] if opt.score_map == "auto" else opt.score_map
        run.map = f"{name}@{opt.layer or run.vit.n_layer}"
        run.label = run.kind if [r.kind for r in runs].count(run.kind) == 1 else run.path
    n = opt.n_metric  # or all the test images, when fewer
    results = [quality(r, x[:n], y[:n], mask[:n], opt) for r in runs] if opt.metrics else None
    run, names = runs[0], map_names(runs[0].vit)  # alone: the default map of every layer, the
    columns = [(r, r.map) for r in runs] if runs[1:] else [  # others at --layer
        (run, f"{m}@{d}") for m in names for d in range(1, run.vit.n_layer + 1)
        if m == names[0] or d == (opt.layer or run.vit.n_layer)]
    figures = {"compare.png" if runs[1:] else "maps.png": draw_grid(
        columns, x, y, mask, index, test["classes"], opt.head - 1), "curves.png": draw_curves(runs)}
    if opt.metrics:
        figures["morf_lerf.png"] = report(runs, results)
    out = opt.out_dir or os.path.dirname(run.path) or "."
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

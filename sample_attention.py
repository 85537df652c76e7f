"""
Pictures and numbers from trained runs: where does each kind of attention look?

    python sample_attention.py --runs out/linear                 # maps.png, curves.png in out/linear
    python sample_attention.py --runs out/softmax,out/pure,out/linear --metrics true --out_dir assets
                                            # compare.png, curves.png, the quality table, morf_lerf.png

Token maps (heads averaged, or one head with --head h; CLS dropped; patches on their grid):
    softmax  cls      CLS row of the attention matrix P of a layer
             rollout  CLS row of the rollout (P_l + I)/2 ... (P_1 + I)/2 up to layer l
    pure     katz     Katz in-centrality ((I - gamma A^T)^-1 - I) 1 of A_hat, each head its own gamma
             hopT     CLS row of A_hat^T, T = 1..hops: where a walk from CLS is after T hops
    linear   a        the pooled scores a of Linear-InfSA
--metrics scores one map against the object masks of the built-in shapes dataset (a patch is 'object' when
the mask covers >= --cover of it): ROC-AUC and PR-AUC per image, and MoRF / LeRF, the probability of the true
class as patches are blanked most / least relevant first; each beside the floor, random scores.
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

# the paper's ImageNet-1K numbers (%, bounding-box ground truth): MoRF-AOC / ROC-AUC / PR-AUC
PAPER = {"softmax": (42.6, 53.8, 56.2), "pure": (71.7, 77.3, 72.4), "linear": (76.0, 75.9, 76.1)}
# -----------------------------------------------------------------------------
runs = "out/linear"         # run folders (or checkpoint files), comma separated; several: side by side
out_dir = ""                # where the PNGs go; "" = the first run's folder
images = "0,1,2,3"          # test images to draw, comma separated
head = 0                    # 1..n_head: one head's maps; 0 = the mean over heads
layer = 0                   # 1..n_layer: the layer of the metric / rollout / hop maps; 0 = the last
score_map = "auto"          # metric map: cls | rollout | katz | hop1.. | a; auto = cls / katz / a
metrics = False             # the attention-quality table and morf_lerf.png
n_metric = 500              # test images the metrics use
steps = 8                   # MoRF / LeRF blanking steps
cover = 0.5                 # mask fraction that makes a patch 'object'
device = "auto"             # auto (cuda when present) | cpu | cuda | cuda:1
# -----------------------------------------------------------------------------
DEFAULTS = config_defaults(globals())

# -----------------------------------------------------------------------------
# metrics (numpy, one image at a time) and patch blanking


def roc_auc(s, y):
    """ROC-AUC = mean over (positive i, negative j) pairs of [s_i > s_j] + [s_i = s_j] / 2: the chance
    that a positive outscores a negative, ties counted half."""
    s, y = np.asarray(s, float), np.asarray(y, bool)
    d = s[y][:, None] - s[~y][None, :]  # (positives, negatives)
    return float(np.mean((d > 0) + 0.5 * (d == 0)))


def average_precision(s, y):
    """PR-AUC as average precision, AP = mean over positives i of #{j positive: s_j >= s_i} / #{j: s_j >= s_i}:
    the precision at each positive's threshold (tied scores enter together, so all-equal scores give
    the prevalence)."""
    s, y = np.asarray(s, float), np.asarray(y, bool)
    above = s[None, :] >= s[y][:, None]  # (positives, all): j scores at least as high as positive i
    return float(np.mean((above & y).sum(1) / above.sum(1)))


def patch_labels(mask, patch, cover=0.5):
    """Object patches: mask (B, H, W) bool -> (B, g*g) bool, True where the covered fraction >= cover."""
    B, H, W = mask.shape
    frac = mask.float().view(B, H // patch, patch, W // patch, patch).mean((2, 4))  # (B, g, g)
    return (frac >= cover).flatten(1)  # (B, g*g), row-major like the tokens


def area(p):
    """Area under a curve p sampled at equal steps of x over [0, 1] (trapezoid rule)."""
    p = np.asarray(p, float)
    return float((p[1:] + p[:-1]).sum() / 2 / (len(p) - 1))


def removal_rank(scores, how, gen):
    """rank[b, p] = when patch p is blanked (0 = first): 'morf' by score descending, 'lerf' ascending,
    'random' in a random order. Ties are broken at random. scores (B, P) -> (B, P)."""
    perm = torch.rand(scores.shape, generator=gen).argsort(1)  # a random order, then a stable sort by score
    if how != "random":
        perm = perm.gather(1, scores.gather(1, perm).sort(dim=1, descending=how == "morf", stable=True).indices)
    return perm.argsort(1)


def blank_patches(x, rank, k, patch):
    """x (B, C, H, W), normalised, with the patches of rank < k set to 0 (the dataset mean)."""
    B, C, H, W = x.shape
    keep = (rank >= k).view(B, 1, H // patch, W // patch).to(x.dtype)  # (B, 1, g, g)
    return x * keep.repeat_interleave(patch, 2).repeat_interleave(patch, 3)  # (B, 1, H, W) broadcast

# -----------------------------------------------------------------------------
# runs, images, token maps


def load_run(path, dev, opt):
    """A run as its checkpoint describes it: the model (model_args, an output per class) on dev in eval mode, classes,
    normalisation, log, the config that fixes its test images; run.map: --score_map at --layer (--head checked too)."""
    path = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
    ckpt = runtime.load_checkpoint(path)
    try:  # a field missing, or one this model.py does not take: one line, not a traceback
        classes = ckpt["data"]["classes"]
        model = ViT(ViTConfig(**dict(ckpt["model_args"], n_classes=len(classes))), verbose=False)
        model.load_state_dict(ckpt["model"])
        run = SimpleNamespace(model=model.to(dev).eval(), cfg=model.cfg, path=path, kind=model.cfg.attn, classes=classes,
                              mean=ckpt["mean"].to(dev), std=ckpt["std"].to(dev), log=ckpt["log"],
                              config={k: ckpt["config"][k] for k in ("dataset", "data_dir", "image_size", "seed", "n_test")})
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        die(f"{path} does not fit this code ({type(e).__name__}: {str(e).strip().splitlines()[0][:100]}); train the run again")
    if opt.head >= model.cfg.n_head or opt.layer > model.cfg.n_layer:
        die(f"--head {opt.head + 1} --layer {opt.layer} out of range: {path} has heads 1..{model.cfg.n_head} (0: their mean) "
            f"and layers 1..{model.cfg.n_layer} (0: the last)")
    name = map_names(run)[0] if opt.score_map == "auto" else opt.score_map
    if name not in map_names(run):
        die(f"--score_map {opt.score_map} is not a map of {run.kind} attention; it has {', '.join(map_names(run))}")
    run.map = f"{name}@{opt.layer or model.cfg.n_layer}"
    return run


def token_scores(layers, kind, hops, head=-1):
    """Every map of a run, {'name@layer': (B, N)} with CLS at token 0, from model.attention_maps."""
    pick = (lambda t: t.mean(1)) if head < 0 else (lambda t: t[:, head])  # (B, H, ...) -> (B, ...)
    out, R = {}, None
    for l, m in enumerate(layers, 1):
        if kind == "softmax":
            out[f"cls@{l}"] = pick(m["cls"])
            P = pick(m["P"])  # (B, N, N)
            Pr = 0.5 * P + 0.5 * torch.eye(P.shape[-1], device=P.device)  # the residual path; rows sum to 1
            R = Pr if R is None else Pr @ R
            out[f"rollout@{l}"] = R[:, 0]
        elif kind == "pure":
            out[f"katz@{l}"] = pick(m["katz"])
            r = m["A"][:, :, 0]  # (B, H, N): CLS row of A_hat
            for t in range(1, hops + 1):
                out[f"hop{t}@{l}"] = pick(r)
                r = (r.unsqueeze(-2) @ m["A"]).squeeze(-2)  # (B, H, N): one hop further
        else:
            out[f"a@{l}"] = pick(m["a"])
    return out


def map_names(run):
    """The map names of a run, its default (--score_map auto) first."""
    hops = [f"hop{t}" for t in range(1, run.cfg.hops + 1)]
    return {"softmax": ["cls", "rollout"], "pure": ["katz"] + hops, "linear": ["a"]}[run.kind]


@torch.no_grad()
def run_maps(run, x_uint8, head):
    """(class probabilities (B, n_classes), token_scores) of a run for uint8 images."""
    logits, layers = run.model.attention_maps(loader.normalize(x_uint8.to(run.mean.device), run.mean, run.std))
    return logits.softmax(-1), token_scores(layers, run.kind, run.cfg.hops, head)

# -----------------------------------------------------------------------------
# pictures


def save(fig, path):
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fig.savefig(path, dpi=130, bbox_inches="tight")
    except OSError as e:
        die(f"cannot write {path} ({e.strerror or e}); pick another --out_dir")
    plt.close(fig)
    print(f"wrote {path}")


def overlay(ax, img, s=None, mask=None, title=""):
    """img uint8 (C, H, W) in colour, or, with patch scores s (g*g,), in grey under s scaled to [0, 1]
    and drawn patch for patch; mask (H, W): the object's outline in cyan."""
    C, H, W = img.shape
    im, ext = img.permute(1, 2, 0).float().numpy() / 255, (0, W, H, 0)  # (H, W, C)
    if s is None:
        ax.imshow(im, extent=ext)
    else:
        g = int(round(len(s) ** 0.5))
        s = s.float().cpu().view(g, g).numpy()  # (g, g)
        ax.imshow(im.mean(-1), cmap="gray", vmin=0, vmax=1, extent=ext)
        ax.imshow((s - s.min()) / (s.max() - s.min() + 1e-12), cmap="inferno", vmin=0, vmax=1, alpha=0.7,
                  extent=ext, interpolation="nearest")
    if mask is not None:
        ax.contour(np.arange(W) + 0.5, np.arange(H) + 0.5, mask.numpy(), levels=[0.5], colors="cyan", linewidths=0.8)
    ax.set_title(title, fontsize=8)
    ax.set(xticks=[], yticks=[])


def caption(name):
    m, l = name.split("@")
    return {"cls": f"CLS row L{l}", "rollout": f"rollout to L{l}", "katz": f"Katz in L{l}",
            "a": f"scores a L{l}"}.get(m, f"CLS row of Â^{m[3:]} L{l}")


def draw_grid(cols, x, y, mask, idx, classes, head, path, title):
    """One row per test image: the image, then one overlay per (run, map name, header) of cols;
    under the first map of each run, its prediction and p (and p of the true class)."""
    out = {id(run): run_maps(run, x[idx], head) for run, _, _ in cols}
    fig, axes = plt.subplots(len(idx), len(cols) + 1, figsize=(1.7 * len(cols) + 2.6, 1.9 * len(idx) + 0.5),
                             squeeze=False, layout="constrained")
    for r, i in enumerate(idx):
        m = mask[i] if mask is not None else None
        overlay(axes[r, 0], x[i], None, m, f"#{i} {classes[int(y[i])]}")
        for c, (run, name, header) in enumerate(cols, 1):
            probs, maps = out[id(run)]
            overlay(axes[r, c], x[i], maps[name][r, 1:], m, header)
            if c == 1 or cols[c - 2][0] is not run:
                p = probs[r].cpu()
                axes[r, c].set_xlabel(f"{classes[int(p.argmax())]} {p.max():.2f} ({p[y[i]]:.2f})", fontsize=7)
    fig.colorbar(plt.cm.ScalarMappable(cmap="inferno", norm=plt.Normalize(0, 1)), ax=axes, shrink=0.6,
                 label="score, each map scaled min to max")
    fig.suptitle(title, fontsize=9)
    save(fig, path)


def draw_curves(runs, path):
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6 + 0.25 * len(runs)), layout="constrained")
    for k, run in enumerate(runs):
        split = "val" if any("val_acc" in r for r in run.log) else "test"  # --val_split runs evaluate on val
        tr, te = [r for r in run.log if "loss" in r], [r for r in run.log if f"{split}_loss" in r]  # the log up to the weights
        w = max(1, len(tr) // 40)  # a running mean over w log intervals: mixup makes single batches noisy
        for ax, key, scale in ((axes[0], "loss", 1), (axes[1], "acc", 100)):
            ys = np.convolve([scale * r[key] for r in tr], np.ones(w) / w, mode="valid")
            ax.plot([r["step"] for r in tr][w - 1:], ys, f"C{k}", lw=1,
                    label=f"{run.label} train" + (f" (mean of {w} logs)" if w > 1 else ""))
            if te:  # a log without evaluations draws its training curves alone
                last = f" ({scale * te[-1][f'{split}_{key}']:{'.3f' if key == 'loss' else '.1f'}})"
                ax.plot([r["step"] for r in te], [scale * r[f"{split}_{key}"] for r in te], f"C{k}", ls="--",
                        marker="o", ms=3, label=f"{run.label} {split}{last}")
    axes[0].set(xlabel="step", ylabel="cross-entropy (train: with label smoothing)", title="loss")
    axes[1].set(xlabel="step", ylabel="accuracy (%; train: augmented batches)", title="accuracy", ylim=(0, 100))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.15))  # below: curves stay visible
    save(fig, path)


# -----------------------------------------------------------------------------
# numbers


@torch.no_grad()
def quality(run, x, y, mask, opt):
    """Mean per-image ROC-AUC and PR-AUC of run.map against the object patches (random scores beside),
    and the MoRF / LeRF / random-order curves p_s, s = 0..steps, with round(s P / steps) patches blanked."""
    model, patch, gen, steps = run.model, run.cfg.patch_size, torch.Generator().manual_seed(0), opt.steps
    labels = patch_labels(mask, patch, opt.cover).numpy()  # (n, P)
    P = labels.shape[1]
    curves, scores, correct = {"morf": [], "lerf": [], "random": []}, [], 0
    for b in range(0, len(x), 250):
        xb, yb = x[b:b + 250], y[b:b + 250].to(run.mean.device)
        probs, maps = run_maps(run, xb, opt.head)
        s = maps[run.map][:, 1:].float().cpu()  # (B, P), CLS dropped
        scores.append(s.numpy())
        correct += (probs.argmax(-1) == yb).sum().item()
        xn = loader.normalize(xb.to(yb.device), run.mean, run.std)
        p_true = lambda xi: model(xi)[0].softmax(-1).gather(1, yb[:, None])[:, 0].cpu()  # noqa: E731 -- (B,) p(true class)
        p0, p1 = probs.gather(1, yb[:, None])[:, 0].cpu(), p_true(torch.zeros_like(xn))  # clean, all blanked
        for how in curves:
            rank = removal_rank(s, how, gen).to(xn.device)
            mid = [p_true(blank_patches(xn, rank, round(k * P / steps), patch)) for k in range(1, steps)]
            curves[how].append(torch.stack([p0, *mid, p1], 1))  # (B, steps + 1)
    scores, noise = np.concatenate(scores), np.random.default_rng(0).random(labels.shape)
    ok = [i for i in range(len(x)) if 0 < labels[i].sum() < P]  # images with both kinds of patch
    res = dict(n=len(x), n_scored=len(ok), acc=correct / len(x),
               curves={h: torch.cat(c).mean(0).numpy() for h, c in curves.items()})
    for key, fn in (("roc", roc_auc), ("pr", average_precision)):
        res[key] = np.mean([fn(scores[i], labels[i]) for i in ok])
        res[key + "_rand"] = np.mean([fn(noise[i], labels[i]) for i in ok])
    res["morf_aoc"], res["lerf_auc"] = 1 - area(res["curves"]["morf"]), area(res["curves"]["lerf"])
    res["morf_aoc_rand"], res["lerf_auc_rand"] = 1 - area(res["curves"]["random"]), area(res["curves"]["random"])
    return res


def report(runs, results, opt, heads, path):
    r0 = results[0]
    skip = f"; ROC/PR over the {r0['n_scored']} with both kinds of patch" if r0["n_scored"] < r0["n"] else ""
    print(f"\nattention quality on the first {r0['n']} test images{skip} (%, random baseline in parentheses; "
          f"object patch: mask covers >= {opt.cover:g} of it; {opt.steps} blanking steps; {heads})\n")
    print("| run | map | acc | MoRF-AOC | LeRF-AUC | ROC-AUC | PR-AUC |\n|---|---|---|---|---|---|---|")
    for run, r in zip(runs, results):
        cells = [f"{100 * r[k]:.1f} ({100 * r[k + '_rand']:.1f})" for k in ("morf_aoc", "lerf_auc", "roc", "pr")]
        print(f"| {run.label} | {run.map} | {100 * r['acc']:.1f} | " + " | ".join(cells) + " |")
    print("\npaper (ImageNet-1K, bounding boxes; MoRF-AOC / ROC-AUC / PR-AUC): "
          + ", ".join(f"{k} {' / '.join(map(str, v))}" for k, v in PAPER.items()))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True, layout="constrained")
    for k, (run, r) in enumerate(zip(runs, results)):
        f, c = np.linspace(0, 1, len(r["curves"]["morf"])), r["curves"]
        for ax, how, name, a, a0 in ((axes[0], "morf", "AOC", r["morf_aoc"], r["morf_aoc_rand"]),
                                     (axes[1], "lerf", "AUC", r["lerf_auc"], r["lerf_auc_rand"])):
            ax.plot(f, c[how], f"C{k}", marker="o", ms=3, label=f"{run.label} ({run.map}): {name} {a:.3f}")
            ax.plot(f, c["random"], f"C{k}", ls=":", lw=1, label=f"{run.label}, random order: {name} {a0:.3f}")
    axes[0].set_title("MoRF: most relevant patches first (lower curve: better map)", fontsize=9)
    axes[1].set_title("LeRF: least relevant patches first (higher curve: better map)", fontsize=9)
    axes[0].set_ylabel("mean p(true class)")
    for ax in axes:
        ax.set(xlabel="fraction of patches blanked (set to the dataset mean)", ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save(fig, path)

# -----------------------------------------------------------------------------


def main(argv):
    cfg, given = configure(argv, DEFAULTS, __doc__, dict(n_metric=(1, math.inf), steps=(1, math.inf)))
    opt = SimpleNamespace(**cfg)
    opt.head -= 1  # 0-based from here on; -1: the mean over heads
    for k in (k for k in ("n_metric", "steps", "cover") if k in given and not opt.metrics):  # what only --metrics uses
        die(f"--{k} applies only with --metrics true; add that or drop --{k}")
    if not 0 < opt.cover <= 1:
        die(f"--cover must lie in (0, 1]; got {opt.cover}")
    dev = runtime.setup_device(opt.device)[0]
    runs = [load_run(p, dev, opt) for p in opt.runs.split(",") if p] or die("--runs names no run; give run folders like out/linear")
    ref, kinds = runs[0].config, [r.kind for r in runs]
    for run in runs:
        run.label = run.kind if kinds.count(run.kind) == 1 else f"{run.kind} ({run.path})"
        if run.config != ref:
            die(f"{run.path} was tested on other images than {runs[0].path}; compare runs of one dataset")
    if opt.metrics and ref["dataset"] != "shapes":
        die(f"--metrics needs object masks, which only --dataset shapes has (these runs used {ref['dataset']}); drop --metrics")
    idx = [int(i) if i.strip().isdigit() else -1 for i in opt.images.split(",")]  # -1: not an index
    try:  # the runs' test split (shapes: only its test images are generated)
        d = data.load(ref["dataset"], ref["data_dir"], ref["image_size"], ref["seed"], 0, ref["n_test"])
    except data.DataError as e:
        die(str(e))
    x, y, mask, classes = d["x_test"], d["y_test"], d["mask_test"], d["classes"]
    for run in (r for r in runs if r.classes != classes):  # a renamed class would permute the labels
        die(f"{run.path} was trained on other classes than {ref['data_dir']} has now; restore them or train again")
    if any(not 0 <= i < len(x) for i in idx):
        die(f"--images takes comma-separated indices of the test split's {len(x)} images, 0..{len(x) - 1}; got {opt.images!r}")
    out = opt.out_dir or os.path.dirname(runs[0].path)
    heads = "heads averaged" if opt.head < 0 else f"head {opt.head + 1}"
    note = ("cyan: object outline; " if mask is not None else "") + "under a map: the prediction, its p and (p of the true class)"
    if len(runs) > 1:
        cols = [(r, r.map, f"{r.label}: {caption(r.map)}") for r in runs]
        png, title = "compare.png", f"the same test images, {heads}"
    else:  # every layer's own map, then the multi-step ones (rollout / hops) of the chosen layer
        run, layer = runs[0], runs[0].map.split("@")[1]
        names = [f"{map_names(run)[0]}@{l}" for l in range(1, run.cfg.n_layer + 1)]
        cols = [(run, n, caption(n)) for n in names + [f"{n}@{layer}" for n in map_names(run)[1:]]]
        png, title = "maps.png", f"{run.kind} attention, {heads} ({run.path})"
    draw_grid(cols, x, y, mask, idx, classes, opt.head, os.path.join(out, png), f"{title}\n{note}")
    draw_curves(runs, os.path.join(out, "curves.png"))
    if opt.metrics:
        n = min(opt.n_metric, len(x))
        results = [quality(run, x[:n], y[:n], mask[:n], opt) for run in runs]
        report(runs, results, opt, heads, os.path.join(out, "morf_lerf.png"))
        return results


if __name__ == "__main__":
    main(sys.argv[1:])

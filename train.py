"""
Train a small ViT with softmax, Pure-InfSA or Linear-InfSA attention.

    python train.py --attn linear                            # built-in dataset, CPU or GPU, minutes
    python train.py config/cifar.py --attn pure              # a config file, then overrides
    python train.py --init_from resume --out_dir out/pure    # continue a run from its last checkpoint
    torchrun --standalone --nproc_per_node=2 train.py config/cifar.py --batch_size 1024   # two GPUs

Every global in the config block below can be set with --key value, --key=value, or a config file
of Python assignments (config/*.py), applied left to right; python train.py -h lists them all.
The script reads top to bottom: options -> run folder -> data and model -> the training loop -> summary.
"""
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import loader
from configurator import config_defaults, configure, die
from model import ATTN_KINDS, ViT, ViTConfig
from runtime import (exit_interrupted, flat_grads, load_checkpoint, restore_rng, run_folder, save_checkpoint, setup_device,
                     stop_on_ctrl_c, write_log)

# -----------------------------------------------------------------------------
# config: the built-in dataset, sized to train on a 2-core CPU in a few minutes
out_dir = ""                # checkpoint, log.jsonl, summary.json; "" = out/<attn>
init_from = "scratch"       # scratch | resume (out_dir/ckpt.pt, with the run's own config)
overwrite = False           # let a new run replace the run already in out_dir
eval_every = 1              # evaluate (and checkpoint) every N epochs; 0 = only at the end
ckpt_every = 0              # also checkpoint every N epochs without evaluating; 0 = off
log_every = 20              # steps between progress-bar and log updates
# data
dataset = "shapes"          # shapes (built in) | cifar10 | folder
data_dir = "data"           # where cifar10 / folder data lives
n_train = 20000             # shapes: training images
n_test = 2000               # shapes: test images
val_split = 0               # >0: hold out N training images to evaluate on; the test set is seen once, at the end
stream = False              # folder: decode the files in worker processes every epoch (sets too large for memory)
workers = 4                 # stream: decoding processes
crop_pad = 4                # random-crop padding in pixels; 0 = no crop
hflip = True                # random horizontal flips
rotate = 0.0                # random rotation, up to this many degrees either way
zoom = 0.0                  # random zoom by a factor in [1 - zoom, 1 + zoom]
translate = 0.0             # random shift, up to this fraction of the image size
jitter = 0.0                # brightness / contrast / saturation factors in [1 - jitter, 1 + jitter]
erase = 0.0                 # probability of erasing one random rectangle per image
policy = False              # one random op per image, TrivialAugment-style (loader.random_policy)
mixup = 0.0                 # >0: mix pairs of images, lambda ~ Beta(mixup, mixup) per batch
cutmix = 0.0                # >0: paste a box of the partner image, area 1 - lambda ~ Beta(cutmix, cutmix)
eval_shift = False          # at the end, also evaluate on corrupted test images (noise, blur, contrast, jpeg)
flip_eval = False           # evaluate on each image and its mirror, averaging the two logits
move_eval = 0               # >0: evaluation also averages over each image moved this many pixels up, down, left, right
# model
attn = "linear"             # softmax | pure | linear
image_size = 32
patch_size = 4
patch_overlap = 0           # pixels each patch reaches into its neighbours on every side (zero-padded at the edge)
n_layer = 4
n_head = 4
n_embd = 64                 # width; head size d_h = n_embd / n_head
mlp_ratio = 2.0
hops = 3                    # pure: Neumann terms per layer
gamma_init = 0.9            # pure, linear: initial gamma of every head
init_std = 0.0              # Linear weights: 0 = Xavier-uniform, > 0 = N(0, init_std^2) cut at +-2 (model.ViT._init)
dropout = 0.0
drop_path = 0.0             # stochastic depth rate of the last block
# optimisation
epochs = 10                 # passes over the training set
min_steps = 1000            # a small training set gets more epochs, up to at least this many steps
batch_size = 64             # global batch per optimizer step, over all GPUs (each takes batch_size / GPUs)
grad_accum = 1              # micro-batches per step on each process
lr = 2e-3                   # peak learning rate (AdamW)
min_lr = 1e-5               # cosine floor
warmup = 0.05               # fraction of all steps spent in linear warm-up
weight_decay = 0.05
beta2 = 0.99
grad_clip = 1.0             # 0 = no clipping
label_smoothing = 0.1
# system
device = "auto"             # auto (cuda > mps > cpu) | cpu | cuda | cuda:1 | mps
compile = True              # torch.compile on CUDA: the model and the augmentation
compile_mode = "default"    # default | reduce-overhead (CUDA graphs: far fewer launches) | max-autotune
seed = 1337
peak_tflops = 0.0           # your GPU's bf16 peak for MFU; 0 = look it up in PEAK_TFLOPS
# -----------------------------------------------------------------------------
DEFAULTS = config_defaults(globals())
# What each option may be: a tuple of choices, or a number range [low, high). Any other number is >= 0.
ALLOWED = dict(attn=ATTN_KINDS, dataset=("shapes", "cifar10", "folder"), init_from=("scratch", "resume"),
               compile_mode=("default", "reduce-overhead", "max-autotune"),
               **dict.fromkeys(("epochs", "batch_size", "grad_accum", "log_every", "n_train", "n_test", "image_size",
                                "patch_size", "n_layer", "n_head", "n_embd", "hops", "workers"), (1, math.inf)),
               **dict.fromkeys(("dropout", "drop_path", "warmup", "label_smoothing", "zoom", "beta2"), (0, 1)))
# Options that mean nothing in some combination: set away from their defaults there, they are refused.
UNUSED_WHEN = [(lambda c: c["stream"], ("val_split", "eval_shift"), "--stream true evaluates on the test files as they "
                "stream; hold out a validation folder as test/ instead, and drop"),
               (lambda c: not c["stream"], ("workers",), "--workers sets the decoding processes of --stream true; drop"),
               (lambda c: c["dataset"] != "shapes", ("n_train", "n_test"), "the size of a dataset on disk is its files; drop"),
               (lambda c: c["attn"] != "pure", ("hops",), "--hops is Pure-InfSA's; drop"),
               (lambda c: c["attn"] == "softmax", ("gamma_init",), "softmax attention has no gamma; drop")]
RESUME_FIXED = ("attn", "image_size", "patch_size", "patch_overlap", "n_layer", "n_head", "n_embd", "mlp_ratio", "hops",
                "dataset", "data_dir", "n_train", "n_test", "val_split", "seed")  # the weights' shapes, the data and its split
MODEL_KEYS = [f.name for f in dataclasses.fields(ViTConfig) if f.name in DEFAULTS]  # ViTConfig's fields set here
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, vendor datasheets


def lr_at(step, total, lr, min_lr, warmup):
    """Linear warm-up to lr over the first `warmup` fraction of steps, then cosine down to min_lr."""
    w = max(1, int(warmup * total))
    if step < w:
        return lr * (step + 1) / w
    t = (step - w) / max(1, total - w)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t))


def settle_config(argv):
    """(config, checkpoint or None, out_dir): the command line over the defaults, or over a resumed run's own
    config; then every rule checked (ALLOWED, UNUSED_WHEN, RESUME_FIXED, ViTConfig's own) before anything is written."""
    config, given = configure(argv, DEFAULTS, __doc__, ALLOWED)
    out = config["out_dir"] or os.path.join("out", config["attn"])
    ckpt = None
    if config["init_from"] == "resume":  # the run's own config, then what this command line changes
        ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
        ckpt["config"] = {**DEFAULTS, **ckpt["config"]}  # an option newer than the run: its default, the older code's
        for k in sorted(given - {"init_from", "out_dir"}):
            if config[k] != ckpt["config"][k]:
                if k in RESUME_FIXED:
                    die(f"the run in {out} has {k}={ckpt['config'][k]!r}; a resumed run cannot change it "
                        f"(drop --{k}, or start a new run in another --out_dir)")
                print(f"resume: {k} = {config[k]!r} (the run had {ckpt['config'][k]!r})")
        config = {**ckpt["config"], **{k: config[k] for k in given}, "init_from": "resume"}
    for applies, keys, why in UNUSED_WHEN:
        for k in keys:
            if applies(config) and config[k] != DEFAULTS[k]:
                die(f"--{k} {config[k]} does nothing here: {why} --{k}")
    try:
        ViTConfig(**{k: config[k] for k in MODEL_KEYS})  # its checks (divisibility, gamma_init in (0, 1))
    except ValueError as e:
        die(f"{e}; change that option (see -h)")
    return config, ckpt, out


@torch.no_grad()
def evaluate(model, batches, ctx, flip=False, move=0):
    """(accuracy, mean loss) over a loader's batches, of the logits averaged over each image's views
    (loader.eval_views: the image; moved by `move` pixels four ways; each mirrored, with flip)."""
    model.eval()
    correct, loss_sum, n = 0, 0.0, 0
    for xb, yb in batches:
        views = loader.eval_views(xb, flip, move)
        with ctx:  # each a copy: a CUDA-graph replay reuses its output buffers
            logits = sum(model(v)[0].float().clone() for v in views) / len(views)
        correct += (logits.argmax(-1) == yb).sum()
        loss_sum += F.cross_entropy(logits, yb, reduction="sum")
        n += len(yb)
    model.train()
    return (correct / n).item(), (loss_sum / n).item()


def mixed_loss(model, xb, yb, mixup, cutmix, label_smoothing):
    """(logits, loss): cross-entropy with label smoothing; on pairs mixed by loader.mix_pairs (mixup or cutmix
    > 0), loss = lam CE(y) + (1 - lam) CE(y of the partner image) = CE(lam onehot(y) + (1 - lam) onehot(y of
    the partner)), as cross-entropy is linear in its target: one loss, inside the compiled model."""
    if mixup or cutmix:
        xb, perm, lam = loader.mix_pairs(xb, mixup, cutmix)
        onehot = F.one_hot(yb, model.cfg.n_classes).float()  # (B, classes)
        yb = lam * onehot + (1 - lam) * onehot[perm]
    return model(xb, yb, label_smoothing)


def main(argv):
    """train(), with the one-line error paths: bad data, a failed write, Ctrl-C outside the training loop."""
    try:
        return train(argv)
    except data.DataError as e:  # a problem with the files on disk; from a worker process, its last line is the error
        die(str(e).strip().splitlines()[-1].removeprefix("data.DataError: "))
    except OSError as e:  # a full disk, a folder that became read-only: the files already written stay as they were
        die(f"cannot write {e.filename or 'a file'} ({e.strerror or e}); the last checkpoint is intact; free space and resume")
    except KeyboardInterrupt:
        exit_interrupted("interrupted; what this run had written is as it was; --init_from resume continues from its "
                         "last checkpoint, if any")


def train(argv):
    config, ckpt, out = settle_config(argv)
    cfg = SimpleNamespace(**config)
    dev, rank, world = setup_device(cfg.device)
    master, cuda = rank == 0, dev.startswith("cuda")
    if cfg.batch_size % (world * cfg.grad_accum):
        die(f"--batch_size {cfg.batch_size} must be divisible by processes x grad_accum = {world * cfg.grad_accum}")
    train_loader, eval_loader, test_loader, classes, mean, std = loader.loaders(cfg, dev, rank, world)
    data_seen = dict(classes=list(classes), train_images=len(train_loader.y), eval_images=len(eval_loader.y))
    if ckpt and ckpt["data"] != data_seen:  # a renamed class would permute the labels; added images change the run
        was = {k: v for k, v in ckpt["data"].items() if v != data_seen[k]}
        die(f"the data changed since the run in {out} started (it had {was}, now {({k: data_seen[k] for k in was})}); "
            f"restore it, or start a new run in another --out_dir")
    with run_folder(out, master):
        if master and not ckpt and os.path.exists(os.path.join(out, "ckpt.pt")) and not cfg.overwrite:
            die(f"{out} already holds a run; continue it with --init_from resume, replace it with --overwrite true, "
                f"or pick another --out_dir")
        # ---- model, optimiser, and the state a checkpoint restores
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        model_args = {k: config[k] for k in MODEL_KEYS}
        model = ViT(ViTConfig(**model_args, n_classes=len(classes)), verbose=master).to(dev)
        decay = lambda n, p: p.dim() >= 2 and n not in ("cls", "pos")  # noqa: E731 -- matrices decay, the rest not
        named = list(model.named_parameters())
        opt = torch.optim.AdamW([{"params": [p for n, p in named if decay(n, p)], "weight_decay": cfg.weight_decay},
                                 {"params": [p for n, p in named if not decay(n, p)], "weight_decay": 0.0}],
                                lr=cfg.lr, betas=(0.9, cfg.beta2), fused=cuda)
        progress, log = dict(step=0, epoch=0, batch=0, best_acc=0.0, acc=math.nan, wall_s=0.0, timed_s=0.0, seen=0), []
        torch.manual_seed(cfg.seed + rank)  # per-rank randomness: mixup, stochastic depth
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            progress, log = {**progress, **ckpt["progress"]}, ckpt["log"]
            restore_rng(ckpt["rng"], dev, rank, world)
        mode = cfg.compile_mode if cfg.compile and cuda else None  # None: not compiled
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        run = SimpleNamespace(cfg=cfg, config=config, model_args=model_args, out=out, dev=dev,
                              rank=rank, world=world, master=master, model=model, opt=opt, mode=mode,
                              compiled=torch.compile(model, mode=mode) if mode else model,  # the model when not compiled
                              flat=flat_grads([p for _, p in named]), progress=progress, log=log, first_step=progress["step"],
                              ctx=torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext(),
                              loaders=(train_loader, eval_loader, test_loader), data=data_seen, mean=mean, std=std)
        fit(run)
        return finish(run)


def fit(run):
    """The training loop: steps, logging, evaluation and checkpoints, until the last epoch or a Ctrl-C."""
    cfg, p, opt, (train_loader, eval_loader, test_loader) = run.cfg, run.progress, run.opt, run.loaders
    per_epoch = len(train_loader)
    run.epochs = epochs = max(cfg.epochs, math.ceil(cfg.min_steps / per_epoch))
    total, run.split = epochs * per_epoch, "val" if test_loader is not None else "test"  # what training evaluates on
    split = run.split
    if run.master:
        more = f" (raised from {cfg.epochs} to reach min_steps {cfg.min_steps})" if epochs > cfg.epochs else ""
        print(f"training {epochs} epochs{more} x {per_epoch} steps = {total} steps of {cfg.batch_size} images; "
              f"evaluating on {split}; writing to {run.out}")
    run.t_start, run.wall0 = time.time(), p["wall_s"]  # wall0: earlier segments' time
    bar = tqdm(total=total, initial=p["epoch"] * per_epoch + p["batch"], desc=cfg.attn, dynamic_ncols=True,
               disable=None if run.master else True)
    with stop_on_ctrl_c() as stop:
        for epoch in range(p["epoch"], epochs):
            train_loader.epoch, train_loader.start = epoch, p["batch"]  # a run stopped mid-epoch resumes there
            t0, pending = time.time(), []
            for b, (xb, yb) in enumerate(train_loader, start=p["batch"]):
                for group in opt.param_groups:  # by place in the epochs: a resume with another batch_size ends at min_lr too
                    group["lr"] = lr_at(epoch * per_epoch + b, total, cfg.lr, cfg.min_lr, cfg.warmup)
                for xm, ym in zip(xb.chunk(cfg.grad_accum), yb.chunk(cfg.grad_accum)):
                    if run.mode == "reduce-overhead":
                        torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs may be overwritten
                    with run.ctx:
                        logits, loss = mixed_loss(run.compiled, xm, ym, cfg.mixup, cfg.cutmix, cfg.label_smoothing)
                    (loss / cfg.grad_accum).backward()
                if run.world > 1:
                    torch.distributed.all_reduce(run.flat)  # the sum of every rank's gradients ...
                    run.flat /= run.world  # ... averaged: each rank's is the mean over its share of the batch
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
                opt.step()
                run.flat.zero_()
                pending.append(torch.stack([loss.detach().float(), (logits.argmax(-1) == ym).float().mean()]))
                p["step"], p["batch"] = p["step"] + 1, b + 1
                bar.update(1)
                if p["step"] % cfg.log_every and b + 1 < per_epoch:
                    continue
                log_interval(run, epoch, pending, t0, bar)
                if stop(run.world, run.dev):
                    save_checkpoint(run)
                    bar.close()
                    launch = "python" if run.world == 1 else f"torchrun --standalone --nproc_per_node={run.world}"
                    exit_interrupted(f"stopped by Ctrl-C at step {p['step']}; {run.out}/ckpt.pt continues it exactly: "
                                     f"{launch} train.py --init_from resume --out_dir {run.out}")
                t0, pending = time.time(), []
            p["epoch"], p["batch"] = epoch + 1, 0
            due = lambda n: n > 0 and (epoch + 1) % n == 0  # noqa: E731 -- after epochs n, 2n, ...
            if run.master and (epoch + 1 == epochs or due(cfg.eval_every)):
                t = time.time()
                p["acc"], loss = evaluate(run.compiled, eval_loader, run.ctx, cfg.flip_eval, cfg.move_eval)
                run.t_start += time.time() - t if split == "test" else 0  # wall_s counts training: a test pass is left out
                p["best_acc"] = max(p["best_acc"], p["acc"])
                run.log.append({"step": p["step"], "epoch": epoch, f"{split}_acc": p["acc"], f"{split}_loss": loss})
                bar.write(f"epoch {epoch + 1}/{epochs}: {split} acc {p['acc']:.4f}, {split} loss {loss:.4f}")
                if not math.isfinite(loss):
                    die(f"the {split} loss is {loss} after step {p['step']}; stopped, {run.out}/ckpt.pt is the last "
                        f"good checkpoint (if any); try a lower --lr")
            if epoch + 1 == epochs or due(cfg.eval_every) or due(cfg.ckpt_every):
                save_checkpoint(run)  # the last epoch always saves: wall_s, the training time, is final there
    bar.close()


def log_interval(run, epoch, pending, t0, bar):
    """Loss and accuracy of the steps since time t0 (averaged over ranks: every rank sees the same numbers,
    so all stop together on a NaN); one host sync per interval, and the interval's time ends after it."""
    stats = torch.stack(pending)  # (steps, 2): loss and accuracy of each step's last micro-batch
    if run.world > 1:
        torch.distributed.all_reduce(stats)
        stats /= run.world
    stats, p, dt = stats.cpu(), run.progress, time.time() - t0  # after the sync: the queued steps are done
    if not torch.isfinite(stats[:, 0]).all():
        die(f"the loss became {stats[~torch.isfinite(stats[:, 0]), 0][0].item()} by step {p['step']}; stopped, "
            f"{run.out}/ckpt.pt is the last good checkpoint (if any); try a lower --lr")
    if p["step"] - len(pending) > run.first_step:  # this command's first interval holds the compile: not timed
        p["timed_s"], p["seen"] = p["timed_s"] + dt, p["seen"] + len(pending) * run.cfg.batch_size
    rec = dict(step=p["step"], epoch=epoch, loss=stats[:, 0].mean().item(), acc=stats[:, 1].mean().item(),
               lr=run.opt.param_groups[0]["lr"], img_s=len(pending) * run.cfg.batch_size / dt)
    run.log.append(rec)
    bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['acc']:.3f}", img_s=f"{rec['img_s']:.0f}")


def finish(run):
    """The final numbers: the test set (once, when training evaluated on validation), corruptions, speed."""
    cfg, p, (_, eval_loader, test_loader) = run.cfg, run.progress, run.loaders
    if run.world > 1:
        torch.distributed.barrier()  # rank 0 evaluates alone; then all ranks close together
        torch.distributed.destroy_process_group()
    if not run.master:
        return None
    summary = dict(attn=cfg.attn, dataset=cfg.dataset, steps=p["step"], epochs=run.epochs, params=run.model.num_params())
    if test_loader is None:  # training evaluated on the test set: its last evaluation is the test accuracy ...
        test_loader, acc = eval_loader, p["acc"]
        summary.update(best_acc=p["best_acc"])
    else:
        summary.update(val_acc=p["acc"], best_val_acc=p["best_acc"])
    if test_loader is not eval_loader or p["step"] == run.first_step:  # ... unless this command trained no step
        acc = evaluate(run.compiled, test_loader, run.ctx, cfg.flip_eval, cfg.move_eval)[0]
        run.log.append(dict(step=p["step"], epoch=run.epochs - 1, test_acc=acc))
    shift = {}
    if cfg.eval_shift:
        for kind in data.CORRUPTIONS:
            xs = loader.Loader(data.corrupt(test_loader.x, kind, cfg.seed), test_loader.y, 1000, run.mean, run.std, False)
            shift[kind] = evaluate(run.compiled, xs, run.ctx, cfg.flip_eval, cfg.move_eval)[0]
        shift["mean"] = sum(shift.values()) / len(shift)
        print("shift: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in shift.items()))
    ips = p["seen"] / p["timed_s"] if p["timed_s"] else None  # every segment's steps but its compile interval
    gpu = torch.cuda.get_device_name(run.dev) if run.dev.startswith("cuda") else ""
    peak = cfg.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in gpu), 0)
    mfu = run.model.flops_per_image(training=True) * ips / (run.world * peak * 1e12) if ips and peak else None
    summary.update(test_acc=acc, shift=shift, img_s=ips, mfu=mfu, wall_s=p["wall_s"], resumed_from_step=run.first_step,
                   gamma_mean=run.model.gammas().mean().item(), device=run.dev, world=run.world, compile_mode=run.mode)
    write_log(run)
    data.write_atomic(os.path.join(run.out, "summary.json"), lambda f: json.dump(summary, f, indent=1))
    speed = f" | {ips:,.0f} img/s" if ips else ""
    print(f"done: final test acc {100 * acc:.2f}% (best {run.split} acc during training {100 * p['best_acc']:.2f}%){speed}"
          f"{f' | MFU {100 * mfu:.1f}%' if mfu else ''} | {p['wall_s'] / 60:.1f} min of training | {run.out}/ckpt.pt")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])

"""
Train a small ViT with softmax, Pure-InfSA or Linear-InfSA attention.

    python train.py --attn linear                            # built-in dataset, CPU or GPU, minutes
    python train.py config/cifar.py --attn pure              # a config file, then overrides
    python train.py --init_from resume --out_dir out/pure    # continue a run from its last checkpoint
    torchrun --standalone --nproc_per_node=8 train.py config/cifar.py   # several GPUs (DDP)

Every global in the config block below can be set with --key value, --key=value, or a config file
of Python assignments (config/*.py), applied left to right; python train.py -h lists them all.
"""
import contextlib
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
from model import ATTN_KINDS, FLEX_MIN_TOKENS, ViT, ViTConfig

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
workers = 4                 # decoding processes when streaming
crop_pad = 4                # random-crop padding in pixels; 0 = no crop
hflip = True                # random horizontal flips
rotate = 0.0                # random rotation, up to this many degrees either way
zoom = 0.0                  # random zoom by a factor in [1 - zoom, 1 + zoom]
translate = 0.0             # random shift, up to this fraction of the image size
jitter = 0.0                # brightness / contrast / saturation factors in [1 - jitter, 1 + jitter]
erase = 0.0                 # probability of erasing one random rectangle per image
mixup = 0.0                 # >0: mix pairs of images, lambda ~ Beta(mixup, mixup) per batch
cutmix = 0.0                # >0: paste a box of the partner image, area 1 - lambda ~ Beta(cutmix, cutmix)
eval_shift = False          # at the end, also evaluate on corrupted test images (noise, blur, contrast, jpeg)
# model
attn = "linear"             # softmax | pure | linear
image_size = 32
patch_size = 4
n_layer = 4
n_head = 4
n_embd = 64                 # width; head size d_h = n_embd / n_head
mlp_ratio = 2.0
hops = 3                    # Neumann terms per layer (pure)
gamma_init = 0.9            # initial gamma of every head (pure, linear)
init_std = 0.0              # Linear weights: 0 = Xavier-uniform, > 0 = truncated normal with this std
dropout = 0.0
drop_path = 0.0             # stochastic depth rate of the last block
# optimisation
epochs = 10                 # passes over the training set
min_steps = 1000            # a small training set gets more epochs, up to at least this many steps
batch_size = 64             # global batch per optimizer step (split over processes and grad_accum)
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
CHOICES = dict(attn=ATTN_KINDS, dataset=("shapes", "cifar10", "folder"), init_from=("scratch", "resume"),
               compile_mode=("default", "reduce-overhead", "max-autotune"))
COUNTS = ("epochs", "batch_size", "grad_accum", "log_every", "n_train", "n_test", "image_size", "patch_size",
          "n_layer", "n_head", "n_embd", "hops", "workers")  # at least 1; every other number at least 0
FRACTIONS = ("dropout", "drop_path", "warmup", "label_smoothing", "zoom", "beta2")  # below 1
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, vendor datasheets
SHAPE_KEYS = ("image_size", "patch_size", "n_layer", "n_head", "n_embd", "mlp_ratio", "attn", "hops")  # the weights fix them
MODEL_KEYS = SHAPE_KEYS + ("dropout", "drop_path", "gamma_init", "init_std")  # ViTConfig's fields from the config
RESUME_FIXED = SHAPE_KEYS + ("dataset", "data_dir", "n_train", "n_test", "val_split", "seed")  # what a resumed run cannot change


def lr_at(step, total, lr, min_lr, warmup):
    """Linear warm-up to lr over the first `warmup` fraction of steps, then cosine down to min_lr."""
    w = max(1, int(warmup * total))
    if step < w:
        return lr * (step + 1) / w
    t = (step - w) / max(1, total - w)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t))


def load_checkpoint(path):
    if not os.path.exists(path):
        die(f"no checkpoint at {path}; train first (python train.py) or point --out_dir at a run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated, or not a torch file
        die(f"{path} is not a readable checkpoint ({type(e).__name__}); delete it or pick another --out_dir")
    if not isinstance(ckpt, dict) or not {"model", "model_args", "config"} <= set(ckpt):
        die(f"{path} is not a checkpoint written by this train.py (no model / model_args / config)")
    return ckpt


def setup_device(name):
    """(device, rank, world): under torchrun, one process per GPU (NCCL) or per CPU process (gloo)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        torch.empty(0, device=name)
    except (RuntimeError, AssertionError) as e:
        die(f"--device {name} is not usable here ({str(e).splitlines()[0][:80]}); use auto, cpu, cuda, cuda:N or mps")
    if "RANK" not in os.environ:
        return name, 0, 1
    torch.distributed.init_process_group("nccl" if name.startswith("cuda") else "gloo")
    if name.startswith("cuda"):
        name = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(name)
    return name, torch.distributed.get_rank(), torch.distributed.get_world_size()


@torch.no_grad()
def evaluate(model, batches, ctx):
    """(accuracy, mean loss) over a loader's batches."""
    model.eval()
    correct, loss_sum, n = 0, 0.0, 0
    for xb, yb in batches:
        with ctx:
            logits, loss = model(xb, yb)
        correct += (logits.argmax(-1) == yb).sum()
        loss_sum += loss.float() * len(yb)
        n += len(yb)
    model.train()
    return (correct / n).item(), (loss_sum / n).item()


def mixed_loss(model, xb, yb, mixup, cutmix, label_smoothing):
    """(logits, loss): cross-entropy with label smoothing; with mixup or cutmix > 0 (both: one of them per
    batch, at random) on mixed pairs, loss = lam CE(y) + (1 - lam) CE(y of the partner image),
    lam ~ Beta(alpha, alpha); cutmix pastes a box of area 1 - lam of the partner."""
    if not (mixup or cutmix):
        return model(xb, yb, label_smoothing)
    use_cutmix = cutmix > 0 and (mixup == 0 or torch.rand(()) < 0.5)
    alpha = cutmix if use_cutmix else mixup
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(len(xb), device=xb.device)
    if use_cutmix:
        xb, lam = loader.paste_box(xb, xb[perm], lam)
    else:
        xb = lam * xb + (1 - lam) * xb[perm]
    logits, _ = model(xb)
    ce = lambda y: F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)  # noqa: E731
    return logits, lam * ce(yb) + (1 - lam) * ce(yb[perm])


def main(argv):
    try:
        return run(argv)
    except data.DataError as e:  # a problem with the files on disk; from a worker process, its last line is the error
        die(str(e).strip().splitlines()[-1].removeprefix("data.DataError: "))


def run(argv):
    config, given = configure(argv, DEFAULTS, __doc__, CHOICES, COUNTS, FRACTIONS)
    out = config["out_dir"] or os.path.join("out", config["attn"])
    ckpt_path, ckpt = os.path.join(out, "ckpt.pt"), None
    if config["init_from"] == "resume":  # the run's own config, then what this command line changes
        ckpt = load_checkpoint(ckpt_path)
        for k in sorted(given - {"init_from", "out_dir"}):
            if config[k] != ckpt["config"][k]:
                if k in RESUME_FIXED:
                    die(f"the run in {out} has {k}={ckpt['config'][k]!r}; a resumed run cannot change it "
                        f"(drop --{k}, or start a new run in another --out_dir)")
                print(f"resume: {k} = {config[k]!r} (the run had {ckpt['config'][k]!r})")
        config = {**ckpt["config"], **{k: config[k] for k in given}, "init_from": "resume"}
    elif os.path.exists(ckpt_path) and not config["overwrite"]:
        die(f"{out} already holds a run; continue it with --init_from resume, replace it with --overwrite true, "
            f"or pick another --out_dir")
    cfg = SimpleNamespace(**config)
    model_args = {k: config[k] for k in MODEL_KEYS}
    try:
        ViTConfig(**model_args)  # its checks (divisibility, gamma_init in (0, 1)) before anything is touched
    except ValueError as e:
        die(f"{e}; change that option (see -h)")
    dev, rank, world = setup_device(cfg.device)
    master, cuda = rank == 0, dev.startswith("cuda")
    if cfg.batch_size % (world * cfg.grad_accum):
        die(f"--batch_size {cfg.batch_size} must be divisible by processes x grad_accum = {world * cfg.grad_accum}")
    train_loader, eval_loader, test_loader, classes, mean, std = loader.loaders(cfg, dev, rank, world)

    # ---- model, optimiser, and the state a checkpoint restores
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = ViT(ViTConfig(**model_args, n_classes=len(classes)), verbose=master).to(dev)
    decay = lambda n, p: p.dim() >= 2 and n not in ("cls", "pos")  # noqa: E731 -- matrices decay, the rest not
    params = list(model.named_parameters())
    opt = torch.optim.AdamW([{"params": [p for n, p in params if decay(n, p)], "weight_decay": cfg.weight_decay},
                             {"params": [p for n, p in params if not decay(n, p)], "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, cfg.beta2), fused=cuda)
    torch.manual_seed(cfg.seed + rank)  # per-rank randomness: mixup, stochastic depth
    step, start_epoch, best_acc, acc = 0, 0, 0.0, float("nan")
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step, start_epoch, best_acc, acc = ckpt["step"], ckpt["epoch"], ckpt["best_acc"], ckpt["acc"]
        if ckpt["rng"]["world"] == world:  # the same processes: each continues its own random stream
            torch.set_rng_state(ckpt["rng"]["torch"][rank])
    first_step = step  # of this command: what it times and what the summary says it resumed from
    asked = mode = cfg.compile_mode if cfg.compile and cuda else None  # None: not compiled
    if mode and cfg.attn == "pure" and model.cfg.n_tokens >= FLEX_MIN_TOKENS:
        mode = None  # torch 2.11 cannot lower FlexAttention's backward inside a compiled training graph
    if mode == "reduce-overhead" and (world > 1 or cfg.grad_accum > 1):
        mode = "default"  # a graph replay reuses its output buffers: no DDP hooks, no accumulated gradients
    if master and mode != asked:
        print(f"note: compile mode {mode or 'off'} instead of {asked} (Pure-InfSA's fused hops from {FLEX_MIN_TOKENS} "
              f"tokens run uncompiled; CUDA graphs need one process and grad_accum 1)")
    fwd = torch.compile(model, mode=mode) if mode else model  # evaluation uses this one
    step_fwd = torch.nn.parallel.DistributedDataParallel(fwd, device_ids=[dev] if cuda else None) if world > 1 else fwd
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # ---- the schedule: whole epochs, at least min_steps steps
    per_epoch = len(train_loader)
    epochs = max(cfg.epochs, math.ceil(cfg.min_steps / per_epoch))
    total = epochs * per_epoch
    split = "val" if cfg.val_split else "test"  # what training evaluates on
    if master:
        more = f" (raised from {cfg.epochs} to reach min_steps {cfg.min_steps})" if epochs > cfg.epochs else ""
        print(f"training {epochs} epochs{more} x {per_epoch} steps = {total} steps of {cfg.batch_size} images; "
              f"evaluating on {split}; writing to {out}")
    log_path = os.path.join(out, "log.jsonl")
    try:
        os.makedirs(out, exist_ok=True)
        if master and ckpt and os.path.exists(log_path):  # the log goes on from the checkpoint, as the weights do
            kept = [line for line in open(log_path) if line.endswith("\n") and json.loads(line)["step"] <= step]
            data.write_atomic(log_path, lambda f: f.writelines(kept))
        log = open(log_path, "a" if ckpt else "w") if master else None
    except OSError as e:
        die(f"cannot write to --out_dir {out} ({e.strerror}); pick another --out_dir")

    def checkpoint(epoch):
        """Save atomically, and only finite weights: a diverged run never replaces a good checkpoint."""
        rng = [torch.get_rng_state()] * world
        if world > 1:
            torch.distributed.all_gather_object(rng, torch.get_rng_state())
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            die(f"the weights are not finite after step {step}; stopped, {ckpt_path} is the last good checkpoint; try a lower --lr")
        if master:
            state = dict(model=model.state_dict(), optimizer=opt.state_dict(), model_args=model_args, config=config,
                         step=step, epoch=epoch, best_acc=best_acc, acc=acc, classes=classes, mean=mean, std=std,
                         rng=dict(torch=rng, world=world))
            data.write_atomic(ckpt_path, lambda f: torch.save(state, f), "wb")

    # ---- training
    train_s, seen, t_start = 0.0, 0, time.time()
    bar = tqdm(total=total, initial=step, desc=cfg.attn, dynamic_ncols=True, disable=None if master else True)
    for epoch in range(start_epoch, epochs):
        train_loader.epoch = epoch
        t0, pending = time.time(), []
        for xb, yb in train_loader:  # this rank's share of one global batch
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, cfg.lr, cfg.min_lr, cfg.warmup)
            for i, (xm, ym) in enumerate(zip(xb.chunk(cfg.grad_accum), yb.chunk(cfg.grad_accum))):
                if mode == "reduce-overhead":
                    torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs may be overwritten
                sync = step_fwd.no_sync() if world > 1 and i < cfg.grad_accum - 1 else contextlib.nullcontext()
                with sync:
                    with ctx:
                        logits, loss = mixed_loss(step_fwd, xm, ym, cfg.mixup, cfg.cutmix, cfg.label_smoothing)
                    (loss / cfg.grad_accum).backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            pending.append(torch.stack([loss.detach().float(), (logits.argmax(-1) == ym).float().mean()]))
            step += 1
            bar.update(1)
            if step % cfg.log_every and step % per_epoch:
                continue
            stats = torch.stack(pending)  # (steps, 2): loss and accuracy of each step's last micro-batch
            if world > 1:
                torch.distributed.all_reduce(stats)  # every rank sees the same numbers, so all stop together
                stats /= world
            stats, dt = stats.cpu(), time.time() - t0  # one host sync per log interval
            if not torch.isfinite(stats[:, 0]).all():
                die(f"the loss became {stats[~torch.isfinite(stats[:, 0]), 0][0].item()} by step {step}; stopped, "
                    f"{ckpt_path} is the last good checkpoint (if any); try a lower --lr")
            if step - len(pending) > first_step:  # the first interval holds the compile: not timed
                train_s, seen = train_s + dt, seen + len(pending) * cfg.batch_size
            rec = dict(step=step, epoch=epoch, loss=stats[:, 0].mean().item(), acc=stats[:, 1].mean().item(),
                       lr=opt.param_groups[0]["lr"], img_s=len(pending) * cfg.batch_size / dt)
            if master:
                log.write(json.dumps(rec) + "\n")
            bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['acc']:.3f}", img_s=f"{rec['img_s']:.0f}")
            t0, pending = time.time(), []
        due = lambda n: n > 0 and (epoch + 1) % n == 0  # noqa: E731 -- after epochs n, 2n, ...
        evaluate_now = epoch + 1 == epochs or due(cfg.eval_every)
        if master and evaluate_now:
            acc, eval_loss = evaluate(fwd, eval_loader, ctx)
            best_acc = max(best_acc, acc)
            log.write(json.dumps({"step": step, "epoch": epoch, f"{split}_acc": acc, f"{split}_loss": eval_loss}) + "\n")
            log.flush()
            bar.write(f"epoch {epoch + 1}/{epochs}: {split} acc {acc:.4f}, {split} loss {eval_loss:.4f}")
            if not math.isfinite(eval_loss):
                die(f"the {split} loss is {eval_loss} after step {step}; stopped, {ckpt_path} is the last good "
                    f"checkpoint (if any); try a lower --lr")
        if evaluate_now or due(cfg.ckpt_every):
            checkpoint(epoch + 1)
    bar.close()
    wall = time.time() - t_start
    if world > 1:
        torch.distributed.barrier()  # rank 0 evaluates alone; then all ranks close together
        torch.distributed.destroy_process_group()
    if not master:
        return None

    # ---- final numbers: the test set (once, when training evaluated on validation), corruptions, speed
    summary = dict(attn=cfg.attn, dataset=cfg.dataset, steps=step, epochs=epochs, params=model.num_params())
    if test_loader is not None:
        summary.update(val_acc=acc, best_val_acc=best_acc)
        acc, _ = evaluate(fwd, test_loader, ctx)
        log.write(json.dumps(dict(step=step, epoch=epochs - 1, test_acc=acc)) + "\n")
    else:
        test_loader = eval_loader
        summary.update(best_acc=best_acc)
    shift = {}
    if cfg.eval_shift and not cfg.stream:
        for kind in data.CORRUPTIONS:
            xc = data.corrupt(test_loader.x, kind, cfg.seed)
            shift[kind] = evaluate(fwd, loader.Loader(xc, test_loader.y, 1000, mean, std, False), ctx)[0]
        shift["mean"] = sum(shift.values()) / len(shift)
        print("shift: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in shift.items()))
    ips = seen / train_s if train_s else None  # this command's training steps, the compile interval excluded
    peak = cfg.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if cuda and k in torch.cuda.get_device_name(dev)), 0)
    mfu = model.flops_per_image(training=True) * ips / (world * peak * 1e12) if ips and peak else None
    summary.update(test_acc=acc, shift=shift, img_s=ips, mfu=mfu, wall_s=wall, resumed_from_step=first_step,
                   gamma_mean=model.gammas().mean().item(), device=dev, world=world, compile_mode=mode)
    data.write_atomic(os.path.join(out, "summary.json"), lambda f: json.dump(summary, f, indent=1))
    best = f" (best {split} acc during training {100 * best_acc:.2f}%)"
    speed = f" | {ips:,.0f} img/s" if ips else ""
    print(f"done: final test acc {100 * acc:.2f}%{best}{speed}{f' | MFU {100 * mfu:.1f}%' if mfu else ''} | "
          f"{wall / 60:.1f} min | {ckpt_path}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])

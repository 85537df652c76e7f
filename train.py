"""
Train a small ViT with softmax, Pure-InfSA or Linear-InfSA attention.

    python train.py --attn linear                      # built-in shapes dataset, CPU or GPU
    python train.py --preset cifar --dataset cifar10   # CIFAR-10 recipe for one GPU
    python train.py --attn pure --init_from resume     # continue the run in --out_dir

Every global below can be overridden as --key value or --key=value; -h lists them.
"""
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
from model import ATTN_KINDS, ViT, ViTConfig
from model import peak_tflops as lookup_peak

# -----------------------------------------------------------------------------
# default config: the built-in dataset, sized to train on a 2-core CPU in minutes
out_dir = "out"             # checkpoint, log.jsonl and summary.json go here
init_from = "scratch"       # scratch | resume (from out_dir/ckpt.pt)
preset = ""                 # "" | cifar | cifar_long | cifar_10min: a recipe applied before the other overrides
eval_every = 1              # evaluate on the test split (and checkpoint) every N epochs; 0 = only at the end
ckpt_every = 0              # >0: also checkpoint every N epochs without evaluating (resumable, test seen once)
log_every = 20              # refresh the progress bar / log every N steps
# data
dataset = "shapes"          # shapes (built in) | cifar10 | folder
data_dir = "data"           # where cifar10 / folder data lives
n_train = 20000             # shapes: training images
n_test = 2000               # shapes: test images
val_split = 0               # >0: hold out N random training images, evaluate on them while training; test once at the end
crop_pad = 4                # random-crop padding (pixels); 0 disables the crop
hflip = True                # random horizontal flips
loader = "auto"             # auto | gpu (whole set on the device) | stream (decode files in workers; folder only)
workers = 4                 # decoding processes for --loader stream
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
n_embd = 96                 # width; head size d_h = n_embd / n_head
mlp_ratio = 2.0
hops = 3                    # Neumann terms per layer (pure)
gamma_init = 0.9            # initial gamma of every head (pure, linear)
init_std = 0.0              # Linear weights: 0 = Xavier-uniform, > 0 = truncated normal with this std
chunk = 0                   # pure: rows of A_hat per block (0 = whole matrix)
dropout = 0.0
drop_path = 0.0             # stochastic depth rate of the last block
# optimisation
epochs = 7                  # passes over the training set
batch_size = 128            # global batch per optimizer step (split over processes and --grad_accum)
grad_accum = 1              # micro-batches per step on each process
lr = 2e-3                   # peak learning rate (AdamW)
min_lr = 1e-5               # cosine floor
warmup = 0.05               # fraction of all steps spent in linear warm-up
weight_decay = 0.05
beta2 = 0.99
grad_clip = 1.0             # 0 disables clipping
label_smoothing = 0.1
# system
device = "auto"             # auto (cuda > mps > cpu) | cpu | cuda | cuda:1 | mps
compile = True              # torch.compile on CUDA: the model, and the augmentation pipeline
compile_mode = "default"    # default | reduce-overhead (replays CUDA graphs: far fewer launches) | max-autotune
seed = 1337
peak_tflops = 0.0           # bf16 peak of your GPU for MFU; 0 = look it up (H200/H100 989, A100 312)
# -----------------------------------------------------------------------------
PRESETS = {
    "cifar": dict(dataset="cifar10", n_layer=6, n_head=8, n_embd=384, mlp_ratio=2.0, batch_size=512,
                  epochs=75, lr=1e-3, warmup=0.1, weight_decay=0.05, drop_path=0.1, label_smoothing=0.1,
                  mixup=0.2, eval_shift=True, init_std=0.02, eval_every=5, compile_mode="reduce-overhead"),
}
# the same model and optimiser, 7.5x as many epochs, with augmentation strong enough for that many
PRESETS["cifar_long"] = dict(PRESETS["cifar"], epochs=560, eval_every=20, rotate=15.0, zoom=0.15, jitter=0.3,
                             erase=0.25, mixup=0.8, cutmix=1.0)
# the final runs: cifar_long on all 50,000 training images, as many epochs as fit in 10 minutes on an H200;
# the test set is evaluated once, at the end, and the run checkpoints every 40 epochs
PRESETS["cifar_10min"] = dict(PRESETS["cifar_long"], epochs=640, val_split=0, eval_every=0, ckpt_every=40)
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]
DEFAULTS = {k: globals()[k] for k in config_keys}
CHOICES = {"attn": ATTN_KINDS, "dataset": ("shapes", "cifar10", "folder"), "init_from": ("scratch", "resume"),
           "loader": ("auto", "gpu", "stream"), "compile_mode": ("default", "reduce-overhead", "max-autotune"),
           "preset": ("",) + tuple(PRESETS)}
RANGES = {**{k: (1, None) for k in ("epochs", "batch_size", "grad_accum", "log_every", "n_train", "n_test", "image_size",
                                    "patch_size", "n_layer", "n_head", "n_embd")},
          **{k: (0, None) for k in ("eval_every", "ckpt_every", "val_split", "workers", "crop_pad", "rotate", "mixup",
                                    "cutmix", "chunk", "mlp_ratio", "init_std", "lr", "min_lr", "weight_decay",
                                    "grad_clip", "peak_tflops")},
          **{k: (0, 1) for k in ("translate", "jitter", "erase", "dropout", "drop_path", "warmup", "label_smoothing")},
          "zoom": (0, 0.9), "beta2": (0, 0.9999)}  # lo <= value <= hi; None: no bound (zoom 1 would scale by 0)


def _die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def _choices(k):
    return " | ".join(repr(c) if c == "" else c for c in CHOICES[k])


def _parse(value, default, key):
    """Convert a command-line string to the type of the default."""
    if isinstance(default, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        _die(f"--{key} takes true or false; got {value!r}")
    try:
        return type(default)(value)
    except ValueError:
        _die(f"--{key} takes a {type(default).__name__}; got {value!r}")


def parse_args(argv, cfg):
    """--key value / --key=value overrides of the globals in cfg; --preset applies first.
    Returns (cfg, the set of keys given on the command line)."""
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        for k in config_keys:
            extra = f"  ({_choices(k)})" if k in CHOICES else ""
            print(f"  --{k} {cfg[k]!r}{extra}")
        sys.exit(0)
    pairs, i = [], 0
    while i < len(argv):
        a = argv[i]
        if not a.startswith("--"):
            _die(f"unexpected argument {a!r}; options look like --attn linear (see -h)")
        if "=" in a:
            k, v = a[2:].split("=", 1)
        elif i + 1 < len(argv):
            k, v = a[2:], argv[i + 1]
            i += 1
        else:
            _die(f"{a} needs a value (see -h)")
        if k not in config_keys:
            _die(f"unknown option --{k}; valid options: {', '.join(config_keys)}")
        pairs.append((k, v))
        i += 1
    for k, v in sorted(pairs, key=lambda kv: kv[0] != "preset"):  # preset first
        cfg[k] = _parse(v, cfg[k], k)
        if k in CHOICES and cfg[k] not in CHOICES[k]:
            _die(f"--{k} must be one of {_choices(k)}; got {cfg[k]!r}")
        if k == "preset" and cfg[k]:
            cfg.update(PRESETS[cfg[k]])
    for k, (lo, hi) in RANGES.items():
        if not lo <= cfg[k] <= (math.inf if hi is None else hi):
            _die(f"--{k} must be " + (f"at least {lo}" if hi is None else f"between {lo} and {hi}") + f"; got {cfg[k]}")
    return cfg, {k for k, _ in pairs}


def lr_at(step, total, lr, min_lr, warmup):
    """Linear warm-up to lr over the first `warmup` fraction of steps, then cosine to min_lr."""
    w = max(1, int(warmup * total))
    if step < w:
        return lr * (step + 1) / w
    t = (step - w) / max(1, total - w)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t))


def write_atomic(path, write, mode="w"):
    """write(f) to a temporary file, flush it to disk, then rename: a crash never leaves half a file
    and never replaces a good one."""
    tmp = path + ".tmp"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(tmp):  # the half-written copy goes; the previous file was never touched
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def save_checkpoint(obj, path):
    write_atomic(path, lambda f: torch.save(obj, f), "wb")


def load_checkpoint(path, map_location="cpu"):
    if not os.path.exists(path):
        _die(f"no checkpoint at {path}; train first (python train.py) or point --out_dir at a run")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated / not a torch file
        _die(f"{path} is not a readable checkpoint ({type(e).__name__}); delete it or pick another --out_dir")
    if not isinstance(ckpt, dict) or not {"model", "model_args"} <= set(ckpt):
        _die(f"{path} is not a checkpoint written by train.py (no model / model_args)")
    return ckpt


@torch.no_grad()
def evaluate(model, loader, ctx):
    model.eval()
    correct, loss_sum, n = 0, 0.0, 0
    for xb, yb in loader:
        with ctx:
            logits, loss = model(xb, yb)
        correct += (logits.argmax(-1) == yb).sum()
        loss_sum += loss.float() * len(yb)
        n += len(yb)
    model.train()
    return (correct / n).item(), (loss_sum / n).item()


def setup_device():
    """(device, rank, world): under torchrun, one process per GPU (NCCL) or per CPU process (gloo)."""
    dev = device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        _die(f"--device {dev} but CUDA is not available; use --device cpu")
    if "RANK" not in os.environ:
        return dev, 0, 1
    import torch.distributed as dist
    dist.init_process_group("nccl" if dev.startswith("cuda") else "gloo")
    if dev.startswith("cuda"):
        dev = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(dev)
    return dev, dist.get_rank(), dist.get_world_size()


def channel_stats(x):
    """Per-channel mean and std of uint8 images on the [0, 1] scale (std at least 1/255)."""
    f = x.float() / 255
    return f.mean((0, 2, 3)), f.std((0, 2, 3)).clamp_min(1 / 255)


def make_loaders(dev, rank, world):
    """Training and evaluation loaders: GPU-resident tensors, or files streamed by worker processes
    (--loader stream; auto picks it for an image folder too large for a quarter of device memory).
    With --val_split the evaluation loader holds the validation images and `held_test` the test set
    (evaluated once, after training); otherwise held_test is None."""
    kw = dict(seed=seed, rank=rank, world=world, pad=crop_pad, flip=hflip, rotate=rotate, zoom=zoom,
              translate=translate, jitter=jitter, erase=erase, compile=compile and dev.startswith("cuda"))
    mode = loader
    cached = os.path.exists(os.path.join(data_dir, f"cache_{image_size}.npz"))
    if dataset == "folder" and (mode == "stream" or (mode == "auto" and not cached)):
        classes, files = data.folder_files(data_dir)
        need = (len(files["train"][0]) + len(files["test"][0])) * 3 * image_size ** 2
        room = torch.cuda.mem_get_info(dev)[0] if dev.startswith("cuda") else 8 << 30
        mode = "stream" if (mode == "stream" or need > room / 4) else "gpu"
    elif mode == "stream":
        _die("--loader stream reads image files: use it with --dataset folder")
    if mode == "stream":
        paths = files["train"][0]
        sample = torch.stack([torch.from_numpy(data._decode(p, image_size)) for p in paths[::max(1, len(paths) // 512)]])
        mean, std = channel_stats(sample)
        tr = data.StreamLoader(*files["train"], image_size, batch_size, mean, std, True, dev, workers, **kw)
        te = data.StreamLoader(*files["test"], image_size, 500, mean, std, False, dev, workers)
        return tr, te, None, classes, 3, mean, std
    d = data.load(dataset, data_dir, image_size, seed, n_train, n_test)
    x_tr, y_tr, x_te, y_te = d["x_train"], d["y_train"], d["x_test"], d["y_test"]
    held = None
    if val_split:  # a fixed random subset (the same for every seed): files are often sorted by class
        if not 0 < val_split < len(x_tr):
            _die(f"--val_split must be between 1 and {len(x_tr) - 1}; got {val_split}")
        perm = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(0))
        held = (x_te, y_te)
        x_tr, y_tr, x_te, y_te = x_tr[perm[:-val_split]], y_tr[perm[:-val_split]], x_tr[perm[-val_split:]], y_tr[perm[-val_split:]]
    if x_tr.shape[-1] != image_size:
        _die(f"images are {x_tr.shape[-1]}px but the model expects {image_size}px; pass --image_size {x_tr.shape[-1]}")
    mean, std = channel_stats(x_tr[:10000])
    x_tr, y_tr, x_te, y_te = (t.to(dev) for t in (x_tr, y_tr, x_te, y_te))
    tr = data.GPULoader(x_tr, y_tr, batch_size, mean, std, True, **kw)
    te = data.GPULoader(x_te, y_te, 1000, mean, std, False)
    held_test = None if held is None else data.GPULoader(held[0].to(dev), held[1].to(dev), 1000, mean, std, False)
    return tr, te, held_test, d["classes"], x_tr.shape[1], mean, std


def main(cfg, given=()):
    """Train with config dict cfg (every key of config_keys); `given` = keys set explicitly."""
    globals().update(cfg)
    model_args = dict(image_size=image_size, patch_size=patch_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                      mlp_ratio=mlp_ratio, dropout=dropout, drop_path=drop_path, attn=attn, hops=hops,
                      gamma_init=gamma_init, chunk=chunk, init_std=init_std)
    try:
        ViTConfig(**model_args)  # its checks (divisibility, gamma_init in (0, 1)) before anything is touched
    except ValueError as e:
        _die(f"{e}; change that option (see -h)")
    dev, rank, world = setup_device()
    master, is_cuda = rank == 0, dev.startswith("cuda")
    if batch_size % (world * grad_accum):
        _die(f"--batch_size {batch_size} must be divisible by processes x --grad_accum = {world * grad_accum}")
    if is_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if is_cuda else torch.autocast("cpu", enabled=False)
    os.makedirs(out_dir, exist_ok=True)
    ckpt_path = os.path.join(out_dir, "ckpt.pt")

    # ---- resuming: the checkpoint's model config replaces the one asked for
    ckpt = None
    if init_from == "resume":
        ckpt = load_checkpoint(ckpt_path)
        for k in ("attn", "n_layer", "n_head", "n_embd", "patch_size", "image_size"):
            if ckpt["model_args"][k] != model_args[k] and k in given:
                _die(f"checkpoint in {out_dir} has {k}={ckpt['model_args'][k]!r} but --{k} {model_args[k]!r} "
                     f"was asked; drop --{k} or use another --out_dir")
        if ckpt["config"].get("dataset") != dataset:
            _die(f"checkpoint in {out_dir} was trained on {ckpt['config'].get('dataset')!r}, not {dataset!r}; "
                 f"pass --dataset {ckpt['config'].get('dataset')}")
        model_args = ckpt["model_args"]

    train_loader, test_loader, held_test, classes, chans, mean, std = make_loaders(dev, rank, world)
    if len(train_loader) == 0:
        _die(f"--batch_size {batch_size} is larger than the training set ({len(train_loader.y)} images)")
    model_args.update(n_classes=len(classes), in_chans=chans)
    torch.manual_seed(seed)  # the same initial weights on every rank
    model = ViT(ViTConfig(**model_args), verbose=master).to(dev)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and n not in ("cls", "pos")]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and n not in ("cls", "pos"))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, beta2), fused=is_cuda)
    step, start_epoch, best_acc, wall_before = 0, 0, 0.0, 0.0
    train_time, seen, test_acc = 0.0, 0, float("nan")  # timed training steps so far; the last evaluation
    torch.manual_seed(seed + rank)  # per-rank randomness (mixup, stochastic depth)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step, start_epoch, best_acc = ckpt["step"], ckpt["epoch"], ckpt["best_acc"]
        wall_before = ckpt.get("wall_s", 0.0)  # the run's time up to that checkpoint
        train_time, seen = ckpt.get("train_s", 0.0), ckpt.get("seen", 0)  # so img/s covers every segment
        test_acc = ckpt.get("test_acc", test_acc)
        if world == ckpt["rng"].get("world", 1):
            torch.set_rng_state(ckpt["rng"]["torch"][rank])
        if master:
            best = "" if math.isnan(test_acc) else f", best acc {best_acc:.4f}"  # nan: not evaluated yet
            print(f"resuming from {ckpt_path} at step {step} (epoch {start_epoch}{best})")
    mode = compile_mode
    if mode == "reduce-overhead" and (world > 1 or grad_accum > 1):
        mode = "default"  # a replay reuses its output buffers: no DDP hooks, no gradients accumulated in them
        if master:
            print("note: --compile_mode reduce-overhead needs one process and --grad_accum 1; using default")
    mode = mode if (compile and is_cuda) else None  # None: not compiled
    graphs = mode == "reduce-overhead"
    fwd = torch.compile(model, mode=mode) if mode else model  # evaluation uses this one
    step_fwd = fwd
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        step_fwd = DistributedDataParallel(fwd, device_ids=[dev] if is_cuda else None)

    total = epochs * len(train_loader)
    peak = peak_tflops or ((lookup_peak(torch.cuda.get_device_name(dev)) or 0) if is_cuda else 0)
    flops_img = model.flops_per_image(training=True)
    log_path = os.path.join(out_dir, "log.jsonl")
    if master and ckpt is not None and os.path.exists(log_path):
        trim_log(log_path, step)
    log = open(log_path, "a") if master else None
    t_start, first_step = time.time(), step
    split = "val" if val_split else "test"  # what the loop evaluates on
    bar = tqdm(total=total, initial=step, desc=model_args["attn"], dynamic_ncols=True, disable=None if master else True)
    for epoch in range(start_epoch, epochs):
        train_loader.epoch = epoch
        t0, pending = time.time(), []
        for xb, yb in train_loader:  # this rank's share of one global batch
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, lr, min_lr, warmup)
            for i, (xm, ym) in enumerate(zip(xb.chunk(grad_accum), yb.chunk(grad_accum))):
                if graphs:
                    torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs may be overwritten
                last = i == grad_accum - 1
                sync = contextlib.nullcontext() if (world == 1 or last) else step_fwd.no_sync()
                with sync, ctx:
                    logits, loss = forward_loss(step_fwd, xm, ym)
                with sync:
                    (loss / grad_accum).backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            pending.append(torch.stack([loss.detach().float(), (logits.argmax(-1) == ym).float().mean()]))
            step += 1
            bar.update(1)
            if step % log_every == 0 or step == (epoch + 1) * len(train_loader):
                stats = torch.stack(pending)  # (steps, 2): loss, accuracy of the last micro-batch
                if world > 1:
                    torch.distributed.all_reduce(stats)  # every rank sees the same numbers -> stops together
                    stats /= world
                stats = stats.cpu()  # one sync per log interval
                losses = stats[:, 0]
                if not torch.isfinite(losses).all():
                    bad = step - len(pending) + int((~torch.isfinite(losses)).nonzero()[0]) + 1
                    _die(f"loss became {losses[~torch.isfinite(losses)][0].item()} at step {bad}; stopped. "
                         f"The last good checkpoint (if any) is {ckpt_path}; try a lower --lr")
                dt = time.time() - t0
                ips = len(pending) * batch_size / dt
                if step - len(pending) > first_step:  # a segment's first interval holds the compile: not timed
                    train_time, seen = train_time + dt, seen + len(pending) * batch_size
                t0 = time.time()
                rec = dict(step=step, epoch=epoch, loss=losses.mean().item(), acc=stats[:, 1].mean().item(),
                           lr=lr_at(step - 1, total, lr, min_lr, warmup), img_s=ips)
                if master:
                    log.write(json.dumps(rec) + "\n")
                bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['acc']:.3f}", img_s=f"{ips:.0f}")
                pending = []
        due = lambda n: n > 0 and (epoch + 1) % n == 0  # noqa: E731 -- after epochs n, 2n, ... (0: never)
        evaluate_now = epoch + 1 == epochs or due(eval_every)
        if master and evaluate_now:
            test_acc, test_loss = evaluate(fwd, test_loader, ctx)
            best_acc = max(best_acc, test_acc)
            log.write(json.dumps({"step": step, "epoch": epoch, f"{split}_acc": test_acc, f"{split}_loss": test_loss}) + "\n")
            log.flush()
            bar.write(f"epoch {epoch + 1}/{epochs}: {split} acc {test_acc:.4f}, {split} loss {test_loss:.4f}")
        if evaluate_now or due(ckpt_every):
            rng = gather_rng_states(world)
            if master:
                save_checkpoint(dict(model=model.state_dict(), optimizer=opt.state_dict(), model_args=model_args,
                                     config=cfg, step=step, epoch=epoch + 1, best_acc=best_acc, test_acc=test_acc,
                                     classes=classes, mean=mean, std=std, rng=rng,
                                     wall_s=wall_before + time.time() - t_start, train_s=train_time, seen=seen),
                                ckpt_path)
    bar.close()
    wall = wall_before + time.time() - t_start  # a resumed run counts its earlier segments up to the checkpoint
    if world > 1:
        check_ranks_agree(model, master)
    if not master:
        close_process_group()
        return None
    val = {}
    if val_split:  # the held-out test set, once, after training on the rest
        val = dict(val_acc=test_acc, best_val_acc=best_acc)
        test_loader = held_test
        test_acc, _ = evaluate(fwd, test_loader, ctx)
        log.write(json.dumps(dict(step=step, epoch=epochs - 1, test_acc=test_acc)) + "\n")
        print(f"validation acc {100 * val['val_acc']:.2f}%; test set, evaluated once: {100 * test_acc:.2f}%")
    shift = {}
    if eval_shift and not isinstance(test_loader, data.StreamLoader):
        for kind in data.CORRUPTIONS:
            xc = data.corrupt(test_loader.x, kind, seed)
            shift[kind] = evaluate(fwd, data.GPULoader(xc, test_loader.y, 1000, mean, std, False), ctx)[0]
        shift["mean"] = sum(shift.values()) / len(shift)
        print("shift: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in shift.items()))
    ips = seen / train_time if train_time else float("nan")
    mfu = flops_img * ips / (world * peak * 1e12) if peak else None
    summary = dict(attn=model_args["attn"], dataset=dataset, test_acc=test_acc, best_acc=best_acc,
                   img_s=ips, wall_s=wall, mfu=mfu, params=model.num_params(), device=dev, world=world,
                   loader=type(train_loader).__name__, gamma_mean=model.gammas().mean().item(), steps=step,
                   shift=shift, flops_per_image=flops_img, peak_tflops=peak or None,
                   compile_mode=mode, **val)
    write_atomic(os.path.join(out_dir, "summary.json"), lambda f: json.dump(summary, f, indent=1))
    mfu_s = f" | MFU {100 * mfu:.1f}%" if mfu is not None else ""
    best = "" if val_split else f" (best {100 * best_acc:.2f}%)"
    print(f"done: test acc {100 * test_acc:.2f}%{best} | {ips:.0f} img/s | "
          f"{wall / 60:.1f} min{mfu_s} | checkpoint {ckpt_path}")
    if world > 1:
        close_process_group()
    return summary


def forward_loss(fwd, xb, yb):
    """Logits and training loss: cross-entropy with label smoothing, on mixed pairs when --mixup or
    --cutmix > 0 (both: one of them per batch, at random): loss = lam CE(y) + (1 - lam) CE(y of the
    partner image), lam ~ Beta(alpha, alpha); cutmix pastes a box of area (1 - lam) of the partner."""
    if not (mixup or cutmix):
        return fwd(xb, yb, label_smoothing)
    use_cutmix = cutmix > 0 and (mixup == 0 or torch.rand(()) < 0.5)
    alpha = cutmix if use_cutmix else mixup
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(len(xb), device=xb.device)
    if use_cutmix:
        xb, lam = data.paste_box(xb, xb[perm], lam)
    else:
        xb = lam * xb + (1 - lam) * xb[perm]
    logits, _ = fwd(xb)
    ce = lambda y: F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)  # noqa: E731
    return logits, lam * ce(yb) + (1 - lam) * ce(yb[perm])


def trim_log(path, step):
    """Drop the records a killed run wrote after its last checkpoint (they are redone on resume),
    and a last line the kill cut short."""
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line.rstrip("\n") + "\n")
            except (ValueError, KeyError, TypeError):
                continue
    write_atomic(path, lambda f: f.writelines(keep))


def gather_rng_states(world):
    """Every rank's CPU RNG state (mixup, stochastic depth), so a resume continues each stream."""
    states = [torch.get_rng_state()]
    if world > 1:
        states = [None] * world
        torch.distributed.all_gather_object(states, torch.get_rng_state())
    return dict(torch=states, world=world)


def close_process_group():
    """Every rank waits for rank 0 to finish its evaluation, then all close together: a rank that tore
    down its gloo connections while another still used them aborted at exit now and then."""
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def check_ranks_agree(model, master):
    """DDP keeps one model: compare every weight with rank 0's copy and report the largest gap."""
    dist = torch.distributed
    gap = torch.zeros((), device=next(model.parameters()).device)
    for p in model.parameters():
        ref = p.detach().clone()
        dist.broadcast(ref, 0)
        gap = torch.maximum(gap, (p.detach() - ref).abs().max())
    dist.all_reduce(gap, op=dist.ReduceOp.MAX)
    if master:
        print(f"ddp: {dist.get_world_size()} ranks, largest weight difference from rank 0: {gap.item():.3g}")


if __name__ == "__main__":
    main(*parse_args(sys.argv[1:], dict(DEFAULTS)))

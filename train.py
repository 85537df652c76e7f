"""
Train a small ViT with softmax, Pure-InfSA or Linear-InfSA attention.

    python train.py --attn linear                      # built-in shapes dataset, CPU or GPU
    python train.py --preset cifar --dataset cifar10   # CIFAR-10 recipe for one GPU
    python train.py --attn pure --init_from resume     # continue the run in --out_dir

Every global below can be overridden as --key value or --key=value; -h lists them.
"""
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
preset = ""                 # "" | cifar: a recipe applied before the other overrides
eval_every = 1              # evaluate on the test split (and checkpoint) every N epochs
log_every = 20              # refresh the progress bar / log every N steps
# data
dataset = "shapes"          # shapes (built in) | cifar10 | folder
data_dir = "data"           # where cifar10 / folder data lives
n_train = 20000             # shapes: training images
n_test = 2000               # shapes: test images
val_split = 0               # >0: hold out the last N training images and evaluate on them instead of test
crop_pad = 4                # random-crop padding (pixels); 0 disables the crop
mixup = 0.0                 # >0: mix pairs of images, lambda ~ Beta(mixup, mixup) per batch
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
chunk = 0                   # pure: rows of A_hat per block (0 = whole matrix)
dropout = 0.0
drop_path = 0.0             # stochastic depth rate of the last block
# optimisation
epochs = 10                 # passes over the training set
batch_size = 128
lr = 2e-3                   # peak learning rate (AdamW)
min_lr = 1e-5               # cosine floor
warmup = 0.05               # fraction of all steps spent in linear warm-up
weight_decay = 0.05
beta2 = 0.99
grad_clip = 1.0             # 0 disables clipping
label_smoothing = 0.1
# system
device = "auto"             # auto (cuda > mps > cpu) | cpu | cuda | cuda:1 | mps
compile = True              # torch.compile on CUDA
seed = 1337
peak_tflops = 0.0           # bf16 peak of your GPU for MFU; 0 = look it up (H200/H100 989, A100 312)
# -----------------------------------------------------------------------------
PRESETS = {
    "cifar": dict(dataset="cifar10", n_layer=6, n_head=8, n_embd=384, mlp_ratio=2.0, batch_size=512,
                  epochs=50, lr=1e-3, warmup=0.1, weight_decay=0.05, drop_path=0.1, label_smoothing=0.1,
                  mixup=0.2, eval_shift=True),
}
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]
DEFAULTS = {k: globals()[k] for k in config_keys}
CHOICES = {"attn": ATTN_KINDS, "dataset": ("shapes", "cifar10", "folder"), "init_from": ("scratch", "resume"),
           "preset": ("",) + tuple(PRESETS)}


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
    return cfg, {k for k, _ in pairs}


def lr_at(step, total, lr, min_lr, warmup):
    """Linear warm-up to lr over the first `warmup` fraction of steps, then cosine to min_lr."""
    w = max(1, int(warmup * total))
    if step < w:
        return lr * (step + 1) / w
    t = (step - w) / max(1, total - w)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t))


def save_checkpoint(obj, path):
    """Write to a temporary file, flush it to disk, then rename: a crash never leaves half a file."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def main(cfg, given=()):
    """Train with config dict cfg (every key of config_keys); `given` = keys set explicitly."""
    g = globals()
    g.update(cfg)
    dev = device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        _die(f"--device {dev} but CUDA is not available; use --device cpu")
    torch.manual_seed(seed)
    is_cuda = dev.startswith("cuda")
    if is_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if is_cuda else torch.autocast("cpu", enabled=False)
    os.makedirs(out_dir, exist_ok=True)
    ckpt_path = os.path.join(out_dir, "ckpt.pt")

    # ---- model (from the checkpoint's own config when resuming)
    model_args = dict(image_size=image_size, patch_size=patch_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                      mlp_ratio=mlp_ratio, dropout=dropout, drop_path=drop_path, attn=attn, hops=hops,
                      gamma_init=gamma_init, chunk=chunk)
    ckpt = None
    if init_from == "resume":
        ckpt = load_checkpoint(ckpt_path)
        for k in ("attn", "n_layer", "n_head", "n_embd", "patch_size", "image_size"):
            if ckpt["model_args"][k] != model_args[k] and k in given:
                _die(f"checkpoint in {out_dir} has {k}={ckpt['model_args'][k]!r} but --{k} {model_args[k]!r} "
                     f"was asked; drop --{k} or use another --out_dir")
        model_args = ckpt["model_args"]
        if ckpt["config"].get("dataset") != dataset:
            _die(f"checkpoint in {out_dir} was trained on {ckpt['config'].get('dataset')!r}, not {dataset!r}; "
                 f"pass --dataset {ckpt['config'].get('dataset')}")

    # ---- data, resident on the device
    d = data.load(dataset, data_dir, image_size, seed, n_train, n_test)
    x_tr, y_tr, x_te, y_te = d["x_train"], d["y_train"], d["x_test"], d["y_test"]
    if val_split:
        if not 0 < val_split < len(x_tr):
            _die(f"--val_split must be between 1 and {len(x_tr) - 1}; got {val_split}")
        x_tr, y_tr, x_te, y_te = x_tr[:-val_split], y_tr[:-val_split], x_tr[-val_split:], y_tr[-val_split:]
    if x_tr.shape[-1] != model_args["image_size"]:
        _die(f"images are {x_tr.shape[-1]}px but the model expects {model_args['image_size']}px; "
             f"pass --image_size {x_tr.shape[-1]}")
    mean = x_tr[:10000].float().mean((0, 2, 3)) / 255
    std = x_tr[:10000].float().std((0, 2, 3)) / 255
    x_tr, y_tr, x_te, y_te = (t.to(dev) for t in (x_tr, y_tr, x_te, y_te))
    model_args["n_classes"] = len(d["classes"])
    model_args["in_chans"] = x_tr.shape[1]
    if batch_size > len(x_tr):
        _die(f"--batch_size {batch_size} is larger than the training set ({len(x_tr)} images)")
    train_loader = data.GPULoader(x_tr, y_tr, batch_size, mean, std, train=True, pad=crop_pad, seed=seed)
    test_loader = data.GPULoader(x_te, y_te, 1000, mean, std, train=False)

    model = ViT(ViTConfig(**model_args)).to(dev)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and n not in ("cls", "pos")]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and n not in ("cls", "pos"))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, beta2),
                            fused=is_cuda)
    step, start_epoch, best_acc = 0, 0, 0.0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step, start_epoch, best_acc = ckpt["step"], ckpt["epoch"], ckpt["best_acc"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        train_loader.gen.set_state(ckpt["rng"]["loader"].to(train_loader.gen.get_state().device))
        if is_cuda and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
        print(f"resuming from {ckpt_path} at step {step} (epoch {start_epoch}, best acc {best_acc:.4f})")
    fwd = torch.compile(model) if (compile and is_cuda) else model

    total = epochs * len(train_loader)
    peak = peak_tflops or ((lookup_peak(torch.cuda.get_device_name(dev)) or 0) if is_cuda else 0)
    flops_img = model.flops_per_image(training=True)
    log = open(os.path.join(out_dir, "log.jsonl"), "a")
    t_start, train_time, seen = time.time(), 0.0, 0
    test_acc = test_loss = float("nan")
    bar = tqdm(total=total, initial=step, desc=f"{model_args['attn']}", dynamic_ncols=True, disable=None)
    for epoch in range(start_epoch, epochs):
        t0, pending = time.time(), []
        for xb, yb in train_loader:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, lr, min_lr, warmup)
            with ctx:
                if mixup:  # loss = lam CE(y) + (1 - lam) CE(y of the partner image)
                    lam = float(torch.distributions.Beta(mixup, mixup).sample())
                    perm = torch.randperm(len(xb), device=xb.device)
                    logits, _ = fwd(lam * xb + (1 - lam) * xb[perm])
                    loss = (lam * F.cross_entropy(logits.float(), yb, label_smoothing=label_smoothing)
                            + (1 - lam) * F.cross_entropy(logits.float(), yb[perm], label_smoothing=label_smoothing))
                else:
                    logits, loss = fwd(xb, yb, label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            pending.append((loss.detach(), (logits.argmax(-1) == yb).float().mean()))
            step += 1
            bar.update(1)
            if step % log_every == 0 or step == (epoch + 1) * len(train_loader):
                losses = torch.stack([p[0] for p in pending]).float().cpu()  # one sync per log interval
                accs = torch.stack([p[1] for p in pending]).cpu()
                if not torch.isfinite(losses).all():
                    bad = step - len(pending) + int((~torch.isfinite(losses)).nonzero()[0])
                    _die(f"loss became {losses[~torch.isfinite(losses)][0].item()} at step {bad}; stopped. "
                         f"The last good checkpoint (if any) is {ckpt_path}; try a lower --lr")
                dt = time.time() - t0
                train_time, seen, t0 = train_time + dt, seen + len(pending) * batch_size, time.time()
                ips = len(pending) * batch_size / dt
                rec = dict(step=step, epoch=epoch, loss=losses.mean().item(), acc=accs.mean().item(),
                           lr=lr_at(step - 1, total, lr, min_lr, warmup), img_s=ips)
                log.write(json.dumps(rec) + "\n")
                bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['acc']:.3f}", img_s=f"{ips:.0f}")
                pending = []
        if (epoch + 1) % eval_every == 0 or epoch + 1 == epochs:
            test_acc, test_loss = evaluate(fwd, test_loader, ctx)
            best_acc = max(best_acc, test_acc)
            log.write(json.dumps(dict(step=step, epoch=epoch, test_acc=test_acc, test_loss=test_loss)) + "\n")
            log.flush()
            bar.write(f"epoch {epoch + 1}/{epochs}: test acc {test_acc:.4f}, test loss {test_loss:.4f}")
            save_checkpoint(dict(model=model.state_dict(), optimizer=opt.state_dict(), model_args=model_args,
                                 config=cfg, step=step, epoch=epoch + 1, best_acc=best_acc, test_acc=test_acc,
                                 classes=d["classes"], mean=mean, std=std,
                                 rng=dict(torch=torch.get_rng_state(), loader=train_loader.gen.get_state().cpu(),
                                          cuda=torch.cuda.get_rng_state() if is_cuda else None)), ckpt_path)
    bar.close()
    wall = time.time() - t_start
    shift = {}
    if eval_shift:
        for kind in data.CORRUPTIONS:
            xc = data.corrupt(x_te, kind, seed)
            shift[kind] = evaluate(fwd, data.GPULoader(xc, y_te, 1000, mean, std, train=False), ctx)[0]
        shift["mean"] = sum(shift.values()) / len(shift)
        print("shift: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in shift.items()))
    ips = seen / train_time if train_time else float("nan")
    mfu = flops_img * ips / (peak * 1e12) if peak else None
    summary = dict(attn=model_args["attn"], dataset=dataset, test_acc=test_acc, best_acc=best_acc,
                   img_s=ips, wall_s=wall, mfu=mfu, params=model.num_params(), device=dev,
                   gamma_mean=model.gammas().mean().item(), steps=step, shift=shift,
                   flops_per_image=flops_img, peak_tflops=peak or None)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    mfu_s = f" | MFU {100 * mfu:.1f}%" if mfu is not None else ""
    print(f"done: test acc {100 * test_acc:.2f}% (best {100 * best_acc:.2f}%) | {ips:.0f} img/s | "
          f"{wall / 60:.1f} min{mfu_s} | checkpoint {ckpt_path}")
    return summary


if __name__ == "__main__":
    main(*parse_args(sys.argv[1:], dict(DEFAULTS)))

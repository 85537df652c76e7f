"""
Train a small ViT with softmax, Pure-InfSA or Linear-InfSA attention.

    python train.py --attn linear                            # built-in dataset, CPU or GPU
    python train.py config/cifar.py --attn pure              # a config file, then overrides
    python train.py --init_from resume --out_dir out/pure    # continue a run from its checkpoint
    torchrun --standalone --nproc_per_node=2 train.py config/cifar.py   # two GPUs

The config globals are set by config files and --key value, left to right (-h lists them).
train() reads top to bottom: config, data, model and optimiser, loop, evaluation and summary.
"""
import contextlib
import dataclasses
import json
import math
import os
import sys
from types import SimpleNamespace

import torch
from tqdm import tqdm

import data
import loader
import runtime
from configurator import config_defaults, configure, die, refuse_unused, resumed
from model import ATTN_KINDS, ViT, ViTConfig

# -----------------------------------------------------------------------------
# config: the built-in dataset, sized to train on a 2-core CPU in a few minutes
out_dir = ""                # ckpt.pt, log.jsonl, summary.json go here; "" = out/<attn>
init_from = "scratch"       # scratch | resume (out_dir/ckpt.pt, with the run's own config)
overwrite = False           # let a new run replace the run in out_dir
eval_every = 1              # evaluate (and checkpoint) every N epochs; 0 = at the end
ckpt_every = 0              # also checkpoint every N epochs without evaluating; 0 = off
log_every = 20              # steps between log records
# data
dataset = "shapes"          # shapes (built in) | cifar10 | folder
data_dir = "data"           # where cifar10 / folder data lives
n_train = 20000             # shapes: training images
n_test = 2000               # shapes: test images
val_split = 0               # > 0: N training images to evaluate on; test seen at the end
stream = False              # folder: decode the files in worker processes every epoch
workers = 4                 # stream: decoding processes
augment = "basic"           # none | basic | light | strong | policy (loader.RECIPES)
eval_views = "image"        # image | flip | flip_move: the views evaluation averages
eval_shift = False          # at the end, also evaluate on corrupted test images
# model
attn = "linear"             # softmax | pure | linear
image_size = 32
patch_size = 4
patch_overlap = 0           # pixels each patch reads beyond its own on every side
n_layer = 4
n_head = 4
n_embd = 64                 # width; head size d_h = n_embd / n_head
hops = 3                    # pure: Neumann terms per layer, K
gamma_init = 0.9            # pure, linear: the initial gamma of every head
init_std = 0.0              # Linear weights: 0 = Xavier-uniform, > 0 = N(0, init_std^2)
drop_path = 0.0             # stochastic depth rate of the last block
# optimisation
epochs = 10
batch_size = 64             # global batch per optimizer step, over all GPUs
lr = 2e-3                   # peak learning rate (AdamW), to 1e-5 on a cosine
warmup = 0.05               # fraction of all steps spent in linear warm-up
weight_decay = 0.05         # on the weight matrices alone
grad_clip = 1.0             # 0 = no clipping
# system
device = "auto"             # auto (cuda, else cpu) | cpu | cuda | cuda:1
dtype = "auto"              # auto | bfloat16 | float16 | float32 (runtime.precision)
compile = "default"         # none | default | reduce-overhead (CUDA graphs) | max-autotune
seed = 1337
# -----------------------------------------------------------------------------
DEFAULTS = config_defaults(globals())
ALLOWED = dict(attn=ATTN_KINDS, dataset=("shapes", "cifar10", "folder"),
               init_from=("scratch", "resume"), augment=tuple(loader.RECIPES),
               eval_views=loader.EVAL_VIEWS, dtype=("auto", "bfloat16", "float16", "float32"),
               compile=("none", "default", "reduce-overhead", "max-autotune"),
               **dict.fromkeys(("epochs", "batch_size", "log_every", "n_train", "n_test",
                                "image_size", "patch_size", "n_layer", "n_head", "n_embd", "hops",
                                "workers"), (1, math.inf)),
               seed=(0, 2 ** 31), **dict.fromkeys(("drop_path", "warmup"), (0, 1)))
# when each option does something; set away from its default where it does nothing, it is refused
APPLIES = dict(val_split="not stream", eval_shift="not stream", workers="stream",
               stream="dataset == 'folder'", data_dir="dataset != 'shapes'",
               n_train="dataset == 'shapes'", n_test="dataset == 'shapes'", hops="attn == 'pure'",
               gamma_init="attn != 'softmax'", overwrite="init_from == 'scratch'",
               compile="device.startswith('cuda')")
MODEL_KEYS = [f.name for f in dataclasses.fields(ViTConfig) if f.name in DEFAULTS]
# what a resumed run cannot change: the model, the data and its split, the precision
RESUME_FIXED = MODEL_KEYS + ["dataset", "data_dir", "n_train", "n_test", "val_split", "seed",
                             "dtype"]


def configure_run(argv):
    """(cfg, checkpoint or None): the command line over the defaults, or over a resumed run's own
    config; every rule checked before anything is written."""
    config, given = configure(argv, DEFAULTS, __doc__, ALLOWED)
    config["out_dir"] = config["out_dir"] or os.path.join("out", config["attn"])
    if "data_dir" in given:  # a resume from elsewhere finds the same data
        config["data_dir"] = os.path.abspath(config["data_dir"])
    ckpt = None
    if config["init_from"] == "resume":
        ckpt = runtime.load_checkpoint(os.path.join(config["out_dir"], "ckpt.pt"))
        run = {**DEFAULTS, **ckpt["config"], "init_from": "resume", "overwrite": False}
        out = config["out_dir"]  # where the run is now, wherever it was made
        config = {**resumed(run, config, given - {"out_dir"}, RESUME_FIXED, out), "out_dir": out}
    refuse_unused({**config, "device": runtime.setup_device(config["device"])[0]}, DEFAULTS,
                  APPLIES)
    try:
        ViTConfig(**{k: config[k] for k in MODEL_KEYS})  # its own checks (divisibility, gamma)
    except ValueError as e:
        die(f"{e}; change that option (see -h)")
    return SimpleNamespace(**config), ckpt


def lr_at(step, total, cfg, min_lr=1e-5):
    """Linear warm-up to cfg.lr over the first cfg.warmup of the steps, then cosine to min_lr."""
    w = max(1, int(cfg.warmup * total))
    if step < w:
        return cfg.lr * (step + 1) / w
    t = (step - w) / max(1, total - w)
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * t))


def main(argv):
    """One training run; what the user or the disk got wrong, and a stop, end in one line."""
    return runtime.one_line(lambda stop: train(argv, stop))


def train(argv, stop):
    cfg, ckpt = configure_run(argv)
    dev, rank, world = runtime.setup_device(cfg.device)
    master, out = rank == 0, cfg.out_dir
    diverged = f"stopped; {out}/ckpt.pt is the last good checkpoint (if any); try a lower --lr"
    cfg.dtype, ctx, scaler = runtime.precision(dev, cfg.dtype)
    # ---- data
    train_data, eval_data, test_data, classes, mean, std = loader.loaders(cfg, dev, rank, world)
    seen = dict(classes=list(classes), train_images=len(train_data.y), eval_images=len(eval_data.y))
    if ckpt and ckpt["data"] != seen:  # a renamed class would permute the labels
        die(f"the data changed since the run in {out} started: {ckpt['data']}, now {seen}")
    per_epoch = len(train_data)
    total = cfg.epochs * per_epoch
    # ---- the model and the optimiser; from a checkpoint, all the run had
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model_args = {k: getattr(cfg, k) for k in MODEL_KEYS}
    model = ViT(ViTConfig(**model_args, n_classes=len(classes)), verbose=master).to(dev)
    opt = model.optimizer(cfg.lr, cfg.weight_decay, fused=dev.startswith("cuda"))
    flat = runtime.flat_grads(list(model.parameters()))
    progress = SimpleNamespace(step=0, epoch=0, batch=0, acc=math.nan, best_acc=0.0, wall_s=0.0,
                               timed_s=0.0, timed_images=0)
    log = []
    torch.manual_seed(cfg.seed + rank)  # per-rank randomness: mixing, stochastic depth
    if ckpt:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        progress, log = SimpleNamespace(**{**vars(progress), **ckpt["progress"]}), ckpt["log"]
        runtime.restore_rng(ckpt["rng"], dev, rank, world)
        done = progress.epoch + progress.batch / per_epoch
        if done > cfg.epochs:
            die(f"the run in {out} has trained {done:g} epochs; --epochs must be at least that")
    compiled = model
    if dev.startswith("cuda") and cfg.compile != "none":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        compiled = torch.compile(model, mode=cfg.compile)
    first_step, timer = progress.step, runtime.Timer(progress)

    def checkpoint():
        progress.wall_s = timer.wall_s()
        state = dict(model=model.state_dict(), optimizer=opt.state_dict(), config=vars(cfg),
                     scaler=scaler.state_dict(), progress=vars(progress), log=log, data=seen,
                     mean=mean, std=std, rng=runtime.rng_states(dev, world), model_args=model_args)
        if master:
            runtime.save_checkpoint(out, model, state)

    # ---- the training loop
    split = "val" if test_data is not None else "test"  # what training evaluates on
    if master:
        print(f"{cfg.epochs} epochs x {per_epoch} steps of {cfg.batch_size} images, {cfg.dtype}; "
              f"evaluating on {split}; writing to {out}")
    bar = tqdm(total=total, initial=progress.epoch * per_epoch + progress.batch, desc=cfg.attn,
               dynamic_ncols=True, disable=None if master else True)
    with runtime.run_folder(out, master, replace=bool(ckpt) or cfg.overwrite):
        stop.graceful = True
        for epoch in range(progress.epoch, cfg.epochs):
            train_data.epoch, train_data.start = epoch, progress.batch  # a resume mid-epoch
            timer.restart()
            pending = []  # each step's loss and accuracy, on the device until the next log
            for b, (x, y) in enumerate(train_data, start=progress.batch):
                for group in opt.param_groups:  # by place in the epochs, whatever the batch size
                    group["lr"] = lr_at(epoch * per_epoch + b, total, cfg)
                if cfg.compile == "reduce-overhead":
                    torch.compiler.cudagraph_mark_step_begin()  # the last outputs may be reused
                x_mixed, target = train_data.mix(x, y, len(classes))  # the recipe's mixup, CutMix
                with ctx:
                    logits, loss = compiled(x_mixed, target, label_smoothing=0.1)
                scaler.scale(loss).backward()
                if world > 1:
                    torch.distributed.all_reduce(flat)  # the sum of every rank's gradients ...
                    flat /= world  # ... averaged, as each rank's is a mean over its share
                scaler.unscale_(opt)  # fp16: the true gradients, for clipping
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(opt)  # the update; fp16: skipped when a gradient overflowed
                scaler.update()
                flat.zero_()
                pending.append(torch.stack([loss.detach().float(),
                                            (logits.argmax(-1) == y).float().mean()]))
                progress.step, progress.batch = progress.step + 1, b + 1
                bar.update(1)
                if progress.step % cfg.log_every and b + 1 < per_epoch:
                    continue
                mean_loss, acc, img_s = timer.lap(pending, cfg.batch_size, world)  # one sync
                if not math.isfinite(mean_loss):
                    die(f"the loss became {mean_loss} by step {progress.step}; {diverged}")
                log.append(dict(step=progress.step, epoch=epoch, loss=mean_loss, acc=acc,
                                lr=opt.param_groups[0]["lr"], img_s=img_s))
                bar.set_postfix(loss=f"{mean_loss:.3f}", img_s=f"{img_s:.0f}")
                pending = []
                if stop.requested(world, dev):  # a checkpoint, then one line and exit
                    checkpoint()
                    raise KeyboardInterrupt(f"\nstopped at step {progress.step}; {out}/ckpt.pt "
                                            f"continues it: {runtime.resume_command(out, world)}")
            progress.epoch, progress.batch = epoch + 1, 0
            due = lambda n: n > 0 and (epoch + 1) % n == 0  # noqa: E731 -- epochs n, 2n, ...
            if master and (epoch + 1 == cfg.epochs or due(cfg.eval_every)):
                with timer.not_training() if split == "test" else contextlib.nullcontext():
                    progress.acc, eval_loss = loader.evaluate(compiled, eval_data, ctx,
                                                              cfg.eval_views)
                progress.best_acc = max(progress.best_acc, progress.acc)
                log.append({"step": progress.step, "epoch": epoch, f"{split}_acc": progress.acc,
                            f"{split}_loss": eval_loss})
                bar.write(f"epoch {epoch + 1}: {split} acc {progress.acc:.4f}, loss "
                          f"{eval_loss:.4f}")
                if not math.isfinite(eval_loss):
                    die(f"the {split} loss is {eval_loss} after step {progress.step}; {diverged}")
            if epoch + 1 == cfg.epochs or due(cfg.eval_every) or due(cfg.ckpt_every):
                checkpoint()  # the last epoch always saves: its wall_s is final
        stop.graceful = False
        bar.close()
        if world > 1:
            torch.distributed.barrier()  # rank 0 evaluates alone; all ranks close together
            torch.distributed.destroy_process_group()
        if not master:
            return None
        # ---- the final evaluation and summary
        test_data, acc = eval_data if test_data is None else test_data, progress.acc
        if split == "val" or progress.step == first_step:  # else the last evaluation was on test
            acc = loader.evaluate(compiled, test_data, ctx, cfg.eval_views)[0]
            log.append(dict(step=progress.step, epoch=cfg.epochs - 1, test_acc=acc))
        shift = {}  # accuracy on corrupted copies of the test images
        for kind in data.CORRUPTIONS if cfg.eval_shift else ():
            corrupted = loader.corrupted(test_data, kind, cfg.seed)
            shift[kind] = loader.evaluate(compiled, corrupted, ctx, cfg.eval_views)[0]
        if shift:
            shift["mean"] = sum(shift.values()) / len(shift)
        gammas = model.gammas()
        summary = dict(attn=cfg.attn, dataset=cfg.dataset, dtype=cfg.dtype, steps=progress.step,
                       epochs=cfg.epochs, params=model.num_params(), test_acc=acc, shift=shift,
                       img_s=timer.img_s(), wall_s=progress.wall_s, device=dev, world=world,
                       gamma_mean=None if gammas is None else gammas.mean().item(),
                       **({"val_acc": progress.acc, "best_val_acc": progress.best_acc}
                          if split == "val" else {"best_acc": progress.best_acc}))
        runtime.write_log(out, log)
        runtime.write_atomic(os.path.join(out, "summary.json"),
                             lambda f: json.dump(summary, f, indent=1))
        print(f"done: test acc {100 * acc:.2f}% (best {split} acc during training "
              f"{100 * progress.best_acc:.2f}%) | {timer.img_s() or 0:,.0f} img/s | "
              f"{progress.wall_s / 60:.1f} min of training | {out}/ckpt.pt")
        return summary


if __name__ == "__main__":
    main(sys.argv[1:])

"""
What a training run needs from the system around it (train.py's mechanics, apart from its loop):

    setup_device   the device, and under torchrun one process per GPU (NCCL) or per CPU process (gloo)
    flat_grads     every gradient in one buffer: data parallel is one all-reduce per step
    run_folder     one run at a time per folder
    save_checkpoint / load_checkpoint / rng_states / restore_rng    a checkpoint is data, and a resume is exact
    stop_on_ctrl_c Ctrl-C stops at a consistent point, with a checkpoint
"""
import contextlib
import fcntl
import json
import os
import signal
import sys
import time

import torch

import data
from configurator import die


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


def flat_grads(params):
    """Gradients in one flat fp32 buffer (each p.grad a view into it), zeroed in place between steps.
    Data parallel is then one all-reduce of this buffer per step, outside the compiled step. A DDP
    wrapper's hooks run inside backward and turn off the CUDA graphs of compile_mode reduce-overhead,
    without which this small, launch-bound model trains slower on two GPUs than on one. And since
    backward always adds into these existing buffers, gradient accumulation works with CUDA graphs too."""
    flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device)
    i = 0
    for p in params:
        p.grad = flat[i:i + p.numel()].view_as(p)
        i += p.numel()
    return flat


def all_ranks_agree(weights, world):
    """Whether every rank holds exactly rank 0's weights (a flat tensor); True on one process."""
    if world == 1:
        return True
    reference = weights.clone()
    torch.distributed.broadcast(reference, 0)
    differ = torch.tensor([float(not torch.equal(reference, weights))], device=weights.device)
    torch.distributed.all_reduce(differ)
    return not differ.item()


@contextlib.contextmanager
def run_folder(out, master):
    """One run at a time per folder: an exclusive lock on out/.lock (holding the pid, for the message),
    which the system drops when the process ends however it ends, so a killed run leaves no stale lock."""
    if not master:
        yield
        return
    try:
        os.makedirs(out, exist_ok=True)
        f = open(os.path.join(out, ".lock"), "a+")
    except OSError as e:
        die(f"cannot write to --out_dir {out} ({e.strerror}); pick another --out_dir")
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            die(f"another run (pid {f.read().strip() or '?'}) is writing to {out}; wait for it or pick another --out_dir")
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        yield


def load_checkpoint(path):
    """A checkpoint is data: tensors, numbers, strings, lists and dicts (torch.load weights_only), never code."""
    if not os.path.exists(path):
        die(f"no checkpoint at {path}; train first (python train.py) or point --out_dir at a run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or holding objects that only code could rebuild
        why = str(e).strip().splitlines()[-1][:80] if "weights_only" in str(e) else type(e).__name__
        die(f"{path} is not a readable checkpoint ({why}); delete it or pick another --out_dir")
    if not isinstance(ckpt, dict) or not {"model", "model_args", "config", "progress"} <= set(ckpt):
        die(f"{path} is not a checkpoint written by this train.py (no model / model_args / config / progress)")
    return ckpt


def save_checkpoint(run):
    """ckpt.pt (weights, optimiser, config, progress, log, every rank's random states) and log.jsonl, each written
    atomically; only finite weights, the same on every rank: a diverged run never replaces a good checkpoint.
    A summary.json from before is removed: it describes a finished run, and this one is not."""
    rng, p = rng_states(run.dev, run.world), run.progress
    p["wall_s"] = run.wall0 + time.time() - run.t_start  # training time, over all of the run's segments
    weights = torch.cat([w.detach().flatten() for w in run.model.parameters()])
    stopped = f"stopped, {run.out}/ckpt.pt is the last good checkpoint (if any)"
    if not all_ranks_agree(weights, run.world):  # each applies the same averaged gradients: equal bit for bit
        die(f"the ranks' weights differ after step {p['step']}; {stopped}")
    if not torch.isfinite(weights).all():
        die(f"the weights are not finite after step {p['step']}; {stopped}; try a lower --lr")
    if run.master:
        state = dict(model=run.model.state_dict(), optimizer=run.opt.state_dict(), config=run.config, progress=p,
                     model_args=run.model_args, log=run.log, data=run.data, rng=rng, mean=run.mean, std=run.std)
        data.write_atomic(os.path.join(run.out, "ckpt.pt"), lambda f: torch.save(state, f), "wb")
        write_log(run)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(run.out, "summary.json"))


def write_log(run):
    """log.jsonl from the run's records: it always describes the checkpoint beside it, or the finished run."""
    data.write_atomic(os.path.join(run.out, "log.jsonl"), lambda f: f.writelines(json.dumps(r) + "\n" for r in run.log))


def rng_states(dev, world):
    """Every random state a rank draws from (the CPU's; its CUDA device's), of every rank: a list by rank."""
    mine = dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(dev) if dev.startswith("cuda") else None)
    states = [mine] * world
    if world > 1:
        torch.distributed.all_gather_object(states, mine)
    return states


def restore_rng(states, dev, rank, world):
    """Each rank continues its own random streams, when the run has as many ranks as it had."""
    if len(states) == world:
        torch.set_rng_state(states[rank]["cpu"])
        if dev.startswith("cuda") and states[rank]["cuda"] is not None:
            torch.cuda.set_rng_state(states[rank]["cuda"], dev)


@contextlib.contextmanager
def stop_on_ctrl_c():
    """Yields stop(world, device): whether Ctrl-C was pressed on any rank. The first Ctrl-C asks the loop
    to stop at its next log interval with a checkpoint (a consistent point that all ranks agree on);
    another, over a second later, quits at once. One within the second is the same one: `timeout -s INT` signals
    a process and then its process group, which delivers SIGINT twice. Each stop() installs the handler again:
    compiling kernels puts Triton's own SIGINT handler (from its LLVM) in Python's place, and of three SIGINTs that
    met it on an H200, one ended the process with no checkpoint."""
    pressed = []

    def handler(*_):
        if not pressed:
            pressed.append(time.time())
            print("\nstopping at the next log interval, with a checkpoint (Ctrl-C again: quit without one)", file=sys.stderr)
        elif time.time() - pressed[0] > 1:  # a later press; one within the second is the first one again
            raise KeyboardInterrupt

    def stop(world, dev):
        signal.signal(signal.SIGINT, handler)
        if world == 1:
            return bool(pressed)
        flag = torch.tensor([float(bool(pressed))], device=dev)
        torch.distributed.all_reduce(flag, torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def exit_interrupted(msg):
    """The one way out after a Ctrl-C: msg on stderr, exit status 130. Further SIGINTs are ignored first:
    `timeout -s INT` signals the process and then its group, and the second one would cut the message short
    with a KeyboardInterrupt traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print(msg, file=sys.stderr)
    sys.exit(130)

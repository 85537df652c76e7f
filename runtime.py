"""
The system around a run, apart from training itself:

    write_atomic   the one writer of every file the project makes
    setup_device   the device; under torchrun one process per GPU (NCCL) or per CPU process (gloo)
    precision      autocast in bf16 or fp16 (fp16 with a gradient scaler), or fp32
    flat_grads     every gradient in one buffer: data parallel is one all-reduce per step
    run_folder     one run per folder, never replaced unasked
    save_checkpoint / load_checkpoint / rng_states / restore_rng    a checkpoint is data; a resume is exact
    Timer          a run's time and speed, over all its commands
    Stop           SIGINT and SIGTERM stop a run at its next log interval, with a checkpoint
"""
import contextlib
import fcntl
import json
import os
import shlex
import signal
import sys
import time
import uuid

import torch

from configurator import die

RUN_FILES = ("ckpt.pt", "log.jsonl", "summary.json")  # what a run writes into its folder


class WriteError(Exception):
    """A file could not be written; the message names it."""


def write_atomic(path, write, binary=False):
    """write(f) into a new temporary file beside path (its folder made if need be), flushed to
    disk, then renamed over path. A crash leaves the old file or the new one, never half of one;
    the temporary file is created exclusively and the rename replaces a link at path, so nothing
    is written through a link; two writers of one path each rename a whole file. Raises
    WriteError naming path."""
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "xb" if binary else "x") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise WriteError(f"cannot write {path} ({e.strerror or e})") from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def setup_device(name):
    """(device, rank, world): under torchrun, one process per GPU (NCCL) or per CPU process (gloo)."""
    if name == "auto":
        mps = torch.backends.mps.is_available()
        name = "cuda" if torch.cuda.is_available() else ("mps" if mps else "cpu")
    try:
        torch.empty(0, device=name)
    except (RuntimeError, AssertionError) as e:
        die(f"--device {name} is not usable here ({str(e).splitlines()[0][:80]}); "
            f"use auto, cpu, cuda, cuda:N or mps")
    if "RANK" not in os.environ:
        return name, 0, 1
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if name.startswith("cuda") else "gloo")
    if name.startswith("cuda"):
        name = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(name)
    return name, torch.distributed.get_rank(), torch.distributed.get_world_size()


def precision(dev, dtype):
    """(dtype, autocast context, gradient scaler) for --dtype. auto: bf16 on a GPU that has it,
    fp16 on one that has not, fp32 on a CPU. The scaler is on for fp16 alone: it multiplies the
    loss so that small fp16 gradients do not flush to zero, divides it out before the update,
    and skips a step whose gradients overflowed (then lowers the scale)."""
    kind = torch.device(dev).type
    if dtype == "auto":
        bf16 = kind == "cuda" and torch.cuda.is_bf16_supported()
        dtype = "bfloat16" if bf16 else "float16" if kind == "cuda" else "float32"
    ctx = contextlib.nullcontext()
    if dtype != "float32":
        ctx = torch.autocast(kind, dtype=getattr(torch, dtype))
    return dtype, ctx, torch.amp.GradScaler(kind, enabled=dtype == "float16")


def flat_grads(params):
    """Gradients in one flat fp32 buffer (each p.grad a view into it), zeroed in place between
    steps: data parallel is one all-reduce of it per step, outside the compiled step. DDP's hooks
    run inside backward and turn off the CUDA graphs this small, launch-bound model needs."""
    flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device)
    i = 0
    for p in params:
        p.grad = flat[i:i + p.numel()].view_as(p)
        i += p.numel()
    return flat


@contextlib.contextmanager
def run_folder(out, master, replace):
    """One run per folder at a time: an exclusive lock on the folder itself, which the system
    drops when the process ends however it ends. Unless `replace` (a resume, or --overwrite), a
    folder that holds any file of a run is refused. Every file a run writes goes through
    write_atomic."""
    if not master:
        yield
        return
    try:
        os.makedirs(out, exist_ok=True)
        fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        die(f"cannot write to --out_dir {out} ({e.strerror}); pick another --out_dir")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        die(f"another run is writing to {out}; wait for it or pick another --out_dir")
    try:
        found = [f for f in RUN_FILES if os.path.lexists(os.path.join(out, f))]
        if found and not replace:
            die(f"{out} already holds a run ({', '.join(found)}); continue it with --init_from "
                f"resume, replace it with --overwrite true, or pick another --out_dir")
        yield
    finally:
        os.close(fd)


def load_checkpoint(path):
    """A checkpoint is data: tensors, numbers, strings, lists and dicts (torch.load weights_only)."""
    if not os.path.isfile(path):
        die(f"no checkpoint at {path}; train first (python train.py) or point --out_dir at a run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or objects that only code could rebuild
        why = str(e).strip().splitlines()[-1][:80] if "weights_only" in str(e) else type(e).__name__
        die(f"{path} is not a readable checkpoint ({why}); delete it or pick another --out_dir")
    if not isinstance(ckpt, dict) or not {"model", "model_args", "config", "progress"} <= set(ckpt):
        die(f"{path} is not a checkpoint of this train.py (no model, model_args, config, progress)")
    return ckpt


def save_checkpoint(out, model, state):
    """ckpt.pt (the weights and `state`) and log.jsonl (state["log"]), each written atomically, only
    when the weights are finite: a diverged run never replaces a good checkpoint. A summary.json
    from before goes: it describes a finished run, and this one is not."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        die(f"the weights are not finite after step {state['progress']['step']}; stopped, "
            f"{out}/ckpt.pt is the last good checkpoint (if any); try a lower --lr")
    write_atomic(os.path.join(out, "ckpt.pt"), lambda f: torch.save(state, f), binary=True)
    write_log(out, state["log"])
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(out, "summary.json"))


def write_log(out, log):
    """log.jsonl, one record a line: it always describes the checkpoint beside it, or the finished run."""
    lines = [json.dumps(r) + "\n" for r in log]
    write_atomic(os.path.join(out, "log.jsonl"), lambda f: f.writelines(lines))


def rng_states(dev, world):
    """Every random state a rank draws from (the CPU's; its CUDA device's), of every rank, by rank."""
    cuda = torch.cuda.get_rng_state(dev) if dev.startswith("cuda") else None
    mine = dict(cpu=torch.get_rng_state(), cuda=cuda)
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


class Timer:
    """A run's time, kept in its progress over all its commands: wall_s, the time of training
    (steps, compile, validation; a pass over the test set left out), and img/s over log intervals,
    each command's first (the compile) left out."""

    def __init__(self, progress):
        self.p, self.start, self.t0, self.first = progress, time.time() - progress["wall_s"], 0, True

    def restart(self):
        """An interval starts: the next lap times from here."""
        self.t0 = time.time()

    def lap(self, images):
        """img/s of the interval since restart() or the last lap. Call it after the host has
        waited for the interval's steps: a GPU runs them after the host has queued them."""
        now = time.time()
        dt, self.t0 = now - self.t0, now
        if not self.first:
            self.p["timed_s"] += dt
            self.p["timed_images"] += images
        self.first = False
        return images / dt

    def wall_s(self):
        return time.time() - self.start

    @contextlib.contextmanager
    def not_training(self):
        """Time that wall_s leaves out."""
        t = time.time()
        yield
        self.start += time.time() - t

    def img_s(self):
        return self.p["timed_images"] / self.p["timed_s"] if self.p["timed_s"] else None


def resume_command(out, world):
    """The command that continues the run in `out`, quoted for a shell."""
    launch = ["python"] if world == 1 else ["torchrun", "--standalone", f"--nproc_per_node={world}"]
    return shlex.join(launch + ["train.py", "--init_from", "resume", "--out_dir", out])


class Stop:
    """SIGINT (Ctrl-C) and SIGTERM (kill, timeout, containers, schedulers), handled alike. While the
    training loop runs (`graceful`), the first asks it to stop at its next log interval, a point
    all ranks agree on, with a checkpoint. Otherwise, or again over a second later, it raises
    KeyboardInterrupt. One within the second is the same: timeout signals a process and then its
    group, and torchrun forwards what it receives."""

    def __init__(self):
        self.graceful, self.at, self.signum = False, None, signal.SIGINT
        self.previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        self.install()

    def install(self):
        for s in self.previous:
            signal.signal(s, self.handler)

    def handler(self, signum, frame):
        if self.graceful and self.at is None:
            self.at, self.signum = time.time(), signum
            print("\nstopping at the next log interval, with a checkpoint", file=sys.stderr)
        elif self.at is None or time.time() - self.at > 1:
            self.signum = signum
            raise KeyboardInterrupt

    def requested(self, world, dev):
        """Whether a stop was asked for on any rank. It installs the handler again first: compiling
        kernels can put Triton's own SIGINT handler in Python's place."""
        self.install()
        flag = torch.tensor([float(self.at is not None)], device=dev)
        if world > 1:
            torch.distributed.all_reduce(flag, torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def exit(self, msg):
        """msg on stderr, exit status 128 + the signal. Further signals are ignored first, so that a
        second one cannot cut the message short with a traceback."""
        for s in self.previous:
            signal.signal(s, signal.SIG_IGN)
        print(msg, file=sys.stderr)
        sys.exit(128 + self.signum)

    def restore(self):
        for s, h in self.previous.items():
            signal.signal(s, h)

"""
The system around training: the one writer of files, devices and torchrun processes, precision,
data-parallel gradients, one run per folder, checkpoints, the run's clock, and stops.
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


class DataError(Exception):
    """A problem with the data on disk; the message names the file and the fix."""


def write_atomic(path, write, binary=False):
    """write(f) into a new file beside path, synced to disk, then renamed over path: a crash
    leaves the old file or the new, never half of one; a link at path is replaced, not followed."""
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
    """(device, rank, world): under torchrun one process per GPU (NCCL) or CPU process (gloo)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.empty(0, device=name)
    except (RuntimeError, AssertionError) as e:
        die(f"--device {name} is not usable here ({str(e).splitlines()[0][:80]}); use auto, "
            f"cpu, cuda or cuda:N")
    if "RANK" not in os.environ:
        return name, 0, 1
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if name.startswith("cuda") else "gloo")
    if name.startswith("cuda"):
        name = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(name)
    return name, torch.distributed.get_rank(), torch.distributed.get_world_size()


def precision(dev, dtype):
    """(dtype, autocast, scaler). auto: bf16 on a GPU that has it, else fp16; fp32 on a CPU. The
    scaler acts in fp16 alone: it scales the loss up so that small gradients survive, and skips a
    step whose gradients overflowed."""
    kind = torch.device(dev).type
    if dtype == "auto" and kind == "cuda":
        dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if dtype in ("auto", "float32"):
        return "float32", contextlib.nullcontext(), torch.amp.GradScaler(kind, enabled=False)
    return dtype, torch.autocast(kind, getattr(torch, dtype)), torch.amp.GradScaler(
        kind, enabled=dtype == "float16")


def flat_grads(params):
    """Every p.grad a view into one fp32 buffer: data parallel is one all-reduce of it a step,
    outside the compiled step (DDP's hooks would turn off the CUDA graphs)."""
    flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device)
    i = 0
    for p in params:
        p.grad = flat[i:i + p.numel()].view_as(p)
        i += p.numel()
    return flat


@contextlib.contextmanager
def run_folder(out, master, replace):
    """One run per folder: a lock on the folder, which the system drops however the process ends.
    Unless `replace`, a folder that holds a run is refused."""
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


def load_checkpoint(path, option="--out_dir"):
    """A checkpoint read as data (tensors, numbers, strings, lists, dicts): torch.load with
    weights_only. `option` is where its path came from, for the messages."""
    if not os.path.isfile(path):
        die(f"no checkpoint at {path}; train first (python train.py) or point {option} at a run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or objects that only code could build
        why = str(e).strip().splitlines()[-1][:80] if "weights_only" in str(e) else type(e).__name__
        die(f"{path} is not a readable checkpoint ({why}); delete it or pick another {option}")
    if not isinstance(ckpt, dict) or not {"model", "model_args", "config", "progress"} <= set(ckpt):
        die(f"{path} is not a checkpoint of this train.py (no model, model_args, config, progress)")
    return ckpt


def save_checkpoint(out, model, state):
    """ckpt.pt and log.jsonl, if the weights are finite (a diverged run never replaces a good
    checkpoint); summary.json goes, as the run is not finished."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        die(f"the weights are not finite after step {state['progress']['step']}; stopped, "
            f"{out}/ckpt.pt is the last good checkpoint (if any); try a lower --lr")
    write_atomic(os.path.join(out, "ckpt.pt"), lambda f: torch.save(state, f), binary=True)
    write_log(out, state["log"])
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(out, "summary.json"))


def write_log(out, log):
    lines = [json.dumps(r) + "\n" for r in log]
    write_atomic(os.path.join(out, "log.jsonl"), lambda f: f.writelines(lines))


def rng_states(dev, world):
    """Every rank's random states: its CPU's and its GPU's."""
    mine = dict(cpu=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state(dev) if dev.startswith("cuda") else None)
    states = [mine] * world
    if world > 1:
        torch.distributed.all_gather_object(states, mine)
    return states


def restore_rng(states, dev, rank, world):
    """Each rank continues its own random streams, if the run has as many ranks as it had."""
    if len(states) == world:
        torch.set_rng_state(states[rank]["cpu"])
        if dev.startswith("cuda") and states[rank]["cuda"] is not None:
            torch.cuda.set_rng_state(states[rank]["cuda"], dev)


class Timer:
    """A run's clock, kept in its progress over all its commands: wall_s counts training, compile
    and validation but not a pass over the test set; img/s leaves out each command's first log
    interval (the compile)."""

    def __init__(self, progress):
        self.p, self.first = progress, True
        self.start = self.t0 = time.time() - progress.wall_s

    def restart(self):
        self.t0 = time.time()

    def lap(self, pending, batch_size, world):
        """(loss, accuracy, img/s) since restart() or the last lap, from the steps' (loss,
        accuracy) on the device, averaged over ranks. The host waits here for the steps it has
        queued, so the interval ends after them."""
        stats = torch.stack(pending)  # (steps, 2)
        if world > 1:
            torch.distributed.all_reduce(stats)
            stats /= world
        loss, acc = stats.mean(0).tolist()  # the host sync
        images, dt, self.t0 = len(pending) * batch_size, time.time() - self.t0, time.time()
        if not self.first:
            self.p.timed_s += dt
            self.p.timed_images += images
        self.first = False
        return loss, acc, images / dt

    @contextlib.contextmanager
    def not_training(self):
        t = time.time()
        yield
        self.start += time.time() - t

    def wall_s(self):
        return time.time() - self.start

    def img_s(self):
        return self.p.timed_images / self.p.timed_s if self.p.timed_s else None


class Stop:
    """SIGINT and SIGTERM alike. While the loop runs (`graceful`) the first asks it to stop with a
    checkpoint at the next log interval, where all ranks agree; otherwise, or again a second
    later, KeyboardInterrupt. Signals within the second are one stop: `timeout` signals a process
    and then its group, and torchrun forwards them."""

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
        """Whether any rank was asked to stop. The handler goes in again first: compiling kernels
        can replace it with Triton's own."""
        self.install()
        flag = torch.tensor([float(self.at is not None)], device=dev)
        if world > 1:
            torch.distributed.all_reduce(flag, torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self):
        for s, h in self.previous.items():
            signal.signal(s, h)


def one_line(run):
    """run(stop) under a Stop: what the user or the disk got wrong ends in one line and exit
    status 2; a stop, a KeyboardInterrupt whose message is its line, 128 + the signal."""
    stop = Stop()
    try:
        return run(stop)
    except DataError as e:  # from a worker process: the last line of its traceback
        die(str(e).strip().splitlines()[-1].split("DataError: ")[-1])
    except WriteError as e:  # a full disk, a folder that became read-only
        die(f"{e}; the files already written are as they were; free space and resume")
    except (MemoryError, RuntimeError) as e:  # torch's and numpy's words, GPU or CPU
        oom = isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "allocate memory" in str(e)
        if not oom:
            raise
        die("out of memory; lower --batch_size, the model's size or --n_train")
    except KeyboardInterrupt as e:  # deaf to more signals: one could cut the line short
        for s in stop.previous:
            signal.signal(s, signal.SIG_IGN)
        print(e.args[0] if e.args else "interrupted; what this run had written is as it was; "
              "--init_from resume continues from its last checkpoint, if any", file=sys.stderr)
        sys.exit(128 + stop.signum)
    finally:
        stop.restore()


def resume_command(out, world):
    """The shell command that continues the run in `out`."""
    launch = ["python"] if world == 1 else ["torchrun", "--standalone", f"--nproc_per_node={world}"]
    return shlex.join(launch + ["train.py", "--init_from", "resume", "--out_dir", out])

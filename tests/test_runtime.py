"""runtime.py through train.py: stops by SIGINT and SIGTERM, one run per folder, checkpoints as
data, the one writer, the run's clock, paths that move, and errors that are one line."""
import errno
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import loader
import model
import runtime
import train
from tests.test_train import AUGS, TINY, ckpt_of, refused

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def clock(monkeypatch):
    """time.time() plus every clock.jump(seconds) so far: a slow sync or evaluation, no wait."""
    offset, now = [0.0], time.time
    monkeypatch.setattr(time, "time", lambda: now() + offset[0])
    return SimpleNamespace(jump=lambda s: offset.__setitem__(0, offset[0] + s))


def signal_at(monkeypatch, step, signum=signal.SIGINT):
    """The signal arrives during training step `step`, as a key press or a `kill` would."""
    calls, mix = [], loader.mix_pairs

    def send(*a):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signum)
        return mix(*a)
    monkeypatch.setattr(loader, "mix_pairs", send)


@pytest.mark.parametrize("at, signum", [(2, signal.SIGINT), (3, signal.SIGINT),
                                        (2, signal.SIGTERM)])
def test_a_stop_checkpoints_and_the_resume_continues_exactly(at, signum, tmp_path, monkeypatch,
                                                             capsys):
    """SIGINT or SIGTERM at step `at` of 3 (mid-epoch, and the epoch's last step): one line,
    exit 128 + the signal, a checkpoint at that step, and a resume command that pastes (the folder
    has a space in its name); resumed, the run ends with the weights of an unbroken one."""
    argv = TINY + AUGS + ["--epochs", "2", "--drop_path", "0.2"]
    train.main(argv + ["--out_dir", str(tmp_path / "a")])
    signal_at(monkeypatch, at, signum)
    b = str(tmp_path / "b c")
    ok, err = refused(capsys, argv + ["--out_dir", b], code=128 + signum)
    assert ok and f"stopped at step {at}; " in err.splitlines()[-1]
    resume = shlex.split(err.splitlines()[-1].split("continues it: ")[1])
    assert resume == ["python", "train.py", "--init_from", "resume", "--out_dir", b]
    progress = ckpt_of(b)["progress"]
    assert (progress["step"], progress["epoch"], progress["batch"]) == (at, 0, at)
    monkeypatch.undo()
    assert train.main(resume[2:])["steps"] == 6
    wa, wb = ckpt_of(tmp_path / "a")["model"], ckpt_of(b)["model"]
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=0, msg=k)


def test_a_second_signal_within_a_second_is_the_same_stop(clock):
    """`timeout` signals a process and then its group: two at once stop the run at its next log
    interval with a checkpoint, as one does; one more, over a second later, quits at once."""
    stop = runtime.Stop()
    try:
        stop.graceful = True
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested(1, "cpu")
        clock.jump(1.5)
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    finally:
        stop.restore()


def test_stop_takes_sigint_back_from_a_library_that_replaced_the_handler():
    """Compiling kernels installs Triton's own C-level SIGINT handler in Python's place;
    requested() installs ours again. The library is played by libc's signal(SIGINT, SIG_DFL):
    without the reinstall the SIGINT kills the child."""
    code = ("import ctypes, signal, runtime\n"
            "stop = runtime.Stop()\n"
            "stop.graceful = True\n"
            "ctypes.CDLL(None).signal(signal.SIGINT, int(signal.SIG_DFL))\n"
            "print(stop.requested(1, 'cpu'))\n"
            "signal.raise_signal(signal.SIGINT)\n"
            "print(stop.requested(1, 'cpu'))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    assert (r.returncode, r.stdout.split()) == (0, ["False", "True"]), r.stderr


def test_a_stop_outside_the_loop_ends_in_one_line_though_timeout_sends_two(monkeypatch):
    """A stop outside the training loop (here: the final evaluation) exits 130 with one line.
    `timeout -s INT` sends a second SIGINT moments later; arriving while that line is written, it
    must not end in a traceback."""
    class Stderr(list):
        def write(self, s):
            signal.raise_signal(signal.SIGINT)  # the second SIGINT, in the middle of the message
            self.append(s)

        def flush(self):
            pass

    def final_evaluation(argv, stop):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "train", final_evaluation)
    monkeypatch.setattr(sys, "stderr", Stderr())
    try:
        train.main([])
    except (SystemExit, KeyboardInterrupt) as e:
        ended = e
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert isinstance(ended, SystemExit) and ended.code == 130, repr(ended)
    assert "".join(sys.stderr).startswith("interrupted; what this run had written is as it was")


def test_one_run_at_a_time_per_folder(tmp_path, capsys):
    with runtime.run_folder(str(tmp_path), True, replace=True):  # another run holds the folder
        ok, err = refused(capsys, TINY + ["--out_dir", str(tmp_path)])
    assert ok and f"another run is writing to {tmp_path}" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "ckpt.pt").exists()
    assert train.main(TINY + ["--out_dir", str(tmp_path)])["steps"] == 3  # the lock is gone


def test_a_checkpoint_is_data_not_code(tmp_path, capsys):
    """A checkpoint that would run code when unpickled is refused in one line; the code never
    runs."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    torch.save({"model": {}, "model_args": {}, "config": {}, "progress": Payload()},
               tmp_path / "ckpt.pt")
    ok, err = refused(capsys, ["--init_from", "resume", "--out_dir", str(tmp_path)])
    assert ok and "is not a readable checkpoint" in err and len(err.splitlines()) == 1
    assert not marker.exists()


def test_a_full_disk_is_one_line_naming_the_file_and_keeps_the_last_checkpoint(tmp_path,
                                                                              monkeypatch, capsys):
    train.main(TINY + ["--epochs", "2", "--out_dir", str(tmp_path)])
    before = (tmp_path / "ckpt.pt").read_bytes(), (tmp_path / "log.jsonl").read_bytes()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", full)
    ok, err = refused(capsys, TINY + ["--out_dir", str(tmp_path), "--overwrite", "true"])
    assert ok and len(err.splitlines()) == 1
    assert f"cannot write {tmp_path}/ckpt.pt (No space left on device)" in err
    assert ((tmp_path / "ckpt.pt").read_bytes(), (tmp_path / "log.jsonl").read_bytes()) == before
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def folder_dataset(root, n_train=16, n_test=4):
    from PIL import Image
    for split, n in (("train", n_train), ("test", n_test)):
        for c, colour in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), colour).save(root / split / c / f"{i}.png")


FOLDER = ["--dataset", "folder", "--image_size", "8", "--batch_size", "8", "--n_embd", "16",
          "--n_head", "2", "--n_layer", "1", "--epochs", "1", "--device", "cpu"]


def test_a_resumed_folder_run_needs_the_same_classes_and_images(tmp_path, capsys):
    folder_dataset(tmp_path)
    train.main(FOLDER + ["--data_dir", str(tmp_path), "--out_dir", str(tmp_path / "o")])
    resume = ["--init_from", "resume", "--out_dir", str(tmp_path / "o"), "--epochs", "2"]
    renamed = lambda: [(tmp_path / s / "b").rename(tmp_path / s / "c") for s in ("train", "test")]
    added = lambda: (tmp_path / "train" / "c" / "0.png").rename(tmp_path / "train" / "c" / "x.png")
    for change in (renamed, added):  # labels would permute; an image more or less
        change()
        ok, err = refused(capsys, resume)
        assert ok and "the data changed since the run in" in err and len(err.splitlines()) == 1


def test_a_relative_data_dir_is_stored_resolved(tmp_path, monkeypatch, capsys):
    """A run given a relative --data_dir resumes from another working folder, and the same folder
    given as an absolute path is no change; a dangling link among the images is one line that
    names it, not advice about writing."""
    folder_dataset(tmp_path / "d")
    monkeypatch.chdir(tmp_path)
    train.main(FOLDER + ["--data_dir", "d", "--out_dir", "o"])
    assert ckpt_of(tmp_path / "o")["config"]["data_dir"] == str(tmp_path / "d")
    monkeypatch.chdir(ROOT)
    s = train.main(["--init_from", "resume", "--out_dir", str(tmp_path / "o"), "--data_dir",
                    str(tmp_path / "d"), "--epochs", "2"])
    assert s["epochs"] == 2 and ckpt_of(tmp_path / "o")["progress"]["epoch"] == 2
    assert not (ROOT / "o").exists()  # the run is where the command names it, not where it was
    os.symlink(tmp_path / "gone.png", tmp_path / "d" / "train" / "a" / "z.png")
    ok, err = refused(capsys, FOLDER + ["--data_dir", str(tmp_path / "d"), "--out_dir",
                                        str(tmp_path / "o2")])
    assert ok and f"cannot decode image {tmp_path}/d/train/a/z.png" in err and "write" not in err


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB"),
    RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 192 GB"),
    MemoryError("Unable to allocate 745. GiB for an array"),  # numpy's
    RuntimeError("anything else"),
])
def test_out_of_memory_is_one_line(error, tmp_path, monkeypatch, capsys):
    def oom(*a, **k):
        raise error

    monkeypatch.setattr(loader, "mix_pairs", oom)
    if "anything else" in str(error):  # not memory: a bug, with its traceback
        with pytest.raises(RuntimeError):
            train.main(TINY + ["--out_dir", str(tmp_path)])
        return
    ok, err = refused(capsys, TINY + ["--out_dir", str(tmp_path)])
    assert ok and err.startswith("error: out of memory") and len(err.splitlines()) == 1


def test_a_log_interval_is_timed_to_the_end_of_its_wait_for_the_steps(tmp_path, clock, monkeypatch):
    """On a GPU the host queues steps ahead and waits for them at each log interval's one sync:
    with a clock that jumps 100 s inside that wait, the interval's time, and so img/s, hold it."""
    tolist = torch.Tensor.tolist  # the sync in Timer.lap: the host waits for the queued steps

    def slow_sync(t):
        clock.jump(100 if t.shape == (2,) else 0)
        return tolist(t)
    monkeypatch.setattr(torch.Tensor, "tolist", slow_sync)
    s = train.main(TINY + ["--epochs", "2", "--out_dir", str(tmp_path)])
    log = [r for r in map(json.loads, open(tmp_path / "log.jsonl")) if "loss" in r]
    assert all(64 / 110 < r["img_s"] <= 64 / 100 for r in log), log  # a step takes < 10 s
    assert 64 / 110 < s["img_s"] <= 64 / 100


def test_wall_s_counts_validation_and_leaves_out_the_test_set(tmp_path, clock, monkeypatch):
    """With a clock that jumps 1000 s in every evaluation: two validation passes count in wall_s
    (part of a run that holds out a split); two test passes, the last epoch's included, do not."""
    evaluate = loader.evaluate
    monkeypatch.setattr(loader, "evaluate",
                        lambda *a, **k: (clock.jump(1000), evaluate(*a, **k))[1])
    args = TINY + ["--n_layer", "1", "--epochs", "2", "--log_every", "20"]
    on_test = train.main(args + ["--out_dir", str(tmp_path / "test")])
    on_val = train.main(args + ["--val_split", "64", "--out_dir", str(tmp_path / "val")])
    assert on_test["wall_s"] < 100 and 2000 <= on_val["wall_s"] < 2100


class InfiniteGradient(torch.autograd.Function):
    """The identity, whose gradient overflows: a step that an fp16 scaler must skip."""
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def test_fp16_scaler_skips_overflowed_steps_and_a_resume_restores_it(tmp_path, monkeypatch):
    """--dtype float16 trains under a gradient scaler (here on the CPU). A step whose gradients
    overflow leaves the weights as they were and halves the scale, while the schedule moves on
    with the data; the checkpoint holds the scaler, and a resume continues with it."""
    forward, clip = model.ViT.forward, torch.nn.utils.clip_grad_norm_
    update, steps, weights, scales = torch.amp.GradScaler.update, [], [], []

    def overflow_at_step_2(self, *a, **k):
        logits, value = forward(self, *a, **k)
        if value is not None:  # a training step
            steps.append(1)
            value = InfiniteGradient.apply(value) if len(steps) == 2 else value
        return logits, value

    def record_weights(params, max_norm):  # called between the backward pass and the update
        params = list(params)
        weights.append([p.detach().clone() for p in params])
        return clip(params, max_norm)
    monkeypatch.setattr(model.ViT, "forward", overflow_at_step_2)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", record_weights)
    monkeypatch.setattr(torch.amp.GradScaler, "update",
                        lambda self: (update(self), scales.append(self.get_scale())))
    s = train.main(TINY + ["--dtype", "float16", "--epochs", "2", "--out_dir", str(tmp_path)])
    assert s["dtype"] == "float16" and scales[1] == scales[0] / 2
    assert all(torch.equal(a, b) for a, b in zip(weights[1], weights[2]))  # step 2 skipped
    assert not all(torch.equal(a, b) for a, b in zip(weights[2], weights[3]))  # step 3 not
    ck = ckpt_of(tmp_path)
    lrs = [r["lr"] for r in ck["log"] if "lr" in r]
    assert lrs == [train.lr_at(i, 6, SimpleNamespace(**ck["config"])) for i in range(6)]
    assert ck["scaler"]["scale"] == scales[-1]
    loaded, load = [], torch.amp.GradScaler.load_state_dict
    monkeypatch.setattr(torch.amp.GradScaler, "load_state_dict",
                        lambda self, d: (loaded.append(d), load(self, d)))
    s = train.main(["--init_from", "resume", "--out_dir", str(tmp_path), "--epochs", "3"])
    assert loaded == [ck["scaler"]] and s["steps"] == 9 and s["dtype"] == "float16"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("attn", ["linear", "pure"])
def test_resume_on_a_gpu_is_bitwise_exact(attn, tmp_path, monkeypatch, capsys):
    """On CUDA (eager; these kernels are deterministic): a run stopped mid-epoch and resumed ends
    with the same weights, bit for bit, as the unbroken run: the CUDA random state (stochastic
    depth, the mixup permutation) is in the checkpoint with the CPU's."""
    argv = TINY + AUGS + ["--attn", attn, "--epochs", "2", "--drop_path", "0.2", "--device",
                          "cuda", "--compile", "none"]
    train.main(argv + ["--out_dir", str(tmp_path / "a")])
    signal_at(monkeypatch, 4)  # in the second epoch
    refused(capsys, argv + ["--out_dir", str(tmp_path / "b")], code=130)
    monkeypatch.undo()
    ck = ckpt_of(tmp_path / "b")
    assert ck["progress"]["step"] == 4 and ck["rng"][0]["cuda"] is not None
    train.main(["--init_from", "resume", "--out_dir", str(tmp_path / "b")])
    wa, wb = ckpt_of(tmp_path / "a")["model"], ckpt_of(tmp_path / "b")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

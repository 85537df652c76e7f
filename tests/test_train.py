"""train.py end to end on tiny configs (CPU): each attention kind, resume, checkpoints, the NaN stop, CLI errors."""
import errno
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import runtime
import train
from configurator import configure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_train", "192", "--n_test", "64", "--batch_size", "64", "--n_layer", "2", "--n_head", "2",
        "--n_embd", "16", "--epochs", "1", "--min_steps", "0", "--log_every", "1", "--device", "cpu"]
AUGS = ["--rotate", "10", "--zoom", "0.1", "--translate", "0.1", "--jitter", "0.3", "--erase", "0.25",
        "--mixup", "0.8", "--cutmix", "1.0"]


def cli(*argv, cwd=ROOT):
    """train.py as its own process: what a user sees, tracebacks included."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def refused(capsys, argv, code=2):
    """train.main(argv) in this process (each new process costs an import of torch): its exit code and stderr."""
    with pytest.raises(SystemExit) as e:
        train.main(list(argv))
    return e.value.code == code, capsys.readouterr().err


def ckpt_of(folder):
    return torch.load(os.path.join(folder, "ckpt.pt"), weights_only=True)


def strict_json(path):
    """The file as JSON, refusing NaN / Infinity (which json.dump writes but strict readers reject)."""
    return json.loads(open(path).read(), parse_constant=lambda c: pytest.fail(f"{path} holds {c}"))


@pytest.mark.parametrize("attn", ["softmax", "pure", "linear"])
def test_tiny_run_each_kind(attn, tmp_path):
    s = train.main(TINY + ["--attn", attn, "--out_dir", str(tmp_path)])
    assert s["attn"] == attn and s["steps"] == 3 and 0 <= s["test_acc"] <= 1
    assert strict_json(tmp_path / "summary.json")["test_acc"] == s["test_acc"]
    ckpt = ckpt_of(tmp_path)
    assert ckpt["model_args"]["attn"] == attn and ckpt["progress"]["step"] == 3 and ckpt["config"]["n_train"] == 192
    assert not any(k.startswith("_orig_mod") for k in ckpt["model"])
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3] and "test_acc" in log[-1]


def test_resume_restores_the_run_and_continues_exactly(tmp_path, monkeypatch):
    """Killed after its first checkpoint and resumed with nothing but --init_from resume: the run's own
    config comes back (data, optimiser, augmentation) and it ends with the weights of an unbroken run."""
    a, b = tmp_path / "a", tmp_path / "b"
    train.main(TINY + AUGS + ["--epochs", "2", "--out_dir", str(a)])
    save = train.data.write_atomic

    class Killed(BaseException):  # as kill -9: nothing of the run's own error handling runs
        pass

    def save_then_die(path, write, mode="w"):  # the process dies right after its first checkpoint
        save(path, write, mode)
        if path.endswith("ckpt.pt"):
            raise Killed

    monkeypatch.setattr(train.data, "write_atomic", save_then_die)
    with pytest.raises(Killed):
        train.main(TINY + AUGS + ["--epochs", "2", "--out_dir", str(b)])
    monkeypatch.setattr(train.data, "write_atomic", save)
    assert ckpt_of(b)["progress"]["step"] == 3
    with open(b / "log.jsonl", "a") as f:  # as if it had logged two more steps, the last one cut short
        f.write(json.dumps(dict(step=4, epoch=1, loss=9.0, acc=0.0)) + '\n{"step": 5, "lo')
    s = train.main(["--init_from", "resume", "--out_dir", str(b)])
    assert s["steps"] == 6 and s["resumed_from_step"] == 3
    wa, wb = ckpt_of(a)["model"], ckpt_of(b)["model"]
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], msg=k)
    log = [json.loads(line) for line in open(b / "log.jsonl")]  # past step 3, only the resumed run's lines
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5, 6] and 9.0 not in [r["loss"] for r in log if "loss" in r]
    timed = [r["img_s"] for r in log if "loss" in r and r["step"] not in (1, 4)]  # each segment's first step compiles
    assert s["img_s"] == pytest.approx(len(timed) / sum(1 / v for v in timed))  # both segments' steps, one batch each


def test_resume_overrides_apply_or_are_refused(tmp_path, capsys):
    train.main(TINY + ["--out_dir", str(tmp_path)])
    ckpt = ckpt_of(tmp_path)
    del ckpt["config"]["patch_overlap"]  # a run from before the option existed resumes with its default
    torch.save(ckpt, tmp_path / "ckpt.pt")
    s = train.main(["--init_from", "resume", "--out_dir", str(tmp_path), "--epochs", "2", "--lr", "1e-3"])
    out = capsys.readouterr().out
    assert "resume: epochs = 2 (the run had 1)" in out and "resume: lr = 0.001 (the run had 0.002)" in out
    assert s["steps"] == 6 and ckpt_of(tmp_path)["config"]["lr"] == 1e-3
    for flag, value in (("--attn", "softmax"), ("--n_embd", "32"), ("--n_train", "128")):
        with pytest.raises(SystemExit):
            train.main(["--init_from", "resume", "--out_dir", str(tmp_path), flag, value])
        assert "a resumed run cannot change it" in capsys.readouterr().err


def test_an_existing_run_is_never_replaced_unless_asked(tmp_path, capsys):
    train.main(TINY + ["--out_dir", str(tmp_path)])
    before = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit):
        train.main(TINY + ["--out_dir", str(tmp_path), "--attn", "softmax"])
    assert "already holds a run" in capsys.readouterr().err and (tmp_path / "ckpt.pt").read_bytes() == before
    assert train.main(TINY + ["--out_dir", str(tmp_path), "--attn", "softmax", "--overwrite", "true"])["attn"] == "softmax"


@pytest.mark.parametrize("extra", [
    ["--epochs", "3"],  # diverges within the run: the loss check stops it
    ["--n_train", "64", "--attn", "softmax"],  # one step per epoch: the update of the last step makes it diverge
])
def test_a_diverged_run_stops_and_keeps_the_last_good_checkpoint(extra, tmp_path, capsys):
    train.main(TINY + ["--out_dir", str(tmp_path)])
    good = (tmp_path / "ckpt.pt").read_bytes(), (tmp_path / "log.jsonl").read_bytes(), (tmp_path / "summary.json").read_bytes()
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--out_dir", str(tmp_path), "--overwrite", "true", "--lr", "1e30", "--warmup", "0",
                           "--grad_clip", "0", *extra])
    assert e.value.code == 2 and "last good checkpoint" in capsys.readouterr().err
    assert ((tmp_path / "ckpt.pt").read_bytes(), (tmp_path / "log.jsonl").read_bytes(),
            (tmp_path / "summary.json").read_bytes()) == good  # the old run, whole: its checkpoint, log and summary


def test_corrupt_checkpoint_is_a_clear_error_and_left_alone(tmp_path, capsys):
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    code2, err = refused(capsys, ["--init_from", "resume", "--out_dir", str(tmp_path)])
    assert code2 and "not a readable checkpoint" in err and len(err.splitlines()) == 1
    assert (tmp_path / "ckpt.pt").read_bytes() == b"not a checkpoint"
    code2, err = refused(capsys, ["--init_from", "resume", "--out_dir", str(tmp_path / "none")])
    assert code2 and "no checkpoint" in err


def test_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    cases = [
        (["--atn", "linear"], "unknown option --atn; valid options:"),
        (["--attn", "cosine"], "--attn must be one of softmax | pure | linear"),
        (["--epochs", "ten"], "--epochs takes a int"),
        (["--compile", "maybe"], "--compile takes true or false"),
        (["linear"], "unexpected argument"),
        (["--attn"], "--attn needs a value"),
        (["config/none.py"], "config file config/none.py not found"),
        (["--seed", "-1"], "--seed must be at least 0; got -1"),
        (["--device", "foo"], "--device foo is not usable here"),
        (["--out_dir", str(tmp_path / "file"), "--n_train", "256", "--n_test", "16", "--device", "cpu"], "cannot write to --out_dir"),
    ]
    for argv, msg in cases:
        code2, err = refused(capsys, argv)
        assert code2 and msg in err and len(err.splitlines()) == 1, (argv, err)
    r = cli("--attn", "cosine")  # and as a process of its own: one line, no traceback
    assert r.returncode == 2 and r.stderr.splitlines() == ["error: --attn must be one of softmax | pure | linear; got 'cosine'"]


@pytest.mark.parametrize("argv, msg", [
    (["--epochs", "0"], "--epochs must be at least 1; got 0"),
    (["--eval_every", "-1"], "--eval_every must be at least 0; got -1"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1); got 1.5"),
    (["--n_embd", "30", "--n_head", "4"], "n_embd (30) must be divisible by n_head (4); change that option"),
    (["--gamma_init", "1"], "gamma_init must lie in (0, 1); got 1.0"),
    (["--val_split", "192"], "--val_split 192 leaves no training images"),
    (["--batch_size", "256"], "--batch_size 256 is larger than the training set (192 images)"),
    (["--dataset", "folder", "--stream", "true", "--val_split", "100"], "--val_split 100 does nothing here: --stream true"),
    (["--dataset", "folder", "--stream", "true", "--eval_shift", "true"], "--eval_shift True does nothing here"),
    (["--attn", "softmax", "--hops", "2"], "--hops 2 does nothing here: --hops is Pure-InfSA's"),
    (["--workers", "2"], "--workers 2 does nothing here"),
])
def test_bad_options_stop_before_anything_is_written(argv, msg, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(TINY + argv + ["--out_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err and len(err.splitlines()) == 1 and not (tmp_path / "run").exists()


def test_config_files_then_overrides_left_to_right(tmp_path):
    cfg, given = configure(["config/cifar.py", "--n_embd", "64", "--attn=pure"], train.DEFAULTS, train.ALLOWED)
    assert (cfg["n_embd"], cfg["n_layer"], cfg["attn"], cfg["epochs"], cfg["compile_mode"]) == (64, 6, "pure", 75, "reduce-overhead")
    assert {"n_embd", "attn", "dataset"} <= given
    long, _ = configure(["config/cifar_long.py"], train.DEFAULTS)
    assert (long["epochs"], long["cutmix"], long["rotate"], long["eval_every"]) == (560, 1.0, 15.0, 20)
    ten, _ = configure(["config/cifar_10min.py"], train.DEFAULTS)
    assert {k: v for k, v in ten.items() if long[k] != v} == dict(weight_decay=0.1, policy=True, epochs=580, patch_overlap=2,
                                                                  flip_eval=True, move_eval=2, eval_every=0, ckpt_every=40)
    (tmp_path / "bad.py").write_text("epochs = 'many'\n")
    with pytest.raises(SystemExit):
        configure([str(tmp_path / "bad.py")], train.DEFAULTS)
    r = cli("-h")
    assert r.returncode == 0 and "--attn 'linear'  (softmax | pure | linear)" in r.stdout


def test_a_small_training_set_gets_at_least_min_steps(tmp_path, capsys):
    s = train.main(TINY + ["--n_train", "128", "--min_steps", "7", "--out_dir", str(tmp_path)])
    assert s["epochs"] == 4 and s["steps"] == 8  # 2 steps an epoch: 4 epochs reach 7 steps
    assert "training 4 epochs (raised from 1 to reach min_steps 7) x 2 steps = 8 steps" in capsys.readouterr().out


def test_grad_accum_splits_the_same_global_batch(tmp_path):
    one = train.main(TINY + ["--out_dir", str(tmp_path / "one")])
    two = train.main(TINY + ["--grad_accum", "2", "--out_dir", str(tmp_path / "two")])
    assert one["steps"] == two["steps"] == 3
    for k, w in ckpt_of(tmp_path / "one")["model"].items():
        torch.testing.assert_close(ckpt_of(tmp_path / "two")["model"][k], w, rtol=1e-4, atol=1e-5, msg=k)


def test_ckpt_every_checkpoints_without_looking_at_the_test_set(tmp_path, monkeypatch):
    saved, save = [], train.data.write_atomic
    monkeypatch.setattr(train.data, "write_atomic",
                        lambda path, write, mode="w": (path.endswith("ckpt.pt") and saved.append(path), save(path, write, mode)))
    train.main(TINY + ["--epochs", "4", "--eval_every", "0", "--ckpt_every", "2", "--out_dir", str(tmp_path)])
    assert len(saved) == 2 and ckpt_of(tmp_path)["progress"]["epoch"] == 4  # at epoch 2 with no evaluation, then the end
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["epoch"] for r in log if "test_acc" in r] == [3]  # the test set, once


def test_val_split_is_random_and_test_is_evaluated_once(tmp_path):
    s = train.main(TINY + ["--val_split", "64", "--epochs", "2", "--out_dir", str(tmp_path)])
    assert 0 <= s["val_acc"] <= 1 and 0 <= s["test_acc"] <= 1 and s["steps"] == 4  # 128 training images: 2 steps an epoch
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert sum("val_acc" in r for r in log) == 2 and sum("test_acc" in r for r in log) == 1
    y = train.data.load("shapes", "data", 32, 1337, 192, 64)["y_train"]
    perm = torch.randperm(192, generator=torch.Generator().manual_seed(0))
    assert len(set(y[perm[-64:]].tolist())) > 3  # the held-out images span the classes


def test_lr_schedule():
    total = 100
    lrs = [train.lr_at(s, total, 1e-3, 1e-5, 0.1) for s in range(total)]
    assert lrs[9] == pytest.approx(1e-3) and lrs[0] == pytest.approx(1e-4)
    assert lrs[-1] < 2e-5 and all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


@pytest.mark.parametrize("at", [2, 3])  # mid-epoch, and the epoch's last step (the resume starts on an empty epoch)
def test_ctrl_c_stops_with_a_checkpoint_that_resumes_exactly(at, tmp_path, monkeypatch, capsys):
    """Ctrl-C at step `at` of 3: one line, exit 130, a checkpoint at that step; resumed, the run ends with
    the weights of an unbroken one (the loader skips the batches done and their random draws)."""
    argv = TINY + AUGS + ["--epochs", "2", "--drop_path", "0.2"]
    train.main(argv + ["--out_dir", str(tmp_path / "a")])
    calls, loss = [], train.mixed_loss

    def press_ctrl_c(*a):  # the signal arrives during the second step, as a key press would
        calls.append(1)
        if len(calls) == at:
            os.kill(os.getpid(), signal.SIGINT)
        return loss(*a)

    monkeypatch.setattr(train, "mixed_loss", press_ctrl_c)
    with pytest.raises(SystemExit) as e:
        train.main(argv + ["--out_dir", str(tmp_path / "b")])
    assert e.value.code == 130 and f"stopped by Ctrl-C at step {at}" in capsys.readouterr().err.splitlines()[-1]
    progress = ckpt_of(tmp_path / "b")["progress"]
    assert (progress["step"], progress["epoch"], progress["batch"]) == (at, 0, at)
    monkeypatch.setattr(train, "mixed_loss", loss)
    assert train.main(["--init_from", "resume", "--out_dir", str(tmp_path / "b")])["steps"] == 6
    wa, wb = ckpt_of(tmp_path / "a")["model"], ckpt_of(tmp_path / "b")["model"]
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=0, msg=k)


def test_one_run_at_a_time_per_folder(tmp_path, capsys):
    with runtime.run_folder(str(tmp_path), True):  # another run holds the folder
        with pytest.raises(SystemExit):
            train.main(TINY + ["--out_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert f"another run (pid {os.getpid()}) is writing to {tmp_path}" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "ckpt.pt").exists()
    assert train.main(TINY + ["--out_dir", str(tmp_path)])["steps"] == 3  # the lock goes with its process


def test_a_new_batch_size_on_resume_still_ends_the_schedule_at_min_lr(tmp_path):
    train.main(TINY + ["--epochs", "2", "--out_dir", str(tmp_path), "--eval_every", "1"])
    ck = ckpt_of(tmp_path)
    ck["progress"].update(epoch=1, batch=0, step=3)  # as if stopped after the first epoch
    ck["log"] = [r for r in ck["log"] if r["step"] <= 3]
    torch.save(ck, tmp_path / "ckpt.pt")
    s = train.main(["--init_from", "resume", "--out_dir", str(tmp_path), "--batch_size", "32"])
    lrs = [r["lr"] for r in map(json.loads, open(tmp_path / "log.jsonl")) if "lr" in r]
    assert s["steps"] == 3 + 6 and lrs[-1] == pytest.approx(train.lr_at(11, 12, 2e-3, 1e-5, 0.05)) and lrs[-1] < 1e-4


def test_a_checkpoint_is_data_not_code(tmp_path, capsys):
    """A checkpoint that would run code when unpickled is refused in one line, and the code never runs."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": {}, "model_args": {}, "config": {}, "progress": Payload()}, tmp_path / "ckpt.pt")
    code2, err = refused(capsys, ["--init_from", "resume", "--out_dir", str(tmp_path)])
    assert code2 and "is not a readable checkpoint" in err and len(err.splitlines()) == 1 and not marker.exists()


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    train.main(TINY + ["--epochs", "2", "--out_dir", str(tmp_path)])
    before = (tmp_path / "ckpt.pt").read_bytes(), (tmp_path / "log.jsonl").read_bytes()
    save = train.data.write_atomic

    def full(path, write, mode="w"):
        if path.endswith("ckpt.pt"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return save(path, write, mode)

    monkeypatch.setattr(train.data, "write_atomic", full)
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--out_dir", str(tmp_path), "--overwrite", "true"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1 and f"cannot write {tmp_path}/ckpt.pt (No space left" in err
    assert ((tmp_path / "ckpt.pt").read_bytes(), (tmp_path / "log.jsonl").read_bytes()) == before


def test_a_resumed_folder_run_needs_the_same_classes_and_images(tmp_path, capsys):
    from PIL import Image
    for split, n in (("train", 16), ("test", 4)):
        for c, colour in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), colour).save(tmp_path / split / c / f"{i}.png")
    argv = ["--dataset", "folder", "--data_dir", str(tmp_path), "--image_size", "8", "--batch_size", "8", "--n_embd", "16",
            "--n_head", "2", "--n_layer", "1", "--epochs", "1", "--min_steps", "0", "--device", "cpu", "--out_dir", str(tmp_path / "o")]
    train.main(argv)
    resume = ["--init_from", "resume", "--out_dir", str(tmp_path / "o"), "--epochs", "2"]
    for change in (lambda: [(tmp_path / s / "b").rename(tmp_path / s / "c") for s in ("train", "test")],  # labels would permute
                   lambda: Image.new("RGB", (8, 8)).save(tmp_path / "train" / "c" / "new.png")):  # an added image
        change()
        with pytest.raises(SystemExit):
            train.main(resume)
        err = capsys.readouterr().err
        assert "the data changed since the run in" in err and len(err.splitlines()) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("attn", ["linear", "pure"])
def test_resume_on_a_gpu_is_bitwise_exact(attn, tmp_path, monkeypatch):
    """On CUDA (eager; the kernels used here are deterministic): a run stopped mid-epoch by Ctrl-C and resumed
    ends with the same weights, bit for bit, as the unbroken run: the CUDA random state (stochastic depth,
    the mixup permutation) is in the checkpoint with the CPU's."""
    argv = TINY + AUGS + ["--attn", attn, "--epochs", "2", "--drop_path", "0.2", "--device", "cuda", "--compile", "false"]
    train.main(argv + ["--out_dir", str(tmp_path / "a")])
    calls, loss = [], train.mixed_loss

    def press_ctrl_c(*a):
        calls.append(1)
        if len(calls) == 4:  # in the second epoch
            os.kill(os.getpid(), signal.SIGINT)
        return loss(*a)

    monkeypatch.setattr(train, "mixed_loss", press_ctrl_c)
    with pytest.raises(SystemExit):
        train.main(argv + ["--out_dir", str(tmp_path / "b")])
    monkeypatch.setattr(train, "mixed_loss", loss)
    assert ckpt_of(tmp_path / "b")["progress"]["step"] == 4 and ckpt_of(tmp_path / "b")["rng"][0]["cuda"] is not None
    train.main(["--init_from", "resume", "--out_dir", str(tmp_path / "b")])
    wa, wb = ckpt_of(tmp_path / "a")["model"], ckpt_of(tmp_path / "b")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

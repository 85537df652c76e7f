"""train.py end to end on tiny configs (CPU): each attention kind, resume, checkpoints, the NaN
stop, what a run refuses, and the config files."""
import json
import os
import subprocess
import sys

import pytest
import torch

import loader
import runtime
import train
from configurator import configure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_train", "192", "--n_test", "64", "--batch_size", "64", "--n_layer", "2",
        "--n_head", "2", "--n_embd", "16", "--epochs", "1", "--log_every", "1", "--device", "cpu"]
AUGS = ["--augment", "strong"]


def cli(*argv, cwd=ROOT):
    """train.py as its own process: what a user sees, tracebacks included."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *argv], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def refused(capsys, argv, code=2):
    """train.main(argv) in this process (a new process costs an import of torch): whether it
    exited with `code`, and its stderr."""
    with pytest.raises(SystemExit) as e:
        train.main(list(argv))
    return e.value.code == code, capsys.readouterr().err


def ckpt_of(folder):
    return torch.load(os.path.join(folder, "ckpt.pt"), weights_only=True)


def lines(path):
    return [json.loads(line) for line in open(path)]


def strict_json(path):
    """The file as JSON, refusing NaN / Infinity (which json.dump writes but strict readers
    reject)."""
    return json.loads(open(path).read(), parse_constant=lambda c: pytest.fail(f"{path}: {c}"))


@pytest.mark.parametrize("attn", ["softmax", "pure", "linear"])
def test_tiny_run_each_kind(attn, tmp_path):
    s = train.main(TINY + ["--attn", attn, "--out_dir", str(tmp_path)])
    assert s["attn"] == attn and s["steps"] == 3 and 0 <= s["test_acc"] <= 1
    assert strict_json(tmp_path / "summary.json")["test_acc"] == s["test_acc"]
    ckpt = ckpt_of(tmp_path)
    assert ckpt["model_args"]["attn"] == attn and ckpt["progress"]["step"] == 3
    assert ckpt["config"]["n_train"] == 192 and ckpt["config"]["dtype"] == "float32"
    assert not any(k.startswith("_orig_mod") for k in ckpt["model"])
    assert any("gamma_logit" in k for k in ckpt["model"]) == (attn != "softmax")
    log = lines(tmp_path / "log.jsonl")
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3] and "test_acc" in log[-1]


def test_resume_restores_the_run_and_continues_exactly(tmp_path, monkeypatch):
    """Killed after its first checkpoint and resumed with nothing but --init_from resume: the
    run's own config comes back (data, optimiser, augmentation) and it ends with the weights of
    an unbroken run."""
    a, b = tmp_path / "a", tmp_path / "b"
    train.main(TINY + AUGS + ["--epochs", "2", "--out_dir", str(a)])
    save = runtime.write_atomic

    class Killed(BaseException):  # as kill -9: nothing of the run's own error handling runs
        pass

    def save_then_die(path, write, binary=False):  # the process dies after its first checkpoint
        save(path, write, binary)
        if path.endswith("ckpt.pt"):
            raise Killed

    monkeypatch.setattr(runtime, "write_atomic", save_then_die)
    with pytest.raises(Killed):
        train.main(TINY + AUGS + ["--epochs", "2", "--out_dir", str(b)])
    monkeypatch.setattr(runtime, "write_atomic", save)
    assert ckpt_of(b)["progress"]["step"] == 3
    with open(b / "log.jsonl", "a") as f:  # as if it had logged two more steps, one cut short
        f.write(json.dumps(dict(step=4, epoch=1, loss=9.0, acc=0.0)) + '\n{"step": 5, "lo')
    s = train.main(["--init_from", "resume", "--out_dir", str(b)])
    assert s["steps"] == 6
    wa, wb = ckpt_of(a)["model"], ckpt_of(b)["model"]
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], msg=k)
    log = [r for r in lines(b / "log.jsonl") if "loss" in r]  # past step 3, the resumed run's
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6] and 9.0 not in [r["loss"] for r in log]
    timed = [r["img_s"] for r in log if r["step"] not in (1, 4)]  # a command's first compiles
    assert s["img_s"] == pytest.approx(len(timed) / sum(1 / v for v in timed))  # one batch each
    again = train.main(["--init_from", "resume", "--out_dir", str(b)])  # finished: evaluates only
    assert again["steps"] == 6 and again["test_acc"] == s["test_acc"]


def test_resume_overrides_apply_or_are_refused(tmp_path, capsys):
    train.main(TINY + ["--out_dir", str(tmp_path)])
    ckpt = ckpt_of(tmp_path)
    del ckpt["config"]["patch_overlap"]  # a run from before the option resumes with its default
    torch.save(ckpt, tmp_path / "ckpt.pt")
    s = train.main(["--init_from", "resume", "--out_dir", str(tmp_path), "--epochs", "2",
                    "--lr", "1e-3"])
    out = capsys.readouterr().out
    assert ("resume: epochs = 2 (the run had 1)" in out
            and "resume: lr = 0.001 (the run had 0.002)" in out)
    assert s["steps"] == 6 and ckpt_of(tmp_path)["config"]["lr"] == 1e-3
    for flag, value in (("--attn", "softmax"), ("--n_embd", "32"), ("--n_train", "128"),
                        ("--dtype", "float16")):
        ok, err = refused(capsys,
                          ["--init_from", "resume", "--out_dir", str(tmp_path), flag, value])
        assert ok and "a resumed run cannot change it" in err
    for argv, msg in ((["--epochs", "1"], "has trained 2 epochs; --epochs must be at least that"),
                      (["--overwrite", "true"], "--overwrite True does nothing here")):
        ok, err = refused(capsys, ["--init_from", "resume", "--out_dir", str(tmp_path), *argv])
        assert ok and msg in err and len(err.splitlines()) == 1, err


def test_an_existing_run_is_never_replaced_unless_asked(tmp_path, capsys):
    train.main(TINY + ["--out_dir", str(tmp_path)])
    before = (tmp_path / "ckpt.pt").read_bytes()
    ok, err = refused(capsys, TINY + ["--out_dir", str(tmp_path), "--attn", "softmax"])
    assert ok and "already holds a run" in err and (tmp_path / "ckpt.pt").read_bytes() == before
    (tmp_path / "ckpt.pt").unlink()  # deleted to save space: the summary and log still hold a run
    summary = (tmp_path / "summary.json").read_bytes()
    ok, err = refused(capsys, TINY + ["--out_dir", str(tmp_path)])
    assert ok and "already holds a run (log.jsonl, summary.json)" in err
    assert (tmp_path / "summary.json").read_bytes() == summary
    argv = TINY + ["--out_dir", str(tmp_path), "--attn", "softmax", "--overwrite", "true"]
    assert train.main(argv)["attn"] == "softmax"


def test_links_in_a_run_folder_are_replaced_never_written_through(tmp_path, capsys):
    """A run's files that are links to files outside the folder: a new run refuses the folder;
    with --overwrite true it replaces the links and the files they point to stay as they were."""
    run, notes = tmp_path / "run", tmp_path / "notes.txt"
    run.mkdir()
    notes.write_text("mine")
    for name in runtime.RUN_FILES:
        os.symlink(notes, run / name)
    ok, err = refused(capsys, TINY + ["--out_dir", str(run)])
    assert ok and "already holds a run" in err
    train.main(TINY + ["--out_dir", str(run), "--overwrite", "true"])
    assert notes.read_text() == "mine" and not any(os.path.islink(run / n) for n in os.listdir(run))


@pytest.mark.parametrize("extra", [
    ["--epochs", "3"],  # diverges within the run: the loss check stops it
    ["--n_train", "64", "--attn", "softmax"],  # one step an epoch: the last update diverges
])
def test_a_diverged_run_stops_and_keeps_the_last_good_checkpoint(extra, tmp_path, capsys):
    train.main(TINY + ["--out_dir", str(tmp_path)])
    files = [tmp_path / n for n in runtime.RUN_FILES]
    good = [f.read_bytes() for f in files]
    ok, err = refused(capsys, TINY + ["--out_dir", str(tmp_path), "--overwrite", "true", "--lr",
                                      "1e30", "--warmup", "0", "--grad_clip", "0", *extra])
    assert ok and "last good checkpoint" in err
    assert [f.read_bytes() for f in files] == good  # the old run, whole


def test_corrupt_checkpoint_is_a_clear_error_and_left_alone(tmp_path, capsys):
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    ok, err = refused(capsys, ["--init_from", "resume", "--out_dir", str(tmp_path)])
    assert ok and "not a readable checkpoint" in err and len(err.splitlines()) == 1
    assert (tmp_path / "ckpt.pt").read_bytes() == b"not a checkpoint"
    ok, err = refused(capsys, ["--init_from", "resume", "--out_dir", str(tmp_path / "none")])
    assert ok and "no checkpoint" in err


def test_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    cases = [
        (["--atn", "linear"], "unknown option --atn; valid options:"),
        (["--attn", "cosine"], "--attn must be one of softmax | pure | linear"),
        (["--epochs", "ten"], "--epochs takes a int"),
        (["--eval_shift", "maybe"], "--eval_shift takes true or false"),
        (["--compile", "fast"], "--compile must be one of none | default | reduce-overhead"),
        (["--augment", "heavy"], "--augment must be one of none | basic | light | strong | policy"),
        (["linear"], "unexpected argument"),
        (["--attn"], "--attn needs a value"),
        (["config/none.py"], "config file config/none.py not found"),
        (["--seed", "-1"], "--seed must be in [0, 2147483648); got -1"),
        (["--seed", "4294967296"], "--seed must be in [0, 2147483648); got 4294967296"),
        (["--device", "foo"], "--device foo is not usable here"),
        (["--out_dir", str(tmp_path / "file"), "--n_train", "256", "--n_test", "16",
          "--device", "cpu"], "cannot write to --out_dir"),
    ]
    for argv, msg in cases:
        ok, err = refused(capsys, argv)
        assert ok and msg in err and len(err.splitlines()) == 1, (argv, err)
    r = cli("--attn", "cosine")  # and as a process of its own: one line, no traceback
    assert r.returncode == 2
    assert r.stderr.splitlines() == ["error: --attn must be one of softmax | pure | linear; "
                                     "got 'cosine'"]


@pytest.mark.parametrize("argv, msg", [
    (["--epochs", "0"], "--epochs must be at least 1; got 0"),
    (["--eval_every", "-1"], "--eval_every must be at least 0; got -1"),
    (["--drop_path", "1.5"], "--drop_path must be in [0, 1); got 1.5"),
    (["--n_embd", "30", "--n_head", "4"], "n_embd (30) must be divisible by n_head (4); change"),
    (["--gamma_init", "1"], "gamma_init must lie in (0, 1); got 1.0"),
    (["--val_split", "192"], "--val_split 192 leaves no training images"),
    (["--batch_size", "256"], "--batch_size 256 must be at most the 192 training images"),
    (["--dataset", "folder", "--stream", "true", "--val_split", "100"],
     "--val_split 100 does nothing here (it needs not stream)"),
    (["--dataset", "folder", "--stream", "true", "--eval_shift", "true"],
     "--eval_shift True does nothing here (it needs not stream)"),
    (["--stream", "true"], "--stream True does nothing here (it needs dataset == 'folder')"),
    (["--attn", "softmax", "--hops", "2"], "--hops 2 does nothing here (it needs attn == 'pure')"),
    (["--attn", "softmax", "--gamma_init", "0.5"], "--gamma_init 0.5 does nothing here"),
    (["--workers", "2"], "--workers 2 does nothing here (it needs stream)"),
    (["--data_dir", "cifar"], "cifar does nothing here (it needs dataset != 'shapes')"),
    (["--compile", "none"], "--compile none does nothing here (it needs device.startswith"),
])
def test_bad_options_stop_before_anything_is_written(argv, msg, tmp_path, capsys):
    ok, err = refused(capsys, TINY + argv + ["--out_dir", str(tmp_path / "run")])
    assert ok and msg in err and len(err.splitlines()) == 1 and not (tmp_path / "run").exists()


OLD_DEFAULTS = dict(  # train.py's defaults before augmentation became a recipe (commit e477a2e)
    eval_every=1, ckpt_every=0, dataset="shapes", val_split=0, stream=False, crop_pad=4,
    hflip=True, rotate=0.0, zoom=0.0, translate=0.0, jitter=0.0, erase=0.0, policy=False,
    mixup=0.0, cutmix=0.0, eval_shift=False, flip_eval=False, move_eval=0, attn="linear",
    image_size=32, patch_size=4, patch_overlap=0, n_layer=4, n_head=4, n_embd=64, mlp_ratio=2.0,
    hops=3, gamma_init=0.9, init_std=0.0, dropout=0.0, drop_path=0.0, epochs=10, batch_size=64,
    grad_accum=1, lr=0.002, min_lr=1e-05, warmup=0.05, weight_decay=0.05, beta2=0.99,
    grad_clip=1.0, label_smoothing=0.1, compile=True, compile_mode="default", seed=1337)
MODEL = dict(dataset="cifar10", n_layer=6, n_head=8, n_embd=384, init_std=0.02, drop_path=0.1,
             batch_size=512, lr=0.001, warmup=0.1, eval_shift=True, compile_mode="reduce-overhead")
STRONG = dict(rotate=15.0, zoom=0.15, jitter=0.3, erase=0.25, mixup=0.8, cutmix=1.0)
OLD = {  # each config file as it resolved before, in the old options
    "config/cifar.py": dict(MODEL, eval_every=5, mixup=0.2, epochs=75),
    "config/cifar_long.py": dict(MODEL, **STRONG, eval_every=20, epochs=560),
    "config/cifar_10min.py": dict(MODEL, **STRONG, eval_every=0, ckpt_every=40, policy=True,
                                  flip_eval=True, move_eval=2, patch_overlap=2, epochs=580,
                                  weight_decay=0.1),
}


def as_old_options(cfg):
    """A config in the options train.py had before: the recipe and the views spelled out, the
    options that went at the values they always had (now constants of train.py and model.py)."""
    aug = {**dict(pad=0, flip=False, rotate=0.0, zoom=0.0, translate=0.0, jitter=0.0, erase=0.0,
                  policy=False, mixup=0.0, cutmix=0.0), **loader.RECIPES[cfg["augment"]]}
    old = dict(cfg, **aug, crop_pad=aug.pop("pad"), hflip=aug.pop("flip"), dropout=0.0,
               grad_accum=1, beta2=0.99, mlp_ratio=2.0, min_lr=1e-5, label_smoothing=0.1,
               flip_eval=cfg["eval_views"] != "image",
               move_eval=2 * (cfg["eval_views"] == "flip_move"),
               compile=cfg["compile"] != "none", compile_mode=cfg["compile"])
    return {k: old[k] for k in OLD_DEFAULTS}


def test_every_config_file_resolves_to_the_training_it_had(tmp_path):
    for path, changed in OLD.items():
        cfg, _ = configure([path], train.DEFAULTS, "", train.ALLOWED)
        assert as_old_options(cfg) == {**OLD_DEFAULTS, **changed}, path
    assert as_old_options(train.DEFAULTS) == dict(OLD_DEFAULTS, compile_mode="default")
    cfg, given = configure(["config/cifar.py", "--n_embd", "64", "--attn=pure"], train.DEFAULTS)
    assert (cfg["n_embd"], cfg["n_layer"], cfg["attn"]) == (64, 6, "pure")
    assert {"n_embd", "attn", "dataset"} <= given
    (tmp_path / "bad.py").write_text("epochs = 'many'\n")
    with pytest.raises(SystemExit):
        configure([str(tmp_path / "bad.py")], train.DEFAULTS)
    r = cli("-h")
    options = [line for line in r.stdout.splitlines() if line.startswith("  --")]
    assert r.returncode == 0 and "--attn 'linear'  (softmax | pure | linear)" in r.stdout
    assert len(options) == len(train.DEFAULTS) <= 40


def test_val_split_is_random_and_test_is_evaluated_once(tmp_path):
    s = train.main(TINY + ["--val_split", "64", "--epochs", "2", "--out_dir", str(tmp_path)])
    assert 0 <= s["val_acc"] <= 1 and 0 <= s["test_acc"] <= 1 and s["steps"] == 4
    log = lines(tmp_path / "log.jsonl")
    assert sum("val_acc" in r for r in log) == 2 and sum("test_acc" in r for r in log) == 1
    y = train.data.load("shapes", "data", 32, 192, 64)["y_train"]
    perm = torch.randperm(192, generator=torch.Generator().manual_seed(0))
    assert len(set(y[perm[-64:]].tolist())) > 3  # the held-out images span the classes


def test_lr_schedule():
    cfg = train.SimpleNamespace(lr=1e-3, min_lr=1e-5, warmup=0.1)
    lrs = [train.lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[9] == pytest.approx(1e-3) and lrs[0] == pytest.approx(1e-4)
    assert lrs[-1] < 2e-5 and all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_a_new_batch_size_on_resume_still_ends_the_schedule_at_min_lr(tmp_path):
    train.main(TINY + ["--epochs", "2", "--out_dir", str(tmp_path), "--eval_every", "1"])
    ck = ckpt_of(tmp_path)
    ck["progress"].update(epoch=1, batch=0, step=3)  # as if stopped after the first epoch
    ck["log"] = [r for r in ck["log"] if r["step"] <= 3]
    torch.save(ck, tmp_path / "ckpt.pt")
    s = train.main(["--init_from", "resume", "--out_dir", str(tmp_path), "--batch_size", "32"])
    lrs = [r["lr"] for r in lines(tmp_path / "log.jsonl") if "lr" in r]
    cfg = train.SimpleNamespace(lr=2e-3, min_lr=1e-5, warmup=0.05)
    assert s["steps"] == 3 + 6 and lrs[-1] == pytest.approx(train.lr_at(11, 12, cfg))
    assert lrs[-1] < 1e-4


def test_ckpt_every_checkpoints_without_looking_at_the_test_set(tmp_path, monkeypatch):
    saved, save = [], runtime.write_atomic
    monkeypatch.setattr(runtime, "write_atomic", lambda path, write, binary=False: (
        path.endswith("ckpt.pt") and saved.append(path), save(path, write, binary)))
    train.main(TINY + ["--epochs", "4", "--eval_every", "0", "--ckpt_every", "2",
                       "--out_dir", str(tmp_path)])
    assert len(saved) == 2 and ckpt_of(tmp_path)["progress"]["epoch"] == 4  # epochs 2 and 4
    assert [r["epoch"] for r in lines(tmp_path / "log.jsonl") if "test_acc" in r] == [3]  # once

"""train.py end to end on tiny configs (CPU): each attention kind, resume, checkpoints, the NaN stop, CLI errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

import train
from configurator import configure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_train", "192", "--n_test", "64", "--batch_size", "64", "--n_layer", "2", "--n_head", "2",
        "--n_embd", "16", "--epochs", "1", "--min_steps", "0", "--log_every", "1", "--device", "cpu"]
AUGS = ["--rotate", "10", "--zoom", "0.1", "--translate", "0.1", "--jitter", "0.3", "--erase", "0.25",
        "--mixup", "0.8", "--cutmix", "1.0"]


def cli(*argv, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def ckpt_of(folder):
    return torch.load(os.path.join(folder, "ckpt.pt"), weights_only=False)


def strict_json(path):
    """The file as JSON, refusing NaN / Infinity (which json.dump writes but strict readers reject)."""
    return json.loads(open(path).read(), parse_constant=lambda c: pytest.fail(f"{path} holds {c}"))


@pytest.mark.parametrize("attn", ["softmax", "pure", "linear"])
def test_tiny_run_each_kind(attn, tmp_path):
    s = train.main(TINY + ["--attn", attn, "--out_dir", str(tmp_path)])
    assert s["attn"] == attn and s["steps"] == 3 and 0 <= s["test_acc"] <= 1
    assert strict_json(tmp_path / "summary.json")["test_acc"] == s["test_acc"]
    ckpt = ckpt_of(tmp_path)
    assert ckpt["model_args"]["attn"] == attn and ckpt["step"] == 3 and ckpt["config"]["n_train"] == 192
    assert not any(k.startswith("_orig_mod") for k in ckpt["model"])
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3] and "test_acc" in log[-1]


def test_resume_restores_the_run_and_continues_exactly(tmp_path, monkeypatch):
    """Killed after its first checkpoint and resumed with nothing but --init_from resume: the run's own
    config comes back (data, optimiser, augmentation) and it ends with the weights of an unbroken run."""
    a, b = tmp_path / "a", tmp_path / "b"
    train.main(TINY + AUGS + ["--epochs", "2", "--out_dir", str(a)])
    save = train.data.write_atomic

    def save_then_die(path, write, mode="w"):  # the process dies right after its first checkpoint
        save(path, write, mode)
        if path.endswith("ckpt.pt"):
            raise KeyboardInterrupt

    monkeypatch.setattr(train.data, "write_atomic", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.main(TINY + AUGS + ["--epochs", "2", "--out_dir", str(b)])
    monkeypatch.setattr(train.data, "write_atomic", save)
    assert ckpt_of(b)["step"] == 3
    with open(b / "log.jsonl", "a") as f:  # as if it had logged two more steps, the last one cut short
        f.write(json.dumps(dict(step=4, epoch=1, loss=9.0, acc=0.0)) + '\n{"step": 5, "lo')
    s = train.main(["--init_from", "resume", "--out_dir", str(b)])
    assert s["steps"] == 6 and s["resumed_from_step"] == 3
    wa, wb = ckpt_of(a)["model"], ckpt_of(b)["model"]
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], msg=k)
    log = [json.loads(line) for line in open(b / "log.jsonl")]  # past step 3, only the resumed run's lines
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5, 6] and 9.0 not in [r["loss"] for r in log if "loss" in r]


def test_resume_overrides_apply_or_are_refused(tmp_path, capsys):
    train.main(TINY + ["--out_dir", str(tmp_path)])
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
    good = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--out_dir", str(tmp_path), "--overwrite", "true", "--lr", "1e30", "--warmup", "0",
                           "--grad_clip", "0", *extra])
    assert e.value.code == 2 and "last good checkpoint" in capsys.readouterr().err
    assert (tmp_path / "ckpt.pt").read_bytes() == good


def test_corrupt_checkpoint_is_a_clear_error_and_left_alone(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    r = cli("--init_from", "resume", "--out_dir", str(tmp_path))
    assert r.returncode == 2 and "not a readable checkpoint" in r.stderr and len(r.stderr.splitlines()) == 1
    assert (tmp_path / "ckpt.pt").read_bytes() == b"not a checkpoint"
    r = cli("--init_from", "resume", "--out_dir", str(tmp_path / "none"))
    assert r.returncode == 2 and "no checkpoint" in r.stderr


def test_cli_errors_are_one_line(tmp_path):
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
        (["--out_dir", str(tmp_path / "file"), "--n_train", "256", "--n_test", "16"], "cannot write to --out_dir"),
    ]
    for argv, msg in cases:
        r = cli(*argv)
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.splitlines()) == 1, (argv, r.stderr)


@pytest.mark.parametrize("argv, msg", [
    (["--epochs", "0"], "--epochs must be at least 1; got 0"),
    (["--eval_every", "-1"], "--eval_every must be at least 0; got -1"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1); got 1.5"),
    (["--n_embd", "30", "--n_head", "4"], "n_embd (30) must be divisible by n_head (4); change that option"),
    (["--gamma_init", "1"], "gamma_init must lie in (0, 1); got 1.0"),
    (["--val_split", "192"], "--val_split 192 leaves no training images"),
])
def test_bad_options_stop_before_anything_is_written(argv, msg, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(TINY + argv + ["--out_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err and len(err.splitlines()) == 1 and not (tmp_path / "run").exists()


def test_config_files_then_overrides_left_to_right(tmp_path):
    cfg, given = configure(["config/cifar.py", "--n_embd", "64", "--attn=pure"], train.DEFAULTS, choices=train.CHOICES)
    assert (cfg["n_embd"], cfg["n_layer"], cfg["attn"], cfg["epochs"], cfg["compile_mode"]) == (64, 6, "pure", 75, "reduce-overhead")
    assert {"n_embd", "attn", "dataset"} <= given
    long, _ = configure(["config/cifar_long.py"], train.DEFAULTS)
    assert (long["epochs"], long["cutmix"], long["rotate"], long["eval_every"]) == (560, 1.0, 15.0, 20)
    ten, _ = configure(["config/cifar_10min.py"], train.DEFAULTS)
    assert {k: v for k, v in ten.items() if long[k] != v} == dict(epochs=640, eval_every=0, ckpt_every=40)
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
    assert len(saved) == 2 and ckpt_of(tmp_path)["epoch"] == 4  # at epoch 2 with no evaluation, then the end
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

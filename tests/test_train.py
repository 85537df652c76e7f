"""train.py end to end on tiny configs (CPU): each attention kind, resume, checkpoints, CLI errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_train", "192", "--n_test", "64", "--batch_size", "64", "--n_layer", "2", "--n_head", "2",
        "--n_embd", "16", "--epochs", "1", "--log_every", "1", "--device", "cpu"]


def run(argv):
    cfg, given = train.parse_args(argv, dict(train.DEFAULTS))
    return train.main(cfg, given)


def cli(*argv):
    return subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("attn", ["softmax", "pure", "linear"])
def test_tiny_run_each_kind(attn, tmp_path):
    s = run(TINY + ["--attn", attn, "--out_dir", str(tmp_path)])
    assert s["attn"] == attn and s["steps"] == 3 and 0 <= s["test_acc"] <= 1
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ckpt["model_args"]["attn"] == attn and ckpt["step"] == 3
    assert not any(k.startswith("_orig_mod") for k in ckpt["model"])
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3] and "test_acc" in log[-1]


AUGS = ["--rotate", "10", "--zoom", "0.1", "--translate", "0.1", "--jitter", "0.3", "--erase", "0.25",
        "--mixup", "0.8", "--cutmix", "1.0"]


def test_resume_continues_exactly(tmp_path, monkeypatch):
    """With every augmentation on: their random streams resume too."""
    a, b = tmp_path / "a", tmp_path / "b"
    run(TINY + AUGS + ["--epochs", "2", "--out_dir", str(a)])
    save = train.save_checkpoint

    def save_then_crash(obj, path):  # the run dies right after its first checkpoint
        save(obj, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run(TINY + AUGS + ["--epochs", "2", "--out_dir", str(b)])
    monkeypatch.setattr(train, "save_checkpoint", save)
    first = torch.load(b / "ckpt.pt", weights_only=False)
    assert first["step"] == 3 and first["wall_s"] > 0
    with open(b / "log.jsonl", "a") as f:  # what a run killed after its checkpoint had logged: redone
        f.write(json.dumps(dict(step=4, epoch=1, loss=9.0, acc=0.0, lr=0.0, img_s=1.0)) + "\n")
        f.write('{"step": 5, "epoch": 1, "lo')  # and a line the kill cut short
    s = run(TINY + AUGS + ["--epochs", "2", "--out_dir", str(b), "--init_from", "resume"])
    assert s["steps"] == 6
    steps = [r["step"] for r in map(json.loads, open(b / "log.jsonl")) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # one record per step: the killed run's extra one is gone
    # the summary's time is the whole run's: the first segment (to its checkpoint) plus the second
    assert s["wall_s"] > first["wall_s"] and torch.load(b / "ckpt.pt", weights_only=False)["wall_s"] > first["wall_s"]
    wa = torch.load(a / "ckpt.pt", weights_only=False)["model"]
    wb = torch.load(b / "ckpt.pt", weights_only=False)["model"]
    for k in wa:  # an interrupted run, resumed, ends with the weights of an uninterrupted one
        torch.testing.assert_close(wb[k], wa[k], msg=k)
    # img/s counts the timed steps of both segments: steps 2-3 of the first, 5-6 of the second
    # (each segment's first interval holds the compile), not the second segment alone
    done = torch.load(b / "ckpt.pt", weights_only=False)
    assert done["seen"] == 4 * 64 and s["img_s"] == pytest.approx(done["seen"] / done["train_s"])
    # killed after its last checkpoint: a resume runs no step and still writes the same summary
    again = run(TINY + AUGS + ["--epochs", "2", "--out_dir", str(b), "--init_from", "resume"])
    for k in ("steps", "img_s", "mfu", "test_acc", "best_acc"):
        assert again[k] == s[k], k


def test_write_atomic_never_leaves_half_a_file(tmp_path):
    """A writer that dies halfway (a crash, a full disk) leaves the previous file as it was."""
    path = str(tmp_path / "summary.json")
    train.write_atomic(path, lambda f: json.dump(dict(test_acc=0.9), f))

    def half_then_die(f):
        f.write('{"test_acc": 0.')
        raise OSError("disk full")

    with pytest.raises(OSError):
        train.write_atomic(path, half_then_die)
    assert json.load(open(path)) == dict(test_acc=0.9) and os.listdir(tmp_path) == ["summary.json"]


def test_resume_refuses_a_different_model(tmp_path):
    run(TINY + ["--out_dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        run(TINY + ["--out_dir", str(tmp_path), "--init_from", "resume", "--attn", "softmax"])


def test_corrupt_checkpoint_is_a_clear_error_and_left_alone(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    r = cli("--init_from", "resume", "--out_dir", str(tmp_path))
    assert r.returncode != 0 and "not a readable checkpoint" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert (tmp_path / "ckpt.pt").read_bytes() == b"not a checkpoint"
    r = cli("--init_from", "resume", "--out_dir", str(tmp_path / "none"))
    assert r.returncode != 0 and "no checkpoint" in r.stderr


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    run(TINY + ["--out_dir", str(tmp_path)])
    good = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit):  # an absurd learning rate drives the loss to inf / nan
        run(TINY + ["--out_dir", str(tmp_path), "--lr", "1e30", "--warmup", "0", "--grad_clip", "0", "--epochs", "3"])
    assert (tmp_path / "ckpt.pt").read_bytes() == good


@pytest.mark.parametrize("argv, msg", [
    (["--atn", "linear"], "unknown option --atn; valid options:"),
    (["--attn", "cosine"], "--attn must be one of softmax | pure | linear"),
    (["--epochs", "ten"], "--epochs takes a int"),
    (["--compile", "maybe"], "--compile takes true or false"),
    (["linear"], "unexpected argument"),
    (["--attn"], "--attn needs a value"),
    (["--compile_mode", "fast"], "--compile_mode must be one of default | reduce-overhead | max-autotune"),
])
def test_cli_errors(argv, msg):
    r = cli(*argv)
    assert r.returncode == 2 and msg in r.stderr and r.stdout == "" and len(r.stderr.splitlines()) == 1


@pytest.mark.parametrize("argv, msg", [
    (["--epochs", "0"], "--epochs must be at least 1; got 0"),
    (["--eval_every", "-1"], "--eval_every must be at least 0; got -1"),
    (["--dropout", "1.5"], "--dropout must be between 0 and 1; got 1.5"),
    (["--n_embd", "30", "--n_head", "4"], "n_embd (30) must be divisible by n_head (4); change that option"),
    (["--gamma_init", "1"], "gamma_init must lie in (0, 1); got 1.0"),
])
def test_out_of_range_options_stop_before_anything_is_written(argv, msg, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run(argv + ["--out_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err and len(err.splitlines()) == 1 and not (tmp_path / "run").exists()


def test_cli_equals_form_and_help():
    cfg, given = train.parse_args(["--attn=pure", "--lr", "0.01", "--compile=false"], dict(train.DEFAULTS))
    assert (cfg["attn"], cfg["lr"], cfg["compile"], given) == ("pure", 0.01, False, {"attn", "lr", "compile"})
    r = cli("-h")
    assert r.returncode == 0 and "--attn 'linear'  (softmax | pure | linear)" in r.stdout


def test_preset_applies_before_explicit_overrides():
    cfg, _ = train.parse_args(["--n_embd", "64", "--preset", "cifar"], dict(train.DEFAULTS))
    assert cfg["n_embd"] == 64 and cfg["n_layer"] == train.PRESETS["cifar"]["n_layer"]


def test_long_preset_and_cuda_graph_fallback(tmp_path, capsys):
    cfg, _ = train.parse_args(["--preset", "cifar_long"], dict(train.DEFAULTS))
    assert cfg["n_embd"] == 384 and cfg["epochs"] == 560 and cfg["cutmix"] == 1.0 and cfg["compile_mode"] == "reduce-overhead"
    # gradients accumulated over micro-batches cannot live in replayed graph buffers: fall back, say so
    s = run(TINY + ["--compile_mode", "reduce-overhead", "--grad_accum", "2", "--out_dir", str(tmp_path)])
    assert "using default" in capsys.readouterr().out and s["steps"] == 3


def test_ckpt_every_checkpoints_without_looking_at_the_test_set(tmp_path, monkeypatch):
    cfg, _ = train.parse_args(["--preset", "cifar_10min"], dict(train.DEFAULTS))
    assert cfg["val_split"] == 0 and cfg["eval_every"] == 0 and cfg["cutmix"] == 1.0  # 0: test only at the end
    saved, save = [], train.save_checkpoint
    monkeypatch.setattr(train, "save_checkpoint", lambda obj, path: (saved.append(obj["epoch"]), save(obj, path)))
    run(TINY + ["--epochs", "4", "--eval_every", "0", "--ckpt_every", "2", "--out_dir", str(tmp_path)])
    assert saved == [2, 4]  # a checkpoint at epoch 2 with no evaluation, then the end
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["epoch"] for r in log if "test_acc" in r] == [3]  # the test set, once


def test_lr_schedule():
    total = 100
    lrs = [train.lr_at(s, total, 1e-3, 1e-5, 0.1) for s in range(total)]
    assert lrs[9] == pytest.approx(1e-3) and lrs[0] == pytest.approx(1e-4)
    assert lrs[-1] < 2e-5 and all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_paste_box_keeps_the_reported_area():
    x, other = torch.zeros(2, 3, 10, 12), torch.ones(2, 3, 10, 12)
    torch.manual_seed(0)
    for lam in (0.1, 0.5, 0.9, 0.99):
        mixed, kept = train.data.paste_box(x, other, lam)
        pasted = mixed[0, 0]  # 1 inside the box, 0 outside
        assert kept == pytest.approx(1 - pasted.mean().item())  # lam follows the clipped box
        rows, cols = pasted.bool().any(1), pasted.bool().any(0)
        assert torch.equal(pasted.bool(), rows[:, None] & cols[None, :]) and torch.equal(mixed[0], mixed[1])
        assert x.sum() == 0  # the input is not modified


def test_val_split_is_random_and_test_is_evaluated_once(tmp_path):
    s = run(TINY + ["--val_split", "64", "--epochs", "2", "--out_dir", str(tmp_path)])
    assert 0 <= s["val_acc"] <= 1 and 0 <= s["test_acc"] <= 1 and s["steps"] == 4  # 128 training images: 2 steps an epoch
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert sum("val_acc" in r for r in log) == 2 and sum("test_acc" in r for r in log) == 1
    import data
    d = data.load("shapes", "data", 32, 1337, 192, 64)
    perm = torch.randperm(192, generator=torch.Generator().manual_seed(0))
    assert len(set(d["y_train"][perm[-64:]].tolist())) > 3  # the held-out images span the classes

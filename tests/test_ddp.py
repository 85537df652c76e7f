"""train.py under torchrun (2 CPU processes, gloo) and the streaming loader."""
import os
import socket
import subprocess
import sys

import pytest
import torch
from PIL import Image

import data
import loader
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_train", "256", "--n_test", "64", "--batch_size", "64", "--n_layer", "2", "--n_head",
        "2", "--n_embd", "16", "--epochs", "2", "--log_every", "1", "--device", "cpu", "--augment",
        "none"]


def free_port():
    """A port nothing listens on now, for the ranks' rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ranks(argv, world=2):
    """Start `world` processes of train.py the way torchrun does (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT), on a port found free just before; every rank must exit 0 within the
    time limit."""
    # GLOO_SOCKET_IFNAME: gloo on the loopback device, no lookup of the host's own name
    env = dict(os.environ, OMP_NUM_THREADS="1", WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), GLOO_SOCKET_IFNAME="lo")
    procs = [subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)))
             for r in range(world)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]


def test_two_processes_match_one_process_and_each_other(tmp_path):
    """Same global batch on 1 and 2 processes: the same gradients (up to summation order), so the
    same weights."""
    ranks([*TINY, "--out_dir", str(tmp_path / "ddp")])
    # in this process: a new one costs an import of torch
    train.main([*TINY, "--out_dir", str(tmp_path / "one")])
    a = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)
    assert a["progress"]["step"] == b["progress"]["step"] == 8 and len(a["rng"]) == 2
    for k in b["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5, msg=k)
    # the 2-process checkpoint resumes in one process
    train.main(["--epochs", "3", "--out_dir", str(tmp_path / "ddp"), "--init_from", "resume"])
    assert torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)["progress"]["step"] == 12


def test_streaming_loader_gives_the_resident_batches(tmp_path):
    rng = torch.Generator().manual_seed(0)
    paths, labels = [], []
    for i in range(12):
        img = torch.randint(0, 256, (8, 8, 3), generator=rng, dtype=torch.uint8).numpy()
        paths.append(str(tmp_path / f"{i}.png"))
        labels.append(i % 3)
        Image.fromarray(img).save(paths[-1])
    x = torch.stack([torch.from_numpy(data.decode(p, 8)) for p in paths])
    y = torch.tensor(labels)
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.25)
    for rank in (0, 1):
        kw = dict(recipe="basic", seed=3, rank=rank, world=2)
        res = loader.Loader(x, y, 4, mean, std, True, **kw)
        st = loader.Loader(data.Files(paths, 8), y, 4, mean, std, True, workers=2, **kw)
        res.epoch = st.epoch = 1
        pairs = list(zip(res, st))
        assert len(pairs) == 3
        for (xa, ya), (xb, yb) in pairs:
            assert torch.equal(ya, yb) and torch.equal(xa, xb)
        st.start = 3  # resumed after the epoch's last batch: nothing left to decode
        assert list(st) == []


def test_stream_run_end_to_end(tmp_path, capsys):
    """A run that decodes its files in worker processes every epoch; a file that cannot be decoded,
    found by a worker, ends the run with one line naming it (in this process: each new one costs an
    import of torch)."""
    for split, n in (("train", 32), ("test", 8)):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                colour = (255, 0, 0) if c == "a" else (0, 0, 255)
                Image.new("RGB", (12, 12), colour).save(tmp_path / split / c / f"{i}.png")
    argv = ["--dataset", "folder", "--data_dir", str(tmp_path), "--stream", "true", "--image_size",
            "8", "--batch_size", "16", "--n_embd", "16", "--n_head", "2", "--n_layer", "1",
            "--epochs", "2", "--workers", "2", "--device", "cpu"]
    train.main(argv + ["--out_dir", str(tmp_path / "o")])
    assert "done: test acc" in capsys.readouterr().out
    (tmp_path / "train" / "b" / "3.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit) as e:
        train.main(argv + ["--out_dir", str(tmp_path / "o2")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and last.startswith(
        f"error: cannot decode image {tmp_path}/train/b/3.png"), last

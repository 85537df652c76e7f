"""train.py under torchrun (2 CPU processes, gloo) and the streaming loader."""
import os
import subprocess
import sys

import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_train", "256", "--n_test", "64", "--batch_size", "64", "--n_layer", "2", "--n_head", "2",
        "--n_embd", "16", "--epochs", "2", "--log_every", "1", "--device", "cpu", "--hflip", "false", "--crop_pad", "0"]


def sh(argv, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env, **kw)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_two_processes_match_one_process_and_each_other(tmp_path):
    """Same global batch on 1 and 2 processes: the same gradients (up to summation order), so the same
    weights; and DDP leaves every rank with identical weights."""
    out = sh([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
              *TINY, "--out_dir", str(tmp_path / "ddp")])
    assert "ddp: 2 ranks, largest weight difference from rank 0: 0" in out
    sh([sys.executable, "train.py", *TINY, "--out_dir", str(tmp_path / "one")])
    a = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=False)
    assert a["step"] == b["step"] == 8 and a["rng"]["world"] == 2
    for k in b["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5, msg=k)
    # the 2-process checkpoint resumes in one process
    sh([sys.executable, "train.py", *TINY, "--epochs", "3", "--out_dir", str(tmp_path / "ddp"), "--init_from", "resume"])
    assert torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=False)["step"] == 12


def test_streaming_loader_gives_the_resident_batches(tmp_path):
    import data
    rng = torch.Generator().manual_seed(0)
    paths, labels = [], []
    for i in range(12):
        img = torch.randint(0, 256, (8, 8, 3), generator=rng, dtype=torch.uint8).numpy()
        paths.append(str(tmp_path / f"{i}.png"))
        labels.append(i % 3)
        Image.fromarray(img).save(paths[-1])
    x = torch.stack([torch.from_numpy(data._decode(p, 8)) for p in paths])
    y = torch.tensor(labels)
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.25)
    for rank in (0, 1):
        kw = dict(seed=3, rank=rank, world=2, pad=2)
        res = data.GPULoader(x, y, 4, mean, std, True, **kw)
        st = data.StreamLoader(paths, labels, 8, 4, mean, std, True, "cpu", workers=2, **kw)
        res.epoch = st.epoch = 1
        pairs = list(zip(res, st))
        assert len(pairs) == 3
        for (xa, ya), (xb, yb) in pairs:
            assert torch.equal(ya, yb) and torch.equal(xa, xb)


def test_stream_run_end_to_end(tmp_path):
    for split, n in (("train", 32), ("test", 8)):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                colour = (255, 0, 0) if c == "a" else (0, 0, 255)
                Image.new("RGB", (12, 12), colour).save(tmp_path / split / c / f"{i}.png")
    out = sh([sys.executable, "train.py", "--dataset", "folder", "--data_dir", str(tmp_path), "--loader", "stream",
              "--image_size", "8", "--patch_size", "4", "--batch_size", "16", "--n_embd", "16", "--n_head", "2",
              "--n_layer", "1", "--epochs", "2", "--workers", "2", "--device", "cpu", "--out_dir", str(tmp_path / "o")])
    assert "done: test acc" in out and not (tmp_path / "cache_8.npz").exists()

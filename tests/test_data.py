"""data.py: the built-in dataset, the CIFAR-10 and folder readers, on files made here."""
import errno
import hashlib
import io
import json
import os
import pickle
import shutil
import tarfile

import numpy as np
import pytest
import torch

import data
import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_shapes_deterministic_with_masks_that_mark_the_object():
    x, y, m = data.make_shapes(64, seed=3)
    x2, y2, m2 = data.make_shapes(64, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(m, m2)
    assert x.dtype == torch.uint8 and x.shape == (64, 3, 32, 32)
    assert set(y.tolist()) <= set(range(10))
    assert not torch.equal(data.make_shapes(64, seed=4)[0], x)
    for i in range(64):  # one saturated colour: inside the mask, pixels agree up to noise
        inside = x[i].float()[:, m[i]]  # (3, n_pixels)
        assert m[i].sum() > 20 and inside.std(1).max() < 0.1 * 255
        assert (inside.mean(1).max() - inside.mean(1).min()) > 0.5 * 255  # one high, one low


def test_shape_masks_by_hand():
    u, v = np.meshgrid(np.linspace(-1, 1, 5), np.linspace(-1, 1, 5))
    n = len(data.SHAPES)
    masks = data._shape_masks(np.arange(n), np.repeat(u[None], n, 0), np.repeat(v[None], n, 0))
    assert masks[0].sum() == 13  # disk: lattice points with u^2 + v^2 <= 1 on a step-0.5 grid
    assert masks[6].sum() == 13  # diamond |u| + |v| <= 1: the same 13 points
    assert masks[3][2, 2] == 0 and masks[0][2, 2] == 1  # ring has a hole, disk does not


def _write_cifar_batch(path, n, seed):
    rng = np.random.default_rng(seed)
    d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
         b"labels": rng.integers(0, 10, n).tolist()}
    with open(path, "wb") as f:
        pickle.dump(d, f)
    return d


def test_cifar10_reader_on_batches_in_the_official_format(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = [_write_cifar_batch(folder / f"data_batch_{i}", 4, i) for i in range(1, 6)]
    test = _write_cifar_batch(folder / "test_batch", 3, 9)
    d = data.load("cifar10", str(tmp_path))
    assert d["x_train"].shape == (20, 3, 32, 32) and d["x_test"].shape == (3, 3, 32, 32)
    assert d["mask_test"] is None
    # row-major 3072 = 3 x 32 x 32 (R plane, G plane, B plane)
    assert d["x_train"][5, 1, 2, 3] == batches[1][b"data"][1][1024 + 2 * 32 + 3]
    assert d["y_test"].tolist() == test[b"labels"]


def cifar_archive(path):
    """A CIFAR-10 archive in the official layout, 2 images a batch, at path."""
    folder = path.parent / "batches" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _write_cifar_batch(folder / name, 2, 0)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")


def md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_cifar10_bad_archive_is_a_clear_error(tmp_path, monkeypatch):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.addfile(tarfile.TarInfo("x"), io.BytesIO(b""))
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(buf.getvalue())
    with pytest.raises(data.DataError, match="md5"):
        data.load("cifar10", str(tmp_path))
    cifar_archive(tmp_path / "cifar-10-python.tar.gz")  # a good archive (md5 made to match) is read
    monkeypatch.setattr(data, "CIFAR_MD5", md5(tmp_path / "cifar-10-python.tar.gz"))
    assert data.load("cifar10", str(tmp_path))["x_train"].shape == (10, 3, 32, 32)


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_cifar10_download_shows_progress_and_bad_batches_are_one_line_errors(tmp_path, monkeypatch,
                                                                             capsys):
    cifar_archive(tmp_path / "src.tar.gz")
    monkeypatch.setattr(data, "CIFAR_URL", (tmp_path / "none.tar.gz").as_uri())
    with pytest.raises(data.DataError, match="could not download CIFAR-10"):
        data.load("cifar10", str(tmp_path / "d"))
    assert not (tmp_path / "d" / "cifar-10-python.tar.gz").exists()
    monkeypatch.setattr(data, "CIFAR_URL", (tmp_path / "src.tar.gz").as_uri())
    monkeypatch.setattr(data, "CIFAR_MD5", md5(tmp_path / "src.tar.gz"))
    with monkeypatch.context() as m:  # a full disk while unpacking
        m.setattr(data.tarfile.TarFile, "extractall", disk_full)
        with pytest.raises(data.DataError, match="cannot unpack .* \\(No space left on device\\); "
                                                 "free some space"):
            data.load("cifar10", str(tmp_path / "d"))
    assert data.load("cifar10", str(tmp_path / "d"))["x_train"].shape == (10, 3, 32, 32)
    assert "100%" in capsys.readouterr().err  # the download's progress bar
    batch = tmp_path / "d" / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:100])  # cut short, as by an unpacking that stopped
    with pytest.raises(data.DataError, match="cannot read .*data_batch_3 .*delete"):
        data.load("cifar10", str(tmp_path / "d"))


def test_a_cifar_batch_is_read_as_data_never_run(tmp_path):
    """A tampered batch file whose unpickling would run code is refused in one line naming it;
    the code never runs."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _write_cifar_batch(folder / name, 2, 0)
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({b"data": Payload(), b"labels": [0]}, f)
    with pytest.raises(data.DataError, match="cannot read .*data_batch_2 .*posix.system"):
        data.load("cifar10", str(tmp_path))
    assert not marker.exists()


def make_folder(root, n_train=3, n_test=2, size=(40, 20)):
    from PIL import Image
    for split, n in (("train", n_train), ("test", n_test)):
        for c, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", size, colour).save(root / split / c / f"{i}.png")


def test_folder_reader_decodes_resizes_and_writes_nothing(tmp_path):
    make_folder(tmp_path)
    d = data.load("folder", str(tmp_path), image_size=16)
    assert d["classes"] == ["cat", "dog"] and d["x_train"].shape == (6, 3, 16, 16)
    assert d["y_train"].tolist() == [0, 0, 0, 1, 1, 1] and d["x_test"][0, 0].float().mean() == 255
    assert d["y_train"].dtype == torch.int64 and d["x_train"].dtype == torch.uint8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test", "train"]  # a data folder is read
    with pytest.raises(data.DataError, match="train/<class>"):
        data.load("folder", str(tmp_path / "missing"))


def test_an_empty_class_or_a_single_class_is_refused(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "train" / "owl").mkdir()
    (tmp_path / "train" / "owl" / "notes.txt").write_text("not an image")
    with pytest.raises(data.DataError, match="at least two classes and in test/<class>/; "
                                             "train/owl has none"):
        data.load("folder", str(tmp_path), image_size=8)
    shutil.rmtree(tmp_path / "train" / "owl")
    for split in ("train", "test"):
        shutil.rmtree(tmp_path / split / "dog")
    with pytest.raises(data.DataError, match=r"at least two classes .*found classes \['cat'\]"):
        data.load("folder", str(tmp_path), image_size=8)


def test_bad_files_in_a_folder(tmp_path):
    from PIL import Image
    make_folder(tmp_path)
    (tmp_path / "train" / "README.txt").write_text("not a class")
    (tmp_path / "train" / "cat" / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "test" / "dog").rename(tmp_path / "dog_elsewhere")  # no test images: allowed
    d = data.load("folder", str(tmp_path), image_size=8)
    assert d["classes"] == ["cat", "dog"] and len(d["y_train"]) == 6
    assert d["y_test"].tolist() == [0, 0]
    (tmp_path / "test" / "bird").mkdir()
    with pytest.raises(data.DataError, match="train/bird has none"):  # a class of test/ alone
        data.load("folder", str(tmp_path), image_size=8)
    (tmp_path / "test" / "bird").rmdir()
    bad = tmp_path / "train" / "dog" / "cut.png"
    Image.new("RGB", (40, 20)).save(bad)
    bad.write_bytes(bad.read_bytes()[:40])  # a truncated PNG
    with pytest.raises(data.DataError, match=f"cannot decode image {bad}"):
        data.load("folder", str(tmp_path), image_size=8)


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    from PIL import Image
    ramp = np.tile(np.linspace(0, 65535, 16).astype(np.uint16), (16, 1))
    Image.fromarray(ramp).save(tmp_path / "g.png")
    x = data.decode(str(tmp_path / "g.png"), 16)
    assert x.shape == (3, 16, 16) and x[0, 0, 0] == 0 and x[0, 0, -1] == 255
    np.testing.assert_allclose(x[0, 0].astype(float), ramp[0] / 257, atol=1)


def test_worker_processes_decode_what_one_process_decodes(tmp_path):
    """load_folder decodes in worker processes, 256 files a batch: one process's images, in
    order."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", 300), ("test", 3)):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 256, (10 + i % 7, 14, 3), dtype=np.uint8)
                Image.fromarray(img).save(tmp_path / split / c / f"{i}.png")
    d = data.load("folder", str(tmp_path), image_size=8)
    for s, (paths, labels) in data.folder_files(str(tmp_path))[1].items():
        one = np.stack([data.decode(p, 8) for p in paths])
        assert np.array_equal(d[f"x_{s}"].numpy(), one) and d[f"y_{s}"].tolist() == labels
    assert one.shape == (6, 3, 8, 8) and len(d["x_train"]) == 600
    assert d["x_train"].is_contiguous(memory_format=torch.channels_last)  # the layout it had


def test_write_atomic_never_leaves_half_a_file_and_two_writers_each_rename_a_whole_one(tmp_path):
    path = str(tmp_path / "summary.json")
    runtime.write_atomic(path, lambda f: json.dump(dict(test_acc=0.9), f))

    def half_then_die(f):
        f.write('{"test_acc": 0.')
        raise OSError("disk full")
    with pytest.raises(runtime.WriteError, match=f"cannot write {path}"):
        runtime.write_atomic(path, half_then_die)
    assert json.load(open(path)) == dict(test_acc=0.9) and os.listdir(tmp_path) == ["summary.json"]

    def first(f):  # a second writer (another process; here, nested) while the first is halfway
        f.write("first, ")
        runtime.write_atomic(path, lambda g: g.write("second, whole"))
        f.write("whole")
    runtime.write_atomic(path, first)
    assert open(path).read() == "first, whole" and os.listdir(tmp_path) == ["summary.json"]

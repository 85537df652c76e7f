"""
Datasets as uint8 tensors (loader.py makes the batches): `shapes`, built in, with object masks;
`cifar10`, its python batches, downloaded when absent; `folder`, DIR/{train,test}/<class>/*.
"""
import glob
import hashlib
import io
import os
import pickle
import shutil
import tarfile
import urllib.request

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from runtime import DataError, WriteError, write_atomic

KEYS = ("x_train", "y_train", "x_test", "y_test", "mask_test", "classes")
SHAPES = "disk square triangle ring plus cross diamond frame bars half-disk".split()
SHAPES_SEED = 1337  # the built-in dataset's own seed: runs of any --seed see the same images
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_CLASSES = "airplane automobile bird cat deer dog frog horse ship truck".split()
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")  # others ignored
CORRUPTIONS = ("noise", "blur", "contrast", "jpeg")


def load(name, data_dir="data", image_size=32, n_train=20000, n_test=2000):
    """A dict of KEYS: x_train, x_test uint8 (n, 3, H, W); y_train, y_test int64 (n,); mask_test
    bool (n, H, W) or None; classes, a list of names."""
    if name == "cifar10":
        d = load_cifar10(data_dir)
    elif name == "folder":
        d = load_folder(data_dir, image_size)
    else:
        train, test = make_shapes(n_train, SHAPES_SEED), make_shapes(n_test, SHAPES_SEED + 10_000)
        d = *train[:2], *test, SHAPES
    return dict(zip(KEYS, d))

# ---- the built-in dataset


def _shape_masks(label, u, v):
    """Masks (n, H, W) of shapes SHAPES[label] at coordinates u, v (n, H, W) from each centre;
    |u|, |v| <= 1 is the shape's bounding box."""
    r, au, av = np.sqrt(u * u + v * v), abs(u), abs(v)
    m = np.maximum(au, av)
    return np.choose(label[:, None, None], [
        r <= 1,  # disk
        m <= 0.8,  # square
        (v <= 0.8) & (au <= 0.5 * (v + 1.0)) & (v >= -1.0),  # triangle, apex up
        (r <= 1) & (r >= 0.55),  # ring
        ((au <= 0.3) | (av <= 0.3)) & (m <= 1),  # plus
        (abs(au - av) <= 0.3) & (m <= 0.9),  # cross (x)
        au + av <= 1,  # diamond
        (m <= 0.9) & (m >= 0.5),  # frame (hollow square)
        (au <= 1) & (av >= 0.25) & (av <= 0.75),  # bars (=)
        (r <= 1) & (v >= 0)])  # half-disk


def make_shapes(n, seed, size=32):
    """n images of one of 10 shapes in a saturated random colour (radius 7-12 px, random position)
    over a dull random gradient crossed by 3-6 dull strokes, plus pixel noise N(0, 0.05^2).
    Returns x uint8 (n, 3, size, size), y int64 (n,), mask bool (n, size, size)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(SHAPES), n)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)  # (H, W)

    def dull(m):  # (m, 3) colours: a grey level in [0.2, 0.8] plus a tint in [-0.1, 0.1]
        return rng.uniform(0.2, 0.8, (m, 1)) + rng.uniform(-0.1, 0.1, (m, 3))

    c0, c1 = dull(n)[:, :, None, None], dull(n)[:, :, None, None]
    ang = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    t = ((np.cos(ang) * xx + np.sin(ang) * yy) / (2 * size) + 0.5)[:, None]  # (n, 1, H, W)
    img = (c0 * (1 - t) + c1 * t).astype(np.float32)  # (n, 3, H, W) from c0 to c1
    ts = np.linspace(0, 1, 2 * size)[:, None]  # (T, 1)
    for s in range(6):  # strokes: 3 in every image, 3 more each with probability 1/2
        idx = np.nonzero(rng.uniform(size=n) < (1.0 if s < 3 else 0.5))[0]
        p0, p1 = rng.uniform(0, size - 1, (2, len(idx), 2))
        pts = np.rint(p0[:, None] + ts * (p1 - p0)[:, None]).astype(int)  # (m, T, 2) pixel (x, y)
        colour = dull(len(idx)).repeat(len(ts), 0)  # (m T, 3)
        img[idx.repeat(len(ts)), :, pts[..., 1].ravel(), pts[..., 0].ravel()] = colour
    rad = rng.uniform(7, 12, (n, 1, 1))
    cx, cy = rng.uniform(0, 1, (2, n, 1, 1)) * (size - 2 * rad) + rad
    mask = _shape_masks(y, (xx - cx) / rad, (yy - cy) / rad)  # (n, H, W)
    # the object's colour: one channel in [0.85, 1], one in [0, 0.15], one anywhere
    col = np.stack([rng.uniform(0.85, 1, n), rng.uniform(0, 0.15, n), rng.uniform(0, 1, n)], 1)
    col = np.take_along_axis(col, rng.permuted(np.tile(np.arange(3), (n, 1)), axis=1), 1)  # (n, 3)
    img = np.where(mask[:, None], col[:, :, None, None], img)
    img += rng.normal(0, 0.05, img.shape).astype(np.float32)
    x = (img.clip(0, 1) * 255).round().astype(np.uint8)
    return torch.from_numpy(x), torch.from_numpy(y).long(), torch.from_numpy(mask)

# ---- CIFAR-10 (the official python batches)


class ArraysOnly(pickle.Unpickler):
    """Unpickles dicts of bytes, numbers, lists and numpy arrays (CIFAR-10's batches) and refuses
    every other class: a tampered batch file cannot run code."""
    ARRAYS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
              ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) in self.ARRAYS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it asks for {module}.{name}, which is not array data")


def read_batches(folder, names):
    """x uint8 (n, 3, 32, 32), y int64 (n,) from CIFAR-10 batch files."""
    xs, ys = [], []
    for name in names:
        try:
            with open(os.path.join(folder, name), "rb") as f:
                d = ArraysOnly(f, encoding="bytes").load()
            xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))  # (n, 3072)
            ys.append(np.asarray(d[b"labels"], dtype=np.int64))
        except (pickle.UnpicklingError, OSError, EOFError, KeyError, TypeError, ValueError) as e:
            raise DataError(f"cannot read {folder}/{name} ({type(e).__name__}: {e}); delete "
                            f"{folder} and rerun to unpack it again") from None
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def load_cifar10(data_dir):
    """CIFAR-10 from DATA_DIR/cifar-10-batches-py, downloaded (md5 checked) and unpacked if
    absent."""
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    tgz = os.path.join(data_dir, "cifar-10-python.tar.gz")
    if not os.path.isdir(folder) and not os.path.exists(tgz):
        print(f"CIFAR-10 not found in {data_dir}: downloading {CIFAR_URL} (163 MB)")
        try:
            with urllib.request.urlopen(CIFAR_URL) as r, tqdm.wrapattr(
                    r, "read", int(r.headers.get("Content-Length", 0)) or None) as src:
                write_atomic(tgz, lambda f: shutil.copyfileobj(src, f, 1 << 20), binary=True)
        except (OSError, WriteError) as e:
            raise DataError(f"could not download CIFAR-10 ({e}); put cifar-10-python.tar.gz in "
                            f"{data_dir} by hand, or use --dataset shapes") from None
    if not os.path.isdir(folder):
        with open(tgz, "rb") as f:
            if hashlib.md5(f.read()).hexdigest() != CIFAR_MD5:
                raise DataError(f"{tgz} fails its md5 check; delete it and rerun")
        try:
            with tarfile.open(tgz) as tar:
                tar.extractall(data_dir, filter="data")
        except OSError as e:
            raise DataError(f"cannot unpack {tgz} ({e.strerror or e}); free some space or make "
                            f"{data_dir} writable, delete {folder} and rerun") from None
    return (*read_batches(folder, [f"data_batch_{i}" for i in range(1, 6)]),
            *read_batches(folder, ["test_batch"]), None, CIFAR_CLASSES)

# ---- image folders (ImageNet-style layout)


def decode(path, size):
    """Decode with Pillow, resize the shorter side to `size`, centre-crop: (3, size, size) uint8.
    16-bit greyscale is scaled to 8 bits (a plain convert would clip it to white)."""
    try:
        with Image.open(path) as im:
            if im.mode.startswith("I"):  # I;16, I;16B, I: 16- or 32-bit integer greyscale
                im = Image.fromarray((np.asarray(im, float) / 257).clip(0, 255).astype(np.uint8))
            s = size / min(im.size)
            w, h = (round(side * s) for side in im.size)
            left, top = (w - size) // 2, (h - size) // 2
            im = im.convert("RGB").resize((w, h), Image.BILINEAR)
            return np.array(im.crop((left, top, left + size, top + size))).transpose(2, 0, 1)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot decode image {path} ({type(e).__name__}); remove or replace "
                        f"it") from None


class Files(torch.utils.data.Dataset):
    """Image files decoded on demand, each (3, size, size) uint8."""

    def __init__(self, paths, size):
        self.paths, self.size = paths, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return torch.from_numpy(decode(self.paths[i], self.size))


def folder_files(data_dir):
    """(classes, {split: (paths, labels)}) of DATA_DIR/{train,test}/<class>/*; hidden files (glob
    skips them) and files without an image extension are ignored."""
    dirs = {s: os.path.join(data_dir, s) for s in ("train", "test")}
    classes = sorted({c[:-1] for d in dirs.values() for c in glob.glob("*/", root_dir=d)})
    out, label = {}, {c: i for i, c in enumerate(classes)}
    for s, d in dirs.items():
        files = [f for f in sorted(glob.glob("*/*", root_dir=d), key=os.path.split)
                 if f.lower().endswith(IMAGE_EXTS)]
        out[s] = [os.path.join(d, f) for f in files], [label[os.path.dirname(f)] for f in files]
    empty = sorted(set(classes) - {classes[i] for i in out["train"][1]})
    if len(classes) < 2 or empty or not out["test"][0]:
        why = f"train/{empty[0]} has none" if empty else f"found classes {classes}"
        raise DataError(f"{data_dir} needs images ({', '.join(IMAGE_EXTS)}) in train/<class>/ of "
                        f"at least two classes and in test/<class>/; {why}")
    return classes, out


def load_folder(data_dir, image_size):
    """DATA_DIR's images, all decoded, by a worker process per 256 files (at most one a core); a
    folder too large to hold decoded takes --stream."""
    classes, files = folder_files(data_dir)
    out = []
    for s, (paths, labels) in files.items():
        print(f"decoding {len(paths)} {s} images from {data_dir}")
        images = torch.utils.data.DataLoader(Files(paths, image_size), batch_size=256,
                                             num_workers=min(os.cpu_count(), len(paths) // 256))
        x = torch.cat(list(images))  # kept (n, H, W, 3) in memory, as decoded: sums depend on it
        out += [x.contiguous(memory_format=torch.channels_last), torch.tensor(labels)]
    return out + [None, classes]

# ---- distribution shift: common corruptions at one fixed severity


def corrupt(x, kind, seed=0):
    """A corrupted copy of uint8 images x (n, 3, H, W), same dtype and device:
    noise     x + N(0, 0.08^2) on the [0, 1] scale
    blur      Gaussian blur, sigma 1 px (5 x 5 kernel)
    contrast  (x - mean) * 0.4 + mean, mean per image
    jpeg      re-encoded with Pillow at quality 15"""
    f, dev = x.float() / 255, x.device
    if kind == "noise":
        g = torch.Generator(dev).manual_seed(seed)
        f = f + 0.08 * torch.randn(f.shape, generator=g, device=dev)
    elif kind == "blur":
        k = torch.exp(-(torch.arange(5.0, device=dev) - 2) ** 2 / 2)
        k = (k[:, None] * k[None, :] / k.sum() ** 2).expand(3, 1, 5, 5)  # (3, 1, 5, 5) depthwise
        f = F.conv2d(F.pad(f, (2,) * 4, mode="replicate"), k, groups=3)
    elif kind == "contrast":
        m = f.mean((1, 2, 3), keepdim=True)
        f = (f - m) * 0.4 + m
    else:  # jpeg
        out = []
        for img in x.cpu().permute(0, 2, 3, 1).numpy():  # (H, W, 3) each
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=15)
            out.append(np.asarray(Image.open(buf)).transpose(2, 0, 1))
        return torch.from_numpy(np.stack(out)).to(dev)
    return (f.clamp(0, 1) * 255).round().to(torch.uint8)

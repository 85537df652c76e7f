"""
Datasets as uint8 tensors (loader.py turns them into batches on the device).

    shapes   built in: one of 10 shapes on a cluttered background, generated in memory in
             seconds, always the same images, with a per-image object mask (ground truth for
             attention maps)
    cifar10  the standard python batches (cifar-10-batches-py), downloaded when absent
    folder   DIR/train/<class>/*, DIR/test/<class>/* images, decoded once and cached as .npz

load(...) returns a dict: x_train, x_test uint8 (n, 3, H, W); y_train, y_test int64 (n,);
mask_test bool (n, H, W) or None; classes, a list of names. Files on disk are read as data,
never run. Anything wrong with them raises DataError with one line that names the file and the fix.
"""
import hashlib
import http.client
import io
import os
import pickle
import tarfile
import urllib.request
import zipfile

import numpy as np
import torch
from tqdm import tqdm

from runtime import WriteError, write_atomic


class DataError(Exception):
    """A problem with the data on disk; the message names the file and the fix."""


SHAPES = ["disk", "square", "triangle", "ring", "plus", "cross", "diamond", "frame", "bars",
          "half-disk"]
SHAPES_SEED = 1337  # the built-in dataset's own seed: runs of any --seed see the same images
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck"]

# -----------------------------------------------------------------------------
# the built-in dataset


def _shape_masks(label, u, v):
    """Object masks for unit coordinates (u, v) around each centre: (n, H, W) bool.
    u, v: (n, H, W), |u|, |v| <= 1 covers the shape's bounding box."""
    r = np.sqrt(u * u + v * v)
    m, au, av = np.maximum(abs(u), abs(v)), abs(u), abs(v)
    masks = [
        r <= 1,                                                    # disk
        m <= 0.8,                                                  # square
        (v <= 0.8) & (au <= 0.5 * (v + 1.0)) & (v >= -1.0),        # triangle (apex up)
        (r <= 1) & (r >= 0.55),                                    # ring
        ((au <= 0.3) | (av <= 0.3)) & (m <= 1),                    # plus
        (abs(au - av) <= 0.3) & (m <= 0.9),                        # cross (x)
        au + av <= 1,                                              # diamond
        (m <= 0.9) & (m >= 0.5),                                   # frame (hollow square)
        (au <= 1) & (av >= 0.25) & (av <= 0.75),                   # bars (=)
        (r <= 1) & (v >= 0),                                       # half-disk
    ]
    return np.choose(label[:, None, None], masks)


def make_shapes(n, seed, size=32):
    """n images of one of 10 shapes in a saturated random colour (radius 7-12 px, random position)
    over a dull random gradient crossed by 3-6 dull distractor strokes, plus pixel noise.
    Returns x uint8 (n, 3, size, size), y int64 (n,), mask bool (n, size, size)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(SHAPES), n)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)  # (H, W)

    def dull(*shape):  # low-saturation colours: a grey level plus a little tint
        return rng.uniform(0.2, 0.8, shape[:-1] + (1,)) + rng.uniform(-0.1, 0.1, shape)

    # background: a random linear gradient between two dull colours
    c0, c1 = dull(n, 3)[:, :, None, None], dull(n, 3)[:, :, None, None]
    ang = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    t = ((np.cos(ang) * xx + np.sin(ang) * yy) / (2 * size) + 0.5)[:, None]  # (n, 1, H, W)
    img = (c0 * (1 - t) + c1 * t).astype(np.float32)  # (n, 3, H, W)
    # distractor strokes: 3-6 line segments per image
    ts = np.linspace(0, 1, 2 * size)[None, :, None]  # (1, T, 1)
    for s in range(6):
        idx = np.nonzero(rng.uniform(size=n) < (1.0 if s < 3 else 0.5))[0]
        p0, p1 = rng.uniform(0, size - 1, (len(idx), 2)), rng.uniform(0, size - 1, (len(idx), 2))
        pts = np.rint(p0[:, None] + ts * (p1 - p0)[:, None]).astype(int)  # (m, T, 2) pixel (x, y)
        b = np.repeat(idx, pts.shape[1])
        colour = np.repeat(dull(len(idx), 3), pts.shape[1], 0)  # (m T, 3)
        img[b, :, pts[..., 1].ravel(), pts[..., 0].ravel()] = colour
    # the object, on top, in a saturated colour: one channel high, one low, one anywhere
    rad = rng.uniform(7, 12, (n, 1, 1))
    cx, cy = (rng.uniform(0, 1, (n, 1, 1)) * (size - 2 * rad) + rad for _ in range(2))
    mask = _shape_masks(y, (xx - cx) / rad, (yy - cy) / rad)  # (n, H, W)
    col = np.stack([rng.uniform(0.85, 1, n), rng.uniform(0, 0.15, n), rng.uniform(0, 1, n)], 1)
    col = np.take_along_axis(col, rng.permuted(np.tile(np.arange(3), (n, 1)), axis=1), 1)  # (n, 3)
    img = np.where(mask[:, None], col[:, :, None, None], img)
    img += rng.normal(0, 0.05, img.shape).astype(np.float32)
    x = (img.clip(0, 1) * 255).round().astype(np.uint8)
    return torch.from_numpy(x), torch.from_numpy(y).long(), torch.from_numpy(mask)


def load_shapes(n_train=20000, n_test=2000):
    x_tr, y_tr, _ = make_shapes(n_train, SHAPES_SEED)
    x_te, y_te, m_te = make_shapes(n_test, SHAPES_SEED + 10_000)
    return dict(x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te, mask_test=m_te,
                classes=SHAPES)

# -----------------------------------------------------------------------------
# CIFAR-10 (the official python batches)


class ArraysOnly(pickle.Unpickler):
    """Unpickles what CIFAR-10's batches hold, dicts of bytes, numbers, lists and numpy arrays, and
    refuses every other class: a tampered batch file cannot run code."""
    ARRAYS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
              ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) in self.ARRAYS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it asks for {module}.{name}, which is not array data")


def read_batches(folder, names):
    """x uint8 (n, 3, 32, 32) and y int64 (n,) from CIFAR-10 batch files."""
    xs, ys = [], []
    for name in names:
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                d = ArraysOnly(f, encoding="bytes").load()
            xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))  # (n, 3072)
            ys.append(np.asarray(d[b"labels"], dtype=np.int64))
        except (pickle.UnpicklingError, OSError, EOFError, KeyError, TypeError, ValueError) as e:
            why = e if isinstance(e, pickle.UnpicklingError) else type(e).__name__  # cut short ...
            raise DataError(f"cannot read {path} ({why}); delete {folder} and rerun to unpack it "
                            f"again") from None
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def download(url, path):
    """url to path (through write_atomic), 1 MB at a time, with a progress bar."""
    with urllib.request.urlopen(url) as r:
        size = int(r.headers.get("Content-Length") or 0) or None
        with tqdm(total=size, unit="B", unit_scale=True, desc=os.path.basename(path)) as bar:
            def copy(f):
                for b in iter(lambda: r.read(1 << 20), b""):
                    f.write(b)
                    bar.update(len(b))
            write_atomic(path, copy, binary=True)


def load_cifar10(data_dir):
    """CIFAR-10 from DATA_DIR/cifar-10-batches-py; fetched from the official address (md5
    checked) and unpacked when absent."""
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    tgz = os.path.join(data_dir, "cifar-10-python.tar.gz")
    if not os.path.isdir(folder) and not os.path.exists(tgz):
        print(f"CIFAR-10 not found in {data_dir}: downloading {CIFAR_URL} (163 MB)")
        try:
            download(CIFAR_URL, tgz)
        except (OSError, WriteError, http.client.HTTPException) as e:
            raise DataError(f"could not download CIFAR-10 ({e}); put cifar-10-python.tar.gz in "
                            f"{data_dir} by hand, or use --dataset shapes") from None
    if not os.path.isdir(folder):
        with open(tgz, "rb") as f:
            if hashlib.md5(f.read()).hexdigest() != CIFAR_MD5:
                raise DataError(f"{tgz} fails its md5 check (corrupt or partial download); "
                                f"delete it and rerun")
        try:
            with tarfile.open(tgz) as tar:
                tar.extractall(data_dir, filter="data")
        except OSError as e:  # a full disk or a read-only folder; read_batches refuses the rest
            raise DataError(f"cannot unpack {tgz} into {data_dir} ({e.strerror or e}); free some "
                            f"space or make it writable, delete {folder} and rerun") from None
    x_tr, y_tr = read_batches(folder, [f"data_batch_{i}" for i in range(1, 6)])
    x_te, y_te = read_batches(folder, ["test_batch"])
    return dict(x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te, mask_test=None,
                classes=CIFAR_CLASSES)

# -----------------------------------------------------------------------------
# image folders (ImageNet-style layout)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")  # others: ignored


def decode(path, size):
    """Decode with Pillow, resize the shorter side to `size`, centre-crop to size x size:
    (3, size, size) uint8. 16-bit greyscale is scaled to 8 bits (a plain convert would clip it to
    white). A file that cannot be read raises DataError naming it."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            if im.mode.startswith("I"):  # I;16, I;16B, I: 16- or 32-bit integer greyscale
                grey = (np.asarray(im, np.float64) / 257).clip(0, 255)
                im = Image.fromarray(grey.astype(np.uint8))
            im = im.convert("RGB")
            s = size / min(im.size)
            w, h = max(size, round(im.size[0] * s)), max(size, round(im.size[1] * s))
            im = im.resize((w, h), Image.BILINEAR)
            left, top = (w - size) // 2, (h - size) // 2
            im = im.crop((left, top, left + size, top + size))
            return np.array(im, dtype=np.uint8).transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot decode image {path} ({type(e).__name__}); remove or replace "
                        f"it") from None


def decode_all(paths, size, min_parallel=2048):
    """Every file decoded, (n, 3, size, size) uint8; in one worker process per core when there are
    at least min_parallel files (one process takes tens of seconds for CIFAR-10's 60,000 JPEGs)."""
    if len(paths) < min_parallel or (os.cpu_count() or 1) < 2:
        return np.stack([decode(p, size) for p in paths])
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor() as pool:
        return np.stack(list(pool.map(decode, paths, [size] * len(paths), chunksize=256)))


def folder_files(data_dir):
    """The images of DATA_DIR/{train,test}/<class>/: (classes, {split: (paths, labels)}). Classes
    are the folders of train/; hidden files and files without an image extension are ignored."""
    def visible(d):
        return sorted(f for f in os.listdir(d) if not f.startswith("."))

    dirs = {s: os.path.join(data_dir, s) for s in ("train", "test")}
    for d in dirs.values():
        if not os.path.isdir(d):
            raise DataError(f"{d} not found; --dataset folder needs DATA_DIR/train/<class>/* and "
                            f"DATA_DIR/test/<class>/*")
    classes, found = ([c for c in visible(d) if os.path.isdir(os.path.join(d, c))]
                      for d in dirs.values())
    if set(found) - set(classes):
        raise DataError(f"{dirs['test']} has classes that train/ lacks "
                        f"({', '.join(sorted(set(found) - set(classes)))}); add them to train/ or "
                        f"remove them from test/")
    out = {}
    for split, d in dirs.items():
        files = [(os.path.join(d, c, f), i) for i, c in enumerate(classes)
                 if os.path.isdir(os.path.join(d, c))
                 for f in visible(os.path.join(d, c)) if f.lower().endswith(IMAGE_EXTS)]
        if not files:
            raise DataError(f"no images under {d}/<class>/ (looked for {', '.join(IMAGE_EXTS)})")
        out[split] = ([p for p, _ in files], [i for _, i in files])
    empty = [c for i, c in enumerate(classes) if i not in set(out["train"][1])]
    if empty:  # a class the model is asked to predict but never sees
        raise DataError(f"{dirs['train']}/{empty[0]} has no images (looked for "
                        f"{', '.join(IMAGE_EXTS)}); add some or remove the folder")
    if len(classes) < 2:  # one class: 100% accuracy by always answering it
        raise DataError(f"{dirs['train']} has one class ({classes[0]}); a classifier needs at "
                        f"least two class folders")
    return classes, out


def cache_path(data_dir, image_size, files):
    """Where the decoded folder is cached: a name keyed on the image size and on every file's
    path, size and modification time (adding, removing or changing a file makes a new cache), in
    the data folder when it is writable, else in ~/.cache/infsa (a shared or read-only dataset)."""
    h = hashlib.sha1(str(image_size).encode())
    for paths, _ in files.values():
        for p in paths:
            try:
                st = os.stat(p)
            except OSError as e:  # a dangling or looping link
                raise DataError(f"cannot read image {p} ({e.strerror}); remove or replace "
                                f"it") from None
            h.update(f"{os.path.relpath(p, data_dir)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    name = f"cache_{image_size}_{h.hexdigest()[:12]}.npz"
    if os.access(data_dir, os.W_OK):
        return os.path.join(data_dir, name)
    home = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "infsa")
    folder = hashlib.sha1(os.path.abspath(data_dir).encode()).hexdigest()[:8]
    return os.path.join(home, f"{folder}_{name}")


def load_folder(data_dir, image_size):
    """DATA_DIR/{train,test}/<class>/<image>, decoded once and cached (cache_path), the cache read
    as arrays only; one that cannot be read is rebuilt, one that cannot be written skipped."""
    classes, files = folder_files(data_dir)
    cache = cache_path(data_dir, image_size, files)
    if os.path.exists(cache):
        try:
            with np.load(cache, allow_pickle=False) as z:
                d = {k: torch.from_numpy(z[k]) for k in ("x_train", "y_train", "x_test", "y_test")}
            return dict(d, mask_test=None, classes=classes)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            print(f"warning: cache {cache} is unreadable ({type(e).__name__}); decoding again")
    out = {}
    for split, (paths, labels) in files.items():
        print(f"decoding {len(paths)} {split} images from {data_dir} (once; cached in {cache})")
        out[f"x_{split}"] = decode_all(paths, image_size)
        out[f"y_{split}"] = np.array(labels, dtype=np.int64)
    try:
        write_atomic(cache, lambda f: np.savez(f, **out), binary=True)
    except WriteError as e:  # a full disk, a read-only cache home: training needs no cache
        print(f"warning: {e}; going on without a cache (the next run decodes again)")
    return dict({k: torch.from_numpy(v) for k, v in out.items()}, mask_test=None, classes=classes)


def load(name, data_dir="data", image_size=32, n_train=20000, n_test=2000):
    if name == "shapes":
        return load_shapes(n_train, n_test)
    if name == "cifar10":
        return load_cifar10(data_dir)
    return load_folder(data_dir, image_size)


# -----------------------------------------------------------------------------
# distribution shift: common corruptions at one fixed severity

CORRUPTIONS = ("noise", "blur", "contrast", "jpeg")


def corrupt(x, kind, seed=0):
    """A corrupted copy of uint8 images x (n, 3, H, W), same dtype and device:
    noise     x + N(0, 0.08^2) on the [0, 1] scale
    blur      Gaussian blur, sigma 1 px (5 x 5 kernel)
    contrast  (x - mean) * 0.4 + mean, mean per image
    jpeg      re-encoded with Pillow at quality 15"""
    f = x.float() / 255
    if kind == "noise":
        g = torch.Generator(device=x.device).manual_seed(seed)
        f = f + 0.08 * torch.randn(f.shape, generator=g, device=x.device)
    elif kind == "blur":
        t = torch.arange(5, device=x.device, dtype=torch.float32) - 2
        k1 = torch.exp(-t ** 2 / 2)
        k = (k1[:, None] * k1[None, :] / k1.sum() ** 2).expand(3, 1, 5, 5)  # (3, 1, 5, 5) depthwise
        f = torch.nn.functional.pad(f, (2, 2, 2, 2), mode="replicate")
        f = torch.nn.functional.conv2d(f, k, groups=3)
    elif kind == "contrast":
        m = f.mean((1, 2, 3), keepdim=True)
        f = (f - m) * 0.4 + m
    elif kind == "jpeg":
        from PIL import Image
        out = []
        for img in x.cpu().permute(0, 2, 3, 1).numpy():  # (H, W, 3) each
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=15)
            out.append(np.asarray(Image.open(buf)).transpose(2, 0, 1))
        return torch.from_numpy(np.stack(out)).to(x.device)
    else:
        raise ValueError(f"kind must be one of {', '.join(CORRUPTIONS)}; got {kind!r}")
    return (f.clamp(0, 1) * 255).round().to(torch.uint8)

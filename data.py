"""
Datasets as uint8 tensors, and loaders that keep them on the device.

    shapes   built in: one of 10 shapes on a cluttered background, generated in memory from a
             seed in seconds, with a per-image object mask (ground truth for attention maps)
    cifar10  the standard python batches (cifar-10-batches-py), downloaded when absent
    folder   DIR/train/<class>/*, DIR/test/<class>/* images, decoded once and cached as .npz

load(...) returns a dict: x_train, x_test uint8 (n, 3, H, W); y_train, y_test int64 (n,);
mask_test bool (n, H, W) or None; classes, a list of names. Anything wrong with the data on
disk raises DataError with one line that names the file and the fix.
"""
import hashlib
import io
import math
import os
import pickle
import tarfile
import urllib.request
import uuid
import zipfile

import numpy as np
import torch
import torch.nn.functional as F


class DataError(Exception):
    """A problem with the data on disk; the message names the file and the fix."""


def write_atomic(path, write, mode="w"):
    """write(f) into a temporary file of this process alone, flush it to disk, then rename it to path:
    a crash never leaves half a file, a failed write never replaces a good one, and two processes
    writing the same path at once each rename a whole file (the last one wins)."""
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


SHAPES = ["disk", "square", "triangle", "ring", "plus", "cross", "diamond", "frame", "bars", "half-disk"]
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

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
        img[b, :, pts[..., 1].ravel(), pts[..., 0].ravel()] = np.repeat(dull(len(idx), 3), pts.shape[1], 0)
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


def load_shapes(n_train=20000, n_test=2000, seed=0):
    x_tr, y_tr, _ = make_shapes(n_train, seed)
    x_te, y_te, m_te = make_shapes(n_test, seed + 10_000)
    return dict(x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te, mask_test=m_te, classes=SHAPES)

# -----------------------------------------------------------------------------
# CIFAR-10 (the official python batches)


def _md5(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_batches(folder, names):
    xs, ys = [], []
    for name in names:
        with open(os.path.join(folder, name), "rb") as f:
            d = pickle.load(f, encoding="bytes")
        xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))  # (n, 3072) -> (n, 3, 32, 32)
        ys.append(np.asarray(d[b"labels"], dtype=np.int64))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def load_cifar10(data_dir):
    """CIFAR-10 from DATA_DIR/cifar-10-batches-py; fetched from the official address (md5 checked)
    and unpacked when absent."""
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    if not os.path.isdir(folder):
        os.makedirs(data_dir, exist_ok=True)
        tgz = os.path.join(data_dir, "cifar-10-python.tar.gz")
        if not os.path.exists(tgz):
            print(f"CIFAR-10 not found in {data_dir}: downloading {CIFAR_URL} (163 MB)")
            try:
                write_atomic(tgz, lambda f: f.write(urllib.request.urlopen(CIFAR_URL).read()), "wb")
            except OSError as e:
                raise DataError(f"could not download CIFAR-10 ({e}); put cifar-10-python.tar.gz "
                                f"in {data_dir} by hand, or use --dataset shapes") from None
        if _md5(tgz) != CIFAR_MD5:
            raise DataError(f"{tgz} fails its md5 check (corrupt or partial download); delete it and rerun")
        with tarfile.open(tgz) as tar:
            tar.extractall(data_dir, filter="data")
    x_tr, y_tr = _read_batches(folder, [f"data_batch_{i}" for i in range(1, 6)])
    x_te, y_te = _read_batches(folder, ["test_batch"])
    return dict(x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te, mask_test=None, classes=CIFAR_CLASSES)

# -----------------------------------------------------------------------------
# image folders (ImageNet-style layout)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")  # other files are ignored


def decode(path, size):
    """Decode with Pillow, resize the shorter side to `size`, centre-crop to size x size: (3, size, size)
    uint8. 16-bit greyscale is scaled to 8 bits (a plain convert would clip it to white). A file Pillow
    cannot read raises DataError naming it."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            if im.mode.startswith("I"):  # I;16, I;16B, I: 16- or 32-bit integer greyscale
                im = Image.fromarray((np.asarray(im, np.float64) / 257).clip(0, 255).astype(np.uint8))
            im = im.convert("RGB")
            s = size / min(im.size)
            im = im.resize((max(size, round(im.size[0] * s)), max(size, round(im.size[1] * s))), Image.BILINEAR)
            l, t = (im.size[0] - size) // 2, (im.size[1] - size) // 2
            return np.array(im.crop((l, t, l + size, t + size)), dtype=np.uint8).transpose(2, 0, 1)
    except (OSError, ValueError, SyntaxError) as e:  # what Pillow raises for unreadable or cut-short files
        raise DataError(f"cannot decode image {path} ({type(e).__name__}); remove or replace it") from None


def decode_all(paths, size, min_parallel=2048):
    """decode every file, (n, 3, size, size) uint8; in worker processes, one per core, when there are
    at least min_parallel files (one process takes tens of seconds for CIFAR-10's 60,000 JPEGs)."""
    if len(paths) < min_parallel or (os.cpu_count() or 1) < 2:
        return np.stack([decode(p, size) for p in paths])
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor() as pool:
        return np.stack(list(pool.map(decode, paths, [size] * len(paths), chunksize=256)))


def folder_files(data_dir):
    """The images of DATA_DIR/{train,test}/<class>/: (classes, {split: (paths, labels)}). Classes are
    the folders of train/; files without an image extension (.DS_Store, README.txt) are ignored."""
    def listing(d):
        return sorted(f for f in os.listdir(d) if not f.startswith("."))
    split_dirs = {s: os.path.join(data_dir, s) for s in ("train", "test")}
    for d in split_dirs.values():
        if not os.path.isdir(d):
            raise DataError(f"{d} not found; --dataset folder needs DATA_DIR/train/<class>/* and DATA_DIR/test/<class>/*")
    classes = [c for c in listing(split_dirs["train"]) if os.path.isdir(os.path.join(split_dirs["train"], c))]
    extra = {c for c in listing(split_dirs["test"]) if os.path.isdir(os.path.join(split_dirs["test"], c))} - set(classes)
    if extra:
        raise DataError(f"{split_dirs['test']} has classes that train/ lacks ({', '.join(sorted(extra))}); "
                        f"add them to train/ or remove them from test/")
    out = {}
    for split, d in split_dirs.items():
        files = [(os.path.join(d, c, f), i) for i, c in enumerate(classes) if os.path.isdir(os.path.join(d, c))
                 for f in listing(os.path.join(d, c)) if f.lower().endswith(IMAGE_EXTS)]
        if not files:
            raise DataError(f"no images under {d}/<class>/ (looked for {', '.join(IMAGE_EXTS)})")
        out[split] = ([p for p, _ in files], [i for _, i in files])
    return classes, out


def cache_path(data_dir, image_size, files):
    """Where the decoded folder is cached: a name keyed on the image size and on every file's path,
    size and modification time (so adding, removing or changing a file makes a new cache), in the
    data folder when it is writable, else in ~/.cache/infsa (a shared or read-only dataset)."""
    h = hashlib.sha1(str(image_size).encode())
    for paths, _ in files.values():
        for p in paths:
            st = os.stat(p)
            h.update(f"{os.path.relpath(p, data_dir)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    name = f"cache_{image_size}_{h.hexdigest()[:12]}.npz"
    if os.access(data_dir, os.W_OK):
        return os.path.join(data_dir, name)
    home = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "infsa")
    os.makedirs(home, exist_ok=True)
    return os.path.join(home, hashlib.sha1(os.path.abspath(data_dir).encode()).hexdigest()[:8] + "_" + name)


def load_folder(data_dir, image_size):
    """DATA_DIR/{train,test}/<class>/<image>, decoded once and cached (cache_path); a cache that cannot
    be read is rebuilt."""
    classes, files = folder_files(data_dir)
    cache = cache_path(data_dir, image_size, files)
    if os.path.exists(cache):
        try:
            with np.load(cache) as z:
                d = {k: torch.from_numpy(z[k]) for k in ("x_train", "y_train", "x_test", "y_test")}
            return dict(d, mask_test=None, classes=classes)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            print(f"warning: cache {cache} is unreadable ({type(e).__name__}); decoding the images again")
    out = {}
    for split, (paths, labels) in files.items():
        print(f"decoding {len(paths)} {split} images from {data_dir} (once; cached in {cache})")
        out[f"x_{split}"], out[f"y_{split}"] = decode_all(paths, image_size), np.array(labels, dtype=np.int64)
    write_atomic(cache, lambda f: np.savez(f, **out), "wb")
    return dict({k: torch.from_numpy(v) for k, v in out.items()}, mask_test=None, classes=classes)


def load(name, data_dir="data", image_size=32, seed=0, n_train=20000, n_test=2000):
    if name == "shapes":
        return load_shapes(n_train, n_test, seed)
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
        f = torch.nn.functional.conv2d(torch.nn.functional.pad(f, (2, 2, 2, 2), mode="replicate"), k, groups=3)
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

# -----------------------------------------------------------------------------
# GPU-resident batches with augmentation done on the device


def normalize(x_uint8, mean, std):
    """uint8 (B, 3, H, W) -> float (x / 255 - mean) / std."""
    return standardize(x_uint8.float() / 255, mean, std)


def standardize(x, mean, std):
    """Float images on the [0, 1] scale (B, 3, H, W) -> (x - mean) / std, per channel."""
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


# Every augmentation below is a deterministic function of the images and a (B, k) tensor u of
# U(0, 1) draws, k = DRAWS[name]. The loader draws all of a batch's randomness in one call and
# can then compile the whole pipeline into a few fused kernels (a generator cannot be compiled).
DRAWS = {"crop_flip": 3, "affine": 4, "jitter": 3, "erase": 5}


def uniforms(n, k, generator=None, device=None):
    """(n, k) independent U(0, 1) draws, from `generator` when given."""
    return torch.rand(n, k, generator=generator, device=device)


def _sym(u):
    """U(0, 1) -> U(-1, 1)."""
    return 2 * u - 1


def random_crop_flip(x, pad, u, flip=True):
    """Per-image random crop (zero padding `pad`) and horizontal flip of a (B, C, H, W) batch.
    u (B, 3): vertical offset, horizontal offset (each uniform over 0..2 pad), flip if u < 0.5."""
    B, C, H, W = x.shape
    dev = x.device
    if pad:
        xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p)
        dy, dx = ((u[:, i] * (2 * pad + 1)).long().clamp(max=2 * pad) for i in range(2))
        iy = dy[:, None] + torch.arange(H, device=dev)  # (B, H)
        ix = dx[:, None] + torch.arange(W, device=dev)  # (B, W)
        b, c = torch.arange(B, device=dev)[:, None, None, None], torch.arange(C, device=dev)[None, :, None, None]
        x = xp[b, c, iy[:, None, :, None], ix[:, None, None, :]]  # (B, C, H, W)
    if not flip:
        return x
    return torch.where((u[:, 2] < 0.5)[:, None, None, None], x.flip(-1), x)


def random_affine(x, u, rotate=0.0, zoom=0.0, translate=0.0):
    """Per-image rotation by U(-rotate, rotate) degrees, zoom by U(1 - zoom, 1 + zoom) and shift by
    U(-translate, translate) of the image size, in one bilinear resample of a float (B, C, H, W)
    batch; borders reflect. Output point p (in [-1, 1] coordinates) samples input R(theta) p / s + t.
    u (B, 4): angle, zoom, shift x, shift y."""
    th = _sym(u[:, 0]) * math.radians(rotate)
    s = 1 + _sym(u[:, 1]) * zoom
    t = _sym(u[:, 2:4]) * 2 * translate  # (B, 2); a shift of 1 image = 2 units
    cos, sin = th.cos() / s, th.sin() / s
    theta = torch.stack([torch.stack([cos, -sin, t[:, 0]], -1), torch.stack([sin, cos, t[:, 1]], -1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def color_jitter(x, u, strength=0.0):
    """Brightness x*b, contrast (x - m)*c + m (m: image mean), saturation (x - g)*s + g (g: grey
    level of each pixel), with b, c, s ~ U(1 - strength, 1 + strength) per image; x float in [0, 1].
    u (B, 3): b, c, s."""
    f = (1 + strength * _sym(u))[:, :, None, None, None]  # (B, 3, 1, 1, 1)
    x = x * f[:, 0]
    m = x.mean((1, 2, 3), keepdim=True)
    x = (x - m) * f[:, 1] + m
    grey = x.mean(1, keepdim=True)
    x = (x - grey) * f[:, 2] + grey
    return x.clamp(0, 1)


def random_erase(x, u, p=0.0, area=(0.02, 0.25), max_aspect=3.0):
    """With probability p per image, set one rectangle to 0 (after normalisation: the mean colour).
    Its area is U(area) of the image, its aspect ratio log-uniform in [1/max_aspect, max_aspect].
    u (B, 5): area, aspect, top, left, whether to erase."""
    B, _, H, W = x.shape
    a = (area[0] + (area[1] - area[0]) * u[:, 0]) * H * W
    r = torch.exp(_sym(u[:, 1]) * math.log(max_aspect))
    h, w = (a * r).sqrt().clamp(max=H), (a / r).sqrt().clamp(max=W)
    y0, x0, hit = u[:, 2] * (H - h), u[:, 3] * (W - w), u[:, 4] < p
    ys, xs = torch.arange(H, device=x.device), torch.arange(W, device=x.device)
    rows = (ys >= y0[:, None]) & (ys < (y0 + h)[:, None])  # (B, H)
    cols = (xs >= x0[:, None]) & (xs < (x0 + w)[:, None])  # (B, W)
    box = rows[:, :, None] & cols[:, None, :] & hit[:, None, None]  # (B, H, W)
    return x.masked_fill(box[:, None], 0.0)


def paste_box(x, other, lam):
    """CutMix: copy a box of `other` into x, area (1 - lam) of the image, centre uniform, clipped at
    the borders (the same box for the whole batch). Returns (mixed, lam of the area actually kept)."""
    H, W = x.shape[-2:]
    h, w = round(H * math.sqrt(1 - lam)), round(W * math.sqrt(1 - lam))
    cy, cx = (int(torch.randint(0, n, ())) for n in (H, W))
    y0, y1, x0, x1 = max(cy - h // 2, 0), min(cy + (h + 1) // 2, H), max(cx - w // 2, 0), min(cx + (w + 1) // 2, W)
    x = x.clone()
    x[..., y0:y1, x0:x1] = other[..., y0:y1, x0:x1]
    return x, 1 - (y1 - y0) * (x1 - x0) / (H * W)


def epoch_order(n, seed, epoch):
    """The shuffled order of epoch `epoch`: the same on every rank and after a resume."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


class GPULoader:
    """Batches from uint8 tensors that already sit on the device: shuffled each epoch when
    training, augmented in batched ops, normalised to float. No worker processes.
    With world > 1 each global batch is split between ranks (this rank takes rows rank::world).
    Augmentation (training only), in order: crop + flip (pad, flip), random_affine (rotate, zoom,
    translate), color_jitter (jitter), normalise, random_erase (erase = its probability)."""

    def __init__(self, x, y, batch_size, mean, std, train, pad=4, flip=True, seed=0, rank=0, world=1,
                 rotate=0.0, zoom=0.0, translate=0.0, jitter=0.0, erase=0.0, compile=False):
        self.x, self.y, self.bs, self.train, self.pad, self.flip = x, y, batch_size, train, pad, flip
        self.affine, self.jitter, self.erase = (rotate, zoom, translate), jitter, erase
        self.mean, self.std = mean.to(y.device), std.to(y.device)
        self.seed, self.rank, self.world, self.epoch = seed, rank, world, 0
        # compiled, the pipeline's many small kernels become a few fused ones (on a GPU they were launch-bound)
        self.transform = torch.compile(self.augment, dynamic=False) if compile else self.augment

    def __len__(self):
        return len(self.y) // self.bs if self.train else -(-len(self.y) // self.bs)

    def batches(self):
        """Index lists (CPU) of this rank's share of every batch of the current epoch."""
        n = len(self.y)
        order = epoch_order(n, self.seed, self.epoch) if self.train else torch.arange(n)
        return [order[i * self.bs:(i + 1) * self.bs][self.rank::self.world] for i in range(len(self))]

    def generator(self, device):
        """One random stream per (seed, epoch, rank) for the augmentation of the whole epoch."""
        return torch.Generator(device=device).manual_seed(self.seed * 100_003 + self.epoch * 1009 + self.rank)

    def augment(self, xb, u=None):
        """uint8 (B, C, H, W) -> normalised float (B, C, H, W); when training, augmented with the
        (B, sum(DRAWS.values())) uniform draws u, one column block per transform."""
        if not self.train:
            return normalize(xb, self.mean, self.std)
        u_crop, u_affine, u_jitter, u_erase = u.split(list(DRAWS.values()), dim=1)
        xb = random_crop_flip(xb, self.pad, u_crop, self.flip)
        x = xb.float() / 255
        if any(self.affine):
            x = random_affine(x, u_affine, *self.affine)
        if self.jitter:
            x = color_jitter(x, u_jitter, self.jitter)
        x = standardize(x, self.mean, self.std)
        return random_erase(x, u_erase, self.erase) if self.erase else x

    def draws(self, n, g):
        """The random draws of one batch of n images (None for evaluation: nothing is random)."""
        return uniforms(n, sum(DRAWS.values()), g, g.device) if self.train else None

    def __iter__(self):
        dev = self.x.device
        g, bs = self.generator(dev), self.batches()
        idxs = torch.cat(bs).to(dev).split([len(b) for b in bs])  # one copy per epoch, no sync per step
        for idx in idxs:
            yield self.transform(self.x[idx], self.draws(len(idx), g)), self.y[idx]


class Files(torch.utils.data.Dataset):
    """Image files decoded on demand: (3, size, size) uint8 and the label."""

    def __init__(self, paths, labels, size):
        self.paths, self.labels, self.size = paths, labels, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return torch.from_numpy(decode(self.paths[i], self.size)), self.labels[i]


class StreamLoader(GPULoader):
    """The batches of GPULoader, but decoded from the files by `workers` processes every epoch and moved
    to the device batch by batch: for image folders too large for memory."""

    def __init__(self, files, device, workers, batch_size, mean, std, train, **kw):
        self.files, self.device, self.workers = files, device, workers
        super().__init__(None, torch.tensor(files.labels), batch_size, mean, std, train, **kw)  # no images held
        self.mean, self.std = mean.to(device), std.to(device)

    def __iter__(self):
        dl = torch.utils.data.DataLoader(self.files, batch_sampler=[b.tolist() for b in self.batches()],
                                         num_workers=self.workers, pin_memory=self.device != "cpu")
        g = self.generator(self.device)
        try:
            for xb, yb in dl:
                xb = xb.to(self.device, non_blocking=True)
                yield self.transform(xb, self.draws(len(xb), g)), yb.to(self.device, non_blocking=True)
        except DataError as e:  # re-raised from a worker with its traceback: keep the worker's own line
            raise DataError(str(e).strip().splitlines()[-1].removeprefix("data.DataError: ")) from None


def channel_stats(x):
    """Per-channel mean and std of uint8 images (n, 3, H, W) on the [0, 1] scale (std at least 1/255)."""
    f = x.float() / 255
    return f.mean((0, 2, 3)), f.std((0, 2, 3)).clamp_min(1 / 255)


def loaders(cfg, device, rank=0, world=1):
    """The loaders of a run, from its config (train.py's keys): (train, evaluate, test, classes, mean, std).
    `evaluate` is what training evaluates on: the validation split when cfg.val_split > 0 (a fixed
    random subset of the training images, the same for every seed), else the test set; `test` is the
    test set, evaluated once at the end when there is a validation split, else None."""
    aug = dict(seed=cfg.seed, rank=rank, world=world, pad=cfg.crop_pad, flip=cfg.hflip, rotate=cfg.rotate,
               zoom=cfg.zoom, translate=cfg.translate, jitter=cfg.jitter, erase=cfg.erase,
               compile=cfg.compile and str(device).startswith("cuda"))
    if cfg.stream:
        if cfg.dataset != "folder":
            raise DataError("--stream true reads image files: use it with --dataset folder")
        classes, files = folder_files(cfg.data_dir)
        tr, te = (Files(*files[s], cfg.image_size) for s in ("train", "test"))
        sample = torch.stack([tr[i][0] for i in range(0, len(tr), max(1, len(tr) // 512))])
        mean, std = channel_stats(sample)
        return (StreamLoader(tr, device, cfg.workers, cfg.batch_size, mean, std, True, **aug),
                StreamLoader(te, device, cfg.workers, 500, mean, std, False), None, classes, mean, std)
    d = load(cfg.dataset, cfg.data_dir, cfg.image_size, cfg.seed, cfg.n_train, cfg.n_test)
    x_tr, y_tr, x_te, y_te = d["x_train"], d["y_train"], d["x_test"], d["y_test"]
    if x_tr.shape[-1] != cfg.image_size:
        raise DataError(f"{cfg.dataset} images are {x_tr.shape[-1]}px but --image_size is {cfg.image_size}; "
                        f"pass --image_size {x_tr.shape[-1]}")
    if cfg.val_split >= len(x_tr):
        raise DataError(f"--val_split {cfg.val_split} leaves no training images (there are {len(x_tr)}); lower it")
    if cfg.batch_size > len(x_tr) - cfg.val_split:
        raise DataError(f"--batch_size {cfg.batch_size} is larger than the training set "
                        f"({len(x_tr) - cfg.val_split} images); lower it")
    test = None
    if cfg.val_split:
        perm = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(0))  # files are often sorted by class
        test = (x_te, y_te)
        x_tr, y_tr, x_te, y_te = x_tr[perm[:-cfg.val_split]], y_tr[perm[:-cfg.val_split]], x_tr[perm[-cfg.val_split:]], y_tr[perm[-cfg.val_split:]]
    mean, std = channel_stats(x_tr[:10000])
    x_tr, y_tr, x_te, y_te = (t.to(device) for t in (x_tr, y_tr, x_te, y_te))
    if test is not None:
        test = GPULoader(test[0].to(device), test[1].to(device), 1000, mean, std, False)
    return (GPULoader(x_tr, y_tr, cfg.batch_size, mean, std, True, **aug),
            GPULoader(x_te, y_te, 1000, mean, std, False), test, d["classes"], mean, std)

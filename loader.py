"""
Batches on the device: images held there as uint8 (or decoded from files by worker processes),
shuffled per epoch, augmented in batched ops that compile into a few fused kernels, normalised.

    loaders(cfg, device) -> (train, evaluate, test, classes, mean, std), from train.py's config

Augmentation is one named recipe of RECIPES (training only), applied in this order:
random_crop_flip, random_policy (one of 13 ops per image), random_affine (rotation, zoom, shift),
color_jitter, normalisation, random_erase; then mix_pairs mixes pairs of images and their labels
(mixup, CutMix). Evaluation averages the logits over the views of EVAL_VIEWS.
"""
import math

import torch
import torch.nn.functional as F

import data

# The augmentation recipes: what each name turns on (anything left out is off).
RECIPES = {
    "none": {},
    "basic": dict(pad=4, flip=True),  # random crop (zero padding 4) and horizontal flip
    "light": dict(pad=4, flip=True, mixup=0.2),  # config/cifar.py
    "strong": dict(pad=4, flip=True, rotate=15.0, zoom=0.15, jitter=0.3, erase=0.25,
                   mixup=0.8, cutmix=1.0),  # config/cifar_long.py: for hundreds of epochs
    "policy": dict(pad=4, flip=True, rotate=15.0, zoom=0.15, jitter=0.3, erase=0.25,
                   mixup=0.8, cutmix=1.0, policy=True),  # strong + random_policy: cifar_10min.py
}
# The views whose logits evaluation averages: the image; and its mirror; and each of the two
# moved 2 pixels down, up, right and left (10 views).
EVAL_VIEWS = ("image", "flip", "flip_move")


def normalize(x_uint8, mean, std):
    """uint8 (B, 3, H, W) -> float (x / 255 - mean) / std."""
    return standardize(x_uint8.float() / 255, mean, std)


def standardize(x, mean, std):
    """Float images on the [0, 1] scale (B, 3, H, W) -> (x - mean) / std, per channel."""
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


# Every augmentation below is a deterministic function of the images and a (B, k) tensor u of
# U(0, 1) draws, k = DRAWS[name]. The loader draws all of a batch's randomness in one call and
# can then compile the whole pipeline into a few fused kernels (a generator cannot be compiled).
# The policy's come last and only when it is on, so that runs without it keep their draws.
DRAWS = {"crop_flip": 3, "affine": 4, "jitter": 3, "erase": 5, "policy": 2}


def _to_symmetric(u):
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
        b = torch.arange(B, device=dev)[:, None, None, None]
        c = torch.arange(C, device=dev)[None, :, None, None]
        x = xp[b, c, iy[:, None, :, None], ix[:, None, None, :]]  # (B, C, H, W)
    if not flip:
        return x
    return torch.where((u[:, 2] < 0.5)[:, None, None, None], x.flip(-1), x)


def _resample(x, theta):
    """x (B, C, H, W) resampled bilinearly at the affine maps theta (B, 2, 3): output point p
    (in [-1, 1] coordinates) takes the input at theta [p; 1]; borders reflect."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def random_affine(x, u, rotate=0.0, zoom=0.0, translate=0.0):
    """Per-image rotation by U(-rotate, rotate) degrees, zoom by U(1 - zoom, 1 + zoom) and shift
    by U(-translate, translate) of the image size, in one bilinear resample of a float (B, C, H,
    W) batch; borders reflect. Output point p (in [-1, 1] coordinates) samples input
    R(theta) p / s + t. u (B, 4): angle, zoom, shift x, shift y."""
    th = _to_symmetric(u[:, 0]) * math.radians(rotate)
    s = 1 + _to_symmetric(u[:, 1]) * zoom
    t = _to_symmetric(u[:, 2:4]) * 2 * translate  # (B, 2); a shift of 1 image = 2 units
    cos, sin = th.cos() / s, th.sin() / s
    theta = [torch.stack([cos, -sin, t[:, 0]], -1), torch.stack([sin, cos, t[:, 1]], -1)]
    return _resample(x, torch.stack(theta, 1))  # theta: (B, 2, 3)


def color_jitter(x, u, strength=0.0):
    """Brightness x*b, contrast (x - m)*c + m (m: image mean), saturation (x - g)*s + g (g: the grey
    level of each pixel), with b, c, s ~ U(1 - strength, 1 + strength) per image; x float in [0, 1].
    u (B, 3): b, c, s."""
    f = (1 + strength * _to_symmetric(u))[:, :, None, None, None]  # (B, 3, 1, 1, 1)
    x = x * f[:, 0]
    m = x.mean((1, 2, 3), keepdim=True)
    x = (x - m) * f[:, 1] + m
    grey = x.mean(1, keepdim=True)
    x = (x - grey) * f[:, 2] + grey
    return x.clamp(0, 1)


POLICY = ("identity", "brightness", "contrast", "saturation", "sharpness", "posterize", "solarize",
          "autocontrast", "rotate", "shear_x", "shear_y", "shift_x", "shift_y")


def random_policy(x, u):
    """TrivialAugment-style: one op of POLICY per image, chosen uniformly, at a magnitude
    m ~ U(-1, 1). Colour ops on x float (B, C, H, W) in [0, 1]: brightness x f, contrast
    (x - mean) f + mean, saturation (x - grey) f + grey, sharpness blur + f (x - blur) (blur: 3x3
    mean), all with f = 1 + 0.9 m; posterize to 8 - round(4 |m|) bits; solarize 1 - x where
    x > 1 - |m|; autocontrast (x - min) / (max - min) per channel. Geometric ops, one bilinear
    resample with reflected borders: rotation by 30 m degrees, shear by 0.3 m, shift by 0.3 m of
    the image. u (B, 2): the op, the magnitude."""
    op, m = (u[:, 0] * len(POLICY)).long().clamp(max=len(POLICY) - 1), _to_symmetric(u[:, 1])
    on = {name: op == i for i, name in enumerate(POLICY)}  # (B,) bool each
    a = m * math.radians(30) * on["rotate"]
    sx, sy = 0.3 * m * on["shear_x"], 0.3 * m * on["shear_y"]
    tx, ty = 0.6 * m * on["shift_x"], 0.6 * m * on["shift_y"]  # a shift of 1 image = 2 units
    theta = [torch.stack([a.cos(), sx - a.sin(), tx], -1),
             torch.stack([a.sin() + sy, a.cos(), ty], -1)]
    x = _resample(x, torch.stack(theta, 1))  # theta: (B, 2, 3)
    f, am = (1 + 0.9 * m)[:, None, None, None], m.abs()[:, None, None, None]
    mean, grey = x.mean((1, 2, 3), keepdim=True), x.mean(1, keepdim=True)
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
    step = 2 ** (4 * am).round() / 255  # posterize: keep 8 - round(4 |m|) bits of the 8-bit value
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    ops = {"brightness": x * f, "contrast": (x - mean) * f + mean,
           "saturation": (x - grey) * f + grey, "sharpness": blur + f * (x - blur),
           "posterize": torch.floor(x / step + 1e-4) * step,
           "solarize": torch.where(x > 1 - am, 1 - x, x),
           "autocontrast": (x - lo) / (hi - lo).clamp_min(1 / 255)}
    for name, y in ops.items():
        x = torch.where(on[name][:, None, None, None], y, x)
    return x.clamp(0, 1)


def random_erase(x, u, p=0.0, area=(0.02, 0.25), max_aspect=3.0):
    """With probability p per image, set one rectangle to 0 (after normalisation: the mean colour).
    Its area is U(area) of the image, its aspect ratio log-uniform in [1/max_aspect, max_aspect].
    u (B, 5): area, aspect, top, left, whether to erase."""
    B, _, H, W = x.shape
    a = (area[0] + (area[1] - area[0]) * u[:, 0]) * H * W
    r = torch.exp(_to_symmetric(u[:, 1]) * math.log(max_aspect))
    h, w = (a * r).sqrt().clamp(max=H), (a / r).sqrt().clamp(max=W)
    y0, x0, hit = u[:, 2] * (H - h), u[:, 3] * (W - w), u[:, 4] < p
    ys, xs = torch.arange(H, device=x.device), torch.arange(W, device=x.device)
    rows = (ys >= y0[:, None]) & (ys < (y0 + h)[:, None])  # (B, H)
    cols = (xs >= x0[:, None]) & (xs < (x0 + w)[:, None])  # (B, W)
    box = rows[:, :, None] & cols[:, None, :] & hit[:, None, None]  # (B, H, W)
    return x.masked_fill(box[:, None], 0.0)


def paste_box(x, other, lam):
    """CutMix: copy a box of `other` into x, area (1 - lam) of the image, centre uniform, clipped
    at the borders (the same box for the whole batch). Returns (mixed, lam of the area kept)."""
    H, W = x.shape[-2:]
    h, w = round(H * math.sqrt(1 - lam)), round(W * math.sqrt(1 - lam))
    cy, cx = (int(torch.randint(0, n, ())) for n in (H, W))
    y0, y1 = max(cy - h // 2, 0), min(cy + (h + 1) // 2, H)
    x0, x1 = max(cx - w // 2, 0), min(cx + (w + 1) // 2, W)
    x = x.clone()
    x[..., y0:y1, x0:x1] = other[..., y0:y1, x0:x1]
    return x, 1 - (y1 - y0) * (x1 - x0) / (H * W)


def mix_pairs(x, y, n_classes, mixup=0.0, cutmix=0.0):
    """(images, targets) of a training batch. With mixup or cutmix > 0 each image is mixed with its
    partner x[perm], lam ~ Beta(alpha, alpha) a batch: mixup lam x + (1 - lam) x[perm], cutmix
    paste_box (both > 0: one of the two a batch), and the target is lam onehot(y) + (1 - lam)
    onehot(y[perm]). Cross-entropy is linear in its target, so the loss against it is
    lam CE(y) + (1 - lam) CE(y[perm]): one loss, inside the compiled model."""
    if not (mixup or cutmix):
        return x, y
    use_cutmix = cutmix > 0 and (mixup == 0 or torch.rand(()) < 0.5)
    alpha = cutmix if use_cutmix else mixup
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(len(x), device=x.device)
    if use_cutmix:
        x, lam = paste_box(x, x[perm], lam)  # lam: the area kept, after clipping
    else:
        x = lam * x + (1 - lam) * x[perm]
    onehot = F.one_hot(y, n_classes).float()  # (B, classes)
    return x, lam * onehot + (1 - lam) * onehot[perm]


def eval_views(x, views="image", move=2):
    """The views of a batch (B, C, H, W) named by `views` (EVAL_VIEWS); a moved view takes zeros
    (after normalisation, the mean colour) in from the edge it leaves."""
    out = [x]
    if views == "flip_move":
        H, W = x.shape[-2:]
        xp = F.pad(x, (move,) * 4)  # (B, C, H + 2 move, W + 2 move)
        out += [xp[..., move - dy:move - dy + H, move - dx:move - dx + W].contiguous()
                for dy, dx in ((move, 0), (-move, 0), (0, move), (0, -move))]
    return out if views == "image" else out + [v.flip(-1) for v in out]


def epoch_order(n, seed, epoch):
    """The shuffled order of epoch `epoch`: the same on every rank and after a resume."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


class Files(torch.utils.data.Dataset):
    """Image files decoded on demand, each (3, size, size) uint8."""

    def __init__(self, paths, size):
        self.paths, self.size = paths, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return torch.from_numpy(data.decode(self.paths[i], self.size))


class Loader:
    """Batches of images x with labels y (on the device): shuffled each epoch when training,
    augmented by a recipe of RECIPES (augment), normalised to float. x is a uint8 tensor (n, 3, H,
    W) on the device, so that an epoch is a few indexing ops; or Files, decoded every epoch by
    `workers` processes and moved to the device batch by batch (folders too large for memory).
    With world > 1 each global batch is split between ranks (this rank takes rows rank::world)."""

    def __init__(self, x, y, batch_size, mean, std, train, recipe="none", seed=0, rank=0, world=1,
                 workers=0, compile=False):
        self.x, self.y, self.bs, self.train, self.workers = x, y, batch_size, train, workers
        self.aug = {**dict(pad=0, flip=False, rotate=0.0, zoom=0.0, jitter=0.0, erase=0.0,
                           policy=False, mixup=0.0, cutmix=0.0), **RECIPES[recipe]}
        self.mixup, self.cutmix = self.aug["mixup"], self.aug["cutmix"]  # for mix_pairs
        self.draws = [n for k, n in DRAWS.items() if self.aug["policy"] or k != "policy"]
        self.mean, self.std = mean.to(y.device), std.to(y.device)
        self.seed, self.rank, self.world, self.epoch = seed, rank, world, 0
        self.start = 0  # batches of this epoch to skip: a run stopped mid-epoch resumes there
        if train and len(y) < batch_size:
            raise data.DataError(f"--batch_size {batch_size} is larger than the training set "
                                 f"({len(y)} images); lower it")
        # compiled, the pipeline's many small kernels become a few (eager, a GPU waits on launches)
        self.transform = torch.compile(self.augment, dynamic=False) if compile else self.augment

    def __len__(self):
        return len(self.y) // self.bs if self.train else -(-len(self.y) // self.bs)

    def augment(self, xb, u=None):
        """uint8 (B, C, H, W) -> normalised float (B, C, H, W); when training, augmented in the
        module's order with the (B, sum(self.draws)) uniform draws u."""
        if not self.train:
            return normalize(xb, self.mean, self.std)
        a = self.aug
        u_crop, u_affine, u_jitter, u_erase, *u_policy = u.split(self.draws, dim=1)
        x = random_crop_flip(xb, a["pad"], u_crop, a["flip"]).float() / 255
        if a["policy"]:
            x = random_policy(x, u_policy[0])
        if a["rotate"] or a["zoom"]:
            x = random_affine(x, u_affine, a["rotate"], a["zoom"])
        if a["jitter"]:
            x = color_jitter(x, u_jitter, a["jitter"])
        x = standardize(x, self.mean, self.std)
        return random_erase(x, u_erase, a["erase"]) if a["erase"] else x

    def __iter__(self):
        dev, n, k = self.y.device, len(self.y), sum(self.draws)
        order = epoch_order(n, self.seed, self.epoch) if self.train else torch.arange(n)
        idxs = [order[i * self.bs:(i + 1) * self.bs][self.rank::self.world]  # this rank's share
                for i in range(len(self))]
        gen = torch.Generator(device=dev)  # the epoch's augmentation draws
        gen.manual_seed(self.seed * 100_003 + self.epoch * 1009 + self.rank)
        draws = [torch.rand(len(i), k, generator=gen, device=dev) if self.train else None
                 for i in idxs]
        idxs, draws = idxs[self.start:], draws[self.start:]  # the skipped batches' draws are made
        if not idxs:  # stopped after the epoch's last batch: nothing of it is left
            return
        if isinstance(self.x, Files):
            batches = torch.utils.data.DataLoader(self.x, batch_sampler=[i.tolist() for i in idxs],
                                                  num_workers=self.workers,
                                                  pin_memory=dev.type == "cuda")
            xs = (xb.to(dev, non_blocking=True) for xb in batches)
        else:
            idxs = torch.cat(idxs).to(dev).split([len(i) for i in idxs])  # one copy, no sync a step
            xs = (self.x[i] for i in idxs)
        for xb, idx, u in zip(xs, idxs, draws):
            yield self.transform(xb, u), self.y[idx]


def corrupted(batches, kind, seed):
    """A test Loader's images under one of data.CORRUPTIONS, as a Loader of their own."""
    x = data.corrupt(batches.x, kind, seed)
    return Loader(x, batches.y, batches.bs, batches.mean, batches.std, False)


def channel_stats(x):
    """Per-channel mean and std of uint8 images (n, 3, H, W) on the [0, 1] scale (std >= 1/255)."""
    f = x.float() / 255
    return f.mean((0, 2, 3)), f.std((0, 2, 3)).clamp_min(1 / 255)


def loaders(cfg, device, rank=0, world=1):
    """The loaders of a run, from its config (train.py's keys): (train, evaluate, test, classes,
    mean, std). `evaluate` is what training evaluates on: the validation split when cfg.val_split
    > 0 (a fixed random subset of the training images, the same for every seed), else the test
    set; `test` is the test set, evaluated once at the end when there is a validation split."""
    aug = dict(recipe=cfg.augment, seed=cfg.seed, rank=rank, world=world,
               compile=cfg.compile != "none" and str(device).startswith("cuda"))
    if cfg.stream:
        classes, files = data.folder_files(cfg.data_dir)
        tr, te = (Files(files[s][0], cfg.image_size) for s in ("train", "test"))
        y_tr, y_te = (torch.tensor(files[s][1], device=device) for s in ("train", "test"))
        sample = torch.stack([tr[i] for i in range(0, len(tr), max(1, len(tr) // 512))])
        mean, std = channel_stats(sample)
        return (Loader(tr, y_tr, cfg.batch_size, mean, std, True, workers=cfg.workers, **aug),
                Loader(te, y_te, 500, mean, std, False, workers=cfg.workers), None, classes,
                mean, std)
    d = data.load(cfg.dataset, cfg.data_dir, cfg.image_size, cfg.n_train, cfg.n_test)
    x_tr, y_tr, x_te, y_te = d["x_train"], d["y_train"], d["x_test"], d["y_test"]
    if x_tr.shape[-1] != cfg.image_size:
        raise data.DataError(f"{cfg.dataset} images are {x_tr.shape[-1]}px but --image_size is "
                             f"{cfg.image_size}; pass --image_size {x_tr.shape[-1]}")
    if cfg.val_split >= len(x_tr):
        raise data.DataError(f"--val_split {cfg.val_split} leaves no training images (there are "
                             f"{len(x_tr)}); lower it")
    test = None
    if cfg.val_split:  # files are often sorted by class: a random subset
        perm = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(0))
        keep, held = perm[:-cfg.val_split], perm[-cfg.val_split:]
        test = x_te, y_te
        x_tr, y_tr, x_te, y_te = x_tr[keep], y_tr[keep], x_tr[held], y_tr[held]
    mean, std = channel_stats(x_tr[:10000])
    x_tr, y_tr, x_te, y_te = (t.to(device) for t in (x_tr, y_tr, x_te, y_te))
    if test is not None:
        test = Loader(test[0].to(device), test[1].to(device), 1000, mean, std, False)
    return (Loader(x_tr, y_tr, cfg.batch_size, mean, std, True, **aug),
            Loader(x_te, y_te, 1000, mean, std, False), test, d["classes"], mean, std)

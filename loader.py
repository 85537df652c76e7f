"""Batches on the device, shuffled each epoch; training batches augmented by a recipe of RECIPES."""
import math

import torch
import torch.nn.functional as F

import data

OFF = dict(pad=0, flip=False, rotate=0.0, zoom=0.0, jitter=0.0, erase=0.0, policy=False, mixup=0.0,
           cutmix=0.0)
STRONG = dict(pad=4, flip=True, rotate=15.0, zoom=0.15, jitter=0.3, erase=0.25, mixup=0.8,
              cutmix=1.0)
RECIPES = {  # what each recipe turns on over OFF; the config file that uses it
    "none": {}, "basic": dict(pad=4, flip=True),  # a crop of 4 px of zero padding, a mirror
    "light": dict(pad=4, flip=True, mixup=0.2),  # config/cifar.py
    "strong": STRONG,  # config/cifar_long.py
    "policy": dict(STRONG, policy=True)}  # config/cifar_10min.py
EVAL_VIEWS = ("image", "flip", "flip_move")  # eval_views
# Each augmentation reads u (B, DRAWS[name]) of U(0, 1): a batch's are drawn at once, in this order
# (so the pipeline compiles), the policy's only if on.
DRAWS = {"crop_flip": 3, "affine": 4, "jitter": 3, "erase": 5, "policy": 2}


def normalize(x, mean, std):
    """(x - mean) / std per channel of images (B, 3, H, W) on the [0, 1] scale; uint8 x / 255."""
    x = x.float() / 255 if x.dtype == torch.uint8 else x
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def random_crop_flip(x, pad, u, flip=True):
    """Per image of x (B, C, H, W), the crop at offsets dy, dx = floor((2 pad + 1) u) of x padded
    by `pad` zeros, mirrored if flip and u < 0.5. u (B, 3): dy, dx, flip."""
    B, C, H, W = x.shape
    if pad:
        windows = F.pad(x, (pad,) * 4).unfold(2, H, 1).unfold(3, W, 1)  # (B, C, dy, dx, H, W)
        dy, dx = ((u[:, i] * (2 * pad + 1)).long().clamp(max=2 * pad) for i in range(2))
        x = windows[torch.arange(B, device=x.device), :, dy, dx]  # (B, C, H, W)
    return torch.where((u[:, 2] < 0.5)[:, None, None, None], x.flip(-1), x) if flip else x


def _resample(x, *theta):
    """x (B, C, H, W) at theta [p; 1] for each output point p in [-1, 1]^2, bilinear, borders
    reflect; theta (B, 2, 3) given as its six entries (B,) row by row."""
    theta = torch.stack(theta, -1).view(-1, 2, 3)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def random_affine(x, u, rotate=0.0, zoom=0.0):
    """Rotation and zoom of each image of x float (B, C, H, W): output p takes input R(a) p / s
    (_resample), a = rotate (2 u - 1) degrees, s = 1 + zoom (2 u - 1). u (B, 4): a, s (2 unused)."""
    th = (2 * u[:, 0] - 1) * math.radians(rotate)
    s = 1 + (2 * u[:, 1] - 1) * zoom
    cos, sin, t = th.cos() / s, th.sin() / s, torch.zeros_like(s)
    return _resample(x, cos, -sin, t, sin, cos, t)


def color_jitter(x, u, strength=0.0):
    """Brightness x b, contrast (x - m) c + m (m: image mean), saturation (x - g) s + g (g: pixel
    grey), b, c, s = 1 + strength (2 u - 1) per image; x float in [0, 1]. u (B, 3): b, c, s."""
    f = (1 + strength * (2 * u - 1))[:, :, None, None, None]  # (B, 3, 1, 1, 1)
    x = x * f[:, 0]
    m = x.mean((1, 2, 3), keepdim=True)
    x = (x - m) * f[:, 1] + m
    grey = x.mean(1, keepdim=True)
    return ((x - grey) * f[:, 2] + grey).clamp(0, 1)


POLICY = ("identity", "brightness", "contrast", "saturation", "sharpness", "posterize", "solarize",
          "autocontrast", "rotate", "shear_x", "shear_y", "shift_x", "shift_y")


def random_policy(x, u):
    """TrivialAugment-style: one op of POLICY per image, chosen uniformly, at a magnitude
    m = 2 u - 1. Colour ops on x float (B, C, H, W) in [0, 1]: brightness x f, contrast
    (x - mean) f + mean, saturation (x - grey) f + grey, sharpness blur + f (x - blur) (blur: 3x3
    mean), all with f = 1 + 0.9 m; posterize to 8 - round(4 |m|) bits; solarize 1 - x where
    x > 1 - |m|; autocontrast (x - min) / (max - min) per channel. Geometric ops (_resample):
    rotation by 30 m degrees, shear by 0.3 m, shift by 0.3 m of the image. u (B, 2): op, m."""
    op, m = (u[:, 0] * len(POLICY)).long().clamp(max=len(POLICY) - 1), 2 * u[:, 1] - 1
    on = {name: op == i for i, name in enumerate(POLICY)}  # (B,) bool each
    a = m * math.radians(30) * on["rotate"]
    sx, sy = 0.3 * m * on["shear_x"], 0.3 * m * on["shear_y"]
    tx, ty = 0.6 * m * on["shift_x"], 0.6 * m * on["shift_y"]  # a shift of 1 image = 2 units
    x = _resample(x, a.cos(), sx - a.sin(), tx, a.sin() + sy, a.cos(), ty)
    f, am = (1 + 0.9 * m)[:, None, None, None], m.abs()[:, None, None, None]
    mean, grey = x.mean((1, 2, 3), keepdim=True), x.mean(1, keepdim=True)
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
    step = 2 ** (4 * am).round() / 255
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
    """With probability p per image, a rectangle set to 0 (normalised: the mean colour), of area
    U(area) of the image, aspect log-uniform in [1/max_aspect, max_aspect], placed uniformly.
    u (B, 5): area, aspect, top, left, whether."""
    B, _, H, W = x.shape
    a = (area[0] + (area[1] - area[0]) * u[:, 0]) * H * W
    r = torch.exp((2 * u[:, 1] - 1) * math.log(max_aspect))
    h, w = (a * r).sqrt().clamp(max=H), (a / r).sqrt().clamp(max=W)
    y0, x0, hit = u[:, 2] * (H - h), u[:, 3] * (W - w), u[:, 4] < p
    ys, xs = torch.arange(H, device=x.device), torch.arange(W, device=x.device)
    rows = (ys >= y0[:, None]) & (ys < (y0 + h)[:, None])  # (B, H)
    cols = (xs >= x0[:, None]) & (xs < (x0 + w)[:, None])  # (B, W)
    box = rows[:, :, None] & cols[:, None, :] & hit[:, None, None]  # (B, H, W)
    return x.masked_fill(box[:, None], 0.0)


def paste_box(x, other, lam):
    """CutMix: (x with a box of `other` pasted, the area kept); the box's area is 1 - lam, centre
    uniform, clipped at the borders, the same for the whole batch."""
    H, W = x.shape[-2:]
    h, w = round(H * math.sqrt(1 - lam)), round(W * math.sqrt(1 - lam))
    cy, cx = (int(torch.randint(0, n, ())) for n in (H, W))
    y0, y1 = max(cy - h // 2, 0), min(cy + (h + 1) // 2, H)
    x0, x1 = max(cx - w // 2, 0), min(cx + (w + 1) // 2, W)
    x = x.clone()
    x[..., y0:y1, x0:x1] = other[..., y0:y1, x0:x1]
    return x, 1 - (y1 - y0) * (x1 - x0) / (H * W)


def mix_pairs(x, y, n_classes, mixup=0.0, cutmix=0.0):
    """(images, targets): each image mixed with x[perm], lam ~ Beta(alpha, alpha) a batch, by
    mixup lam x + (1 - lam) x[perm] or cutmix paste_box (a coin when both > 0); the target
    lam onehot(y) + (1 - lam) onehot(y[perm]) makes the loss lam CE(y) + (1 - lam) CE(y[perm])."""
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
    """[x] for "image"; + its mirror for "flip"; + x moved `move` px down, up, right and left
    (zeros, normalised the mean colour, come in) and their mirrors for "flip_move"."""
    out = [x]
    if views == "flip_move":
        H, W = x.shape[-2:]
        xp = F.pad(x, (move,) * 4)  # (B, C, H + 2 move, W + 2 move)
        out += [xp[..., move - dy:move - dy + H, move - dx:move - dx + W].contiguous()
                for dy, dx in ((move, 0), (-move, 0), (0, move), (0, -move))]
    return out if views == "image" else out + [v.flip(-1) for v in out]


class Loader:
    """Batches (x normalised, y) on y's device from uint8 x (n, 3, H, W) there or data.Files
    (decoded by `workers` processes); training: shuffled, augmented, this rank's rows rank::world
    of each batch from the batch `start` of the epoch on."""

    def __init__(self, x, y, batch_size, mean, std, train, recipe="none", seed=0, rank=0, world=1,
                 workers=0, compile=False):
        if train and (len(y) < batch_size or batch_size % world):
            split = f" and divisible by the {world} processes" * (world > 1)
            raise data.DataError(f"--batch_size {batch_size} must be at most the {len(y)} training "
                                 f"images{split}")
        self.x, self.y, self.bs, self.train, self.workers = x, y, batch_size, train, workers
        self.mean, self.std = mean.to(y.device), std.to(y.device)
        self.seed, self.rank, self.world = seed, rank, world
        self.aug, self.epoch, self.start = {**OFF, **RECIPES[recipe]}, 0, 0
        self.draws = [n for k, n in DRAWS.items() if self.aug["policy"] or k != "policy"]
        self.transform = torch.compile(self.augment, dynamic=False) if compile else self.augment

    def __len__(self):
        return len(self.y) // self.bs if self.train else -(-len(self.y) // self.bs)

    def mix(self, x, y, n_classes):
        """(images, targets): mix_pairs with this recipe's mixup and CutMix."""
        return mix_pairs(x, y, n_classes, self.aug["mixup"], self.aug["cutmix"])

    def augment(self, xb, u=None):
        """uint8 (B, C, H, W) -> normalised float; training: augmented in order with draws u."""
        a = self.aug
        if not self.train:
            return normalize(xb, self.mean, self.std)
        u_crop, u_affine, u_jitter, u_erase, *u_policy = u.split(self.draws, dim=1)
        x = random_crop_flip(xb, a["pad"], u_crop, a["flip"]).float() / 255
        if a["policy"]:
            x = random_policy(x, u_policy[0])
        if a["rotate"] or a["zoom"]:
            x = random_affine(x, u_affine, a["rotate"], a["zoom"])
        if a["jitter"]:
            x = color_jitter(x, u_jitter, a["jitter"])
        x = normalize(x, self.mean, self.std)
        return random_erase(x, u_erase, a["erase"]) if a["erase"] else x

    def __iter__(self):
        dev, n, files = self.y.device, len(self.y), isinstance(self.x, data.Files)
        shuffle = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)  # on every rank
        order = torch.randperm(n, generator=shuffle) if self.train else torch.arange(n)
        order = order if files else order.to(dev)  # one copy, no syncs
        idxs = [order[i * self.bs:][:self.bs][self.rank::self.world] for i in range(len(self))]
        gen = torch.Generator(dev).manual_seed(self.seed * 100_003 + self.epoch * 1009 + self.rank)
        draws = [torch.rand(len(i), sum(self.draws), generator=gen, device=dev)
                 if self.train else None for i in idxs][self.start:]  # all drawn, skipped or not
        idxs = idxs[self.start:]
        xs = torch.utils.data.DataLoader(
            self.x, batch_sampler=[i.tolist() for i in idxs], num_workers=self.workers,
            pin_memory=dev.type == "cuda") if files else (self.x[i] for i in idxs)
        for xb, idx, u in zip(xs, idxs, draws):
            yield self.transform(xb.to(dev, non_blocking=True), u), self.y[idx]


@torch.no_grad()
def evaluate(model, batches, ctx, views="image"):
    """(accuracy, mean loss) over batches, of the logits averaged over each image's views."""
    model.eval()
    correct, loss_sum, n = 0, 0.0, 0
    for x, y in batches:
        xs = eval_views(x, views)
        with ctx:  # each a copy: a CUDA-graph replay reuses its output buffers
            logits = sum(model(v)[0].float().clone() for v in xs) / len(xs)
        correct += (logits.argmax(-1) == y).sum()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        n += len(y)
    model.train()
    return (correct / n).item(), (loss_sum / n).item()


def corrupted(batches, kind, seed):
    """A test Loader's images under one of data.CORRUPTIONS, as a Loader of their own."""
    x = data.corrupt(batches.x, kind, seed)
    return Loader(x, batches.y, batches.bs, batches.mean, batches.std, False)


def channel_stats(x):
    """Per-channel mean and std (>= 1/255) of uint8 images (n, 3, H, W) on the [0, 1] scale."""
    f = x.float() / 255
    return f.mean((0, 2, 3)), f.std((0, 2, 3)).clamp_min(1 / 255)


def loaders(cfg, device, rank=0, world=1):
    """(train, evaluate, test, classes, mean, std) for train.py's cfg: evaluate is the test set and
    test None, or with cfg.val_split, evaluate that many training images (a fixed random subset)."""
    test = None
    if cfg.stream:  # no val split (train.py refuses one)
        classes, files = data.folder_files(cfg.data_dir)
        (x_tr, y_tr), (x_te, y_te) = ((data.Files(p, cfg.image_size), torch.tensor(y))
                                      for p, y in files.values())
        step = max(1, len(x_tr) // 512)  # the statistics of 512 images
        mean, std = channel_stats(torch.stack([x_tr[i] for i in range(0, len(x_tr), step)]))
    else:
        d = data.load(cfg.dataset, cfg.data_dir, cfg.image_size, cfg.n_train, cfg.n_test)
        x_tr, y_tr, x_te, y_te, _, classes = d.values()
        if x_tr.shape[-1] != cfg.image_size:
            raise data.DataError(f"{cfg.dataset} images are {x_tr.shape[-1]}px but --image_size "
                                 f"is {cfg.image_size}; pass --image_size {x_tr.shape[-1]}")
        if cfg.val_split >= len(x_tr):
            raise data.DataError(f"--val_split {cfg.val_split} leaves no training images (there "
                                 f"are {len(x_tr)}); lower it")
        if cfg.val_split:  # files are often sorted by class: a random subset
            perm = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(0))
            keep, held = perm[:-cfg.val_split], perm[-cfg.val_split:]
            test = x_te.to(device), y_te.to(device)
            x_tr, y_tr, x_te, y_te = x_tr[keep], y_tr[keep], x_tr[held], y_tr[held]
        mean, std = channel_stats(x_tr[:10000])
        x_tr, x_te = x_tr.to(device), x_te.to(device)
    bs = 500 if cfg.stream else 1000  # evaluation batches
    compile = cfg.compile != "none" and str(device).startswith("cuda")
    return (Loader(x_tr, y_tr.to(device), cfg.batch_size, mean, std, True, cfg.augment, cfg.seed,
                   rank, world, cfg.workers, compile),
            Loader(x_te, y_te.to(device), bs, mean, std, False, workers=cfg.workers),
            Loader(*test, bs, mean, std, False) if test else None, classes, mean, std)

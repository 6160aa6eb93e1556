"""Datasets by name, as uint8 images and integer labels.

synthetic      the embedded default (SPEC §3): ten shapes, generated from a seed in memory
               (``make_synthetic``); no files, no download.
cifar10/100    torchvision CIFAR10/CIFAR100 in ``root/cifar-10-batches-py``, ``root/cifar-100-python``.
stl10          torchvision STL10 in ``root/stl10_binary``; "ssl" is unlabeled + train (labels -1 / 0..9).
fashion_mnist  torchvision FashionMNIST in ``root/FashionMNIST/raw``, or the four idx ``.gz`` files as
               published in ``root``, ``root/fashion_mnist`` or ``root/fashion-mnist`` (Debian's
               dataset-fashion-mnist: ``data.root=/usr/share/datasets``). Gray replicated to 3 channels.
imagenet       torchvision ImageFolder on ``root/imagenet/train`` and ``root/imagenet/val`` (the
               validation images sorted into one folder per WordNet id, like train).
imagenet100    the same folders, keeping the 100 classes of Tian et al. (CMC) in ``imagenet100.txt``.

Splits: "ssl" (self-supervised training; labels may be -1), "train" (labelled training images:
kNN memory bank, linear probe), "test" (the official test/validation set). With
``data.val_split: true`` (BYOL-MHE App. B.1) a held-out part of the training set, chosen with a
fixed seed, is removed from "ssl"/"train" and returned as "test", so hyper-parameters are never
chosen on the test set: CIFAR-10 500 images per class, CIFAR-100 50 per class, ImageNet the last
10009 images (of a fixed-seed shuffle, standing in for the TFRecord order Grill et al. used);
our choice elsewhere: 10% of every class.

Every item is ``(uint8 tensor [3, H, W], int)`` (or ``(transform(image), int)``). Small datasets are
``TensorImages`` held in memory; ImageNet decodes files on access; ``common.loaders`` batches them.
Downloads happen only with ``data.download: true``; a missing dataset raises ``UserError`` saying where
we looked and how to fix it.
"""
import gzip
import math
import os
import tempfile

import torch
import torchvision
from torchvision.transforms.v2.functional import pil_to_tensor

from common.config import UserError

DATASETS = ("synthetic", "cifar10", "cifar100", "stl10", "imagenet", "imagenet100", "fashion_mnist")

# Per-dataset partial config, merged between the defaults and the user's file.
NO_BLUR = {"blur_p": [0.0, 0.0]}  # small images: no blur (CIFAR: BYOL-MHE §3.5, App. B.2)
PRESETS = {
    "synthetic": {"data": {"image_size": 32}, "augment": NO_BLUR},
    "cifar10": {"data": {"image_size": 32}, "augment": NO_BLUR},
    "cifar100": {"data": {"image_size": 32}, "augment": NO_BLUR},
    "stl10": {"data": {"image_size": 96}},
    "imagenet": {"data": {"image_size": 224}},
    "imagenet100": {"data": {"image_size": 224}},
    "fashion_mnist": {"data": {"image_size": 28}, "augment": NO_BLUR},
}
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_STATS = {  # per-channel (mean, std) of the training images, in [0, 1] units
    "synthetic": ((0.3879, 0.3967, 0.5171), (0.2500, 0.1017, 0.1634)),  # measured: 10k images, 32x32, seed 0
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "imagenet": _IMAGENET, "imagenet100": _IMAGENET,
    "fashion_mnist": ((0.2860,) * 3, (0.3530,) * 3),
}
_CLASSES = {"cifar10": 10, "cifar100": 100, "stl10": 10, "imagenet": 1000, "imagenet100": 100, "fashion_mnist": 10}
# held-out validation part (BYOL-MHE App. B.1), chosen with a fixed seed; 10% of every class elsewhere
VAL_HOLDOUT = {"cifar10": {"per_class": 500}, "cifar100": {"per_class": 50}, "imagenet": {"last": 10009}}
VAL_DEFAULT, VAL_SEED = {"per_class": 0.1}, 0


def stats(name):
    """Per-channel (mean, std) of dataset ``name`` in [0, 1] units."""
    _check_name(name)
    return _STATS[name]


def num_classes(data_cfg):
    return data_cfg["synthetic"]["classes"] if data_cfg["name"] == "synthetic" else _CLASSES[data_cfg["name"]]


def _check_name(name):
    if name not in DATASETS:
        raise UserError(f"data.name: unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


class TensorImages(torch.utils.data.Dataset):
    """Images uint8 [N, 3, H, W] and labels int64 [N] in memory; item -> (image, label)."""

    def __init__(self, images, labels, transform=None):
        assert images.dtype == torch.uint8 and images.ndim == 4 and images.shape[1] == 3, images.shape
        self.images, self.labels, self.transform = images, torch.as_tensor(labels, dtype=torch.int64), transform
        assert len(self.images) == len(self.labels)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = self.images[i]
        return (self.transform(x) if self.transform else x), int(self.labels[i])


# ---------------------------------------------------------------------------------------------- synthetic
def _r(u, v):
    return torch.sqrt(u * u + v * v)


def _box(u, v):
    return torch.maximum(u.abs(), v.abs())


def _triangle(u, v):  # equilateral, circumradius 1: inside three half-planes
    return torch.stack([v * math.cos(a) - u * math.sin(a) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]).amax(0) < 0.5


def _stripes(u, v):  # three parallel bars
    return (_box(u, v) < 0.85) & (torch.floor((u + 0.85) / 0.34).remainder(2) == 0)


# Shape masks in the shape's own frame (radius about 1); each is its own mirror image, so flips keep the class.
SHAPES = {
    "disc": lambda u, v: _r(u, v) < 1,
    "ring": lambda u, v: (_r(u, v) - 0.775).abs() < 0.225,
    "square": lambda u, v: _box(u, v) < 0.75,
    "frame": lambda u, v: (_box(u, v) - 0.6).abs() < 0.2,
    "triangle": _triangle,
    "plus": lambda u, v: ((u.abs() < 0.28) & (v.abs() < 0.95)) | ((v.abs() < 0.28) & (u.abs() < 0.95)),
    "stripes": _stripes,
    "star": lambda u, v: _r(u, v) < 0.6 + 0.4 * torch.cos(5 * torch.atan2(v, u)),
    "dots": lambda u, v: (u.abs() - 0.5) ** 2 + (v.abs() - 0.5) ** 2 < 0.33 ** 2,
    "ellipse": lambda u, v: u ** 2 + (v / 0.45) ** 2 < 1,
    "half_disc": lambda u, v: (_r(u, v) < 1) & (v > -0.2),
    "bullseye": lambda u, v: (_r(u, v) < 0.35) | ((_r(u, v) - 0.85).abs() < 0.15),
}
# Canonical foreground / background colours. Each image is recoloured by a colour-jitter-like map
# at half the augmentation's strengths (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1):
# with the full range a short BYOL run learned each image's colour (which its two views share)
# instead of its shape, and kNN fell below the random encoder's (27% -> 16%; half range: 31% -> 50%).
FG, BG = (0.85, 0.55, 0.25), (0.25, 0.35, 0.60)
COLOUR = (0.2, 0.2, 0.1, 0.05)
SCALE, OFFSET, NOISE = (0.5, 0.9), 0.8, 0.03  # shape radius / half the image width, room to move, pixel noise


def _hue_matrix(h):
    """[N, 3, 3] RGB maps turning the hue by fractions ``h`` of a turn (rotation about gray in YIQ)."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    c, s = torch.cos(2 * math.pi * h), torch.sin(2 * math.pi * h)
    rot = torch.zeros(len(h), 3, 3)
    rot[:, 0, 0], rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = 1, c, -s, s, c
    return torch.linalg.inv(to_yiq) @ rot @ to_yiq


def make_synthetic(n, size, classes, seed):
    """``n`` images uint8 [n, 3, size, size] and labels int64 [n], deterministic in ``seed``.

    Class = shape (``SHAPES``, in order), in one colour on a plain background. Nuisances, drawn
    per image: position, scale, rotation, pixel noise, and colour (brightness, contrast,
    saturation, hue: half the colour jitter's range). Classes are balanced and shuffled.
    """
    if not 1 <= classes <= len(SHAPES):
        raise UserError(f"data.synthetic.classes must be in 1..{len(SHAPES)}, got {classes}")
    g = torch.Generator().manual_seed(seed)
    U = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    labels = (torch.arange(n) % classes)[torch.randperm(n, generator=g)]
    scale = SCALE[0] + (SCALE[1] - SCALE[0]) * U(n)
    centre = (U(n, 2) * 2 - 1) * (1 - OFFSET * scale)[:, None]
    angle = U(n) * 2 * math.pi
    grid = (torch.arange(2 * size) + 0.5) / size - 1  # pixel centres at twice the size, in [-1, 1]
    y, x = torch.meshgrid(grid, grid, indexing="ij")
    mask = torch.zeros(n, 1, size, size)
    for k, shape in enumerate(list(SHAPES.values())[:classes]):  # a loop over classes, not images
        i = (labels == k).nonzero()[:, 0]
        dx = (x - centre[i, 0, None, None]) / scale[i, None, None]
        dy = (y - centre[i, 1, None, None]) / scale[i, None, None]
        c, s = torch.cos(angle[i])[:, None, None], torch.sin(angle[i])[:, None, None]
        inside = shape(c * dx + s * dy, -s * dx + c * dy).float()
        mask[i] = torch.nn.functional.avg_pool2d(inside[:, None], 2)  # anti-aliased edges
    # Recolouring: brightness, contrast (towards the mean gray), saturation (towards the pixel's
    # gray) and hue, in this order, are affine maps of RGB: x -> m x + o, applied to the two colours.
    b, ct, sat, hue = (U(4, n) * 2 - 1) * torch.tensor(COLOUR)[:, None] + torch.tensor([1, 1, 1, 0])[:, None]
    luma, fg, bg = torch.tensor([0.299, 0.587, 0.114]), torch.tensor(FG), torch.tensor(BG)
    area = mask.mean((1, 2, 3))[:, None]
    gray_mean = b * ((fg * area + bg * (1 - area)) @ luma)  # mean gray after brightness
    hs = _hue_matrix(hue) @ (sat[:, None, None] * torch.eye(3) + (1 - sat)[:, None, None] * luma.expand(3, 3))
    m = (ct * b)[:, None, None] * hs
    o = ((1 - ct) * gray_mean)[:, None] * hs.sum(2)  # hs @ (gray_mean * [1, 1, 1])
    fg, bg = m @ fg + o, m @ bg + o  # [n, 3]
    img = (fg - bg)[:, :, None, None] * mask
    img.add_(bg[:, :, None, None]).add_(NOISE * torch.randn(n, 1, size, size, generator=g))
    return img.clamp_(0, 1).mul_(255).round_().to(torch.uint8), labels


# ---------------------------------------------------------------------------------------------- splits
def heldout_split(labels, per_class=None, last=None, seed=VAL_SEED):
    """Indices 0..len(labels)-1 split into (kept, held_out), both sorted, with a fixed seed.

    ``per_class``: an int (that many random images of every class) or a float (that fraction of
    every class). ``last``: the last ``last`` images of a seeded shuffle of all images.
    """
    labels, g = torch.as_tensor(labels), torch.Generator().manual_seed(seed)
    if last is not None:
        if last >= len(labels):
            raise UserError(f"data.val_split: cannot hold out {last} of {len(labels)} images")
        held = torch.randperm(len(labels), generator=g)[len(labels) - last:]
    else:  # a random order inside each class, then the first k of every class
        perm = torch.randperm(len(labels), generator=g)
        order = perm[labels[perm].argsort(stable=True)]
        counts = torch.bincount(labels)
        rank = torch.arange(len(labels)) - (counts.cumsum(0) - counts).repeat_interleave(counts)
        k = torch.full_like(counts, per_class) if isinstance(per_class, int) else (counts * per_class).long()
        held = order[rank < k[labels[order]]]
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[held] = False
    return keep.nonzero()[:, 0], held.sort().values


# ---------------------------------------------------------------------------------------------- files
def _torchvision(cls, name, root, what, download, **kw):
    """A torchvision dataset; its 'not found' and download errors become one-line UserErrors."""
    try:
        return cls(root, download=download, **kw)
    except (RuntimeError, OSError) as e:  # not found / corrupt; network errors, unwritable folder
        if download:
            raise UserError(f"dataset {name!r}: download to {os.path.abspath(root)} failed ({e})") from None
        raise UserError(f"dataset {name!r} not found in {os.path.abspath(root)} (expected {what}): put it there, "
                        f"set data.root=<folder that holds it>, or set data.download=true") from None


def _read_idx_gz(path):
    """One idx file as published (gzip), through torchvision's reader."""
    from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor
    with tempfile.TemporaryDirectory() as tmp, gzip.open(path) as f:
        with open(os.path.join(tmp, "idx"), "wb") as out:
            out.write(f.read())
        return read_sn3_pascalvincent_tensor(os.path.join(tmp, "idx"), strict=False)


def _fashion_mnist(root, train, download):
    prefix = "train" if train else "t10k"
    if not os.path.isfile(os.path.join(root, "FashionMNIST", "raw", f"{prefix}-labels-idx1-ubyte")):
        for folder in ("", "fashion_mnist", "fashion-mnist", os.path.join("FashionMNIST", "raw")):
            files = [os.path.join(root, folder, f"{prefix}-{kind}-ubyte.gz") for kind in ("images-idx3", "labels-idx1")]
            if all(os.path.isfile(f) for f in files):
                images, labels = (_read_idx_gz(f) for f in files)
                return images[:, None].expand(-1, 3, -1, -1).contiguous(), labels.long()
    what = "train-images-idx3-ubyte.gz and the other three idx .gz files there or in fashion_mnist/"
    ds = _torchvision(torchvision.datasets.FashionMNIST, "fashion_mnist", root, what, download, train=train)
    return ds.data[:, None].expand(-1, 3, -1, -1).contiguous(), ds.targets.long()


def _small(data_cfg, name, part):
    """(uint8 [N, 3, H, W], int64 [N]) of a small dataset; ``part`` is train, test or unlabeled."""
    root, download = data_cfg["root"], bool(data_cfg["download"])
    if name == "synthetic":  # train and test from two seeds that no other data.synthetic.seed reuses
        s = data_cfg["synthetic"]
        n = s["train_size"] if part == "train" else s["test_size"]
        return make_synthetic(n, s["size"], s["classes"], 2 * s["seed"] + (part == "test"))
    if name in ("cifar10", "cifar100"):
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        ds = _torchvision(cls, name, root, cls.base_folder + "/", download, train=part == "train")
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)
    if name == "stl10":
        ds = _torchvision(torchvision.datasets.STL10, name, root, "stl10_binary/", download, split=part)
        return torch.from_numpy(ds.data), torch.from_numpy(ds.labels).long()
    return _fashion_mnist(root, part == "train", download)


def imagenet100_classes():
    """The 100 WordNet ids of Tian et al.'s ImageNet-100 (CMC), from common/imagenet100.txt."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet100.txt")) as f:
        return [line.strip() for line in f if line.strip()]


def _rgb_uint8(path):
    return pil_to_tensor(torchvision.datasets.folder.pil_loader(path))


class _ImageFolder(torchvision.datasets.ImageFolder):
    """ImageFolder giving uint8 RGB tensors; with ``keep``, only those class folders (all required)."""

    def __init__(self, root, keep=None, transform=None):
        self.keep = keep
        super().__init__(root, transform=transform, loader=_rgb_uint8)

    def find_classes(self, directory):
        classes, _ = super().find_classes(directory)
        if self.keep is not None:
            missing = sorted(set(self.keep) - set(classes))
            if missing:
                raise UserError(f"imagenet100: {len(missing)} of its classes are missing in {directory} (e.g. "
                                f"{', '.join(missing[:3])}); the list is common/imagenet100.txt")
            classes = sorted(self.keep)
        return classes, {c: i for i, c in enumerate(classes)}


def _imagenet(data_cfg, name, part, transform):
    folder = os.path.abspath(os.path.join(data_cfg["root"], "imagenet", part))
    if not os.path.isdir(folder) or not any(e.is_dir() for e in os.scandir(folder)):
        raise UserError(f"dataset {name!r} not found in {folder}: expected the ImageFolder layout "
                        f"<data.root>/imagenet/{{train,val}}/<wnid>/<image>.JPEG (val sorted into class folders "
                        f"too); put it there or set data.root=<folder holding imagenet/> (no automatic download)")
    try:
        return _ImageFolder(folder, imagenet100_classes() if name == "imagenet100" else None, transform)
    except FileNotFoundError:  # class folders without images
        raise UserError(f"dataset {name!r}: no images (.JPEG, .png, ...) in the class folders of {folder}") from None


def load(data_cfg, split, transform=None):
    """Dataset ``data_cfg.name`` for ``split`` in ("ssl", "train", "test"); see the module docstring.

    Items are ``(uint8 [3, H, W], label)``, or ``(transform(image), label)`` if ``transform`` is given.
    """
    name = data_cfg["name"]
    _check_name(name)
    if split not in ("ssl", "train", "test"):
        raise ValueError(f"split must be ssl, train or test, got {split!r}")
    val, holdout = bool(data_cfg.get("val_split", False)), VAL_HOLDOUT.get(name, VAL_DEFAULT)
    if name in ("imagenet", "imagenet100"):
        ds = _imagenet(data_cfg, name, "val" if split == "test" and not val else "train", transform)
        if val:
            kept, held = heldout_split(ds.targets, **holdout)
            ds = torch.utils.data.Subset(ds, (held if split == "test" else kept).tolist())
        return ds
    if split == "test" and not val:
        return TensorImages(*_small(data_cfg, name, "test"), transform)
    images, labels = _small(data_cfg, name, "train")
    if val:
        kept, held = heldout_split(labels, **holdout)
        images, labels = images[held if split == "test" else kept], labels[held if split == "test" else kept]
    if split == "ssl" and name == "stl10":  # STL-10: SSL on unlabeled + train
        unlabeled, minus_one = _small(data_cfg, name, "unlabeled")
        images, labels = torch.cat([unlabeled, images]), torch.cat([minus_one, labels])
    return TensorImages(images, labels, transform)


# ==============================================================================================
# toy2d: point data for center_penalty.py (CenterVector §3.2 and App. B.1). Points, not images:
# ``load``/``train_loader`` do not serve them; center_penalty.py calls these generators itself.
# ==============================================================================================
TOY2D = ("blobs", "moons", "app_b1")
# blob centres: radius 5, 120 degrees apart, the same for every seed (the seed draws the points)
BLOB_CENTRES = tuple((5 * math.cos(a), 5 * math.sin(a)) for a in (math.pi / 2 + 2 * math.pi * k / 3 for k in range(3)))


def make_blobs(n_per_class, seed, std=1.0):
    """Three Gaussian blobs in 2-D: points float32 [3n, 2] and labels int64 [3n], in class order.

    Centres ``BLOB_CENTRES``; ``std`` is the spread of each coordinate; deterministic in ``seed``.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(n_per_class)
    x = torch.tensor(BLOB_CENTRES)[labels] + std * torch.randn(len(labels), 2, generator=g)
    return x, labels


def make_moons(n_per_class, seed, noise=0.1):
    """Three interleaved half circles in 2-D: points float32 [3n, 2] and labels int64 [3n], in class order.

    Classes 0 and 1 are scikit-learn's two moons (upper arc about (0, 0), lower arc about (1, 0.5));
    class 2 is an upper arc about (2, 1), next to the right ends of both (closest clean points: 0.5
    between classes 0 and 1, 0.42 between 0 and 2, 1.1 between 1 and 2). Gaussian ``noise`` per
    coordinate; deterministic in ``seed``.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(n_per_class)
    t = math.pi * torch.rand(len(labels), generator=g)
    c, s = torch.cos(t), torch.sin(t)
    x = torch.where((labels == 1)[:, None], torch.stack([1 - c, 0.5 - s], 1),
                    torch.stack([c, s], 1) + 2.0 * (labels == 2)[:, None].float() * torch.tensor([1.0, 0.5]))
    return x + noise * torch.randn(len(labels), 2, generator=g), labels


def make_app_b1(n_points=100, n_augs=10, seed=0, aug_std=0.1, shift=0.0):
    """The toy of CenterVector App. B.1: ``n_points`` points x ~ N(0, I_3) and ``n_augs`` augmentations
    of each, x_w = x + k + eps with eps ~ N(0, aug_std^2 I) and k = shift * (1, 1, 1)/sqrt(3)
    (shift 0: "centred", E_w[x_w] = x; shift > 0: "shifted", E_w[x_w] = x + k).

    Returns ``(x [n, 3], views [n, A, 3], test_views [n, A, 3])``: the training augmentations and fresh
    augmentations of the same points (for the kNN monitor). Deterministic in ``seed``.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_points, 3, generator=g)
    k = shift * torch.ones(3) / math.sqrt(3)
    views = [x[:, None] + k + aug_std * torch.randn(n_points, n_augs, 3, generator=g) for _ in range(2)]
    return x, views[0], views[1]

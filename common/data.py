"""Datasets by name, as uint8 images and integer labels.

synthetic      the embedded default (SPEC §3): shapes on textured backgrounds, generated
               from a seed in memory (``make_synthetic``); no files, no download.
cifar10/100    torchvision CIFAR10/CIFAR100 in ``root/cifar-10-batches-py``, ``root/cifar-100-python``.
stl10          torchvision STL10 in ``root/stl10_binary``; "ssl" is unlabeled + train (labels -1 / 0..9).
fashion_mnist  torchvision FashionMNIST in ``root/FashionMNIST/raw``, or a folder with the four
               idx ``.gz`` files as published (``root``, ``root/fashion_mnist``, ``root/fashion-mnist``;
               Debian's dataset-fashion-mnist: ``data.root=/usr/share/datasets``). Gray -> 3 channels.
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

Every item is ``(uint8 tensor [3, H, W], int)``. Small datasets are ``TensorImages`` held in
memory; ImageNet decodes files on access. Downloads happen only with ``data.download: true``;
a missing dataset raises ``UserError`` saying where we looked and how to fix it.
"""
import gzip
import math
import os
import tempfile

import torch
import torchvision
from torchvision.io import ImageReadMode, decode_image

from common.config import UserError

DATASETS = ("synthetic", "cifar10", "cifar100", "stl10", "imagenet", "imagenet100", "fashion_mnist")

# Per-dataset partial config, merged between the defaults and the user's file.
NO_BLUR = {"blur_p": [0.0, 0.0]}  # CIFAR-sized images: no blur (BYOL-MHE §3.5, App. B.2)
PRESETS = {
    "synthetic": {"data": {"image_size": 32}, "augment": NO_BLUR},
    "cifar10": {"data": {"image_size": 32}, "augment": NO_BLUR},
    "cifar100": {"data": {"image_size": 32}, "augment": NO_BLUR},
    "stl10": {"data": {"image_size": 96}},
    "imagenet": {"data": {"image_size": 224}},
    "imagenet100": {"data": {"image_size": 224}},
    "fashion_mnist": {"data": {"image_size": 28}, "augment": NO_BLUR},
}

_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_STATS = {  # per-channel (mean, std) of the training images, in [0, 1] units
    "synthetic": ((0.4236, 0.4052, 0.4013), (0.2083, 0.1948, 0.2179)),  # measured: see tests
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "imagenet": _IMAGENET_STATS,
    "imagenet100": _IMAGENET_STATS,
    "fashion_mnist": ((0.2860,) * 3, (0.3530,) * 3),
}
_NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "stl10": 10, "imagenet": 1000, "imagenet100": 100,
                "fashion_mnist": 10}
VAL_SEED = 0  # fixed seed of the held-out validation selection


def stats(name):
    """Per-channel (mean, std) of dataset ``name`` in [0, 1] units."""
    _check_name(name)
    return _STATS[name]


def num_classes(data_cfg):
    return data_cfg["synthetic"]["classes"] if data_cfg["name"] == "synthetic" else _NUM_CLASSES[data_cfg["name"]]


def _check_name(name):
    if name not in DATASETS:
        raise UserError(f"data.name: unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


class TensorImages(torch.utils.data.Dataset):
    """Images uint8 [N, 3, H, W] and labels int64 [N] in memory; item -> (image, label)."""

    def __init__(self, images, labels, transform=None):
        assert images.dtype == torch.uint8 and images.ndim == 4 and images.shape[1] == 3, images.shape
        assert len(images) == len(labels)
        self.images, self.labels, self.transform = images, torch.as_tensor(labels, dtype=torch.int64), transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = self.images[i]
        return (self.transform(x) if self.transform else x), int(self.labels[i])



# ----------------------------------------------------------------------------------------------
# synthetic (SPEC §3)
# ----------------------------------------------------------------------------------------------
def _rotated(u, v, k):
    a = 2 * math.pi * k
    return u * math.cos(a) + v * math.sin(a), -u * math.sin(a) + v * math.cos(a)


def _triangle(u, v):  # equilateral, circumradius 1
    return torch.stack([_rotated(u, v, k / 3)[1] for k in range(3)]).amax(0) < 0.5


def _stripes(u, v):  # three parallel bars
    inside = (u.abs() < 0.85) & (v.abs() < 0.85)
    return inside & (torch.floor((u + 0.85) / 0.34).remainder(2) == 0)


def _r(u, v):
    return torch.sqrt(u * u + v * v)


def _box(u, v):
    return torch.maximum(u.abs(), v.abs())


# Shape masks in the shape's own frame (radius about 1); every class is invariant to flips.
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
# Canonical foreground / background colours; each image is recoloured by a colour-jitter-like
# map no stronger than the augmentation's (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1).
FG, BG = (0.85, 0.55, 0.25), (0.25, 0.35, 0.60)
JITTER = (0.4, 0.4, 0.2, 0.1)


def _hue_matrix(h):
    """[N, 3, 3] RGB maps rotating hue by fraction h of a turn (rotation in YIQ about the gray axis)."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    c, s = torch.cos(2 * math.pi * h), torch.sin(2 * math.pi * h)
    rot = torch.zeros(len(h), 3, 3)
    rot[:, 0, 0], rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = 1, c, -s, s, c
    return torch.linalg.inv(to_yiq) @ rot @ to_yiq


def make_synthetic(n, size, classes, seed):
    """``n`` images uint8 [n, 3, size, size] and labels int64 [n], deterministic in ``seed``.

    Class = shape (``SHAPES``, in order). Nuisances, all drawn per image: position, scale,
    rotation, a smooth background texture, pixel noise, and colour (brightness, contrast,
    saturation, hue within the colour-jitter range). Classes are balanced and shuffled.
    """
    if not 1 <= classes <= len(SHAPES):
        raise UserError(f"data.synthetic.classes must be in 1..{len(SHAPES)}, got {classes}")
    g = torch.Generator().manual_seed(seed)
    U = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    labels = (torch.arange(n) % classes)[torch.randperm(n, generator=g)]
    scale = 0.35 + 0.35 * U(n)                   # shape radius / half the image width
    centre = (U(n, 2) * 2 - 1) * (0.95 - scale)[:, None]
    angle = U(n) * 2 * math.pi
    # shape masks, rendered at twice the size
    s2 = 2 * size
    grid = (torch.arange(s2) + 0.5) / s2 * 2 - 1
    y, x = torch.meshgrid(grid, grid, indexing="ij")
    mask = torch.zeros(n, 1, size, size)
    for k, shape in enumerate(list(SHAPES.values())[:classes]):
        i = (labels == k).nonzero()[:, 0]
        dx = (x - centre[i, 0, None, None]) / scale[i, None, None]
        dy = (y - centre[i, 1, None, None]) / scale[i, None, None]
        c, s = torch.cos(angle[i])[:, None, None], torch.sin(angle[i])[:, None, None]
        inside = shape(c * dx + s * dy, -s * dx + c * dy).float()
        mask[i] = torch.nn.functional.avg_pool2d(inside[:, None], 2)  # anti-aliased edges
    # background: canonical colour times a smooth random field
    field = torch.nn.functional.interpolate(U(n, 1, 4, 4) * 2 - 1, size=(size, size), mode="bicubic",
                                            align_corners=False)
    bg_w = (1 + 0.25 * field) * (1 - mask)  # image = FG * mask + BG * bg_w before recolouring
    # Per-image recolouring in the colour jitter's range. Brightness, contrast (towards the mean
    # gray), saturation (towards the pixel's gray) and hue are affine maps of RGB, so their
    # composition (in this order) is x -> M x + o; apply it to the two colours, not to pixels.
    b, ct, sat, hue = (U(4, n) * 2 - 1) * torch.tensor(JITTER)[:, None] + torch.tensor([1, 1, 1, 0])[:, None]
    luma = torch.tensor([0.299, 0.587, 0.114])
    fg, bg = torch.tensor(FG), torch.tensor(BG)
    mean_rgb = fg * mask.mean((1, 2, 3))[:, None] + bg * bg_w.mean((1, 2, 3))[:, None]  # [n, 3]
    gray_mean = b * (mean_rgb @ luma)  # mean gray after brightness
    sat_m = sat[:, None, None] * torch.eye(3) + (1 - sat)[:, None, None] * luma.expand(3, 3)
    hs = _hue_matrix(hue) @ sat_m
    m = (ct * b)[:, None, None] * hs
    o = ((1 - ct) * gray_mean)[:, None] * hs.sum(2)  # hs @ (gray_mean * [1, 1, 1])
    fg_n, bg_n = m @ fg + o, m @ bg  # [n, 3]
    img = fg_n[:, :, None, None] * mask
    img.addcmul_(bg_n[:, :, None, None], bg_w).add_(o[:, :, None, None])
    img.add_(0.03 * torch.randn(n, 1, size, size, generator=g))  # pixel noise
    return img.clamp_(0, 1).mul_(255).round_().to(torch.uint8), labels


# ----------------------------------------------------------------------------------------------
# held-out validation split (BYOL-MHE App. B.1)
# ----------------------------------------------------------------------------------------------
def heldout_split(labels, per_class=None, last=None, seed=VAL_SEED):
    """Split indices 0..len(labels)-1 into (kept, held_out), both sorted, with a fixed seed.

    ``per_class``: an int (that many random images of every class) or a float (that fraction of
    every class). ``last``: the last ``last`` images of a seeded shuffle of all images.
    """
    labels = torch.as_tensor(labels)
    g = torch.Generator().manual_seed(seed)
    if last is not None:
        if last >= len(labels):
            raise UserError(f"data.val_split: cannot hold out {last} of {len(labels)} images")
        held = torch.randperm(len(labels), generator=g)[len(labels) - last:]
    else:
        held = []
        for c in labels.unique(sorted=True).tolist():
            idx = (labels == c).nonzero()[:, 0]
            k = per_class if isinstance(per_class, int) else int(per_class * len(idx))
            held.append(idx[torch.randperm(len(idx), generator=g)[:k]])
        held = torch.cat(held)
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[held] = False
    return keep.nonzero()[:, 0], held.sort().values


VAL_HOLDOUT = {"cifar10": {"per_class": 500}, "cifar100": {"per_class": 50}, "imagenet": {"last": 10009}}
DEFAULT_HOLDOUT = {"per_class": 0.1}


# ----------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------
def _missing(name, where, what, download=True):
    fix = "put it there, set data.root=<folder that holds it>" + (", or set data.download=true" if download else "")
    return UserError(f"dataset {name!r} not found in {os.path.abspath(where)} (expected {what}): {fix}")


def _torchvision(cls, name, root, what, download, **kw):
    """Build a torchvision dataset, turning its 'not found' / download errors into one line."""
    try:
        return cls(root, download=download, **kw)
    except RuntimeError as e:
        if download:
            raise UserError(f"dataset {name!r}: download to {os.path.abspath(root)} failed ({e})") from None
        raise _missing(name, root, what) from None
    except OSError as e:  # network errors and unwritable folders on download
        raise UserError(f"dataset {name!r}: could not download to {os.path.abspath(root)} ({e})") from None


def _hwc(array):  # numpy uint8 [N, H, W, 3] -> torch [N, 3, H, W]
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def _read_idx_gz(path):
    """An idx file as published (gzip) through torchvision's reader."""
    from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "idx")
        with gzip.open(path) as f, open(out, "wb") as g:
            g.write(f.read())
        return read_sn3_pascalvincent_tensor(out, strict=False)


def _fashion_mnist(root, train, download):
    prefix = "train" if train else "t10k"
    if not os.path.isfile(os.path.join(root, "FashionMNIST", "raw", f"{prefix}-labels-idx1-ubyte")):
        for folder in (root, os.path.join(root, "fashion_mnist"), os.path.join(root, "fashion-mnist"),
                       os.path.join(root, "FashionMNIST", "raw")):  # the idx .gz files as published
            files = [os.path.join(folder, f"{prefix}-{kind}.gz") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
            if all(os.path.isfile(f) for f in files):
                images, labels = (_read_idx_gz(f) for f in files)
                return images[:, None].expand(-1, 3, -1, -1).contiguous(), labels.long()
    what = ("the four idx .gz files as published, train-images-idx3-ubyte.gz ..., there or in fashion_mnist/; "
            "or torchvision's FashionMNIST/raw/")
    ds = _torchvision(torchvision.datasets.FashionMNIST, "fashion_mnist", root, what, download, train=train)
    return ds.data[:, None].expand(-1, 3, -1, -1).contiguous(), ds.targets.long()


def _small(data_cfg, name, part):
    """(images uint8 [N,3,H,W], labels) of a small dataset; part in train / test / unlabeled."""
    root, dl = data_cfg["root"], bool(data_cfg["download"])
    if name == "synthetic":
        s = data_cfg["synthetic"]
        n = s["train_size"] if part == "train" else s["test_size"]
        return make_synthetic(n, s["size"], s["classes"], 2 * s["seed"] + (part == "test"))
    if name in ("cifar10", "cifar100"):
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        what = cls.base_folder + "/"
        ds = _torchvision(cls, name, root, what, dl, train=part == "train")
        return _hwc(ds.data), torch.tensor(ds.targets)
    if name == "stl10":
        ds = _torchvision(torchvision.datasets.STL10, name, root, "stl10_binary/", dl, split=part)
        return torch.from_numpy(ds.data), torch.from_numpy(ds.labels).long()
    return _fashion_mnist(root, part == "train", dl)


class _ImageFolder(torchvision.datasets.ImageFolder):
    """ImageFolder decoding to uint8 RGB tensors, optionally keeping only some class folders."""

    def __init__(self, root, keep=None, transform=None):
        self.keep = keep
        super().__init__(root, transform=transform, loader=_decode)

    def find_classes(self, directory):
        classes, _ = super().find_classes(directory)
        if self.keep is not None:
            missing = sorted(set(self.keep) - set(classes))
            if missing:
                raise UserError(f"imagenet100: {len(missing)} of its classes are missing in {directory} "
                                f"(e.g. {', '.join(missing[:3])}); the list is common/imagenet100.txt")
            classes = sorted(self.keep)
        return classes, {c: i for i, c in enumerate(classes)}


def _decode(path):
    return decode_image(path, mode=ImageReadMode.RGB)


def imagenet100_classes():
    """The 100 WordNet ids of Tian et al.'s ImageNet-100 (CMC), from common/imagenet100.txt."""
    with open(os.path.join(os.path.dirname(__file__), "imagenet100.txt")) as f:
        return [line.strip() for line in f if line.strip()]


def _imagenet(data_cfg, name, part, transform):
    folder = os.path.abspath(os.path.join(data_cfg["root"], "imagenet", part))
    if not os.path.isdir(folder) or not any(e.is_dir() for e in os.scandir(folder)):
        raise UserError(f"dataset {name!r} not found in {folder}: expected the ImageFolder layout "
                        f"<data.root>/imagenet/{{train,val}}/<wnid>/<image>.JPEG (val sorted into class "
                        f"folders too); put it there or set data.root=<folder holding imagenet/>; "
                        f"it cannot be downloaded automatically")
    try:
        return _ImageFolder(folder, imagenet100_classes() if name == "imagenet100" else None, transform)
    except FileNotFoundError:  # class folders without images
        raise UserError(f"dataset {name!r}: no images (.jpg, .png, ...) in the class folders of {folder}") from None


def load(data_cfg, split, transform=None):
    """The dataset ``data_cfg.name`` for ``split`` in ("ssl", "train", "test"); see the module docstring.

    Items are ``(uint8 [3, H, W], label)``, or ``(transform(image), label)`` if ``transform`` is given.
    """
    name = data_cfg["name"]
    _check_name(name)
    if split not in ("ssl", "train", "test"):
        raise ValueError(f"split must be ssl, train or test, got {split!r}")
    val = bool(data_cfg.get("val_split", False))
    holdout = VAL_HOLDOUT.get(name, DEFAULT_HOLDOUT)
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
        idx = held if split == "test" else kept
        images, labels = images[idx], labels[idx]
    if split == "ssl" and name == "stl10":  # STL-10 SSL on unlabeled + train
        unl, unl_labels = _small(data_cfg, name, "unlabeled")
        images, labels = torch.cat([unl, images]), torch.cat([unl_labels, labels])
    return TensorImages(images, labels, transform)

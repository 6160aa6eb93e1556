"""Datasets by name, as uint8 images [3, H, W] and integer labels (the README's Datasets table says where each
is read from): ``synthetic`` (the embedded default, ``make_synthetic``), ``cifar10``/``cifar100``/``stl10``/
``fashion_mnist`` (torchvision's readers; Fashion-MNIST also from the four idx ``.gz`` files as published),
``imagenet``/``imagenet100`` (ImageFolder; Tian et al.'s 100 classes in ``imagenet100.txt``) and ``folder``
(your own images, below). Small datasets are ``TensorImages`` held in memory; files are decoded on access.

Splits: "ssl" (self-supervised training; labels may be -1: STL-10's unlabeled part), "train" (the kNN bank and
the linear probe's training set), "test" (the official test/validation set). ``data.val_split: true`` (BYOL-MHE
App. B.1) holds out a fixed-seed part of the training set as "test" instead: CIFAR-10 500 images per class,
CIFAR-100 50 per class, ImageNet the last 10009 (of a fixed-seed shuffle, for Grill et al.'s TFRecord order);
10% of every class elsewhere. Nothing downloads unless ``data.download: true``; a missing dataset is one
``UserError`` saying where we looked and how to fix it.
"""
import gzip
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Mapping

import torch
import torchvision
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension, make_dataset
from torchvision.transforms.v2.functional import pil_to_tensor

from common import dist
from common.config import DATASETS, UserError

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


def stats(data):
    """Per-channel (mean, std) in [0, 1] units of dataset ``data``: a name or a data config (``folder``: the
    config's ``data.mean``/``data.std`` when given, else computed once over its training images and cached)."""
    name = data["name"] if isinstance(data, Mapping) else data
    _check_name(name)
    if name == "folder" and not isinstance(data, Mapping):
        raise ValueError("stats: a folder dataset's statistics need its data config (data.root, data.mean/std)")
    return folder_stats(data) if name == "folder" else _STATS[name]


def num_classes(data_cfg):
    """Number of classes (0: an unlabelled ``folder``, no kNN or linear accuracy)."""
    if data_cfg["name"] == "folder":
        return len(_folder_images(os.path.join(os.path.abspath(data_cfg["root"]), "train"), "train")[0])
    return data_cfg["synthetic"]["classes"] if data_cfg["name"] == "synthetic" else _CLASSES[data_cfg["name"]]


def _check_name(name):
    if name not in _STATS and name != "folder":
        images = [n for n in DATASETS if n in _STATS or n == "folder"]
        raise UserError(f"data.name: {name!r} is not an image dataset; choose one of {', '.join(images)}")


class TensorImages(torch.utils.data.Dataset):
    """Images uint8 [N, 3, H, W] and labels int64 [N] in memory; item -> (image, label)."""

    def __init__(self, images, labels, transform=None):
        assert images.dtype == torch.uint8 and images.ndim == 4 and images.shape[1] == 3, images.shape
        self.images, self.labels, self.transform = images, torch.as_tensor(labels, dtype=torch.int64), transform
        assert len(self.images) == len(self.labels)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        """One image (``i`` an int), or a whole batch in one tensor index (``i`` a list of indices)."""
        x, y = self.images[i], self.labels[i]
        return (self.transform(x) if self.transform else x), (int(y) if y.ndim == 0 else y)


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
def heldout_split(labels, per_class=None, last=None, seed=VAL_SEED, at_least=0):
    """Indices 0..len(labels)-1 split into (kept, held_out), both sorted, with a fixed seed.

    ``per_class``: an int (that many random images of every class) or a float (that fraction of
    every class, rounded down, but ``at_least`` images of a class that keeps one for training).
    ``last``: the last ``last`` images of a seeded shuffle of all images.
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
        k = torch.maximum(k, (counts - 1).clamp(min=0, max=at_least))
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
    """The image file ``path`` as uint8 RGB [3, H, W]; a file that does not decode (truncated, corrupt) is one
    ``UserError`` naming it (in a DataLoader worker too: ``dist`` prints the line the worker's traceback ends with)."""
    try:
        return pil_to_tensor(torchvision.datasets.folder.pil_loader(path))
    except Exception as e:  # PIL: OSError "image file is truncated", SyntaxError "broken PNG file", ...
        why = (str(e).strip().splitlines() or [""])[0][:120]
        raise UserError(f"data: {path} is not a readable image ({type(e).__name__}{': ' + why if why else ''}): "
                        "replace or remove it") from None


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
    if name == "folder":
        return _load_folder(data_cfg, split, transform)
    if data_cfg.get("mean") is not None or data_cfg.get("std") is not None:
        raise UserError(f"data.mean/data.std are for data.name=folder; {name} is normalised with its published "
                        "statistics (common/data.py): remove them")
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


# ---------------------------------------------------------------------------------------------- folder
# Your own images: ``<data.root>/train/`` holds class folders (labelled) or images (unlabelled: SSL only, kNN and
# linear accuracy nan, the label-free diagnostics on ``FOLDER_EVAL_SAMPLE`` of its images); hidden files are
# skipped, anything else that is not an image is an error. Labelled: evaluated on ``val/<class>/``, or without it
# on a held-out 10% of every class (fixed seed; at least one image of a class with two), left out of SSL and the
# bank. Up to ``FOLDER_CHECK`` images, every header is read at opening; one size that fits ``FOLDER_IN_MEMORY``
# is decoded once into a ``TensorImages`` (every augmentation path), else ``FileImages`` decodes per item
# (``augment.path: hybrid`` or ``cpu``). Normalisation: ``data.mean``/``data.std``, or the training images'
# per-channel statistics, computed once and cached in ``<data.root>/.onefile-ssl-stats.json``.
FOLDER_LAYOUT = ("<data.root>/train/<class>/<image> (labelled; evaluated on <data.root>/val/<class>/<image> "
                 "or a held-out part of train) or <data.root>/train/<image> (unlabelled, SSL only)")
FOLDER_CHECK = 100_000      # images: up to this many, every header is read when the folder is opened
FOLDER_IN_MEMORY = 2 ** 31  # bytes: a folder of one image size up to this is decoded once, kept in memory
FOLDER_STATS_SAMPLE = 10_000
FOLDER_EVAL_SAMPLE = 2048
STATS_FILE = ".onefile-ssl-stats.json"
_FOLDER_CACHE, _SAID = {}, set()


class FileImages(torch.utils.data.Dataset):
    """Images decoded from files on access: item -> (uint8 [3, H, W] RGB, label) or (transform(image), label).
    ``not_in_memory`` says why they are not a ``TensorImages`` (for the batched path's error)."""

    def __init__(self, paths, labels, transform=None, not_in_memory="is decoded from files"):
        self.paths, self.labels = list(paths), torch.as_tensor(labels, dtype=torch.int64)
        self.transform, self.not_in_memory = transform, not_in_memory

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        x = _rgb_uint8(self.paths[i])
        return (self.transform(x) if self.transform else x), int(self.labels[i])


def _say(msg):
    """Print ``msg`` once per process, on rank 0."""
    if msg not in _SAID:
        _SAID.add(msg)
        if dist.is_main():
            print(msg, flush=True)


def _image_file(path, folder=None):
    """True for an image, False for a hidden file or one in a hidden folder (below ``folder``); anything else is an
    error (torchvision's ``make_dataset`` would skip it silently)."""
    if folder is not None and any(part.startswith(".") for part in os.path.relpath(path, folder).split(os.sep)):
        return False
    if not has_file_allowed_extension(path, IMG_EXTENSIONS):
        raise UserError(f"data.name=folder: {path} is not an image (expected only {' '.join(IMG_EXTENSIONS)} "
                        "files; hidden files are skipped): move it out of the dataset folder")
    return True


def _scan(folder, part):
    """(classes, paths, labels) of ``folder`` (root/train or root/val): torchvision's ``find_classes`` and
    ``make_dataset`` (hidden files and folders skipped); labels -1 for unlabelled images."""
    if not os.path.isdir(folder):
        raise UserError(f"data.name=folder: no folder {folder}; expected {FOLDER_LAYOUT}: set data.root=<the "
                        f"folder holding train/>")
    entries = sorted((e for e in os.scandir(folder) if not e.name.startswith(".")), key=lambda e: e.name)
    dirs, files = [e for e in entries if e.is_dir()], [e.path for e in entries if not e.is_dir()]
    if not entries:
        raise UserError(f"data.name=folder: {folder} is empty; expected {FOLDER_LAYOUT}")
    if dirs and files:
        raise UserError(f"data.name=folder: {folder} holds both class folders ({dirs[0].name}/) and images "
                        f"({os.path.basename(files[0])}): put every image into a class folder (labelled) or none "
                        "(unlabelled)")
    if files:
        if part == "val":
            raise UserError(f"data.name=folder: {folder} holds images but no class folders; val/ needs the class "
                            f"folders of train/ (val/<class>/<image>), or remove it to hold out part of train/")
        return [], [f for f in files if _image_file(f)], [-1] * len(files)
    classes = [c for c in find_classes(folder)[0] if not c.startswith(".")]
    samples = make_dataset(folder, {c: i for i, c in enumerate(classes)},
                           is_valid_file=lambda f: _image_file(f, folder), allow_empty=True)
    empty = sorted(set(classes) - {classes[c] for _, c in samples})
    if empty:
        raise UserError(f"data.name=folder: the class folder {os.path.join(folder, empty[0])} holds no images; "
                        f"expected {FOLDER_LAYOUT}")
    return classes, [p for p, _ in samples], [c for _, c in samples]


def _sizes(paths):
    """(width, height) of every image, from its header (PIL reads no pixels here)."""
    from PIL import Image
    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                out.append(im.size)
        except Exception as e:  # not an image, truncated, unreadable
            raise UserError(f"data.name=folder: {p} is not a readable image ({type(e).__name__}): replace or remove "
                            "it") from None
    return out


def _folder_images(folder, part):
    """(classes, paths, dataset) of root/train or root/val, once per process (the decoded images are shared)."""
    key = (folder, part, os.stat(folder).st_mtime_ns if os.path.isdir(folder) else None)
    if key in _FOLDER_CACHE:
        return _FOLDER_CACHE[key]
    classes, paths, labels = _scan(folder, part)
    rel = lambda p: os.path.relpath(p, os.path.dirname(folder))  # noqa: E731
    why = f"has {len(paths)} images, more than the {FOLDER_CHECK} whose sizes are read when it is opened"
    if len(paths) <= FOLDER_CHECK:
        sizes = _sizes(paths)
        other = next((i for i, s in enumerate(sizes) if s != sizes[0]), None)
        (w, h), nbytes = sizes[0], 3 * sizes[0][0] * sizes[0][1] * len(paths)
        why = (f"holds images of different sizes ({rel(paths[0])} {w}x{h}, {rel(paths[other])} "
               f"{sizes[other][0]}x{sizes[other][1]})" if other is not None else
               f"is too large to hold in memory ({len(paths)} images of {w}x{h}: {nbytes / 2 ** 30:.1f} GiB)"
               if nbytes > FOLDER_IN_MEMORY else None)
    if why is None:  # one size, small: decoded once, then every augmentation path works
        ds = TensorImages(torch.stack([_rgb_uint8(p) for p in paths]), labels)
    else:
        ds = FileImages(paths, labels, not_in_memory=f"({rel(folder)}/) {why}")
    _FOLDER_CACHE[key] = classes, paths, ds
    return _FOLDER_CACHE[key]


def _subset(ds, idx, transform, labels=None):
    idx = torch.as_tensor(idx, dtype=torch.int64)
    labels = (ds.labels if labels is None else torch.as_tensor(labels))[idx]
    if isinstance(ds, TensorImages):
        return TensorImages(ds.images[idx], labels, transform)
    return FileImages([ds.paths[i] for i in idx.tolist()], labels, transform, ds.not_in_memory)


def _load_folder(d, split, transform):
    root = os.path.abspath(d["root"])
    classes, _, train = _folder_images(os.path.join(root, "train"), "train")
    everything = torch.arange(len(train))
    if not classes:  # unlabelled: SSL on all; the label-free diagnostics on a fixed sample
        _say(f"data: {root}/train holds images without class folders: unlabelled, SSL only; kNN and linear "
             f"accuracy are off (nan), uniformity/centre norm/feature std/alignment use "
             f"{min(len(train), FOLDER_EVAL_SAMPLE)} of its images. For accuracies sort them into train/<class>/ "
             "(and val/<class>/)")
        if split == "ssl":
            return _subset(train, everything, transform)
        g = torch.Generator().manual_seed(VAL_SEED)
        return _subset(train, torch.randperm(len(train), generator=g)[:FOLDER_EVAL_SAMPLE].sort().values, transform)
    val_dir = os.path.join(root, "val")
    if os.path.isdir(val_dir) and not d.get("val_split", False):
        if split != "test":
            return _subset(train, everything, transform)
        val_classes, _, val = _folder_images(val_dir, "val")
        unknown = sorted(set(val_classes) - set(classes))
        if unknown:
            raise UserError(f"data.name=folder: {val_dir} has class folders that train/ lacks "
                            f"({', '.join(unknown[:3])}): val/ and train/ need the same class names")
        to_train = torch.tensor([classes.index(c) for c in val_classes] or [0])
        return _subset(val, torch.arange(len(val)), transform, labels=to_train[val.labels])
    if not os.path.isdir(val_dir):
        _say(f"data: no {val_dir}: evaluating on a held-out 10% of every class of train/ (fixed seed), left out of "
             "SSL training and the kNN bank")
    kept, held = heldout_split(train.labels, **VAL_DEFAULT, at_least=1)
    if not len(held):
        raise UserError(f"data.name=folder: every class of {root}/train has a single image, none to hold out for "
                        f"evaluation: add {val_dir}/<class>/<image>")
    return _subset(train, held if split == "test" else kept, transform)


def _train_fingerprint(paths):
    h = hashlib.sha1()
    for p in paths:
        h.update(f"{p}\0{os.path.getsize(p)}\n".encode())
    return h.hexdigest()


def folder_stats(d):
    """Per-channel (mean, std) of a ``folder`` dataset: ``data.mean``/``data.std``, or computed over its training
    images once and cached in ``<data.root>/.onefile-ssl-stats.json``."""
    if d.get("mean") is not None or d.get("std") is not None:
        mean, std = d.get("mean"), d.get("std")
        ok = all(isinstance(v, list) and len(v) in (1, 3) and all(isinstance(x, (int, float)) for x in v)
                 for v in (mean, std)) and all(x > 0 for x in std)
        if not ok:
            raise UserError(f"data.mean={mean} data.std={std}: give both, each 3 numbers in [0, 1] units (std > 0), "
                            "e.g. data.mean=[0.485,0.456,0.406] data.std=[0.229,0.224,0.225]; or neither (computed)")
        return tuple(float(x) for x in mean * (3 // len(mean))), tuple(float(x) for x in std * (3 // len(std)))
    root = os.path.abspath(d["root"])
    _, paths, train = _folder_images(os.path.join(root, "train"), "train")
    key = ("stats", root, len(paths))
    if key in _FOLDER_CACHE:
        return _FOLDER_CACHE[key]
    fingerprint, cache = _train_fingerprint(paths), os.path.join(root, STATS_FILE)
    try:
        with open(cache) as f:
            saved = json.load(f)
        if saved.get("fingerprint") == fingerprint:
            _say(f"data: mean {saved['mean']} std {saved['std']} of {root}/train, from {cache}")
            _FOLDER_CACHE[key] = tuple(saved["mean"]), tuple(saved["std"])
            return _FOLDER_CACHE[key]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no cache yet, or unreadable: compute
    n = len(paths)
    idx = (torch.arange(n) if n <= FOLDER_STATS_SAMPLE else
           torch.randperm(n, generator=torch.Generator().manual_seed(VAL_SEED))[:FOLDER_STATS_SAMPLE].sort().values)
    total = torch.zeros(3, dtype=torch.float64)
    squares, pixels = torch.zeros(3, dtype=torch.float64), 0
    for chunk in idx.split(256):
        for x in ([train.images[chunk]] if isinstance(train, TensorImages) else
                  [_rgb_uint8(paths[i])[None] for i in chunk.tolist()]):
            x = x.double().div_(255)
            total += x.sum((0, 2, 3))
            squares += x.square().sum((0, 2, 3))
            pixels += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / pixels
    std = (squares / pixels - mean.square()).clamp_min(0).sqrt().clamp_min(1 / 255)
    mean, std = [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]
    what = f"data: mean {mean} std {std} computed over {len(idx)} images of {root}/train"
    try:
        tmp = f"{cache}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"mean": mean, "std": std, "images": len(idx), "of": n, "fingerprint": fingerprint}, f)
        os.replace(tmp, cache)
        _say(f"{what}, cached in {cache} (data.mean/data.std override it)")
    except OSError as e:
        flat = lambda v: "[" + ",".join(map(str, v)) + "]"  # noqa: E731 - one shell word
        _say(f"{what}; cannot cache them in {cache} ({e.strerror or e}): --set data.mean={flat(mean)} "
             f"data.std={flat(std)} skips this at the next start")
    _FOLDER_CACHE[key] = tuple(mean), tuple(std)
    return _FOLDER_CACHE[key]

"""common.data: the synthetic generator, splits, missing-dataset errors, Fashion-MNIST .gz, ImageNet-100."""
import gzip
import re
import struct
import time

import pytest
import torch
from PIL import Image

from common import config, data, loaders
from common.config import Cfg, UserError

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def cfg(**kw):
    c = Cfg.wrap({"name": "synthetic", "root": "data", "download": False, "image_size": 32, "val_split": False,
                  "workers": 0, "synthetic": {"train_size": 300, "test_size": 100, "size": 16, "classes": 10,
                                              "seed": 0}})
    c.update(kw)
    return c


# ---------------------------------------------------------------------------------------- synthetic
def test_make_synthetic_deterministic_shapes_balanced():
    x, y = data.make_synthetic(203, 16, 10, seed=3)
    assert x.shape == (203, 3, 16, 16) and x.dtype == torch.uint8
    assert y.shape == (203,) and y.dtype == torch.int64
    counts = torch.bincount(y, minlength=10)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 203
    assert not torch.equal(y[:20], torch.arange(20) % 10)  # shuffled, not in class order
    x2, y2 = data.make_synthetic(203, 16, 10, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = data.make_synthetic(203, 16, 10, seed=4)
    assert (x.float() - x3.float()).abs().mean() > 10
    assert x.float().std() > 20  # not blank


def test_make_synthetic_fast():
    t = time.process_time()  # CPU time (one thread): other jobs on a shared machine barely change it
    x, _ = data.make_synthetic(10000, 32, 10, seed=0)
    assert time.process_time() - t < 4.0  # about 1 s; a loop over images would take far longer
    assert x.shape == (10000, 3, 32, 32)


def test_synthetic_stats_match_generator():
    x, _ = data.make_synthetic(2000, 32, 10, seed=0)
    x = x.float().div(255).transpose(0, 1).reshape(3, -1)
    mean, std = data.stats("synthetic")
    assert torch.allclose(x.mean(1), torch.tensor(mean), atol=0.01)
    assert torch.allclose(x.std(1), torch.tensor(std), atol=0.01)


def test_synthetic_classes_not_separable_by_mean_colour():
    x, y = data.make_synthetic(1000, 16, 10, seed=0)
    colour = x.float().mean((2, 3))
    centres = torch.stack([colour[y == k].mean(0) for k in range(10)])
    nearest = torch.cdist(colour, centres).argmin(1)
    assert (nearest == y).float().mean() < 0.3  # chance is 0.1


def test_synthetic_classes_bounds():
    with pytest.raises(UserError, match="classes"):
        data.make_synthetic(10, 16, len(data.SHAPES) + 1, seed=0)


def test_load_synthetic_splits():
    c = cfg()
    ssl, train, test = (data.load(c, s) for s in ("ssl", "train", "test"))
    assert (len(ssl), len(train), len(test)) == (300, 300, 100)
    assert isinstance(train, data.TensorImages)
    img, label = train[0]
    assert img.shape == (3, 16, 16) and img.dtype == torch.uint8 and isinstance(label, int)
    assert torch.equal(ssl.images, train.images)
    # the test split is generated from another seed: no image of it appears in train
    flat_tr, flat_te = train.images.flatten(1).float(), test.images.flatten(1).float()
    assert torch.cdist(flat_te, flat_tr).min() > 0
    assert data.num_classes(c) == 10


def test_load_synthetic_val_split():
    c = cfg(val_split=True)
    full = data.load(cfg(), "train")
    train, test = data.load(c, "train"), data.load(c, "test")
    assert (len(train), len(test)) == (270, 30)  # 10% of every class held out
    assert torch.bincount(test.labels, minlength=10).tolist() == [3] * 10
    # both parts come from the training images, disjoint
    key = lambda ds: {bytes(im.numpy()) for im in ds.images}  # noqa: E731
    assert key(train) | key(test) == key(full) and not key(train) & key(test)
    assert len(data.load(c, "ssl")) == 270


def test_transform_applied():
    ds = data.load(cfg(), "test", transform=lambda im: im.float() / 255)
    assert ds[0][0].dtype == torch.float32


# ---------------------------------------------------------------------------------------- held-out split
def cifar_like_labels(classes, per_class, seed=0):
    return torch.arange(classes).repeat_interleave(per_class)[torch.randperm(classes * per_class,
                                                                             generator=torch.Generator().manual_seed(seed))]


@pytest.mark.parametrize("classes,per_class,held", [(10, 5000, 500), (100, 500, 50)])
def test_heldout_split_per_class(classes, per_class, held):
    labels = cifar_like_labels(classes, per_class)
    kept, val = data.heldout_split(labels, per_class=held)
    assert torch.bincount(labels[val], minlength=classes).tolist() == [held] * classes
    assert len(kept) + len(val) == len(labels)
    assert torch.equal(torch.cat([kept, val]).sort().values, torch.arange(len(labels)))
    kept2, val2 = data.heldout_split(labels, per_class=held)
    assert torch.equal(val, val2)  # fixed seed
    assert not torch.equal(val, data.heldout_split(labels, per_class=held, seed=1)[1])


def test_heldout_split_last():
    kept, val = data.heldout_split(torch.zeros(30000, dtype=torch.long), last=10009)
    assert len(val) == 10009 and len(kept) == 30000 - 10009
    assert val.max() > 20000 and val.min() < 10000  # of a shuffle, not the last file indices
    with pytest.raises(UserError):
        data.heldout_split(torch.zeros(100, dtype=torch.long), last=10009)


def test_load_cifar10_val_split(monkeypatch):
    """load() wires App. B.1: CIFAR-10 500 per class held out of train, returned as test."""
    labels = cifar_like_labels(10, 5000)
    ids = torch.arange(50000)
    images = torch.stack([ids % 256, ids // 256, ids * 0], 1).to(torch.uint8)[:, :, None, None]  # [N, 3, 1, 1]
    monkeypatch.setattr(data, "_small", lambda c, name, part: (images, labels) if part == "train" else None)
    c = cfg(name="cifar10", val_split=True)
    train, test = data.load(c, "train"), data.load(c, "test")
    assert (len(train), len(test)) == (45000, 5000)
    assert torch.bincount(test.labels, minlength=10).tolist() == [500] * 10
    ident = lambda ds: set((ds.images[:, 0, 0, 0].long() + 256 * ds.images[:, 1, 0, 0].long()).tolist())  # noqa
    assert not ident(train) & ident(test) and len(ident(train) | ident(test)) == 50000
    assert torch.equal(labels[sorted(ident(test))], test.labels)  # images keep their labels


# ---------------------------------------------------------------------------------------- missing data
@pytest.mark.parametrize("name", ["cifar10", "cifar100", "stl10", "fashion_mnist"])
def test_missing_dataset_message(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(UserError) as e:
        data.load(cfg(name=name, root="data"), "train")
    msg = str(e.value)
    assert "\n" not in msg and name in msg and str(tmp_path / "data") in msg and "data.download" in msg
    assert list(tmp_path.rglob("*")) == [tmp_path / "data"]  # nothing downloaded or created


@pytest.mark.parametrize("name", ["imagenet", "imagenet100"])
def test_missing_imagenet_message(name, tmp_path):
    with pytest.raises(UserError) as e:
        data.load(cfg(name=name, root=str(tmp_path)), "ssl")
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "imagenet" / "train") in msg and "<wnid>" in msg


def test_unknown_dataset():
    with pytest.raises(UserError, match="cifar10"):
        data.load(cfg(name="mnist"), "train")


# ---------------------------------------------------------------------------------------- fashion-mnist
def write_idx_gz(path, array):
    magic = 0x0800 + array.ndim  # unsigned byte data
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape))
        f.write(array.numpy().tobytes())


@pytest.mark.parametrize("sub", ["", "fashion_mnist"])
def test_fashion_mnist_from_gz_folder(tmp_path, sub):
    folder = tmp_path / sub
    folder.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(0)
    sets = {"train": (7, torch.tensor([9, 0, 0, 3, 0, 2, 7])), "t10k": (4, torch.tensor([1, 2, 3, 4]))}
    for prefix, (n, labels) in sets.items():
        write_idx_gz(folder / f"{prefix}-images-idx3-ubyte.gz",
                     torch.randint(0, 256, (n, 5, 6), generator=g, dtype=torch.uint8))
        write_idx_gz(folder / f"{prefix}-labels-idx1-ubyte.gz", labels.to(torch.uint8))
    train = data.load(cfg(name="fashion_mnist", root=str(tmp_path)), "train")
    test = data.load(cfg(name="fashion_mnist", root=str(tmp_path)), "test")
    assert train.images.shape == (7, 3, 5, 6) and train.images.dtype == torch.uint8
    assert torch.equal(train.images[:, 0], train.images[:, 2])  # gray replicated
    assert train.labels.tolist() == sets["train"][1].tolist() and test.labels.tolist() == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------- imagenet
def test_imagenet100_list():
    wnids = data.imagenet100_classes()
    assert len(wnids) == 100 == len(set(wnids))
    assert all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    assert wnids[0] == "n02869837" and wnids[-1] == "n02090622"  # CMC's order


def test_imagenet_folder_and_imagenet100_filter(tmp_path):
    wnids = data.imagenet100_classes()
    extra = ["n00000001", "n99999999"]
    for split in ("train", "val"):
        for k, w in enumerate(wnids + extra):
            (tmp_path / "imagenet" / split / w).mkdir(parents=True)
            Image.new("RGB", (5, 4), (k, 0, 0)).save(tmp_path / "imagenet" / split / w / "a.png")
    sub = data.load(cfg(name="imagenet100", root=str(tmp_path)), "test")
    assert sub.classes == sorted(wnids) and len(sub) == 100
    img, label = sub[3]
    assert img.shape == (3, 4, 5) and img.dtype == torch.uint8 and sub.classes[label] == sorted(wnids)[3]
    assert img[0, 0, 0] == (wnids + extra).index(sorted(wnids)[3])  # the right file
    full = data.load(cfg(name="imagenet", root=str(tmp_path)), "train")
    assert len(full.classes) == 102 and len(full) == 102
    (tmp_path / "imagenet" / "train" / wnids[5] / "a.png").unlink()
    (tmp_path / "imagenet" / "train" / wnids[5]).rmdir()
    with pytest.raises(UserError, match=wnids[5]):
        data.load(cfg(name="imagenet100", root=str(tmp_path)), "train")


def test_presets_and_stats_cover_datasets():
    assert set(config.PRESETS) == set(config.DATASETS) - {"toy2d"}
    for name in set(config.DATASETS) - {"folder", "toy2d"}:  # folder: its own images' statistics (tests/test_folder.py)
        mean, std = data.stats(name)
        assert len(mean) == len(std) == 3 and all(0 < s < 1 for s in std)
    assert data.num_classes(cfg(name="cifar100")) == 100


# ---------------------------------------------------------------------------------------- training loaders
def _run_cfg(on_device, path="batched", batch=32):
    from common.config import BASE, merge, resolve

    import byol_uniform
    user = {"seed": 3, "data": {"on_device": on_device, "workers": 0,
                                "synthetic": {"train_size": 300, "test_size": 10, "size": 16}},
            "augment": {"path": path}, "optim": {"batch_size": batch}}
    return resolve(merge(BASE, byol_uniform.DEFAULTS), [(user, "test")])


def _epoch(on_device, rank, world, epoch, skip, monkeypatch):
    from common import dist
    monkeypatch.setattr(dist, "world_size", lambda: world)
    monkeypatch.setattr(dist, "rank", lambda: rank)
    c = _run_cfg(on_device)
    loader, sampler = loaders.train_loader(data.load(c.data, "ssl"), c, None, torch.device("cpu"))
    assert isinstance(loader, loaders.DeviceBatches) == on_device
    sampler.set_epoch(epoch)
    sampler.skip_batches = skip
    out = list(loader)
    assert len(out) == len(loader)
    return out


@pytest.mark.parametrize("world,epoch,skip", [(1, 0, 0), (2, 0, 0), (2, 1, 2), (1, 2, 5)])
def test_on_device_loader_yields_the_dataloader_batches(world, epoch, skip, monkeypatch):
    """data.on_device: same batches (images and labels, in order) as the DataLoader path, per rank,
    per epoch and after skip_batches (mid-epoch resume); the ranks' shards are disjoint."""
    seen = []
    for rank in range(world):
        ref, dev = (_epoch(flag, rank, world, epoch, skip, monkeypatch) for flag in (False, True))
        assert len(ref) == len(dev) == 300 // 32 - skip  # 9 batches per epoch: 32 global, 32 / world per rank
        for (xa, ya), (xb, yb) in zip(ref, dev):
            assert xb.dtype == torch.uint8 and xb.shape == (32 // world, 3, 16, 16)
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
        seen.append({bytes(x.numpy()) for xs, _ in dev for x in xs})
    if world == 2:
        assert not seen[0] & seen[1]


def test_on_device_needs_in_memory_data_and_batched_path(tmp_path):
    c = _run_cfg(True, path="cpu")
    with pytest.raises(UserError, match="data.on_device=true needs .*augment.path=batched"):
        loaders.train_loader(data.load(c.data, "ssl"), c, None, torch.device("cpu"))
    c = _run_cfg(True)
    folder = data.torchvision.datasets.FakeData(4)  # any dataset that is not TensorImages (ImageNet)
    with pytest.raises(UserError, match="data.on_device=true"):
        loaders.train_loader(folder, c, None, torch.device("cpu"))

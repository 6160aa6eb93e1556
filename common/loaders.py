"""Batches for training and evaluation, from the datasets of ``common.data``.

``train_loader`` serves this rank's SSL batches: uint8 batches for the batched augmentation path (through a
DataLoader that indexes the in-memory tensor a whole batch at a time, or with ``data.on_device: true`` from
the images kept on the training device, ``DeviceBatches``: same sampler, same batches, no workers), or the
K views made per image in DataLoader workers (``augment.path: cpu | hybrid``). ``ResumableSampler`` is the
DistributedSampler of both, able to skip the first batches of an epoch (exact mid-epoch resume).
``eval_loaders`` gives the un-augmented train/test loaders of the kNN monitor and the linear probe, each rank
its contiguous shard (``evaluate.RankShard``), and the augmented, DDP-sharded loader of the paper probe.
"""
import torch

from common import dist
from common.augment import MultiViewDataset, ViewMaker, eval_transform
from common.config import Cfg, UserError
from common.data import TensorImages, load, num_classes, stats
from common.evaluate import RankShard


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler that can skip the first ``skip_batches`` batches of an epoch (exact mid-epoch
    resume) and forwards ``set_epoch`` to a dataset that has one (per-epoch seeds of the CPU views)."""

    def __init__(self, dataset, batch_size, **kw):
        super().__init__(dataset, **kw)
        self.batch_size, self.skip_batches = batch_size, 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip_batches * self.batch_size:])

    def __len__(self):
        return super().__len__() - self.skip_batches * self.batch_size

    def set_epoch(self, epoch):
        super().set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


class DeviceBatches:
    """``data.on_device: true``: a ``TensorImages`` held on the training device as uint8, batches cut there.

    Each epoch takes this rank's indices from ``sampler`` (the same ``ResumableSampler`` as the DataLoader
    path: same permutation, same DDP shard, same ``skip_batches``), copies them to the device once, and
    yields ``(uint8 [B, 3, H, W], int64 [B])`` by indexing the device tensors: no workers, no per-batch
    host-to-device copy, no host sync. Batches equal the DataLoader path's, element for element.
    """

    def __init__(self, dataset, sampler, batch_size, device):
        self.images, self.labels = dataset.images.to(device), dataset.labels.to(device)
        self.sampler, self.batch_size = sampler, batch_size

    def __len__(self):
        return len(self.sampler) // self.batch_size  # drop_last, as the DataLoader path

    def __iter__(self):
        order = torch.tensor(list(self.sampler), dtype=torch.int64).to(self.images.device, non_blocking=True)
        for b in range(len(self)):
            i = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.images[i], self.labels[i]


def train_loader(dataset, cfg, views, device, batch_size=None):
    """Loader of SSL training batches for this rank: ``(uint8 [B,3,H,W], labels)`` on the batched
    augmentation path, ``([view_1, ..., view_K], labels)`` on the CPU and hybrid paths (``augment.path``).

    The global ``batch_size`` (default ``optim.batch_size``) is split evenly over the ranks; returns ``(loader,
    sampler)``. With ``data.on_device: true`` (batched path, in-memory datasets) the loader is a ``DeviceBatches``.
    """
    world, path, name = dist.world_size(), cfg.augment.path, "optim.batch_size" if batch_size is None else \
        "eval.linear_batch_size"
    batch_size = cfg.optim.batch_size if batch_size is None else batch_size
    if batch_size % world:
        raise UserError(f"{name}={batch_size} must be divisible by the {world} processes")
    local, on_device = batch_size // world, cfg.data.on_device
    if on_device and (path != "batched" or not isinstance(dataset, TensorImages)):
        raise UserError(f"data.on_device=true needs an in-memory dataset (synthetic, cifar10, cifar100, stl10, "
                        f"fashion_mnist, a small folder of one image size) and augment.path=batched; got "
                        f"data.name={cfg.data.name}, augment.path={path}: set data.on_device=false")
    if path != "batched":  # per-image transforms in DataLoader workers
        dataset = MultiViewDataset(dataset, views.cpu_transforms(), cfg.seed)
    elif not isinstance(dataset, TensorImages):
        why = getattr(dataset, "not_in_memory", "is decoded from files")
        raise UserError(f"augment.path=batched needs a dataset held in memory at one image size; {cfg.data.name} "
                        f"{why}: set augment.path=hybrid (crop in workers, the rest on the device) or "
                        "augment.path=cpu")
    sampler = ResumableSampler(dataset, local, num_replicas=world, rank=dist.rank(), shuffle=True, seed=cfg.seed,
                               drop_last=True)
    if on_device:
        return DeviceBatches(dataset, sampler, local, device), sampler
    common = dict(pin_memory=device.type == "cuda", generator=torch.Generator())
    if path != "batched":
        loader = torch.utils.data.DataLoader(dataset, local, sampler=sampler, num_workers=cfg.data.workers,
                                             drop_last=True, **common)
    else:  # whole-batch indexing of the in-memory tensor; augmentation happens on the device
        batches = torch.utils.data.BatchSampler(sampler, local, drop_last=True)
        loader = torch.utils.data.DataLoader(dataset, sampler=batches, batch_size=None, **common)
    return loader, sampler


def _eval_loader(dataset, batch_size, workers):
    """This rank's contiguous shard of ``dataset`` in the one-process batches (``RankShard``): an in-memory set is
    indexed (and transformed) a whole batch at a time, files are decoded and transformed per image in the workers.
    Own generator: evaluating leaves torch's RNG alone."""
    batches, gen = RankShard(len(dataset), batch_size), torch.Generator()
    if isinstance(dataset, TensorImages):
        return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=batches, generator=gen)
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers, generator=gen)


def _check_linear_batch(batch_size, n):
    """The paper probe drops each epoch's last incomplete batch: a batch larger than its set would take no step."""
    if batch_size > n:
        raise UserError(f"eval.linear_batch_size={batch_size} exceeds the {n} images of the linear probe's training "
                        f"set, so the paper probe would take no step (an incomplete batch is dropped): set "
                        f"eval.linear_batch_size={n} or less")


def eval_loaders(cfg):
    """Un-augmented loaders for evaluation: ``{"train", "test", "num_classes"}`` (train = kNN memory bank /
    linear-probe training set), each rank its contiguous shard (``RankShard``); with ``eval.linear:
    paper`` also ``"train_aug"``, its ``"train_aug_sampler"`` and ``"augment"`` (random resized crop + flip on
    the training device, the linear-evaluation protocol of Grill et al.): each rank gets its
    ``eval.linear_batch_size / W`` images of every global batch (a seeded ``DistributedSampler``, as in
    training; the last incomplete batch of an epoch is dropped) and its own augmentation stream."""
    d, e = cfg.data, cfg.eval
    mean, std = stats(d)
    tf = eval_transform(d.name, d.image_size, mean, std, e.crop)
    out = {split: _eval_loader(load(d, split, tf), e.batch_size, d.workers) for split in ("train", "test")}
    out["num_classes"] = num_classes(d)
    if out["num_classes"] == 1:  # a folder of one class: every prediction right; evaluate as unlabelled
        out["num_classes"] = 0
        if dist.is_main():
            print(f"note: the labelled training set (data.name={d.name}) has one class; evaluation needs two or "
                  "more: no kNN or linear accuracies (kNN nan, no linear probe)", flush=True)
    bank = len(out["train"].dataset)
    if out["num_classes"] and max(e.knn_k) > bank:  # (0 classes: an unlabelled folder, no kNN)
        raise UserError(f"eval.knn_k={e.knn_k} asks for more neighbours than the {bank} images of the kNN memory "
                        "bank (the labelled training set): lower eval.knn_k")
    if e.linear == "paper":  # the training loader's batches (its sampler, workers, paths), un-jittered views
        aug = {**cfg.augment, "jitter_p": 0.0, "gray_p": 0.0, "blur_p": [0.0], "solarize_p": [0.0]}
        maker = ViewMaker(aug, 1, d.image_size, mean, std, dist.device(cfg), dist.rank_seed(cfg.seed))
        train = load(d, "train")
        _check_linear_batch(e.linear_batch_size, len(train))
        on_device = {**cfg, "data": {**d, "on_device": False}}  # (the probe's images stay where they are)
        out["train_aug"], sampler = train_loader(train, Cfg.wrap(on_device), maker, maker.device, e.linear_batch_size)
        out["train_aug_sampler"] = sampler
        out["augment"] = lambda batch: maker(batch)[0]
    return out

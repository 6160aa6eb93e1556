"""Evaluation of a frozen encoder, the functions: k-NN, linear probes and representation diagnostics. (The run's
evaluation at the end of an epoch is ``common.run.Run.evaluate``, which calls ``monitor``; the command that evaluates a
saved checkpoint is ``python -m common.tools.evaluate``.)

* k-NN (``knn_accuracies``): cosine similarity of l2-normalised features; the k most similar bank (training)
  samples vote. Weighted (Wu et al. 2018, the BYOL-family papers' monitor): each votes ``exp(sim / T)``,
  default k = 200, T = 0.1. Majority (``weighted=False``): ties go to the larger summed similarity, then to the
  lower class. Neighbours of equal similarity: the lower bank index first. k above the bank's size uses the
  whole bank. Top-1 in percent.
* Linear probes, offline, zero-initialised ``nn.Linear``, cosine lr: ``linear_probe`` (fast: cached
  un-augmented features, standardised) and ``linear_probe_augmented`` (the papers' protocol: the caller's
  augmentation on each training batch, the encoder frozen in eval mode); top-1/top-5 on the test set.
* Diagnostics: Wang & Isola's alignment (alpha 2) and uniformity (t 2), the centre-vector norm, ``||Sigma -
  I||_F^2`` of the feature correlation, the effective rank of the covariance spectrum, the mean per-dimension
  std of the l2-normalised rows (SimSiam's collapse indicator: ~1/sqrt(d) healthy, ~0 collapsed;
  ``projection_std``, which every script's loss also returns at each step for the online projections).

Several processes: ``monitor`` and ``final_linear_eval`` are collective (every rank calls them with the same
weights and gets the same dict). Each rank encodes its contiguous shard of each set (``RankShard``: at most
ceil(N / W) rows, in the one-process batches, so every feature is the one of one process, bit for bit on CPU at
the same number of threads). What grows with the training set stays sharded: the kNN bank (each rank scores every
query against its rows; the per-rank top-k are merged, ties to the lower index: one process's accuracies, exactly)
and the fast probe's training features (each step gathers its batch's rows: one process's probe). The test set,
the queries, is gathered to every rank. The paper probe trains its head in DDP on the same images per step as one
process; it differs by round-off and, on the batched augmentation path, by each rank's own random draws
(tests/test_evaluate_dist.py: within one test image of one process with one process's views, within the
seed-to-seed spread with batched random views).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import dist
from .config import UserError


class Interrupted(Exception):
    """An evaluation stopped at a safe point because its ``stop()`` said so (a signal: ``common.run``)."""


def _check(stop):
    """Raise ``Interrupted`` if ``stop()`` (collective: every rank calls it at the same points) says so."""
    if stop is not None and stop():
        raise Interrupted


class RankShard(torch.utils.data.Sampler):
    """This rank's rows of an evaluation set of ``n`` items: the contiguous shard ``[lo, hi)`` of at most
    ``ceil(n / W)`` rows (rank order = one-process order), read in the one-process batches of ``batch_size``: a
    batch that crosses the shard's edge is read whole and ``extract_features`` keeps its rows in the shard, so
    every feature is computed in the same batch as in one process (bit for bit on CPU: a batch's size changes
    the kernels' round-off). A DataLoader's ``batch_sampler`` (or, with ``batch_size=None``, its ``sampler``)."""

    def __init__(self, n, batch_size):
        self.n, self.batch_size = n, batch_size

    def bounds(self, rank=None):
        step = -(-self.n // dist.world_size())
        r = dist.rank() if rank is None else rank
        return min(self.n, r * step), min(self.n, (r + 1) * step)

    def batch_ids(self, rank=None):
        lo, hi = self.bounds(rank)
        return range(lo // self.batch_size, -(-hi // self.batch_size) if hi > lo else lo // self.batch_size)

    def __iter__(self):
        for b in self.batch_ids():
            yield list(range(b * self.batch_size, min(self.n, (b + 1) * self.batch_size)))

    def __len__(self):
        return len(self.batch_ids())


def _shard(loader):
    return next((s for s in (getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None))
                 if isinstance(s, RankShard)), None)


@torch.no_grad()
def extract_features(encoder, loader, device, stop=None, gather=True):
    """Run ``encoder`` (in eval mode) over ``loader``; returns (float32 [N, D], int64 labels [N]) on ``device``.

    A loader batched by ``RankShard`` under W > 1 processes is collective: each rank encodes its shard;
    ``gather=True`` returns the whole set on every rank (in the one-process order), ``gather=False`` only this
    rank's rows ``[lo, hi)`` of ``RankShard.bounds`` (a kNN bank or a probe's training set, which grow with the
    data). Any other loader is read whole by the calling rank. ``stop()`` is asked before each batch that every
    rank has. The encoder's previous train/eval mode is restored afterwards.
    """
    was_training = encoder.training
    encoder.eval()
    feats, labels, shard = [], [], _shard(loader)
    ids = list(shard.batch_ids()) if shard else range(len(loader))
    in_step = min(len(shard.batch_ids(r)) for r in range(dist.world_size())) if shard else len(loader)
    lo, hi = shard.bounds() if shard else (0, math.inf)
    try:
        for i, (b, (x, y)) in enumerate(zip(ids, loader)):
            if i < in_step:
                _check(stop)
            f = encoder(x.to(device, non_blocking=True)).flatten(1).float()
            keep = slice(max(lo - b * shard.batch_size, 0), hi - b * shard.batch_size) if shard else slice(None)
            feats.append(f[keep])
            labels.append(y.to(device).long()[keep])
    finally:
        encoder.train(was_training)
    f = torch.cat(feats) if feats else torch.empty(0, 0, device=device)  # a rank may have no rows
    y = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long, device=device)
    if shard is None or not gather or dist.world_size() == 1:
        return f, y
    return torch.cat(dist.all_gather_uneven(f)), torch.cat(dist.all_gather_uneven(y))


# ----------------------------------------------------------------------------- k-NN
def _vote(sims, nb_labels, num_classes, t, weighted):
    """Class predictions [M] from neighbour similarities [M, k] and their labels [M, k]."""
    def per_class(v):  # sum v over the neighbours of each class -> [M, C]
        return torch.zeros(v.shape[0], num_classes, dtype=v.dtype, device=v.device).scatter_add_(1, nb_labels, v)
    if weighted:
        # exp(sim / t) up to a common per-query factor exp(-max / t): same argmax, no overflow for small t
        return per_class(((sims - sims.max(1, keepdim=True).values) / t).exp()).argmax(1)
    counts = per_class(torch.ones_like(sims))
    tied = counts == counts.max(1, keepdim=True).values
    return per_class(sims).masked_fill(~tied, -math.inf).argmax(1)  # argmax: first index among equal values


def _num_classes(num_classes, train_y, test_y, sharded):
    if num_classes is not None:
        return num_classes
    top = torch.stack([y.max() if len(y) else torch.tensor(-1, device=y.device) for y in (train_y, test_y)]).max()
    return int(max(dist.all_gather_uneven(top[None]) if sharded else [top])) + 1


def _rows_of_ranks(n_own, device, w):
    """(every rank's row count, this rank's first global row, all rows) of a set split in rank order over ``w``
    ranks (``w`` = 1: this rank's rows are the whole set)."""
    sizes = [int(x) for x in dist.all_gather_uneven(torch.tensor([n_own], device=device))] if w > 1 else [n_own]
    return sizes, sum(sizes[:dist.rank()]) if w > 1 else 0, sum(sizes)


def _best(sims, idx, k):
    """The ``k`` best (similarity, index) columns of each row: most similar first, the lower bank index first
    among equal similarities (one order whatever the sharding: ties broken as one process breaks them)."""
    order = idx.argsort(dim=1)
    sims, idx = sims.gather(1, order), idx.gather(1, order)
    order = sims.argsort(dim=1, descending=True, stable=True)[:, :k]
    return sims.gather(1, order), idx.gather(1, order)


def _top(sims, k):
    """``_best`` of a block whose columns are in index order (``topk``, and a stable sort only for the rows where
    a tie straddles the k-th place, which ``topk`` may cut either way)."""
    vals, idx = sims.topk(k, dim=1)
    tied = (sims >= vals[:, -1:]).sum(1) > k
    if tied.any():
        idx[tied] = sims[tied].argsort(dim=1, descending=True, stable=True)[:, :k]
        vals[tied] = sims[tied].gather(1, idx[tied])
    return _best(vals, idx, k)


@torch.no_grad()
def knn_accuracies(train_f, train_y, test_f, test_y, ks=(200,), t=0.1, num_classes=None, weighted=True,
                   chunk=1024, sharded=False, block=4096):
    """{"knn<k>": top-1 %} for every k in ``ks``; the top-max(ks) search is done once and sliced.

    ``sharded=True`` (collective under W > 1 processes): ``train_f, train_y`` are this rank's contiguous rows
    of the bank (``extract_features(..., gather=False)``), the queries ``test_f, test_y`` the whole set on every
    rank. Each rank scores every query against its rows and keeps its top-k (similarity, bank index); the
    ranks' candidates are gathered and merged (``_best``): the neighbours of one process, exactly, ties
    included. The similarities are computed in equal column blocks of at most ``block`` bank rows at the
    one-process positions (an edge block zero-padded to full width), so each is the one process's number bit for bit
    (a matrix product's round-off depends on its shape). ``num_classes=0`` (no labels: an unlabelled
    ``data.name=folder``): nan for every k.
    """
    if num_classes == 0:
        return {f"knn{k}": math.nan for k in ks}
    w, device, n_own = dist.world_size() if sharded else 1, test_f.device, len(train_f)
    sizes, lo, n = _rows_of_ranks(n_own, device, w)
    c = _num_classes(num_classes, train_y, test_y, w > 1)
    kmax = min(max(ks), n)
    block = max(-(-n // max(-(-n // block), 1)), kmax)  # equal blocks of at most ``block`` rows (a function of n alone)
    bank, bank_y = F.normalize(train_f.to(device).float(), dim=1), train_y.to(device)
    queries, test_y = F.normalize(test_f.float(), dim=1), test_y.to(device)
    correct = torch.zeros(len(ks), dtype=torch.long, device=device)
    for start in range(0, len(queries), chunk):
        q = queries[start:start + chunk]
        best_s = torch.full((len(q), kmax), -math.inf, device=device)
        best_i = torch.full((len(q), kmax), n, dtype=torch.long, device=device)  # n: no row
        for b in range(lo // block * block, lo + n_own, block) if n_own else ():  # one-process blocks [b, b+block)
            a, z = max(b, lo), min(b + block, lo + n_own)
            rows = bank.new_zeros(block, bank.shape[1])
            rows[a - b:z - b] = bank[a - lo:z - lo]
            sims = q @ rows.T
            sims[:, :a - b], sims[:, z - b:] = -math.inf, -math.inf  # padding: never a neighbour
            s, i = _top(sims, kmax)
            best_s, best_i = _best(torch.cat([best_s, s], 1), torch.cat([best_i, i + b], 1), kmax)
        if w > 1:  # merge the ranks' candidates (at least kmax of them are real rows)
            best_s, best_i = _best(torch.cat(dist.all_gather_uneven(best_s.T.contiguous())).T,
                                   torch.cat(dist.all_gather_uneven(best_i.T.contiguous())).T, kmax)
        mine = (best_i >= lo) & (best_i < lo + n_own)  # each neighbour's label, from the rank that holds it
        labels = torch.zeros_like(best_i)
        labels[mine] = bank_y[best_i[mine] - lo]
        labels = dist.all_reduce_sum(labels) if w > 1 else labels
        for j, k in enumerate(ks):
            correct[j] += (_vote(best_s[:, :k], labels[:, :k], c, t, weighted) == test_y[start:start + chunk]).sum()
    return {f"knn{k}": 100.0 * (n_ok / len(test_y)) for k, n_ok in zip(ks, correct.tolist())}


# ----------------------------------------------------------------------------- linear probes
def _make_optimizer(name, params, lr, weight_decay, momentum, nesterov=False):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise UserError(f"linear probe optimizer must be sgd, adam or adamw, got {name!r}")


def _cosine(opt, total_steps):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps)
                                                                                 / max(total_steps, 1))))


def _zero_linear(d, c, device):
    head = nn.Linear(d, c).to(device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)  # zero init: deterministic without touching the global RNG (the loss is convex)
    return head


def _topk_correct(logits, y, num_classes):
    top = logits.topk(min(5, num_classes), dim=1).indices
    hit = top == y[:, None]
    return hit[:, 0].sum().item(), hit.any(1).sum().item()


def _fit(head, epochs, steps, epoch_batches, optimizer, lr, weight_decay, momentum, nesterov=False, stop=None):
    """Train ``head`` by cross-entropy on the (features, labels) of ``epoch_batches(epoch)``, ``steps`` per epoch,
    cosine lr over all of them; ``stop()`` is asked before every epoch."""
    opt = _make_optimizer(optimizer, head.parameters(), lr, weight_decay, momentum, nesterov)
    sched = _cosine(opt, epochs * steps)
    for epoch in range(epochs):
        _check(stop)
        for f, y in epoch_batches(epoch):
            with torch.enable_grad():
                loss = F.cross_entropy(head(f), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            sched.step()


def linear_probe(train_f, train_y, test_f, test_y, num_classes, epochs=100, batch_size=256, lr=0.1,
                 weight_decay=0.0, optimizer="sgd", momentum=0.9, seed=0, stop=None, sharded=False):
    """Linear classifier on cached frozen features, standardised with the training mean/std, shuffled by ``seed``;
    returns {"top1": %, "top5": %} on the test features.

    ``sharded=True`` (collective under W > 1): ``train_f, train_y`` are this rank's contiguous rows of the
    training features (``extract_features(..., gather=False)``), the test features the whole set. Each step
    gathers only the rows of its batch, so every rank trains the one process's probe on the same batches (the
    mean and std are float64 sums over the ranks: one process's up to float64 round-off)."""
    device, w = train_f.device, dist.world_size() if sharded else 1
    train_f, n_own = train_f if len(train_f) else test_f.new_zeros(0, test_f.shape[1]), len(train_f)
    sizes, lo, n = _rows_of_ranks(n_own, device, w)
    x = train_f.double()
    total = torch.stack([x.sum(0), x.pow(2).sum(0)])
    total = dist.all_reduce_sum(total) if w > 1 else total
    mean = total[0] / n
    std = ((total[1] - n * mean.pow(2)).clamp_min(0) / (n - 1)).sqrt().float() + 1e-6
    mean = mean.float()
    xtr, xte = (train_f.float() - mean) / std, (test_f.float().to(device) - mean) / std
    ytr, yte = train_y.to(device), test_y.to(device)
    starts = torch.tensor([sum(sizes[:r]) for r in range(w)] + [n], device=device)

    def rows(b):  # the features and labels of global rows b, gathered from the ranks that hold them
        if w == 1:
            return xtr[b], ytr[b]
        owner = torch.bucketize(b, starts[1:], right=True)
        mine = b[owner == dist.rank()] - lo
        f, y = xtr.new_empty(len(b), xtr.shape[1]), torch.empty_like(b)
        for r, (fr, yr) in enumerate(zip(dist.all_gather_uneven(xtr[mine]), dist.all_gather_uneven(ytr[mine]))):
            f[owner == r], y[owner == r] = fr, yr
        return f, y

    head, gen = _zero_linear(xte.shape[1], num_classes, device), torch.Generator().manual_seed(seed)
    _fit(head, epochs, math.ceil(n / batch_size), lambda epoch: (rows(b) for b in torch.randperm(
        n, generator=gen).to(device).split(batch_size)), optimizer, lr, weight_decay, momentum, stop=stop)
    with torch.no_grad():
        c1, c5 = _topk_correct(head(xte), yte, num_classes)
    return {"top1": 100.0 * c1 / len(yte), "top5": 100.0 * c5 / len(yte)}


def linear_probe_augmented(encoder, feat_dim, num_classes, train_loader, test_loader, augment, device, epochs,
                           lr, weight_decay=0.0, momentum=0.9, optimizer="sgd", nesterov=False, sampler=None,
                           stop=None):
    """Paper protocol: frozen encoder (eval, no grad), ``augment(batch) -> float tensor on device`` on every
    training batch (it moves the batch to the device itself), linear head with the given optimizer and cosine lr
    over ``epochs * len(train_loader)`` steps. Returns {"top1": %, "top5": %} on ``test_loader`` (no
    augmentation). Encoder mode is restored. Under W > 1 processes collective: the head is trained in DDP
    (``train_loader`` gives this rank its share of each global batch; ``sampler.set_epoch`` every epoch) and the
    test counts of the ranks' shares of ``test_loader`` are summed.
    """
    def epoch_batches(epoch):
        if sampler is not None:
            sampler.set_epoch(epoch)
        for x, y in train_loader:  # (DDP: every rank the same number of steps, so each asks stop() in step)
            _check(stop)
            with torch.no_grad():
                f = encoder(augment(x)).flatten(1).float()
            yield f, y.to(device)

    was_training = encoder.training
    encoder.eval()
    head = dist.ddp(_zero_linear(feat_dim, num_classes, device), torch.device(device))
    try:
        _fit(head, epochs, len(train_loader), epoch_batches, optimizer, lr, weight_decay, momentum, nesterov, stop)
        test_f, test_y = extract_features(encoder, test_loader, device, stop, gather=False)  # this rank's rows
        with torch.no_grad():
            c1, c5 = _topk_correct(head(test_f), test_y, num_classes) if len(test_y) else (0, 0)
        c1, c5, n = dist.all_reduce_sum(torch.tensor([c1, c5, len(test_y)], device=device)).tolist()
    finally:
        encoder.train(was_training)
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n}


# ----------------------------------------------------------------------------- diagnostics
def alignment(z1, z2, alpha=2):
    """Wang & Isola 2020 alignment: mean over pairs of ||z1_i - z2_i||_2^alpha (l2-normalised rows)."""
    return (F.normalize(z1, dim=1) - F.normalize(z2, dim=1)).norm(dim=1).pow(alpha).mean()


def uniformity(z, t=2):
    """Wang & Isola 2020 uniformity: log mean_{i != j} exp(-t ||z_i - z_j||^2) (l2-normalised rows).

    Differentiable and stable: logsumexp over the off-diagonal entries minus log(n(n-1)); for unit
    vectors ||a - b||^2 = 2 - 2 a.b, which avoids the non-differentiable sqrt at zero distance.
    """
    z = F.normalize(z, dim=1)
    n = z.shape[0]
    sq = (2 - 2 * z @ z.T).clamp_min(0)
    off = ~torch.eye(n, dtype=torch.bool, device=z.device)
    return torch.logsumexp(-t * sq[off], dim=0) - math.log(n * (n - 1))


def center_vector_norm(z):
    """||s|| with s the mean of the l2-normalised rows (1: all rows identical, 0: centred)."""
    return F.normalize(z, dim=1).mean(0).norm()


def correlation_distance(f, eps=1e-8):
    """||Sigma - I||_F^2 with Sigma the correlation matrix of the feature dims of ``f`` [N, D] over the batch."""
    fc = f - f.mean(0)
    zs = fc / (fc.pow(2).sum(0).div(f.shape[0] - 1).sqrt() + eps)
    corr = zs.T @ zs / (f.shape[0] - 1)
    return (corr - torch.eye(f.shape[1], dtype=f.dtype, device=f.device)).pow(2).sum()


def covariance_spectrum(z):
    """Singular values (descending, float64) of the covariance matrix over the rows of the l2-normalised ``z``
    [N, D]: the eigenvalues of a symmetric PSD matrix, summing to the rows' total variance (<= 1)."""
    zn = F.normalize(z.double(), dim=1)
    zc = zn - zn.mean(0)
    return torch.linalg.svdvals(zc.T @ zc / (z.shape[0] - 1))


def effective_rank(sv):
    """exp of the entropy of the normalised spectrum ``sv / sum(sv)`` (Roy & Vetterli 2007): 1 when one
    direction holds all the variance (dimensional collapse), D when all D singular values are equal (isotropic,
    the ball shape MSBReg's singular-value loss pushes towards); 0 for an all-zero spectrum (full collapse)."""
    if sv.sum() <= 0:
        return torch.zeros((), dtype=sv.dtype)
    p = sv / sv.sum()
    p = p[p > 0]
    return torch.exp(-(p * p.log()).sum())


@torch.no_grad()
def projection_std(z):
    """The collapse signal (SimSiam §4.1): the std over the batch (unbiased) of the l2-normalised rows of ``z``
    [B, d], averaged over the d dimensions; a 0-dim tensor on ``z``'s device (no sync). About 1/sqrt(d) when the
    rows spread over the sphere, 0 when they collapse to one point."""
    return F.normalize(z.float(), dim=1).std(0).mean()


def feature_std(z):
    """``projection_std`` of the features ``z``, as a number."""
    return projection_std(z).item()


# ----------------------------------------------------------------------------- what the scripts call
def monitor(encoder, loaders, device, eval_cfg, views=None, test_features=False, stop=None):
    """The per-eval metrics every script logs. Collective: every rank calls it and gets the same dict.

    ``loaders``: ``{"train", "test", "num_classes"}`` from ``loaders.eval_loaders`` (un-augmented). Weighted kNN
    at each ``eval_cfg.knn_k`` (T = ``eval_cfg.knn_t``, cosine, the training set as memory bank, sharded over the
    ranks: one process's accuracies, exactly) on encoder features; of the test features: uniformity (t=2, on up
    to 2048), the centre-vector norm, the collapse indicator ``feature_std``, ``corr_dist`` (||Sigma - I||_F^2 of
    the correlation matrix, Decorr Fig. 1) and ``erank`` (effective rank of the covariance spectrum of the
    l2-normalised features); given ``views=(x1, x2)`` (two augmented views of this rank's batch), the alignment
    (alpha=2) of the encoder features of the two views, averaged over the views of all ranks.
    ``test_features=True``: returns ``(metrics, test features)``, for metrics of the script's own on the same
    features (the ``diagnostics`` a script gives ``Run.resume_or_evaluate_init``).
    """
    bank_f, bank_y = extract_features(encoder, loaders["train"], device, stop, gather=False)  # this rank's rows
    test_f, test_y = extract_features(encoder, loaders["test"], device, stop)
    _check(stop)
    out = knn_accuracies(bank_f, bank_y, test_f, test_y, ks=tuple(eval_cfg.knn_k), t=eval_cfg.knn_t,
                         num_classes=loaders["num_classes"], sharded=True)
    out["uniformity"] = uniformity(test_f[:2048]).item()
    out["center_norm"] = center_vector_norm(test_f).item()
    out["feature_std"] = feature_std(test_f)
    out["corr_dist"] = correlation_distance(test_f.double()).item()
    out["erank"] = effective_rank(covariance_spectrum(test_f)).item()
    if views is not None:
        a = alignment(apply_eval(encoder, views[0]).float(), apply_eval(encoder, views[1]).float())
        out["alignment"] = a.item() if dist.world_size() == 1 else _mean_over_ranks(a, len(views[0]))
    return (out, test_f) if test_features else out


@torch.no_grad()
def apply_eval(module, x):
    """``module(x)`` in eval mode (BN running statistics), no gradient; the module's mode is restored."""
    was_training = module.training
    module.eval()
    try:
        return module(x)
    finally:
        module.train(was_training)


def _mean_over_ranks(mean, n):
    """The mean over the samples of all ranks, from each rank's ``mean`` over its ``n`` samples."""
    s = dist.all_reduce_sum(torch.stack([mean.double() * n, torch.tensor(float(n), dtype=torch.float64,
                                                                          device=mean.device)]))
    return (s[0] / s[1]).item()


def final_linear_eval(encoder, loaders, device, cfg, stop=None):
    """Linear accuracy of the frozen encoder (offline): ``cfg.eval.linear`` = fast | paper | none.
    Collective: every rank calls it and gets the same dict.

    fast: ``linear_probe`` on cached un-augmented features (the training features sharded, each step's batch
    gathered; every rank trains one process's probe). paper: ``linear_probe_augmented`` with the random-crop + flip
    loader ``loaders["train_aug"]`` / ``loaders["augment"]`` (BYOL-MHE App. D: SGD), the head in DDP (one
    process's result up to round-off and the augmentation's random draws; module docstring).
    """
    e = cfg.eval
    if e.linear == "none" or loaders.get("num_classes") == 0:  # 0: no labels (an unlabelled data.name=folder)
        return {}
    if e.linear == "fast":
        train_f, train_y = extract_features(encoder, loaders["train"], device, stop, gather=False)
        test_f, test_y = extract_features(encoder, loaders["test"], device, stop)
        res = linear_probe(train_f, train_y, test_f, test_y, loaders["num_classes"], epochs=e.linear_epochs,
                           batch_size=e.linear_batch_size, lr=e.linear_lr, weight_decay=e.linear_weight_decay,
                           optimizer=e.linear_optimizer, seed=cfg.seed, stop=stop, sharded=True)
    else:
        size = cfg.data.image_size  # the encoder's feature size, from one blank image (no data, no collective)
        feat_dim = apply_eval(encoder, torch.zeros(1, 3, size, size, device=device)).flatten(1).shape[1]
        res = linear_probe_augmented(encoder, feat_dim, loaders["num_classes"], loaders["train_aug"],
                                     loaders["test"], loaders["augment"], device, e.linear_epochs, e.linear_lr,
                                     e.linear_weight_decay, optimizer=e.linear_optimizer,
                                     sampler=loaders["train_aug_sampler"], stop=stop)
    return {"linear_top1": res["top1"], "linear_top5": res["top5"], "linear_protocol": f"{e.linear} (offline)"}

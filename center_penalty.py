"""Centre-vector penalty (simplified SSL objective) and the SimSiam collapse studies, one file.

Paper: Jha, Blaschko, Asano, Tuytelaars, "The common Stability Mechanism behind most
Self-Supervised Learning Approaches" (CenterVector), §2.1, §2.3, §3.1-3.2, App. B.1, B.3, B.4.

    z̄ = f(x) / ||f(x)||                                   (§2.1)   here f = projector ∘ encoder
    s = E_x E_ω [ z̄(ω(x)) ]                               (Eq. 1)  mean over the global batch, all views
    L(f) = E ||z̄_a - z̄_b||²                               (Eq. 2)  the invariance loss, no stop-gradient
    L_simple = 0.5 (L(f) - λ_L ||s||),  λ_L = -1           (Eq. 32) i.e. 0.5 (invariance + ||s||)
    L_SimSiam = ½ E[-<p̄_a, sg(z̄_b)> - <p̄_b, sg(z̄_a)>]    (Eq. 15), p = h(z) the predictor

``loss.variant`` picks the objective (Fig. 3, Fig. 4, App. B.3):

    center_penalty        Eq. 32: no predictor, no stop-gradient, no EMA
    invariance_only       Eq. 2 alone (0.5 L(f)): the objective that collapses (§2.1, App. B.1)
    simsiam               Eq. 15 with predictor h and stop-gradient (Chen & He)
    simsiam_no_predictor  Eq. 15 with p = z (collapses: §3.2, App. B.3)
    simsiam_no_stopgrad   Eq. 15 without sg (collapses: §3.2)

With K > 2 views of an image (the App. B.1 toy: 10 augmentations) the invariance loss averages
over all view pairs a<b and SimSiam over all ordered pairs a≠b; with K = 2 both are the equations.
The predictor's lr is the base lr times ``simsiam.pred_lr_mult`` (App. B.4's "x% of the predictor
lr") and, as in SimSiam, not decayed when ``simsiam.fix_pred_lr``. Every variant logs ||s|| of the
training batch every step (``s_norm``) and, every epoch, kNN, the centre-vector norm of the encoder
features (``center_norm``) and of the normalised z (``s_norm_test``) on the test set.

Data: any image dataset (``data.name``), or ``data.name: toy2d`` with ``toy.dataset`` in
blobs | moons (§3.2: 2-D, 3 classes, the samples of one class are the augmentations of one
"image", so a pair of views = two samples of one class) | app_b1 (App. B.1: 100 3-D points,
10 augmentations each, centred or shifted). Toy runs use a small MLP encoder (no projector), run on
one process in seconds, once per seed of ``toy.seeds``, and report the mean and std over seeds.

Run:
    python center_penalty.py --config configs/quickstart/center_penalty.yaml           # CPU, minutes
    python center_penalty.py --config configs/center_penalty/toy_blobs.yaml --set loss.variant=simsiam
    python center_penalty.py --config configs/center_penalty/toy_app_b1_minibatch_centred.yaml
    torchrun --nproc_per_node=4 center_penalty.py --config configs/center_penalty/imagenet100_simsiam.yaml

Image set-up (DEFAULTS): the paper names no optimiser, lr, batch, epochs or augmentation for its image runs; the
project's choice is SimSiam's recipe (Chen & He 2021): SGD lr 0.05 x batch/256, momentum 0.9, wd 1e-4, batch 512,
100 epochs, and SimSiam's symmetric views (crop scale (0.2, 1), jitter (0.4, 0.4, 0.4, 0.1) p 0.8, grayscale 0.2,
blur p 0.5, flip, no solarisation; the CIFAR-like dataset presets drop the blur), not BYOL's asymmetric pair.

BatchNorm on z: every variant, ``center_penalty`` included, keeps SimSiam's last BatchNorm on the projector output
(``model.proj_last_bn: true``). That layer itself centres every coordinate of z over the batch before the l2
normalisation, which is the mechanism the paper credits to BN (§3.3: BN "helps in estimating the dataset center
vector and its removal through BN"); ``--set model.proj_last_bn=false`` leaves the penalty of Eq. 32 alone.

Deviations and the choices the paper leaves open (toy and image set-ups): configs/center_penalty/README.md.
"""
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import dist, log
from common.config import UserError, parse
from common.evaluate import apply_eval, center_vector_norm, extract_features, knn_accuracies, projection_std
from common.models import maybe_compile, mlp, resnet
from common.optim import build, lr_at, param_groups, scaled_lr, set_lr
from common.run import Run

METHOD = "center_penalty"
VARIANTS = ("center_penalty", "invariance_only", "simsiam", "simsiam_no_predictor", "simsiam_no_stopgrad")
DEFAULTS = {
    "loss": {"variant": "center_penalty",
             "lambda_l": -1.0},             # λ_L of Eq. 32 (§3.1: -1)
    "simsiam": {"pred_lr_mult": 1.0,        # predictor lr = base lr x this (App. B.4: 0.01 ... 1)
                "fix_pred_lr": True},       # SimSiam: the predictor's lr is not decayed
    "model": {"proj_layers": 3, "proj_last_bn": True,  # SimSiam's projector: 3 layers, BN on the output
              "proj_hidden": 2048, "proj_dim": 2048, "pred_hidden": 512},
    # The paper names no optimiser, lr, batch, epochs or augmentation (its only value: λ_L = -1). The project's
    # choice: SimSiam's ImageNet recipe (Chen & He 2021, §4.1, App. A), for every variant.
    "optim": {"name": "sgd", "lr": 0.05,    # lr = 0.05 x batch / 256, SGD momentum 0.9, wd 1e-4,
              "lr_scaling": "linear",
              "weight_decay": 1.0e-4, "warmup_epochs": 0, "exclude_bias_norm": False,  # no warm-up,
              "batch_size": 512, "epochs": 100},  # batch 512, 100 epochs
    "augment": {"crop_scale": [0.2, 1.0],   # SimSiam's (MoCo v2's) views: crop scale (0.2, 1), flip 0.5,
                "flip_p": 0.5, "jitter": [0.4, 0.4, 0.4, 0.1], "jitter_p": 0.8,  # jitter (0.4, 0.4, 0.4, 0.1) p 0.8,
                "gray_p": 0.2, "blur_p": [0.5], "blur_sigma": [0.1, 2.0],  # grayscale 0.2, blur p 0.5 on both views
                "solarize_p": [0.0]},       # (CIFAR-like presets: no blur), no solarisation; symmetric views
    "log": {"every": 1},                    # ||s|| every step (cheap)
    "toy": {"dataset": "blobs",             # blobs | moons (§3.2) | app_b1 (App. B.1)
            "seeds": [0, 1, 2, 3, 4],       # one run per seed; the summary averages them (Fig. 3-4: 5 seeds)
            "n_per_class": 500,             # blobs/moons: training points per class (as many test points)
            "blob_std": 1.0, "moon_noise": 0.1,
            "b1_points": 100, "b1_augs": 10, "b1_aug_std": 0.1,
            "b1_shift": 0.0,                # 0: augmentations centred on x; > 0: shifted by k
            "hidden": 64, "out_dim": 16, "layers": 3, "norm": "bn", "pred_hidden": 64},
}
CHOICES = {"loss.variant": VARIANTS, "toy.dataset": ("blobs", "moons", "app_b1"),
           "toy.norm": ("bn", "gn", "ln", "none")}


# --------------------------------------------------------------------------- the paper's pieces
def center_vector(z):
    """(CenterVector, Eq. 1) s = E_x E_ω z̄: mean of the l2-normalised z [B, K, D] over all views of the
    global batch (every process), differentiable; every rank gets the same s."""
    zn = F.normalize(z.float(), dim=-1).flatten(0, 1)
    return dist.all_reduce_grad(zn.sum(0)) / (zn.shape[0] * dist.world_size())


def invariance_loss(z):
    """(CenterVector, Eq. 2) L(f) = E ||z̄_a - z̄_b||² over the view pairs a<b of each image; z [B, K, D]."""
    zn = F.normalize(z.float(), dim=-1)
    a, b = torch.triu_indices(zn.shape[1], zn.shape[1], offset=1, device=zn.device)  # the pairs a<b
    return (zn[:, a] - zn[:, b]).pow(2).sum(-1).mean()


def simple_loss(l_inv, s, lambda_l=-1.0):
    """(CenterVector, Eq. 32) L_simple = 0.5 (L(f) - λ_L ||s||); λ_L = -1 penalises ||s||."""
    return 0.5 * (l_inv - lambda_l * torch.linalg.vector_norm(s))


def simsiam_loss(p, z, stop_grad=True):
    """(CenterVector, Eq. 15) ½ E[-<p̄_a, sg(z̄_b)> - <p̄_b, sg(z̄_a)>]: the mean over the ordered view pairs
    a≠b of -cos(p_a, z_b); p, z [B, K, D]. ``stop_grad=False`` lets the gradient into z (no-stop-grad ablation)."""
    zt = z.detach() if stop_grad else z
    cos = F.normalize(p.float(), dim=-1) @ F.normalize(zt.float(), dim=-1).transpose(1, 2)  # [B, K, K]: <p̄_a, z̄_b>
    off = ~torch.eye(z.shape[1], dtype=torch.bool, device=z.device)  # the ordered pairs a≠b
    return -cos[:, off].mean()


def objective(variant, z, p, s, lambda_l):
    """The loss of ``variant`` and its parts for logging ({"l_inv": ...} or {"l_simsiam": ...})."""
    if variant in ("center_penalty", "invariance_only"):
        l_inv = invariance_loss(z)
        return simple_loss(l_inv, s, lambda_l if variant == "center_penalty" else 0.0), {"l_inv": l_inv}
    l_ss = simsiam_loss(p, z, stop_grad=variant != "simsiam_no_stopgrad")  # p = z without a predictor
    return l_ss, {"l_simsiam": l_ss}


def center_penalty_objective(model, views, loss_cfg):
    """One forward of K views (a list of batches) and the loss of ``loss.variant`` (Eq. 32, Eq. 2 or Eq. 15),
    with its parts, ||s|| (Eq. 1, over all views of the global batch) and the collapse signal ``proj_std`` (of
    the first view's z) for the logs; images and toys alike."""
    z, p = model(views)
    s = center_vector(z)  # (CenterVector, Eq. 1)
    loss, parts = objective(loss_cfg.variant, z, p, s, loss_cfg.lambda_l)
    return loss, {"s_norm": torch.linalg.vector_norm(s.detach()), **parts, "proj_std": projection_std(z[:, 0])}


class Model(nn.Module):
    """Encoder f, projector g (z = g(f(x))) and, for simsiam / simsiam_no_stopgrad, the predictor h (p = h(z)).

    ``forward(views)`` takes a list of K view batches and returns z, p as [B, K, D] (p is z without h);
    each view goes through the network on its own (batch-norm statistics per view, as SimSiam), or, with
    ``one_pass`` (toys without batch statistics: the same z, faster), all K views in one batch."""

    def __init__(self, f, g, h, one_pass=False):
        super().__init__()
        self.f, self.g, self.h, self.one_pass = f, g, h, one_pass

    def forward(self, views):
        if self.one_pass:
            z = self.g(self.f(torch.cat(views))).view(len(views), len(views[0]), -1).transpose(0, 1)
        else:
            z = torch.stack([self.g(self.f(x)) for x in views], 1)
        p = z if self.h is None else torch.stack([self.h(z[:, j]) for j in range(z.shape[1])], 1)
        return z, p


def build_model(cfg, in_dim=None):
    """Image runs: ResNet f, SimSiam projector g. Toy runs (``in_dim`` given): MLP f, no projector."""
    variant, m, t = cfg.loss.variant, cfg.model, cfg.toy
    if in_dim is not None:  # toy: the MLP's output is z
        f, g, norm = mlp(in_dim, t.hidden, t.out_dim, t.layers, t.norm), nn.Identity(), t.norm
        dim, hidden = t.out_dim, t.pred_hidden
    else:
        f, feat = resnet(m.arch, m.width, m.cifar_stem, m.norm, m.zero_init_residual)
        norm = "none" if m.norm == "none" else "bn"
        g = mlp(feat, m.proj_hidden, m.proj_dim, m.proj_layers, norm, last_norm=m.proj_last_bn and norm == "bn")
        dim, hidden = m.proj_dim, m.pred_hidden
    h = mlp(dim, hidden, dim, 2, norm) if variant in ("simsiam", "simsiam_no_stopgrad") else None
    return Model(f, g, h, one_pass=in_dim is not None and norm == "none")


def optimizer(cfg, model, peak_lr):
    """Encoder + projector groups, and predictor groups with lr x ``simsiam.pred_lr_mult`` (App. B.4)."""
    groups = param_groups([model.f, model.g], cfg.optim.weight_decay, cfg.optim.exclude_bias_norm)
    if model.h is not None:
        for grp in param_groups([model.h], cfg.optim.weight_decay, cfg.optim.exclude_bias_norm,
                                lr_mult=cfg.simsiam.pred_lr_mult):
            groups.append({**grp, "predictor": True})
    return build(cfg.optim, groups, peak_lr)


def set_lrs(opt, lr, peak_lr, fix_pred_lr):
    """The scheduled lr for every group; SimSiam's predictor keeps its peak lr when ``fix_pred_lr``."""
    set_lr(opt, lr)
    for grp in opt.param_groups:
        if grp.get("predictor") and fix_pred_lr:
            grp["lr"] = peak_lr * grp["lr_mult"]
    return lr


# --------------------------------------------------------------------------- toy runs (§3.2, App. B.1)
# Points, not images (data.name: toy2d): the blobs and moons of §3.2 and the App. B.1 points, generated here.
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


def toy_data(t, seed):
    """(training points [N, d] or views [N, K, d], their labels, test points, test labels) for one seed."""
    if t.dataset == "app_b1":  # each point is an "image" with b1_augs views; kNN: which point a view is of
        _, views, test = make_app_b1(t.b1_points, t.b1_augs, seed, t.b1_aug_std, t.b1_shift)
        labels = torch.arange(t.b1_points).repeat_interleave(t.b1_augs)
        return views, labels, test.flatten(0, 1), labels
    make = make_blobs if t.dataset == "blobs" else make_moons
    spread = t.blob_std if t.dataset == "blobs" else t.moon_noise
    x, y = make(t.n_per_class, seed, spread)
    xt, yt = make(t.n_per_class, seed + 1_000_003, spread)  # held-out points of the same distribution
    return x, y, xt, yt


def toy_batches(t, x, y, batch_size, g):
    """One epoch of view batches [B, K, d]. blobs/moons: every point once, paired with a random sample of
    its class (§3.2: a class's samples are one image's augmentations). app_b1: B points, all their views."""
    if t.dataset == "app_b1":
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            if len(idx) == batch_size:
                yield x[idx]
        return
    order = y.argsort(stable=True)  # item i's class occupies order[start[c] : start[c] + count[c]]
    count = torch.bincount(y)
    start = count.cumsum(0) - count
    for idx in torch.randperm(len(x), generator=g).split(batch_size):
        if len(idx) < batch_size:
            return
        c = y[idx]
        partner = order[start[c] + (torch.rand(len(idx), generator=g) * count[c]).long()]
        yield torch.stack([x[idx], x[partner]], 1)


def toy_run(cfg, seed, logger, dev):
    """Train one toy model; logs per step (||s|| of the batch) and per epoch (kNN, ||s|| of the test set)."""
    t = cfg.toy
    x, y, xt, yt = toy_data(t, seed)
    bank_x = x.flatten(0, 1) if x.ndim == 3 else x  # app_b1: every training view, labelled by its point
    torch.manual_seed(seed)
    model = build_model(cfg, in_dim=x.shape[-1]).to(dev)
    peak_lr = scaled_lr(cfg.optim)
    opt = optimizer(cfg, model, peak_lr)
    g = torch.Generator().manual_seed(seed)
    steps_per_epoch = len(x) // cfg.optim.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"optim.batch_size={cfg.optim.batch_size} exceeds the {len(x)} toy items: lower it")
    total = cfg.optim.epochs * steps_per_epoch

    def evaluate(epoch):
        f_bank, f_test = (extract_features(model.f, [(a, b)], dev) for a, b in ((bank_x, y), (xt, yt)))
        out = knn_accuracies(*f_bank, *f_test, ks=tuple(cfg.eval.knn_k), t=cfg.eval.knn_t)
        out.update(center_norm=center_vector_norm(f_test[0]).item(), feature_std=projection_std(f_test[0]).item())
        logger.log({"seed": seed, "step": step, "epoch": epoch, **out})
        return out

    step = 0
    first = last = evaluate(0)
    for epoch in range(cfg.optim.epochs):
        for vb in toy_batches(t, x, y, cfg.optim.batch_size, g):
            vb = vb.to(dev)
            loss, logs = center_penalty_objective(model, list(vb.unbind(1)), cfg.loss)
            lr = lr_at(step, total, cfg.optim.warmup_epochs * steps_per_epoch, peak_lr)
            set_lrs(opt, lr, peak_lr, cfg.simsiam.fix_pred_lr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if not torch.isfinite(loss):
                raise UserError(f"loss is {loss.item()} at step {step} (seed {seed}): training diverged; "
                                "lower optim.lr")
            if step % cfg.log.every == 0:
                logger.log({"seed": seed, "step": step, "epoch": epoch, "loss": loss.item(),
                            **{k: v.item() for k, v in logs.items()}})
        if epoch + 1 == cfg.optim.epochs or (cfg.eval.every and (epoch + 1) % cfg.eval.every == 0):
            last = evaluate(epoch + 1)
    return first, last


def train_toy(cfg):
    if dist.world_size() > 1 or not cfg.toy.seeds:
        raise UserError("toy2d runs take seconds on one process (dist.nproc=1, no torchrun) and need toy.seeds")
    run = log.run_dir(cfg, METHOD)
    logger = log.Logger(run)  # (an earlier run's metrics.jsonl and summary.json are moved aside)
    logger.config(cfg)
    dev = dist.device(cfg)
    per_seed, t0 = {}, time.time()
    for seed in cfg.toy.seeds:
        first, last = toy_run(cfg, seed, logger, dev)
        per_seed[seed] = {"init": first, "final": last}
        logger.print(f"seed {seed}: " + " ".join(f"{k} {first[k]:.4g} -> {v:.4g}" for k, v in last.items()))
    keys = list(per_seed[cfg.toy.seeds[0]]["final"])
    stat = {}
    for k in keys:
        stat[k], stat[k + "_std"] = log.mean_std([r["final"][k] for r in per_seed.values()])
        stat[k + "_init"] = log.mean_std([r["init"][k] for r in per_seed.values()])[0]
    logger.summary({"method": METHOD, "variant": cfg.loss.variant, "toy": cfg.toy.dataset,
                    "knn_k": cfg.eval.knn_k[0], "knn_t": cfg.eval.knn_t, "seeds": list(cfg.toy.seeds),
                    **stat, "per_seed": per_seed, "toy_wall_s": round(time.time() - t0, 2)})


# --------------------------------------------------------------------------- training (images)
def train(cfg):
    if cfg.data.name == "toy2d":
        return train_toy(cfg)
    run = Run(cfg, METHOD)  # run folder (locked), logger, resume state, seeds, signal handling
    views = run.views(2)
    loader = run.loader(views)  # this rank's share of every global batch (uint8 images)

    # model: f, g (and h for SimSiam); no EMA target; SGD as SimSiam (the predictor's lr may be fixed)
    online = dist.sync_bn(build_model(cfg), cfg).to(run.device, memory_format=run.memory_format)
    peak_lr = scaled_lr(cfg.optim)
    opt = optimizer(cfg, online, peak_lr)
    scaler = torch.amp.GradScaler(run.device.type, enabled=cfg.precision == "fp16")
    maybe_compile(online.f, cfg)
    model = dist.ddp(online, run.device)
    def diagnostics(f_test):  # at each evaluation: ||s|| of the test images' outputs z
        return {"s_norm_test": center_vector_norm(apply_eval(online.g, f_test)).item()}
    run.resume_or_evaluate_init(online.f, diagnostics, online=online, optimizer=opt, scaler=scaler, views=views)

    for epoch in run.epochs():
        for batch, step_due in run.batches(loader):  # step_due: the last forward of an accumulation group
            x1, x2 = views(batch)
            with dist.no_sync(model, unless=step_due):
                with run.autocast():
                    loss, logs = center_penalty_objective(model, [x1, x2], cfg.loss)  # Eq. 32 (or Eq. 2 / Eq. 15)
                scaler.scale(loss / cfg.optim.accum_steps).backward()  # the group's mean gradient
            if step_due:  # lr: cosine (SimSiam's predictor may keep its lr); no target network
                lr = set_lrs(opt, lr_at(run.step, run.total_steps, run.warmup_steps, peak_lr), peak_lr,
                             cfg.simsiam.fix_pred_lr)
                if cfg.optim.clip_grad > 0:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(online.parameters(), cfg.optim.clip_grad)
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                run.step_done(loss, logs, lr=lr)
                if run.stop_requested():
                    run.save_and_exit()
        if run.eval_due():
            run.evaluate()
        run.epoch_done()
        if run.stop_requested():
            run.save_and_exit()
    run.finish({"variant": cfg.loss.variant})


if __name__ == "__main__":
    config = parse(sys.argv[1:], DEFAULTS, CHOICES, method=METHOD)
    if config.data.name == "toy2d" and config.dist.nproc > 1:  # refuse before spawning anything
        print("error: toy2d runs take seconds on one process: set dist.nproc=1", file=sys.stderr)
        sys.exit(2)
    dist.launch(train, config)

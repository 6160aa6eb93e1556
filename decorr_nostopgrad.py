"""Decorr: non-contrastive learning with a decorrelation constraint instead of stop-gradient, one file.

Paper: Liu, Suganuma & Okatani, "Bridging the Gap from Asymmetry Tricks to Decorrelation Principles
in Non-contrastive Self-supervised Learning" (Decorr), NeurIPS 2022: §4 Eq. 15-19, setup §5.1, Tab. 1-4.

    x -> f (ResNet without fc) -> g (projector MLP) = f_i      (the paper's f_i^1, f_i^2: projector outputs)
    f̄_i = (f_i - μ) / σ,   μ, σ² = 1/(n-1) Σ (f_j - μ)²  per dimension over the global batch    (Eq. 18)
    F = [f̄_1 .. f̄_n] / √n   (d x n),   split into k partitions  F = (1/√k) [F_1 .. F_k]        (§4.4)
    L(F¹→F²) = c_inv ||W_p F¹ - F²||_F² + c_cov/d Σ_{i=1..k} ||W_pᵀW_p - W_p(F¹_i F¹_iᵀ)W_pᵀ||_F²  (Eq. 19)
    L = L(F¹→F²) + L(F²→F¹)                                                  (symmetric, §4.2)

No stop-gradient anywhere and no target/EMA network (this script has no ``ema`` config section). W_p is a
d x d linear predictor; k = 1 is Eq. 17. Defaults (Tab. 1 best): projector 2048-2048-2048 with BN+ReLU
between its layers, k = 8, c_inv = 25, c_cov = 1; ImageNet: ResNet-50, zero_init_residual, LARS base
lr 0.3 x batch/256, batch 2048, 100 epochs, 10 warm-up; SyncBN everywhere incl. the standardisation.

How we compute it (exactly Eq. 19, arranged for speed and DDP):
- W_p(F_i F_iᵀ)W_pᵀ = (1/n') Σ_{j in partition i} p_j p_jᵀ with p_j = W_p f̄_j (n' = n/k): the same
  matrix from the predictions, n'd² instead of d³ operations; when n' < d the square of Eq. 19 is
  expanded so that only n' x n' Gram matrices and one ||W_pᵀW_p||_F² per step are formed
  (``correlation_term``).
- Sample j of the global batch belongs to partition j mod k. Rank r of W processes holds global
  positions r, r+W, ... (common.loaders.ResumableSampler), so when W divides k each device computes k/W
  partitions on its own samples (§4.4: "compute each partitioned term separately on a single
  computational node"); otherwise the predictions are gathered (differentiable) first.
  The standardisation statistics are summed over processes with differentiable all-reduces
  (SyncBN semantics, §4.4, §5.1). Each process computes its share of the loss and the shares are
  summed with a differentiable all-reduce, so the loss and gradients equal one process's.
- σ² gets ``loss.std_eps`` (1e-5, BatchNorm's) added, a guard for constant dimensions only.

Switches for the ablations (Tab. 3): ``loss.standardize`` (Eq. 18 on/off; off: F = [f_1..f_n]/√n,
Eq. 5), ``loss.identity_predictor`` (W_p = I fixed, "I-PRED"), ``loss.stopgrad`` (BYOL/SimSiam-style:
the target F² of each direction is detached; SimSiam-like on the same network, no EMA target, as
in Eq. 5, which writes StopGrad(F²) of the one network), with k, c_inv, c_cov. Tab. 3 lost its check
marks in our copy; configs/decorr_nostopgrad/tab3_row*.yaml give the switches as we read §5.4.

The authors' public code (github.com/KJ-rc/bridging-the-gap, main.py) differs from the paper in
1-5 and 7; we follow the paper and expose 1-5 as options:
  1. standardisation is off unless ``--standardization-off`` is passed (an inverted store_false
     flag)                                       -> loss.standardize (paper and default: true);
  2. it is BatchNorm1d(affine=False): biased variance, eps 1e-5  -> loss.std_var: biased;
  3. no partition option; the correlation term is computed on each GPU's local batch, i.e. k =
     the number of GPUs                          -> loss.partitions = number of processes;
  4. W_p is an nn.Linear with a bias             -> model.predictor_bias (the correlation term then
     uses the predictions with the bias, as that code does);
  5. c_inv = c_cov = 8 with MSE means: the invariance term is averaged over the n x d entries (Eq. 19's
     term / d); the correlation term (mean over d² entries) x d equals Eq. 19's c_cov/d scaling
                                                 -> loss.inv_norm: mse, loss.c_inv/c_cov: 8;
  6. where the paper is silent we follow that code (and Barlow Twins [16], which §5.1 follows):
     projector Linear layers without bias (model.proj_bias: false), weight decay 1e-6;
  7. a linear classifier trained online on detached features for monitoring: not implemented
     (we log kNN every eval and run the linear evaluation offline at the end).
configs/decorr_nostopgrad/authors_code_imagenet_resnet50.yaml sets 1-5.

Diagnostics at every eval: ||Σ - I||_F² of the correlation matrix of the features of the held-out
(test) images without augmentation (Fig. 1), on the projector outputs f (``corr_dist_proj``: §5.2 measures
"extracted features (i.e., f_i^1's)") and on the backbone (``corr_dist``, logged for every method), W_p's
asymmetry ||W_p - W_pᵀ||_F/||W_p||_F and eigenvalue summary (Fig. 4); W_p is in every checkpoint (``online``'s
``W_p.weight``) and, every ``diag.wp_every`` epochs, saved with its eigenvalues in run_dir/predictor/ (Fig. 3).
The summary reports collapse as a result.

Run:
    python decorr_nostopgrad.py --config configs/quickstart/decorr_nostopgrad.yaml         # CPU, minutes
    torchrun --nproc_per_node=8 decorr_nostopgrad.py --config configs/decorr_nostopgrad/tab4_ours_p8192x3.yaml
    python decorr_nostopgrad.py --config ... --set loss.partitions=1 dist.nproc=2 resume=auto
"""
import sys

import torch
import torch.nn as nn

from common import checkpoint, dist
from common.config import UserError, parse
from common.evaluate import apply_eval, correlation_distance, feature_std, projection_std
from common.models import maybe_compile, mlp, resnet
from common.optim import build, lr_at, param_groups, scaled_lr, set_lr
from common.run import Run

METHOD = "decorr_nostopgrad"
DEFAULTS = {
    "model": {"arch": "resnet50", "cifar_stem": False,  # §5.1: "Resnet-50 [11] without the last fully-connected
              "zero_init_residual": True,  # layer"; §5.1: zero_init_residual=True, following Barlow Twins / VICReg
              "proj_hidden": 2048, "proj_dim": 2048, "proj_layers": 3,  # 2048-2048-2048 (Tab. 1)
              "proj_bias": False,          # paper silent; Barlow Twins [16] and the authors' code: no bias
              "predictor_bias": False},    # W_p F (Eq. 19); the authors' code has a bias
    "optim": {"name": "lars", "lr": 0.3,   # §5.1: LARS, base lr 0.3 for the whole model,
              "lr_scaling": "linear",      # "multiplied by BatchSize/256"
              "weight_decay": 1.0e-6,      # not stated; BYOL / Barlow Twins (and the authors' code)
              "batch_size": 2048, "epochs": 100, "warmup_epochs": 10},  # §5.1
    "loss": {"partitions": 8,              # k of Eq. 19 (global; per device under DDP, §4.4)
             "c_inv": 25.0, "c_cov": 1.0,  # Tab. 1 best
             "standardize": True,          # Eq. 18 ("STD" of Tab. 3)
             "identity_predictor": False,  # W_p = I fixed ("I-PRED" of Tab. 3)
             "stopgrad": False,            # BYOL/SimSiam-style stop-gradient ("STOPGRAD" of Tab. 3)
             "std_var": "unbiased",        # Eq. 18; biased: BatchNorm's (authors' code)
             "std_eps": 1.0e-5,            # added to σ²: numerical guard (BatchNorm's eps)
             "inv_norm": "frobenius"},     # Eq. 19; mse: / d (authors' code)
    "eval": {"linear": "paper",            # §5.1: a linear classifier on the frozen backbone's features, "SGD with
             "linear_optimizer": "sgd",    # momentum = 0.9, batch size = 256, weight decay = 10^-6, and learning
             "linear_batch_size": 256, "linear_weight_decay": 1.0e-6,  # rate subject to cosine scheduling with the
             "linear_lr": 0.3, "linear_epochs": 100},                 # base rate = 0.3, for 100 epochs"
    "diag": {"wp_every": 1,                # epochs between W_p eigen-summaries + saved W_p (0: never)
             "collapse_floor": 0.1},       # collapsed if std of l2-normalised features x √dim is below this
}
CHOICES = {"loss.std_var": ("unbiased", "biased"), "loss.inv_norm": ("frobenius", "mse"),
           "loss.partitions": "x >= 1", "loss.c_inv": "x >= 0", "loss.c_cov": "x >= 0", "loss.std_eps": "x >= 0",
           "diag.wp_every": "x >= 0"}


# --------------------------------------------------------------------------- the paper's pieces
def standardize(f, eps=1e-5, unbiased=True):
    """(Decorr, Eq. 18) f̄ = (f - μ)/σ per dimension over the global batch, σ² = Σ(f - μ)²/(n-1).

    Sums over processes are differentiable all-reduces (SyncBN semantics, §5.1); one process: plain.
    """
    n = f.shape[0] * dist.world_size()
    mu = dist.all_reduce_grad(f.sum(0)) / n
    var = dist.all_reduce_grad((f - mu).pow(2).sum(0)) / (n - 1 if unbiased else n)
    return (f - mu) / torch.sqrt(var + eps)


def gram_sq(W_p):
    """||W_pᵀW_p||_F² (Eq. 19's ||M||² after expanding its square), value and gradient 4 W_p W_pᵀW_p from two
    d x d x d products: G = W_p M is a constant, tr(W_pᵀG) = ||M||² has gradient G, scaled to 4G by
    4 t - 3 t.detach() (autograd through M = W_pᵀW_p itself would take three products)."""
    with torch.no_grad():
        G = W_p @ (W_p.T @ W_p)
    t = (W_p * G).sum()
    return 4 * t - 3 * t.detach()


def correlation_term(p, W_p, k, wtw_sq=None):
    """(Decorr, Eq. 19) Σ_{i=1..k} ||W_pᵀW_p - W_p(F_iF_iᵀ)W_pᵀ||_F² over the rows of p = W_p f̄ [m, d].

    Row j is in partition j mod k; C_i = W_p(F_iF_iᵀ)W_pᵀ = P_iᵀP_i / n' with P_i its n' = m/k rows.
    When n' < d, the square is expanded so that no d x d difference is formed (n'd² + m d² work
    instead of k d² elementwise terms): ||M - C_i||² = ||M||² - 2 tr(M C_i) + ||C_i||², M = W_pᵀW_p,
    with tr(M C_i) = ||P_i W_pᵀ||²/n' and ||C_i||² = ||P_iP_iᵀ||²/n'² (an n' x n' Gram matrix).
    There C_i has rank ≤ n' < d, so it cannot equal M for a full-rank W_p (no cancellation of the
    terms); otherwise the differences are formed directly. ``wtw_sq``: ||M||², if already computed.
    """
    m, d = p.shape
    n_ = m // k
    parts = p.reshape(n_, k, d).transpose(0, 1)  # [k, n', d]: partition i = rows i, i + k, ...
    if n_ >= d:
        M = W_p.T @ W_p
        return (M - parts.mT @ parts / n_).pow(2).sum()
    wtw_sq = gram_sq(W_p) if wtw_sq is None else wtw_sq
    cross = (p @ W_p.T).pow(2).sum() / n_  # Σ_i tr(M C_i)
    gram = (parts @ parts.mT).pow(2).sum() / n_ ** 2  # Σ_i ||C_i||²
    return k * wtw_sq - 2 * cross + gram


def correlation_term_literal(p, W_p, k):
    """(Decorr, Eq. 19) the correlation term as written, with its d x d matrices: Σ_i ||W_pᵀW_p - C_i||_F²,
    C_i = (1/n') Σ_{j in partition i} p_j p_jᵀ. Slow; the tests compare ``correlation_term`` with it."""
    m, d = p.shape
    M = W_p.T @ W_p
    return sum(((M - P.T @ P / (m // k)) ** 2).sum() for P in p.reshape(m // k, k, d).transpose(0, 1))


def direction_loss(fa, fb, W_p, b, k, stopgrad=False, wtw_sq=None):
    """(Decorr, Eq. 19) one direction F^a -> F^b on this process's rows f̄ [m, d]: this process's shares of
    ||W_p F^a - F^b||_F² and of Σ_i ||W_pᵀW_p - W_p(F^a_i F^a_iᵀ)W_pᵀ||_F² (one process: the terms).

    ``b``: predictor bias or None; ``stopgrad``: F^b is a constant (BYOL/SimSiam, Tab. 3);
    ``wtw_sq``: ||W_pᵀW_p||_F², shared by both directions (see correlation_term).
    """
    world, (m, d) = dist.world_size(), fa.shape
    n = m * world  # global batch: F = [f̄_1 .. f̄_n]/√n
    fb = fb.detach() if stopgrad else fb
    p = fa @ W_p.T + (b if b is not None else 0)  # W_p f̄_j (+ b)
    inv = (p - fb).pow(2).sum() / n  # ||W_p F^a - F^b||_F² (Eq. 5 scaling)
    if k % world == 0:  # (§4.4) each device computes its own k/W partitions
        return inv, correlation_term(p, W_p, k // world, wtw_sq)
    # partitions span devices: all predictions in global-batch order, on every rank
    p_all = dist.all_gather_grad(p).reshape(world, m, d).transpose(0, 1).reshape(n, d)
    return inv, correlation_term(p_all, W_p, k, wtw_sq) / world


def decorr_loss(f1, f2, W_p, b, k, c_inv, c_cov, stopgrad=False, inv_norm="frobenius"):
    """(Decorr, Eq. 19, §4.2) L(F¹→F²) + L(F²→F¹): this process's shares of c_inv·(invariance) and
    c_cov/d·(correlation); ``inv_norm="mse"`` divides the invariance by d (authors' code)."""
    d = f1.shape[1]
    n_part = f1.shape[0] * dist.world_size() // k  # n' of every partition, on both paths of direction_loss
    wtw_sq = gram_sq(W_p) if n_part < d else None  # ||W_pᵀW_p||_F² of the expanded path: once, not per direction
    inv12, cov12 = direction_loss(f1, f2, W_p, b, k, stopgrad, wtw_sq)
    inv21, cov21 = direction_loss(f2, f1, W_p, b, k, stopgrad, wtw_sq)
    inv = (inv12 + inv21) / (d if inv_norm == "mse" else 1)
    return c_inv * inv, c_cov / d * (cov12 + cov21)


class Decorr(nn.Module):
    """f (ResNet without fc), g (projector: Linear-BN-ReLU x (layers-1), Linear), W_p (d x d linear)."""

    def __init__(self, m, identity_predictor):
        super().__init__()
        self.f, dim = resnet(m.arch, m.width, m.cifar_stem, m.norm, m.zero_init_residual)
        self.g = mlp(dim, m.proj_hidden, m.proj_dim, m.proj_layers, norm="none" if m.norm == "none" else "bn")
        for layer in self.g if not m.proj_bias else ():  # Linear layers without bias, as [1, 16] and the authors
            if isinstance(layer, nn.Linear):
                layer.bias = None
        self.W_p = None if identity_predictor else nn.Linear(m.proj_dim, m.proj_dim, bias=m.predictor_bias)
        self.d = m.proj_dim

    def predictor(self):
        """(W_p, b): the weight (I when fixed, "I-PRED") and the bias or None."""
        if self.W_p is None:
            return torch.eye(self.d, device=next(self.parameters()).device), None
        return self.W_p.weight, self.W_p.bias

    def forward(self, views):
        return [self.g(self.f(x)) for x in views]


@torch.no_grad()
def predictor_diagnostics(W_p):
    """(Decorr, Fig. 4) asymmetry ||W_p - W_pᵀ||_F / ||W_p||_F and W_p's eigenvalues (float64)."""
    W = W_p.detach().double().cpu()
    ev = torch.linalg.eigvals(W)
    mag = ev.abs()
    big = ev.real[mag >= 0.1 * mag.max()]  # Fig. 4b: the eigenvalues that do not go to 0 approach one c
    return {"wp_asym": ((W - W.T).norm() / W.norm().clamp_min(1e-30)).item(),
            "wp_eig_re_max": ev.real.max().item(), "wp_eig_re_median": ev.real.median().item(),
            "wp_eig_re_min": ev.real.min().item(), "wp_eig_im_max": ev.imag.abs().max().item(),
            "wp_eig_small_frac": (mag < 0.1 * mag.max()).double().mean().item(),
            "wp_eig_cv": (big.std() / big.mean().abs().clamp_min(1e-30)).item() if len(big) > 1 else 0.0}, ev


@torch.no_grad()
def representation_diagnostics(model, feats):
    """On the un-augmented test images' backbone features ``feats``: collapse indicators (std of l2-normalised
    backbone / projector outputs x √dim) and ``corr_dist_proj``, Fig. 1's ||Σ - I||_F² of the projector outputs
    (§5.2: "auto-correlation matrix Σ of extracted features (i.e., f_i^1's)"; f is the projector's output, §3.1).
    ``monitor``'s ``corr_dist`` is the same quantity on the backbone features ``feats`` (every method logs it)."""
    z = apply_eval(model.g, feats)
    return {"feature_std_rel": feature_std(feats) * feats.shape[1] ** 0.5,
            "proj_std_rel": feature_std(z) * z.shape[1] ** 0.5, "proj_rms": z.pow(2).mean().sqrt().item(),
            "corr_dist_proj": correlation_distance(z.double()).item()}


def decorr_objective(model, x1, x2, loss_cfg):
    """One forward on two views: projector outputs standardised over the global batch (Eq. 18), then Eq. 19 in
    both directions, summed over the processes' partitions. The step's loss and its parts (and the raw
    projector scale ``z_std``, the collapse signal ``proj_std`` of the first view's projector outputs)."""
    L, online = loss_cfg, dist.unwrap(model)
    z1, z2 = (z.float() for z in model([x1, x2]))  # fp32 losses (under autocast)
    f1, f2 = (standardize(z1, L.std_eps, L.std_var == "unbiased"),
              standardize(z2, L.std_eps, L.std_var == "unbiased")) if L.standardize else (z1, z2)  # (Eq. 18)
    W_p, b = online.predictor()
    inv, cov = decorr_loss(f1, f2, W_p, b, L.partitions, L.c_inv, L.c_cov, L.stopgrad, L.inv_norm)  # (Eq. 19)
    total = dist.all_reduce_grad(torch.stack([inv + cov, inv, cov]))  # the sum of the processes' shares
    return total[0], {"loss_inv": total[1], "loss_cov": total[2], "z_std": z1.detach().std(0).mean(),
                      "proj_std": projection_std(z1)}


def decorr_diagnostics(online, run, cfg, f_test):
    """At each evaluation (Fig. 1's ||Σ - I||²: ``corr_dist_proj`` on the projector outputs, ``monitor``'s
    ``corr_dist`` on the backbone): the collapse verdict, and every
    ``diag.wp_every`` epochs Fig. 4's W_p summary with W_p saved to predictor/W_p_epoch_XXXX.pt (Fig. 3)."""
    out = representation_diagnostics(online, f_test)
    out["collapsed"] = min(out["feature_std_rel"], out["proj_std_rel"]) < cfg.diag.collapse_floor
    epoch = run.epoch
    if online.W_p is not None and cfg.diag.wp_every and (epoch == cfg.optim.epochs or epoch % cfg.diag.wp_every == 0):
        def fig4():  # on rank 0 alone (W_p is the same on every rank): an 8192² W_p's eigenvalues take minutes
            wp_metrics, eigvals = predictor_diagnostics(online.W_p.weight)
            checkpoint.save({"W_p": online.W_p.weight.detach().cpu().clone(), "eigvals": eigvals,
                             "b": None if online.W_p.bias is None else online.W_p.bias.detach().cpu().clone(),
                             "epoch": epoch, "step": run.step}, run.dir / "predictor" / f"W_p_epoch_{epoch:04d}.pt")
            return wp_metrics
        out.update(dist.agree(fig4))  # every rank gets rank 0's numbers
    return out


# --------------------------------------------------------------------------- training
def train(cfg):
    if cfg.optim.batch_size % cfg.loss.partitions:  # equal partitions (§4.4); then also k/W per process when W | k
        raise UserError(f"loss.partitions={cfg.loss.partitions} must divide optim.batch_size={cfg.optim.batch_size} "
                        "(equal partitions, Decorr §4.4)")
    run = Run(cfg, METHOD)  # run folder (locked), logger, resume state, seeds, signal handling
    views = run.views(2)
    loader = run.loader(views)  # this rank's share of every global batch (uint8 images)

    # model: f, g, W_p, no target network; LARS with base 0.3 x batch/256 for the whole model (§5.1)
    online = Decorr(cfg.model, cfg.loss.identity_predictor)
    online = dist.sync_bn(online, cfg).to(run.device, memory_format=run.memory_format)
    peak_lr = scaled_lr(cfg.optim)
    opt = build(cfg.optim, param_groups([online], cfg.optim.weight_decay, cfg.optim.exclude_bias_norm), peak_lr)
    scaler = torch.amp.GradScaler(run.device.type, enabled=cfg.precision == "fp16")
    maybe_compile(online.f, cfg)
    model = dist.ddp(online, run.device)
    def diagnostics(f_test):  # at each evaluation: the collapse indicators; every diag.wp_every epochs W_p (Fig. 3-4)
        return decorr_diagnostics(online, run, cfg, f_test)
    run.resume_or_evaluate_init(online.f, diagnostics, online=online, optimizer=opt, scaler=scaler, views=views)

    for epoch in run.epochs():
        for batch, step_due in run.batches(loader):  # step_due: the last forward of an accumulation group
            x1, x2 = views(batch)
            with dist.no_sync(model, unless=step_due):
                with run.autocast():
                    loss, logs = decorr_objective(model, x1, x2, cfg.loss)  # (Eq. 18-19), no stop-gradient
                scaler.scale(loss / cfg.optim.accum_steps).backward()  # the group's mean gradient
            if step_due:  # lr: warm-up, then cosine; no target network
                lr = set_lr(opt, lr_at(run.step, run.total_steps, run.warmup_steps, peak_lr))
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
    run.finish({"collapse_floor": cfg.diag.collapse_floor})


if __name__ == "__main__":
    dist.launch(train, parse(sys.argv[1:], DEFAULTS, CHOICES, method=METHOD))

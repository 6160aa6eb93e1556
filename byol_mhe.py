"""BYOL with minimum-hyperspherical-energy (MHE) regularisation of the network's neurons, one file.

Paper: Durrant & Leontidis, "Hyperspherically Regularized Networks for BYOL Improves Feature
Uniformity and Separability" (BYOL-MHE), §3.4, Eq. 5, 8, 10, App. A Eq. 11; training §3.5, App. D.
MHE: Liu et al., "Learning towards Minimum Hyperspherical Energy", NeurIPS 2018.

    online:  x -> f_θ (encoder) -> g_θ (projector) = z -> q_θ (predictor) = p
    target:  x -> f_ξ -> g_ξ = z'            ξ <- τξ + (1-τ)θ  (EMA, cosine τ schedule)

    L_BYOL = ||p̄(v1) - sg(z̄'(v2))||² = 2 - 2 cos(p(v1), z'(v2))     (Eq. 5), both directions summed
    neurons of a layer: ŵ_i = w_i / ||w_i||, i = 1..N   (rows of a Linear weight; Conv2d output
                        filters flattened to vectors; biases and norm parameters are never neurons)
    E_s = Σ_{i≠j} ||ŵ_i - ŵ_j||^(-s)   (s = 1, 2),   Σ_{i≠j} log(1/||ŵ_i - ŵ_j||)   (s = 0)     (Eq. 8)
    E_s^a = Σ_{i≠j} θ_ij^(-s)  (s = 1, 2),   Σ_{i≠j} log(1/θ_ij)  (s = 0),  θ_ij = arccos(ŵ_iᵀŵ_j)  (Eq. 11)
    L = L_BYOL + λ_mhe Σ_{layers j} E_s,j / (N_j (N_j - 1))                                       (Eq. 10)

``mhe.power`` picks s: 0, 1, 2 (Euclidean, Eq. 8) or a0, a1, a2 (angular, Eq. 11). ``mhe.layers`` is
any subset of {encoder, projector, predictor} (Tab. 4): every Conv2d/Linear weight of those online
sub-networks is a layer of Eq. 10 (the target follows by EMA). Defaults per App. D: a2 on the
projector and the predictor, λ_mhe = 10 (``reg_weight=10``; §4 says 0.1 — see
configs/byol_mhe/imagenet_resnet50_300ep_sec4.yaml). ``mhe.layers: []`` or ``mhe.weight: 0`` is plain
BYOL, the "BYOL (repro)" rows. Each layer's energy E_s/(N(N-1)) is logged at every evaluation.

L_BYOL sums the two directions (v1 -> v2 and v2 -> v1), as BYOL does: it is twice Eq. 5's single direction
in scale, so λ_mhe weighs half as much against it as against Eq. 5 alone.

Numerics. From Liu et al.'s MHE code: ||w|| = sqrt(Σw² + 1e-4), ||ŵ_i - ŵ_j||² = 2 - 2cos, + 1e-4 on the
angle (θ + 1e-4 here, θ/π + 1e-4 there). Ours, not theirs (their code applies arccos to the raw cosine and
clamps nothing): cos is clamped into [-1+1e-6, 1-1e-6] for every power, so that a cosine at or past ±1
(coinciding or antipodal neurons, round-off) gives a finite energy and gradient, never inf or NaN (the clamp
passes no gradient). All pairs come from the Gram matrix ŴŴᵀ, made in blocks of rows with the energy's
gradient (no loop over neurons, no N x N autograd graph; ``hyperspherical_energy``).
Precision: float32 throughout, outside autocast. A pair term's relative error is about 2e-7 / (2 - 2cos),
up to 5x that: <= 1e-4 at angles >= 0.1 rad, ~1e-3 at 0.01 rad, percents below. The clamp bound 1 - 1e-6 is
0.99999899 in float32, so a clamped a2 pair is 1.2% low. Which pairs can reach the clamp: the + 1e-4 in ||w|| keeps
cos(w_i, w_j) <= 1/sqrt((1 + 1e-4/||w_i||²)(1 + 1e-4/||w_j||²)) (equality for parallel neurons), which reaches
1 - δ only if 1/||w_i||² + 1/||w_j||² <= 2δ/1e-4 = 0.02 (δ = 1e-6, to first order): both norms >= 10 when they are
equal, but with unequal norms one neuron may be as small as sqrt(50) ≈ 7.07 (the other -> ∞; ≈ 7.02 with the
float32 bound). float64 would make these exact but takes about 2x the term's time
(+7-9% of a ResNet-18 CPU step at batch 128), and far more on GPUs with slow float64.
Deviations from Liu et al.'s code, where we follow the paper's equations. Their hidden-layer energies
against ours, same weights, both a mean over pairs: s = 1, 2 the same; s = 0, -log(||ŵ_i-ŵ_j||²), exactly
2x Eq. 8; the angular ones use θ/π and scale a1, a2 by 0.1: a0 = ours + log π, a1 ≈ 0.1π ≈ 0.31x ours,
a2 ≈ 0.1π² ≈ 0.99x ours.

Batch-size study (Tab. 7): ``optim.accum_steps: N`` averages gradients over N forwards of
``optim.batch_size`` before one optimizer step (the EMA steps only with the optimizer; the lr scales
with batch_size x N). The MHE term depends on the weights only: its share of the group's gradient is
one energy's, with full weight.

Run:
    python byol_mhe.py --config configs/quickstart/byol_mhe.yaml                 # CPU, minutes
    python byol_mhe.py --config configs/byol_mhe/cifar10_resnet18_300ep.yaml --set mhe.power=a1
    torchrun --nproc_per_node=8 byol_mhe.py --config configs/byol_mhe/imagenet_resnet50_300ep.yaml
"""
import sys
from copy import deepcopy

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import dist
from common.config import UserError, parse
from common.ema import EMA, tau_at
from common.evaluate import projection_std
from common.models import Online, maybe_compile
from common.optim import build, lr_at, param_groups, scaled_lr, set_lr
from common.run import Run

METHOD = "byol_mhe"
POWERS = ("0", "1", "2", "a0", "a1", "a2")
PARTS = ("encoder", "projector", "predictor")
DEFAULTS = {  # BYOL-MHE §3.5 and App. D: CIFAR-10, ResNet-18, 300 epochs (the setting of the §5 ablations)
    "model": {"proj_hidden": 4096, "proj_dim": 256,  # g: 4096 then 256 (§3.5)
              "pred_hidden": 4096},                  # q: App. D --h_units=4096 (§3.5 describes only g)
    "optim": {"name": "lars", "lr": 1.5,  # §3.5: LARS; "for 300 epochs we further increase the LR_base = 1.5"
              "lr_scaling": "linear",     # §3.5: LR = LR_base x BatchSize / 256
              "weight_decay": 1.0e-6,     # §3.5, App. D
              "batch_size": 1024,         # §3.5 (CIFAR: "increase the batch size to 1024"; App. D: 512, ImageNet's)
              "epochs": 300, "warmup_epochs": 10},  # §3.5; App. D --warmup_epochs=10
    "eval": {"linear": "paper",           # §4: the linear evaluation of Chen et al. / Grill et al. (augmented)
             "linear_epochs": 80, "linear_batch_size": 100,  # App. D --ft_epochs=80 --ft_batch_size=100
             "linear_lr": 0.2, "linear_weight_decay": 0.0,   # --ft_learning_rate=0.2 --ft_weight_decay=0.0
             "linear_optimizer": "sgd"},                     # --ft_optimiser=sgd
    "ema": {"tau": 0.99, "schedule": "cosine"},  # §3.5: τ_base 0.99 at 300 epochs, raised to 1 by the cosine rule
    "mhe": {"weight": 10.0,  # λ_mhe of Eq. 10 (App. D reg_weight=10; §4: 0.1)
            "power": None,   # s: 0 | 1 | 2 (Eq. 8) | a0 | a1 | a2 (Eq. 11); null = a2 (App. D)
            "layers": ["projector", "predictor"]},  # any of encoder, projector, predictor (Tab. 4)
}
# (a null default accepts both `power: 2` and `power: a2`; check_mhe resolves it to one of POWERS)

COS_EPS, THETA_EPS, NORM_EPS = 1e-6, 1e-4, 1e-4  # the cos clamp is ours; θ + 1e-4, ||w|| eps: Liu et al.'s code


# --------------------------------------------------------------------------- the paper's pieces
def byol_loss(p, z_target):
    """(BYOL-MHE, Eq. 5) ||p̄ - z̄'||² = 2 - 2 cos(p, z') per sample; the target is detached."""
    return 2 - 2 * F.cosine_similarity(p, z_target.detach(), dim=-1)


def neurons(weight):
    """The N neurons of a layer as rows [N, d]: a Linear weight's rows, a Conv2d's flattened output filters."""
    return weight.reshape(weight.shape[0], -1)


def pair_terms(cos, power):
    """r_s of each pair (Eq. 8 / Eq. 11) from its clamped cosine, and the derivative dr_s/dcos."""
    s = int(power[-1])
    k = s if s else 1  # s = 0: d/dx log(1/x) = -1/x
    if power.startswith("a"):  # (Eq. 11) θ = arccos(cos) + 1e-4, dθ/dcos = -1/sqrt(1 - cos²)
        inv = (torch.arccos(cos) + THETA_EPS).reciprocal_()  # 1/θ
        r = torch.log(inv) if s == 0 else inv.pow(s)  # log(1/θ) | θ^-s
        dr = inv.pow(s + 1).mul_(torch.rsqrt(1 - cos * cos)).mul_(k)  # k θ^-(s+1) / sqrt(1 - cos²)
    else:  # (Eq. 8) D = ||ŵ_i - ŵ_j||² = 2 - 2cos, dD/dcos = -2
        inv = (2 - 2 * cos).reciprocal_()  # 1/D
        r = torch.log(inv).mul_(0.5) if s == 0 else inv.pow(s / 2)  # log(1/sqrt(D)) | D^(-s/2)
        dr = inv.pow(s / 2 + 1).mul_(k)  # k D^-(s/2+1)
    return r, dr


def hyperspherical_energy(weight, power="a2", block=2 ** 20):
    """(BYOL-MHE, Eq. 8 / App. A Eq. 11) E_s / (N(N-1)) of one layer's neurons, with its exact gradient.

    C = ŴŴᵀ is symmetric, and so are r_s(C) and G = dr_s/dC: the pairs j ≥ i are made a block of rows at a
    time (``block`` // N rows), each block reduced to its share of Σ_{i≠j} r_s(C_ij) and of the gradient
    dE/dŵ_i = Σ_j (G_ij + G_ji) ŵ_j = 2 (GŴ)_i (G zero for i = j and where the clamp holds C), then dropped:
    no N x N tensor is kept for autograd, and the products cost 1.5 N²d multiply-adds (autograd: 3 N²d).
    The gradient reaches ŵ, and through it w, as E + <Ŵ, 2GŴ> - sg(<Ŵ, 2GŴ>) (value E). Same value and
    gradient as autograd through the whole N x N expression (tests).
    """
    with torch.autocast(weight.device.type, enabled=False):
        w = neurons(weight).float()
        n = w.shape[0]
        w_hat = w / torch.sqrt((w * w).sum(1, keepdim=True) + NORM_EPS)  # ŵ = w/||w||, ||w|| = sqrt(Σw² + 1e-4)
        with torch.no_grad():
            h, energy = w_hat.detach(), w.new_zeros(())
            grad = torch.zeros_like(h)  # GŴ
            rows = max(1, block // n)
            for i in range(0, n, rows):  # block I = rows i..i+rows against the columns from i on (C, G symmetric)
                end = i + rows  # columns i..end: the I x I square (both orders of a pair); end..: each pair once
                cos = (h[i:end] @ h[i:].T).clamp_(-1 + COS_EPS, 1 - COS_EPS)  # ŵ_iᵀŵ_j
                r, dr = pair_terms(cos, power)
                dr.masked_fill_(cos.abs() >= 1 - COS_EPS, 0)  # the clamp passes no gradient
                r.diagonal().zero_(), dr.diagonal().zero_()  # i = j is not a pair
                energy += r.sum() + r[:, rows:].sum()  # pairs right of the square count for (i, j) and (j, i)
                grad[i:end].addmm_(dr, h[i:])  # (GŴ)_I from the I rows of G
                grad[end:].addmm_(dr[:, rows:].T, h[i:end])  # (GŴ) of the rows below I, from G_JI = G_IJᵀ
        link = 2 * (w_hat * grad).sum()
        return (energy + link - link.detach()) / (n * (n - 1))  # Σ_{i≠j} / (N(N-1))  (Eq. 10)


def hyperspherical_energy_literal(weight, power="a2"):
    """(BYOL-MHE, Eq. 8 / Eq. 11) E_s / (N(N-1)) as written, all N x N pairs at once, gradient by autograd, with
    the numerics above (the clamp at the float32 bounds the fast code applies). Slow; the tests compare
    ``hyperspherical_energy`` with it."""
    w, s = neurons(weight), int(power[-1])
    lo, hi = torch.tensor([-1 + COS_EPS, 1 - COS_EPS]).tolist()  # as float32 stores them
    w_hat = w / torch.sqrt((w * w).sum(1, keepdim=True) + NORM_EPS)
    cos = (w_hat @ w_hat.T).clamp(lo, hi)
    d = torch.arccos(cos) + THETA_EPS if power.startswith("a") else torch.sqrt(2 - 2 * cos)  # θ_ij | ||ŵ_i - ŵ_j||
    r = torch.log(1 / d) if s == 0 else d.pow(-s)
    n = w.shape[0]
    return (r * (1 - torch.eye(n, dtype=w.dtype, device=w.device))).sum() / (n * (n - 1))  # Σ_{i≠j}


def mhe_layers(online, parts):
    """The layers j of Eq. 10: every Conv2d / Linear of the chosen online sub-networks, by name."""
    nets = {"encoder": online.f, "projector": online.g, "predictor": online.q}
    return {f"{part}.{name}": m for part in parts for name, m in nets[part].named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.shape[0] > 1}


def mhe_loss(layers, power):
    """(BYOL-MHE, Eq. 10) Σ_layers E_s / (N(N-1)); 0 when no layer is regularised."""
    return sum((hyperspherical_energy(m.weight, power) for m in layers.values()), torch.zeros(()))


@torch.no_grad()
def energies(online, parts, power):
    """Each regularised layer's E_s/(N(N-1)), plus the mean over the layers of each sub-network (all three)."""
    every = {k: hyperspherical_energy(m.weight, power).item() for k, m in mhe_layers(online, PARTS).items()}
    out = {f"energy/{k}": e for k, e in every.items() if k.split(".")[0] in parts}
    for part in PARTS:
        e = [v for k, v in every.items() if k.split(".")[0] == part]
        out[f"energy_mean/{part}"] = sum(e) / len(e)
    return out


def check_mhe(cfg):
    """Resolve ``mhe.power`` (null = a2) to one of POWERS and check ``mhe.layers``."""
    power = cfg.mhe.power
    cfg.mhe.power = "a2" if power is None else str(power)
    if cfg.mhe.power not in POWERS or isinstance(power, bool):
        raise UserError(f"config key 'mhe.power' = {power!r} is not one of: {', '.join(POWERS)} "
                        "(0, 1, 2: Euclidean, Eq. 8; a0, a1, a2: angular, Eq. 11)")
    bad = [p for p in cfg.mhe.layers if p not in PARTS]
    if bad or len(set(cfg.mhe.layers)) != len(cfg.mhe.layers):
        raise UserError(f"mhe.layers = {cfg.mhe.layers}: give distinct names among {', '.join(PARTS)} "
                        "(e.g. --set mhe.layers=[projector,predictor]; [] = plain BYOL)")
    return cfg


def byol_mhe_loss(model, target, x1, x2, layers, mhe):
    """(BYOL-MHE, Eq. 10) L = L_BYOL + λ_mhe Σ_layers E_s/(N(N-1)) on two views: the step's loss and its parts
    (and the collapse signal ``proj_std`` of the online projections z of the first view).

    The energy depends on the weights only; with ``optim.accum_steps`` > 1 it is computed at each forward of
    the group (the weights do not change within it, so the group's gradient is λ_mhe times one energy's)."""
    (z1, z2), (p1, p2) = model([x1, x2])
    with torch.no_grad():
        t1, t2 = target(x1), target(x2)
    p1, p2, t1, t2 = p1.float(), p2.float(), t1.float(), t2.float()  # losses in fp32 (under autocast)
    l_byol = (byol_loss(p1, t2) + byol_loss(p2, t1)).mean()  # (Eq. 5), symmetrised: the sum of both directions
    l_mhe = torch.zeros((), device=p1.device)
    if mhe.weight != 0:  # (Eq. 8 / 11, summed as in Eq. 10), float32
        l_mhe = mhe_loss(layers, mhe.power).to(p1.device)
    return l_byol + mhe.weight * l_mhe, {"loss_byol": l_byol, "loss_mhe": l_mhe, "proj_std": projection_std(z1)}


# --------------------------------------------------------------------------- training
def train(cfg):
    cfg = check_mhe(cfg)
    run = Run(cfg, METHOD)  # run folder (locked), logger, resume state, seeds, signal handling
    views = run.views(2)
    loader = run.loader(views)  # this rank's share of every global batch (uint8 images)

    # model: online f, g, q; the EMA target (f, g); the MHE layers (Eq. 10); LARS, lr scaled by the global batch
    online = dist.sync_bn(Online(cfg.model), cfg).to(run.device, memory_format=run.memory_format)
    target = deepcopy(nn.Sequential(online.f, online.g))
    ema = EMA(target, nn.Sequential(online.f, online.g))
    layers = mhe_layers(online, cfg.mhe.layers)
    peak_lr = scaled_lr(cfg.optim)
    opt = build(cfg.optim, param_groups([online], cfg.optim.weight_decay, cfg.optim.exclude_bias_norm), peak_lr)
    scaler = torch.amp.GradScaler(run.device.type, enabled=cfg.precision == "fp16")
    maybe_compile(online.f, cfg)  # after the target's deepcopy (a copy would share the compiled forward)
    model = dist.ddp(online, run.device)
    def diagnostics(f_test):  # at each evaluation: every layer's E_s (Eq. 8 / 11), the weights' own
        return energies(online, cfg.mhe.layers, cfg.mhe.power)
    run.resume_or_evaluate_init(online.f, diagnostics, online=online, target=target, optimizer=opt, scaler=scaler,
                                views=views)

    for epoch in run.epochs():
        for batch, step_due in run.batches(loader):  # step_due: the last forward of an accumulation group
            x1, x2 = views(batch)
            with dist.no_sync(model, unless=step_due):
                with run.autocast():
                    loss, logs = byol_mhe_loss(model, target, x1, x2, layers, cfg.mhe)  # (Eq. 10)
                scaler.scale(loss / cfg.optim.accum_steps).backward()  # the group's mean gradient
            if step_due:  # lr: warm-up, then cosine; then the EMA target ξ <- τξ + (1-τ)θ
                lr = set_lr(opt, lr_at(run.step, run.total_steps, run.warmup_steps, peak_lr))
                if cfg.optim.clip_grad > 0:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(online.parameters(), cfg.optim.clip_grad)
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                tau = ema.update(tau_at(run.step, run.total_steps, cfg.ema.tau, cfg.ema.schedule))
                run.step_done(loss, logs, lr=lr, tau=tau)
                if run.stop_requested():
                    run.save_and_exit()
        if run.eval_due():
            run.evaluate()
        run.epoch_done()
        if run.stop_requested():
            run.save_and_exit()
    run.finish({"mhe_power": cfg.mhe.power, "mhe_layers": cfg.mhe.layers, "mhe_weight": cfg.mhe.weight})


if __name__ == "__main__":
    dist.launch(train, parse(sys.argv[1:], DEFAULTS, method=METHOD))

"""BYOL and BYOL + uniformity loss, one file.

Paper: Durrant & Leontidis, "Hyperspherically Regularized Networks for BYOL
Improves Feature Uniformity and Separability" (BYOL-MHE), §3.3, Eq. 2, 3, 5, 7;
training setup §3.5 and App. D; BYOL: Grill et al. 2020.

    online:  x -> f_θ (encoder) -> g_θ (projector) = z -> q_θ (predictor) = p
    target:  x -> f_ξ -> g_ξ = z'            ξ <- τξ + (1-τ)θ  (EMA, cosine τ schedule)

    L_BYOL(θ, ξ) = E ||p̄(v1) - sg(z̄'(v2))||²  = 2 - 2 cos(p(v1), z'(v2))      (Eq. 5), both directions summed
    L_uniformity(f; t) = log E_{i≠j} exp(-t ||z̄_i - z̄_j||²),  t = 2           (Eq. 3)
    L = L_BYOL + λ_uni · L_uniformity(z̄_θ)                                     (Eq. 7)

The uniformity term is taken on the l2-normalised *online projections* z (the
projector output, not the prediction; §3.3 "minimize Eq. 3 of the online
projections f_θ only and independent of the predictor q_θ"), over all pairs
i≠j of the global batch (all GPUs), for each view, averaged over the two views
(as Wang & Isola's code does). λ_uni = 0.125 (§4); App. D lists uni_val=0.1 —
we keep 0.125. λ_uni = 0 is plain BYOL (the baseline configs).

L_BYOL sums the two directions (v1 -> v2 and v2 -> v1), as BYOL does: it is
twice Eq. 5's single direction in scale, so λ_uni weighs half as much against
it as against Eq. 5 alone (0.125 here = 0.0625 against the mean of the two).

Batch-size study (Tab. 7): ``optim.accum_steps: N`` averages gradients over N
forwards of ``optim.batch_size`` before one optimizer step; the EMA steps only
with the optimizer, and the lr scales with batch_size x N.

Run:
    python byol_uniform.py --config configs/quickstart/byol_uniform.yaml      # CPU, minutes
    python byol_uniform.py --config configs/byol_uniform/cifar10_resnet18_300ep.yaml
    torchrun --nproc_per_node=8 byol_uniform.py --config configs/byol_uniform/imagenet_resnet50_300ep.yaml
    python byol_uniform.py --config ... --set optim.lr=1.0 dist.nproc=2 resume=auto
"""
import sys
from copy import deepcopy

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import dist
from common.config import parse
from common.ema import EMA, tau_at
from common.evaluate import projection_std, uniformity
from common.models import Online, maybe_compile
from common.optim import build, lr_at, param_groups, scaled_lr, set_lr
from common.run import Run

METHOD = "byol_uniform"
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
    "loss": {"lambda_uni": 0.125,  # λ_uni of Eq. 7 (§4; App. D lists uni_val=0.1); 0 = plain BYOL
             "t": 2.0},            # t of Eq. 3
}


# --------------------------------------------------------------------------- the paper's pieces
def byol_loss(p, z_target):
    """(BYOL-MHE, Eq. 5) ||p̄ - z̄'||² = 2 - 2 cos(p, z') per sample; the target is detached."""
    return 2 - 2 * F.cosine_similarity(p, z_target.detach(), dim=-1)


def uniformity_loss(z, t=2.0):
    """(BYOL-MHE, Eq. 3) log E_{i≠j} exp(-t ||z̄_i - z̄_j||²) over the rows of z (all pairs i≠j).

    The same function the evaluation logs (Wang & Isola): a log-sum-exp over the off-diagonal
    entries of 2 - 2 z̄z̄ᵀ, minus log(n(n-1)).
    """
    return uniformity(z, t)


def byol_uniform_loss(model, target, x1, x2, loss_cfg):
    """(BYOL-MHE, Eq. 7) L = L_BYOL + λ_uni L_uniformity on two views: the step's loss and its parts (and the
    collapse signal ``proj_std`` of the online projections z of the first view)."""
    (z1, z2), (p1, p2) = model([x1, x2])
    with torch.no_grad():
        t1, t2 = target(x1), target(x2)
    p1, p2, t1, t2 = p1.float(), p2.float(), t1.float(), t2.float()  # losses in fp32 (under autocast)
    l_byol = (byol_loss(p1, t2) + byol_loss(p2, t1)).mean()  # (Eq. 5), symmetrised: the sum of both directions
    l_uni = torch.zeros((), device=p1.device)
    if loss_cfg.lambda_uni != 0:  # (Eq. 3) over the global batch (all processes), each view
        l_uni = (uniformity_loss(dist.all_gather_grad(z1.float()), loss_cfg.t)
                 + uniformity_loss(dist.all_gather_grad(z2.float()), loss_cfg.t)) / 2
    logs = {"loss_byol": l_byol, "loss_uni": l_uni, "proj_std": projection_std(z1)}
    return l_byol + loss_cfg.lambda_uni * l_uni, logs


# --------------------------------------------------------------------------- training
def train(cfg):
    run = Run(cfg, METHOD)  # run folder (locked), logger, resume state, seeds, signal handling
    views = run.views(2)
    loader = run.loader(views)  # this rank's share of every global batch (uint8 images)

    # model: online f, g, q; the EMA target (f, g); LARS with the lr scaled by the global batch
    online = dist.sync_bn(Online(cfg.model), cfg).to(run.device, memory_format=run.memory_format)
    target = deepcopy(nn.Sequential(online.f, online.g))
    ema = EMA(target, nn.Sequential(online.f, online.g))
    peak_lr = scaled_lr(cfg.optim)
    opt = build(cfg.optim, param_groups([online], cfg.optim.weight_decay, cfg.optim.exclude_bias_norm), peak_lr)
    scaler = torch.amp.GradScaler(run.device.type, enabled=cfg.precision == "fp16")
    maybe_compile(online.f, cfg)  # after the target's deepcopy (a copy would share the compiled forward)
    model = dist.ddp(online, run.device)
    run.resume_or_evaluate_init(online.f, online=online, target=target, optimizer=opt, scaler=scaler, views=views)

    for epoch in run.epochs():
        for batch, step_due in run.batches(loader):  # step_due: the last forward of an accumulation group
            x1, x2 = views(batch)
            with dist.no_sync(model, unless=step_due):
                with run.autocast():
                    loss, logs = byol_uniform_loss(model, target, x1, x2, cfg.loss)  # (Eq. 7)
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
    run.finish({"lambda_uni": cfg.loss.lambda_uni})


if __name__ == "__main__":
    dist.launch(train, parse(sys.argv[1:], DEFAULTS, method=METHOD))

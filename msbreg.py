"""MSBReg: multiview centroid, singular-value and Brownian diffusive losses, one file.

Paper: Moon, Buracas, Park, Kim, Canny, "An Embedding-Dynamic Approach to Self-supervised Learning"
(MSBReg), §3.2, Eq. 2-7; training setup App. 7.1-7.3; BYOL (Grill et al. 2020) architecture §3.1.

    K views v_1..v_K of each image x (same augmentation family, Tab. 9), every view through both networks:
    online:  v_j -> f_θ -> g_θ -> h_θ = p_j        target: v_l -> f_ξ -> g_ξ = z'_l     ξ <- τξ + (1-τ)θ

    L_c = 1/K Σ_j ||p̂_j - 1/K Σ_l ẑ'_l||²      (Eq. 3, per image, mean over the batch; ẑ' stop-gradient)
    L_b = 1/K Σ_j <n̂, p̂_j>,  n ~ N(0, I_d)     (Eq. 4, one n per image per step, shared by its K views)
    S_j = 1/(n-1) Σ_i (p_ij - p̄_j)(p_ij - p̄_j)ᵀ (Eq. 5, over the global batch, per view j)
    L_s = 1/K Σ_j ||S_j - I_d||_F²  (= 1/K Σ_j Σ_i (σ_ij - 1)², Eq. 7)                      (Eq. 6)
    L   = L_c + λ_s L_s + λ_b L_b,  λ_s = 0.004, λ_b = 0.5 (§4.5, Tab. 11)                   (Eq. 2)

Choices where the paper leaves room (the full list: configs/msbreg/README.md):
- L_s on raw predictions p (Eq. 5 as written) by default; ``loss.s_normalized: true`` uses p̂ (the
  sentence before Eq. 5 speaks of "the projections p̂").
- Brownian noise comes from its own seeded generator (saved in every checkpoint: exact resume). Every
  process draws the *global* batch's noise [batch_size, d] from the same stream and keeps the rows of its
  own images (rank r holds global rows r, r+W, ...: ``common.loaders.ResumableSampler``'s split), so the
  noise an image gets does not depend on the number of processes.
- Each view is a separate forward (per-view BatchNorm statistics, as BYOL's two views).
- ``loss.centroid: false`` (K = 2 only) replaces Eq. 3 by BYOL's Eq. 1, symmetrised and averaged over
  the two directions (so on the scale of one direction, as Eq. 1; λ_s and λ_b weigh against that): the
  "L_c ✗" rows of Tab. 8 and the K = 2 cells of Tab. 11. With K = 2, Eq. 3 itself is *not* BYOL: it equals
  ½ L_BYOL + ¼ (||p̂_1-ẑ'_1||² + ||p̂_2-ẑ'_2||²) - ¼ ||ẑ'_1-ẑ'_2||² (tests/test_msbreg_losses.py).
- lr = base × batch/256 × K (App. 7.1). Heads 512 hidden, 128 out for ResNet-18 (App. 7.2);
  ``model.head_norm`` swaps the heads' BatchNorm for LayerNorm (Tab. 13).
- EMA: §3.1 says "bias-corrected exponentially weighted moving average"; we apply the plain ξ <- τξ + (1-τ)θ,
  without bias correction (no formula given; ξ starts as a copy of θ, not as a zero average).
- Epochs: 320 (App. 7.1: "320 epochs for ImageNet-100 and STL-10 benchmarks and 300 epochs for ImageNet").
- ``eval.linear: paper``: App. 8.1 gives no probe hyper-parameters; the project's augmented probe with the shared
  defaults (random resized crop + flip, SGD lr 0.2, batch 256, 100 epochs), not a setting of the paper.

Run:
    python msbreg.py --config configs/quickstart/msbreg.yaml                     # CPU, minutes
    python msbreg.py --config configs/msbreg/stl10_resnet18_320ep_k4.yaml --set data.root=/data
    torchrun --nproc_per_node=8 msbreg.py --config configs/msbreg/imagenet_resnet50_300ep_k4.yaml
    python msbreg.py --config ... --set loss.K=8 loss.lambda_b=1.0 dist.nproc=2 resume=auto
"""
import sys
from copy import deepcopy
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import dist
from common.config import UserError, parse
from common.ema import EMA, tau_at
from common.evaluate import apply_eval, extract_features, knn_accuracies, projection_std
from common.models import maybe_compile, mlp, resnet
from common.optim import build, lr_at, param_groups, scaled_lr, set_lr
from common.run import Run

METHOD = "msbreg"
DEFAULTS = {
    "loss": {"K": 4,                  # views per image (K = 2: BYOL-like)
             "lambda_s": 0.004,       # λ_s of Eq. 2 (§4.5)
             "lambda_b": 0.5,         # λ_b of Eq. 2 (§4.5)
             "s_normalized": False,   # Eq. 5 on p (false, as written) or on p̂ (true)
             "centroid": True,        # Eq. 3; false: BYOL's Eq. 1 (K = 2), the "L_c ✗" rows of Tab. 8
             "noise_seed": 0},        # seed of the Brownian noise stream (Eq. 4)
    "model": {"proj_hidden": 512, "proj_dim": 128, "pred_hidden": 512,  # ResNet-18 heads (App. 7.2)
              "head_norm": "bn"},     # norm in the projector/predictor: bn | ln | none (Tab. 13)
    "optim": {"name": "lars", "lr": 0.4,  # App. 7.1: LARS, base lr 0.4 (ImageNet-100; STL-10 0.5, ImageNet 0.15)
              "lr_scaling": "linear",     # App. 7.1: base_lr x batch/256 (x K, in train())
              # App. 7.1 (320: ImageNet-100, STL-10)
              "weight_decay": 1.0e-5, "batch_size": 512, "epochs": 320, "warmup_epochs": 10},
    "ema": {"tau": 0.99, "schedule": "cosine"},  # not stated (§3.1: BYOL's target); ours: BYOL-MHE's 300-epoch τ
    "augment": {"blur_p": [1.0], "solarize_p": [0.2]},  # Tab. 9: every view
    "eval": {"knn_k": [200, 20, 5],   # weighted kNN (T = eval.knn_t); 20/200-NN of Tab. 4
             "knn_majority_k": [5]},  # majority-vote kNN at the end: the 5-NN of Tab. 1
}
CHOICES = {"model.head_norm": ("bn", "ln", "none"), "loss.K": "x >= 2", "loss.lambda_s": "x >= 0",
           "loss.lambda_b": "x >= 0", "eval.knn_majority_k": "x >= 1"}


# --------------------------------------------------------------------------- the paper's pieces
def centroid_loss(p, z_target):
    """(MSBReg, Eq. 3) 1/K Σ_j ||p̂_j - 1/K Σ_l ẑ'_l||² per image. p, z_target: [K, B, d] -> [B]."""
    centroid = F.normalize(z_target.detach(), dim=-1).mean(0)  # target: stop-gradient
    return (F.normalize(p, dim=-1) - centroid).pow(2).sum(-1).mean(0)


def byol_loss(p, z_target):
    """(MSBReg, Eq. 1) ||p̂ - ẑ'||² across the two views, averaged over both directions. [2, B, d] -> [B]."""
    pn, zn = F.normalize(p, dim=-1), F.normalize(z_target.detach(), dim=-1)
    return ((pn[0] - zn[1]).pow(2).sum(-1) + (pn[1] - zn[0]).pow(2).sum(-1)) / 2


def brownian_loss(p, n):
    """(MSBReg, Eq. 4) 1/K Σ_j <n̂, p̂_j> per image; n [B, d] is shared by the K views. p: [K, B, d] -> [B]."""
    return (F.normalize(n, dim=-1) * F.normalize(p, dim=-1)).sum(-1).mean(0)


def singular_value_loss(p, normalized=False):
    """(MSBReg, Eq. 5-6) 1/K Σ_j ||S_j - I||_F², S_j the covariance over the batch (rows) of view j.

    p: [K, n, d], the whole (global) batch of each view. Equals 1/K Σ_j Σ_i (σ_ij - 1)² (Eq. 7)."""
    if normalized:
        p = F.normalize(p, dim=-1)
    n, d = p.shape[1], p.shape[2]
    pc = p - p.mean(1, keepdim=True)
    S = pc.transpose(1, 2) @ pc / (n - 1)                                   # (Eq. 5)
    return (S - torch.eye(d, device=p.device, dtype=p.dtype)).pow(2).sum((1, 2)).mean()  # (Eq. 6)


class BrownianNoise:
    """n ~ N(0, I_d) for each image of the step (Eq. 4), from a seeded stream kept in the checkpoint.

    Every process draws the global batch's noise and keeps its own images' rows (rank r holds global rows
    r, r+W, ... of each global batch), so an image's noise is the same for any number of processes."""

    def __init__(self, dim, seed, device):
        self.dim, self.generator = dim, torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(self, local_batch):
        n = torch.randn(local_batch * dist.world_size(), self.dim, generator=self.generator,
                        device=self.generator.device)
        return n[dist.rank()::dist.world_size()]

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, sd):
        self.generator.set_state(sd["generator"])


class MultiViewOnline(nn.Module):
    """f_θ (ResNet without fc), g_θ (projector), h_θ (predictor) with the heads' norm ``model.head_norm``;
    ``forward(views)`` -> (z, p), the projections g(f(v)) and predictions h(z), each [K, B, d]. Each of the K views
    is its own forward (per-view BN statistics), f, g then h, view after view."""

    def __init__(self, m):
        super().__init__()
        self.f, dim = resnet(m.arch, m.width, m.cifar_stem, m.norm, m.zero_init_residual)
        self.g = mlp(dim, m.proj_hidden, m.proj_dim, norm=m.head_norm)
        self.h = mlp(m.proj_dim, m.pred_hidden, m.proj_dim, norm=m.head_norm)

    def forward(self, views):
        zs, ps = [], []
        for v in views:
            zs.append(self.g(self.f(v)))
            ps.append(self.h(zs[-1]))
        return torch.stack(zs), torch.stack(ps)


@torch.no_grad()
def knn_majority(encoder, loaders, device, ks):
    """Majority-vote k-NN (cosine) on the frozen encoder: the 5-NN column of Tab. 1 ({} for no ``ks``)."""
    if not ks:
        return {}
    bank_f, bank_y = extract_features(encoder, loaders["train"], device, gather=False)  # this rank's rows
    test_f, test_y = extract_features(encoder, loaders["test"], device)
    acc = knn_accuracies(bank_f, bank_y, test_f, test_y, ks=tuple(ks), num_classes=loaders["num_classes"],
                         weighted=False, sharded=True)
    return {f"{k}_majority": v for k, v in acc.items()}


@torch.no_grad()
def singular_values(online, f_test, normalized=False):
    """(MSBReg, Eq. 5-7) as an evaluation diagnostic: the singular values σ of the covariance S of the
    predictions p = h(g(f)) of the un-augmented test images' encoder features ``f_test`` (heads in eval mode),
    summarised as Σ(σ - 1)² = ||S - I||_F² (Eq. 6-7, what λ_s L_s pushes down), the largest and the smallest σ."""
    p = apply_eval(online.h, apply_eval(online.g, f_test)).double()
    p = F.normalize(p, dim=-1) if normalized else p
    pc = p - p.mean(0)
    sv = torch.linalg.svdvals(pc.T @ pc / (len(p) - 1))  # (Eq. 5), the whole test set as the batch
    return {"sv_dist_test": (sv - 1).pow(2).sum().item(), "sv_max_test": sv[0].item(), "sv_min_test": sv[-1].item()}


def msbreg_loss(model, target, xs, n, loss_cfg):
    """(MSBReg, Eq. 2) L = L_c + λ_s L_s + λ_b L_b on K views ``xs`` with the Brownian directions ``n``
    (one per image): the step's loss and its parts (and the collapse signal ``proj_std`` of the online
    projections z of the first view)."""
    L = loss_cfg
    z, p = model(xs)
    p = p.float()                                           # [K, B, d], fp32 losses (under autocast)
    with torch.no_grad():
        z_t = torch.stack([target(x) for x in xs]).float()  # [K, B, d]
    l_c = (centroid_loss(p, z_t) if L.centroid else byol_loss(p, z_t)).mean()  # (Eq. 3), or BYOL's Eq. 1
    l_s = torch.zeros((), device=p.device)
    if L.lambda_s != 0:  # (Eq. 5-6) covariance over the global batch: gather every process's rows
        p_all = dist.all_gather_grad(p.transpose(0, 1).contiguous()).transpose(0, 1)
        l_s = singular_value_loss(p_all, L.s_normalized)
    l_b = brownian_loss(p, n).mean()                        # (Eq. 4)
    logs = {"loss_c": l_c, "loss_s": l_s, "loss_b": l_b, "proj_std": projection_std(z[0])}
    return l_c + L.lambda_s * l_s + L.lambda_b * l_b, logs


# --------------------------------------------------------------------------- training
def train(cfg):
    K = cfg.loss.K
    if not cfg.loss.centroid and K != 2:
        raise UserError(f"loss.K={K} with loss.centroid=false: BYOL's Eq. 1 is for K = 2 views")
    run = Run(cfg, METHOD)  # run folder (locked), logger, resume state, seeds, signal handling
    views = run.views(K)
    loader = run.loader(views)  # this rank's share of every global batch (uint8 images)
    noise = BrownianNoise(cfg.model.proj_dim, cfg.loss.noise_seed, run.device)  # the same stream on every rank

    # model: online f, g, h; the EMA target (f, g); LARS with lr = base x batch/256 x K (App. 7.1)
    online = dist.sync_bn(MultiViewOnline(cfg.model), cfg).to(run.device, memory_format=run.memory_format)
    target = deepcopy(nn.Sequential(online.f, online.g))
    ema = EMA(target, nn.Sequential(online.f, online.g))
    peak_lr = scaled_lr(cfg.optim, lr_factor=K)
    opt = build(cfg.optim, param_groups([online], cfg.optim.weight_decay, cfg.optim.exclude_bias_norm), peak_lr)
    scaler = torch.amp.GradScaler(run.device.type, enabled=cfg.precision == "fp16")
    maybe_compile(online.f, cfg)  # after the target's deepcopy (a copy would share the compiled forward)
    model = dist.ddp(online, run.device)
    diagnostics = partial(singular_values, online, normalized=cfg.loss.s_normalized)  # each evaluation: Eq. 5-7
    run.resume_or_evaluate_init(online.f, diagnostics, online=online, target=target, optimizer=opt, scaler=scaler,
                                views=views, noise=noise)

    for epoch in run.epochs():
        for batch, step_due in run.batches(loader):  # step_due: the last forward of an accumulation group
            xs = views(batch)
            n = noise(xs[0].shape[0])  # (Eq. 4) one fresh direction per image, shared by its K views
            with dist.no_sync(model, unless=step_due):
                with run.autocast():
                    loss, logs = msbreg_loss(model, target, xs, n, cfg.loss)  # (Eq. 2)
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
    run.finish({"K": K, **knn_majority(online.f, run.eval_sets, run.device, cfg.eval.knn_majority_k)})  # Tab. 1: 5-NN


if __name__ == "__main__":
    dist.launch(train, parse(sys.argv[1:], DEFAULTS, CHOICES, method=METHOD))

"""RAFT, BYOL′ and BYOL with every predictor variant of the paper, one file.

Paper: Shi, Luo, Tang, Wang, Zhuang, "Run Away From your Teacher: Understanding BYOL by a Novel
Self-Supervised Approach" (RAFT): Eq. 2–11, §5 Remark, Alg. 1, App. B, Tab. 1–3.

    online:  x -> f_θ (encoder) -> g_θ (projector) = z -> q_w (predictor) = p       "q_w ∘ f_θ" in the paper
    MT:      x -> f_ξ -> g_ξ = z'            ξ <- τξ + (1-τ)θ, τ constant 0.996 (App. B: EMA rate 4e-3)

    L_align(q∘f)       = E ||p̂(t1 x) - p̂(t2 x)||²       (Eq. 2; Alg. 1 line 7): both views get gradient
    L_cross-model(q∘f) = ½ E [||p̂(t1 x) - ẑ'(t1 x)||² + ||p̂(t2 x) - ẑ'(t2 x)||²]
                         (Eq. 6 symmetrised, §4.1; Alg. 1 line 8): the MT on the same view, sg(ẑ')
    L_BYOL′ = α L_align + β L_cross-model                 (Eq. 7, 10)
    L_RAFT  = α L_align − β L_cross-model                 (Eq. 9, 11; Alg. 1 line 8 carries the minus)
    L_BYOL  = ½ E [||p̂(t1 x) - ẑ'(t2 x)||² + ||p̂(t2 x) - ẑ'(t1 x)||²]   (Eq. 4 symmetrised; α, β unused)

    x̂ = x/||x|| (the hypersphere of §2.1).  Tangential (§5 Remark): a squared distance to the teacher
    ||ẑ' - p̂||² becomes ||ẑ' - λp̂||²/λ, λ = sg(<p̂, ẑ'>): its gradient w.r.t. p̂ is the tangential part
    -2(ẑ' - <p̂, ẑ'> p̂) of the plain one. Applied to the cross-model term (and to BYOL's only term).

Sign convention (explicit, because the paper uses two): ``loss.beta`` is the β > 0 of Eq. 9–11 and
``loss.objective`` chooses the sign (byol_prime: +β, raft: −β). Tab. 3 folds the sign into β
(L = αL_align + βL_cross with β = −1 for RAFT): Tab. 3's β is ``SIGN[objective] * loss.beta``, logged
as ``beta_tab3``. A negative ``loss.beta`` is refused so that Tab. 3's "−1" is never applied twice.

Variants (names as Tab. 2; configs/raft/*.yaml has one file per row of Tab. 1 and Tab. 3):
``model.predictor``: mlp (Linear 512–ReLU–Linear, no BN, App. B; ``model.pred_norm: bn`` for §3's
"MLP with batch normalization"), linear (q_w(·) = W(·), no bias, -LP), linear_identity_init (W = I at
start, -LPI), none (q_w = I, -NP). ``model.same_init``: true = the MT starts as a copy of the online
network (BYOL); false = independent initialisation (the authors' code, WOWNICE/RAFT, same_init=False).

Logged every epoch (Tab. 1 reports the mean of the last 10 epochs; summary.json holds that mean):
``align_qf`` = L_align(q∘f) (Eq. 2) and ``uniform_f`` = L_uniform(f_θ) (Eq. 3, t = 2) of the online
projection z (the space of the MT f_ξ), both averaged over the epoch's training batches (global batch).

Note (derived, and tested): because p̂ = p/||p|| is inside the graph, the normalisation's Jacobian
(I - p̂p̂ᵀ)/||p|| already drops the normal component, so ``tangential`` changes the loss value but not the
parameter gradients (up to round-off); BYOL′ from (θ, W) and RAFT from (θ, −W) take the same encoder
step with or without it (Theorem 5.1; tests/test_raft_losses.py).

Run:
    python raft.py --config configs/quickstart/raft.yaml                       # CPU, minutes, synthetic data
    python raft.py --config configs/raft/raft-mlpp.yaml                        # App. B, CIFAR-10 96x96, 3 seeds
    python raft.py --config configs/raft/tanraft-lp.yaml --set seeds=[0] dist.nproc=2 resume=auto

Deviations: L_BYOL is the mean of the two directions of Eq. 4, so on the scale of one direction, as is
L_cross-model (mean over the two views); α and β weigh terms of that scale (the authors' code also
divides by the dimension; Adam is nearly invariant to that scale). The linear predictor has no bias
(Eq. q_w = W; the authors' code uses one). The evaluation protocol and the other deviations: configs/raft/README.md.

Evaluation (App. B): CIFAR-10 test and memory-bank images are the whole 32 x 32 image resized to 96 x 96
(``eval.crop: 1.0``; the authors' load_testset applies only ToTensor and Normalize), not BYOL-MHE's 28 x 28 centre
crop. Linear probe: App. B gives "100 epochs with learning rate 5 x 10^-4" and no optimizer, batch or augmentation.
The default (``eval.linear: fast``) trains Adam on cached, un-augmented features; the authors' probe
(load_eval_trainset) trains on RandomResizedCrop and horizontal-flip views of the frozen encoder, which is the
shape of ``--set eval.linear=paper`` (random resized crop of ``augment.crop_scale`` + flip, the config's optimizer).
"""
import json
import os
import sys
from copy import deepcopy
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import dist, log
from common.config import parse
from common.ema import EMA, tau_at
from common.evaluate import projection_std, uniformity
from common.models import Online, maybe_compile, mlp
from common.optim import build, lr_at, param_groups, scaled_lr, set_lr
from common.run import Run

METHOD = "raft"
DEFAULTS = {  # App. B: ResNet-18, projector 512-BN-ReLU-128, predictor without BN, Adam 3e-4, batch 128, τ 0.996
    "seeds": [],  # run each seed in turn into <name>/seed<s> and write <name>/summary.json (mean ± std); []: `seed`
    "model": {"proj_hidden": 512, "proj_dim": 128, "pred_hidden": 512,
              "predictor": "mlp",     # mlp | linear | linear_identity_init | none  (Tab. 2: -MLPP, -LP, -LPI, -NP)
              "pred_norm": "none",    # App. B: "without the batch normalization"; bn: §3's BYOL predictor
              "same_init": True},     # MT = copy of the online network (BYOL); false: independent (authors' code)
    "loss": {"objective": "raft",     # byol (Eq. 4) | byol_prime (Eq. 10) | raft (Eq. 11)
             "alpha": 1.0,            # α of Eq. 9-11 (Tab. 1: (α, β) = (1, 1))
             "beta": 1.0,             # β > 0 of Eq. 9-11; RAFT subtracts it (Tab. 3 writes RAFT's β as -β)
             "tangential": False},    # §5 Remark: keep only the tangential gradient of the teacher term
    "optim": {"name": "adam", "lr": 3.0e-4, "lr_scaling": "none", "weight_decay": 0.0, "batch_size": 128,
              "epochs": 300, "warmup_epochs": 0,
              "schedule": "constant"},  # App. B names no lr schedule: constant | cosine (warm-up + cosine)
    "ema": {"tau": 0.996, "schedule": "constant"},  # App. B: EMA rate 4e-3 "without the cosine smoothing trick"
    "eval": {"linear_epochs": 100, "linear_lr": 5.0e-4, "linear_optimizer": "adam",  # App. B (Adam: our guess)
             "crop": 1.0},  # App. B: "Each image is resized from 32 x 32 to 96 x 96" (no centre crop)
}
CHOICES = {"model.predictor": ("mlp", "linear", "linear_identity_init", "none"), "model.pred_norm": ("none", "bn"),
           "loss.objective": ("byol", "byol_prime", "raft"), "optim.schedule": ("constant", "cosine"),
           "loss.alpha": "x >= 0; the α > 0 of Eq. 9-11",
           "loss.beta": "x >= 0; the β > 0 of Eq. 9-11, loss.objective sets the sign: Tab. 3's β = -1 for RAFT is "
                        "objective=raft beta=1"}
SIGN = {"byol_prime": +1.0, "raft": -1.0}  # Eq. 10: +β L_cross;  Eq. 11: −β L_cross  (Tab. 3's β = SIGN · β)
LAMBDA_MIN = 1e-6  # |λ| floor of the tangential surrogate (λ = <p̂, ẑ'> = 0 only for orthogonal unit vectors)


# --------------------------------------------------------------------------- the paper's pieces
def unit(v):
    """x̂ = x / ||x||: the hypersphere representation space (RAFT §2.1, Theorem 5.1 condition i)."""
    return F.normalize(v, dim=-1)


def alignment_loss(p1, p2):
    """(RAFT, Eq. 2; Alg. 1 line 7) ||p̂1 - p̂2||² per sample, both online outputs keep their gradient."""
    return (unit(p1) - unit(p2)).pow(2).sum(-1)


def sphere_distance(p_hat, z_hat, tangential=False):
    """||p̂ - ẑ'||² per sample for unit vectors (Eq. 6 on the hypersphere). Tangential (§5 Remark): ||ẑ' - λp̂||²/λ
    with λ = sg(<p̂, ẑ'>); its gradient w.r.t. p̂ is -2(ẑ' - λp̂), the tangential part of the plain -2(ẑ' - p̂)."""
    if not tangential:
        return (p_hat - z_hat).pow(2).sum(-1)
    lam = (p_hat * z_hat).sum(-1, keepdim=True).detach()
    lam = torch.where(lam.abs() < LAMBDA_MIN, torch.where(lam < 0, -LAMBDA_MIN, LAMBDA_MIN), lam)
    return (z_hat - lam * p_hat).pow(2).sum(-1) / lam.squeeze(-1)


def teacher_distance(p, z_mt, tangential=False):
    """Distance of an online output p to the mean teacher's z' on the sphere; z' is stop-gradient (sg)."""
    return sphere_distance(unit(p), unit(z_mt.detach()), tangential)


def cross_model_loss(p1, p2, z1_mt, z2_mt, tangential=False):
    """(RAFT, Eq. 6 symmetrised as in §4.1; Alg. 1 line 8 without its sign)
    ½(||p̂1 - ẑ'1||² + ||p̂2 - ẑ'2||²): each online output against the mean teacher on the *same* view."""
    return 0.5 * (teacher_distance(p1, z1_mt, tangential) + teacher_distance(p2, z2_mt, tangential))


def byol_loss(p1, p2, z1_mt, z2_mt, tangential=False):
    """(RAFT, Eq. 4) ||p̂(t1 x) - ẑ'(t2 x)||², symmetrised as the mean of both directions (cross views)."""
    return 0.5 * (teacher_distance(p1, z2_mt, tangential) + teacher_distance(p2, z1_mt, tangential))


def objective(lc, p1, p2, z1_mt, z2_mt):
    """The loss to minimise (mean over the batch) for ``lc.objective``; Eq. 4, Eq. 10 (BYOL′) or Eq. 11 (RAFT)."""
    if lc.objective == "byol":
        return byol_loss(p1, p2, z1_mt, z2_mt, lc.tangential).mean()
    cross = cross_model_loss(p1, p2, z1_mt, z2_mt, lc.tangential).mean()
    return lc.alpha * alignment_loss(p1, p2).mean() + SIGN[lc.objective] * lc.beta * cross


def predictor(m):
    """q_w (RAFT §3, Tab. 2): 2-layer MLP (App. B: no BN), linear W, linear W initialised to I, or none (q_w = I)."""
    if m.predictor == "mlp":
        return mlp(m.proj_dim, m.pred_hidden, m.proj_dim, norm=m.pred_norm)
    if m.predictor == "none":
        return nn.Identity()
    w = nn.Linear(m.proj_dim, m.proj_dim, bias=False)  # q_w(·) = W(·)
    if m.predictor == "linear_identity_init":
        nn.init.eye_(w.weight)  # BYOL-LPI: starts at the collapse solution W = I (§3)
    return w


def raft_loss(model, target, x1, x2, loss_cfg):
    """One forward (Alg. 1 lines 4-8) on two views: the loss of ``loss.objective`` (Eq. 4 / 10 / 11) and, for
    the logs, the plain Eq. 2 and Eq. 6 terms, L_uniform(f) (Tab. 1; the tangential surrogate has another
    value) and the collapse signal ``proj_std`` of the online projections z of the first view."""
    (z1, z2), (p1, p2) = model([x1, x2])  # online p = q(g(f(x)))
    with torch.no_grad():
        t1, t2 = target(x1), target(x2)   # the mean teacher's z' = g_ξ(f_ξ(x))
    p1, p2, t1, t2 = p1.float(), p2.float(), t1.float(), t2.float()  # losses in fp32 (under autocast)
    loss = objective(loss_cfg, p1, p2, t1, t2)
    with torch.no_grad():
        logs = {"loss_align": alignment_loss(p1, p2).mean(), "loss_cross": cross_model_loss(p1, p2, t1, t2).mean(),
                "uniform_f": (uniformity(dist.all_gather_grad(z1.float()))
                              + uniformity(dist.all_gather_grad(z2.float()))) / 2, "proj_std": projection_std(z1)}
    return loss, logs


class EpochMeans:
    """L_align(q∘f) and L_uniform(f) averaged over the forwards of each epoch, logged at its end; Tab. 1 averages
    the last 10 epochs. Saved in the checkpoint (a run resumed mid-epoch keeps its partial sums)."""

    def __init__(self, device):
        self.sums, self.history = torch.zeros(3, dtype=torch.float64, device=device), []

    def add(self, logs):
        self.sums += torch.stack([dist.all_reduce_mean(logs["loss_align"].double()), logs["uniform_f"].double(),
                                  torch.ones((), dtype=torch.float64, device=self.sums.device)])

    def epoch_end(self, epoch):
        align_qf, uniform_f = (self.sums[:2] / self.sums[2].clamp_min(1)).tolist()
        self.history = (self.history + [[epoch, align_qf, uniform_f]])[-10:]
        self.sums.zero_()
        return {"align_qf": align_qf, "uniform_f": uniform_f}

    def last10(self):
        h = self.history
        return {"align_qf_last10": sum(x[1] for x in h) / len(h) if h else None,
                "uniform_f_last10": sum(x[2] for x in h) / len(h) if h else None, "last10_epochs": [x[0] for x in h]}

    def state_dict(self):
        return {"sums": self.sums.tolist(), "history": self.history}

    def load_state_dict(self, sd):
        self.sums = torch.tensor(sd["sums"], dtype=torch.float64, device=self.sums.device)
        self.history = [list(x) for x in sd["history"]]


# --------------------------------------------------------------------------- training
def summary_keys(cfg, tab1):
    """What summary.json adds for RAFT: the objective's settings (Tab. 3's sign of β too), the seed, Tab. 1's means."""
    lc = cfg.loss
    return {"objective": lc.objective, "predictor": cfg.model.predictor, "tangential": lc.tangential,
            "alpha": lc.alpha, "beta": lc.beta, "beta_tab3": SIGN.get(lc.objective, 0.0) * lc.beta,
            "seed": cfg.seed, **tab1.last10()}


def train(cfg):
    run = Run(cfg, METHOD)  # run folder (locked), logger, resume state, seeds, signal handling
    views = run.views(2)
    loader = run.loader(views)  # this rank's share of every global batch (uint8 images)

    # model: online f, g, q and the mean teacher (f, g): a copy, or an independent draw (model.same_init)
    online = dist.sync_bn(Online(cfg.model, predictor), cfg).to(run.device, memory_format=run.memory_format)
    mt = deepcopy(online) if cfg.model.same_init else \
        dist.sync_bn(Online(cfg.model, predictor), cfg).to(run.device, memory_format=run.memory_format)
    target = nn.Sequential(mt.f, mt.g)
    ema = EMA(target, nn.Sequential(online.f, online.g))
    peak_lr = scaled_lr(cfg.optim)  # App. B: Adam 3e-4, no scaling
    opt = build(cfg.optim, param_groups([online], cfg.optim.weight_decay, cfg.optim.exclude_bias_norm), peak_lr)
    scaler = torch.amp.GradScaler(run.device.type, enabled=cfg.precision == "fp16")
    maybe_compile(online.f, cfg)  # after the target's deepcopy (a copy would share the compiled forward)
    model = dist.ddp(online, run.device)
    tab1 = EpochMeans(run.device)
    run.resume_or_evaluate_init(online.f, online=online, target=target, optimizer=opt, scaler=scaler, views=views,
                                tab1=tab1)

    for epoch in run.epochs():
        for batch, step_due in run.batches(loader):  # step_due: the last forward of an accumulation group
            x1, x2 = views(batch)
            with dist.no_sync(model, unless=step_due):
                with run.autocast():
                    loss, logs = raft_loss(model, target, x1, x2, cfg.loss)  # Eq. 4 / 10 / 11 (Alg. 1 lines 7-8)
                scaler.scale(loss / cfg.optim.accum_steps).backward()  # Alg. 1 line 10 (the group's mean)
            tab1.add(logs)
            if step_due:  # Alg. 1 line 11: the optimizer step (App. B: a constant lr), line 12: the mean teacher
                lr = set_lr(opt, peak_lr if cfg.optim.schedule == "constant" else
                            lr_at(run.step, run.total_steps, run.warmup_steps, peak_lr))
                if cfg.optim.clip_grad > 0:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(online.parameters(), cfg.optim.clip_grad)
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                tau = ema.update(tau_at(run.step, run.total_steps, cfg.ema.tau, cfg.ema.schedule))
                run.step_done(loss, {k: logs[k] for k in ("loss_align", "loss_cross", "proj_std")}, lr=lr, tau=tau)
                if run.stop_requested():
                    run.save_and_exit()
        run.log(tab1.epoch_end(run.epoch))  # Tab. 1's L_align(q∘f) and L_uniform(f), this epoch's means
        if run.eval_due():
            run.evaluate()
        run.epoch_done()
        if run.stop_requested():
            run.save_and_exit()
    run.finish(summary_keys(cfg, tab1))


# --------------------------------------------------------------------------- several seeds (App. B: 3 seeds)
def seed_runs(cfg):
    """One config per seed of ``cfg.seeds`` (run folder <name>/seed<s>), or ``[cfg]`` when the list is empty."""
    out = []
    for s in cfg.seeds:
        c = deepcopy(cfg)
        c.seed, c.name, c.seeds = s, f"{cfg.name}/seed{s}", []
        out.append(c)
    return out or [cfg]


def summarize_seeds(cfg):
    """<out_dir>/raft/<name>/summary.json: mean and (sample) std over the seeds, as Tab. 1 and Tab. 3 report."""
    runs = [json.loads((Path(cfg.out_dir) / METHOD / cfg.name / f"seed{s}" / "summary.json").read_text())
            for s in cfg.seeds]
    agg = {"seeds": list(cfg.seeds)}
    for k, v in runs[0].items():
        vals = [r.get(k) for r in runs]
        if isinstance(v, float) and all(isinstance(x, (int, float)) for x in vals):
            agg[k] = dict(zip(("mean", "std"), log.mean_std(vals)))
    (Path(cfg.out_dir) / METHOD / cfg.name / "summary.json").write_text(json.dumps(agg, indent=2) + "\n")
    print("summary over seeds:", json.dumps(agg))


if __name__ == "__main__":
    config = parse(sys.argv[1:], DEFAULTS, CHOICES, method=METHOD)
    for one in seed_runs(config):
        dist.launch(train, one)  # (a signal's stop exits here with its code and line)
        if config.seeds and not (Path(one.out_dir) / METHOD / one.name / "summary.json").exists():
            sys.exit(0)  # this seed stopped as asked (checkpoint.stop_after_step): resume=auto continues it
    if config.seeds and os.environ.get("RANK", "0") == "0":
        summarize_seeds(config)

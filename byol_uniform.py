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
import time
from contextlib import nullcontext
from copy import deepcopy

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import checkpoint, data, dist, loaders, log
from common.augment import ViewMaker
from common.config import UserError, parse
from common.ema import EMA, tau_at
from common.evaluate import final_linear_eval, monitor, uniformity
from common.models import maybe_compile, mlp, resnet
from common.optim import build, lr_at, param_groups, scaled_lr, set_lr

METHOD = "byol_uniform"
DEFAULTS = {"loss": {"lambda_uni": 0.125,  # λ_uni of Eq. 7 (§4); 0 = plain BYOL
                     "t": 2.0}}           # t of Eq. 3


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


class Online(nn.Module):
    """f_θ (ResNet without fc), g_θ (projector MLP), q_θ (predictor MLP); one call for all views."""

    def __init__(self, m):
        super().__init__()
        self.f, dim = resnet(m.arch, m.width, m.cifar_stem, m.norm, m.zero_init_residual)
        self.g = mlp(dim, m.proj_hidden, m.proj_dim, norm="none" if m.norm == "none" else "bn")
        self.q = mlp(m.proj_dim, m.pred_hidden, m.proj_dim, norm="none" if m.norm == "none" else "bn")

    def forward(self, views):
        zs = [self.g(self.f(x)) for x in views]
        return zs, [self.q(z) for z in zs]


# --------------------------------------------------------------------------- training
def train(cfg):
    dev = dist.device(cfg)
    run = log.run_dir(cfg, METHOD)
    ckpt_file = checkpoint.resume_path(run, cfg.resume)
    state = checkpoint.load(ckpt_file) if ckpt_file else None
    logger = log.Logger(run, dist.is_main(), resume_step=state["counters"]["step"] if state else None)
    logger.config(cfg)
    dist.seed_everything(cfg.seed)  # same initial weights on every rank

    # data: SSL images (uint8 batches, augmented on the device) and un-augmented eval sets
    ssl_set = data.load(cfg.data, "ssl")
    mean, std = data.stats(cfg.data.name)
    views = ViewMaker(cfg.augment, 2, cfg.data.image_size, mean, std, dev, seed=cfg.seed + 1000 * dist.rank())
    loader, sampler = loaders.train_loader(ssl_set, cfg, views, dev)
    eval_loaders = loaders.eval_loaders(cfg)
    accum = cfg.optim.accum_steps
    steps_per_epoch = len(loader) // accum
    total_steps = cfg.optim.epochs * steps_per_epoch
    if steps_per_epoch == 0:
        raise UserError(f"optim.batch_size x optim.accum_steps = {cfg.optim.batch_size * accum} exceeds the "
                        f"{len(ssl_set)} training images: lower optim.batch_size")

    # model: online f, g, q and the EMA target (f, g); SyncBN across processes
    online = Online(cfg.model)
    if dist.world_size() > 1 and cfg.model.sync_bn:
        online = dist.convert_sync_bn(online, dev.type == "cuda")
    online = online.to(dev, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    target = deepcopy(nn.Sequential(online.f, online.g))
    ema = EMA(target, nn.Sequential(online.f, online.g))
    peak_lr = scaled_lr(cfg.optim)
    opt = build(cfg.optim, param_groups([online], cfg.optim.weight_decay, cfg.optim.exclude_bias_norm), peak_lr)
    maybe_compile(online.f, cfg)  # compile: true -> torch.compile the encoder (after the target's deepcopy)
    model = dist.ddp(online, dev)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")

    c = dict(step=0, epoch=0, batch_in_epoch=0, knn_init=None)  # counters saved with each checkpoint
    if state:  # exact resume: weights, optimizer, counters, RNG streams
        c = checkpoint.restore(state, cfg, online=online, target=target, optimizer=opt, views=views)
        logger.print(f"resumed from {ckpt_file} at step {c['step']} (epoch {c['epoch']})")
    else:  # kNN of the random-init encoder (all ranks: collective): the baseline SSL must beat
        c["knn_init"] = monitor(online.f, eval_loaders, dev, cfg.eval)[f"knn{cfg.eval.knn_k[0]}"]
        logger.log({"step": 0, "epoch": 0, f"knn{cfg.eval.knn_k[0]}_init": c["knn_init"]})
    step, epoch, batch_in_epoch = c["step"], c["epoch"], c["batch_in_epoch"]

    def save(path):
        c.update(step=step, epoch=epoch, batch_in_epoch=batch_in_epoch)
        checkpoint.save(checkpoint.snapshot(cfg, c, online=online, target=target, optimizer=opt, views=views), path)

    lam, images_seen, t_train, metrics = cfg.loss.lambda_uni, 0, 0.0, {}
    while epoch < cfg.optim.epochs:
        sampler.set_epoch(epoch)
        sampler.skip_batches = batch_in_epoch  # resume mid-epoch
        t0 = time.time()
        for batch, _ in logger.progress(loader, len(loader), f"epoch {epoch}"):
            if batch_in_epoch == steps_per_epoch * accum:
                break  # drop a last incomplete accumulation group
            # ---- one forward: two views, online and target
            x1, x2 = views(batch)
            last_micro = (batch_in_epoch + 1) % accum == 0
            with (model.no_sync() if not last_micro and dist.world_size() > 1 else nullcontext()), amp:
                (z1, z2), (p1, p2) = model([x1, x2])
                with torch.no_grad():
                    t1, t2 = target(x1), target(x2)
                p1, p2, t1, t2 = p1.float(), p2.float(), t1.float(), t2.float()  # losses in fp32 (bf16 autocast)
                l_byol = (byol_loss(p1, t2) + byol_loss(p2, t1)).mean()  # (BYOL-MHE, Eq. 5), symmetrised
                l_uni = torch.zeros((), device=dev)
                if lam != 0:  # (BYOL-MHE, Eq. 3) over the global batch, each view
                    l_uni = (uniformity_loss(dist.all_gather_grad(z1.float()), cfg.loss.t)
                             + uniformity_loss(dist.all_gather_grad(z2.float()), cfg.loss.t)) / 2
                loss = l_byol + lam * l_uni  # (BYOL-MHE, Eq. 7)
                (loss / accum).backward()
            batch_in_epoch += 1
            images_seen += x1.shape[0] * dist.world_size()
            if not last_micro:
                continue
            # ---- optimizer step (every accum forwards), then the EMA target update
            lr = lr_at(step, total_steps, cfg.optim.warmup_epochs * steps_per_epoch, peak_lr)
            set_lr(opt, lr)
            if cfg.optim.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(online.parameters(), cfg.optim.clip_grad)
            opt.step()
            opt.zero_grad(set_to_none=True)
            tau = tau_at(step, total_steps, cfg.ema.tau, cfg.ema.schedule)
            ema.update(tau)
            step += 1
            # ---- logging, NaN guard, step checkpoints
            if step % cfg.log.every == 0 or step == total_steps:
                losses = dist.all_reduce_mean(torch.stack([loss, l_byol, l_uni]).float()).tolist()
                if any(v != v or abs(v) == float("inf") for v in losses):
                    raise UserError(f"loss is {losses[0]} at step {step}: training diverged. The last good "
                                    f"checkpoint in {run / 'checkpoints'} is kept; lower optim.lr and resume=auto")
                logger.log({"step": step, "epoch": epoch, "loss": losses[0], "loss_byol": losses[1],
                            "loss_uni": losses[2], "lr": lr, "tau": tau})
            if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and dist.is_main():
                save(run / "checkpoints" / "last.pt")
            if step == cfg.checkpoint.stop_after_step:
                if dist.is_main():
                    save(run / "checkpoints" / "last.pt")
                logger.print(f"stopped after step {step} as asked (checkpoint.stop_after_step)")
                return None
        t_train += time.time() - t0
        epoch, batch_in_epoch = epoch + 1, 0

        # ---- end of epoch: kNN monitor, alignment/uniformity, checkpoint
        if epoch == cfg.optim.epochs or (cfg.eval.every and epoch % cfg.eval.every == 0):
            metrics = monitor(online.f, eval_loaders, dev, cfg.eval, views=(x1, x2))
            logger.log({"step": step, "epoch": epoch, **metrics})
            logger.print(f"epoch {epoch} step {step} loss {loss.item():.4f} " +
                         " ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        if dist.is_main() and (epoch % cfg.checkpoint.every == 0 or epoch == cfg.optim.epochs):
            if not torch.isfinite(loss):
                raise UserError(f"loss is {loss.item()} at step {step}: training diverged. The last good checkpoint "
                                f"in {run / 'checkpoints'} is kept; lower optim.lr and resume=auto")
            save(run / "checkpoints" / "last.pt")
            if cfg.checkpoint.keep_every and epoch % cfg.checkpoint.keep_every == 0:
                save(run / "checkpoints" / f"epoch_{epoch:04d}.pt")
        dist.barrier()

    # ---- final evaluation: kNN, linear probe (offline, frozen encoder), summary.json
    final = metrics or monitor(online.f, eval_loaders, dev, cfg.eval)  # the last epoch's, if it ran here
    linear = final_linear_eval(online.f, eval_loaders, dev, cfg)
    logger.summary({"method": METHOD, "knn_k": cfg.eval.knn_k[0], "knn_t": cfg.eval.knn_t,
                    "knn_init": c["knn_init"], **final, **linear,
                    "images_per_s": round(images_seen / max(t_train, 1e-9), 1), "steps": step})
    dist.barrier()
    return None


if __name__ == "__main__":
    dist.launch(train, parse(sys.argv[1:], DEFAULTS, method=METHOD))

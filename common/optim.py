"""Optimisers, parameter groups and the per-step learning-rate schedule.

- ``LARS`` (You et al. 2017, as used by BYOL/SimCLR): for each parameter
  ``g <- g + wd*w``; ``g <- eta*||w||/||g|| * g`` (trust ratio, 1 when a norm is 0);
  ``v <- m*v + g``; ``w <- w - lr*v``. Parameter groups with ``lars_exclude=True``
  (biases and normalisation parameters: every 1-D parameter) skip both the
  weight decay and the adaptation, i.e. they get plain momentum SGD.
- ``build(cfg.optim, groups, lr)``: LARS / SGD / Adam / AdamW over the groups of
  ``param_groups``, at the peak lr of ``scaled_lr(cfg.optim)``: ``base * batch_size *
  accum_steps / 256`` (Goyal et al.; the global batch of one optimizer step) unless
  ``lr_scaling: none``. A paper that scales by more (MSBReg: x K views) passes ``lr_factor``.
- ``lr_at(step, ...)``: linear warm-up then cosine decay to 0, per step.
  ``set_lr`` applies it, honouring a group's ``lr_mult`` (e.g. SimSiam's predictor).
"""
import math

import torch


class LARS(torch.optim.Optimizer):
    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                                      lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        """One step for all parameters of a group at once (``torch._foreach_*``: a few fused kernels per
        group, not a Python loop of small ops per parameter)."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            ws = [w for w in group["params"] if w.grad is not None]
            if not ws:
                continue
            gs = [w.grad for w in ws]
            if not group["lars_exclude"]:
                gs = torch._foreach_add(gs, ws, alpha=group["weight_decay"])  # g + wd*w
                w_norm, g_norm = torch.stack(torch._foreach_norm(ws)), torch.stack(torch._foreach_norm(gs))
                trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm, 1.0)
                torch._foreach_mul_(gs, list(trust.unbind()))  # eta*||w||/||g|| * g
            # v = m*v + g; v starts at 0, so the first step gives v = g exactly
            bufs = [self.state[w].setdefault("momentum_buffer", torch.zeros_like(w)) for w in ws]
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, gs)
            torch._foreach_add_(ws, bufs, alpha=-group["lr"])  # w = w - lr*v
        return loss


def param_groups(modules, weight_decay, exclude_bias_norm=True, lr_mult=1.0):
    """Two groups: weights (decayed, adapted) and biases/norm parameters (1-D: excluded)."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    if not exclude_bias_norm:
        return [dict(params=params, weight_decay=weight_decay, lr_mult=lr_mult)]
    return [dict(params=[p for p in params if p.ndim > 1], weight_decay=weight_decay, lr_mult=lr_mult),
            dict(params=[p for p in params if p.ndim <= 1], weight_decay=0.0, lars_exclude=True, lr_mult=lr_mult)]


def scaled_lr(opt_cfg, lr_factor=1.0):
    """Peak learning rate: base x (global batch of one optimizer step) / 256 x lr_factor."""
    if opt_cfg.lr_scaling == "none":
        return opt_cfg.lr * lr_factor
    return opt_cfg.lr * opt_cfg.batch_size * opt_cfg.accum_steps / 256 * lr_factor


def build(opt_cfg, groups, lr):
    """The optimizer named by ``opt_cfg.name`` over ``groups`` (from ``param_groups``)."""
    groups = [g for g in groups if g["params"]]
    if opt_cfg.name == "lars":
        return LARS(groups, lr=lr, momentum=opt_cfg.momentum, weight_decay=opt_cfg.weight_decay, eta=opt_cfg.eta)
    for g in groups:
        g.pop("lars_exclude", None)
    if opt_cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=opt_cfg.momentum)
    cls = torch.optim.Adam if opt_cfg.name == "adam" else torch.optim.AdamW
    return cls(groups, lr=lr, betas=tuple(opt_cfg.betas))


def lr_at(step, total_steps, warmup_steps, peak_lr, final_lr=0.0):
    """Linear warm-up from 0 to ``peak_lr`` over ``warmup_steps``, then cosine to ``final_lr`` at ``total_steps``."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_lr + (peak_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr):
    """Set every group's lr to ``lr`` (times the group's ``lr_mult``); returns ``lr``."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
    return lr

"""Mean-teacher (target network) update, BYOL-MHE §3.5 / Grill et al.

``xi <- tau*xi + (1-tau)*theta`` over all parameters, as one fused
``torch._foreach_lerp_`` call (no Python loop per tensor per step).

Precision: the target holds fp32 weights (a copy of the fp32 online network;
``precision: bf16`` is autocast, which casts per op and never the stored
weights), so the average runs in fp32: in bf16, updates of size (1-tau) = 1e-3
relative to the weight would mostly round away.

Buffers are copied, not averaged: the integer ``num_batches_tracked`` (a lerp
needs floating point) and the BatchNorm running statistics. Policy for those:
the target runs BN in training mode (batch statistics, as BYOL), so its running
statistics only matter for evaluating the target, and copying the online ones
keeps them consistent with the weights they are averaged from.

``tau_at``: ``1 - (1 - tau_base) * (cos(pi*k/K) + 1) / 2`` (cosine, rises from
tau_base to 1) or ``tau_base`` (constant, e.g. RAFT App. B).
"""
import math

import torch


def tau_at(step, total_steps, tau_base, schedule="cosine"):
    if schedule == "constant":
        return tau_base
    return 1.0 - (1.0 - tau_base) * (math.cos(math.pi * step / total_steps) + 1.0) / 2.0


class EMA:
    """Keeps ``target`` an exponential moving average of ``online`` (same architecture)."""

    def __init__(self, target, online):
        self.t_params, self.o_params = list(target.parameters()), list(online.parameters())
        self.t_bufs, self.o_bufs = list(target.buffers()), list(online.buffers())
        shapes = lambda ts: [t.shape for t in ts]  # noqa: E731
        if shapes(self.t_params) != shapes(self.o_params) or shapes(self.t_bufs) != shapes(self.o_bufs):
            raise ValueError("EMA: target and online networks differ in structure")
        for p in self.t_params:
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, tau):
        """ξ <- τξ + (1-τ)θ (one fused lerp over all parameters); buffers (BN statistics) are copied. Returns τ."""
        torch._foreach_lerp_(self.t_params, self.o_params, 1.0 - tau)
        if self.t_bufs:
            torch._foreach_copy_(self.t_bufs, self.o_bufs)
        return tau

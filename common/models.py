"""Encoders and heads.

``resnet(arch, width, cifar_stem, norm)`` builds torchvision's ResNet-18/34/50
with ``fc`` removed. At ``width=64`` the parameters are exactly torchvision's
(so its weights load); a smaller width rebuilds the stages with torchvision's
own ``_make_layer`` for CPU-sized runs. ``cifar_stem`` swaps the 7x7/2 conv and
max-pool for a 3x3/1 conv (SimCLR's CIFAR variant). ``norm`` selects the
normalisation of every conv block: ``bn`` (BatchNorm), ``gn`` (GroupNorm, 32
groups or fewer), ``ln`` (GroupNorm with one group = LayerNorm over C,H,W) or
``none`` (the no-BN ablations, BYOL-MHE Tab. 3; MSBReg Tab. 13).

``mlp(in, hidden, out, layers, norm, last_norm)`` is the projector/predictor:
Linear-Norm-ReLU blocks then a Linear (BYOL: Linear-BN-ReLU-Linear).

``Online(m, predictor)`` is BYOL's online network f, g, q (byol_uniform, byol_mhe; raft with its own q).

``maybe_compile(module, cfg)`` applies ``torch.compile`` when the config says ``compile: true``.
"""
from functools import partial

import torch
import torch.nn as nn
import torchvision

ARCHS = {"resnet18": (torchvision.models.resnet.BasicBlock, [2, 2, 2, 2]),
         "resnet34": (torchvision.models.resnet.BasicBlock, [3, 4, 6, 3]),
         "resnet50": (torchvision.models.resnet.Bottleneck, [3, 4, 6, 3])}


def norm2d(kind):
    """Constructor ``f(channels) -> nn.Module`` for a 2-D normalisation layer."""
    if kind == "bn":
        return nn.BatchNorm2d
    if kind == "gn":
        return lambda c: nn.GroupNorm(min(32, c), c)
    if kind == "ln":
        return lambda c: nn.GroupNorm(1, c)
    if kind == "none":
        return lambda c: nn.Identity()
    raise ValueError(f"unknown norm {kind!r}: use bn, gn, ln or none")


def norm1d(kind, dim):
    return {"bn": partial(nn.BatchNorm1d, dim), "gn": partial(nn.GroupNorm, min(32, dim), dim),
            "ln": partial(nn.LayerNorm, dim), "none": nn.Identity}[kind]()


def resnet(arch="resnet18", width=64, cifar_stem=False, norm="bn", zero_init_residual=False):
    """torchvision ResNet without ``fc``. Returns ``(encoder, feature_dim)``."""
    block, layers = ARCHS[arch]
    net = getattr(torchvision.models, arch)(weights=None, norm_layer=norm2d(norm))
    if width != 64:  # rebuild the stem and stages at the new width with torchvision's own builder
        net.inplanes = width
        net.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        net.bn1 = net._norm_layer(width)
        for i, n in enumerate(layers):
            setattr(net, f"layer{i + 1}", net._make_layer(block, width * 2 ** i, n, stride=1 if i == 0 else 2))
        _init(net)
    if zero_init_residual:
        _zero_init_residual(net)
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    feat_dim = net.fc.in_features if width == 64 else width * 8 * block.expansion
    net.fc = nn.Identity()
    return net, feat_dim


def _init(net):
    """torchvision's ResNet initialisation, re-applied after rebuilding at another width."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _zero_init_residual(net):
    """Zero the last norm's scale of each residual block (Goyal et al.), when that norm has one."""
    for m in net.modules():
        last = getattr(m, "bn3", None) if hasattr(m, "conv3") else getattr(m, "bn2", None)
        if isinstance(getattr(last, "weight", None), nn.Parameter):
            nn.init.zeros_(last.weight)


def mlp(in_dim, hidden, out, layers=2, norm="bn", last_norm=False):
    """``layers``-layer MLP: (Linear-Norm-ReLU) x (layers-1), Linear, optional Norm (without affine for BN)."""
    mods, d = [], in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(d, hidden), norm1d(norm, hidden), nn.ReLU(inplace=True)]
        d = hidden
    mods.append(nn.Linear(d, out))
    if last_norm:
        mods.append(nn.BatchNorm1d(out, affine=False) if norm == "bn" else norm1d(norm, out))
    return nn.Sequential(*mods)


class Online(nn.Module):
    """BYOL's online network (Grill et al. §3.1): encoder f (``resnet`` of ``m``), projector g (Linear-BN-ReLU-
    Linear, ``m.proj_hidden`` -> ``m.proj_dim``) and predictor q (the same shape, or ``predictor(m)``, built
    after f and g so that f and g draw the same initial weights whatever q is).
    ``forward(views)`` -> ``([z per view], [q(z) per view])``, each view its own forward (per-view BN statistics).
    ``m.norm: none`` (no-BN ablations) takes BN out of the heads too."""

    def __init__(self, m, predictor=None):
        super().__init__()
        norm = "none" if m.norm == "none" else "bn"
        self.f, dim = resnet(m.arch, m.width, m.cifar_stem, m.norm, m.zero_init_residual)
        self.g = mlp(dim, m.proj_hidden, m.proj_dim, norm=norm)
        self.q = predictor(m) if predictor else mlp(m.proj_dim, m.pred_hidden, m.proj_dim, norm=norm)

    def forward(self, views):
        zs = [self.g(self.f(x)) for x in views]
        return zs, [self.q(z) for z in zs]


def maybe_compile(module, cfg):
    """``compile: true``: ``torch.compile`` ``module``'s forward in place (``nn.Module.compile``), so its
    parameters, ``state_dict`` keys, EMA and checkpoints stay those of the eager module; ``compile: false``
    (default): nothing. Synchronised BatchNorm layers stay outside the compiled graphs (each runs eagerly,
    a graph break): their collectives are not for the compiler to trace or reorder.

    Call it after any ``deepcopy`` of ``module`` (the target network): a copy would share the compiled
    forward of the original. Returns ``module``.
    """
    if not cfg.compile:
        return module
    from common.dist import GlooSyncBatchNorm

    sync = [m for m in module.modules() if isinstance(m, (nn.SyncBatchNorm, GlooSyncBatchNorm))]
    for m in sync:
        m.forward = torch.compiler.disable(m.forward)
    if sync:  # graph breaks: each residual block's forward compiles once per block shape, mode and batch shape
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    module.compile()
    return module

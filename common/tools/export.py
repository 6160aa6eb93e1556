"""Export a run's online encoder as a torchvision ResNet ``state_dict``.

    python -m common.tools.export runs/byol_uniform/cifar10/checkpoints/last.pt --out backbone.pt
    python -m common.tools.export runs/byol_uniform/cifar10 --out backbone.pt --projector projector.pt

The argument is a checkpoint or a run folder (its ``checkpoints/last.pt``). ``backbone.pt`` is a plain
``{name: tensor}`` dict (``torch.load(path, weights_only=True)``) of the online encoder f. The encoder is
torchvision's ResNet with ``fc`` removed (``common.models.resnet``), so the names are torchvision's; the
command prints the lines that load it, e.g. for ResNet-18 with the CIFAR stem::

    net = torchvision.models.resnet18()
    net.conv1, net.maxpool, net.fc = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity(), nn.Identity()
    net.load_state_dict(torch.load("backbone.pt", weights_only=True))

(without the CIFAR stem only ``net.fc = nn.Identity()``). ``net(x)`` then gives the encoder's features
(512 for ResNet-18/34, 2048 for ResNet-50); BatchNorm statistics are the online network's running ones.
Runs that are not a stock torchvision ResNet load as printed:

- ``model.width`` other than 64: the same names with narrower tensors, built by
  ``common.models.resnet(arch, width, cifar_stem, norm)`` (torchvision's own block builder);
- ``model.norm`` gn / ln / none: torchvision's ResNet with ``norm_layer=`` GroupNorm(min(32, C), C) /
  GroupNorm(1, C) / Identity (``none``: the file holds no normalisation tensors).

Before writing, the exported tensors are loaded (``strict=True``) into the model the printed lines build.
``--projector PATH`` also writes the online projector g, a ``common.models.mlp`` (``nn.Sequential`` names
``0.weight``, ...), with the line that builds it. The EMA target, the predictor and the optimizer are not
exported. A missing, corrupt (its digest checked) or foreign checkpoint is one line ``error: ...`` and exit status 2, as
is an ``--out`` or ``--projector`` that is the input or any other checkpoint of this project (it would be replaced), or
both at one path (by resolved path).
"""
import argparse
from pathlib import Path

import torch.nn as nn
import torchvision

from common import checkpoint
from common.config import BASE, UserError
from common.models import mlp, norm2d, resnet
from common.tools import find_checkpoint, load_encoder, online_part, or_exit

_NORM_LAYER = {"gn": "lambda c: nn.GroupNorm(min(32, c), c)", "ln": "lambda c: nn.GroupNorm(1, c)",
               "none": "lambda c: nn.Identity()"}


def _model_cfg(state):
    return {**BASE["model"], **(state.get("config", {}).get("model") or {})}


def torchvision_resnet(arch, cifar_stem, norm="bn"):
    """torchvision's ResNet as the printed lines build it: stock, ``norm_layer`` if not BN, CIFAR stem, no fc."""
    net = getattr(torchvision.models, arch)(**({} if norm == "bn" else {"norm_layer": norm2d(norm)}))
    if cifar_stem:
        net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    net.fc = nn.Identity()
    return net


def loading_lines(m, out):
    """The Python lines that build the encoder of model config ``m`` and load ``out`` into it."""
    load = f"net.load_state_dict(torch.load({str(out)!r}, weights_only=True))"
    if m["width"] != 64:
        return [f"from common.models import resnet  # model.width={m['width']}: not a stock torchvision ResNet",
                f"net, dim = resnet({m['arch']!r}, width={m['width']}, cifar_stem={m['cifar_stem']}, "
                f"norm={m['norm']!r})", load]
    norm = "" if m["norm"] == "bn" else f"norm_layer={_NORM_LAYER[m['norm']]}"
    lines = [f"net = torchvision.models.{m['arch']}({norm})"]
    if m["cifar_stem"]:
        lines.append("net.conv1, net.maxpool, net.fc = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity(), "
                     "nn.Identity()")
    else:
        lines.append("net.fc = nn.Identity()")
    return lines + [load]


def _projector(m, feat_dim):
    """(the mlp the scripts build as g, its call as text) from the run's model config."""
    norm = m.get("head_norm") or ("none" if m["norm"] == "none" else "bn")
    layers, last = m.get("proj_layers", 2), bool(m.get("proj_last_bn", False)) and norm == "bn"
    call = (f"mlp({feat_dim}, {m['proj_hidden']}, {m['proj_dim']}, layers={layers}, norm={norm!r}"
            f"{', last_norm=True' if last else ''})")
    return mlp(feat_dim, m["proj_hidden"], m["proj_dim"], layers, norm, last), call


def _refuse_overwriting_a_checkpoint(ckpt, dest, option):
    """``dest`` (of ``option``) may not be the input checkpoint itself nor any existing checkpoint of this project:
    exporting over it would replace a training run's saved state with a bare state_dict."""
    dest = Path(dest)
    if dest.resolve() == ckpt.resolve():
        raise UserError(f"{option} {dest} is the checkpoint being exported: writing there would replace it; "
                        f"choose another {option}, e.g. backbone.pt")
    if dest.is_file():
        try:
            state = checkpoint.read(dest, mmap=True, verify=False)  # a checkpoint of this project, intact or not
        except UserError:
            return  # not a checkpoint: replaced as asked
        if not (isinstance(state, dict) and {"counters", "rng", "config"} <= state.keys()):
            return  # an earlier export, ...: replaced as asked
        raise UserError(f"{option} {dest.resolve()} is a training checkpoint of this project: writing there would "
                        f"replace it; choose another {option}, e.g. backbone.pt")


def export(ckpt, out, projector=None):
    """Write the online encoder of checkpoint (or run folder) ``ckpt`` to ``out`` (and g to ``projector``);
    returns the lines to print."""
    ckpt = find_checkpoint(ckpt)
    _refuse_overwriting_a_checkpoint(ckpt, out, "--out")
    if projector:
        _refuse_overwriting_a_checkpoint(ckpt, projector, "--projector")
        if Path(projector).resolve() == Path(out).resolve():
            raise UserError(f"--out and --projector are the same file {Path(out).resolve()}: the projector would "
                            "replace the encoder; choose another --projector, e.g. projector.pt")
    # mmap: the optimizer state of a large run is hashed (digest) as it is read, not held in memory
    state = checkpoint.read(ckpt, "pass a checkpoint written by one of the six scripts, or its run folder", mmap=True)
    if not isinstance(state, dict):
        raise UserError(f"{ckpt.resolve()} is not a checkpoint of this project (no 'online' network)")
    m = _model_cfg(state)
    if m["arch"] not in ("resnet18", "resnet34", "resnet50"):
        raise UserError(f"{ckpt}: model.arch={m['arch']} is not a ResNet of this project")
    feat_dim = resnet(m["arch"], m["width"], m["cifar_stem"], m["norm"])[1]
    # what the printed lines build: torchvision's own ResNet at width 64
    load_encoder(state, m, ckpt,
                 torchvision_resnet(m["arch"], m["cifar_stem"], m["norm"]) if m["width"] == 64 else None)
    f = online_part(state, "f.", ckpt)
    lines = [f"wrote the online encoder ({m['arch']}, width {m['width']}, "
             f"{'CIFAR stem' if m['cifar_stem'] else 'ImageNet stem'}, norm {m['norm']}; {feat_dim}-d features) "
             f"of {ckpt} to {out}; load it with:", *("    " + x for x in loading_lines(m, out))]
    files = [(f, out)]
    if projector:
        g, call = _projector(m, feat_dim)
        g_state = online_part(state, "g.", ckpt)
        try:
            g.load_state_dict(g_state)
            how = f"from common.models import mlp; g = {call}"
        except RuntimeError:  # a projector of another shape: the script's own build
            how = "build g as the run's script does (its online network's g: Online, MultiViewOnline, build_model)"
        files.append((g_state, projector))
        lines.append(f"wrote the online projector g to {projector}: {how}; g.load_state_dict(torch.load(...))")
    for (tensors, path), option in zip(files, ("--out", "--projector")):
        try:
            checkpoint.save(tensors, path, hint=f"choose another {option}", with_digest=False)  # atomic; plain weights
        except OSError as e:
            raise UserError(f"cannot write {Path(path).resolve()} ({e.strerror or e}): choose another --out") from e
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m common.tools.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint (.pt) or a run folder")
    ap.add_argument("--out", required=True, help="the torchvision state_dict to write, e.g. backbone.pt")
    ap.add_argument("--projector", metavar="PATH", help="also write the online projector g there")
    args = ap.parse_args(argv)
    print("\n".join(or_exit(export, args.checkpoint, args.out, args.projector)))


if __name__ == "__main__":
    main()

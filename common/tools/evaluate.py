"""``python -m common.tools.evaluate RUN_DIR_or_CHECKPOINT [--set key=value ...]``: k-NN and linear probe of a saved
encoder, on one process, on ``dist.nproc`` local processes or under ``torchrun``: the command (the functions it
calls are ``common.evaluate``'s; a training run's own evaluation at an epoch's end is ``common.run.Run.evaluate``).

    python -m common.tools.evaluate runs/byol_uniform/cifar10_resnet18_300ep                  # its checkpoints/last.pt
    python -m common.tools.evaluate runs/.../checkpoints/epoch_0100.pt --set eval.linear=paper eval.linear_epochs=80
    torchrun --nproc_per_node=8 -m common.tools.evaluate RUN_DIR --set eval.knn_k=[20,200] data.root=/datasets

The checkpoint's own resolved config is the default (today's defaults under it for keys added since), and
``--set`` overrides it strictly: an unknown key or a wrong type is one ``error:`` line and exit status 2, as is
a missing or corrupt checkpoint. The online encoder ``f`` is rebuilt from ``model.*`` and loaded from the
checkpoint's ``online`` weights under ``f.`` (every script names its encoder ``f``); the eval loaders, the
weighted kNN monitor and the final linear probe are those of a training run (``common.evaluate``: features
sharded over all ranks and gathered, kNN scoring split, paper probe in DDP). With the run's own settings the
numbers are those of its ``summary.json``: the kNN and the fast probe exactly on CPU (same batches, same
features, same seed); the paper probe too with the run's number of processes (otherwise see
``common.evaluate``'s tolerance).

Writes ``<checkpoint>.eval.json`` beside the checkpoint (``last.eval.json``, ``epoch_0100.eval.json``: each
checkpoint of a ``checkpoint.keep_every`` series keeps its own; atomically, an earlier one of the same
checkpoint is replaced) with the numbers and the settings used, and prints one line.
"""
import argparse
import json
import os
import sys
import time
from functools import partial

import torch

from common import checkpoint, dist, loaders
from common.config import BASE, CHOICES, UserError, merge, parse_overrides, resolve
from common.evaluate import final_linear_eval, monitor
from common.models import maybe_compile
from common.tools import find_checkpoint, load_encoder


def settings(state, overrides):
    """The checkpoint's config with the ``--set`` overrides, checked against it."""
    return resolve(merge(BASE, state["config"]), [(parse_overrides(overrides), "from --set")], CHOICES)


def encoder(state, cfg, device, path):
    """The online encoder ``f`` of the checkpoint, in the run's memory format (and compiled if it was)."""
    f = load_encoder(state, cfg.model, path)
    f = f.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    return maybe_compile(f, cfg)


def run(path, overrides, cfg):
    """Every rank: load, evaluate (collective); rank 0 writes ``<checkpoint>.eval.json`` and prints the line."""
    t0 = time.time()
    state = checkpoint.load(path)
    dev = dist.device(cfg)
    dist.seed_everything(cfg.seed)
    f = encoder(state, cfg, dev, path)
    eval_loaders = loaders.eval_loaders(cfg)
    out = {**monitor(f, eval_loaders, dev, cfg.eval), **final_linear_eval(f, eval_loaders, dev, cfg)}
    if dist.is_main():
        e, counters = cfg.eval, state["counters"]
        record = {"checkpoint": str(path.resolve()), "step": counters.get("step"), "epoch": counters.get("epoch"),
                  "knn_k": e.knn_k[0], "knn_t": e.knn_t, "linear": e.linear, "data": cfg.data.name,
                  "processes": dist.world_size(), "overrides": list(overrides), **out,
                  "eval": e.plain(), "wall_time_s": round(time.time() - t0, 2)}
        dest = path.with_name(f"{path.stem}.eval.json")
        tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, dest)
        knn = " ".join(f"knn{k} {out[f'knn{k}']:.2f}" for k in e.knn_k)
        linear = (f"linear {out['linear_protocol']} top1 {out['linear_top1']:.2f} top5 {out['linear_top5']:.2f}"
                  if "linear_top1" in out else "linear none")
        print(f"{path} step {record['step']} epoch {record['epoch']}: {knn} (weighted, T={e.knn_t}), {linear}"
              f" -> {dest}", flush=True)
    dist.barrier()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m common.tools.evaluate",
                                 description="kNN and linear probe of a saved encoder (see common/tools/evaluate.py)")
    ap.add_argument("path", help="run folder (its checkpoints/last.pt) or checkpoint .pt file")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", action="extend",
                    help="overrides of the checkpoint's config, e.g. --set eval.linear=paper dist.nproc=2")
    args = ap.parse_args(argv)
    try:
        path = find_checkpoint(args.path)
        cfg = settings(checkpoint.load(path, hint="pass a checkpoint written by one of the six scripts, or its "
                                                  "run folder"), args.set)
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank gets here: one line in all
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    dist.launch(partial(run, path, args.set), cfg)


if __name__ == "__main__":
    main()

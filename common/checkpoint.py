"""Checkpoints: atomic writes, strict reads, exact resume.

``save`` writes to a temporary file in the same folder, fsyncs it and renames it
over the target, so a kill at any moment leaves either the old or the new
checkpoint, never a torn one. ``load`` turns any unreadable file into one clear
``UserError`` and never modifies the file. A checkpoint holds everything a run
needs to continue bit-exactly: models, target, optimizer, grad scaler, step,
epoch and the RNG states (``rng_state``) plus the augmentation generator.
"""
import os
import random
from pathlib import Path

import torch

from common.config import UserError


def save(state, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path):
    """Read a checkpoint written by ``save(snapshot(...))``; anything else is one clear ``UserError``."""
    hint = "it was left untouched: move it away to start over, or set resume=path/to/another.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling/zip/IO problem
        raise UserError(f"checkpoint {Path(path).resolve()} is corrupt or unreadable ({type(e).__name__}); "
                        + hint) from None
    if not (isinstance(state, dict) and {"counters", "rng", "config"} <= state.keys()):
        raise UserError(f"{Path(path).resolve()} is not a checkpoint of this project; " + hint)
    return state


def resume_path(run_dir, resume):
    """The checkpoint to resume from (or None). Refuses to overwrite a run's saved work silently."""
    last = Path(run_dir) / "checkpoints" / "last.pt"
    if resume == "none":
        if last.exists():
            raise UserError(f"run folder {Path(run_dir).resolve()} already holds a checkpoint: set resume=auto to "
                            "continue it, or name=... for a new run")
        return None
    if resume == "auto":
        return last if last.exists() else None
    if not Path(resume).is_file():
        raise UserError(f"resume={resume}: no such checkpoint file (use resume=auto or a path to a .pt file)")
    return Path(resume)


MUST_MATCH = ("model", "optim.name", "optim.batch_size", "optim.accum_steps", "data.name", "data.image_size")


def _get(cfg, dotted):
    for k in dotted.split("."):
        cfg = cfg.get(k) if isinstance(cfg, dict) else None
    return cfg


def snapshot(cfg, counters, **objects):
    """Everything a run needs to continue: each object's ``state_dict()``, the counters
    (step, epoch, ...), the RNG states and the resolved config."""
    return {**{k: o.state_dict() for k, o in objects.items()}, "counters": dict(counters),
            "rng": rng_state(), "config": cfg.plain()}


def restore(state, cfg, **objects):
    """Load a ``snapshot`` into ``objects`` and the RNGs; returns the counters.

    A checkpoint written with another model/optimizer/batch set-up is one clear ``UserError``.
    """
    for key in MUST_MATCH:
        old, new = _get(state.get("config", {}), key), _get(cfg, key)
        if old != new:
            raise UserError(f"the checkpoint was written with {key}={old}, this run has {key}={new}: resume with "
                            "the run's own config.yaml, or start a new run with name=...")
    for name, obj in objects.items():
        try:
            obj.load_state_dict(state[name])
        except (KeyError, RuntimeError, ValueError) as e:
            raise UserError(f"the checkpoint's {name!r} does not fit this run ({str(e).splitlines()[0][:200]}): "
                            "resume with the run's own config.yaml") from None
    set_rng_state(state["rng"])
    return state["counters"]


def rng_state():
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

"""Checkpoints: atomic writes, strict reads, exact resume.

``save`` writes to a temporary file in the same folder, fsyncs it and renames it
over the target, so a kill at any moment leaves either the old or the new
checkpoint, never a torn one; it stores the sha256 of the tensors' bytes
(``digest``) in the file. ``read`` (every load: ``load`` for a resume, the tools'
reads) turns any unreadable file into one clear ``UserError``, checks the digest
(a flipped bit in a tensor, which unpickles fine, is one line too) and never
modifies the file. A checkpoint holds everything a run needs to continue
bit-exactly: models, target, optimizer, grad scaler, step, epoch and the RNG
states (``rng_state``) plus the augmentation generator.
"""
import errno
import hashlib
import os
import random
from pathlib import Path

import torch

from common.config import UserError


def _os_error(e):
    """The ``OSError`` behind a failed write: ``e`` itself, or the one a ``RuntimeError`` of torch.save's zip
    writer (``unexpected pos ...``) was raised while handling (disk full surfaces that way)."""
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    return e


def _write_problem(e):
    """(the cause in words, the fix) of a write's ``OSError``: no space vs no permission / read-only."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{e.strerror}: the disk is full", "free some space or set out_dir=... on another disk"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{e.strerror}: the folder is not writable", "make it writable or set out_dir=... to a writable folder"
    return e.strerror or str(e), "set out_dir=... to a writable folder"


DIGEST = "digest"  # the key of a saved dict that holds its tensors' sha256 (hex); ``read`` removes it


def digest(state):
    """sha256 (hex) of every tensor in ``state`` (nested dicts, lists, tuples: models, optimizer state, scaler,
    RNG states, ...), in a fixed order: dict keys sorted, each tensor's key path, dtype and shape, then its bytes.
    Other values (numbers, strings) are not part of it."""
    h = hashlib.sha256()

    def walk(x, where):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            h.update(f"{where}\0{t.dtype}\0{tuple(x.shape)}\0".encode())
            h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
        elif isinstance(x, dict):
            for k in sorted(x, key=lambda k: (type(k).__name__, str(k))):
                walk(x[k], f"{where}/{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{where}/{i}")
    walk(state, "")
    return h.hexdigest()


def save(state, path, hint=None, with_digest=True):
    """Write ``state`` to ``path`` atomically; a failed write (disk full, ...) leaves no temporary file and
    the previous checkpoint intact, and is one ``UserError`` naming the file and the cause (``hint``: the
    caller's fix, e.g. its own option, instead of the training run's). A dict ``state`` gets its ``digest``
    under ``DIGEST`` (``with_digest=False``: the file holds ``state`` as it is, e.g. an export's plain weights)."""
    path = Path(path)
    if with_digest and isinstance(state, dict):
        state = {**state, DIGEST: digest(state)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a read-only folder: unlink fails too (EROFS), and there is nothing to remove
            pass
        if _os_error(e) is not None:
            cause, fix = _write_problem(_os_error(e))
            raise UserError(f"could not write {'the checkpoint ' if hint is None else ''}{path.resolve()} ({cause}); "
                            f"{'the previous one is intact' if path.exists() else 'nothing was written'}: "
                            f"{hint or fix}") from None
        raise
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


_NOTED = set()  # the files without a digest noted in this process


def read(path, hint=None, mmap=False, verify=True):
    """The state ``save`` wrote to ``path`` (on the CPU; ``mmap``: tensors mapped from the file, not read in),
    its digest checked and removed. Every load of a saved state goes through here. An unreadable file is one
    ``UserError`` (``hint``: what to do instead; by default a training run's), as is a digest that differs from
    the tensors' (``verify=False``: not checked). A checkpoint written before checkpoints carried a digest loads,
    with a one-line note. The file is never modified."""
    path = Path(path)
    hint = hint or "it was left untouched: move it away to start over, or set resume=path/to/another.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # any unpickling/zip/IO problem
        raise UserError(f"checkpoint {path.resolve()} is corrupt or unreadable ({type(e).__name__}); {hint}") from None
    if not isinstance(state, dict):
        return state
    stored = state.pop(DIGEST, None)
    if stored is None:
        if verify and "counters" in state and path.resolve() not in _NOTED and os.environ.get("RANK", "0") == "0":
            _NOTED.add(path.resolve())
            print(f"note: {path} has no digest (written before checkpoints carried one): loaded without checking "
                  "its tensors", flush=True)
    elif verify and stored != digest(state):
        raise UserError(f"{path.resolve()}: checkpoint corrupt: the tensors' sha256 differs from the one stored at "
                        "save (a flipped bit on disk or in transfer); use another checkpoint (checkpoints/) or re-run")
    return state


def load(path, hint=None):
    """Read (``read``) a checkpoint written by ``save(snapshot(...))``; anything else is one clear ``UserError``
    (``hint``: what to do instead; by default a training run's)."""
    hint = "it was left untouched: " + (hint or "move it away to start over, or set resume=path/to/another.pt")
    state = read(path, hint)
    if not (isinstance(state, dict) and {"counters", "rng", "config"} <= state.keys()):
        raise UserError(f"{Path(path).resolve()} is not a checkpoint of this project; " + hint)
    return state


def pid_alive(pid):
    """Is process ``pid`` alive on this host?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder):
    """Delete the temporaries ``.<name>.tmp<pid>`` of ``save`` (or another atomic write) left in ``folder`` by a
    process killed mid-write (kill -9): those of pids not alive on this host. Call it holding the run folder's
    lock. Returns the names removed."""
    removed = []
    for p in sorted(Path(folder).glob(".*.tmp*")):
        pid = p.name.rpartition(".tmp")[2]
        if pid.isdigit() and not pid_alive(int(pid)):
            p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed


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


# Resuming: a checkpoint's state only fits a run with the same values under FIXED; a change under any other
# key except FREE alters training and is refused unless ``resume_allow_changes: true`` (then recorded).
FIXED = ("model", "optim.name", "optim.batch_size", "optim.accum_steps", "data.name", "data.image_size")
FREE = ("name", "out_dir", "resume", "resume_allow_changes", "requeue", "device", "channels_last", "compile",
        "log", "checkpoint", "eval", "dist", "data.root", "data.download", "data.workers", "data.on_device")


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _under(key, prefixes):
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def check_resume(state, cfg, method):
    """Can this run continue ``state``? The same method, the same values under ``FIXED``, and no change that
    alters training unless ``cfg.resume_allow_changes``. Returns the allowed changes ``{key: [old, new]}``;
    anything else is one ``UserError`` naming the differing keys."""
    hint = "resume with the run's own config.yaml, or start a new run with name=..."
    if state.get("method", method) != method:
        raise UserError(f"the checkpoint was written by {state['method']}.py, not {method}.py: {hint}")
    old, new = _flat(state["config"]), _flat(cfg.plain())
    diff = {k: [old.get(k), new.get(k)] for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}
    say = lambda keys: ", ".join(f"{k}: {diff[k][0]} -> {diff[k][1]}" for k in keys)  # noqa: E731
    fixed = [k for k in diff if _under(k, FIXED)]
    if fixed:
        raise UserError(f"the checkpoint does not fit this run ({say(fixed)}): {hint}")
    changed = [k for k in diff if not _under(k, FREE)]
    if changed and not cfg.resume_allow_changes:
        raise UserError(f"resuming with settings that alter training ({say(changed)}): {hint}; or set "
                        "resume_allow_changes=true to continue with them (recorded in metrics.jsonl and summary.json)")
    return {k: diff[k] for k in changed}


def snapshot(cfg, counters, method, **objects):
    """Everything a run needs to continue: each object's ``state_dict()``, the counters
    (step, epoch, ...), the RNG states, the method and the resolved config."""
    return {**{k: o.state_dict() for k, o in objects.items()}, "counters": dict(counters),
            "rng": rng_state(), "method": method, "config": cfg.plain()}


def restore(state, cfg, **objects):
    """Load a ``snapshot`` into ``objects`` and the RNGs; returns the counters (check with ``check_resume``
    first). A state that does not fit an object is one clear ``UserError``."""
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

"""The commands that sit above the training scripts (``python -m common.tools.<name>``): evaluate and export a
checkpoint, draw the papers' figures, run a results table and its baselines, time the scripts. They import the
core modules of ``common`` and the scripts; nothing in the core imports them."""
import sys
from pathlib import Path

from common.config import UserError
from common.dist import one_line
from common.models import resnet


def online_part(state, prefix, path):
    """The tensors of a checkpoint's online network under ``prefix`` (``f.``: the encoder, which every script
    names f; ``g.``: the projector), prefix removed; none is one clear ``UserError``."""
    part = {k[len(prefix):]: v.contiguous() for k, v in (state.get("online") or {}).items() if k.startswith(prefix)}
    if not part:
        raise UserError(f"{path} holds no online network with an encoder ('online' / 'f.*'): a checkpoint of "
                        "one of the six scripts is needed (toy2d runs have no ResNet and save none)")
    return part


def load_encoder(state, m, path, net=None):
    """The online encoder f of checkpoint ``state`` (read from ``path``), loaded into ``net`` (default: the
    ``common.models.resnet`` of model config ``m``); weights that do not fit are one clear ``UserError``."""
    if net is None:
        net = resnet(m["arch"], m["width"], m["cifar_stem"], m["norm"])[0]
    try:
        net.load_state_dict(online_part(state, "f.", path))
    except RuntimeError as e:
        why = [line.strip() for line in str(e).splitlines() if line.strip()][-1][:160]  # the first is a title
        raise UserError(f"the encoder (online weights f.*) of {path} does not fit model.arch={m['arch']} "
                        f"model.width={m['width']} model.norm={m['norm']} ({why}): use the run's own model "
                        "settings") from None
    return net


def find_checkpoint(path):
    """The checkpoint ``path`` names: a ``.pt`` file, or a run folder's ``checkpoints/last.pt``."""
    p = Path(path)
    if p.is_dir():
        p = p / "checkpoints" / "last.pt"
    if not p.is_file():
        raise UserError(f"no checkpoint at {p.resolve()}: give a checkpoint (.pt) or a run folder holding "
                        "checkpoints/last.pt")
    return p


def or_exit(fn, *args):
    """``fn(*args)``, with a ``UserError`` printed as one line (``error: ...``) and exit status 2: a command's
    ``main`` fails as the training scripts do."""
    try:
        return fn(*args)
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)  # (a DataLoader worker's: the message, not its traceback)
        sys.exit(2)

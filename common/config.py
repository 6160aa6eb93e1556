"""Config: defaults, YAML file, dotted command-line overrides, strict checking.

A config file may start with ``base: other.yaml`` (path relative to the file) to
inherit that file's values and override some of them.

Resolution order (later wins)::

    BASE defaults  <-  the script's METHOD defaults  <-  PRESETS[data.name]
                   <-  --config FILE.yaml            <-  --set key.sub=value ...

Strict: every key of the file and of ``--set`` must exist in the defaults, its
value must have the default's type (an int is accepted for a float), a value
with an entry in ``CHOICES`` must be one of the listed ones (a tuple) or lie in
the range written there (a string such as ``"0 < x <= 1"``; for a list every
item, with ``increasing`` / ``not empty`` / ``length N`` / ``integers`` / ``distinct`` where said; a hint after ``;``),
a float must be finite (``.inf``, ``.nan`` are refused), and a default of
``REQUIRED`` must be given. Any violation raises ``UserError`` naming the key,
the value and what is valid, before anything is loaded or trained. ``null``
defaults accept any value. ``--help [KEY_PREFIX]`` lists each key's default, type, range and comment (its meaning).

Usage in a script::

    cfg = parse(sys.argv[1:], METHOD_DEFAULTS, METHOD_CHOICES, method="byol_uniform")
"""
import argparse
import ast
import copy
import difflib
import json
import math
import sys
import tokenize
from pathlib import Path

import yaml


class UserError(Exception):
    """A problem the user can fix (bad config, missing dataset, ...).

    The launcher prints its message as one line and exits with status 2.
    """


class Cfg(dict):
    """A dict with attribute access: ``cfg.optim.lr`` == ``cfg["optim"]["lr"]``."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key, value):
        self[key] = value

    def __deepcopy__(self, memo):
        return Cfg.wrap(copy.deepcopy(dict(self), memo))

    @staticmethod
    def wrap(d):
        """Recursively turn nested dicts into Cfg."""
        if isinstance(d, dict):
            return Cfg({k: Cfg.wrap(v) for k, v in d.items()})
        return d

    def plain(self):
        """Nested plain dicts (for YAML/JSON)."""
        return {k: (v.plain() if isinstance(v, Cfg) else v) for k, v in self.items()}


REQUIRED = "???"

# The datasets ``common.data`` loads by name (``toy2d``: center_penalty.py's points), and each one's partial config,
# merged between the defaults and the user's file.
DATASETS = ("synthetic", "cifar10", "cifar100", "stl10", "imagenet", "imagenet100", "fashion_mnist", "folder", "toy2d")
NO_BLUR = {"blur_p": [0.0, 0.0]}  # small images: no blur (CIFAR: BYOL-MHE §3.5, App. B.2)
PRESETS = {
    "synthetic": {"data": {"image_size": 32}, "augment": NO_BLUR},
    "cifar10": {"data": {"image_size": 32}, "augment": NO_BLUR},
    "cifar100": {"data": {"image_size": 32}, "augment": NO_BLUR},
    "stl10": {"data": {"image_size": 96}},
    "imagenet": {"data": {"image_size": 224}},
    "imagenet100": {"data": {"image_size": 224}},
    "fashion_mnist": {"data": {"image_size": 28}, "augment": NO_BLUR},
    "folder": {},  # your images: set data.image_size (default 32); BYOL's blur unless augment.blur_p says otherwise
}

# Defaults shared by every method script. Each script adds/overrides its own.
BASE = {
    "name": None,            # run name; default: the config file's stem
    "out_dir": "runs",       # run folder = out_dir/<method>/<name>
    "seed": 0,               # seeds the weights, the augmentations and the data order
    "device": "auto",        # auto: cuda if available else cpu
    "resume": "none",        # none | auto (last checkpoint of the run folder) | path/to/checkpoint.pt
    "resume_allow_changes": False,  # resume with settings that alter training (recorded); default: refused
    "requeue": False,        # under SLURM: after a SIGUSR1 stop (sbatch --signal=USR1@120), scontrol requeue
    "precision": "fp32",     # fp32 | bf16 (autocast) | fp16 (autocast + GradScaler)
    "channels_last": False,  # memory format for conv nets on CUDA
    "compile": False,        # torch.compile the encoder (SyncBN left eager; first steps pay the compile time)
    "data": {
        "name": "synthetic",  # dataset (its preset sets data.image_size and, for small images, no blur)
        "root": "data",      # where the datasets are; folder: the folder holding train/ (and val/)
        "download": False,   # only true ever downloads
        "image_size": 32,    # size of the training views
        "val_split": False,  # hold out a validation split (BYOL-MHE App. B.1) and evaluate on it
        "workers": 4,        # DataLoader worker processes (augment.path cpu/hybrid, ImageNet decoding)
        "on_device": False,  # small in-memory datasets: keep the uint8 images on the training device, no workers
        "mean": None,        # folder only: per-channel mean in [0, 1] units (null: computed once and cached)
        "std": None,         # folder only: per-channel std (null: computed with the mean)
        "synthetic": {"train_size": 10000, "test_size": 2000,  # the embedded shapes (common.data): images per split,
                      "size": 32, "classes": 10, "seed": 0},   # their side, shape classes (<= 10), generator seed
    },
    "augment": {             # BYOL views (Grill et al.; BYOL-MHE App. B.2)
        "path": "batched",   # batched: per-sample random ops on the training device | cpu: torchvision v2 in workers
                             # | hybrid: decode + crop + flip in workers, colour/blur/solarise on the device
        "crop_scale": [0.08, 1.0],       # random resized crop: area fraction
        "crop_ratio": [0.75, 4.0 / 3.0],  # random resized crop: aspect ratio
        "flip_p": 0.5,                   # horizontal flip probability
        "jitter": [0.4, 0.4, 0.2, 0.1],  # brightness, contrast, saturation, hue
        "jitter_p": 0.8,                 # colour jitter probability
        "gray_p": 0.2,                   # grayscale probability
        "blur_p": [1.0, 0.1],            # blur probability per view (BYOL's asymmetric pair)
        "blur_sigma": [0.1, 2.0],        # Gaussian blur sigma
        "solarize_p": [0.0, 0.2],        # solarisation probability per view
    },
    "model": {                     # the encoder; each script adds its heads (a paper's choice)
        "arch": "resnet18",        # the ResNet encoder f
        "width": 64,               # base channels: 64 = torchvision's ResNet; smaller for CPU-sized runs
        "cifar_stem": True,        # 3x3 stride-1 conv, no max-pool
        "norm": "bn",              # bn | gn | ln | none (no-BN ablations)
        "zero_init_residual": False,  # zero-init the last norm scale of each residual block
        "sync_bn": True,           # SyncBatchNorm when training on more than one process
    },
    "optim": {                     # each script adds its paper's name, lr, weight_decay, batch_size, epochs,
                                   # warmup_epochs (and an EMA script its ema: tau, schedule)
        "lr_scaling": "linear",    # linear: lr = base * batch_size * accum_steps / 256 | none
        "momentum": 0.9,           # lars/sgd momentum
        "eta": 0.001,              # LARS trust coefficient
        "exclude_bias_norm": True,  # no weight decay / LARS adaptation for biases and norm parameters
        "betas": [0.9, 0.999],     # adam/adamw betas
        "accum_steps": 1,          # optimizer (and EMA) step every N forwards
        "clip_grad": 0.0,          # clip the gradient norm to this (0: off)
    },
    "eval": {
        "every": 1,                # epochs between kNN evaluations (0: only at the end)
        "knn_k": [200],            # first entry is the monitored kNN
        "knn_t": 0.1,              # temperature of the weighted kNN
        "batch_size": 512,         # evaluation batch (feature extraction)
        "linear": "fast",          # fast: on cached features | paper: augmented, frozen encoder | none
        "linear_epochs": 100,      # linear probe: epochs
        "linear_lr": 0.2,          # linear probe: learning rate (cosine schedule)
        "linear_batch_size": 256,  # linear probe: batch size
        "linear_weight_decay": 0.0,  # linear probe: weight decay
        "linear_optimizer": "sgd",  # linear probe: optimizer
        "crop": 28 / 32,           # CIFAR: centre crop of this fraction of the source side before the resize
                                   # (BYOL-MHE App. B.2: 28/32); 1.0: none (RAFT App. B); common.augment.eval_transform
    },
    "log": {
        "every": 10,               # optimizer steps between metric lines of metrics.jsonl
        "progress": "auto",        # tqdm bar on rank 0: auto (when stderr is a terminal) | true | false
        "tensorboard": False,      # also write the metrics to run_dir/tensorboard (needs the tensorboard package)
    },
    "checkpoint": {
        "every": 1,                # epochs between writes of checkpoints/last.pt
        "keep_every": 0,           # also keep checkpoints/epoch_XXXX.pt every N epochs (0: never)
        "every_steps": 0,          # also write last.pt every N optimizer steps (0: never)
        "stop_after_step": 0,      # testing: write last.pt and exit after this step, as if killed (0: never)
    },
    "dist": {
        "nproc": 1,                # >1: spawn N local processes (ignored under torchrun / srun)
        "backend": "auto",         # auto: nccl on CUDA, gloo on CPU
        "timeout_min": 30.0,       # a collective waiting longer than this fails (a dead or stalled rank)
    },
}

CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "precision": ("fp32", "bf16", "fp16"),
    "data.name": DATASETS,
    "augment.path": ("batched", "cpu", "hybrid"),
    "model.arch": ("resnet18", "resnet34", "resnet50"),
    "model.norm": ("bn", "gn", "ln", "none"),
    "optim.name": ("lars", "sgd", "adam", "adamw"),
    "optim.lr_scaling": ("linear", "none"),
    "ema.schedule": ("cosine", "constant"),  # cosine: 1-(1-tau)(cos(pi k/K)+1)/2
    "eval.linear": ("fast", "paper", "none"),
    "eval.linear_optimizer": ("sgd", "adam"),
    "dist.backend": ("auto", "nccl", "gloo"),
    "log.progress": ("auto", True, False),
    # ranges (x: the value, or each item of a list)
    "seed": "x >= 0", "seeds": "x >= 0, integers, distinct; raft.py's list of seeds, each a seed",
    "data.image_size": "x >= 2; the views and evaluation images are resized to it",
    "data.workers": "x >= 0",
    "data.synthetic.size": "x >= 1", "data.synthetic.train_size": "x >= 1",
    "data.synthetic.test_size": "x >= 2; uniformity is measured over pairs of test images",
    "augment.crop_scale": "0 < x <= 1, increasing, length 2; [min, max]",
    "augment.crop_ratio": "x > 0, increasing, length 2; [min, max]",
    "augment.flip_p": "0 <= x <= 1", "augment.jitter": "x >= 0, length 4; brightness, contrast, saturation, hue",
    "augment.jitter_p": "0 <= x <= 1",
    "augment.gray_p": "0 <= x <= 1", "augment.blur_p": "0 <= x <= 1, not empty",
    "augment.blur_sigma": "x > 0, increasing, length 2; [min, max]", "augment.solarize_p": "0 <= x <= 1, not empty",
    "model.width": "x >= 1", "model.proj_hidden": "x >= 1", "model.proj_dim": "x >= 1", "model.pred_hidden": "x >= 1",
    "optim.lr": "x >= 0; 0 keeps the initial weights (a random-init baseline)", "optim.weight_decay": "x >= 0",
    "optim.momentum": "0 <= x < 1", "optim.eta": "x > 0",
    "optim.betas": "0 <= x < 1", "optim.epochs": "x >= 1", "optim.warmup_epochs": "x >= 0",
    "optim.batch_size": "x >= 1", "optim.accum_steps": "x >= 1", "optim.clip_grad": "x >= 0",
    "ema.tau": "0 <= x <= 1",
    "eval.every": "x >= 0", "eval.knn_k": "x >= 1, not empty", "eval.knn_t": "x > 0", "eval.batch_size": "x >= 1",
    "eval.linear_epochs": "x >= 1", "eval.linear_lr": "x > 0", "eval.linear_batch_size": "x >= 1",
    "eval.linear_weight_decay": "x >= 0", "eval.crop": "0 < x <= 1; the fraction of the CIFAR source side kept",
    "log.every": "x >= 1", "checkpoint.every": "x >= 1", "checkpoint.keep_every": "x >= 0",
    "checkpoint.every_steps": "x >= 0", "checkpoint.stop_after_step": "x >= 0",
    "dist.nproc": "x >= 1", "dist.timeout_min": "x > 0",
}
# Keys whose default is a word but which also take a YAML boolean (``log.progress: false``).
SWITCHES = ("log.progress",)
# --help: a key's meaning is its trailing comment in BASE, else here (keys that several scripts add), else its comment
# in the script's DEFAULTS (_comments reads them from the source: the comment is the documentation).
SCRIPT_KEYS = {"optim.name": "optimizer", "optim.lr": "base learning rate (see optim.lr_scaling)",
               "optim.weight_decay": "weight decay", "optim.batch_size": "global batch over all processes",
               "optim.epochs": "training epochs", "optim.warmup_epochs": "linear lr warm-up from 0, then cosine to 0",
               "ema.tau": "target EMA rate: xi <- tau xi + (1 - tau) theta", "ema.schedule": "cosine: tau rises to 1",
               "model.proj_hidden": "projector hidden width", "model.proj_dim": "projector output dimension",
               "model.pred_hidden": "predictor hidden width"}


def merge(base, new):
    """Deep-merge ``new`` into a copy of ``base`` (no checking)."""
    out = copy.deepcopy(base)
    for k, v in new.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _typename(v):
    return type(v).__name__


def _check(defaults, user, where, prefix=""):
    """Check ``user`` against ``defaults`` recursively; return it with ints cast to float where needed."""
    if not isinstance(user, dict):
        raise UserError(f"config section '{prefix.rstrip('.') or '<top>'}' must be a mapping, "
                        f"got {_typename(user)} ({where})")
    out = {}
    for k, v in user.items():
        key = prefix + str(k)
        if k not in defaults:
            valid = sorted(defaults)
            near = difflib.get_close_matches(str(k), valid, n=1)
            hint = f" Did you mean '{prefix}{near[0]}'?" if near else ""
            raise UserError(f"unknown config key '{key}' ({where}).{hint} Valid keys"
                            f"{' under ' + repr(prefix.rstrip('.')) if prefix else ''}: {', '.join(valid)}")
        d = defaults[k]
        if isinstance(d, dict):
            out[k] = _check(d, v, where, key + ".")
        else:
            out[k] = _check_value(key, d, v, where)
    return out


def _kind(default):
    """The type a key takes, from its default: what _check_value checks and --help shows."""
    floats = isinstance(default, list) and default and all(isinstance(x, float) for x in default)
    return "any" if default is None or default == REQUIRED else "list[float]" if floats else _typename(default)


def _check_value(key, default, v, where):
    if any(isinstance(x, float) and not math.isfinite(x) for x in (v if isinstance(v, list) else [v])):
        raise UserError(f"config key '{key}' = {v!r} is not a finite number ({where}): give a finite value")
    kind = _kind(default)
    if kind == "any" or (key in SWITCHES and isinstance(v, bool)):
        return v
    num = isinstance(v, (int, float)) and not isinstance(v, bool)
    nums = isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
    ok = {"bool": isinstance(v, bool), "int": num and isinstance(v, int), "float": num,
          "list[float]": nums}.get(kind, isinstance(v, type(default)))
    v = float(v) if ok and kind == "float" else [float(x) for x in v] if ok and kind == "list[float]" else v
    if not ok:
        raise UserError(f"config key '{key}' expects {_typename(default)} (like {default!r}), "
                        f"got {_typename(v)} {v!r} ({where})")
    return v


def in_range(v, spec):
    """Does ``v`` (a number, or a list of numbers) satisfy the range ``spec`` ("0 < x <= 1, increasing; hint")?"""
    cond, *flags = [s.strip() for s in spec.split(";")[0].split(",")]
    items = v if isinstance(v, list) else [v]
    if "not empty" in flags and not items:
        return False
    if "increasing" in flags and any(a > b for a, b in zip(items, items[1:])):
        return False
    if "integers" in flags and not all(isinstance(x, int) and not isinstance(x, bool) for x in items):
        return False
    if "distinct" in flags and any(a == b for i, a in enumerate(items) for b in items[i + 1:]):
        return False
    if any(f.startswith("length ") and len(items) != int(f.split()[1]) for f in flags):
        return False
    return all(isinstance(x, (int, float)) and eval(cond, {}, {"x": x}) for x in items)  # our own constants


def _check_resolved(cfg, choices, prefix=""):
    for k, v in cfg.items():
        key = prefix + k
        if isinstance(v, dict):
            _check_resolved(v, choices, key + ".")
        elif v == REQUIRED:
            raise UserError(f"missing required config value '{key}': set it in the YAML file or with --set {key}=...")
        elif isinstance(choices.get(key), str) and v is not None and not in_range(v, choices[key]):
            rng, _, hint = choices[key].partition(";")
            raise UserError(f"config key '{key}' = {v!r} is out of range: allowed {rng}"
                            + (f" ({hint.strip()})" if hint else ""))
        elif isinstance(choices.get(key), tuple) and v not in choices[key]:
            valid = ", ".join(str(c).lower() if isinstance(c, bool) else str(c) for c in choices[key])
            raise UserError(f"config key '{key}' = {v!r} is not one of: {valid}")


def parse_overrides(items):
    """``["optim.lr=0.5", "data.name=cifar100"]`` -> nested dict, values parsed as YAML scalars."""
    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"override '{item}' must look like key.sub=value (e.g. --set optim.lr=0.5)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" and key.strip() != "name" else raw.strip()  # name: as typed
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str) and key.strip() != "name":  # YAML 1.1 reads "1e-4" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def _yaml_problem(e):
    """' at line N, column M: what is wrong' of a YAML error (1-based, as an editor counts)."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{where}: {getattr(e, 'problem', None) or str(e).splitlines()[0]}"


def load_yaml(path, _seen=()):
    """Read a config file; a top-level ``base: other.yaml`` (relative to this file) is read first
    and this file's keys are merged over it (chains allowed)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path.resolve()} (pass --config path/to/file.yaml)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:  # (byte offsets from 0, as xxd and hexdump show them)
        raise UserError(f"{path}: not UTF-8 (byte {e.start}: 0x{raw[e.start]:02x}); save it as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML{_yaml_problem(e)}") from None
    if data is None or data == {}:
        raise UserError(f"config file {path} holds no settings (it is empty or only comments): the run would use the "
                        "script's defaults; add the settings, or leave --config out to run the defaults")
    if isinstance(data, dict) and "base" in data:
        base = path.parent / str(data.pop("base"))
        if base.resolve() in _seen:
            raise UserError(f"config file {path}: 'base' chain loops back to {base}")
        if not base.is_file():
            raise UserError(f"config file {path}: its 'base: {base.relative_to(path.parent)}' names no file "
                            f"({base.resolve()}): fix the base: line (a path relative to {path})")
        data = merge(load_yaml(base, (*_seen, path.resolve())), data)
    return data


def resolve(defaults, user_layers, choices=CHOICES, presets=None):
    """Merge checked ``user_layers`` [(dict, where), ...] over ``defaults`` (+ dataset preset)."""
    checked = [_check(defaults, layer, where) for layer, where in user_layers]
    name = defaults["data"]["name"]
    for layer in checked:
        name = layer.get("data", {}).get("name", name)
    cfg = defaults
    if presets and name in presets:
        cfg = merge(cfg, _check(defaults, presets[name], f"preset of dataset {name}"))
    for layer in checked:
        cfg = merge(cfg, layer)
    _check_resolved(cfg, choices)
    return Cfg.wrap(cfg)


def parse(argv, method_defaults=None, method_choices=None, method="run"):
    """Parse ``--config FILE --set k=v ...`` into a resolved, checked ``Cfg``.

    Like argparse, a bad config prints one line (``error: ...``) and exits with status 2.
    """
    try:
        return _parse(argv, method_defaults, method_choices, method)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _parse(argv, method_defaults=None, method_choices=None, method="run"):
    ap = argparse.ArgumentParser(description=f"{method}: see the script's docstring and README.", add_help=False)
    ap.add_argument("-h", "--help", nargs="?", const="", metavar="KEY_PREFIX", help="list the config keys, then exit")
    ap.add_argument("--config", help="YAML config file (keys as in the defaults)")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", action="extend",
                    help="dotted overrides, e.g. --set optim.lr=0.5 data.name=cifar100")
    args = ap.parse_args(argv)
    defaults, choices = merge(BASE, method_defaults or {}), {**CHOICES, **(method_choices or {})}
    if args.help is not None:  # with the comments of the script that defines method_defaults (run as __main__)
        main = sys.modules["__main__"]
        source = main.__file__ if getattr(main, "DEFAULTS", None) is method_defaults else None
        print(*[] if args.help else [ap.format_help(), "config keys (x: the value or each list item):"],
              help_text(defaults, choices, args.help, source), sep="\n")
        sys.exit(0)
    layers = []
    if args.config:
        layers.append((load_yaml(args.config), f"in {args.config}"))
    layers.append((parse_overrides(args.set), "from --set"))
    cfg = resolve(defaults, layers, choices, PRESETS)
    if cfg.name is None:
        cfg.name = Path(args.config).stem if args.config else "default"
    if isinstance(cfg.name, (int, float)) and not isinstance(cfg.name, bool):  # a file's name: 123
        cfg.name = str(cfg.name)
    if isinstance(cfg.name, str) and not cfg.name.strip():
        raise UserError(f"name={cfg.name!r} is empty: give the run a name (the run folder is out_dir/<method>/<name>), "
                        "or leave name out to use the config file's")
    if not isinstance(cfg.name, str) or not cfg.name or cfg.name in (".", "..") or any(c in cfg.name for c in "/\\"):
        raise UserError(f"name={cfg.name!r} must be a plain folder name (no / or \\): the run folder is "
                        "out_dir/<method>/<name>; set out_dir=... to choose where")
    if not isinstance(cfg.out_dir, str) or not cfg.out_dir.strip():
        raise UserError(f"out_dir={cfg.out_dir!r} is empty: the run would be written into the current folder; "
                        "set out_dir=runs (the default) or another folder")
    return cfg


def _comments(path, name):
    """{dotted key: trailing comment} of the dict literal ``name = {...}`` in the file ``path``; a comment goes on in
    the comment-only lines below it that start at its column."""
    src = Path(path).read_text(encoding="utf-8")
    notes = {t.start[0]: (t.start[1], t.string.lstrip("#").strip(), not t.line[:t.start[1]].strip())
             for t in tokenize.generate_tokens(iter(src.splitlines(True)).__next__) if t.type == tokenize.COMMENT}
    out, todo = {}, [(n.value, "") for n in ast.parse(src).body if isinstance(n, ast.Assign)
                     and getattr(n.targets[0], "id", None) == name and isinstance(n.value, ast.Dict)]
    while todo:
        node, prefix = todo.pop()
        for k, v in zip(node.keys, node.values):
            line, key = v.end_lineno, f"{prefix}{k.value}"
            if isinstance(v, ast.Dict):
                todo.append((v, key + "."))
            elif line in notes and not notes[line][2]:  # a trailing comment, and its continuation lines
                col, out[key] = notes[line][:2]
                while notes.get(line + 1, (0, 0, False))[::2] == (col, True):
                    line += 1
                    out[key] += " " + notes[line][1]
    return out


def _leaves(d, prefix=""):
    for k, v in d.items():
        yield from _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [(prefix + k, v)]


def help_text(defaults, choices, prefix="", source=None):
    """One aligned line per key that starts with ``prefix``: its default, the type and the values that --set
    accepts (from _kind and ``choices``, as the checks), its meaning (comments of BASE and the ``source`` file)."""
    meaning = {**(_comments(source, "DEFAULTS") if source else {}), **SCRIPT_KEYS, **_comments(__file__, "BASE")}
    rows = []
    for key, d in (kv for kv in _leaves(defaults) if kv[0].startswith(prefix)):
        spec, note = choices.get(key), meaning.get(key, "")
        rng, _, hint = spec.partition(";") if isinstance(spec, str) else ("", "", "")
        allowed = f"{_kind(d)} {rng.strip() if isinstance(d, list) else rng.strip().removeprefix('x ')}".rstrip()
        if isinstance(spec, tuple):
            allowed = "|".join(str(c).lower() if isinstance(c, bool) else str(c) for c in spec)
        hint = "" if hint.strip() in note else hint.strip()  # the range's hint, unless the comment says it already
        rows.append((key, d if isinstance(d, str) else json.dumps(d), allowed, "; ".join(filter(None, (note, hint)))))
    if not rows:
        raise UserError(f"--help {prefix}: no config key starts with {prefix!r}; the sections: "
                        + ", ".join(k for k, v in defaults.items() if isinstance(v, dict)))
    w = [min(max(len(r[i]) for r in rows), cap) for i, cap in enumerate((40, 12, 20))]
    return "\n".join(f"{k:<{w[0]}}  {d:<{w[1]}}  {t:<{w[2]}}  {m}".rstrip() for k, d, t, m in rows)


def save(cfg, path):
    """Write the resolved config as YAML (the run folder's config.yaml)."""
    Path(path).write_text(yaml.safe_dump(cfg.plain(), sort_keys=False))


def dump(cfg):
    return yaml.safe_dump(cfg.plain(), sort_keys=False)
